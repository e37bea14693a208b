#!/usr/bin/env python
"""(2) Wall time of `streamconv hf2mcore` against `cp -r` of the same folder and a naive in-memory converter.

    python bench/vs_cp.py [--sizes 1,4] [--capped-sizes 16] [--runs 3] [--max-memory 512MiB] [--workdir DIR]

Side by side, per model size, each after dropping the page cache (root; otherwise warm-cache numbers, and
the table says so), medians of ``--runs``:
- ``cp -r`` of the HF folder to the same disk, and ``cp -r`` followed by ``sync`` (streamconv fsyncs what it
  writes, so ``cp -r + sync`` is the like-for-like baseline; plain ``cp -r`` leaves the data in the page cache);
- ``streamconv hf2mcore`` (the default: zarr staging, resumable) and ``--no-staging`` (direct .distcp writes);
- ``bench/naive_convert.py``: load everything, build the state dict, ``torch.distributed.checkpoint.save``.
Outputs are checked: the naive converter's and the direct mode's tensors equal the default mode's (bit for
bit, streamed). For ``--capped-sizes``, the naive converter and streamconv both run once inside a memory
cgroup capped at ``--max-memory`` + 0.75 GiB: streamconv completes, the naive converter is killed.
``--device cuda`` adds streamconv runs with ``--device cuda`` and checks they write the same bytes as the CPU
(``bench/gpu_vs_cp.py`` runs that on a GPU machine).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

NAIVE = str(Path(__file__).resolve().parent / "naive_convert.py")


def same_files(a: Path, b: Path) -> bool:
    """Byte-identical ``.distcp`` files and ``.metadata``."""
    names = sorted(p.name for p in a.iterdir() if p.suffix == ".distcp" or p.name == ".metadata")
    return names == sorted(p.name for p in b.iterdir() if p.suffix == ".distcp" or p.name == ".metadata") and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4", help="model sizes (GB) for the full comparison (default 1,4)")
    ap.add_argument("--capped-sizes", default="16", help="sizes (GB) run once under a memory cap ('' for none)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-memory", default="512MiB")
    ap.add_argument("--device", default="cpu", help="cuda: also run streamconv --device cuda and compare bytes")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                    help="source dtype; fp32 sources are converted with --dtype bf16 (a cast on every byte)")
    ap.add_argument("--modes", default="staged,direct", help="streamconv modes to time (staged, direct)")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive converter")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from streamconv.engine.runner import parse_size

    budget = parse_size(args.max_memory)
    cap = int(budget + 0.75 * c.GiB)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="streamconv-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    info = c.machine()
    cold = c.drop_caches()
    print(f"machine: {info}\npage cache: {'dropped before every run' if cold else 'NOT dropped (not root): warm'}")
    cast = ["--dtype", "bf16"] if args.dtype == "fp32" else []
    devices = ["cpu"] + (["cuda"] if args.device.startswith("cuda") else [])
    modes = [m for m in args.modes.split(",") if m]
    report = {"machine": info, "cold_cache": cold, "max_memory": budget, "sizes": {}}
    rows = []

    for size in [float(s) for s in args.sizes.split(",") if s]:
        src = c.checkpoint(work, size, args.dtype)
        model = c.folder_bytes(src)
        c.require_space(work, 2.2 * model, f"two outputs of the {size:g} GB model")
        times: dict[str, list] = {}
        peaks: dict[str, list] = {}
        checks: dict[str, str] = {}
        ref = work / "out-ref"
        for run in range(args.runs):
            dst = work / "cp-copy"
            c.rmtree(dst)
            c.drop_caches()
            r = c.measure(["cp", "-r", str(src), str(dst)])
            s = c.measure(["sync"])
            times.setdefault("cp -r", []).append(r.wall)
            times.setdefault("cp -r + sync", []).append(r.wall + s.wall)
            c.rmtree(dst)
            for device in devices:
                for mode in modes:
                    label = f"streamconv {mode}" + (f" --device {device}" if device != "cpu" else "")
                    out = work / "out"
                    c.rmtree(out)
                    c.drop_caches()
                    extra = [*cast, "--device", device] + (["--no-staging"] if mode == "direct" else [])
                    r = c.measure(c.streamconv_cmd(src, out, args.max_memory, *extra))
                    if not r.ok:
                        sys.exit(f"{label} failed: {r.stderr.strip()[-2000:]}")
                    times.setdefault(label, []).append(r.wall)
                    peaks.setdefault(label, []).append(r.peak_rss)
                    times.setdefault(label + " (engine)", []).append(json.loads(r.stdout)["engine_seconds"])
                    if run == 0:
                        if not ref.exists():
                            out.rename(ref)
                            continue
                        same = same_files(out / "iter_0000000", ref / "iter_0000000")
                        if device != "cpu":
                            checks[label] = "same bytes as CPU" if same else "DIFFERENT BYTES FROM CPU"
                        else:
                            diff = c.same_tensors(out / "iter_0000000", ref / "iter_0000000")
                            checks[label] = "same tensors" if diff is None else f"DIFFERS: {diff}"
                    c.rmtree(out)
            fits = model * 2.5 < c.psutil.virtual_memory().available
            if not args.no_naive and fits:
                out = work / "out-naive"
                c.rmtree(out)
                c.drop_caches()
                r = c.measure([sys.executable, NAIVE, "--hf-model", str(src), "--megatron-path", str(out)])
                if not r.ok:
                    sys.exit(f"naive converter failed: {r.stderr.strip()[-2000:]}")
                times.setdefault("naive (load all, dcp.save)", []).append(r.wall)
                peaks.setdefault("naive (load all, dcp.save)", []).append(r.peak_rss)
                if run == 0 and not cast:
                    diff = c.same_tensors(out / "iter_0000000", ref / "iter_0000000")
                    checks["naive (load all, dcp.save)"] = "same tensors" if diff is None else f"DIFFERS: {diff}"
                c.rmtree(out)
            elif not args.no_naive:
                checks["naive (load all, dcp.save)"] = f"not run: needs ~{model * 2.5 / 1e9:.0f} GB of free RAM"
            print(f"  {size:g} GB run {run + 1}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()),
                  flush=True)
        c.rmtree(ref)
        if not args.keep:
            c.rmtree(src)
        med = {k: c.median(v) for k, v in times.items()}
        base = med["cp -r + sync"]
        report["sizes"][size] = {"model_bytes": model, "times": times, "peaks": peaks, "checks": checks,
                                 "median": med}
        for label, t in med.items():
            if label.endswith("(engine)"):
                continue
            rows.append([f"{model / 1e9:.2f} GB", label, f"{t:.1f} s", f"{model / 1e6 / t:.0f} MB/s",
                         f"{t / base:.2f}x", f"{med['naive (load all, dcp.save)'] / t:.2f}x"
                         if "naive (load all, dcp.save)" in med and label.startswith("streamconv") else "",
                         c.fmt_gib(c.median(peaks[label])) if label in peaks else "",
                         f"{med[label + ' (engine)']:.1f} s" if label + " (engine)" in med else "",
                         checks.get(label, "")])

    for size in [float(s) for s in args.capped_sizes.split(",") if s]:
        if not c.caps_available():
            print(f"memory cgroups are not available here: the {size:g} GB capped runs are skipped")
            break
        src = c.checkpoint(work, size, args.dtype)
        model = c.folder_bytes(src)
        capped = {}
        limit = None  # the naive converter may thrash under the cap instead of being killed: it gets 10x
        for label, cmd in (("streamconv staged", c.streamconv_cmd(src, work / "out", args.max_memory, *cast)),
                           ("naive (load all, dcp.save)",
                            [sys.executable, NAIVE, "--hf-model", str(src), "--megatron-path", str(work / "out")])):
            if label.startswith("naive") and args.no_naive:
                continue
            c.rmtree(work / "out")
            c.drop_caches()
            r = c.measure(cmd, cap_bytes=cap, timeout=limit)
            if limit is None:
                limit = max(120.0, 10 * r.wall)  # streamconv's time, tenfold
            capped[label] = {"ok": r.ok, "wall": r.wall, "peak_rss": r.peak_rss, "cgroup_peak": r.cgroup_peak,
                             "oom_killed": r.oom_killed, "timed_out": r.timed_out, "returncode": r.returncode}
            outcome = ("completed" if r.ok else
                       f"stopped after {r.wall:.0f} s (10x streamconv's time), not done: thrashing under the cap"
                       if r.timed_out else
                       "killed: out of memory" if r.oom_killed or r.returncode == -9 else f"failed (exit {r.returncode})")
            rows.append([f"{model / 1e9:.2f} GB", f"{label} under a {c.fmt_gib(cap)} cap", f"{r.wall:.1f} s",
                         f"{model / 1e6 / r.wall:.0f} MB/s" if r.ok else "", "", "", c.fmt_gib(r.peak_rss), "",
                         outcome])
            print(f"  {size:g} GB capped: {label}: {outcome} after {r.wall:.1f}s", flush=True)
            c.rmtree(work / "out")
        report["sizes"][f"{size:g} capped"] = capped
        if not args.keep:
            c.rmtree(src)

    c.print_table(f"hf2mcore vs cp -r vs naive, --max-memory {args.max_memory}, {args.dtype} source "
                  f"(medians of {args.runs}; {'cold' if cold else 'WARM'} page cache; wall includes start-up)",
                  ["model", "method", "wall", "rate", "vs cp -r + sync", "naive / this", "peak RSS", "engine only",
                   "output check"], rows)
    return c.finish(args, report, work)


if __name__ == "__main__":
    raise SystemExit(main())
