"""What a run lives in: resume journal and identity, the output lock, torch.distributed, progress, signals, RSS."""
