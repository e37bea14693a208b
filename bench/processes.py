#!/usr/bin/env python
"""Scale-out on one host: 1 process vs ``torchrun --nproc-per-node N`` (default 1,2,4), against ``cp -r``.

    python bench/processes.py [--sizes 3] [--procs 1,2,4] [--where tmpfs,disk] [--rounds 3]

Per model size and place (``tmpfs``: source and output in /dev/shm; ``disk``: the work folder, source read
into the page cache before each run, each run ending with ``sync``), alternating ``cp -r`` and one conversion per process
count for ``--rounds`` rounds, after one untimed conversion. ``1`` is the plain command (no launcher);
``N > 1`` runs under torchrun (``python -m torch.distributed.run --standalone``), each rank with the
default threads (this host's CPUs shared between its ranks). Medians of: the whole command's wall time
(torchrun's start-up included), the conversion's own ``seconds`` (rank 0's ``--json``: setup agreed to
commit), CPU seconds per GB (user + sys of every process). Every output is checked byte for byte against
the first process count's.

Every run starts alike: memory settled first (``_common.settle_memory``: this VM hands freed memory back
to its host for a few seconds after a run, and writes meanwhile cost more), then each conversion
overwrites the last one's output itself (``--overwrite``, in its setup, after its start-up) and ``cp -r``
removes its last copy just before it copies. Otherwise a launcher's seconds of start-up would let the
last output's memory go back to the host while a plain command, started at once, writes into it.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402
from import_profile import output_digest  # noqa: E402


def command(src: Path, out: Path, procs: int, extra) -> list[str]:
    launcher = [] if procs == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
    return [sys.executable, *launcher, "-m", "streamconv", "hf2mcore", "--hf-model", str(src), "--megatron-path",
            str(out), "--overwrite", "--json", *extra]


def measure(src: Path, work: Path, where: str, procs: list[int], rounds: int, extra) -> dict:
    gb = c.folder_bytes(src) / 1e9
    sync = where == "disk"
    rows: dict[str, list] = {"cp -r": [], **{str(n): [] for n in procs}}
    first = None  # the first process count's output digests (round 0)
    out, dst = work / "out", work / "cp"  # every conversion overwrites the last one's output
    env = {"OMP_NUM_THREADS": "1"}
    c.run(command(src, out, procs[0], extra), env=env)  # untimed: the first timed run has an output to replace
    for i in range(rounds):
        c.start_alike(src, where)
        c.rmtree(dst)  # just before: cp writes into the memory its last copy freed, as a conversion does
        rows["cp -r"].append(c.run(["sh", "-c", f"cp -r '{src}' '{dst}'" + (" && sync" if sync else "")]))
        for n in procs:
            c.start_alike(src, where)
            cmd = command(src, out, n, extra)
            rows[str(n)].append(c.run(["sh", "-c", shlex.join(cmd) + " && sync"] if sync else cmd, env=env))
            if i == 0:
                digest = output_digest(out)
                first = first or digest
                assert digest == first, f"{n} processes wrote other bytes"
    c.rmtree(out)
    c.rmtree(dst)
    cp = c.median([r["wall"] for r in rows["cp -r"]])
    report = {"gb": round(gb, 3), "where": where, "cp_wall": round(cp, 2),
              "cp_cpu_per_gb": round(c.median([r["cpu"] for r in rows["cp -r"]]) / gb, 2)}
    base = c.median([r["summary"]["seconds"] for r in rows[str(procs[0])]])
    for n in procs:
        rs = rows[str(n)]
        seconds = c.median([r["summary"]["seconds"] for r in rs])
        report[f"{n} processes"] = {
            "wall": round(c.median([r["wall"] for r in rs]), 2),
            "seconds": round(seconds, 2),
            "seconds_vs_cp": round(seconds / cp, 2),
            f"speed_vs_{procs[0]}": round(base / seconds, 2),
            "cpu_per_gb": round(c.median([r["cpu"] for r in rs]) / gb, 2),
            "workers_per_rank": rs[0]["summary"]["workers"],
        }
        if n > 1:  # the slowest rank's own seconds: what the job adds after it (gather, commit) is the rest
            report[f"{n} processes"]["slowest_rank_seconds"] = round(c.median(
                [max(f["seconds"] for f in r["summary"]["ranks"]) for r in rs]), 2)
    return report


def main(argv=None) -> int:
    ap = c.place_parser(__doc__)
    ap.add_argument("--procs", default="1,2,4", help="process counts (default 1,2,4; 1 = no launcher)")
    args = ap.parse_args(argv)
    extra = c.workers_flag(args)  # per process
    procs = [int(n) for n in args.procs.split(",") if n]
    return c.run_places(args, "streamconv-procs-", c.checkpoint,
                        lambda src, work, where: measure(src, work, where, procs, args.rounds, extra))


if __name__ == "__main__":
    raise SystemExit(main())
