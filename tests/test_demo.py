"""The README's first quickstart command ends in ``streamconv demo``: it must pass, for real."""

import json
import subprocess
import sys


def test_demo_converts_loads_and_matches_reference(tmp_path):
    r = subprocess.run([sys.executable, "-m", "streamconv", "demo", "--json", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert [row["model"] for row in rows] == ["Nano-8B shape (Llama)", "Super-49B shape (DeciLM)"]
    for row in rows:
        assert row["ok"] and row["max_abs_diff"] <= 1e-4
    # the demo leaves real checkpoints behind when given a workdir
    assert (tmp_path / "nano-8b-mcore" / "iter_0000000" / ".metadata").is_file()
    assert (tmp_path / "super-49b-mcore" / "iter_0000000" / ".metadata").is_file()
