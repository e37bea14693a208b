#!/usr/bin/env python
"""Nemotron-H both ways against `cp -r`: a hybrid model (Mamba2, attention, MLP, latent MoE) of ~3 GB.

    python bench/nemotron_h.py [--sizes 3] [--where tmpfs,disk] [--rounds 3] [--workdir DIR] [--json]

The bf16 model is ``_common.nemotron_h_config`` (hidden 1024, ``MEM*EM-E`` repeated, 64 experts with latent
projections: per-layer megatron keys, in_proj split into its z/x/B/C/dt parts, conv1d into x/B/C, each expert
tensor stacked from 64 HF tensors). Per place (``tmpfs``: source and outputs in /dev/shm; ``disk``: the work
folder, the source read into the page cache before every run, every run ending with ``sync``), for
``--rounds`` rounds, alternating, each run started alike (``_common.start_alike``):
- ``cp -r`` of the HF folder;
- ``hf2mcore`` at its defaults;
- ``cp -r`` of the torch_dist folder it wrote, then ``mcore2hf`` of it (the export's own baseline).
Medians of wall time (whole process), the command's own ``seconds``, CPU seconds per GB (user + sys) and the
highest peak RSS. The first round's export is checked against the HF source, tensor by tensor, bit for bit.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402
from export import mcore2hf, same_as_source  # noqa: E402


def hf2mcore(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(src), "--megatron-path", str(out),
            "--overwrite", "--json"]


def measure_place(hf: Path, work: Path, where: str, rounds: int) -> dict:
    gb = c.folder_bytes(hf) / 1e9
    sync = where.startswith("disk")
    rows: dict[str, list] = {"cp -r hf": [], "hf2mcore": [], "cp -r mcore": [], "mcore2hf": []}
    checked = None

    def timed(name: str, cmd: list[str], src: Path) -> None:
        c.start_alike(src, where)
        rows[name].append(c.run(["sh", "-c", shlex.join(cmd) + " && sync"] if sync else cmd))

    mcore, copy, back = work / "nh-mcore", work / "nh-cp", work / "nh-back"
    for i in range(rounds):
        timed("cp -r hf", ["cp", "-r", str(hf), str(copy)], hf)
        c.rmtree(copy)
        timed("hf2mcore", hf2mcore(hf, mcore), hf)
        timed("cp -r mcore", ["cp", "-r", str(mcore), str(copy)], mcore)
        c.rmtree(copy)
        timed("mcore2hf", mcore2hf(mcore, back), mcore)
        if i == 0:
            checked = same_as_source(back, hf)
            assert checked is None, checked
        c.rmtree(back)
        c.rmtree(mcore)

    def figures(name: str, base: str) -> dict:
        cp = rows[base]
        return {**c.versus_cp(rows[name], cp, gb), "cp_wall": round(c.median([r["wall"] for r in cp]), 2),
                "cp_cpu_per_gb": round(c.median([r["cpu"] for r in cp]) / gb, 2)}

    return {"gb": round(gb, 3), "where": where, "rounds": rounds, "bit_exact_round_trip": checked is None,
            "hf2mcore": figures("hf2mcore", "cp -r hf"), "mcore2hf": figures("mcore2hf", "cp -r mcore")}


def main(argv=None) -> int:
    args = c.place_parser(__doc__, workers=False).parse_args(argv)
    return c.run_places(args, "streamconv-nh-", lambda disk, size: c.checkpoint(disk, size, family="nemotron_h"),
                        lambda src, work, where: measure_place(src, work, where, args.rounds))


if __name__ == "__main__":
    raise SystemExit(main())
