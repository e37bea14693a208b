"""Benchmark: peak RSS and speed of ``streamconv mcore2hf`` under several ``--max-memory`` budgets.

Makes a synthetic bf16 Llama of about ``--gb`` GB, imports it once (hf2mcore), then exports it in a fresh
process per budget and prints peak RSS against ``baseline + budget`` (baseline = the peak RSS of the same
command exporting a tiny model: interpreter, torch, threads), with the wall time of ``cp -r`` of the same
checkpoint for scale.

    python bench/mcore2hf_memory.py --gb 1 --budgets 128MiB 512MiB 2GiB --workdir /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def llama_for(gb: float) -> dict:
    from streamconv.reference.synth import llama_config

    hidden, ffn, vocab = 2048, 5632, 32000
    per_layer = (hidden + 2 * 512) * hidden + hidden * hidden + 3 * hidden * ffn
    layers = max(1, round((gb * 1e9 / 2 - 2 * vocab * hidden) / per_layer))
    return llama_config(hidden=hidden, layers=layers, heads=16, kv_heads=4, ffn=ffn, vocab=vocab)


def run(cmd: list[str]) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--budgets", nargs="+", default=["128MiB", "512MiB", "2GiB"])
    ap.add_argument("--workdir", default="/tmp/streamconv-bench-mcore2hf")
    args = ap.parse_args()
    import torch

    from streamconv.engine.runner import parse_size
    from streamconv.reference.synth import make_checkpoint

    work = Path(args.workdir)
    hf, mcore = work / "hf", work / "mcore"
    if not (mcore / "latest_checkpointed_iteration.txt").is_file():
        shutil.rmtree(work, ignore_errors=True)
        make_checkpoint(hf, llama_for(args.gb), dtype=torch.bfloat16, shards=4)
        run([sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(hf), "--megatron-path", str(mcore),
             "--json"])
    from streamconv.reference.synth import llama_config

    tiny = work / "tiny"
    if not (tiny / "mcore" / "latest_checkpointed_iteration.txt").is_file():
        make_checkpoint(tiny / "hf", llama_config(), dtype=torch.bfloat16, shards=1)
        run([sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(tiny / "hf"), "--megatron-path",
             str(tiny / "mcore"), "--json"])
    shutil.rmtree(tiny / "out", ignore_errors=True)
    baseline = run([sys.executable, "-m", "streamconv", "mcore2hf", "--megatron-path", str(tiny / "mcore"),
                    "--hf-path", str(tiny / "out"), "--json"])["peak_rss_bytes"]
    t0 = time.perf_counter()
    shutil.rmtree(work / "cp", ignore_errors=True)
    subprocess.run(["cp", "-r", str(mcore), str(work / "cp")], check=True)
    subprocess.run(["sync"], check=True)
    cp_s = time.perf_counter() - t0
    shutil.rmtree(work / "cp")
    size = sum(p.stat().st_size for p in mcore.rglob("*.distcp"))
    print(f"checkpoint {size / 1e9:.2f} GB; baseline RSS {baseline / 2**20:.0f} MiB; cp -r {cp_s:.1f}s")
    print(f"{'budget':>10} {'peak RSS':>10} {'limit':>10} {'ok':>4} {'seconds':>8} {'MB/s':>7}")
    for budget in args.budgets:
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        s = run([sys.executable, "-m", "streamconv", "mcore2hf", "--megatron-path", str(mcore), "--hf-path", str(out),
                 "--max-memory", budget, "--json"])
        limit = baseline + parse_size(budget)
        print(f"{budget:>10} {s['peak_rss_bytes'] / 2**20:>7.0f}MiB {limit / 2**20:>7.0f}MiB "
              f"{'yes' if s['peak_rss_bytes'] <= limit else 'NO':>4} {s['seconds']:>8.2f} {s['mb_per_s']:>7.0f}")


if __name__ == "__main__":
    main()
