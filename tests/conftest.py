import os
import sys
from pathlib import Path

# tests import their helpers (mcore_harness) as top-level modules
sys.path.insert(0, str(Path(__file__).resolve().parent))
# never reach the network from tests: hub ids resolve from the local cache only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
