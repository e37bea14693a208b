"""The engine's sink for mcore2hf: plan chunks -> HF safetensors shards + ``model.safetensors.index.json``.

Shards are named as ``save_pretrained`` names them (``model-00001-of-00003.safetensors``; a single shard is
``model.safetensors`` with no index). Each shard is one ``ShardWriter``: header first, tensors streamed in
plan order, written under ``.partial``, fsynced and renamed, so a shard under its final name is complete.
Resume skips the shards already there whose header lists exactly the planned tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

from streamconv import crashpoints
from streamconv.errors import BadInputError
from streamconv.sources.safetensors import ShardWriter, read_header
from streamconv.files.atomic import fsync_dir, fsync_write

INDEX_FILE = "model.safetensors.index.json"
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


class SafetensorsSink:
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
