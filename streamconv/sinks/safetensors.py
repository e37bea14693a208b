"""The engine's sink for mcore2hf: plan chunks -> HF safetensors shards + ``model.safetensors.index.json``.

Shards are named as ``save_pretrained`` names them (``model-00001-of-00003.safetensors``; a single shard is
``model.safetensors`` with no index). Each shard is one ``ShardWriter``: header first, tensors streamed in
plan order, written under ``.partial``, fsynced and renamed, so a shard under its final name is complete.
Resume skips the shards already there whose header lists exactly the planned tensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from streamconv import crashpoints
from streamconv.dtypes import DType
from streamconv.engine.contracts import Sink
from streamconv.errors import BadInputError, output_error
from streamconv.files.atomic import commit, create_temporary, fsync_dir, fsync_write
from streamconv.files.pagecache import WriteBehind
from streamconv.formats.names import INDEX_FILE
from streamconv.formats.safetensors import encode_header, itemsize, read_header

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


class SafetensorsSink(Sink):
    """Writes the chunks of an export plan (in plan order) into its shards; ``skip`` = shards already done."""

    def __init__(self, folder: Path, plan, skip: set[int] = frozenset()):
        self.folder = Path(folder)
        self.plan = plan
        self.entries = shard_entries(plan)
        self.skip = set(skip)
        self.writer: ShardWriter | None = None
        self.current = -1

    def write_overhead(self, chunk) -> int:
        """Bytes ``write`` allocates beyond the tensor it is given: none (its memory is written as is)."""
        return 0

    def write(self, chunk, tensor) -> None:
        if chunk.file != self.current:
            self._finish_current()
            self.current = chunk.file
            path = self.folder / shard_name(chunk.file, self.plan.num_files)
            self.writer = ShardWriter(path, self.entries[chunk.file], metadata=SHARD_METADATA)
        self.writer.write(chunk.key, tensor)
        crashpoints.pause("chunk")

    def _finish_current(self) -> None:
        if self.writer is not None:
            self.writer.close()
            fsync_dir(self.folder)
            self.writer = None

    def close(self) -> None:
        """Finish the last shard (the caller writes the index last, with ``write_index``)."""
        self._finish_current()

    def abort(self) -> None:
        """Close the shard being written (its ``.partial`` stays for the next run to redo). Closing flushes
        its buffer, which fails again on a full disk: that second error is not the one to report."""
        if self.writer is not None:
            try:
                self.writer.f.close()
            except OSError:
                pass
            self.writer = None


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
