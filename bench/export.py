#!/usr/bin/env python
"""The export (`streamconv mcore2hf`) against `cp -r` of the same torch_dist folder.

    python bench/export.py [--sizes 3] [--where tmpfs,disk] [--rounds 3] [--resume] [--workdir DIR]

The bf16 Llama of the benchmarks (``_common.family_config``) is imported once (``hf2mcore``, default
chunking); then, per place (``tmpfs``: the torch_dist folder copied to /dev/shm and the output there;
``disk``: the work folder, the checkpoint read into the page cache before every run, every run ending
with ``sync``), for ``--rounds`` rounds, alternating and each run started alike (``_common.start_alike``,
the last output removed just before):
- ``cp -r`` of the torch_dist folder;
- ``mcore2hf`` at its defaults (``--max-memory 2GiB``);
- ``mcore2hf --max-memory 64MiB`` (the bound the issue names for peak RSS).
Medians of wall time (whole process), the export's own ``seconds`` (``--json``), CPU seconds per GB (user +
sys of the whole process), the engine's phases and its path, and the highest peak RSS (``--json``'s
``peak_rss_bytes``: the whole process, start-up included). The first round's exports are checked tensor by
tensor against the HF source, bit for bit. ``--resume``: a default export SIGKILLed once half its bytes are
journaled (a crash-test hook: it follows progress, not the clock), then re-run; the re-run's ``seconds``
against a fresh export's.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402


def mcore2hf(src: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "streamconv", "mcore2hf", "--megatron-path", str(src), "--hf-path", str(out),
            "--overwrite", "--json", *extra]


def imported(hf: Path, work: Path) -> Path:
    """The torch_dist checkpoint of ``hf`` (made once, next to it)."""
    out = work / (hf.name.replace("hf-", "mcore-"))
    if not (out / "latest_checkpointed_iteration.txt").is_file():
        c.run([sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(hf), "--megatron-path", str(out),
             "--overwrite", "--quiet"])
    return out


def same_as_source(out: Path, hf: Path) -> str | None:
    """None when every tensor of the export equals the HF source's, bit for bit (one tensor at a time)."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        found = {}
        for p in sorted(folder.glob("*.safetensors")):
            with safe_open(p, "pt") as f:
                found.update({k: p for k in f.keys()})
        return found

    a, b = tensors(hf), tensors(out)
    if sorted(a) != sorted(b):
        return f"tensor names differ: {sorted(set(a) ^ set(b))[:3]}"
    for name in a:
        with safe_open(a[name], "pt") as fa, safe_open(b[name], "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8) if x.dim() else x,
                                                                          y.view(torch.uint8) if y.dim() else y):
                return f"{name} differs"
    return None


def killed_at_half(src: Path, out: Path, work: Path, extra) -> None:
    """An export SIGKILLed once the chunks journaled hold about half of its bytes."""
    from streamconv.commands.mcore2hf import Options, _setup

    e = _setup(src, work / "plan-only", Options())
    e.source.close()
    c.kill_at_half(e.plan, mcore2hf(src, out, *extra), work / "half")


def measure_place(src: Path, hf: Path, work: Path, where: str, rounds: int, extra) -> dict:
    gb = c.folder_bytes(src) / 1e9
    sync = where.startswith("disk")
    last = [None]

    def before(out: Path):
        c.start_alike(src, where)
        c.rmtree(last[0]) if last[0] else None
        last[0] = out

    modes = {"default": [], "64MiB": ["--max-memory", "64MiB"]}
    rows: dict[str, list] = {"cp -r": [], **{m: [] for m in modes}}
    checked = {}
    for i in range(rounds):
        dst = work / "cp"
        before(dst)
        rows["cp -r"].append(c.run(["sh", "-c", f"cp -r '{src}' '{dst}'" + (" && sync" if sync else "")]))
        for name, flags in modes.items():
            out = work / f"export-{name}"
            before(out)
            cmd = mcore2hf(src, out, *flags, *extra)
            rows[name].append(c.run(["sh", "-c", shlex.join(cmd) + " && sync"] if sync else cmd))
            if i == 0:
                checked[name] = same_as_source(out, hf)
                assert checked[name] is None, checked[name]
    c.rmtree(last[0])
    cp = c.median([r["wall"] for r in rows["cp -r"]])
    report = {"gb": round(gb, 3), "where": where, "cp_wall": round(cp, 2),
              "cp_cpu_per_gb": round(c.median([r["cpu"] for r in rows["cp -r"]]) / gb, 2),
              "bit_exact": all(v is None for v in checked.values())}
    for name in modes:
        report[name] = c.versus_cp(rows[name], rows["cp -r"], gb)
    return report


def measure_resume(src: Path, work: Path, where: str, rounds: int, extra) -> dict:
    """A fresh export against a re-run after a kill at half (``_common.fresh_and_resumed``)."""
    out = work / "resume"
    return c.fresh_and_resumed(mcore2hf(src, out, *extra), lambda o: killed_at_half(src, o, work, extra), src, out,
                               where, rounds)


def main(argv=None) -> int:
    ap = c.place_parser(__doc__)
    ap.add_argument("--resume", action="store_true", help="also a re-run after a kill at half")
    args = ap.parse_args(argv)
    extra = c.workers_flag(args)
    hf = {}  # the HF model of each size, which the export is checked against

    def source(disk: Path, size: float) -> Path:
        hf["folder"] = c.checkpoint(disk, size)
        return imported(hf["folder"], disk)

    def measure(src: Path, work: Path, where: str) -> dict:
        place = measure_place(src, hf["folder"], work, where, args.rounds, extra)
        if args.resume:
            place["resume"] = measure_resume(src, work, where, args.rounds, extra)
        return place

    return c.run_places(args, "streamconv-export-", source, measure)


if __name__ == "__main__":
    raise SystemExit(main())
