import os
import sys
from pathlib import Path

# tests import their helpers (mcore_harness) as top-level modules
sys.path.insert(0, str(Path(__file__).resolve().parent))
# never reach the network from tests: hub ids resolve from the local cache only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tiny models split into many chunks under tiny --max-memory budgets (refused below 1 MiB outside tests)
os.environ.setdefault("STREAMCONV_TEST_TINY_BUDGET", "1")
