"""Resume: what a conversion's output folder remembers about itself, and whether a re-run may continue it.

``<megatron-path>/.streamconv/`` holds:
- ``identity.json``: what the output is made from, written before any data: the input's identity (each
  source file's name, size, mtime, ctime, inode and a hash of its safetensors header; hashes of ``config.json`` and the
  index) and the settings that change output bytes (dtype, chunk size, file size, a digest of the plan).
- ``journal.jsonl`` (``journal.rank<R>.jsonl``, one per rank, in a distributed run of ``world`` ranks; the
  world size in ``world``): an append-only record of what is done, one JSON object per line: ``chunk`` (a chunk's
  bytes and framing written in its ``.distcp.partial``, with its CRC-32), ``file`` (a ``.distcp`` committed
  under its final name: size and the items it holds), ``done``.
  A torn last line (a kill mid-append) is ignored: it only loses a record, and what it described is redone.
- ``staging.zarr``: with ``--keep-staging``, a Zarr v3 view of the model (``sinks/zarr_view.py``).

A re-run keeps committed ``.distcp`` files whose record names the plan's own items (``committed_files``) and,
by default, every journaled chunk of a ``.partial`` file, without reading either back; ``--recheck`` reads them
back against their journaled CRC-32 and redoes what differs (``sinks/torch_dist.py``; a ``redo`` record voids
a chunk's record). What a plain resume trusts is listed in docs/resume.md. A re-run with another
number of ranks keeps the committed files only (``set_world``: the journals are compacted to their file
records and the ``.partial`` files removed), since a file's chunks may then be another rank's.

The same command on the same folder resumes; a different input or output-changing setting is refused with
a one-line error naming what differs; ``--overwrite`` starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from streamconv.errors import OutputError, output_error
from streamconv.files.atomic import NOFOLLOW, fsync_dir, fsync_write
from streamconv.formats.names import (EXPORT_MARKER, IDENTITY_FILE, INDEX_FILE, ITER_DIR, JOURNAL_FILE, LOCK_FILE,
                                      METADATA_FILE, STATE_DIR, WORLD_FILE, ZARR_VIEW, distcp_name)
from streamconv.runtime import outdir
FORMAT = 2  # bump when the journal or staging layout changes incompatibly


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    """A whole file's SHA-256, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _header_sha256(path: Path) -> str:
    """Hash of a safetensors file's length prefix and JSON header (cheap: never the data)."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        return _sha256(head + f.read(min(n, 100 * 1024**2)))


def input_identity(folder: Path, shard_paths) -> dict:
    """The input as a re-run sees it: shard names, sizes, mtimes, header hashes; config and index hashes."""
    files = []
    for path in sorted(set(Path(p) for p in shard_paths), key=lambda p: p.name):
        st = path.stat()
        files.append({"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                      "ctime_ns": st.st_ctime_ns, "inode": st.st_ino, "header_sha256": _header_sha256(path)})
    return {"files": files, **_json_hashes(folder)}


def _json_hashes(folder: Path) -> dict:
    extra = {}
    for name in ("config.json", "model.safetensors.index.json", "hf_quant_config.json"):
        p = folder / name
        if p.is_file():
            extra[name] = _sha256(p.read_bytes())
    return {"json_sha256": extra}


def check_unchanged(folder: Path, shard_paths, identity: dict) -> None:
    """Before the commit: the input is still what the run started from (a shard rewritten in place while it
    was read, even with its size and header kept, has a new mtime and ctime); else ``BadInputError`` and
    nothing is committed."""
    from streamconv.errors import BadInputError

    try:
        now = dict(identity, input=input_identity(folder, shard_paths))
    except OSError as e:
        raise BadInputError(f"{folder}: changed during the conversion ({e.strerror or e}); nothing was committed: "
                            "run again with --overwrite once the model is complete") from None
    diff = describe_difference(identity, now)
    if diff is not None:
        detail = diff[diff.find("(") + 1:-1] if diff.endswith(")") else diff
        raise BadInputError(f"{folder}: the input changed during the conversion ({detail}); nothing was committed: "
                            "run again with --overwrite once the model no longer changes")


def plan_digest(plan) -> str:
    """A digest of everything in the plan that decides output bytes (chunks, files, dtypes, objects)."""
    h = hashlib.sha256()
    for key, t in plan.targets.items():
        h.update(f"T{key}|{t.shape}|{t.dtype}\n".encode())
    for c in plan.chunks:
        h.update(f"C{c.key}|{c.offsets}|{c.sizes}|{c.file}|{c.reads}\n".encode())
    for key in plan.objects:
        h.update(f"O{key}\n".encode())
    return h.hexdigest()


def make_identity(folder: Path, shard_paths, plan, *, dtype: str | None, file_bytes: int | None,
                  staging: bool, hub: dict | None = None) -> dict:
    """``hub``: a Hub model's identity (``sources/hub.HubModel.identity``: repository, pinned commit, files),
    which stands for the shards' (read over HTTP, never stat'ed)."""
    return {
        "format": FORMAT,
        "input": input_identity(folder, shard_paths) if hub is None else {"hub": hub, **_json_hashes(folder)},
        "settings": {"dtype": dtype or "auto", "chunk_bytes": plan.chunk_bytes, "file_bytes": file_bytes,
                     "plan_sha256": plan_digest(plan)},
        "staging": staging,
    }


def _fmt(n) -> str:
    from streamconv.units import fmt_bytes

    return fmt_bytes(n) if isinstance(n, int) else str(n)


def describe_difference(old: dict, new: dict) -> str | None:
    """What differs between the identity an output was started with and this run's; None if resumable."""
    if old.get("format") != new["format"]:
        return "it was written by another streamconv version"
    oi, ni = old.get("input", {}), new["input"]
    if oi != ni and ("hub" in oi or "hub" in ni):
        oh, nh = oi.get("hub") or {}, ni.get("hub") or {}
        if oh.get("hub") != nh.get("hub"):
            return f"it was made from a different input ({oh.get('hub') or 'a local folder'})"
        if oh.get("sha") != nh.get("sha"):
            return (f"it was made from commit {str(oh.get('sha'))[:12]} of {nh.get('hub')}, this run reads "
                    f"{str(nh.get('sha'))[:12]} (pass --revision {oh.get('sha')} to finish it)")
        return "it was made from a different input (the Hub's files or config.json differ)"
    if oi != ni:
        ofiles = {f["name"]: f for f in oi.get("files", [])}
        nfiles = {f["name"]: f for f in ni["files"]}
        for name in sorted(set(ofiles) | set(nfiles)):
            if name not in nfiles:
                return f"it was made from a different input (had {name}, which this input lacks)"
            if name not in ofiles:
                return f"it was made from a different input (it had no {name})"
            a, b = ofiles[name], nfiles[name]
            for field, what in (("header_sha256", "tensor header"), ("size", "size"), ("mtime_ns", "modification time"),
                                ("inode", "file (another inode: replaced or copied)"),
                                ("ctime_ns", "status-change time: its bytes or metadata were touched")):
                if a.get(field) != b.get(field):
                    return f"it was made from a different input ({name}: {what} differs)"
        for name in sorted(set(oi.get("json_sha256", {})) | set(ni["json_sha256"])):
            if oi.get("json_sha256", {}).get(name) != ni["json_sha256"].get(name):
                return f"it was made from a different input ({name} differs)"
        return "it was made from a different input"
    os_, ns = old.get("settings", {}), new["settings"]
    if os_.get("dtype") != ns["dtype"]:
        return f"it was started with --dtype {os_.get('dtype')}, this run has --dtype {ns['dtype']}"
    if os_.get("chunk_bytes") != ns["chunk_bytes"]:
        return (f"it was started with {_fmt(os_.get('chunk_bytes'))} chunks, this run's --max-memory gives "
                f"{_fmt(ns['chunk_bytes'])} chunks (use the --max-memory of the first run)")
    if os_.get("file_bytes") != ns["file_bytes"]:
        return f"it was started with --distcp-size {_fmt(os_.get('file_bytes'))}, this run has {_fmt(ns['file_bytes'])}"
    if os_.get("plan_sha256") != ns["plan_sha256"]:
        return "its conversion plan differs from this run's (another streamconv version or mapping)"
    if old.get("staging") != new["staging"]:
        if new["staging"]:
            return "it was started with --no-staging; resume it with --no-staging"
        return "it was started with staging; resume it without --no-staging"
    return None


def _only_empty_folders(out: Path) -> bool:
    """Nothing but empty folders (and the output's lock file)."""
    return not any((p.is_file() or p.is_symlink()) and p.name != LOCK_FILE for p in out.rglob("*"))


def check_output(out: Path, identity: dict, overwrite: bool) -> bool:
    """Whether ``out`` may be used as is (a resumable run of this same conversion, or our own empty
    leftovers); False for a fresh or to-be-overwritten folder. Refuses a folder from another conversion."""
    if overwrite or not out.is_dir():
        return False
    path = out / STATE_DIR / IDENTITY_FILE
    if not path.is_file():
        return _only_empty_folders(out)  # e.g. killed before identity.json: nothing of value there
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OutputError(f"{path}: unreadable ({e}); pass --overwrite to start over") from None
    diff = describe_difference(old, identity)
    if diff is not None:
        if (out / ITER_DIR / METADATA_FILE).is_file():  # not a run to resume: a finished checkpoint
            raise OutputError(f"{out}: holds a finished conversion that is not this one ({diff.removeprefix('it ')}); "
                              "pass --overwrite to replace it, or choose another --megatron-path")
        raise OutputError(f"{out}: cannot resume: {diff}; pass --overwrite to start over, or choose another "
                          "--megatron-path")
    return True


def export_identity(ckpt: Path, shards: list[list[tuple]]) -> dict:
    """What an export (mcore2hf) is made of, ``make_identity``'s twin: a re-run resumes only when this is
    unchanged (the memory budget, and so the chunking, may differ: the shards' bytes do not depend on it).
    ``shards``: each shard's ``(name, dtype, shape)`` entries."""
    meta = ckpt / METADATA_FILE
    st = meta.stat()
    entries = [[(n, str(d), list(s)) for n, d, s in shard] for shard in shards]
    return {
        "format": 1,
        "checkpoint": str(ckpt.resolve()),
        "metadata": {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _file_sha256(meta)},
        "shards": _sha256(json.dumps(entries).encode()),
    }


def ready_export(out: Path, identity: dict, overwrite: bool) -> bool:
    """``check_output``'s twin for an export: create ``out`` (or resume in it, its ``EXPORT_MARKER`` naming
    this same export); returns True when resuming. The caller holds the lock and has refused an ``out`` that
    overlaps the input (``outdir.refuse_overlap``). The marker is removed when the export is committed."""
    marker = out / EXPORT_MARKER
    resuming = False
    if out.is_dir() and not overwrite:
        outdir.refuse_linked_folders(out)
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
            resuming = True
        else:
            raise OutputError(f"{out}: output folder is not empty; choose another --hf-path or pass --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(out, e) from e
    if not resuming:
        fsync_write(marker, json.dumps(identity, indent=2).encode())
    return resuming


def uncommit(paths) -> None:
    """Remove a previous run's commit markers (tracker, ``.metadata``) before resuming, durably, so the
    folder never looks complete while the resumed run works; they are written again at its end."""
    parents = set()
    for p in map(Path, paths):
        try:
            p.unlink()
            parents.add(p.parent)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise output_error(p, e) from e
    for d in parents:
        fsync_dir(d)


def journal_name(rank: int = 0, world: int = 1) -> str:
    return JOURNAL_FILE if world == 1 else f"journal.rank{rank}.jsonl"


def _journals(state_dir: Path) -> list[Path]:
    return sorted(p for p in Path(state_dir).glob("journal*.jsonl") if p.is_file() and not p.is_symlink())


def read_records(path: Path) -> list[dict]:
    """Every complete record of one journal file, oldest first (a torn or garbled line is skipped)."""
    out = []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return out
    for line in data.split(b"\n"):
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "t" in rec:
            out.append(rec)
    return out


def set_world(out: Path, ckpt: Path, world: int) -> bool:
    """Before the ranks open their journals (rank 0, holding the lock): if the journals were written by
    another number of ranks, keep only their ``file`` records and, for ``--recheck``, the ``chunk`` records
    (CRC-32) of those committed files' chunks, in this world's rank-0 journal, and remove every ``.partial``
    file. Returns whether it compacted."""
    state = Path(out) / STATE_DIR
    path = state / WORLD_FILE
    try:
        before = int(path.read_text()) if path.is_file() else 1
    except (OSError, ValueError):
        before = -1
    if before == world:
        return False
    try:
        state.mkdir(parents=True, exist_ok=True)
        kept = []
        for p in _journals(state):  # a file's chunk records are in the journal of the rank that committed it
            records = read_records(p)
            files = [r for r in records if r.get("t") == "file"]
            in_files = {(k, tuple(o)) for r in files for k, o, *_ in r["items"]}
            kept += [r for r in records if r.get("t") == "chunk" and (r["key"], tuple(r["offsets"])) in in_files]
            kept += files
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept).encode()
        fsync_write(state / journal_name(0, world), text)
        for p in _journals(state):
            if p.name != journal_name(0, world):
                p.unlink()
        for p in Path(ckpt).glob("*.partial"):
            p.unlink()
        fsync_write(path, str(world).encode())
    except OSError as e:
        raise output_error(state, e) from e
    return True


class Journal:
    """``<out>/.streamconv``: the identity and the append-only journal of a conversion (``name``: this
    rank's journal file; ``records`` reads every rank's)."""

    def __init__(self, out: Path, identity: dict, name: str = JOURNAL_FILE):
        self.dir = Path(out) / STATE_DIR
        self.path = self.dir / name
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            ident = self.dir / IDENTITY_FILE
            if not ident.is_file():  # a fresh start: no records of another run may survive
                for p in _journals(self.dir):
                    p.unlink()
                fsync_write(ident, json.dumps(identity, indent=1).encode())
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o644)
        except OSError as e:
            raise output_error(self.dir, e) from e
        fsync_dir(self.dir)

    def records(self) -> list[dict]:
        """Every complete record of every rank's journal, each journal oldest first (a file is written by
        one rank in a given world, so its records are all in one journal, in order)."""
        return [r for p in _journals(self.dir) for r in read_records(p)]

    def append(self, record: dict, sync: bool = False) -> None:
        """One line, one ``write`` (O_APPEND); ``sync`` makes it (and all before it) durable."""
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        try:
            os.write(self.fd, line)
            if sync:
                os.fsync(self.fd)
        except OSError as e:
            raise output_error(self.path, e) from e

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise output_error(self.path, e) from e

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


LEFTOVER_PATTERNS = ("*.partial", "*.tmp", ".write-test")


def clean_leftovers(ckpt: Path, keep=(), patterns=LEFTOVER_PATTERNS) -> int:
    """Delete a killed run's temporary files (ours, and hf2mcore's write probe): never part of a
    checkpoint, except the names in ``keep`` (``.partial`` files whose journaled chunks resume). Returns how
    many were deleted."""
    n = 0
    for pattern in patterns:
        for p in Path(ckpt).glob(pattern):
            if p.name in keep and not p.is_symlink():
                continue
            p.unlink(missing_ok=True)
            n += 1
    return n




def drop_zarr_view(journal: "Journal") -> None:
    """Remove a ``--keep-staging`` view an earlier run of this output left (this run keeps none)."""
    import shutil

    shutil.rmtree(journal.dir / ZARR_VIEW, ignore_errors=True)


def chunks_of_last_open(records, file_of: dict) -> set:
    """The chunks journaled since their file's ``.partial`` was last created (an ``open`` record): the
    records of an earlier ``.partial`` of the same name, finished or thrown away since, do not count, nor
    does a chunk whose last record is a ``redo``."""
    live: dict[int, set] = {}
    for r in records:
        if r.get("t") == "open":
            live[r["file"]] = set()
        elif r.get("t") in ("chunk", "redo"):  # redo: --recheck found the chunk's kept bytes altered
            cid = (r["key"], tuple(r["offsets"]))
            if cid in file_of:
                (live.setdefault(file_of[cid], set()).add if r["t"] == "chunk" else
                 live.setdefault(file_of[cid], set()).discard)(cid)
    return set().union(*live.values()) if live else set()


def hub_commit(out: Path, repo_id: str) -> str | None:
    """The commit of hub model ``repo_id`` an interrupted conversion into ``out`` started from (its identity's
    ``input.hub.sha``), or None."""
    try:
        hub = json.loads((Path(out) / STATE_DIR / IDENTITY_FILE).read_text())["input"]["hub"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return hub.get("sha") if isinstance(hub, dict) and hub.get("hub") == repo_id else None


def journaled_crcs(records) -> dict[tuple, int]:
    """``{(key, offsets): CRC-32}`` of every ``chunk`` record (a chunk's last record wins)."""
    return {(r["key"], tuple(r["offsets"])): r["crc32"] for r in records if r.get("t") == "chunk"}


def file_record(file: int, path: Path, entries) -> dict:
    """The journal record of a committed ``.distcp`` file: its size and items ``(key, offsets, offset, length)``."""
    return {"t": "file", "file": file, "size": path.stat().st_size,
            "items": [[k, list(o), off, n] for k, o, off, n in entries]}


def committed_files(records, ckpt: Path, entries: dict) -> dict[int, list]:
    """The ``.distcp`` files an earlier run committed and that are still there as recorded: {file: items}.
    ``entries``: {file: [(key, offsets, offset, length)]} of this run's plan; a file whose recorded items or
    size are not those (another layout, a forged record) is redone."""

    done = {}
    for rec in records:
        if rec.get("t") != "file":
            continue
        f = rec.get("file")
        if not isinstance(f, int):
            continue
        try:
            items = [(k, tuple(o), off, n) for k, o, off, n in rec["items"]]
        except (TypeError, ValueError):
            continue
        if f not in entries or items != list(entries[f]):
            continue
        path = Path(ckpt) / distcp_name(f)
        if path.is_file() and not path.is_symlink() and path.stat().st_size == rec["size"] == \
                entries[f][-1][2] + entries[f][-1][3]:
            done[f] = items
    return done
