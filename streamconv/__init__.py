"""streamconv: streaming, memory-bounded Hugging Face <-> Megatron-Core torch_dist converter."""

__version__ = "0.1.0"
