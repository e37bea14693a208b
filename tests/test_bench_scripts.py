"""Every benchmark script starts: ``python bench/<script>.py --help`` exits 0 (its imports resolve, its options
parse). Two scripts once failed at start-up unnoticed: one imported a helper that had moved, one sat beside a
module named like the standard library's ``profile``, which torch imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))
STDLIB = set(sys.stdlib_module_names)


def test_no_script_is_named_like_a_standard_module():
    assert SCRIPTS and not {Path(s).stem for s in SCRIPTS} & STDLIB  # the folder is first on the scripts' sys.path


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bench_script_starts(script):
    r = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]
