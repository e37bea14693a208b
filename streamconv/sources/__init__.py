"""Sources: where a tensor's bytes lie (safetensors shards, torch_dist items, FP8 checkpoints, synthetic data)."""
