#!/usr/bin/env python
"""(4) The GPU variant of (2): `streamconv hf2mcore --device cuda` against `--device cpu` and `cp -r`.

    python bench/gpu_vs_cp.py [--sizes 1,4] [--runs 3] [--max-memory 2GiB] [--workdir DIR]

Needs a CUDA machine (exits with a message otherwise). Runs ``bench/vs_cp.py`` twice:
- on a bf16 checkpoint, keeping bf16: the GPU only round-trips the bytes (the fusion is done by the reads),
  so this measures what the pinned-buffer pipeline costs or saves;
- on an fp32 checkpoint converted with ``--dtype bf16``: every byte is cast, on the GPU or on the CPU.
Each time, ``--device cuda`` output must be byte-identical to ``--device cpu`` output (checked on the
``.distcp`` files and ``.metadata``), and the table shows wall times against ``cp -r`` and ``cp -r + sync``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vs_cp  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-memory", default="2GiB")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run this on a GPU machine (or --device cpu to try the script itself)")
    common = ["--sizes", args.sizes, "--runs", str(args.runs), "--max-memory", args.max_memory, "--device",
              args.device, "--capped-sizes", "", "--no-naive", "--modes", "direct,staged"]
    if args.workdir:
        common += ["--workdir", args.workdir]
    if args.keep:
        common += ["--keep"]
    for dtype in ("bf16", "fp32"):
        print(f"\n=== {dtype} source{' -> --dtype bf16' if dtype == 'fp32' else ''} ===", flush=True)
        rc = vs_cp.main([*common, "--dtype", dtype])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
