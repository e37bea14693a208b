"""Writing megatron-core ``torch_dist`` checkpoints, item by item.

Layout of a checkpoint folder (what megatron-core 0.16-0.19 ``dist_checkpointing.load`` reads):
- ``__0_{n}.distcp``: items appended back to back; a tensor item is one ``torch.save(tensor)`` archive
  whose shape equals its chunk's ``sizes``; an object item is ``torch.save([obj])`` bytes.
- ``.metadata``: pickled ``torch.distributed.checkpoint.metadata.Metadata`` (tensor and object
  metadata, and ``storage_data`` = where each item lives), written last: it is the commit.
- ``common.pt`` + 4-key ``metadata.json`` (0.16-0.18), and the same common state as the object
  ``common_state/shard_0_1`` (0.19).

Each ``.distcp`` is written under a temporary name, fsynced and renamed; ``.metadata`` likewise, last.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import torch

from streamconv import crashpoints, resume
from streamconv.errors import output_error
from streamconv.formats.atomic import commit, fsync_dir, fsync_write
from streamconv.pagecache import WriteBehind, copy_range

METADATA_JSON = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
COMMON_STATE = {
    "checkpoint_version": 3.0,
    "iteration": 0,
    "content_metadata": {"singleton_local_shards": False, "chained_optim_avoid_prefix": True},
}
COMMON_STATE_KEY = "common_state/shard_0_1"


def distcp_name(file: int) -> str:
    return f"__0_{file}.distcp"


def standalone(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor owning exactly its bytes: ``torch.save`` writes a view's whole base storage."""
    t = t.detach().cpu()
    if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size() \
            or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def object_item_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save([obj], buf)
    return buf.getvalue()


class _Framed:
    """The file object ``torch.save`` writes one tensor item to, under ``torch.serialization.skip_data``.

    With ``skip_data`` torch writes the archive's records and, where the storage's bytes belong, seeks
    over them (its documented way of leaving them to "a separate pass"). That seek is where ``fill(n)``
    writes them, straight into the file. ``error`` keeps the error (a failed write, a torn source) that
    torch turns into a RuntimeError of its own.
    """

    def __init__(self, f, fill):
        self.f, self.fill = f, fill
        self.error: BaseException | None = None
        self.data_end: int | None = None  # where the storage's bytes end

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def seek(self, n: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_CUR or self.data_end is not None:
            raise io.UnsupportedOperation("a tensor item has one storage, filled in place")
        try:
            self.fill(n)
        except BaseException as e:
            self.error = e
            raise
        self.data_end = self.f.tell()
        return self.data_end

    def flush(self) -> None:
        self.f.flush()


_CRC = struct.Struct("<I")
_U64 = (1 << 64) - 1


def _hash_combine(seed: int, value: int) -> int:
    """``c10::hash_combine`` on 64 bits: how torch folds each record's CRC-32 into the serialization id."""
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & _U64) + (seed >> 2)) & _U64)) & _U64


def _complete_item(fd: int, start: int, end: int, crc: int) -> None:
    """Make the archive at ``[start, end)``, framed under ``skip_data``, byte for byte what a plain
    ``torch.save`` writes: the storage record's CRC-32 (``crc``) goes into its data descriptor and central
    directory entry, and ``.data/serialization_id`` (its last 20 digits fold every record's CRC-32) is
    recomputed with it, along with its own CRC-32. (An empty storage has no data descriptor: nothing to do.)"""
    from streamconv.formats.torch_dist_reader import FileSlice

    z = zipfile.ZipFile(FileSlice(fd, start, end - start))
    cd_at = start + z.start_dir  # central directory entries follow each other in infolist order
    combined = 0
    for info in z.infolist():
        name_len, extra_len = struct.unpack("<HH", os.pread(fd, 4, start + info.header_offset + 26))
        data_at = start + info.header_offset + 30 + name_len + extra_len
        record_crc = info.CRC
        if info.filename.endswith("/data/0"):
            record_crc = crc
        elif info.filename.endswith("/.data/serialization_id"):
            sid = os.pread(fd, info.file_size, data_at)
            new = sid[:-20] + b"%020d" % combined
            if len(new) != len(sid):
                raise ValueError(f"unexpected serialization id {sid!r}")
            os.pwrite(fd, new, data_at)
            record_crc = zlib.crc32(new)
        if record_crc != info.CRC:
            if os.pread(fd, 4, data_at + info.file_size) != b"PK\x07\x08":
                raise ValueError(f"torch.save wrote no data descriptor after {info.filename}")
            os.pwrite(fd, _CRC.pack(record_crc), data_at + info.file_size + 4)
            os.pwrite(fd, _CRC.pack(record_crc), cd_at + 16)
        if info.flag_bits & 0x08 and not info.filename.endswith("/.data/serialization_id"):
            combined = _hash_combine(combined, record_crc)  # torch folds the CRC of each data descriptor
        cd_at += 46 + len(info.orig_filename.encode()) + len(info.extra) + len(info.comment)


class DistcpFile:
    """One ``.distcp`` file being appended to; ``finish()`` makes it appear under its final name.

    A tensor item is the archive ``torch.save(tensor)`` writes (same records, names, alignment, CRC-32s),
    framed by torch under ``skip_data`` while its storage's bytes are written here: from memory
    (``append_tensor``) or copied inside the kernel from a staged chunk file (``append_copy``). Appended
    bytes are written behind (``pagecache.WriteBehind``): the page cache holds about two items.
    """

    def __init__(self, folder: Path, file: int):
        self.file = file
        self.name = distcp_name(file)
        self.path = folder / self.name
        self.tmp = folder / (self.name + ".partial")
        try:
            self.f = open(self.tmp, "w+b")  # read too: an item's CRC-32 is patched after reading its directory
        except OSError as e:
            raise output_error(self.tmp, e) from e
        self.behind = WriteBehind(self.f.fileno())
        self.entries: list[tuple[str, tuple[int, ...] | None, int, int]] = []  # key, offsets, offset, length

    def append(self, key: str, offsets: tuple[int, ...] | None, data: bytes | memoryview) -> None:
        try:
            pos = self.f.tell()
            self.f.write(data)
            self._written()
        except OSError as e:
            raise output_error(self.tmp, e) from e
        self.entries.append((key, offsets, pos, len(data)))

    def append_tensor(self, key: str, offsets: tuple[int, ...], tensor: torch.Tensor) -> None:
        """One tensor item, its bytes written from ``tensor``'s memory."""
        tensor = standalone(tensor)
        data = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
        self._append_item(key, offsets, tensor, lambda n: self.f.write(memoryview(data)), zlib.crc32(data))

    def append_copy(self, key: str, offsets: tuple[int, ...], sizes, dtype: torch.dtype, src: Path, crc: int) -> None:
        """One tensor item of ``sizes``/``dtype``, its bytes copied from the start of file ``src`` (whose
        CRC-32 is ``crc``) by the kernel."""
        def fill(n: int) -> None:
            self.f.flush()
            pos = self.f.tell()
            fd = os.open(src, os.O_RDONLY)
            try:
                got = copy_range(fd, 0, self.f.fileno(), pos, n)
            finally:
                os.close(fd)
            if got != n:
                raise TornSource(f"{src}: torn staged chunk ({got} of {n} bytes)")
            self.f.seek(pos + n)

        # torch.save only reads this tensor's shape, dtype and storage size: its memory is never touched
        like = torch.empty(tuple(sizes), dtype=dtype)
        self._append_item(key, offsets, like, fill, crc)

    def _append_item(self, key, offsets, tensor: torch.Tensor, fill, crc: int) -> None:
        framed = _Framed(self.f, fill)
        try:
            pos = self.f.tell()
            with torch.serialization.skip_data():
                torch.save(tensor, framed)
            self.f.flush()
            end = self.f.tell()
            _complete_item(self.f.fileno(), pos, end, crc)
            self._written()
        except OSError as e:
            raise output_error(self.tmp, e) from e
        except RuntimeError:  # torch.save reports a failed write (disk full) as its own RuntimeError
            if isinstance(framed.error, OSError):
                raise output_error(self.tmp, framed.error) from framed.error
            if framed.error is not None:
                raise framed.error from None
            raise
        self.entries.append((key, offsets, pos, end - pos))

    def _written(self) -> None:
        self.f.flush()
        self.behind.wrote(self.f.tell())

    def finish(self) -> None:
        commit(self.f, self.tmp, self.path, drop_cache=True)

    def abort(self) -> None:
        """Close without the final name; the ``.partial`` file never looks complete. Closing flushes the
        buffer, which fails again on a full disk: that error is not the one to report."""
        try:
            self.f.close()
        except OSError:
            pass


class TornSource(ValueError):
    """A staged chunk file shorter than its chunk."""


def build_metadata(targets, chunks_by_key, objects, storage):
    """``targets``: {key: (shape, dtype)}; ``chunks_by_key``: {key: [(offsets, sizes)]};
    ``objects``: [key]; ``storage``: [(key, offsets|None, relative_path, offset, length)]."""
    # imported here: torch.distributed.checkpoint costs ~0.8 s to import, and only the commit needs it
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, StorageMeta, TensorProperties,
                                                       TensorStorageMetadata)

    sd_meta: dict = {}
    for key, (shape, dtype) in targets.items():
        sd_meta[key] = TensorStorageMetadata(
            properties=TensorProperties(dtype=dtype),
            size=torch.Size(shape),
            chunks=[ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in chunks_by_key[key]],
        )
    for key in objects:
        sd_meta[key] = BytesStorageMetadata()
    storage_data = {}
    for key, offsets, rel, off, length in storage:
        index = MetadataIndex(key, torch.Size(offsets) if offsets is not None else None)
        storage_data[index] = _StorageInfo(rel, off, length)
    return Metadata(
        state_dict_metadata=sd_meta,
        planner_data=None,
        storage_data=storage_data,
        storage_meta=StorageMeta(checkpoint_id=None, save_id=None, load_id=None),
        version="1.0.0",
    )


def write_common_files(folder: Path) -> None:
    """``common.pt`` and ``metadata.json`` (read by megatron-core before the sharded part)."""
    buf = io.BytesIO()
    torch.save(dict(COMMON_STATE), buf)
    fsync_write(folder / "common.pt", buf.getvalue())
    fsync_write(folder / "metadata.json", json.dumps(METADATA_JSON).encode())


def write_metadata(folder: Path, metadata) -> None:
    """``.metadata`` to a temporary name, fsync, rename, fsync the folder: the commit of the checkpoint."""
    data = pickle.dumps(metadata)
    tmp, path = folder / ".metadata.tmp", folder / ".metadata"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            crashpoints.pause("metadata")
            fh.write(data[len(data) // 2:])
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    except OSError as e:
        raise output_error(path, e) from e


def commit_checkpoint(folder: Path, plan, by_file: dict, entries: dict, extra_state=None) -> None:
    """After every tensor file: the objects file (every ``_extra_state`` key and the common state), the common
    files, then ``.metadata`` last. ``by_file``: {file: [chunk]} of the plan; ``entries``: {file: items} as
    written. Storage is listed in plan order with the plan's own key objects, so ``.metadata`` has the same
    bytes however the files were written (staged or direct, in one run or resumed)."""
    storage = []
    for f in sorted(by_file):
        name = distcp_name(f)
        storage += [(c.key, c.offsets, name, off, n) for c, (_, _, off, n) in zip(by_file[f], entries[f])]
    objects = DistcpFile(folder, plan.num_files)
    try:
        for key in plan.objects:
            objects.append(key, None, object_item_bytes(extra_state))
        objects.append(COMMON_STATE_KEY, None, object_item_bytes(dict(COMMON_STATE)))
        objects.finish()
    except BaseException:
        objects.abort()
        raise
    storage += [(k, o, objects.name, off, n) for k, o, off, n in objects.entries]
    write_common_files(folder)
    targets = {k: (t.shape, t.dtype) for k, t in plan.targets.items()}
    chunks_by_key: dict[str, list] = {k: [] for k in targets}
    for c in plan.chunks:
        chunks_by_key[c.key].append((c.offsets, c.sizes))
    write_metadata(folder, build_metadata(targets, chunks_by_key, [*plan.objects, COMMON_STATE_KEY], storage))


def chunks_by_file(plan) -> dict[int, list]:
    out: dict[int, list] = {}
    for c in plan.chunks:
        out.setdefault(c.file, []).append(c)
    return out


class TorchDistSink:
    """The engine's sink for hf2mcore without staging: chunks (in plan order) -> ``.distcp`` files ->
    ``.metadata``. With a ``resume.Journal``, each committed file is journaled and a re-run skips the files
    an earlier run committed (the file being written when it was killed is redone).

    ``extra_state`` is the object every ``_extra_state`` key holds (megatron's local linear layers
    save ``None``).
    """

    def __init__(self, folder: Path, plan, extra_state=None, journal=None):
        self.folder = Path(folder)
        self.plan = plan
        self.extra_state = extra_state
        self.journal = journal
        self.by_file = chunks_by_file(plan)
        self.current: DistcpFile | None = None
        self.entries: dict[int, list] = {}
        self.report = {"files_resumed": 0, "partials_removed": 0}
        if journal is not None:
            crashpoints.started()
            self.report["partials_removed"] = resume.clean_leftovers(self.folder)
            self.entries = resume.committed_files(journal.records(), self.folder, self.by_file)
            self.report["files_resumed"] = len(self.entries)

    def skip(self, chunk) -> bool:
        return chunk.file in self.entries

    def write(self, chunk, tensor: torch.Tensor) -> None:
        crashpoints.slow(1.0)
        if self.current is None or self.current.file != chunk.file:
            self._finish_current()
            self.current = DistcpFile(self.folder, chunk.file)
        self.current.append_tensor(chunk.key, chunk.offsets, tensor)
        crashpoints.pause("assemble")

    def _finish_current(self) -> None:
        if self.current is not None:
            done = self.current
            done.finish()
            self.current = None
            self.entries[done.file] = done.entries
            if self.journal is not None:
                self.journal.append(resume.file_record(done.file, done.path, done.entries), sync=True)

    def close(self) -> None:
        """Objects, common state, then ``.metadata`` last."""
        self._finish_current()
        missing = [f for f in self.by_file if f not in self.entries]
        if missing:
            raise RuntimeError(f"files {missing} were never written")
        commit_checkpoint(self.folder, self.plan, self.by_file, self.entries, self.extra_state)
        if self.journal is not None:
            self.journal.append({"t": "done"}, sync=True)
            self.journal.close()

    def abort(self) -> None:
        if self.current is not None:
            self.current.abort()
        if self.journal is not None:
            self.journal.close()
