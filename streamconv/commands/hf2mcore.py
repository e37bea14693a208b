"""hf2mcore: a Hugging Face safetensors checkpoint -> a Megatron-Core ``torch_dist`` checkpoint.

Output layout, as Megatron-Bridge's import writes it (``formats/names.py``)::

    <megatron-path>/latest_checkpointed_iteration.txt      "0", written last
    <megatron-path>/iter_0000000/{.metadata, __0_*.distcp, common.pt, metadata.json, run_config.yaml}

The command in four steps: ``_setup`` (inputs, plan, identity: the same on every rank), ``_prepare`` (the
output folder: fresh, overwritten or resumed), ``_convert`` (the engine, into a ``TorchDistSink``),
``_commit`` (Bridge's files, ``.metadata``, the tracker); the summary is ``runtime/report.py``'s.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from streamconv import crashpoints, dtypes
from streamconv.engine import runner
from streamconv.errors import OutputError, UsageError, output_error
from streamconv.files.atomic import fsync_write
from streamconv.formats import run_config
from streamconv.formats.names import CONFIG_FILE, HF_CONFIG_DIR, JOB_TOKEN_FILE, ITER_DIR, METADATA_FILE, TOKENIZER_DIR, TOKENIZER_FILES, \
    TRACKER_FILE, ZARR_VIEW
from streamconv.inputs import check_budget, check_fits, chunk_bytes_for, import_plan_for, is_hub_id, \
    open_hf_source, parse_dtype, split_hub_id
from streamconv.models.config import spec_from_config
from streamconv.models.spec import ModelSpec
from streamconv.plan.build import DEFAULT_FILE_BYTES, Plan, unused_tensors, with_held_mtp
from streamconv.runtime import dist, outdir, report, resume, rss
from streamconv.runtime.progress import make_progress, status
from streamconv.sinks.torch_dist import TorchDistSink
from streamconv.sources.hub import HubModel, HubSource
from streamconv.sources.safetensors import SafetensorsSource
from streamconv.units import fmt_bytes


def commit_markers(out: Path) -> list[Path]:
    """What makes ``out`` look like a finished checkpoint, newest first: removed first when it is undone."""
    return [out / TRACKER_FILE, out / run_config.LATEST_TRAIN_STATE_FILE, out / ITER_DIR / METADATA_FILE]


def _ready_output(out: Path, overwrite: bool, resume: bool = False) -> Path:
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


@dataclass
class Options:
    dtype: str | None = None
    max_memory: int = runner.DEFAULT_MAX_MEMORY
    workers: int = 4
    device: str = "cpu"
    overwrite: bool = False
    allow_unused: bool = False
    drop_mtp: bool = False  # --drop-mtp: a Nemotron-H's mtp.* tensors are left out (listed in the summary)
    quiet: bool = False
    chunk_journal: bool = True  # journal each chunk (--no-staging: whole files only; a re-run redoes a file)
    zarr_view: bool = False  # --keep-staging: also write a zarr v3 view of the model (sinks/zarr_view.py)
    file_bytes: int = DEFAULT_FILE_BYTES  # target size of each .distcp file
    recheck: bool = False  # resuming: re-read the source of every kept chunk and compare its CRC (sinks/compare.py)
    revision: str | None = None  # a hub id's branch, tag or commit (--revision, or owner/name@revision)
    connections: int = 16  # a hub source's range requests in flight (--connections)
    download_first: bool = False  # a hub id: download the whole model to the cache first (--download-first)


@dataclass
class _Setup:
    folder: Path
    spec: ModelSpec
    source: SafetensorsSource | HubSource
    plan: Plan
    identity: dict
    hub: HubModel | None = None  # the weights are streamed from the Hub at this pinned commit
    moved: str | None = None  # resumed on ``hub.sha`` while the revision asked for now names this commit
    checked: dict | None = None  # the Hub shards' SHA-256 check (``_check_hub_hashes``)
    unused: list[str] = field(default_factory=list)  # source tensors left out (--allow-unused, --drop-mtp)


def _setup(hf_model: str, out: Path, opts: Options) -> _Setup:
    """Input, plan and identity: the same on every rank of a distributed run (planning reads headers only)."""
    hub_id = is_hub_id(hf_model)
    repo_id, asked = split_hub_id(hf_model, opts.revision) if hub_id else (None, None)
    # an interrupted run of this hub model into ``out`` is resumed on the commit it started from
    pinned = resume.hub_commit(out, repo_id) if hub_id and not opts.overwrite else None
    if asked is not None and len(asked) == 40 and asked != pinned:  # another commit, named: not this output's
        pinned = None
    folder, cfg, source, hub = open_hf_source(hf_model, opts.revision, opts.download_first, pinned)
    try:
        moved = _moved(hub, asked, opts.quiet) if hub and pinned else None
        spec = spec_from_config(cfg)
        outdir.refuse_overlap(out, [folder], "--megatron-path")
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out}: exists and is not a folder")
        # the files themselves too: a HF cache's shards are symlinks into blobs/ (--overwrite deletes out)
        outdir.refuse_overlap(out, ([] if hub else source.files()) + [folder / CONFIG_FILE], "--megatron-path")
        dtype = parse_dtype(opts.dtype)
        spec = with_held_mtp(spec, source.tensors, opts.drop_mtp)
        plan = import_plan_for(source, spec, dtype, chunk_bytes_for(opts.max_memory), opts.allow_unused,
                               opts.file_bytes, opts.drop_mtp)
        unused = unused_tensors(spec, source.tensors, source.quant)
        check_fits(plan, source, opts.max_memory)
        identity = resume.make_identity(folder, [] if hub else source.files(), plan,
                                        dtype=str(dtype).removeprefix("torch.") if dtype else None,
                                        file_bytes=opts.file_bytes,
                                        staging=opts.chunk_journal, hub=hub.identity() if hub else None)
    except BaseException:
        source.close()
        raise
    return _Setup(folder, spec, source, plan, identity, hub, moved, unused=unused)


def _moved(hub: HubModel, revision: str | None, quiet: bool) -> str | None:
    """A resumed run reads the commit it started from; when the revision asked for now names another, say so
    (and return that commit, for the summary)."""
    if revision is not None and revision == hub.sha:
        return None
    now = HubModel.resolve(hub.repo_id, revision).sha
    if now == hub.sha:
        return None
    status(f"{hub.repo_id}: {revision or 'main'} now points to {now[:12]}; resuming on {hub.sha[:12]}, the commit "
           "this conversion started from (--overwrite converts the new one)", quiet)
    return now


def _prepare(out: Path, identity: dict, opts: Options, world: int) -> resume.Journal:
    """The output folder, ready for this conversion (fresh, overwritten or resumed), and rank 0's journal.
    The caller holds the output's lock."""
    if not opts.overwrite and out.is_dir():
        outdir.refuse_linked_folders(out)
    resuming = resume.check_output(out, identity, opts.overwrite)  # refuses another conversion's folder
    ckpt = _ready_output(out, opts.overwrite, resume=resuming)
    if resuming:  # nothing may look complete while a resumed run works
        resume.uncommit(commit_markers(out))
    resume.set_world(out, ckpt, world)  # written by another number of ranks: its committed files only
    return resume.Journal(out, identity, resume.journal_name(0, world))


def hf2mcore(hf_model: str, megatron_path: str | Path, opts: Options, job=None) -> dict:
    """Convert; returns the summary (``runtime/report.py``). ``job``: this process's place in a distributed
    run (``dist.Job``), or None alone."""
    out = Path(megatron_path).expanduser()
    rank, world = dist.place(job)
    quiet = opts.quiet or rank != 0
    if opts.recheck and not opts.chunk_journal:
        raise UsageError("--recheck compares each kept chunk with its journaled CRC-32, which --no-staging does "
                         "not keep; drop one of them")
    check_budget(opts.max_memory, quiet=quiet)
    if job is not None and opts.zarr_view:
        raise UsageError("--keep-staging is not available in a distributed run; run it in one process")
    s = dist.set_up(job, lambda: _setup(hf_model, out, opts), lambda s: (s.identity, str(out.resolve())),
                    lambda s: s.source.close(), "another input, output folder or plan")
    plan = s.plan
    status(f"planned {len(plan.targets)} tensors in {len(plan.chunks)} chunks, {fmt_bytes(plan.total_bytes)} "
           f"into {plan.num_files + 1} files" + (f" on {world} processes" if world > 1 else ""), quiet)
    parts = dist.split(plan.file_bytes(), world)
    note = dist.idle_note(parts, ".distcp file", "--distcp-size", plan.total_bytes)
    if note:
        status(note, quiet)
    try:
        with outdir.job_lock(out, job):  # one writer: from the identity check to the tracker
            t0 = time.perf_counter()  # the conversion's own work: resume checks, engine, commit
            sink = _open_sink(out, s, opts, job, parts[rank], quiet)
            try:
                figures, entries = _convert(s, sink, opts, job, parts[rank], quiet, t0)
                _commit(out, s, sink, entries, hf_model, job, quiet)
                seconds = time.perf_counter() - t0
            except BaseException:
                sink.abort()
                raise
    finally:
        s.source.close()
    summary = report.summarize(
        "hf2mcore", figures, seconds, processes=world if job is not None else None,
        summed=tuple(sink.report), input=f"{s.hub.repo_id}@{s.hub.sha} (over HTTP)" if s.hub else str(s.folder),
        output=str(out), architecture=s.spec.architecture,
        layers=s.spec.num_layers, tensors=len(plan.targets), files=plan.num_files + 1,
        max_memory_bytes=opts.max_memory, chunk_bytes=plan.chunk_bytes, workers=opts.workers, device=opts.device,
        staging=opts.chunk_journal)
    if s.unused:
        summary["left_out"] = s.unused  # never silently: every source tensor not converted, by name
    if s.source.quant is not None:
        summary["quantization"] = s.source.quant.as_dict()
    if s.hub is not None:
        st = s.source.stats
        summary["hub"] = {"repo": s.hub.repo_id, "revision": s.hub.revision, "sha": s.hub.sha,
                          "bytes_fetched": st.bytes_fetched, "requests": st.requests, "retries": st.retries,
                          "connections": opts.connections, "revision_now_at": s.moved,
                          **{k: v for k, v in (s.checked or {}).items() if k != "mismatched"}}
    return summary


def _open_sink(out: Path, s: _Setup, opts: Options, job, mine: set, quiet: bool) -> TorchDistSink:
    """The output folder prepared (rank 0) and this rank's sink on it, with what an earlier run left kept."""
    rank, world = dist.place(job)
    journal = job.on_rank0(lambda: _prepare(out, s.identity, opts, world)) if job is not None else \
        _prepare(out, s.identity, opts, world)
    if job is not None:
        job.same_folder(out, JOB_TOKEN_FILE, "--megatron-path")
    if rank != 0:
        journal = resume.Journal(out, s.identity, resume.journal_name(rank, world))
    view = None
    try:
        if opts.zarr_view:
            from streamconv.sinks.zarr_view import ZarrView

            view = ZarrView(journal.dir / ZARR_VIEW, s.plan)  # fsynced whole at the end
            view.check_raw(s.plan)
        sink = TorchDistSink(out / ITER_DIR, s.plan, journal, chunk_journal=opts.chunk_journal, view=view, files=mine,
                             leader=rank == 0)
    except BaseException:
        journal.close()
        raise
    if sink.report["files_resumed"] or sink.report["chunks_kept"]:
        status(f"resuming: {sink.report['files_resumed']} files and {sink.report['chunks_kept']} more chunks "
               "kept from the last run", quiet)
    return sink


def _convert(s: _Setup, sink: TorchDistSink, opts: Options, job, mine: set, quiet: bool, t0: float):
    """This rank's files through the engine (after ``--recheck``); returns every rank's figures and the
    items of every rank's files (gathered by ``hb.finish``), which rank 0 commits."""
    rank, world = dist.place(job)
    plan = s.plan.part(mine)
    cpu0 = rss.cpu_seconds()
    progress = make_progress(quiet, "hf2mcore", s.plan.total_bytes, len(s.plan.chunks), opts.max_memory,
                             plan=s.plan if job is None else None,
                             source_line=_network_line(s.source.stats, opts.connections) if s.hub else None)
    rss.reset_peak()  # the conversion's own peak, apart from start-up (imports, planning)
    crashpoints.pause("work")
    with progress, job.heartbeat(dist.job_progress(progress, world)) if job else nullcontext() as hb:
        if opts.recheck:
            _recheck(plan, s.source, sink, opts, quiet)
        stats = runner.run(plan, s.source, sink, max_memory=opts.max_memory,
                           workers=opts.connections if s.hub is not None else opts.workers,
                           device=opts.device, progress=dist.Counting(progress, hb) if hb else progress, skip=sink.skip)
        entries = sink.finish_files()
        mine_figures = report.rank_figures(rank, stats, time.perf_counter() - t0, rss.cpu_seconds() - cpu0,
                                           **sink.report)
        ranks = [{"entries": entries, "figures": mine_figures}]
        if hb is not None:
            ranks = hb.finish(ranks[0])
    return [r["figures"] for r in ranks], {f: items for r in ranks for f, items in r["entries"].items()}


def _commit(out: Path, s: _Setup, sink: TorchDistSink, entries: dict, hf_model: str, job, quiet: bool) -> None:
    """Rank 0: Bridge's files, ``.metadata`` (the sink), then the tracker; the other ranks close their sinks."""
    def commit() -> None:
        if s.hub is None:  # (a hub commit does not change)
            resume.check_unchanged(s.folder, s.source.files(), s.identity)
        else:
            s.checked = _check_hub_hashes(s, sink, quiet)
        write_bridge_files(s.folder, out, out / ITER_DIR, s.spec, s.plan, hf_model)
        sink.commit(entries)
        try:  # what Bridge / Megatron-LM look for in <out> comes after .metadata: never before
            fsync_write(out / run_config.LATEST_TRAIN_STATE_FILE,
                        (out / ITER_DIR / run_config.TRAIN_STATE_FILE).read_bytes())
            fsync_write(out / TRACKER_FILE, run_config.tracker_text(0).encode())
        except BaseException:  # a folder that is not all there must not look complete
            resume.uncommit(commit_markers(out))
            raise

    if job is None:
        commit()
    else:
        job.on_rank0(commit)
        if job.rank != 0:
            sink.commit({})


def _network_line(stats, connections: int):
    """The progress display's words on a Hub source: bytes fetched, connections, retries."""
    return lambda: (f"net {fmt_bytes(stats.bytes_fetched)}, {connections} conns"
                    + (f", {stats.retries} retries" if stats.retries else ""))


def _check_hub_hashes(s: _Setup, sink: TorchDistSink, quiet: bool) -> dict:
    """Before the commit: every shard the Hub sent, hashed and compared with its SHA-256 (``HubSource.check_hashes``:
    the bytes from the output where they were copied unchanged). A shard that differs: the ``.distcp`` files made
    from it are removed (no later run keeps them) and nothing is committed."""
    import os

    from streamconv.errors import BadInputError
    from streamconv.formats.names import distcp_name

    status(f"checking {len(s.source.files())} shards against the SHA-256 the Hub records", quiet)
    found = s.source.check_hashes(s.plan, lambda c: sink.item_bytes(c)[:2], workers=2)
    if found["mismatched"]:
        bad = set(found["mismatched"])
        files = sorted({c.file for c in s.plan.chunks if any(s.source.info(r.name).path.name in bad for r in c.reads)})
        for f in files:
            try:
                os.unlink(sink.ckpt / distcp_name(f))
            except FileNotFoundError:
                pass
        raise BadInputError(f"{s.hub.repo_id}@{s.hub.sha[:12]}: {found['mismatched'][0]}: the bytes the Hub sent do "
                            f"not match the SHA-256 it records for the file ({len(bad)} shard(s)); the {len(files)} "
                            ".distcp files made from them were removed and nothing was committed: run the same "
                            "command again")
    return found


def _recheck(plan: Plan, source, sink, opts: Options, quiet: bool) -> None:
    """``--recheck``, before the run goes on: the kept output read back and compared with the journal (a chunk
    that differs is done again), then the kept chunks' sources converted again and compared with the journal
    (a change is refused). The counts go to the summary with the sink's report."""
    from streamconv.sinks.compare import recheck_kept

    kept = sink.report["files_resumed"] + sink.report["chunks_kept"]
    if kept:
        status("rechecking the kept output against the journal", quiet)
    found = sink.recheck_output(opts.workers)
    sink.report.update(found)
    if found["output_chunks_redone"]:
        status(f"{found['output_chunks_redone']} kept chunks differ from what was journaled (changed on disk since "
               "they were written): converting them again", quiet)
    expected = sink.kept_crcs()
    if expected:
        status(f"rechecking the source of {len(expected)} kept chunks", quiet)
    chunks, nbytes = recheck_kept(plan, source, expected, max_memory=opts.max_memory, workers=opts.workers)
    if chunks:
        status(f"rechecked the source of {chunks} kept chunks ({fmt_bytes(nbytes)}): unchanged", quiet)
    sink.report["rechecked_chunks"], sink.report["rechecked_bytes"] = chunks, nbytes


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
        (ckpt / TOKENIZER_DIR).mkdir(exist_ok=True)
        for name in present:
            fsync_write(ckpt / TOKENIZER_DIR / name, (folder / name).read_bytes())


def train_state_bytes(step: int = 0) -> bytes:
    """``train_state.pt``: ``torch.save`` of Bridge's dict of 0-d tensors (``formats/torch_save.py``)."""
    import struct

    from streamconv.formats import torch_save

    state = run_config.train_state_tensors(step)
    refs = {k: torch_save.TensorRef((), dtypes.of(d)) for k, (_, d) in state.items()}
    packing = {"int64": "<q", "float32": "<f", "bool": "<?"}
    return torch_save.save_bytes(refs, [struct.pack(packing[d], v) for v, d in state.values()])


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
