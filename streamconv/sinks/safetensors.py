"""The engine's sink for mcore2hf: plan chunks -> HF safetensors shards + ``model.safetensors.index.json``.

Shards are named as ``save_pretrained`` names them (``model-00001-of-00003.safetensors``; a single shard is
``model.safetensors`` with no index). ``SafetensorsSink`` places every chunk in its shard (the engine's direct
path), journals it and commits each shard when full; resume keeps complete shards and journaled chunks.
``ShardWriter`` writes one shard tensor by tensor, in order (``synth`` and tests make checkpoints with it).
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

from streamconv import crashpoints
from streamconv.dtypes import DType
from streamconv.engine.contracts import Placement, PlacingSink
from streamconv.errors import BadInputError, output_error
from streamconv.files.atomic import NOFOLLOW, PartialFile, commit, create_temporary, fsync_write
from streamconv.files.checksum import crc32, crc32_range
from streamconv.files.fileio import pwrite_all
from streamconv.files.pagecache import WriteBehind
from streamconv.formats.names import INDEX_FILE
from streamconv.formats.safetensors import encode_header, itemsize, read_header
from streamconv.runtime import resume
from streamconv.sinks.committer import Committer
from streamconv.sinks.kept import keep_journaled, redo_bad_chunks

SHARD_METADATA = {"format": "pt"}


def shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def shard_entries(plan) -> list[list[tuple]]:
    """Per shard, its ``(name, dtype, shape)`` entries in plan order."""
    out: list[list[tuple]] = [[] for _ in range(plan.num_files)]
    seen: set[str] = set()
    for c in plan.chunks:
        if c.key not in seen:
            seen.add(c.key)
            t = plan.targets[c.key]
            out[c.file].append((t.key, t.dtype, tuple(t.shape)))
    return out


def shard_complete(path: Path, entries: list[tuple]) -> bool:
    """Whether ``path`` is a finished shard holding exactly ``entries`` (names, dtypes, shapes, in order)."""
    if not path.is_file():
        return False
    try:
        infos = read_header(path)
    except BadInputError:
        return False
    stored = sorted(((i.start, i.name, i.dtype, i.shape) for i in infos.values()), key=lambda x: x[0])
    return [(n, d, s) for _, n, d, s in stored] == [(n, d, tuple(s)) for n, d, s in entries]


def write_index(folder: Path, plan) -> None:
    """``model.safetensors.index.json`` (HF's format: ``metadata.total_size`` + sorted ``weight_map``);
    none for a single shard, as ``save_pretrained``."""
    n = plan.num_files
    if n <= 1:
        return
    weight_map = {c.key: shard_name(c.file, n) for c in plan.chunks}
    index = {"metadata": {"total_size": sum(t.nbytes for t in plan.targets.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    fsync_write(folder / INDEX_FILE, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())


def shard_layout(plan, entries: list[list[tuple]]) -> tuple[dict[int, bytes], dict[tuple, int], dict[int, int]]:
    """Where every chunk of an export plan lies, fixed before a byte is read (``entries``: ``shard_entries``):
    each shard's header bytes, each chunk's byte offset in its shard (``{(key, offsets): offset}``: header,
    then the tensors back to back in plan order, a chunk's rows at their place in its tensor) and each shard's
    size."""
    headers = {f: encode_header(entries[f], SHARD_METADATA) for f in range(plan.num_files)}
    starts: dict[str, int] = {}
    sizes: dict[int, int] = {}
    for f, shard in enumerate(entries):
        at = len(headers[f])
        for name, dtype, shape in shard:
            starts[name] = at
            at += math.prod(shape) * itemsize(dtype)
        sizes[f] = at
    slots = {}
    for c in plan.chunks:
        t = plan.targets[c.key]
        slots[c.id] = starts[c.key] + c.offsets[0] * math.prod(t.shape[1:]) * t.dtype.itemsize if t.shape else \
            starts[c.key]
    return headers, slots, sizes


class SafetensorsSink(PlacingSink):
    """Places the chunks of an export plan in its shards (``files``: the shards this process writes).

    Every shard's layout is fixed by the plan (``shard_layout``): a shard is created under ``.partial`` with
    its header written and its size reserved, and each chunk's bytes go straight to their place
    (``place``; the engine's direct path writes them, ``write`` does it from a tensor on the buffered path).
    A placed chunk is made durable and journaled (``committer.py``: ``fdatasync``, then its record with its
    CRC-32); a shard whose chunks are all in is fsynced and renamed to its final name, so a shard under its
    final name is complete.

    Resume (``resume.Journal``, in ``<hf-path>/.streamconv``): a shard already under its final name whose
    header lists exactly the planned tensors is kept (``shard_complete``); in a ``.partial`` shard of the
    planned size and header, created with the same chunking (its ``open`` record's ``chunk_bytes``: a re-run
    may pass another ``--max-memory``), every chunk journaled since the shard was created is kept without being
    read again; the rest is written.
    """

    def __init__(self, folder: Path, plan, journal, files=None):
        self.folder = Path(folder)
        self.plan = plan
        self.journal = journal
        self.entries = shard_entries(plan)
        self.headers, self.slots, self.sizes = shard_layout(plan, self.entries)
        self.by_file = plan.by_file()
        self.mine = set(self.by_file) if files is None else set(files)
        self.report = {"shards_skipped": 0, "chunks_kept": 0}
        self.done: set[tuple] = set()  # chunks kept in a ``.partial`` shard
        self.committed = {f for f in self.mine if shard_complete(self._path(f), self.entries[f])}
        self.report["shards_skipped"] = len(self.committed)
        self._open: dict[int, PartialFile] = {}
        self._left = {f: len(self.by_file[f]) for f in self.mine if f not in self.committed}
        self._lock = threading.Lock()
        crashpoints.started()
        records = journal.records()
        self._journaled = resume.journaled_crcs(records)
        self._resume_partials(records)
        self._committer = Committer(journal, self._done)

    def _path(self, f: int) -> Path:
        return self.folder / shard_name(f, self.plan.num_files)

    def _resume_partials(self, records) -> None:
        """Keep each ``.partial`` shard of this plan's layout (header and size) with its journaled chunks; a
        chunk's record is written only once its bytes are on disk, so a record that survived a crash names a
        chunk that did. Any other ``.partial`` of this process's shards is removed."""
        recs = resume.chunks_of_last_open(records, {c.id: c.file for c in self.plan.chunks})
        opened = {r.get("file"): r for r in records if r.get("t") == "open"}  # each shard's last
        for f in sorted(self.mine):
            tmp = self._path(f).with_name(self._path(f).name + ".partial")
            same_chunks = opened.get(f, {}).get("chunk_bytes") == self.plan.chunk_bytes  # (--max-memory may differ)
            if f not in self.committed and tmp.is_file() and not tmp.is_symlink() and same_chunks and \
                    self._laid_out(tmp, f):
                self._shard(f, fresh=False)
                keep_journaled(self, f, recs)
                if self._left[f] == 0:
                    self._commit_shard(f)
            elif tmp.is_symlink() or tmp.exists():
                try:
                    tmp.unlink()
                except OSError as e:
                    raise output_error(tmp, e) from e

    def _laid_out(self, tmp: Path, f: int) -> bool:
        """Whether ``tmp`` has shard ``f``'s planned header and size."""
        header = self.headers[f]
        try:
            with open(tmp, "rb") as fh:
                return os.fstat(fh.fileno()).st_size == self.sizes[f] and fh.read(len(header)) == header
        except OSError:
            return False

    def recheck_output(self, workers: int = 1) -> dict:
        """``--recheck``: read back every chunk this run keeps (in a complete shard or a ``.partial`` one) and
        compare its CRC-32 with the journal's. A chunk that differs (a byte changed on disk, a forged or missing
        record) is written again: in a ``.partial`` shard the chunk alone (a ``redo`` record voids its old one),
        in a complete shard the whole shard (removed first, so no later run keeps it). Returns
        ``{"output_rechecked_chunks", "output_rechecked_bytes", "output_chunks_redone"}``."""
        from concurrent.futures import ThreadPoolExecutor

        jobs = [(f, self._path(f), self.by_file[f]) for f in sorted(self.committed)]
        jobs += [(f, opened.tmp, [c for c in self.by_file[f] if c.id in self.done])
                 for f, opened in sorted(self._open.items())]
        with ThreadPoolExecutor(max(1, min(workers, len(jobs) or 1)), thread_name_prefix="streamconv-recheck") as pool:
            found = list(pool.map(lambda job: self._reread(job[1], job[2]), jobs))
        redone = redo_bad_chunks(self, [(f, path, bad) for (f, path, _), bad in zip(jobs, found)],
                                 self.committed.discard, "shards_skipped")
        return {"output_rechecked_chunks": sum(len(chunks) for _, _, chunks in jobs),
                "output_rechecked_bytes": sum(c.nbytes for _, _, chunks in jobs for c in chunks),
                "output_chunks_redone": redone}

    def _reread(self, path: Path, chunks) -> list:
        """The ``chunks`` at ``path`` whose bytes' CRC-32 is not the journaled one."""
        bad, buf = [], memoryview(bytearray(1 << 20))
        try:
            fd = os.open(path, os.O_RDONLY | NOFOLLOW)
        except OSError as e:
            raise output_error(path, e) from e
        try:
            for c in chunks:
                crc, got = crc32_range(fd, self.slots[c.id], c.nbytes, buf)
                if got < c.nbytes or self._journaled.get(c.id) != crc:
                    bad.append(c)
        except OSError as e:
            raise output_error(path, e) from e
        finally:
            os.close(fd)
        return bad

    def kept_crcs(self) -> dict[tuple, int]:
        """``{(key, offsets): CRC-32}`` of the chunks this run keeps, as journaled (``compare.recheck_kept``)."""
        return {c.id: self._journaled[c.id] for f in sorted(self.mine) for c in self.by_file[f]
                if self.skip(c) and c.id in self._journaled}

    def skip(self, chunk) -> bool:
        """Whether ``chunk`` is already in place (its shard complete, or journaled in its ``.partial``)."""
        return chunk.file in self.committed or chunk.id in self.done

    def _shard(self, f: int, fresh: bool = True) -> PartialFile:
        with self._lock:
            opened = self._open.get(f)
            if opened is None:
                if fresh:  # the chunk records of any earlier file of this name are void
                    self.journal.append({"t": "open", "file": f, "chunk_bytes": self.plan.chunk_bytes}, sync=True)
                opened = self._open[f] = PartialFile(self._path(f), self.sizes[f], fresh, head=self.headers[f])
            return opened

    def place(self, chunk) -> Placement:
        opened = self._shard(chunk.file)
        return Placement(opened.fd, self.slots[chunk.id], opened.tmp)

    def placed(self, chunk, place: Placement, crc: int) -> None:
        self._committer.check()
        self._committer.put(chunk, place, crc)

    def write_overhead(self, chunk) -> int:
        """Bytes ``write`` allocates beyond the tensor it is given: none (its memory is written as is)."""
        return 0

    def write(self, chunk, tensor) -> None:
        """A chunk held in memory (the buffered engine path: ``--device cuda``, a checkpoint of unusual items)."""
        import torch

        t = tensor.detach().contiguous().cpu()
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        if len(data) != chunk.nbytes:
            raise ValueError(f"{chunk.key} {list(chunk.offsets)}: {len(data)} bytes, the plan has {chunk.nbytes}")
        place = self.place(chunk)
        try:
            pwrite_all(place.fd, data, place.offset)
        except OSError as e:
            raise output_error(place.path, e) from e
        self.placed(chunk, place, crc32(data))

    def _done(self, chunk) -> None:
        crashpoints.pause("chunk")
        with self._lock:
            self._left[chunk.file] -= 1
            full = self._left[chunk.file] == 0
        if full:
            self._commit_shard(chunk.file)

    def _commit_shard(self, f: int) -> None:
        with self._lock:
            opened = self._open.pop(f)
        opened.commit()
        with self._lock:
            self.committed.add(f)

    def close(self) -> None:
        """Wait for this process's shards to be committed (the caller writes the index last: ``write_index``)."""
        self._committer.stop()
        missing = sorted(self.mine - self.committed)
        if missing:
            raise RuntimeError(f"shards {missing} were never completed")
        self.journal.close()

    def abort(self) -> None:
        """Close what is open; ``.partial`` shards stay for the next run (which checks them)."""
        self._committer.abort()
        with self._lock:
            for opened in self._open.values():
                opened.close()
            self._open.clear()
        self.journal.close()


class ShardWriter:
    """Writes one safetensors shard tensor by tensor, in the order of ``entries``.

    The file is written under ``<name>.partial``, fsynced and renamed on ``close()``, so a shard that
    exists under its final name is always complete. Written behind (``pagecache.WriteBehind``).
    """

    def __init__(self, path: Path | str, entries: list[tuple[str, DType, tuple[int, ...]]], metadata=None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.entries = list(entries)
        self._next = 0
        self._pending = 0  # bytes still owed for the current tensor
        try:
            self.f = create_temporary(self.tmp)
            self.f.write(encode_header(self.entries, metadata))
        except OSError as e:
            raise output_error(self.tmp, e) from e
        self.behind = WriteBehind(self.f.fileno())

    def write(self, name: str, tensor) -> None:
        """Write the next tensor whole, or in row blocks: call repeatedly until its rows are complete."""
        import torch

        exp_name, dtype, shape = self.entries[self._next]
        if name != exp_name:
            raise ValueError(f"expected tensor {exp_name!r} next, got {name!r}")
        if tensor.dtype != dtype:
            raise ValueError(f"{name}: dtype {tensor.dtype} != {dtype}")
        if self._pending == 0:
            self._pending = math.prod(shape) * itemsize(dtype)
            if self._pending == 0:  # an empty tensor has no bytes to write
                self._next += 1
                return
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes > self._pending:
            raise ValueError(f"{name}: more data than its shape {list(shape)} holds")
        try:
            self.f.write(memoryview(data))
            self.f.flush()
            self.behind.wrote(self.f.tell())
        except OSError as e:
            raise output_error(self.tmp, e) from e
        self._pending -= data.nbytes
        if self._pending == 0:
            self._next += 1

    def close(self) -> None:
        if self._next != len(self.entries):
            raise ValueError(f"{self.path}: {len(self.entries) - self._next} tensors were not written")
        commit(self.f, self.tmp, self.path, drop_cache=True)
