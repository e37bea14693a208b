"""The real things outputs are judged against: synthetic checkpoints, an independent forward, megatron-core's models."""
