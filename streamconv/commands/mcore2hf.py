"""mcore2hf: a Megatron-Core ``torch_dist`` checkpoint -> a Hugging Face safetensors folder, streaming.

Input: the folder holding ``.metadata``, an ``iter_*`` / ``release`` folder, or their parent with
``latest_checkpointed_iteration.txt``. The model is described by ``--hf-config`` (a folder, config.json or
hub id) or else by the checkpoint's own ``run_config.yaml`` (Megatron-Bridge). Output, as
``save_pretrained`` lays it out::

    <hf-path>/model-0000i-of-0000n.safetensors   (model.safetensors when one shard)
    <hf-path>/config.json, tokenizer and generation files (when a source for them is known)
    <hf-path>/model.safetensors.index.json       written last (several shards)

The engine's direct path copies each tensor's bytes from their ranges in the ``.distcp`` items straight to
their place in the shards (``sinks/safetensors.py`` lays every shard out from the plan), without torch when
no ``--dtype`` cast is asked; a checkpoint with items of another layout goes through the buffered path.

Resume: ``<hf-path>/.streamconv-mcore2hf.json`` records what the export is made of, ``<hf-path>/.streamconv``
journals each chunk placed; re-running the same command keeps the shards already complete (a shard exists under
its final name only when complete) and every journaled chunk of the others, and writes the rest. Both are
removed when the export is finished.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

from contextlib import nullcontext

from streamconv.engine import runner
from streamconv.errors import OutputError, UsageError
from streamconv.files.atomic import fsync_dir, fsync_write
from streamconv.formats.names import (EXPORT_JOB_TOKEN_FILE, EXPORT_MARKER, INDEX_FILE, STATE_DIR, TOKENIZER_DIR,
                                      TOKENIZER_FILES)
from streamconv.inputs import check_budget, check_checkpoint, check_fits, chunk_bytes_for, model_config, \
    parse_dtype, resolve_checkpoint, vocab_padding
from streamconv.models.config import spec_from_config
from streamconv.models.spec import ModelSpec
from streamconv.plan.build import DEFAULT_SHARD_BYTES, Plan, export_plan, with_held_mtp
from streamconv.runtime import dist, outdir, report, resume, rss
from streamconv.runtime.progress import make_progress, status
from streamconv.sinks.safetensors import SafetensorsSink, shard_entries, write_index
from streamconv.sources.torch_dist import TorchDistSource



@dataclass
class Options:
    hf_config: str | None = None
    dtype: str | None = None
    max_memory: int = runner.DEFAULT_MAX_MEMORY
    max_shard_size: int = DEFAULT_SHARD_BYTES
    workers: int = 4
    device: str = "cpu"
    overwrite: bool = False
    quiet: bool = False
    strict: bool = True  # False (--not-strict): model tensors outside the mapping are left out, not refused
    recheck: bool = False  # resuming: read back what is kept, then its source, against the journal (--recheck)


def write_config(out: Path, cfg: dict, verbatim: bytes | None, plan: Plan, dtype_given: bool) -> None:
    """``config.json``: the given file as is, unless ``--dtype`` changed the weights' dtype; otherwise the
    config dict with ``torch_dtype`` set to the exported dtype."""
    if verbatim is not None and not dtype_given and "quantization_config" not in cfg:
        fsync_write(out / "config.json", verbatim)
        return
    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}  # the weights written are not quantized
    dtypes = {t.dtype for t in plan.targets.values()}
    if len(dtypes) == 1:
        cfg["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
        cfg.pop("dtype", None)
    fsync_write(out / "config.json", (json.dumps(cfg, indent=2) + "\n").encode())


def copy_side_files(out: Path, sources: list[Path]) -> list[str]:
    """Tokenizer and generation files, each from the first source folder that has it."""
    copied = []
    for name in TOKENIZER_FILES:
        for folder in sources:
            if (folder / name).is_file():
                fsync_write(out / name, (folder / name).read_bytes())
                copied.append(name)
                break
    return copied


class _Export(NamedTuple):
    ckpt: Path
    cfg: dict
    cfg_folder: Path | None
    verbatim: bytes | None
    config_from: str
    spec: ModelSpec
    out_dtype: object
    source: TorchDistSource
    plan: Plan
    identity: dict
    left_out: list


def _setup(megatron_path, out: Path, opts: Options) -> _Export:
    """Checkpoint, config, source and plan: the same on every rank of a distributed run."""
    ckpt = resolve_checkpoint(megatron_path)
    out_dtype = parse_dtype(opts.dtype)
    if opts.max_shard_size <= 0:
        raise UsageError("--max-shard-size must be positive")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    source = TorchDistSource(ckpt, opts.max_memory)  # .metadata, read once (a training run's args are in it)
    try:
        cfg, cfg_folder, verbatim, config_from = model_config(ckpt, opts.hf_config, opts.max_memory, source)
        spec = spec_from_config(cfg)
        outdir.refuse_overlap(out, [ckpt] + ([cfg_folder] if cfg_folder is not None else []), "--hf-path")
        outdir.refuse_overlap(out, source.files(), "--hf-path")  # symlinked files: their targets too
        spec = with_held_mtp(spec, source.tensors)  # imported with --drop-mtp: the config still declares them
        left_out = check_checkpoint(spec, source, strict=opts.strict, pad_multiple=vocab_padding(ckpt, source))
        mcore_dtypes = {k: m.dtype for k, m in source.tensors.items()}
        plan = export_plan(spec, mcore_dtypes, out_dtype, chunk_bytes_for(opts.max_memory), opts.max_shard_size)
        check_fits(plan, source, opts.max_memory)
        identity = resume.export_identity(ckpt, shard_entries(plan))
    except BaseException:
        source.close()
        raise
    return _Export(ckpt, cfg, cfg_folder, verbatim, config_from, spec, out_dtype, source, plan, identity, left_out)


def mcore2hf(megatron_path: str | Path, hf_path: str | Path, opts: Options, job=None) -> dict:
    """Export; returns the summary (``runtime/report.py``). ``job``: this process's place in a distributed run
    (``dist.Job``: each rank writes its share of the shards, rank 0 the index), or None."""
    out = Path(hf_path).expanduser()
    rank, world = dist.place(job)
    quiet = opts.quiet or rank != 0
    check_budget(opts.max_memory, quiet=quiet)
    e = dist.set_up(job, lambda: _setup(megatron_path, out, opts), lambda e: (e.identity, str(out.resolve())),
                    lambda e: e.source.close(), "another checkpoint, output folder or plan")
    parts = dist.split(e.plan.file_bytes(), world)
    note = dist.idle_note(parts, "shard", "--max-shard-size", e.plan.total_bytes)
    if note:
        status(note, quiet)
    try:
        with outdir.job_lock(out, job):
            if job is None:
                resume.ready_export(out, e.identity, opts.overwrite)
            else:
                job.on_rank0(lambda: resume.ready_export(out, e.identity, opts.overwrite))
                job.same_folder(out, EXPORT_JOB_TOKEN_FILE, "--hf-path")
            t0 = time.perf_counter()  # the export's own work: resume checks, engine, index (the job's, on rank 0)
            figures = _convert(out, e, opts, job, parts[rank], quiet, t0)
            copied = _finish(out, e) if job is None else job.on_rank0(lambda: _finish(out, e))
            seconds = time.perf_counter() - t0
    finally:
        e.source.close()
    return report.summarize(
        "mcore2hf", figures, seconds, processes=world if job is not None else None,
        summed=("shards_skipped", "chunks_kept") + (("output_rechecked_chunks", "output_rechecked_bytes",
                                                      "output_chunks_redone", "rechecked_chunks", "rechecked_bytes")
                                                     if opts.recheck else ()),
        input=str(e.ckpt), config_from=e.config_from, output=str(out), architecture=e.spec.architecture,
        layers=e.spec.num_layers, tensors=len(e.plan.targets), shards=e.plan.num_files,
        index=INDEX_FILE if e.plan.num_files > 1 else None,
        left_out=e.left_out,  # --not-strict: model tensors the mapping does not know, not exported
        copied=copied, max_memory_bytes=opts.max_memory, workers=opts.workers, device=opts.device)


def _journal(out: Path, e: _Export, job) -> resume.Journal:
    """This rank's journal in ``<hf-path>/.streamconv``: rank 0's first (it compacts the journals of a run with
    another number of ranks, whose ``.partial`` shards may be another rank's and are redone, and starts the
    state folder), then the other ranks'."""
    rank, world = dist.place(job)

    def first() -> resume.Journal:
        resume.set_world(out, out, world)
        return resume.Journal(out, e.identity, resume.journal_name(0, world))

    if job is None:
        return first()
    mine: list = []
    job.on_rank0(lambda: mine.append(first()))
    return mine[0] if rank == 0 else resume.Journal(out, e.identity, resume.journal_name(rank, world))


def _convert(out: Path, e: _Export, opts: Options, job, mine: set, quiet: bool, t0: float) -> list[dict]:
    """This rank's shards through the engine (complete shards and journaled chunks kept); every rank's figures."""
    rank, world = dist.place(job)
    part = e.plan.part(mine)
    e.source.use_extents({r.name for c in part.chunks for r in c.reads})  # plain items: read as file ranges
    journal = _journal(out, e, job)
    try:
        sink = SafetensorsSink(out, e.plan, journal, files=mine)
    except BaseException:
        journal.close()
        raise
    if sink.report["shards_skipped"] or sink.report["chunks_kept"]:
        status(f"resuming: {sink.report['shards_skipped']} shards and {sink.report['chunks_kept']} more chunks "
               "kept from the last run", quiet)
    if opts.recheck:
        try:
            _recheck(part, e.source, sink, opts, quiet)
        except BaseException:
            sink.abort()
            raise
    cpu0 = rss.cpu_seconds()
    progress = make_progress(quiet, "mcore2hf", e.plan.total_bytes, len(e.plan.chunks), opts.max_memory)
    rss.reset_peak()  # the export's own peak, apart from start-up
    try:
        with progress, job.heartbeat(dist.job_progress(progress, world)) if job else nullcontext() as hb:
            stats = runner.run(part, e.source, sink, max_memory=opts.max_memory, workers=opts.workers,
                               device=opts.device, progress=dist.Counting(progress, hb) if hb else progress,
                               skip=sink.skip)
            sink.close()
            figures = report.rank_figures(rank, stats, time.perf_counter() - t0, rss.cpu_seconds() - cpu0,
                                          shards=sorted(mine), **sink.report)
            return hb.finish(figures) if hb is not None else [figures]
    except BaseException:
        sink.abort()
        raise


def _recheck(part: Plan, source, sink: SafetensorsSink, opts: Options, quiet: bool) -> None:
    """``--recheck``: the kept output read back against the journal (what differs is written again), then the
    kept chunks' sources converted again and compared (a checkpoint changed behind the file system is refused)."""
    from streamconv.sinks.compare import recheck_kept

    status("rechecking the kept output against the journal", quiet)
    found = sink.recheck_output(opts.workers)
    sink.report.update(found)
    if found["output_chunks_redone"]:
        status(f"{found['output_chunks_redone']} kept chunks differ from what was journaled: writing them again", quiet)
    chunks, nbytes = 0, 0
    if source.reads == "extents":  # (a checkpoint of other items is read through the buffered path only)
        chunks, nbytes = recheck_kept(part, source, sink.kept_crcs(), max_memory=opts.max_memory,
                                      workers=opts.workers)
    else:
        status("the checkpoint's items are not plain archives: the kept chunks' sources are not rechecked", quiet)
    sink.report["rechecked_chunks"], sink.report["rechecked_bytes"] = chunks, nbytes


def _finish(out: Path, e: _Export) -> list[str]:
    """Rank 0, every shard written: ``config.json``, the tokenizer files, then the index (the commit)."""
    write_config(out, e.cfg, e.verbatim, e.plan, e.out_dtype is not None)
    side = [e.cfg_folder] if e.cfg_folder is not None else []
    names = copy_side_files(out, side + [e.ckpt / TOKENIZER_DIR])
    write_index(out, e.plan)  # last: with it a sharded folder is complete
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)  # the journal (the marker last: until then a re-run resumes)
    (out / EXPORT_MARKER).unlink(missing_ok=True)
    (out / EXPORT_JOB_TOKEN_FILE).unlink(missing_ok=True)
    fsync_dir(out)
    return names
