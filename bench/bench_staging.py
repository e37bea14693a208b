"""What crash safety costs: wall time of hf2mcore with the zarr staging store vs writing .distcp directly.

    python bench/bench_staging.py [--size-mb 400] [--runs 5] [--workdir DIR]

Generates a synthetic bf16 Llama checkpoint of about ``--size-mb`` MB (once, in ``--workdir``), then converts
it alternately with staging (the default: stage in zarr, assemble, resumable) and with ``--no-staging``
(direct writes, not resumable), ``--runs`` times each, in this process (Python and torch imports are not
timed; streamconv drops the source's pages once read, so each run reads it from disk or from what the
kernel kept). Timed: the whole ``hf2mcore()`` call, from plan to ``.metadata`` and tracker (every
``.distcp`` is fsynced in both modes). Two file sizes: 2 GiB (this model fits one .distcp: its staged
chunks all stay until that file is complete, the worst case) and ``--distcp-size`` = model/6 (several
files, as any real model has with the default 512 MiB). Reports the median and min of each, the staging
overhead, and checks that both modes wrote the same bytes.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamconv.commands.hf2mcore import Options, hf2mcore  # noqa: E402
from streamconv.reference.synth import llama_config, make_checkpoint  # noqa: E402


def model_config(size_mb: int) -> dict:
    """A bf16 Llama of about ``size_mb`` MB: hidden 1024, vocab 32000, layers to fit."""
    hidden, ffn, vocab = 1024, 2816, 32000
    per_layer = (hidden + 2 * 256) * hidden + hidden * hidden + 3 * ffn * hidden + 2 * hidden
    layers = max(1, round((size_mb * 1e6 / 2 - 2 * vocab * hidden) / per_layer))
    return llama_config(hidden=hidden, layers=layers, heads=16, kv_heads=4, ffn=ffn, vocab=vocab)


def timed_run(src: Path, out: Path, staging: bool, file_bytes: int) -> float:
    if out.exists():
        shutil.rmtree(out)
    os.sync()
    t0 = time.perf_counter()
    hf2mcore(str(src), out, Options(quiet=True, chunk_journal=staging, file_bytes=file_bytes))
    return time.perf_counter() - t0


def same_checkpoint(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in (a / "iter_0000000").iterdir() if p.name != "run_config.yaml")
    return names == sorted(p.name for p in (b / "iter_0000000").iterdir() if p.name != "run_config.yaml") and all(
        filecmp.cmp(a / "iter_0000000" / n, b / "iter_0000000" / n, shallow=False) for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=400)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", default=None, help="where the checkpoint and outputs go (default: a temp folder)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-staging-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = model_config(args.size_mb)
    src = work / f"hf-{args.size_mb}mb"
    if not (src / "config.json").is_file():
        make_checkpoint(src, cfg, seed=0, shards=4, dtype=torch.bfloat16)
    model_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    results = {}
    for label, file_bytes in (("one 2 GiB file", 2 * 1024**3), ("~6 files", max(1 << 20, model_bytes // 6))):
        times = {"staged": [], "direct": []}
        timed_run(src, work / "warmup", True, file_bytes)  # page cache, allocator, zarr imports
        for _ in range(args.runs):
            times["direct"].append(timed_run(src, work / "direct", False, file_bytes))
            times["staged"].append(timed_run(src, work / "staged", True, file_bytes))
        identical = same_checkpoint(work / "direct", work / "staged")
        med = {k: statistics.median(v) for k, v in times.items()}
        results[label] = {
            "distcp_size": file_bytes,
            "median_s": {k: round(v, 3) for k, v in med.items()},
            "min_s": {k: round(min(v), 3) for k, v in times.items()},
            "staging_overhead_pct": round(100 * (med["staged"] / med["direct"] - 1), 1),
            "mb_per_s": {k: round(model_bytes / 1e6 / v, 1) for k, v in med.items()},
            "identical_output": identical,
        }
    report = {"model_bytes": model_bytes, "layers": cfg["num_hidden_layers"], "runs": args.runs,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
              "date": time.strftime("%Y-%m-%d"), "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"hf2mcore, {model_bytes / 1e6:.0f} MB bf16 Llama ({cfg['num_hidden_layers']} layers), "
          f"median of {args.runs} runs, {report['machine']}, {report['date']}")
    print(f"{'distcp files':<16}{'direct s':>10}{'staged s':>10}{'overhead':>10}{'direct MB/s':>13}{'staged MB/s':>13}"
          f"  same bytes")
    for label, r in results.items():
        print(f"{label:<16}{r['median_s']['direct']:>10.2f}{r['median_s']['staged']:>10.2f}"
              f"{r['staging_overhead_pct']:>9.1f}%{r['mb_per_s']['direct']:>13.0f}{r['mb_per_s']['staged']:>13.0f}"
              f"  {r['identical_output']}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
