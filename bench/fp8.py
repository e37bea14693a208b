#!/usr/bin/env python
"""The cost of dequantizing FP8 inputs: ``hf2mcore`` of an FP8 checkpoint against the same model in bf16.

    python bench/fp8.py [--size 3] [--methods FP8,FP8_PB_WO] [--rounds 3] [--where tmpfs] [--device cuda]

The bf16 model of ``--size`` GB (bench/_common.py's family) is quantized once per method the way Model
Optimizer exports it (``streamconv.reference.synth.quantize_checkpoint``: float8 weights, float32 scales) and kept
beside it. Alternating, for ``--rounds`` rounds: ``cp -r`` of the bf16 folder, ``hf2mcore`` of the bf16
folder and of each FP8 folder (all three write the same bf16 checkpoint size). Medians of the conversion's
own ``seconds``, CPU seconds (user + sys) per GB written, and the engine's phases (``cast`` is the
dequantization for FP8). ``--device cuda`` passes that to every conversion (the dequantization then runs on
the GPU); compare with a run without it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402
from import_profile import hf2mcore  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=3.0, help="bf16 model size in GB (default 3)")
    ap.add_argument("--methods", default="FP8,FP8_PB_WO", help="Model Optimizer methods (default FP8,FP8_PB_WO)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--where", default="tmpfs", choices=["tmpfs", "disk"])
    ap.add_argument("--workdir", help="where models are generated and kept (default: a folder under /var/tmp)")
    ap.add_argument("--device", default="cpu", help="--device for every conversion (default cpu)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from streamconv.reference.synth import quantize_checkpoint

    disk = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="streamconv-fp8-", dir="/var/tmp"))
    bf16 = c.checkpoint(disk, args.size)
    methods = [m for m in args.methods.split(",") if m]
    sources = {"bf16": bf16}
    for m in methods:
        q = disk / f"{bf16.name}-{m}"
        if not (q / "config.json").is_file():
            quantize_checkpoint(bf16, q.with_suffix(".partial"), m, shards=2)
            q.with_suffix(".partial").rename(q)
        sources[m] = q
    work = Path(tempfile.mkdtemp(prefix="streamconv-fp8-", dir="/dev/shm")) if args.where == "tmpfs" else disk
    report = {"machine": c.machine(), "size_gb": args.size, "where": args.where, "device": args.device}
    try:
        if args.where == "tmpfs":
            sources = {k: Path(shutil.copytree(v, work / v.name)) for k, v in sources.items()}
        rows: dict[str, list] = {"cp -r": [], **{k: [] for k in sources}}
        for _ in range(args.rounds):
            c.rmtree(work / "cp")
            rows["cp -r"].append(c.run(["cp", "-r", str(sources["bf16"]), str(work / "cp")]))
            c.rmtree(work / "cp")
            for name, src in sources.items():
                rows[name].append(c.run(hf2mcore(src, work / "out", "--device", args.device)))
                c.rmtree(work / "out")
        gb = rows["bf16"][0]["summary"]["bytes"] / 1e9
        report["cp_wall"] = round(c.median([r["wall"] for r in rows["cp -r"]]), 2)
        for name in sources:
            rs = rows[name]
            report[name] = {"input_gb": round(c.folder_bytes(sources[name]) / 1e9, 2),
                            "output_gb": round(rs[0]["summary"]["bytes"] / 1e9, 2),
                            "seconds": round(c.median([r["summary"]["seconds"] for r in rs]), 2),
                            "conversion_cpu_per_gb": round(c.median([r["summary"]["cpu_seconds"] for r in rs]) / gb, 2),
                            "phases": c.phases(rs)}
        print(json.dumps(report), flush=True)
    finally:
        if args.where == "tmpfs":
            c.rmtree(work)
    return c.finish(args, report, disk)


if __name__ == "__main__":
    raise SystemExit(main())
