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

import hashlib
import json
import time
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

from streamconv.engine import runner
from streamconv.runtime import outdir
from streamconv.errors import BadInputError, OutputError, UsageError, output_error
from streamconv.formats import run_config_reader
from streamconv import dtypes
from streamconv.sinks.safetensors import (INDEX_FILE, SafetensorsSink, shard_complete, shard_entries,
                                                 shard_name, write_index)
from streamconv.files.atomic import fsync_dir, fsync_write
from streamconv.sources.torch_dist import METADATA_FILE, TorchDistSource
from streamconv.commands.hf2mcore import TOKENIZER_FILES, chunk_bytes_for, parse_dtype, peak_rss, resolve_hf_model
from streamconv.models import rules
from streamconv.models.spec import ModelSpec
from streamconv.models.config import load_config, spec_from_config
from streamconv.plan.build import DEFAULT_SHARD_BYTES, Plan, export_plan
from streamconv.runtime.progress import make_progress

TRACKER = "latest_checkpointed_iteration.txt"
MARKER = ".streamconv-mcore2hf.json"
CONFIG_PATTERNS = ["*.json", "tokenizer.model"]  # what a hub --hf-config fetches: never the weights
# Tensors a (padded) vocabulary may make longer than the config's vocab_size: the extra rows are dropped.
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
# Top-level key prefixes of the model's weights (others, e.g. optimizer state, are not read).
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


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


def refuse_unfinished(p: Path) -> None:
    """An hf2mcore output (or its iter_0000000) that was interrupted: say so, and how to finish it."""
    unfinished = next((d for d in (p, p.parent) if (d / ".streamconv" / "identity.json").is_file()), None)
    if unfinished is not None:
        raise BadInputError(f"{unfinished}: an unfinished streamconv conversion (no {METADATA_FILE} yet: it was "
                            "interrupted); run the same hf2mcore command again to finish it, then use it")


def is_extra_state(key: str) -> bool:
    """Transformer Engine's ``_extra_state`` saved as a tensor (older TE) rather than an object: not a weight."""
    return key.split("/")[0].endswith("._extra_state")


def resolve_checkpoint(path: str | Path) -> Path:
    """The folder holding ``.metadata``: ``path`` itself, the one its tracker file names, or its only
    ``iter_*``/``release`` folder."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise BadInputError(f"{p}: not found (pass a torch_dist checkpoint folder or its parent)")
    if (p / METADATA_FILE).is_file():
        return p
    tracker = p / TRACKER
    if tracker.is_file():
        text = tracker.read_text(errors="replace").strip()
        if text == "release":
            sub = p / "release"
        elif text.isascii() and text.isdigit():
            sub = p / f"iter_{int(text):07d}"
        else:
            raise BadInputError(f"{tracker}: holds {text[:40]!r}, not an iteration number or 'release'")
        if not (sub / METADATA_FILE).is_file():
            raise BadInputError(f"{sub}: named by {TRACKER} but holds no {METADATA_FILE}: the checkpoint is "
                                "incomplete or was moved")
        return sub
    found = sorted(d for d in p.iterdir()
                   if d.is_dir() and (d.name.startswith("iter_") or d.name == "release") and (d / METADATA_FILE).is_file())
    if len(found) == 1:
        return found[0]
    if found:
        raise BadInputError(f"{p}: holds {len(found)} checkpoints ({', '.join(d.name for d in found[:4])}"
                            f"{', ...' if len(found) > 4 else ''}) and no {TRACKER}; pass one of them")
    refuse_unfinished(p)
    raise BadInputError(f"{p}: not a torch_dist checkpoint (no {METADATA_FILE}, no {TRACKER}, no iter_*/release "
                        "folder with one)")


def model_config(ckpt: Path, hf_config: str | None) -> tuple[dict, Path | None, bytes | None, str]:
    """The HF config dict, the folder it came from (tokenizer files may be there), when given as a file its
    exact bytes (copied verbatim), and what described the model (for the summary's ``config_from``)."""
    from streamconv.commands.hf2mcore import HF_CONFIG_DIR

    if hf_config is not None:
        folder = resolve_hf_model(hf_config, allow_patterns=CONFIG_PATTERNS)
        cfg = load_config(folder)
        return cfg, folder, (folder / "config.json").read_bytes(), f"--hf-config {hf_config}"
    path = ckpt / run_config_reader.RUN_CONFIG_FILE
    if path.is_file():
        derived = run_config_reader.hf_config_from_run_config(path)
        carried = carried_config(ckpt, derived)
        if carried is not None:
            return (*carried, f"{HF_CONFIG_DIR}/config.json (the source's, checked against "
                              f"{run_config_reader.RUN_CONFIG_FILE})")
        return derived, None, None, run_config_reader.RUN_CONFIG_FILE
    from streamconv.formats import megatron_args
    from streamconv.sources.torch_dist import TorchDistSource

    with TorchDistSource(ckpt) as source:  # a Megatron-LM training checkpoint: its args in the common state
        state = megatron_args.common_state(ckpt, source)
    if state is not None and state.get("args") is not None:
        where = ckpt / megatron_args.COMMON_FILE if (ckpt / megatron_args.COMMON_FILE).is_file() else ckpt
        return (megatron_args.hf_config_from_args(state["args"], where), None, None,
                "the training args in the checkpoint's common state")
    raise UsageError(f"{ckpt}: nothing describes the model (no {run_config_reader.RUN_CONFIG_FILE} as Megatron-Bridge "
                     "writes, no training args in the common state as Megatron-LM writes); pass --hf-config <HF model "
                     "folder | config.json | hub id>")


def carried_config(ckpt: Path, derived: dict) -> tuple[dict, None, bytes] | None:
    """The source's config.json that hf2mcore kept (``hf_config/config.json``), when it still describes the
    model ``run_config.yaml`` describes (same spec and rope): exported as it was, token ids included."""
    from streamconv.commands.hf2mcore import HF_CONFIG_DIR

    path = ckpt / HF_CONFIG_DIR / "config.json"
    if not path.is_file() or path.is_symlink() or path.stat().st_size > 16 * 1024**2:
        return None
    try:
        raw = path.read_bytes()
        carried = json.loads(raw)
        a, b = spec_from_config(carried), spec_from_config(derived)
    except (ValueError, OSError, BadInputError):
        return None
    import dataclasses

    same_rope = float(carried.get("rope_theta", 10000.0)) == float(derived.get("rope_theta", 10000.0)) and \
        bool(carried.get("rope_scaling")) == bool(derived.get("rope_scaling"))
    if dataclasses.replace(a, torch_dtype=b.torch_dtype) != b or not same_rope:
        return None
    return carried, None, raw


def check_checkpoint(spec: ModelSpec, source: TorchDistSource, strict: bool = True) -> list[str]:
    """Every megatron tensor the spec implies is there with its shape; no model tensor is left over."""
    expected: dict[str, tuple[int, ...]] = {}
    for b in rules.bindings(spec):
        expected[b.key] = b.global_shape
    where = source.folder
    hint = "check that --hf-config (or the checkpoint's run_config.yaml) describes this checkpoint"
    missing = [k for k in expected if k not in source.tensors]
    if missing:
        raise BadInputError(f"{where}: tensor {missing[0]!r} is needed for {spec.architecture} with this config but "
                            f"is not in the checkpoint ({len(missing)} missing); {hint}")
    for key, shape in expected.items():
        meta = source.tensors[key]
        got = meta.shape
        padded = key in VOCAB_KEYS and got[1:] == shape[1:] and got[0] >= shape[0]
        if got != shape and not padded:
            raise BadInputError(f"{where}: tensor {key!r} has shape {list(got)} but the config implies "
                                f"{list(shape)}; {hint}")
        if str(meta.dtype).removeprefix("torch.") not in dtypes.BY_NAME or not dtypes.of(meta.dtype).safetensors:
            raise BadInputError(f"{where}: tensor {key!r} is {meta.dtype}, which safetensors cannot store")
    unused = sorted(k for k in source.tensors if k not in expected and k.startswith(MODEL_PREFIXES)
                    and not is_extra_state(k))
    if unused and not strict:  # --not-strict: exported without them, and said in the summary
        return unused
    if unused:
        tied = " (the config ties the embeddings but the checkpoint has an output layer)" \
            if unused[0] == "output_layer.weight" else ""
        raise BadInputError(f"{where}: {len(unused)} model tensor(s) are not in the {spec.architecture} mapping of "
                            f"this config, first {unused[0]!r}{tied}; {hint} (or --not-strict to leave them out)")
    return []


def _identity(ckpt: Path, plan: Plan) -> dict:
    """What the export is made of: a re-run resumes only when this is unchanged (the memory budget, and so
    the chunking, may differ: the shards' bytes do not depend on it)."""
    meta = ckpt / METADATA_FILE
    st = meta.stat()
    entries = [[(n, str(d), list(s)) for n, d, s in shard] for shard in shard_entries(plan)]
    return {
        "format": 1,
        "checkpoint": str(ckpt.resolve()),
        "metadata": {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                     "sha256": hashlib.sha256(meta.read_bytes()).hexdigest()},
        "shards": hashlib.sha256(json.dumps(entries).encode()).hexdigest(),
    }


def prepare_output(out: Path, overwrite: bool, identity: dict) -> bool:
    """Create ``out`` (or resume in it); returns True when resuming. The caller holds its lock and has
    refused an ``out`` that overlaps the input (``outdir.refuse_overlap``)."""
    marker = out / MARKER
    resume = False
    if out.is_dir() and not outdir.is_empty(out):
        if overwrite:
            outdir.clear(out, markers=[INDEX_FILE])
        elif marker.is_file():
            try:
                previous = json.loads(marker.read_text())
            except (OSError, ValueError):
                previous = None
            if previous != identity:
                raise OutputError(f"{out}: holds an unfinished export of another checkpoint or with other options; "
                                  "run the same command as before to finish it, or pass --overwrite to start over")
            resume = True
        else:
            raise OutputError(f"{out}: output folder is not empty; choose another --hf-path or pass --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(out, e) from e
    if not resume:
        fsync_write(marker, json.dumps(identity, indent=2).encode())
    return resume


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
    cfg, cfg_folder, verbatim, config_from = model_config(ckpt, opts.hf_config)
    spec = spec_from_config(cfg)
    out_dtype = parse_dtype(opts.dtype)
    if opts.max_shard_size <= 0:
        raise UsageError("--max-shard-size must be positive")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    outdir.refuse_overlap(out, [ckpt] + ([cfg_folder] if cfg_folder is not None else []), "--hf-path")
    source = TorchDistSource(ckpt)
    try:
        left_out = check_checkpoint(spec, source, strict=opts.strict)
        mcore_dtypes = {k: m.dtype for k, m in source.tensors.items()}
        plan = export_plan(spec, mcore_dtypes, out_dtype, chunk_bytes_for(opts.max_memory), opts.max_shard_size)
        need = runner.min_memory(plan, source)
        if need > opts.max_memory:
            raise UsageError(f"--max-memory {runner.fmt_bytes(opts.max_memory)} is below the "
                             f"{runner.fmt_bytes(need)} one chunk needs")
        identity = _identity(ckpt, plan)
    except BaseException:
        source.close()
        raise
    return _Export(ckpt, cfg, cfg_folder, verbatim, config_from, spec, out_dtype, source, plan, identity, left_out)


def mcore2hf(megatron_path: str | Path, hf_path: str | Path, opts: Options, job=None) -> dict:
    """Export; returns the summary (bytes, seconds, peak RSS, ...). ``job``: this process's place in a
    distributed run (``dist.Job``: each rank writes its share of the shards, rank 0 the index), or None."""
    from contextlib import nullcontext

    from streamconv.runtime import dist

    from streamconv.commands.hf2mcore import check_budget

    out = Path(hf_path).expanduser()
    rank, world = dist.place(job)
    leader = rank == 0
    check_budget(opts.max_memory, quiet=opts.quiet or not leader)
    e = dist.set_up(job, lambda: _setup(megatron_path, out, opts), lambda e: e.identity, lambda e: e.source.close(),
                    "another checkpoint or plan")
    ckpt, cfg, cfg_folder, verbatim, config_from, spec, out_dtype, source, plan, identity, left_out = e
    parts = dist.split(plan.file_bytes(), world)
    mine = parts[rank]
    note = dist.idle_note(parts, "shard", "--max-shard-size", plan.total_bytes)
    if note:
        from streamconv.runtime.progress import status

        status(note, opts.quiet or not leader)
    try:
        with outdir.OutputLock(out) if leader else nullcontext():
            if job is None:
                prepare_output(out, opts.overwrite, identity)
            else:
                job.on_rank0(lambda: prepare_output(out, opts.overwrite, identity))
            t0 = time.perf_counter()  # the export's own work: resume checks, engine, index (the job's, on rank 0)
            entries = shard_entries(plan)
            done = {i for i in mine if shard_complete(out / shard_name(i, plan.num_files), entries[i])}
            sink = SafetensorsSink(out, plan, skip=done)
            progress = make_progress(opts.quiet or not leader, "mcore2hf", plan.total_bytes, len(plan.chunks),
                                     opts.max_memory)
            try:
                with progress, job.heartbeat(dist.job_progress(progress, world)) if job else nullcontext() as hb:
                    stats = runner.run(plan.part(mine), source, sink, max_memory=opts.max_memory,
                                       workers=opts.workers, device=opts.device,
                                       progress=dist.Counting(progress, hb) if hb else progress,
                                       skip=lambda c: c.file in done)
                    sink.close()
                    figures = {"rank": rank, "shards": sorted(mine), "shards_skipped": len(done),
                               "chunks": stats.chunks_done, "bytes": stats.bytes_done,
                               "seconds": round(stats.seconds, 3), "peak_rss_bytes": peak_rss(),
                               "peak_in_flight_bytes": stats.peak_in_flight}
                    ranks = hb.finish(figures) if hb is not None else [figures]
            except BaseException:
                sink.abort()
                raise
            copied: list[str] = []

            def finish() -> list[str]:
                write_config(out, cfg, verbatim, plan, out_dtype is not None)
                side = [cfg_folder] if cfg_folder is not None else []
                names = copy_side_files(out, side + [ckpt / run_config_reader.TOKENIZER_DIR])
                write_index(out, plan)  # last: with it a sharded folder is complete
                (out / MARKER).unlink(missing_ok=True)
                fsync_dir(out)
                return names

            copied = finish() if job is None else job.on_rank0(finish)
            seconds = time.perf_counter() - t0
    finally:
        source.close()
    summary = {
        "command": "mcore2hf",
        "input": str(ckpt),
        "config_from": config_from,
        "output": str(out),
        "architecture": spec.architecture,
        "layers": spec.num_layers,
        "tensors": len(plan.targets),
        "chunks": sum(r["chunks"] for r in ranks),
        "shards": plan.num_files,
        "shards_skipped": sum(r["shards_skipped"] for r in ranks),
        "index": INDEX_FILE if plan.num_files > 1 else None,
        "left_out": left_out,  # --not-strict: model tensors the mapping does not know, not exported
        "copied": copied,
        "bytes": sum(r["bytes"] for r in ranks),
        "seconds": round(seconds, 3),
        "engine_seconds": max(r["seconds"] for r in ranks),  # the slowest rank's
        "mb_per_s": round(sum(r["bytes"] for r in ranks) / 1e6 / max(seconds, 1e-9), 1),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks),  # each rank's own; the highest
        "peak_in_flight_bytes": max(r["peak_in_flight_bytes"] for r in ranks),
        "max_memory_bytes": opts.max_memory,
    }
    if job is not None:
        summary["processes"] = world
        summary["ranks"] = ranks
    return summary
