#!/usr/bin/env python
"""(1) Peak RSS and wall time of `streamconv hf2mcore` as the model grows, at one --max-memory: RSS stays flat.

    python bench/memory_flat.py [--sizes 1,4,16] [--max-memory 512MiB] [--runs 3] [--workdir DIR] [--keep]

For each size (GB), a synthetic bf16 Llama checkpoint is generated in ``--workdir`` (same tensor shapes at
every size, only the layer count grows; see ``_common.family_config``), then converted ``--runs`` times by
the CLI in a child process. Before each run the page cache is dropped when permitted (root), so every run
reads from disk. Reported (medians): wall time of the whole command (Python start-up included), peak RSS of
the child's process tree polled with psutil every 20 ms, the child's own ``getrusage`` peak and its peak
while converting (start-up excluded), and whether the peak is within the target ``--max-memory`` + 0.75 GiB.
Generated checkpoints and outputs are deleted at the end unless ``--keep``; free space is checked first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

BASELINE = 0.75 * c.GiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,16", help="model sizes in GB, comma-separated (default 1,4,16)")
    ap.add_argument("--max-memory", default="512MiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where checkpoints and outputs go (default: a temp folder "
                                                    "under /tmp; needs about twice the largest size free)")
    ap.add_argument("--keep", action="store_true", help="keep generated checkpoints for the next benchmark")
    ap.add_argument("--extra", default="", help="extra hf2mcore flags, e.g. '--no-staging'")
    ap.add_argument("--json", action="store_true", help="also print all measurements as JSON")
    args = ap.parse_args()
    from streamconv.engine.runner import parse_size

    budget = parse_size(args.max_memory)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="streamconv-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    info = c.machine()
    cold = c.drop_caches()
    print(f"machine: {info}\npage cache: {'dropped before every run' if cold else 'NOT dropped (not root): warm'}")
    rows, report = [], {"machine": info, "cold_cache": cold, "max_memory": budget, "sizes": {}}
    for size in [float(s) for s in args.sizes.split(",")]:
        src = c.checkpoint(work, size)
        model = c.folder_bytes(src)
        out = work / "out"
        c.require_space(work, model * 1.1, f"the output of the {size:g} GB conversion")
        runs = []
        for i in range(args.runs):
            c.rmtree(out)
            c.drop_caches()
            r = c.measure(c.streamconv_cmd(src, out, args.max_memory, *args.extra.split()))
            if not r.ok:
                sys.exit(f"streamconv failed on {src}: {r.stderr.strip()[-2000:]}")
            summary = json.loads(r.stdout)
            runs.append({"wall": r.wall, "polled_peak": r.peak_rss, "rusage_peak": summary["peak_rss_bytes"],
                         "conversion_peak": summary.get("conversion_peak_rss_bytes"),
                         "engine_seconds": summary["engine_seconds"], "mb_per_s": summary["mb_per_s"]})
            print(f"  {size:g} GB run {i + 1}: {r.wall:.1f}s, peak RSS {c.fmt_gib(r.peak_rss)} (polled), "
                  f"{c.fmt_gib(summary['peak_rss_bytes'])} (getrusage)", flush=True)
        c.rmtree(out)
        if not args.keep:
            c.rmtree(src)
        med = {k: c.median([r[k] for r in runs]) for k in runs[0]}
        peak = max(med["polled_peak"], med["rusage_peak"])
        report["sizes"][size] = {"model_bytes": model, "runs": runs, "median": med}
        rows.append([f"{model / 1e9:.2f} GB", args.runs, f"{med['wall']:.1f} s", f"{med['engine_seconds']:.1f} s",
                     f"{model / 1e6 / med['wall']:.0f} MB/s", c.fmt_gib(med["polled_peak"]),
                     c.fmt_gib(med["rusage_peak"]), c.fmt_gib(med["conversion_peak"]),
                     "yes" if peak <= budget + BASELINE else "NO"])
    c.print_table(f"streamconv hf2mcore --max-memory {args.max_memory} {args.extra} (medians; "
                  f"{'cold' if cold else 'warm'} cache)",
                  ["model", "runs", "wall", "engine", "wall rate", "peak RSS (psutil)", "peak RSS (getrusage)",
                   "peak RSS converting", "<= budget + 0.75 GiB"], rows)
    return c.finish(args, report, work)


if __name__ == "__main__":
    raise SystemExit(main())
