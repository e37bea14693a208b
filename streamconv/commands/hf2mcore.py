"""hf2mcore: a Hugging Face safetensors checkpoint -> a Megatron-Core ``torch_dist`` checkpoint.

Output layout, as Megatron-Bridge's import writes it::

    <megatron-path>/latest_checkpointed_iteration.txt      "0", written last
    <megatron-path>/iter_0000000/{.metadata, __0_*.distcp, common.pt, metadata.json, run_config.yaml}
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path

from streamconv import crashpoints, dtypes
from streamconv.engine import runner
from streamconv.runtime import outdir
from streamconv.runtime import resume
from streamconv.runtime import rss
from streamconv.errors import BadInputError, OutputError, UsageError, output_error
from streamconv.formats import run_config
from streamconv.sources.safetensors import SafetensorsSource
from streamconv.files.atomic import fsync_write
from streamconv.sinks.torch_dist import TorchDistSink
from streamconv.models.spec import ModelSpec
from streamconv.models.config import load_config, spec_from_config
from streamconv.plan.build import DEFAULT_CHUNK_BYTES, DEFAULT_FILE_BYTES, Plan, check_source, import_plan
from streamconv.runtime.progress import make_progress

ITER_DIR = "iter_0000000"
TRACKER = "latest_checkpointed_iteration.txt"

DTYPES = {
    "bf16": dtypes.BFLOAT16, "bfloat16": dtypes.BFLOAT16,
    "fp16": dtypes.FLOAT16, "float16": dtypes.FLOAT16, "half": dtypes.FLOAT16,
    "fp32": dtypes.FLOAT32, "float32": dtypes.FLOAT32, "float": dtypes.FLOAT32,
}
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]
# Files of the HF folder that Bridge's import keeps beside the checkpoint (``iter_0000000/tokenizer/``).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json")


# the one vocabulary --help and errors use (DTYPES also takes float/half and the like, as torch names them)
DTYPE_CHOICES = "choose bf16, fp16 or fp32 (also spelled bfloat16, float16, float32), or auto (keep the source's)"


def parse_dtype(name: str | None) -> dtypes.DType | None:
    if name is None or name == "auto":
        return None
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise UsageError(f"--dtype {name!r}: {DTYPE_CHOICES}") from None


def resolve_hf_model(hf_model: str, allow_patterns=HUB_PATTERNS) -> Path:
    """A local folder as is; otherwise a hub repo id, fetched (only the needed files) or found in the cache."""
    path = Path(hf_model).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.name == "config.json":
        return path.parent
    if path.is_file():
        hint = ("a single safetensors file: pass the folder that holds it with its config.json"
                if path.suffix == ".safetensors" else "a file, not a model folder: pass the folder holding config.json")
        raise BadInputError(f"{hf_model}: {hint}")
    if path.exists():
        raise BadInputError(f"{hf_model}: not a folder; pass the model folder holding config.json")
    if hf_model.startswith((".", "/", "~")) or hf_model.count("/") != 1:
        raise BadInputError(f"{hf_model}: no such folder, and not a Hugging Face repo id (owner/name); check the path")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=hf_model, allow_patterns=allow_patterns))
    except Exception as e:  # the hub raises many types (offline, not found, auth, network)
        raise BadInputError(
            f"{hf_model}: cannot get it from the Hugging Face hub or its cache ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); pass a local folder or check HF_HUB_OFFLINE/HF_TOKEN"
        ) from e


def commit_markers(out: Path) -> list[Path]:
    """What makes ``out`` look like a finished checkpoint, newest first: removed first when it is undone."""
    return [out / TRACKER, out / run_config.LATEST_TRAIN_STATE_FILE, out / ITER_DIR / ".metadata"]


def prepare_output(out: Path, overwrite: bool, resume: bool = False) -> Path:
    """The ``iter_0000000`` folder, created empty; a non-empty ``out`` is refused unless ``overwrite`` (then
    emptied, its commit markers first). The caller holds ``out``'s lock."""
    if out.is_dir() and not outdir.is_empty(out) and not resume:
        if not overwrite:
            raise OutputError(f"{out}: output folder is not empty; choose another --megatron-path or pass --overwrite")
        outdir.clear(out, markers=[m.relative_to(out) for m in commit_markers(out)])
    ckpt = out / ITER_DIR
    try:
        ckpt.mkdir(parents=True, exist_ok=True)
        probe = ckpt / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise output_error(out, e) from e
    return ckpt


def build_plan(source: SafetensorsSource, spec: ModelSpec, dtype: dtypes.DType | None,
               chunk_bytes: int, allow_unused: bool = False, file_bytes: int = DEFAULT_FILE_BYTES) -> Plan:
    quant = getattr(source, "quant", None)
    check_source(spec, source.tensors, allow_unused=allow_unused, quant=quant)
    return import_plan(spec, source_dtypes(source), dtype, chunk_bytes=chunk_bytes, file_bytes=file_bytes)


def source_dtypes(source) -> dict:
    """Each source tensor's dtype as the plan sees it: a quantized weight has the dtype it dequantizes to."""
    quant = getattr(source, "quant", None)
    return {name: quant.dtype if quant is not None and name in quant.scales else info.dtype
            for name, info in source.tensors.items() if quant is None or name not in quant.companions}


def open_source(folder: Path, cfg: dict) -> SafetensorsSource:
    """The HF source, with its quantization (if any) recognized and its scales read
    (``sources/quantized.py``)."""
    from streamconv.sources import quantized

    source = SafetensorsSource(folder)
    try:
        source.quant = quantized.detect(source, folder, cfg)
        source.dequant = source.quant.scales if source.quant is not None else {}
    except BaseException:
        source.close()
        raise
    return source


@dataclass
class Options:
    dtype: str | None = None
    max_memory: int = runner.DEFAULT_MAX_MEMORY
    workers: int = 4
    device: str = "cpu"
    overwrite: bool = False
    allow_unused: bool = False
    quiet: bool = False
    staging: bool = True  # stage chunks in zarr and assemble (resumable); False: write .distcp directly
    keep_staging: bool = False  # keep the zarr staging store (a readable zarr of the whole model)
    file_bytes: int = DEFAULT_FILE_BYTES  # target size of each .distcp file
    recheck: bool = False  # resuming: re-read the source of every kept chunk and compare its CRC (recheck.py)


def chunk_bytes_for(max_memory: int) -> int:
    """Chunks small enough that several (buffer, cast output, sink copy) fit the budget at once.

    No floor of its own: ``check_budget`` refuses budgets under ``MIN_MAX_MEMORY`` (tests lift that floor to
    split a tiny model into many chunks).
    """
    return max(1, min(DEFAULT_CHUNK_BYTES, max_memory // 8))


@dataclass
class _Setup:
    folder: Path
    spec: ModelSpec
    source: SafetensorsSource
    plan: Plan
    identity: dict


def _setup(hf_model: str, out: Path, opts: Options) -> _Setup:
    """Input, plan and identity: the same on every rank of a distributed run (planning reads headers only)."""
    folder = resolve_hf_model(hf_model)
    cfg = load_config(folder)
    spec = spec_from_config(cfg)
    outdir.refuse_overlap(out, [folder], "--megatron-path")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    source = open_source(folder, cfg)
    try:
        dtype = parse_dtype(opts.dtype)
        plan = build_plan(source, spec, dtype, chunk_bytes_for(opts.max_memory), opts.allow_unused, opts.file_bytes)
        need = runner.min_memory(plan, source)
        if need > opts.max_memory:
            raise UsageError(f"--max-memory {runner.fmt_bytes(opts.max_memory)} is below the "
                             f"{runner.fmt_bytes(need)} one chunk needs")
        identity = resume.make_identity(folder, {i.path for i in source.tensors.values()}, plan,
                                        dtype=str(dtype).removeprefix("torch.") if dtype else None,
                                        file_bytes=opts.file_bytes,
                                        staging=opts.staging)
    except BaseException:
        source.close()
        raise
    return _Setup(folder, spec, source, plan, identity)


def _prepare(out: Path, identity: dict, opts: Options, world: int) -> resume.Journal:
    """The output folder, ready for this conversion (fresh, overwritten or resumed), and rank 0's journal.
    The caller holds the output's lock."""
    resuming = resume.check_output(out, identity, opts.overwrite)  # refuses another conversion's folder
    ckpt = prepare_output(out, opts.overwrite, resume=resuming)
    if resuming:  # nothing may look complete while a resumed run works
        resume.uncommit(commit_markers(out))
    resume.set_world(out, ckpt, world)  # written by another number of ranks: its committed files only
    return resume.Journal(out, identity, resume.journal_name(0, world))


SMALL_CHUNK_BYTES = 1024**2  # below this, framing and per-chunk work dominate
MIN_MAX_MEMORY = 1024**2  # the smallest --max-memory accepted: chunks of 128 KiB, framing under 1% of each
TINY_BUDGET_HOOK = "STREAMCONV_TEST_TINY_BUDGET"  # tests split tiny models into many chunks (crashpoints.py)


def check_budget(max_memory: int, quiet: bool = False) -> None:
    """A budget below ``MIN_MAX_MEMORY`` is refused (chunks of a few KiB, each a torch.save archive of its
    own, would make the output larger than the model and the run slow); one that makes chunks under
    ``SMALL_CHUNK_BYTES`` is allowed, and said. Tests lift the floor with ``STREAMCONV_TEST_TINY_BUDGET=1``."""
    import os
    import sys

    chunk = chunk_bytes_for(max_memory)
    if max_memory < MIN_MAX_MEMORY and not os.environ.get(TINY_BUDGET_HOOK):
        raise UsageError(f"--max-memory {runner.fmt_bytes(max_memory)} is below the {runner.fmt_bytes(MIN_MAX_MEMORY)} "
                         f"streamconv accepts: it would make chunks of {runner.fmt_bytes(chunk)}, each framed as an "
                         "archive of its own (~1 KiB), so the output would grow and the run crawl; pass "
                         f"--max-memory {runner.fmt_bytes(8 * SMALL_CHUNK_BYTES)} or more")
    if chunk < SMALL_CHUNK_BYTES and not quiet:
        sys.stderr.write(f"warning: --max-memory {runner.fmt_bytes(max_memory)} makes chunks of at most "
                         f"{runner.fmt_bytes(chunk)}: each is a torch.save archive of its own (framing of ~1 KiB "
                         f"each) and a step of its own, so the output grows and the run slows; "
                         f"--max-memory {runner.fmt_bytes(8 * SMALL_CHUNK_BYTES)} or more avoids it\n")


def hf2mcore(hf_model: str, megatron_path: str | Path, opts: Options, job=None) -> dict:
    """Convert; returns the summary (bytes, seconds, peak RSS, ...). ``job``: this process's place in a
    distributed run (``dist.Job``), or None alone."""
    from contextlib import nullcontext

    from streamconv.runtime import dist

    out = Path(megatron_path).expanduser()
    rank, world = dist.place(job)
    leader = rank == 0
    if opts.recheck and not opts.staging:
        raise UsageError("--recheck compares each kept chunk with its journaled CRC-32, which --no-staging does "
                         "not keep; drop one of them")
    check_budget(opts.max_memory, quiet=opts.quiet or not leader)
    if job is not None and opts.keep_staging:
        raise UsageError("--keep-staging is not available in a distributed run; run it in one process")
    s = dist.set_up(job, lambda: _setup(hf_model, out, opts), lambda s: s.identity, lambda s: s.source.close(),
                    "another input or plan")
    folder, spec, source, plan = s.folder, s.spec, s.source, s.plan
    from streamconv.runtime.progress import status

    quiet = opts.quiet or not leader
    status(f"planned {len(plan.targets)} tensors in {len(plan.chunks)} chunks, {runner.fmt_bytes(plan.total_bytes)} "
           f"into {plan.num_files + 1} files" + (f" on {world} processes" if world > 1 else ""), quiet)
    parts = dist.split(plan.file_bytes(), world)
    mine = parts[rank]
    note = dist.idle_note(parts, ".distcp file", "--distcp-size", plan.total_bytes)
    if note:
        status(note, quiet)
    try:
        with outdir.OutputLock(out) if leader else nullcontext():  # one writer: from the identity check to the tracker
            journal = job.on_rank0(lambda: _prepare(out, s.identity, opts, world)) if job is not None else \
                _prepare(out, s.identity, opts, world)
            if not leader:
                journal = resume.Journal(out, s.identity, resume.journal_name(rank, world))
            ckpt = out / ITER_DIR
            t0 = time.perf_counter()  # the conversion's own work: resume checks, engine, commit
            cpu0 = rss.cpu_seconds()
            view = None
            if opts.keep_staging:
                from streamconv.sinks.zarr_view import StagingStore

                view = StagingStore(journal.dir / resume.STAGING_STORE, plan)  # fsynced whole at the end
                view.check_raw(plan)
            try:
                sink = TorchDistSink(ckpt, plan, journal, chunk_journal=opts.staging, view=view, files=mine,
                                     leader=leader)
            except BaseException:
                journal.close()
                raise
            if sink.report["files_resumed"] or sink.report["chunks_kept"]:
                status(f"resuming: {sink.report['files_resumed']} files and {sink.report['chunks_kept']} more chunks "
                       "kept from the last run", quiet)
            progress = make_progress(opts.quiet or not leader, "hf2mcore", plan.total_bytes, len(plan.chunks),
                                     opts.max_memory, plan=plan if job is None else None)
            try:
                rss.reset_peak()  # the conversion's own peak, apart from start-up (imports, planning)
                crashpoints.pause("work")
                with progress, job.heartbeat(dist.job_progress(progress, world)) if job else nullcontext() as hb:
                    if opts.recheck:
                        _recheck(plan.part(mine), source, sink, opts, quiet)
                    stats = runner.run(plan.part(mine), source, sink, max_memory=opts.max_memory,
                                       workers=opts.workers, device=opts.device,
                                       progress=dist.Counting(progress, hb) if hb else progress, skip=sink.skip)
                    entries = sink.finish_files()
                    figures = rank_figures(rank, stats, sink.report, time.perf_counter() - t0,
                                           rss.cpu_seconds() - cpu0, rss.window_peak())
                    ranks = [{"entries": entries, "figures": figures}]
                    if hb is not None:
                        ranks = hb.finish(ranks[0])
                entries = {f: items for r in ranks for f, items in r["entries"].items()}
                figures = [r["figures"] for r in ranks]

                def commit() -> None:
                    if leader:
                        write_bridge_files(folder, out, ckpt, spec, plan, hf_model)
                    sink.commit(entries)
                    if leader:  # what Bridge / Megatron-LM look for in <out> comes after .metadata: never before
                        try:
                            fsync_write(out / run_config.LATEST_TRAIN_STATE_FILE,
                                        (ckpt / run_config.TRAIN_STATE_FILE).read_bytes())
                            fsync_write(out / TRACKER, run_config.tracker_text(0).encode())
                        except BaseException:  # a folder that is not all there must not look complete
                            resume.uncommit(commit_markers(out))
                            raise

                if job is None:
                    commit()
                else:
                    job.on_rank0(commit)
                    if not leader:
                        sink.commit({})
                seconds = time.perf_counter() - t0
                cpu = rss.cpu_seconds() - cpu0
                conversion_peak = rss.window_peak()
            except BaseException:
                sink.abort()
                raise
    finally:
        source.close()
    summary = {
        "command": "hf2mcore",
        "input": str(folder),
        "output": str(out),
        "architecture": spec.architecture,
        "layers": spec.num_layers,
        "tensors": len(plan.targets),
        "chunks": sum(f["chunks"] for f in figures),
        "files": plan.num_files + 1,
        "bytes": sum(f["bytes"] for f in figures),
        "seconds": round(seconds, 3),
        "engine_seconds": round(stats.seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "engine_path": stats.path,
        "phases": phase_seconds(stats),
        "mb_per_s": round(sum(f["bytes"] for f in figures) / 1e6 / max(seconds, 1e-9), 1),
        "peak_rss_bytes": peak_rss(),
        "conversion_peak_rss_bytes": conversion_peak,
        "max_memory_bytes": opts.max_memory,
        "peak_in_flight_bytes": stats.peak_in_flight,
        "chunk_bytes": plan.chunk_bytes,
        "workers": opts.workers,
        "device": opts.device,
        "staging": opts.staging,
        "chunks_resumed": sum(f["chunks_resumed"] for f in figures),
        **{k: sum(f[k] for f in figures) for k in sink.report},
    }
    quant = getattr(source, "quant", None)
    if quant is not None:
        summary["quantization"] = quant.as_dict()
    if job is not None:  # the job's figures, not rank 0's: CPU and phases summed over ranks, peaks the highest
        # (peak_rss_bytes, start-up included, stays rank 0's own)
        summary.update(engine_seconds=max(f["engine_seconds"] for f in figures),
                       cpu_seconds=round(sum(f["cpu_seconds"] for f in figures), 3),
                       phases={k: round(sum(f["phases"].get(k, 0.0) for f in figures), 3)
                               for k in dict.fromkeys(k for f in figures for k in f["phases"])},
                       peak_in_flight_bytes=max(f["peak_in_flight_bytes"] for f in figures),
                       conversion_peak_rss_bytes=max(f["conversion_peak_rss_bytes"] for f in figures),
                       processes=world, ranks=figures)
    return summary


def _recheck(plan: Plan, source, sink, opts: Options, quiet: bool) -> None:
    """``--recheck``: the kept chunks' sources, compared with the journal before the run goes on (the counts go
    to the summary with the sink's report)."""
    from streamconv.runtime import recheck
    from streamconv.runtime.progress import status

    expected = sink.kept_crcs()
    if expected:
        status(f"rechecking the source of {len(expected)} kept chunks", quiet)
    chunks, nbytes = recheck.kept(plan, source, expected, max_memory=opts.max_memory, workers=opts.workers)
    if chunks:
        status(f"rechecked the source of {chunks} kept chunks ({runner.fmt_bytes(nbytes)}): unchanged", quiet)
    sink.report["rechecked_chunks"], sink.report["rechecked_bytes"] = chunks, nbytes


def rank_figures(rank: int, stats, report: dict, seconds: float, cpu: float, peak: int) -> dict:
    """What one rank did: the per-rank part of a distributed run's summary."""
    import socket

    return {"rank": rank, "host": socket.gethostname(), "chunks": stats.chunks_done, "bytes": stats.bytes_done,
            "chunks_resumed": stats.chunks_skipped, "seconds": round(seconds, 3),
            "engine_seconds": round(stats.seconds, 3), "cpu_seconds": round(cpu, 3),
            "conversion_peak_rss_bytes": peak, "peak_in_flight_bytes": stats.peak_in_flight,
            "phases": phase_seconds(stats), **report}


def phase_seconds(stats) -> dict:
    """Seconds per phase of the engine (summed over its threads): the profile ``bench/profile.py`` reads."""
    if stats.path == "direct":
        return {k: round(v, 3) for k, v in vars(stats.phases).items()}
    return {"read": round(stats.read_seconds, 3), "wait_for_reads": round(stats.wait_seconds, 3),
            "cast_and_write": round(stats.write_seconds, 3)}


def write_bridge_files(folder: Path, out: Path, ckpt: Path, spec: ModelSpec, plan: Plan, hf_model: str) -> None:
    """What Megatron-Bridge's import writes around the torch_dist part: ``run_config.yaml``,
    ``train_state.pt`` and the tokenizer files (``<out>/latest_train_state.pt`` is written after ``.metadata``)."""
    # a local folder by its absolute path (usable from any working directory, as save: is); a hub id as is
    source = str(folder.resolve()) if Path(hf_model).expanduser().exists() else hf_model
    text = run_config.for_spec(spec, plan, save_dir=str(out.resolve()), hf_source=source)
    fsync_write(ckpt / run_config.RUN_CONFIG_FILE, text.encode())
    fsync_write(ckpt / run_config.TRAIN_STATE_FILE, train_state_bytes())
    carry_config(folder, ckpt)
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if present:
        (ckpt / "tokenizer").mkdir(exist_ok=True)
        for name in present:
            fsync_write(ckpt / "tokenizer" / name, (folder / name).read_bytes())


def train_state_bytes(step: int = 0) -> bytes:
    """``train_state.pt``: ``torch.save`` of Bridge's dict of 0-d tensors (``formats/torch_save.py``)."""
    import struct

    from streamconv.formats import torch_save

    state = run_config.train_state_tensors(step)
    refs = {k: torch_save.TensorRef((), dtypes.of(d)) for k, (_, d) in state.items()}
    packing = {"int64": "<q", "float32": "<f", "bool": "<?"}
    return torch_save.save_bytes(refs, [struct.pack(packing[d], v) for v, d in state.values()])


HF_CONFIG_DIR = "hf_config"  # the source's config.json, kept beside the checkpoint (mcore2hf gives it back)


def carry_config(folder: Path, ckpt: Path) -> None:
    """``<ckpt>/hf_config/config.json``: the source's config.json as it was (token ids and every field the
    run config does not hold), without a quantized source's ``quantization_config`` (the weights written are
    not quantized); ``mcore2hf`` exports it back when it still describes the checkpoint."""
    import json

    raw = (folder / "config.json").read_bytes()
    cfg = json.loads(raw)
    if "quantization_config" in cfg:
        del cfg["quantization_config"]
        raw = (json.dumps(cfg, indent=2) + "\n").encode()
    (ckpt / HF_CONFIG_DIR).mkdir(exist_ok=True)
    fsync_write(ckpt / HF_CONFIG_DIR / "config.json", raw)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
