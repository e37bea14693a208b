"""mcore2hf: a Megatron-Core ``torch_dist`` checkpoint -> a Hugging Face safetensors folder, streaming.

Input: the folder holding ``.metadata``, an ``iter_*`` / ``release`` folder, or their parent with
``latest_checkpointed_iteration.txt``. The model is described by ``--hf-config`` (a folder, config.json or
hub id) or else by the checkpoint's own ``run_config.yaml`` (Megatron-Bridge). Output, as
``save_pretrained`` lays it out::

    <hf-path>/model-0000i-of-0000n.safetensors   (model.safetensors when one shard)
    <hf-path>/config.json, tokenizer and generation files (when a source for them is known)
    <hf-path>/model.safetensors.index.json       written last (several shards)

Resume: ``<hf-path>/.streamconv-mcore2hf.json`` records what the export is made of; re-running the same
command keeps the shards already complete (a shard exists under its final name only when complete) and
writes the rest. The marker is removed when the export is finished.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

from contextlib import nullcontext

from streamconv.engine import runner
from streamconv.errors import OutputError, UsageError
from streamconv.files.atomic import fsync_dir, fsync_write
from streamconv.formats.names import (EXPORT_JOB_TOKEN_FILE, EXPORT_MARKER, INDEX_FILE, TOKENIZER_DIR,
                                      TOKENIZER_FILES)
from streamconv.inputs import check_budget, check_checkpoint, check_fits, chunk_bytes_for, model_config, \
    parse_dtype, resolve_checkpoint, vocab_padding
from streamconv.models.config import spec_from_config
from streamconv.models.spec import ModelSpec
from streamconv.plan.build import DEFAULT_SHARD_BYTES, Plan, export_plan
from streamconv.runtime import dist, outdir, report, resume, rss
from streamconv.runtime.progress import make_progress, status
from streamconv.sinks.safetensors import SafetensorsSink, shard_complete, shard_entries, shard_name, write_index
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
    cfg, cfg_folder, verbatim, config_from = model_config(ckpt, opts.hf_config, opts.max_memory)
    spec = spec_from_config(cfg)
    out_dtype = parse_dtype(opts.dtype)
    if opts.max_shard_size <= 0:
        raise UsageError("--max-shard-size must be positive")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    outdir.refuse_overlap(out, [ckpt] + ([cfg_folder] if cfg_folder is not None else []), "--hf-path")
    source = TorchDistSource(ckpt, opts.max_memory)
    try:
        outdir.refuse_overlap(out, source.files(), "--hf-path")  # symlinked files: their targets too
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
        "mcore2hf", figures, seconds, processes=world if job is not None else None, summed=("shards_skipped",),
        input=str(e.ckpt), config_from=e.config_from, output=str(out), architecture=e.spec.architecture,
        layers=e.spec.num_layers, tensors=len(e.plan.targets), shards=e.plan.num_files,
        index=INDEX_FILE if e.plan.num_files > 1 else None,
        left_out=e.left_out,  # --not-strict: model tensors the mapping does not know, not exported
        copied=copied, max_memory_bytes=opts.max_memory, workers=opts.workers, device=opts.device)


def _convert(out: Path, e: _Export, opts: Options, job, mine: set, quiet: bool, t0: float) -> list[dict]:
    """This rank's shards through the engine (complete ones kept); every rank's figures."""
    rank, world = dist.place(job)
    entries = shard_entries(e.plan)
    done = {i for i in mine if shard_complete(out / shard_name(i, e.plan.num_files), entries[i])}
    sink = SafetensorsSink(out, e.plan, skip=done)
    cpu0 = rss.cpu_seconds()
    progress = make_progress(quiet, "mcore2hf", e.plan.total_bytes, len(e.plan.chunks), opts.max_memory)
    rss.reset_peak()  # the export's own peak, apart from start-up
    try:
        with progress, job.heartbeat(dist.job_progress(progress, world)) if job else nullcontext() as hb:
            stats = runner.run(e.plan.part(mine), e.source, sink, max_memory=opts.max_memory, workers=opts.workers,
                               device=opts.device, progress=dist.Counting(progress, hb) if hb else progress,
                               skip=lambda c: c.file in done)
            sink.close()
            figures = report.rank_figures(rank, stats, time.perf_counter() - t0, rss.cpu_seconds() - cpu0,
                                          shards=sorted(mine), shards_skipped=len(done))
            return hb.finish(figures) if hb is not None else [figures]
    except BaseException:
        sink.abort()
        raise


def _finish(out: Path, e: _Export) -> list[str]:
    """Rank 0, every shard written: ``config.json``, the tokenizer files, then the index (the commit)."""
    write_config(out, e.cfg, e.verbatim, e.plan, e.out_dtype is not None)
    side = [e.cfg_folder] if e.cfg_folder is not None else []
    names = copy_side_files(out, side + [e.ckpt / TOKENIZER_DIR])
    write_index(out, e.plan)  # last: with it a sharded folder is complete
    (out / EXPORT_MARKER).unlink(missing_ok=True)
    (out / EXPORT_JOB_TOKEN_FILE).unlink(missing_ok=True)
    fsync_dir(out)
    return names
