#!/usr/bin/env python
"""Where a conversion's time goes, against `cp -r` of the same folder: the engine's cost per byte.

    python bench/import_profile.py [--sizes 3] [--where tmpfs,disk] [--rounds 3] [--workers 4] [--resume] [--small]

Per model size and place (``tmpfs``: source and output in /dev/shm, where ``cp`` is a memcpy and the ratio
shows the program's own cost per byte; ``disk``: the work folder, source read into the page cache before
every run (a conversion drops what it read), every run ending with ``sync``; ``disk-cold``: the same with
the page cache dropped before every run), alternating ``cp -r``, ``streamconv hf2mcore`` (default) and
``--no-staging`` for ``--rounds`` rounds, each run started alike (memory settled, ``_common.settle_memory``;
the last run's output removed just before); medians of:
- wall time of the whole process (start-up included) and the conversion's own ``seconds`` (``--json``:
  from the resume checks to the commit);
- CPU seconds per GB (user + sys) of the whole process, and of the conversion alone (``cpu_seconds``);
- the per-phase seconds the engine reports (``phases``: read, cast, crc, write, complete; summed over
  its threads).
``--resume``: a default run SIGKILLed once half its bytes are done (a crash-test hook: it follows progress,
not the clock), then re-run: the re-run's ``seconds`` against a fresh run's. ``--small``: the Ultra-253B
block pattern at small width (many small per-layer tensors), default vs ``--no-staging``. ``--startup``: a
tiny model's whole-process wall time. Outputs of both modes are checked byte for byte (by SHA-256: one
output at a time, so tmpfs holds the source and one output).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402


def hf2mcore(src: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(src), "--megatron-path", str(out),
            "--overwrite", "--json", *extra]


def output_digest(out: Path) -> dict[str, str]:
    """SHA-256 of each ``.distcp`` and ``.metadata`` of an output: two outputs compare without both being kept
    (tmpfs holds them in RAM)."""
    import hashlib

    ckpt = out / "iter_0000000"
    digests = {}
    for p in sorted(ckpt.iterdir()):
        if p.suffix == ".distcp" or p.name == ".metadata":
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
            digests[p.name] = h.hexdigest()
    return digests


def killed_at_half(src: Path, out: Path, extra, tmp: Path) -> None:
    """A default run SIGKILLed once about half of its bytes are committed."""
    from streamconv.sources.safetensors import SafetensorsSource
    from streamconv.inputs import chunk_bytes_for, import_plan_for as build_plan
    from streamconv.models.config import load_config, spec_from_config

    source = SafetensorsSource(src)
    plan = build_plan(source, spec_from_config(load_config(src)), None, chunk_bytes_for(2 * 1024**3))
    source.close()
    c.kill_at_half(plan, hf2mcore(src, out, *extra), tmp / "half")


def measure_place(src: Path, work: Path, where: str, rounds: int, extra) -> dict:
    gb = c.folder_bytes(src) / 1e9
    sync = where.startswith("disk")

    last = [None]  # the last run's output: one at a time beside the source (tmpfs holds them in RAM)

    def before(out: Path):
        """Every run starts alike: the source warm (each conversion drops what it read) or cold, memory
        settled (``c.settle_memory``), and the last output removed just before, so each run writes into the
        memory that output freed."""
        c.start_alike(src, where)
        c.rmtree(last[0]) if last[0] else None
        last[0] = out

    rows: dict[str, list] = {"cp -r": [], "default": [], "--no-staging": []}
    first = None  # the default mode's output digests (round 0)
    for i in range(rounds):
        dst = work / "cp"
        before(dst)
        rows["cp -r"].append(c.run(["sh", "-c", f"cp -r '{src}' '{dst}'" + (" && sync" if sync else "")]))
        for name, flags in (("default", []), ("--no-staging", ["--no-staging"])):
            out = work / name.strip("-")
            before(out)
            cmd = hf2mcore(src, out, *flags, *extra)
            r = c.run(["sh", "-c", shlex.join(cmd) + " && sync"] if sync else cmd)  # timed with its sync, as cp is
            rows[name].append(r)
            if i == 0:
                digest = output_digest(out)
                first = first or digest
                assert digest == first, "the two modes wrote different bytes"
    c.rmtree(last[0])
    cp = c.median([r["wall"] for r in rows["cp -r"]])
    report = {"gb": round(gb, 3), "where": where, "cp_wall": round(cp, 2), "cp_cpu_per_gb": round(
        c.median([r["cpu"] for r in rows["cp -r"]]) / gb, 2)}
    for name in ("default", "--no-staging"):
        rs = rows[name]
        report[name] = {**c.versus_cp(rs, rows["cp -r"], gb),
                        "conversion_cpu_per_gb": round(c.median([r["summary"]["cpu_seconds"] for r in rs]) / gb, 2)}
    return report


def measure_resume(src: Path, work: Path, where: str, rounds: int, extra) -> dict:
    """A fresh run against a re-run after a kill at half (``_common.fresh_and_resumed``)."""
    out = work / "resume"
    return c.fresh_and_resumed(hf2mcore(src, out, *extra), lambda o: killed_at_half(src, o, extra, work), src, out,
                               where, rounds)


def measure_small(work: Path, rounds: int, extra) -> dict:
    from streamconv.reference.synth import make_checkpoint, real_config, scale_config

    import torch

    src = work / "ultra-small"
    if not (src / "config.json").is_file():
        make_checkpoint(src, scale_config(real_config("ultra-253b-v1"), hidden=256, heads=16, layers=None,
                                          vocab=2048), seed=0, dtype=torch.bfloat16, shards=2)
    times: dict[str, list] = {"default": [], "--no-staging": []}
    for _ in range(rounds):
        for name, flags in (("default", []), ("--no-staging", ["--no-staging"])):
            times[name].append(c.run(hf2mcore(src, work / "small-out", *flags, *extra))["summary"]["seconds"])
    c.rmtree(work / "small-out")
    d, n = c.median(times["default"]), c.median(times["--no-staging"])
    return {"gb": round(c.folder_bytes(src) / 1e9, 3), "default_seconds": round(d, 2),
            "no_staging_seconds": round(n, 2), "ratio": round(d / n, 2)}


def measure_startup(work: Path, rounds: int) -> dict:
    from streamconv.reference.synth import llama_config, make_checkpoint

    src = make_checkpoint(work / "tiny", llama_config(), seed=0)
    walls = [c.run(hf2mcore(src, work / "tiny-out", "--quiet"))["wall"] for _ in range(rounds)]
    return {"tiny_wall": round(c.median(walls), 2), "tiny_bytes": c.folder_bytes(src)}


def main(argv=None) -> int:
    ap = c.place_parser(__doc__)
    ap.add_argument("--resume", action="store_true", help="also measure a resumed run after a kill at half")
    ap.add_argument("--small", action="store_true", help="also the Ultra-253B block pattern at small width")
    ap.add_argument("--startup", action="store_true", help="also a tiny model's wall time")
    args = ap.parse_args(argv)
    extra = c.workers_flag(args)

    def measure(src: Path, work: Path, where: str) -> dict:
        place = measure_place(src, work, where, args.rounds, extra)
        if args.resume:
            place["resume"] = measure_resume(src, work, where, args.rounds, extra)
        return place

    def after(report: dict, scratch: Path) -> None:
        if args.small:
            report["small"] = measure_small(scratch, args.rounds, extra)
            print(json.dumps(report["small"]), flush=True)
        if args.startup:
            report["startup"] = measure_startup(scratch, args.rounds)
            print(json.dumps(report["startup"]), flush=True)

    return c.run_places(args, "streamconv-profile-", c.checkpoint, measure, after)


if __name__ == "__main__":
    raise SystemExit(main())
