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

import json
import os
from pathlib import Path

from streamconv import crashpoints, dtypes
from streamconv.files.checksum import crc32
from streamconv.errors import output_error
from streamconv.formats import dcp_pickle, torch_save
from streamconv.formats.names import COMMON_FILE, COMMON_STATE_KEY, METADATA_FILE, METADATA_JSON_FILE, distcp_name
from streamconv.files.atomic import commit, create_temporary, fsync_dir, fsync_write

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


def standalone(t):
    """A CPU tensor owning exactly its bytes: ``torch.save`` writes a view's whole base storage."""
    import torch

    t = t.detach().cpu()
    if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size() \
            or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def object_item_bytes(obj) -> bytes:
    """``torch.save([obj])`` of a plain object (no tensors)."""
    return torch_save.save_bytes([obj])


_frames: dict[tuple, torch_save.ItemLayout] = {}


def frame_for(sizes, dtype) -> torch_save.ItemLayout:
    """The archive ``torch.save(tensor)`` writes for a tensor of ``sizes``/``dtype``, around its bytes
    (cached: chunks of a kind share their shape): ``prefix + <the tensor's bytes> + suffix(crc)``, byte for
    byte ``torch.save``'s (``formats/torch_save.py``, without torch). The prefix is fixed by shape and dtype;
    the suffix holds the CRC-32 of the bytes and the serialization id folded from it. So where every item of a
    ``.distcp`` file lies is known from the plan alone, before a byte is read; the CRC-32 completes an item
    once its bytes are written."""
    key = (tuple(sizes), dtypes.of(dtype))
    f = _frames.get(key)
    if f is None:
        f = _frames.setdefault(key, torch_save.ItemLayout(*key))
    return f


def tensor_item_bytes(tensor) -> bytes:
    """One tensor item, byte for byte ``torch.save(tensor)`` (for small tensors held in memory)."""
    import torch

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
    fsync_write(folder / COMMON_FILE, torch_save.save_bytes(dict(COMMON_STATE)))
    fsync_write(folder / METADATA_JSON_FILE, json.dumps(METADATA_JSON).encode())


def write_metadata(folder: Path, metadata) -> None:
    """``.metadata`` to a temporary name, fsync, rename, fsync the folder: the commit of the checkpoint."""
    data = dcp_pickle.dumps(metadata)
    tmp, path = folder / (METADATA_FILE + ".tmp"), folder / METADATA_FILE
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
