"""The engine: runs a plan under --max-memory through the contracts in engine/contracts.py."""
