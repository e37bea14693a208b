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
import pickle
from pathlib import Path

import torch

from streamconv.errors import output_error
from streamconv.formats.atomic import commit, fsync_write

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


class _Writes:
    """The ``write`` torch.save calls, keeping the OSError that torch turns into a RuntimeError."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


class DistcpFile:
    """One ``.distcp`` file being appended to; ``finish()`` makes it appear under its final name."""

    def __init__(self, folder: Path, file: int):
        self.name = distcp_name(file)
        self.path = folder / self.name
        self.tmp = folder / (self.name + ".partial")
        try:
            self.f = open(self.tmp, "wb")
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

    def append_tensor(self, key: str, offsets: tuple[int, ...], tensor: torch.Tensor) -> None:
        """One tensor item exactly as torch DCP writes it: a standalone ``torch.save`` archive, saved
        straight into the file (no in-memory copy of the archive)."""
        writer = _Writes(self.f)
        try:
            pos = self.f.tell()
            torch.save(standalone(tensor), writer)
            end = self.f.tell()
        except OSError as e:
            raise output_error(self.tmp, e) from e
        except RuntimeError:  # torch.save reports a failed write (disk full) as its own RuntimeError
            if writer.error is not None:
                raise output_error(self.tmp, writer.error) from writer.error
            raise
        self.entries.append((key, offsets, pos, end - pos))

    def finish(self) -> None:
        commit(self.f, self.tmp, self.path)

    def abort(self) -> None:
        """Close without the final name; the ``.partial`` file never looks complete. Closing flushes the
        buffer, which fails again on a full disk: that error is not the one to report."""
        try:
            self.f.close()
        except OSError:
            pass


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
    """The commit: after this the folder is a loadable checkpoint."""
    fsync_write(folder / ".metadata", pickle.dumps(metadata))


class TorchDistSink:
    """The engine's sink for hf2mcore: chunks (in plan order) -> ``.distcp`` files -> ``.metadata``.

    ``extra_state`` is the object every ``_extra_state`` key holds (megatron's local linear layers
    save ``None``).
    """

    def __init__(self, folder: Path, plan, extra_state=None):
        self.folder = Path(folder)
        self.plan = plan
        self.extra_state = extra_state
        self.current: DistcpFile | None = None
        self.storage: list[tuple[str, tuple[int, ...] | None, str, int, int]] = []

    def write(self, chunk, tensor: torch.Tensor) -> None:
        if self.current is None or self.current.name != distcp_name(chunk.file):
            self._finish_current()
            self.current = DistcpFile(self.folder, chunk.file)
        self.current.append_tensor(chunk.key, chunk.offsets, tensor)

    def _finish_current(self) -> None:
        if self.current is not None:
            self.current.finish()
            self.storage += [(k, o, self.current.name, off, n) for k, o, off, n in self.current.entries]
            self.current = None

    def close(self) -> None:
        """Objects, common state, then ``.metadata`` last."""
        self._finish_current()
        objects = DistcpFile(self.folder, self.plan.num_files)
        for key in self.plan.objects:
            objects.append(key, None, object_item_bytes(self.extra_state))
        objects.append(COMMON_STATE_KEY, None, object_item_bytes(dict(COMMON_STATE)))
        objects.finish()
        self.storage += [(k, o, objects.name, off, n) for k, o, off, n in objects.entries]
        write_common_files(self.folder)
        targets = {k: (t.shape, t.dtype) for k, t in self.plan.targets.items()}
        chunks_by_key: dict[str, list] = {k: [] for k in targets}
        for c in self.plan.chunks:
            chunks_by_key[c.key].append((c.offsets, c.sizes))
        meta = build_metadata(targets, chunks_by_key, [*self.plan.objects, COMMON_STATE_KEY], self.storage)
        write_metadata(self.folder, meta)

    def abort(self) -> None:
        if self.current is not None:
            self.current.abort()
