"""Reading megatron-core ``torch_dist`` checkpoints lazily, item by item.

``.metadata`` is a pickle, and a checkpoint is something a user hands us: it is read with a *restricted*
unpickler that resolves only the torch DCP metadata classes (and ``torch.Size``, dtypes, layouts, memory
formats) and refuses every other global, so a crafted ``.metadata`` cannot run code. Items are read by
``(file, offset, length)`` from ``storage_data`` with ``os.pread``; a tensor item is a ``torch.save``
archive, loaded with ``torch.load(weights_only=True)``.

API: ``TorchDistSource(folder)`` -> ``.metadata`` (the DCP ``Metadata``), ``.tensors`` ({key:
``TensorStorageMetadata``}), ``.objects`` ([key]), ``read_item(key, offsets) -> Tensor``,
``read_object(key)``, ``item_info(key, offsets)`` (where an item lives), ``close()``.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

from streamconv.errors import BadInputError

METADATA_FILE = ".metadata"
# .metadata larger than this is not a checkpoint we wrote or megatron-core saves (a few MB at 253B)
MAX_METADATA_BYTES = 1 << 30

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    # megatron-core's writer keeps its save plans in the metadata
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                             "BytesIOWriteData"},
    "collections": {"OrderedDict"},
}


def _torch_constant(name: str):
    value = getattr(torch, name, None)
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return value
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a DCP ``.metadata`` needs; anything else is refused."""

    def find_class(self, module: str, name: str):
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch":
            if name == "Size":
                return torch.Size
            value = _torch_constant(name)
            if value is not None:
                return value
        if module == "torch.serialization" and name == "_get_layout":
            return _get_layout
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a torch_dist .metadata")


def _get_layout(name: str) -> torch.layout:
    value = _torch_constant(str(name).removeprefix("torch."))
    if not isinstance(value, torch.layout):
        raise pickle.UnpicklingError(f"unknown tensor layout {name!r}")
    return value


def load_metadata(path: Path):
    """The DCP ``Metadata`` in ``path``, unpickled with the allow-list above."""
    try:
        size = path.stat().st_size
        if size > MAX_METADATA_BYTES:
            raise BadInputError(f"{path}: {size} bytes is too large for a torch_dist .metadata")
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadInputError(f"{path.parent}: no {METADATA_FILE}: not a torch_dist checkpoint, or an incomplete one "
                            "(an interrupted conversion: run it again to finish)") from None
    except OSError as e:
        raise BadInputError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        meta = RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise BadInputError(f"{path}: refused: {e}; this file is not a torch_dist checkpoint's metadata") from None
    except Exception as e:  # truncated or garbage pickles raise many types
        raise BadInputError(f"{path}: unreadable torch_dist metadata ({type(e).__name__}: {e})") from None
    if not hasattr(meta, "state_dict_metadata") or not hasattr(meta, "storage_data"):
        raise BadInputError(f"{path}: not a torch.distributed.checkpoint Metadata object")
    return meta


class TorchDistSource:
    """A lazy view of a ``torch_dist`` checkpoint folder: metadata parsed up front, items read on demand."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.metadata = load_metadata(self.folder / METADATA_FILE)
        self.tensors: dict[str, TensorStorageMetadata] = {}
        self.objects: list[str] = []
        for key, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                self.tensors[key] = md
            elif isinstance(md, BytesStorageMetadata):
                self.objects.append(key)
        self._fds: dict[str, int] = {}

    def item_info(self, key: str, offsets: tuple[int, ...] | None = None):
        """``_StorageInfo(relative_path, offset, length)`` of the item ``(key, offsets)``."""
        index = MetadataIndex(key, torch.Size(offsets) if offsets is not None else None)
        info = self.metadata.storage_data.get(index)
        if info is None:
            where = f" at offsets {list(offsets)}" if offsets is not None else ""
            raise BadInputError(f"{self.folder}: no item {key!r}{where} in {METADATA_FILE}")
        if getattr(info, "transform_descriptors", None):
            raise BadInputError(f"{self.folder}: item {key!r} is stored with transforms "
                                f"{info.transform_descriptors} (compression?), which streamconv does not read")
        return info

    def _fd(self, rel: str) -> int:
        fd = self._fds.get(rel)
        if fd is None:
            path = (self.folder / rel).resolve()
            if path.parent != self.folder.resolve():
                raise BadInputError(f"{self.folder}: {METADATA_FILE} names a file outside the folder: {rel!r}")
            try:
                fd = self._fds[rel] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise BadInputError(f"{path}: cannot read: {e.strerror or e} (the checkpoint is incomplete?)") from e
        return fd

    def read_bytes(self, key: str, offsets: tuple[int, ...] | None = None) -> bytearray:
        """The raw bytes of one item (a ``torch.save`` archive)."""
        info = self.item_info(key, offsets)
        fd = self._fd(info.relative_path)
        size = os.fstat(fd).st_size
        if info.offset < 0 or info.length < 0 or info.offset + info.length > size:
            raise BadInputError(f"{self.folder / info.relative_path}: item {key!r} [{info.offset}, "
                                f"{info.offset + info.length}) is past the end of the file ({size} bytes); truncated?")
        buf = bytearray(info.length)
        view, done = memoryview(buf), 0
        while done < info.length:
            got = os.preadv(fd, [view[done:]], info.offset + done)
            if got <= 0:
                raise BadInputError(f"{self.folder / info.relative_path}: unexpected end of file in item {key!r}")
            done += got
        return buf

    def read_item(self, key: str, offsets: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor stored as item ``(key, offsets)`` (shape = that chunk's ``sizes``)."""
        data = self.read_bytes(key, offsets)
        try:
            t = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise BadInputError(f"{self.folder}: item {key!r} at {list(offsets or ())} is not a readable tensor "
                                f"archive ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        if not isinstance(t, torch.Tensor):
            raise BadInputError(f"{self.folder}: item {key!r} holds a {type(t).__name__}, not a tensor")
        return t

    def read_object(self, key: str):
        """A BYTE_IO item (``torch.save([obj])`` as megatron writes them), loaded with ``weights_only``."""
        data = self.read_bytes(key, None)
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise BadInputError(f"{self.folder}: object {key!r} is not readable with weights_only "
                                f"({type(e).__name__})") from None
        return obj[0] if isinstance(obj, list) and len(obj) == 1 else obj

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
