"""Sinks: where a chunk's bytes go (torch_dist, safetensors, the zarr view, checking sinks)."""
