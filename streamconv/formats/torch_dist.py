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
import struct
import zipfile
import zlib
from pathlib import Path

import torch

from streamconv import crashpoints
from streamconv.checksum import crc32
from streamconv.errors import output_error
from streamconv.formats import dcp_pickle
from streamconv.formats.atomic import commit, create_temporary, fsync_dir, fsync_write
from streamconv.formats.torch_dist_reader import RandomAccess

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


class _Recorder:
    """The file object ``torch.save`` writes a tensor item to under ``torch.serialization.skip_data``: it
    keeps what torch writes and where, and the one seek over the storage's bytes (torch's documented way of
    leaving them to "a separate pass")."""

    def __init__(self):
        self.parts: list[tuple[int, bytes]] = []
        self.pos = 0
        self.hole: tuple[int, int] | None = None  # (offset, length) of the storage's bytes

    def write(self, data) -> int:
        self.parts.append((self.pos, bytes(data)))
        self.pos += len(data)
        return len(data)

    def seek(self, n: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_CUR or self.hole is not None:
            raise io.UnsupportedOperation("a tensor item has one storage")
        self.hole = (self.pos, n)
        self.pos += n
        return self.pos

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass


class _Holed(RandomAccess):
    """``prefix + <hole of n bytes> + suffix`` as a file, for zipfile (which never reads the hole)."""

    def __init__(self, prefix: bytes, n: int, suffix: bytes):
        self.prefix, self.n, self.suffix, self.pos = prefix, n, suffix, 0
        self.length = len(prefix) + n + len(suffix)

    def read_at(self, offset: int, n: int) -> bytes:
        out = bytearray()
        end = offset + n
        hole_at, hole_end = len(self.prefix), len(self.prefix) + self.n
        while offset < end:
            if offset < hole_at:
                piece = self.prefix[offset:min(end, hole_at)]
            elif offset < hole_end:
                piece = bytes(min(end, hole_end) - offset)
            else:
                piece = self.suffix[offset - hole_end:end - hole_end]
            out += piece
            offset += len(piece)
        return bytes(out)


_CRC = struct.Struct("<I")
_U64 = (1 << 64) - 1


def _hash_combine(seed: int, value: int) -> int:
    """``c10::hash_combine`` on 64 bits: how torch folds each record's CRC-32 into the serialization id."""
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & _U64) + (seed >> 2)) & _U64)) & _U64


class ItemFrame:
    """The archive ``torch.save(tensor)`` writes for one tensor of ``sizes``/``dtype``, around its bytes.

    An item is ``prefix + <the tensor's bytes> + suffix(crc)``, byte for byte what ``torch.save`` writes:
    the prefix is fixed by shape and dtype; the suffix holds the storage record's CRC-32 (in its data
    descriptor and central directory entry) and ``.data/serialization_id``, whose last 20 digits fold every
    record's CRC-32 (and which has a CRC-32 of its own). So where every item of a ``.distcp`` file lies is
    known from the plan alone, before a byte is read; the CRC-32 completes an item once its bytes are written.
    """

    def __init__(self, sizes, dtype: torch.dtype):
        like = torch.empty(tuple(sizes), dtype=dtype)  # torch.save reads shape, dtype, storage size only
        rec = _Recorder()
        with torch.serialization.skip_data():
            torch.save(like, rec)
        self.nbytes = like.numel() * like.element_size()
        hole_at, hole_len = rec.hole if rec.hole is not None else (rec.pos, 0)
        if hole_len != self.nbytes:
            raise ValueError(f"torch.save framed {hole_len} storage bytes for a {self.nbytes}-byte tensor")
        self.prefix = b"".join(d for p, d in rec.parts if p < hole_at)
        suffix = bytearray(b"".join(d for p, d in rec.parts if p >= hole_at))
        self._patches: list[tuple[str, int]] = []  # ("data"|"sid", offset in suffix) of a CRC-32 field
        self._folded: list[int | None] = []  # each data-descriptor record's CRC (None: the storage's)
        self._sid: tuple[int, int] | None = None  # (offset, length) of the serialization id in suffix
        base = len(self.prefix) + self.nbytes
        item = _Holed(self.prefix, self.nbytes, bytes(suffix))
        z = zipfile.ZipFile(item)
        cd_at = z.start_dir
        for info in z.infolist():
            item.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", item.read(4))
            data_at = info.header_offset + 30 + name_len + extra_len  # in the whole item
            is_data = info.filename.endswith("/data/0")
            is_sid = info.filename.endswith("/.data/serialization_id")
            if self.nbytes == 0:  # an empty storage: torch.save wrote the real archive, nothing to complete
                break
            if is_data or is_sid:
                if not info.flag_bits & 0x08:
                    raise ValueError(f"torch.save wrote no data descriptor after {info.filename}")
                dd = data_at + info.file_size - base  # the data descriptor, in suffix
                if bytes(suffix[dd:dd + 4]) != b"PK\x07\x08":
                    raise ValueError(f"torch.save wrote no data descriptor after {info.filename}")
                kind = "data" if is_data else "sid"
                self._patches += [(kind, dd + 4), (kind, cd_at - base + 16)]
                if is_sid:
                    self._sid = (data_at - base, info.file_size)
            if info.flag_bits & 0x08 and not is_sid:
                self._folded.append(None if is_data else info.CRC)
            cd_at += 46 + len(info.orig_filename.encode()) + len(info.extra) + len(info.comment)
        if self.nbytes and not any(k == "data" for k, _ in self._patches):
            raise ValueError("torch.save wrote no storage record")
        self._suffix = bytes(suffix)
        self.length = len(self.prefix) + self.nbytes + len(self._suffix)

    def suffix(self, crc: int) -> bytes:
        """The bytes after the tensor's, for a tensor whose bytes have CRC-32 ``crc``."""
        if not self._patches:  # an empty storage: no record to complete
            return self._suffix
        out = bytearray(self._suffix)
        crcs = {"data": crc}
        if self._sid is not None:
            combined = 0
            for c in self._folded:
                combined = _hash_combine(combined, crc if c is None else c)
            at, n = self._sid
            sid = bytes(out[at:at + n - 20]) + b"%020d" % combined
            if len(sid) != n:
                raise ValueError(f"unexpected serialization id {bytes(out[at:at + n])!r}")
            out[at:at + n] = sid
            crcs["sid"] = zlib.crc32(sid)
        for kind, at in self._patches:
            out[at:at + 4] = _CRC.pack(crcs[kind])
        return bytes(out)


_frames: dict[tuple, ItemFrame] = {}


def frame_for(sizes, dtype: torch.dtype) -> ItemFrame:
    """The ``ItemFrame`` of a tensor of ``sizes``/``dtype`` (cached: chunks of a kind share their shape)."""
    key = (tuple(sizes), dtype)
    f = _frames.get(key)
    if f is None:
        f = _frames.setdefault(key, ItemFrame(sizes, dtype))
    return f


def tensor_item_bytes(tensor: torch.Tensor) -> bytes:
    """One tensor item, byte for byte ``torch.save(tensor)`` (for small tensors held in memory)."""
    tensor = standalone(tensor)
    data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    frame = frame_for(tensor.shape, tensor.dtype)
    return frame.prefix + data + frame.suffix(crc32(data))


class DistcpFile:
    """A small ``.distcp`` file built by appending whole items (the objects file); ``finish()`` makes it
    appear under its final name (temporary name, fsync, rename)."""

    def __init__(self, folder: Path, file: int):
        self.file = file
        self.name = distcp_name(file)
        self.path = folder / self.name
        self.tmp = folder / (self.name + ".partial")
        try:
            self.f = create_temporary(self.tmp)
        except OSError as e:
            raise output_error(self.tmp, e) from e
        self.entries: list[tuple[str, tuple[int, ...] | None, int, int]] = []  # key, offsets, offset, length

    def append(self, key: str, offsets: tuple[int, ...] | None, data: bytes | memoryview) -> None:
        try:
            pos = self.f.tell()
            self.f.write(data)
        except OSError as e:
            raise output_error(self.tmp, e) from e
        self.entries.append((key, offsets, pos, len(data)))

    def finish(self) -> None:
        commit(self.f, self.tmp, self.path, drop_cache=True)

    def abort(self) -> None:
        """Close without the final name; the ``.partial`` file never looks complete. Closing flushes the
        buffer, which fails again on a full disk: that error is not the one to report."""
        try:
            self.f.close()
        except OSError:
            pass


def build_metadata(targets, chunks_by_key, objects, storage):
    """``targets``: {key: (shape, dtype)}; ``chunks_by_key``: {key: [(offsets, sizes)]};
    ``objects``: [key]; ``storage``: [(key, offsets|None, relative_path, offset, length)]. The ``Metadata``
    as ``dcp_pickle`` stand-ins (no import of torch.distributed.checkpoint: see that module)."""
    return dcp_pickle.metadata({k: (shape, str(dtype).removeprefix("torch.")) for k, (shape, dtype) in targets.items()},
                               chunks_by_key, objects, storage)


def write_common_files(folder: Path) -> None:
    """``common.pt`` and ``metadata.json`` (read by megatron-core before the sharded part)."""
    buf = io.BytesIO()
    torch.save(dict(COMMON_STATE), buf)
    fsync_write(folder / "common.pt", buf.getvalue())
    fsync_write(folder / "metadata.json", json.dumps(METADATA_JSON).encode())


def write_metadata(folder: Path, metadata) -> None:
    """``.metadata`` to a temporary name, fsync, rename, fsync the folder: the commit of the checkpoint."""
    data = dcp_pickle.dumps(metadata)
    tmp, path = folder / ".metadata.tmp", folder / ".metadata"
    try:
        with create_temporary(tmp) as fh:
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
