"""The memory bound, measured on real processes: a model seven times larger than ``--max-memory`` converts
with a peak RSS no higher than a tiny model's plus the budget."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from streamconv.reference.synth import llama_config, make_checkpoint

BUDGET = 16 * 2**20
SLACK = 4 * 2**20  # thread stacks, allocator bookkeeping, objects of a larger plan


def convert(src, out) -> dict:
    r = subprocess.run([sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(src), "--megatron-path",
                        str(out), "--max-memory", str(BUDGET), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_peak_rss_does_not_grow_with_the_model(tmp_path):
    tiny = make_checkpoint(tmp_path / "tiny", llama_config(), dtype=torch.bfloat16, shards=1)
    big = make_checkpoint(tmp_path / "big", llama_config(hidden=512, layers=8, heads=8, kv_heads=2, ffn=1536,
                                                         vocab=32768), dtype=torch.bfloat16, shards=2)
    size = sum(p.stat().st_size for p in big.glob("*.safetensors"))
    assert size > 6 * BUDGET
    base = convert(tiny, tmp_path / "tiny-out")
    run = convert(big, tmp_path / "big-out")
    assert run["bytes"] > 6 * BUDGET and run["peak_in_flight_bytes"] <= BUDGET
    # the conversion's own peak (start-up excluded) and the whole process's peak
    assert run["conversion_peak_rss_bytes"] <= base["conversion_peak_rss_bytes"] + BUDGET + SLACK, (run, base)
    assert run["peak_rss_bytes"] <= base["peak_rss_bytes"] + BUDGET + SLACK, (run, base)
