"""Shared by the benchmarks: synthetic checkpoints, timed and memory-watched child processes, page-cache
control, cgroup memory caps, a streaming comparison of two torch_dist checkpoints, and the machine."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GiB = 1024**3
MiB = 1024**2


# --------------------------------------------------------------------------- synthetic checkpoints

def family_config(size_gb: float) -> dict:
    """A bf16 Llama of about ``size_gb`` GB; every size has the same tensor shapes, only more layers:
    hidden 2048, 16 heads, 4 kv heads, ffn 8192, vocab 32000 (~122 MB per layer, 262 MB embeddings)."""
    from streamconv.reference.synth import llama_config

    hidden, ffn, vocab, kv = 2048, 8192, 32000, 512
    per_layer = ((hidden + 2 * kv) * hidden + hidden * hidden + 3 * ffn * hidden + 2 * hidden) * 2
    layers = max(1, round((size_gb * 1e9 - 2 * vocab * hidden * 2) / per_layer))
    return llama_config(hidden=hidden, layers=layers, heads=16, kv_heads=4, ffn=ffn, vocab=vocab)


NEMOTRON_H_BLOCK = "MEM*EM-E"  # one of each layer kind, the Mamba and MoE layers most frequent, as in Nemotron 3


def nemotron_h_config(size_gb: float) -> dict:
    """A bf16 Nemotron-H (Mamba2, attention, MLP, latent MoE) of about ``size_gb`` GB, shaped like Nemotron 3 at a
    smaller width: hidden 1024, Mamba 32x64 heads in 8 groups with state 128, attention 8/2 heads of 128, MLP
    4096, 64 experts of 512 (shared 1024, latent 512), vocab 32000; ``NEMOTRON_H_BLOCK`` repeated."""
    import json

    from streamconv.models import rules
    from streamconv.models.config import spec_from_config

    cfg = json.loads((ROOT / "bench" / "configs" / "nemotron-3-super-120b-shaped.config.json").read_text())
    cfg.update(hidden_size=1024, mamba_num_heads=32, mamba_head_dim=64, n_groups=8, ssm_state_size=128,
               num_attention_heads=8, num_key_value_heads=2, head_dim=128, intermediate_size=4096,
               n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=512,
               moe_shared_expert_intermediate_size=1024, moe_latent_size=512, vocab_size=32000)

    def params(blocks: int) -> int:
        pattern = NEMOTRON_H_BLOCK * blocks
        return rules.param_count(spec_from_config({**cfg, "hybrid_override_pattern": pattern,
                                                   "num_hidden_layers": len(pattern)}))

    per_block = params(2) - params(1)
    blocks = max(1, round((size_gb * 1e9 / 2 - (params(1) - per_block)) / per_block))
    pattern = NEMOTRON_H_BLOCK * blocks
    return {**cfg, "hybrid_override_pattern": pattern, "num_hidden_layers": len(pattern)}


def checkpoint(workdir: Path, size_gb: float, dtype: str = "bf16", family: str = "llama") -> Path:
    """The synthetic checkpoint of ``size_gb`` GB in ``workdir`` (generated once): the Llama of
    ``family_config``, or (``family="nemotron_h"``) the hybrid of ``nemotron_h_config``."""
    import torch

    from streamconv.reference.synth import make_checkpoint

    folder = workdir / f"hf-{size_gb:g}gb-{dtype}" if family == "llama" else workdir / f"hf-{family}-{size_gb:g}gb-{dtype}"
    if (folder / "config.json").is_file():
        return folder
    scaled = size_gb if dtype == "bf16" else size_gb / 2
    cfg = family_config(scaled) if family == "llama" else nemotron_h_config(scaled)
    need = size_gb * 1e9 * 1.05
    require_space(workdir, need, f"the {size_gb:g} GB checkpoint")
    t0 = time.perf_counter()
    tmp = workdir / (folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    make_checkpoint(tmp, cfg, seed=0, dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[dtype],
                    shards=max(2, math.ceil(size_gb / 5)), shuffle=False)
    tmp.rename(folder)
    print(f"  generated {folder} ({folder_bytes(folder) / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f}s",
          flush=True)
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def require_space(where: Path, nbytes: float, what: str) -> None:
    free = shutil.disk_usage(where).free
    if free < nbytes + 2 * GiB:  # keep 2 GiB for everyone else on the disk
        sys.exit(f"not enough disk space in {where} for {what}: {free / 1e9:.1f} GB free, "
                 f"{(nbytes + 2 * GiB) / 1e9:.1f} GB needed (use --workdir elsewhere or smaller --sizes)")


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- page cache

WARM_PROGRAM = "import streamconv.commands.hf2mcore, streamconv.sinks.zarr_view, safetensors.torch, torch.distributed.checkpoint"


def drop_caches() -> bool:
    """Cold data, warm program: write back and drop the page cache (needs root), then load Python, torch and
    streamconv once so that what the next run reads from disk is its data, not the interpreter's libraries
    (cp's are tiny). False (warm-cache numbers) where dropping is not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    subprocess.run([sys.executable, "-c", WARM_PROGRAM], check=True, capture_output=True)
    return True


def warm(folder: Path, block: int = 8 * MiB) -> None:
    """Read every file of ``folder`` into the page cache. Before each "source warm" run: a conversion drops
    each source range it has read (``pagecache.drop``), so the source is warm only for the run that follows a
    warming, not for the one after it (cp -r does not drop: the run after cp would read warm, the next cold)."""
    buf = bytearray(block)
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")


def settle_memory(quiet: float = 1.0, limit: float = 60.0) -> float:
    """On a VM that hands freed memory back to its host (Linux free page reporting, virtio-balloon: this
    development VM), wait until it has stopped handing back (its ``reported_kib`` still for ``quiet``
    seconds, ``limit`` at most); returns the seconds waited (0 elsewhere). Measured here (2026-12-02): for
    some seconds after gigabytes are freed, writing new pages costs up to 3x more, so a run that starts
    later after the last run's output was removed (torchrun's start-up, say) meets other memory than one
    that starts at once. Settling before each run, and letting each run remove the last output itself
    (``--overwrite``), gives every run the same start."""
    if not REPORTED_KIB.exists():
        return 0.0
    t0 = time.monotonic()
    last, still = REPORTED_KIB.read_text(), time.monotonic()
    while time.monotonic() - t0 < limit:
        time.sleep(0.25)
        now = REPORTED_KIB.read_text()
        if now != last:
            last, still = now, time.monotonic()
        elif time.monotonic() - still >= quiet:
            break
    return time.monotonic() - t0


def start_alike(src: Path, where: str) -> None:
    """What every timed run starts from: the source cold (``disk-cold``: the page cache dropped, root) or
    warm (``disk``: ``warm``; a conversion drops what it read), then memory settled (``settle_memory``)."""
    if where == "disk-cold":
        if not drop_caches():
            sys.exit("--where disk-cold needs root (to drop the page cache)")
    elif where == "disk":
        warm(src)
    settle_memory()


# --------------------------------------------------------------------------- measured child processes

@dataclass
class Result:
    wall: float
    peak_rss: int  # polled: the sum over the child's process tree, at its highest
    returncode: int
    stdout: str = ""
    stderr: str = ""
    cgroup_peak: int | None = None  # memory.max_usage_in_bytes / memory.peak of the cap, when capped
    oom_killed: bool = False
    timed_out: bool = False  # killed by ``measure`` after ``timeout`` seconds
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(cmd: list[str], cap_bytes: int | None = None, poll: float = 0.02, timeout: float | None = None) -> Result:
    """Run ``cmd``; wall time and the peak RSS of its process tree (psutil, every ``poll`` s).

    ``cap_bytes``: run it in a fresh memory cgroup limited to that many bytes (the kernel kills it when its
    memory exceeds the cap); raises if cgroups cannot be used here.
    """
    cgroup = MemoryCap(cap_bytes) if cap_bytes else None
    peak, timed_out = 0, False
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=cgroup.enter if cgroup else None)
    ps = psutil.Process(proc.pid)
    out: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k, f: out.__setitem__(k, f.read()), args=(k, f), daemon=True)
               for k, f in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for r in readers:
        r.start()
    while proc.poll() is None:
        peak = max(peak, _tree_rss(ps))
        if timeout and not timed_out and time.perf_counter() - t0 > timeout:
            proc.kill()
            timed_out = True
        time.sleep(poll)
    wall = time.perf_counter() - t0
    for r in readers:
        r.join()
    res = Result(wall, peak, proc.returncode, out.get("stdout", ""), out.get("stderr", ""), timed_out=timed_out)
    if cgroup:
        res.cgroup_peak, res.oom_killed = cgroup.close()
    return res


class MemoryCap:
    """A memory cgroup (v1 or v2) holding one child process, created before it starts, removed after."""

    def __init__(self, limit: int):
        self.limit = limit
        name = f"streamconv-bench-{os.getpid()}-{time.monotonic_ns()}"
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        if v2.is_file():
            self.path, self.v2 = Path("/sys/fs/cgroup") / name, True
        elif Path("/sys/fs/cgroup/memory").is_dir():
            self.path, self.v2 = Path("/sys/fs/cgroup/memory") / name, False
        else:
            raise RuntimeError("no memory cgroup here")
        self.path.mkdir()
        try:
            if self.v2:
                (self.path / "memory.max").write_text(str(limit))
                (self.path / "memory.swap.max").write_text("0")
            else:
                (self.path / "memory.limit_in_bytes").write_text(str(limit))
        except OSError:
            self.path.rmdir()
            raise

    def enter(self) -> None:  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def close(self) -> tuple[int | None, bool]:
        peak, oom = None, False
        try:
            if self.v2:
                p = self.path / "memory.peak"
                peak = int(p.read_text()) if p.is_file() else None
                events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
                oom = int(events.get("oom_kill", 0)) > 0
            else:
                peak = int((self.path / "memory.max_usage_in_bytes").read_text())
                ctl = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
                oom = int(ctl.get("oom_kill", 0)) > 0 or int((self.path / "memory.failcnt").read_text()) > 0
        finally:
            for _ in range(50):
                try:
                    self.path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        return peak, oom


def caps_available() -> bool:
    try:
        MemoryCap(1 << 30).close()
        return True
    except (OSError, RuntimeError):
        return False


def run(cmd, env=None) -> dict:
    """Run ``cmd``; wall and CPU seconds (user + sys of the child), and its --json summary if any."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stderr[-2000:]}")
    out = {"wall": wall, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}
    if p.stdout.strip().startswith("{"):
        out["summary"] = json.loads(p.stdout)
    return out


def phases(results) -> dict:
    keys = results[0]["summary"].get("phases", {})
    return {k: round(median([r["summary"]["phases"][k] for r in results]), 2) for k in keys}


def versus_cp(runs: list[dict], cp_runs: list[dict], gb: float) -> dict:
    """Medians of a command's runs (``run`` results with its --json summary) against ``cp -r``'s: wall and own
    seconds, their ratios to cp's wall, CPU seconds per GB and its ratio to cp's, the phases, the peak RSS."""
    cp_wall, cp_cpu = median([r["wall"] for r in cp_runs]), median([r["cpu"] for r in cp_runs])
    wall, cpu = median([r["wall"] for r in runs]), median([r["cpu"] for r in runs])
    seconds = median([r["summary"]["seconds"] for r in runs])
    return {"wall": round(wall, 2), "seconds": round(seconds, 2), "seconds_vs_cp": round(seconds / cp_wall, 2),
            "wall_vs_cp": round(wall / cp_wall, 2), "cpu_per_gb": round(cpu / gb, 2),
            "cpu_vs_cp": round(cpu / cp_cpu, 2), "phases": phases(runs),
            "engine_path": runs[0]["summary"].get("engine_path"),
            "peak_rss_mib": round(max(r["summary"]["peak_rss_bytes"] for r in runs) / MiB)}


def kill_at_half(plan, cmd: list[str], marker: Path) -> None:
    """Run ``cmd`` (a streamconv conversion of ``plan``) and SIGKILL it once the chunks it has committed hold
    about half of the plan's bytes: half of the bytes, not of the chunks (a layer's norms are chunks of a few
    KiB); chunks are committed in about plan order, so the n-th commit is where the plan's first n chunks hold
    half. The kill follows the run's progress (its pause point), not the clock."""
    import signal

    n, done = 0, 0
    while done < plan.total_bytes / 2:
        done += plan.chunks[n].nbytes
        n += 1
    marker.unlink(missing_ok=True)
    env = {**os.environ, "STREAMCONV_TEST_PAUSE": f"chunk:{n}", "STREAMCONV_TEST_PAUSE_FILE": str(marker)}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not marker.exists():
        if p.poll() is not None:
            sys.exit(f"the run to kill ended first: {p.stderr.read()[-2000:]}")
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()


def fresh_and_resumed(cmd: list, kill, src: Path, out: Path, where: str, rounds: int) -> dict:
    """A fresh run of ``cmd`` (writing ``out``, with ``--overwrite``) against a re-run of it after
    ``kill(out)`` (a run SIGKILLed once about half of its bytes are done), ``rounds`` times, both started
    alike (the source warm on disk, memory settled, nothing freed just before either: the fresh run would
    otherwise write into the memory of the output removed just before it, and the re-run into memory this VM
    had handed back to its host, up to 3x dearer per page, measured 2026-12-02). Medians of their ``seconds``."""
    fresh, resumed = [], []
    for _ in range(rounds):
        rmtree(out)
        start_alike(src, where)
        fresh.append(run(cmd)["summary"])
        rmtree(out)
        kill(out)
        start_alike(src, where)
        resumed.append(run([a for a in cmd if a != "--overwrite"])["summary"])
    rmtree(out)
    f, r = (median([s["seconds"] for s in rs]) for rs in (fresh, resumed))
    return {"fresh_seconds": round(f, 2), "resumed_seconds": round(r, 2), "ratio": round(r / f, 2),
            "resumed_share_of_bytes": round(median([s["bytes"] / fresh[0]["bytes"] for s in resumed]), 2),
            "fresh_mb_per_s": round(median([s["mb_per_s"] for s in fresh])),
            "resumed_mb_per_s": round(median([s["mb_per_s"] for s in resumed])),
            "chunks_kept": median([s["chunks_resumed"] for s in resumed])}


def finish(args, report: dict, work: Path) -> int:
    """The end of a bench script: the JSON report if ``--json``, and the work folder removed unless it was
    given (``--workdir``) or kept (``--keep``)."""
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    if not args.keep and not args.workdir:
        rmtree(work)
    return 0


def streamconv_cmd(src: Path, out: Path, max_memory: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(src), "--megatron-path", str(out),
            "--overwrite", "--max-memory", max_memory, "--json", *extra]


# --------------------------------------------------------------------------- checking outputs

def same_tensors(a: Path, b: Path, block_bytes: int = 64 * MiB) -> str | None:
    """None if the torch_dist checkpoints ``a`` and ``b`` hold the same tensors (keys, shapes, dtypes, bytes),
    whatever their chunking; else what differs. Streams row blocks: memory stays at two blocks."""
    import torch

    from streamconv.sources.torch_dist import TorchDistSource

    sa, sb = TorchDistSource(a), TorchDistSource(b)
    if set(sa.tensors) != set(sb.tensors):
        return f"keys differ: {sorted(set(sa.tensors) ^ set(sb.tensors))[:5]}"
    for key, ta in sa.tensors.items():
        tb = sb.tensors[key]
        if tuple(ta.shape) != tuple(tb.shape) or ta.dtype != tb.dtype:
            return f"{key}: {ta.dtype} {list(ta.shape)} vs {tb.dtype} {list(tb.shape)}"
        shape = tuple(ta.shape)
        lead = shape[:-2] if len(shape) > 2 else ()
        rows = shape[len(lead)] if shape else 1
        row_bytes = math.prod(shape[len(lead) + 1:]) * ta.dtype.itemsize
        step = max(1, block_bytes // max(1, row_bytes))
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[ta.dtype.itemsize]
        for index in _indices(lead):
            for r in range(0, rows, step):
                x = sa.read_rows(key, r, min(rows, r + step), index)
                y = sb.read_rows(key, r, min(rows, r + step), index)
                if not torch.equal(x.view(bits), y.view(bits)):
                    return f"{key} {list(index)} rows from {r} differ"
    return None


def _indices(lead: tuple[int, ...]):
    if not lead:
        yield ()
        return
    for i in range(lead[0]):
        for rest in _indices(lead[1:]):
            yield (i, *rest)


# --------------------------------------------------------------------------- reporting

def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def machine() -> dict:
    """What the numbers were measured on."""
    disk = shutil.disk_usage(ROOT)
    fs = "?"
    try:
        fs = next(p.fstype for p in psutil.disk_partitions(all=True) if p.mountpoint == "/")
    except StopIteration:
        pass
    import torch

    return {
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "nproc": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / GiB, 1),
        "disk": f"{disk.total / 1e9:.0f} GB {fs}, {disk.free / 1e9:.0f} GB free",
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def fmt_gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="right" if c not in columns[:1] else "left")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    Console(width=160).print(t)


def places(src_disk: Path, where: str, disk: Path, shm: Path | None):
    """``(place, source, work folder)`` for each of ``where`` (comma-separated: tmpfs, disk, disk-cold): on
    tmpfs a copy of the source in /dev/shm (removed after), on disk the source itself."""
    for w in [w for w in where.split(",") if w]:
        if w == "tmpfs":
            if shm is None:
                continue
            src = shm / src_disk.name
            if not src.exists():
                shutil.copytree(src_disk, src)
            yield w, src, shm
            rmtree(src)
        else:
            yield w, src_disk, disk


def place_parser(doc: str, sizes: str = "3", where: str = "tmpfs,disk", workers: bool = True) -> argparse.ArgumentParser:
    """The options of a bench run place by place (``run_places``): --sizes, --where, --rounds, --workers,
    --workdir, --keep, --json; a script adds its own."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=sizes, help=f"model sizes in GB, comma-separated (default {sizes})")
    ap.add_argument("--where", default=where, help="tmpfs, disk (source warm in the page cache), disk-cold (dropped "
                                                   f"before every run, root); comma-separated (default {where})")
    ap.add_argument("--rounds", type=int, default=3)
    if workers:
        ap.add_argument("--workers", type=int, default=None, help="--workers for streamconv (default: its own)")
    ap.add_argument("--workdir", help="where the disk runs work (default: a temporary folder under /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--json", action="store_true")
    return ap


def workers_flag(args) -> list[str]:
    return ["--workers", str(args.workers)] if getattr(args, "workers", None) else []


def run_places(args, prefix: str, source, measure, after=None) -> int:
    """A bench's main loop: for each ``--sizes`` model (``source(disk folder, size) -> its folder on disk``), at each
    ``--where`` place, ``measure(source folder, work folder, place) -> dict``, printed as it comes and kept in the
    report; then ``after(report, scratch folder)``. Temporary folders (``prefix``) are removed, the report printed
    with ``--json`` (``finish``)."""
    disk = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    shm = Path(tempfile.mkdtemp(prefix=prefix, dir="/dev/shm")) if Path("/dev/shm").is_dir() else None
    report = {"machine": machine(), "places": []}
    try:
        for size in [float(s) for s in args.sizes.split(",") if s]:
            src_disk = source(disk, size)
            for where, src, work in places(src_disk, args.where, disk, shm):
                place = measure(src, work, where)
                report["places"].append(place)
                print(json.dumps(place), flush=True)
        if after is not None:
            after(report, shm or disk)
    finally:
        if shm is not None:
            rmtree(shm)
    return finish(args, report, disk)
