"""One module per on-disk format: safetensors, torch_dist, zarr staging."""
