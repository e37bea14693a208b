"""Reading megatron-core ``torch_dist`` checkpoints lazily, region by region.

``.metadata`` is unpickled through an allow-list: only the torch DCP metadata classes (and the few torch
values they hold: ``torch.Size``, dtypes, layouts, ``OrderedDict``) can be named; any other global in
the file is refused before anything is called, so a crafted checkpoint cannot run code.

A tensor item inside a ``.distcp`` file is a standalone ``torch.save`` zip archive at (offset, length).
Its tiny ``data.pkl`` is read with a second allow-list unpickler that only records where the storage
lies (dtype, storage offset, size, stride); the uncompressed storage entry is then located in the zip
and only the bytes of the rows asked for are read with ``os.pread``. Any tensor region is assembled
from whatever chunks the checkpoint has: our own row blocks, or the chunking megatron-core's training
saves produce (TP row/column splits, SwiGLU gate/up halves per rank, several ``__R_N.distcp`` files,
stacked ``[L, ...]`` or per-layer keys). Memory: the region asked for plus a small copy buffer (an item
whose archive cannot be parsed this way is loaded whole with ``torch.load(weights_only=True)``).

    src = TorchDistSource(folder)
    src.tensors["decoder.layers.mlp.linear_fc1.weight"]    # TensorMeta(shape, dtype, chunks)
    src.read_rows(key, row0, row1, index=(layer,))         # rows of one layer of a stacked key
    src.read_object("common_state/shard_0_1")              # BYTE_IO items, restricted unpickling
    src.read_item(key, offsets)                            # one stored chunk, whole
"""

from __future__ import annotations

import bisect
import collections
import errno
import heapq
import itertools
import io
import math
import os
import pickle
import stat
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from streamconv import dtypes
from streamconv.engine.contracts import Source
from streamconv.engine.runner import DEFAULT_MAX_MEMORY
from streamconv.errors import BadInputError
from streamconv.files import pagecache
from streamconv.files.fileio import OpenFiles, read_exact
from streamconv.formats.dcp_pickle import Record, TorchConstant, record_class, torch_size
from streamconv.formats.names import METADATA_FILE
from streamconv.formats.torch_save import STORAGE_CLASSES
from streamconv.runtime import rss
from streamconv.units import fmt_bytes

if TYPE_CHECKING:
    import torch

COPY_AGAIN = "the checkpoint is truncated; copy it again"
COPY_BUFFER_BYTES = 8 * 1024**2  # bound on the temporary buffer used when a chunk is split by columns

_DCP = "torch.distributed.checkpoint."
# .metadata larger than this is not a checkpoint we wrote or megatron-core saves (a few MB at 253B)
MAX_METADATA_BYTES = 1 << 30
MAX_DIM = 1 << 48  # no tensor dimension comes near it
# what unpickling .metadata may build, at the least (else --max-memory, default DEFAULT_MAX_MEMORY): Ultra-253B's
# at the default chunk size is 3.2 MiB and builds 51 MiB of objects
METADATA_MEMORY_FLOOR = 64 * 1024**2
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [(_DCP + "metadata", n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                      "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                      "StorageMeta", "_MEM_FORMAT_ENCODING")]
    # megatron-core keeps its save plans in the metadata (``Metadata.all_local_plans``)
    + [(_DCP + "planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                       "BytesIOWriteData")]
    + [(_DCP + "filesystem", "_StorageInfo"), ("collections", "OrderedDict")]
    # StorageMeta.checkpoint_id may be a path
    + [(m, n) for m in ("pathlib", "pathlib._local") for n in ("PosixPath", "WindowsPath", "PurePosixPath",
                                                               "PureWindowsPath")]
)
_STORAGE_DTYPES = {name: dtypes.BY_NAME[dtype] for dtype, name in STORAGE_CLASSES.items()}
_TORCH_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")  # torch.<dtype>, torch.<layout>, torch.<memory format>


def _get_layout(name) -> TorchConstant:
    name = str(name).removeprefix("torch.")
    if not _TORCH_NAME.match(name):
        raise pickle.UnpicklingError(f"unknown tensor layout {name[:40]!r}")
    return TorchConstant(name)


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a DCP ``.metadata`` needs, each to an inert stand-in (``dcp_pickle.Record``:
    a DCP class; ``dtypes.DType``: an element type; ``TorchConstant``: another torch value; a tuple:
    ``torch.Size``); anything else is refused before it is called. torch is never imported for it."""

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            if module == "collections":
                return collections.OrderedDict
            if module.startswith("pathlib"):
                return _path
            return record_class(name)
        if module == "torch":
            if name == "Size":
                return torch_size
            if name in dtypes.BY_NAME:
                return dtypes.BY_NAME[name]
            if _TORCH_NAME.match(name):
                return TorchConstant(name)  # a layout or memory format (or a dtype no weight has): a value
        if module == "torch.serialization" and name == "_get_layout":
            return _get_layout
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a torch_dist .metadata")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a torch_dist .metadata")


def _path(*parts) -> str:
    """A ``pathlib`` path in ``StorageMeta.checkpoint_id``, as read: its text."""
    return "/".join(str(p) for p in parts)


class MetadataTooLarge(Exception):  # not an UnpicklingError: the C unpickler turns those into EOFError
    pass


class _MeteredReader:
    """``.metadata`` as the unpickler reads it, with what unpickling builds kept under ``allowance`` bytes.

    A pickle's objects can take ~70 times its own size (one ``}`` byte is an empty dict), so the file's cap
    does not bound them. The C unpickler refills its input through ``peek``, at most 128 KiB at a time (the
    slice below): at each refill, and before any larger read, this process's growth in resident memory since
    the start is checked, so the unpickler stops within ~10 MiB of the allowance, whatever the file holds."""

    STEP = 128 * 1024

    def __init__(self, f, allowance: int):
        self.f = f
        self.allowance = allowance
        self.start = rss.current()

    def _check(self, more: int = 0) -> None:
        grown = rss.current() - self.start + max(more, 0)
        if grown > self.allowance:
            raise MetadataTooLarge(grown, self.f.tell())

    def peek(self, n: int = 0) -> bytes:
        self._check()
        return self.f.peek(self.STEP)[:self.STEP]

    def read(self, n: int = -1) -> bytes:
        self._check(n if n and n > self.STEP else 0)
        return self.f.read(n)

    def readinto(self, b) -> int:
        self._check(len(b) if len(b) > self.STEP else 0)
        return self.f.readinto(b)

    def readline(self) -> bytes:
        self._check()
        return self.f.readline(self.STEP)


def load_metadata(path: Path | str, max_memory: int | None = None):
    """The DCP ``Metadata`` in ``path`` as stand-ins (``dcp_pickle.Record``: fields, no behaviour), unpickled with
    the allow-list above, building at most ``max_memory`` (at least ``METADATA_MEMORY_FLOOR``; default
    ``DEFAULT_MAX_MEMORY``, --max-memory's) of objects."""
    path = Path(path)
    allowance = max(max_memory or DEFAULT_MAX_MEMORY, METADATA_MEMORY_FLOOR)
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise BadInputError(f"{path}: not a regular file; a checkpoint's {METADATA_FILE} must be one")
            if st.st_size > MAX_METADATA_BYTES:
                raise BadInputError(f"{path}: {st.st_size} bytes is too large for a torch_dist .metadata")
            meta = RestrictedUnpickler(_MeteredReader(f, allowance)).load()
    except FileNotFoundError:
        raise BadInputError(f"{path.parent}: no {METADATA_FILE}: not a torch_dist checkpoint, or an incomplete one "
                            "(an interrupted conversion: run it again to finish)") from None
    except MetadataTooLarge as e:
        raise BadInputError(f"{path}: reading it would take more than {fmt_bytes(allowance)} of memory "
                            f"({fmt_bytes(e.args[0])} after {fmt_bytes(e.args[1])} of its {fmt_bytes(st.st_size)}); "
                            "not a checkpoint's metadata, or one with very many chunks: then raise --max-memory") \
            from None
    except pickle.UnpicklingError as e:
        raise BadInputError(f"{path}: refused: {e} (nothing in the file was executed); this file is not a "
                            "torch_dist checkpoint's metadata, or it was tampered with") from None
    except OSError as e:
        raise BadInputError(f"{path}: cannot read: {e.strerror or e}") from e
    except MemoryError:
        raise BadInputError(f"{path}: out of memory while reading it; not a checkpoint's metadata, or one too "
                            "large for this host") from None
    except Exception as e:  # truncated or garbage pickles raise many types
        raise BadInputError(f"{path}: unreadable torch_dist metadata ({type(e).__name__}: {e})") from None
    if type(meta).__name__ != "Metadata" or not isinstance(getattr(meta, "state_dict_metadata", None), dict) \
            or not isinstance(getattr(meta, "storage_data", None), dict):
        raise BadInputError(f"{path}: not a torch.distributed.checkpoint Metadata object")
    return meta


# --------------------------------------------------------------------------- tensor items (torch.save zips)


@dataclass(frozen=True)
class _Storage:
    dtype: dtypes.DType
    key: str
    numel: int


@dataclass(frozen=True)
class ParsedItem:
    """Where a tensor item's elements lie: absolute file offset of its storage, and its strides."""

    data_start: int  # absolute byte offset of storage element 0 in the .distcp file
    dtype: dtypes.DType
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def standard(self) -> bool:
        expect, acc = [], 1
        for s in reversed(self.size):
            expect.append(acc)
            acc *= s
        return all(n == 1 or st == e for n, st, e in zip(self.size, self.stride, reversed(expect)))


def _rebuild_record(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest):
    if not isinstance(storage, _Storage):
        raise ValueError("storage")
    return ("tensor", storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


class _ItemUnpickler(pickle.Unpickler):
    """Reads a ``torch.save``'d plain tensor's ``data.pkl`` without building the tensor."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_record
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return ("storage_type", _STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"{module}.{name}")  # anything else: use torch.load(weights_only=True)

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not (isinstance(storage_type, tuple) and storage_type[0] == "storage_type"):
            raise pickle.UnpicklingError("storage")
        return _Storage(storage_type[1], str(key), int(numel))


class RandomAccess(io.RawIOBase):
    """A read-only, seekable file of ``length`` bytes whose reads are ``read_at(offset, n)`` (for zipfile)."""

    length = 0
    pos = 0

    def read_at(self, offset: int, n: int) -> bytes:
        raise NotImplementedError

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, b):
        n = max(0, min(len(b), self.length - self.pos))
        data = self.read_at(self.pos, n) if n else b""
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


class FileSlice(RandomAccess):
    """``[start, start+length)`` of a file descriptor."""

    def __init__(self, fd: int, start: int, length: int):
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def read_at(self, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, self.start + offset)


MAX_ITEM_PICKLE = 1 << 20  # a tensor item's data.pkl is a few hundred bytes


class ItemRefused(ValueError):
    """An item that is no archive ``torch.save`` writes, in a way that reading it would be unsafe or wrong."""


def _bounded_read(z: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise ItemRefused(f"its {info.filename} declares {info.file_size} bytes")
    with z.open(info) as f:
        data = f.read(limit + 1)  # a record that inflates past what it declares stops here
    if len(data) > limit:
        raise ItemRefused(f"its {info.filename} inflates past {limit} bytes")
    return data


def parse_tensor_item(fd: int, offset: int, length: int) -> ParsedItem | None:
    """The layout of the ``torch.save`` archive at ``[offset, offset+length)``; None if it is not a plain
    tensor archive (the caller then falls back to ``torch.load`` of the item, bounded by its length).
    Raises ``ItemRefused`` for a compressed record (torch.save never compresses; inflating one could take
    any amount of memory), a pickle too large, or a storage offset that points outside the storage."""
    try:
        z = zipfile.ZipFile(FileSlice(fd, offset, length))
        infos = z.infolist()
        if any(i.compress_type != zipfile.ZIP_STORED for i in infos):
            raise ItemRefused("it has compressed records")
        names = {i.filename: i for i in infos}
        pkl = next(n for n in names if n.endswith("/data.pkl") or n == "data.pkl")
        prefix = pkl[: -len("data.pkl")]
        if prefix + "byteorder" in names and _bounded_read(z, names[prefix + "byteorder"], 64) != b"little":
            return None
        record = _ItemUnpickler(io.BytesIO(_bounded_read(z, names[pkl], MAX_ITEM_PICKLE))).load()
        if not (isinstance(record, tuple) and record[0] == "tensor"):
            return None
        _, storage, storage_offset, size, stride = record
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (storage_offset, *size, *stride)):
            raise ItemRefused("its shape, strides or storage offset are not integers")
        if storage_offset < 0 or storage_offset > storage.numel:
            raise ItemRefused(f"its storage offset {storage_offset} lies outside its {storage.numel}-element storage")
        info = names[f"{prefix}data/{storage.key}"]
        itemsize = storage.dtype.itemsize
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != storage.numel * itemsize:
            return None
        if any(n < 0 for n in size) or any(s < 0 for s in stride):
            return None
        if math.prod(size) and storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel:
            return None
        head = os.pread(fd, 30, offset + info.header_offset)
        sig, *_, name_len, extra_len = struct.unpack("<4s5H3L2H", head)
        if sig != b"PK\x03\x04":
            return None
        data_start = offset + info.header_offset + 30 + name_len + extra_len
        return ParsedItem(data_start, storage.dtype, storage_offset, size, stride)
    except ItemRefused:
        raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, StopIteration, KeyError, ValueError, TypeError,
            struct.error, EOFError, AttributeError, IndexError):
        return None


# --------------------------------------------------------------------------- the source


def _refuse_overlaps(folder: Path, storage: dict) -> None:
    """No two items of ``.metadata`` may share bytes of a file: each would then read the other's."""
    by_file: dict[str, list] = collections.defaultdict(list)
    for (key, _), ref in storage.items():
        by_file[ref.file].append((ref.offset, ref.offset + ref.length, key))
    for rel, spans in by_file.items():
        spans.sort()
        for (a0, a1, ka), (b0, b1, kb) in zip(spans, spans[1:]):
            if b0 < a1:
                raise BadInputError(f"{folder / rel}: items {ka!r} and {kb!r} overlap (bytes {b0}..{min(a1, b1)}) in "
                                    f"{METADATA_FILE}; this is not a checkpoint torch_dist wrote, or it was tampered with")


def _refuse_chunk_overlaps(folder: Path, key: str, chunks: list) -> None:
    """No two chunks of a tensor may share an element (``chunks`` sorted by offsets). Sort and sweep along
    dim 0: a chunk is compared only with the chunks still open at its first row, so a tensor of N row blocks
    costs N log N, not N^2."""
    if chunks and not chunks[0].offsets:  # a 0-dim tensor: one chunk holds it
        if len(chunks) > 1:
            raise BadInputError(f"{folder / METADATA_FILE}: tensor {key!r} has {len(chunks)} chunks of one element")
        return
    open_: list = []
    for c in chunks:
        start = c.offsets[0]
        open_ = [a for a in open_ if a.offsets[0] + a.sizes[0] > start]
        for a in open_:
            if c.sizes[0] and a.sizes[0] and all(max(ao, co) < min(ao + asz, co + csz) for ao, asz, co, csz
                                                 in zip(a.offsets[1:], a.sizes[1:], c.offsets[1:], c.sizes[1:])):
                raise BadInputError(f"{folder / METADATA_FILE}: chunks {list(a.offsets)} and {list(c.offsets)} of "
                                    f"{key!r} overlap; this is not a checkpoint torch_dist wrote, or it was tampered with")
        open_.append(c)


@dataclass(frozen=True)
class ItemRef:
    """One stored chunk of a tensor: its place in the global tensor and in the files."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class TensorMeta:
    """A tensor of the checkpoint (reads like DCP's ``TensorStorageMetadata``: ``size``, ``properties``,
    ``chunks`` with ``offsets``/``sizes``), plus where each chunk is stored."""

    key: str
    shape: tuple[int, ...]
    dtype: dtypes.DType  # (equal to the torch dtype of its name; ``.torch`` is that dtype)
    chunks: tuple[ItemRef, ...]
    properties: object = None  # the DCP TensorProperties, as read (``dcp_pickle.Record``)

    @property
    def size(self) -> tuple[int, ...]:
        return self.shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _itemsize(dtype) -> int:
    return dtypes.of(dtype).itemsize


class TorchDistSource(Source):
    """A lazy view of one torch_dist checkpoint folder (the one holding ``.metadata``).

    ``tensors``: key -> ``TensorMeta`` (shape, dtype, stored chunks); ``objects``: the BYTE_IO keys.
    An engine ``Source`` that fills a chunk's buffer itself (``reads = "buffer"``: ``read_into``).
    Thread-safe: the engine calls it from several reader threads.
    """

    reads = "buffer"

    def __init__(self, folder: Path | str, max_memory: int | None = None):
        self.folder = Path(folder)
        self.metadata = load_metadata(self.folder / METADATA_FILE, max_memory)
        try:
            self._parse()
        except (TypeError, AttributeError, ValueError, KeyError) as e:  # allow-listed types, nonsense values
            raise BadInputError(f"{self.folder / METADATA_FILE}: malformed ({type(e).__name__}: {e}); this is not "
                                "a checkpoint torch_dist wrote, or it was tampered with") from None
        self._files = OpenFiles(opener=self._open)
        self._layouts: dict[tuple[str, int], ParsedItem | None] = {}
        self._by_start: dict[str, tuple[list[int], int]] = {}  # _candidates' index
        self._paths: dict[str, Path] = {}  # _path's

    def _parse(self) -> None:
        """``tensors``, ``objects`` and where every item is, from ``.metadata``, every number checked."""
        storage: dict[tuple[str, tuple[int, ...] | None], ItemRef] = {}
        sizes: dict[str, int] = {}
        for index, info in self.metadata.storage_data.items():
            rel, off, length = getattr(info, "relative_path", None), getattr(info, "offset", None), \
                getattr(info, "length", None)
            if not isinstance(rel, str) or not isinstance(off, int) or not isinstance(length, int):
                raise BadInputError(f"{self.folder / METADATA_FILE}: malformed storage entry for {index.fqn!r}")
            if "/" in rel or "\\" in rel or rel in (".", ".."):
                raise BadInputError(f"{self.folder}: {METADATA_FILE} names a file outside the folder: {rel!r}")
            if getattr(info, "transform_descriptors", None):
                raise BadInputError(f"{self.folder / rel}: item {index.fqn!r} is stored with DCP transforms "
                                    f"{list(info.transform_descriptors)} (e.g. compression), which streamconv does "
                                    "not read; save the checkpoint without them")
            if rel not in sizes:
                try:
                    st = (self.folder / rel).stat()
                except OSError:
                    raise BadInputError(f"{self.folder / rel}: missing; the checkpoint is incomplete "
                                        "(every file named in .metadata is needed)") from None
                if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
                    raise BadInputError(f"{self.folder / rel}: not a regular file; a checkpoint file must be one")
                sizes[rel] = st.st_size
            if off < 0 or length < 0 or off + length > sizes[rel]:
                raise BadInputError(f"{self.folder / rel}: item {index.fqn!r} ends at byte {off + length} but the "
                                    f"file has {sizes[rel]} bytes: truncated; copy the checkpoint again")
            offsets = tuple(index.offset) if index.offset is not None else None
            storage[(index.fqn, offsets)] = ItemRef((), (), rel, off, length)
        self.tensors: dict[str, TensorMeta] = {}
        self.objects: list[str] = []
        for key, md in self.metadata.state_dict_metadata.items():
            kind = type(md).__name__ if isinstance(md, Record) else None
            if kind == "BytesStorageMetadata":
                if (key, None) not in storage:
                    raise BadInputError(f"{self.folder / METADATA_FILE}: object {key!r} has no storage entry")
                self.objects.append(key)
            elif kind == "TensorStorageMetadata":
                shape = tuple(int(s) for s in md.size)
                dtype = getattr(md.properties, "dtype", None)
                if not isinstance(dtype, dtypes.DType):
                    raise BadInputError(f"{self.folder / METADATA_FILE}: tensor {key!r} has element type "
                                        f"{str(dtype)[:40]}, which no model weight has; this is not a checkpoint "
                                        "streamconv reads")
                if any(not 0 <= s < MAX_DIM for s in shape):
                    raise BadInputError(f"{self.folder / METADATA_FILE}: tensor {key!r} has a dimension outside "
                                        f"0..2**48 ({str(list(shape))[:80]}); it was tampered with")
                chunks = []
                for c in md.chunks:
                    offs, szs = tuple(int(x) for x in c.offsets), tuple(int(x) for x in c.sizes)
                    ref = storage.get((key, offs))
                    if ref is None:
                        raise BadInputError(f"{self.folder / METADATA_FILE}: chunk {list(offs)} of {key!r} has no "
                                            "storage entry")
                    if len(offs) != len(shape) or len(szs) != len(shape) or any(
                            o < 0 or s < 0 or o + s > n for o, s, n in zip(offs, szs, shape)):
                        raise BadInputError(f"{self.folder / METADATA_FILE}: chunk {list(offs)}+{list(szs)} lies "
                                            f"outside tensor {key!r} {list(shape)}")
                    chunks.append(ItemRef(offs, szs, ref.file, ref.offset, ref.length))
                chunks.sort(key=lambda c: c.offsets)
                _refuse_chunk_overlaps(self.folder, key, chunks)
                self.tensors[key] = TensorMeta(key, shape, dtype, tuple(chunks), md.properties)
            else:
                raise BadInputError(f"{self.folder / METADATA_FILE}: entry {key!r} is of unknown kind "
                                    f"{type(md).__name__}")
        _refuse_overlaps(self.folder, storage)
        self._storage = storage

    # ------------------------------------------------------------------ engine interface

    def info(self, name: str) -> TensorMeta:
        try:
            return self.tensors[name]
        except KeyError:
            raise BadInputError(f"{self.folder}: tensor {name!r} is needed but not in the checkpoint") from None

    def dtype_of(self, name: str) -> dtypes.DType:
        return dtypes.of(self.info(name).dtype)

    def read_nbytes(self, read) -> int:
        """Bytes that ``read_rows`` returns for a plan ``Read``."""
        meta = self.info(read.name)
        return (read.row1 - read.row0) * math.prod(meta.shape[len(read.index) + 1:]) * _itemsize(meta.dtype)

    def read_rows(self, name: str, row0: int, row1: int, index: tuple[int, ...] = ()) -> torch.Tensor:
        """Rows ``[row0, row1)`` along dim ``len(index)`` of tensor ``name``, its leading dims fixed to
        ``index``: a new tensor of shape ``[row1 - row0, *shape[len(index)+1:]]``."""
        import torch

        meta = self.info(name)
        out = torch.empty((row1 - row0, *meta.shape[len(index) + 1:]) if row1 >= row0 else (0,),
                          dtype=meta.dtype.torch)
        self.fill_rows(out, name, row0, row1, index)
        return out

    def read_into(self, chunk, buf: torch.Tensor) -> None:
        """The engine's direct read: chunk ``reads`` land one after the other in the rows of ``buf`` (a
        contiguous ``[rows, row_elems]`` tensor) with no intermediate copy; a read of another dtype is cast."""
        row = 0
        for r in chunk.reads:
            n = r.row1 - r.row0
            dst = buf[row:row + n]
            row += n
            if not dst.numel():
                continue
            if self.info(r.name).dtype == buf.dtype:
                self.fill_rows(dst, r.name, r.row0, r.row1, r.index)
            else:
                dst.copy_(self.read_rows(r.name, r.row0, r.row1, r.index).reshape(dst.shape))

    def fill_rows(self, out: torch.Tensor, name: str, row0: int, row1: int, index: tuple[int, ...] = ()) -> None:
        """``read_rows`` into ``out``: a contiguous tensor of the tensor's dtype with as many elements."""
        meta = self.info(name)
        lo, region, boxes = self._boxes(meta, row0, row1, index)
        if out.dtype != meta.dtype or not out.is_contiguous() or out.numel() != math.prod(region):
            raise ValueError(f"fill_rows: {name}: needs a contiguous {meta.dtype} tensor of {math.prod(region)} "
                             f"elements, got {out.dtype} {list(out.shape)}")
        if out.numel() == 0:
            return
        out = out.view(region)
        for c, blo, bhi in boxes:
            self._copy_box(meta, c, blo, bhi, lo, out)

    def use_extents(self, names) -> bool:
        """Whether every stored chunk of tensors ``names`` is a plain ``torch.save`` archive whose elements lie
        row-major in one range of its file (what megatron-core and hf2mcore write): then this source serves
        the engine's reads as file ranges (``reads = "extents"``, ``spans``: the direct path), and says so.
        Reads each chunk's small archive directory once (its layout is kept for the reads)."""
        for name in sorted(set(names)):
            meta = self.info(name)
            for c in meta.chunks:
                layout = self._layout(meta, c)
                if layout is None or not layout.standard:
                    return False
        self.reads = "extents"
        return True

    def spans(self, read) -> list[tuple[Path, int, int]]:
        """A plan ``Read`` as file ranges (``FileSource``, after ``use_extents``): row-major over the rows
        asked for, one range per stored chunk of those rows, or per row and chunk where the chunks split the
        rows by columns (tensor parallel); ranges that continue each other are merged."""
        meta = self.info(read.name)
        lo, region, boxes = self._boxes(meta, read.row0, read.row1, read.index)
        if not math.prod(region):
            return []
        runs = heapq.merge(*(self._box_runs(meta, c, blo, bhi, lo, region) for c, blo, bhi in boxes))
        out: list[list] = []
        for _, path, off, n in runs:
            if out and out[-1][0] is path and out[-1][1] + out[-1][2] == off:
                out[-1][2] += n
            else:
                out.append([path, off, n])
        return [tuple(x) for x in out]

    def _box_runs(self, meta: TensorMeta, c: ItemRef, blo, bhi, lo, region):
        """The part ``[blo, bhi)`` of chunk ``c`` as ``(position in the region, path, file offset, bytes)``
        ranges, in row-major order: the innermost dims the part spans whole (in the chunk and in the region)
        are one range with the dim outside them, the outer dims are enumerated."""
        layout = self._layout(meta, c)
        if layout is None or not layout.standard:  # use_extents said no: the engine does not ask
            raise RuntimeError(f"{meta.key}: chunk {list(c.offsets)} is not a plain archive; no file ranges")
        item = _itemsize(meta.dtype)
        nd = len(region)
        rstride = [1] * nd
        for d in range(nd - 2, -1, -1):
            rstride[d] = rstride[d + 1] * region[d + 1]
        p = nd - 1
        while p > 0 and blo[p] == c.offsets[p] and bhi[p] == c.offsets[p] + c.sizes[p] and \
                blo[p] == lo[p] and bhi[p] - lo[p] == region[p]:
            p -= 1
        run = (bhi[p] - blo[p]) * math.prod(c.sizes[p + 1:]) * item
        path = self._path(c.file)
        base = layout.data_start + (layout.storage_offset + (blo[p] - c.offsets[p]) * layout.stride[p]) * item
        rbase = (blo[p] - lo[p]) * rstride[p]
        for idx in itertools.product(*(range(a, b) for a, b in zip(blo[:p], bhi[:p]))):
            yield (rbase + sum((i - l) * s for i, l, s in zip(idx, lo, rstride)), path,
                   base + sum((i - o) * s for i, o, s in zip(idx, c.offsets, layout.stride)) * item, run)

    def _boxes(self, meta: TensorMeta, row0: int, row1: int, index: tuple[int, ...]):
        """Rows ``[row0, row1)`` of ``index`` of ``meta`` as a region (its first corner, its sizes) and the
        parts of stored chunks that tile it: ``[(chunk, part's first corner, part's end)]``, in global
        coordinates; refuses rows outside the tensor and chunks that do not cover the region."""
        name, shape, k = meta.key, meta.shape, len(index)
        if k >= len(shape) or any(not 0 <= i < n for i, n in zip(index, shape)) or not 0 <= row0 <= row1 <= shape[k]:
            raise BadInputError(f"{self.folder}: rows [{row0}, {row1}) of index {list(index)} are outside tensor "
                                f"{name!r} {list(shape)}")
        lo = (*index, row0, *(0 for _ in shape[k + 1:]))
        hi = (*(i + 1 for i in index), row1, *shape[k + 1:])
        region = tuple(h - l for l, h in zip(lo, hi))
        if not math.prod(region):
            return lo, region, []
        boxes = []
        for c in self._candidates(meta, lo[0], hi[0]):
            blo = tuple(max(a, o) for a, o in zip(lo, c.offsets))
            bhi = tuple(min(b, o + s) for b, o, s in zip(hi, c.offsets, c.sizes))
            if all(a < b for a, b in zip(blo, bhi)):
                boxes.append((c, blo, bhi))
        covered = sum(math.prod(b - a for a, b in zip(blo, bhi)) for _, blo, bhi in boxes)
        if covered != math.prod(region):  # (no two chunks overlap: refused when the checkpoint was opened)
            raise BadInputError(
                f"{self.folder}: tensor {name!r} rows [{row0}, {row1}) of index {list(index)}: the stored chunks "
                f"cover {covered} of {math.prod(region)} elements; the checkpoint is inconsistent")
        return lo, region, boxes

    def item_info(self, key: str, offsets: tuple[int, ...] | None = None) -> ItemRef:
        """Where item ``(key, offsets)`` is stored (``file``, ``offset``, ``length``); offsets None: an object."""
        ref = self._storage.get((key, tuple(offsets) if offsets is not None else None))
        if ref is None:
            where = f" at offsets {list(offsets)}" if offsets is not None else ""
            raise BadInputError(f"{self.folder}: no item {key!r}{where} in {METADATA_FILE}")
        return ref

    def read_bytes(self, key: str, offsets: tuple[int, ...] | None = None) -> bytes:
        """The raw bytes of one item (a ``torch.save`` archive)."""
        ref = self.item_info(key, offsets)
        return self._pread(ref.file, ref.offset, ref.length)

    def read_item(self, key: str, offsets: tuple[int, ...]) -> torch.Tensor:
        """The whole tensor stored as chunk ``offsets`` of ``key`` (shape = that chunk's ``sizes``): its
        bytes read straight into the tensor when the archive is a plain one (its layout parsed through the
        allow-list unpickler), else ``torch.load(weights_only=True)`` of the item."""
        meta = self.info(key)
        offsets = tuple(offsets)
        for c in meta.chunks:
            if c.offsets == offsets:
                layout = self._layout(meta, c)
                if layout is None or not layout.standard:
                    return self._load_item(meta, c)
                import torch

                t = torch.empty(c.sizes, dtype=meta.dtype.torch)
                if t.numel():
                    self._preadinto(c.file, memoryview(t.reshape(-1).view(torch.uint8).numpy()),
                                    layout.data_start + layout.storage_offset * _itemsize(meta.dtype))
                return t
        raise BadInputError(f"{self.folder}: no chunk of {key!r} at offsets {list(offsets)} in {METADATA_FILE}")

    def read_object(self, key: str):
        """A BYTE_IO item (``_extra_state``, ``common_state``): ``torch.load(weights_only=True)`` of its bytes."""
        ref = self._storage.get((key, None))
        if ref is None or key not in self.objects:
            raise BadInputError(f"{self.folder}: object {key!r} is not in the checkpoint")
        import torch

        data = self._pread(ref.file, ref.offset, ref.length)
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refusals are UnpicklingError; garbage gives others
            raise BadInputError(f"{self.folder / ref.file}: object {key!r} cannot be read safely "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        return obj[0] if isinstance(obj, list) and len(obj) == 1 else obj

    def files(self) -> list[Path]:
        """Every file ``.metadata`` names (as named in the folder: symlinks not resolved)."""
        return sorted({self.folder / ref.file for ref in self._storage.values()})

    def check_objects(self, prefixes: tuple[str, ...]) -> int:
        """Every object item whose key starts with one of ``prefixes`` (what a model load unpickles:
        megatron-core's ``_extra_state``) is plain data: read as ``read_object`` reads it, with
        ``torch.load(weights_only=True)``. torch DCP's own loader unpickles these items with
        ``weights_only=False``, so a crafted one would run code there: it is refused here first
        (``BadInputError``, one line naming the item). Returns the objects checked."""
        keys = sorted(k for k in self.objects if k.startswith(prefixes))
        for key in keys:
            self.read_object(key)
        return len(keys)

    def close(self) -> None:
        self._files.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ internals

    def _open(self, rel: str) -> int:
        path = self._path(rel)
        try:
            return os.open(path, os.O_RDONLY)
        except OSError as e:
            hint = {errno.ENOENT: " (the checkpoint is incomplete?)",
                    errno.EACCES: " (its permissions do not let this user read it)"}.get(e.errno, "")
            raise BadInputError(f"{path}: cannot read: {e.strerror or e}{hint}") from e

    def _fd(self, rel: str) -> int:
        return self._files.fd(rel)

    def _path(self, rel: str) -> Path:
        """The file ``rel``, resolved once and refused unless inside the folder (what ``_open`` opens and
        ``spans`` hands the engine)."""
        path = self._paths.get(rel)
        if path is None:
            path = (self.folder / rel).resolve()
            if path.parent != self.folder.resolve():
                raise BadInputError(f"{self.folder}: {METADATA_FILE} names a file outside the folder: {rel!r}")
            path = self._paths[rel] = path
        return path

    def _pread(self, rel: str, offset: int, length: int) -> bytearray:
        data = bytearray(length)
        read_exact(self._fd(rel), memoryview(data), offset, self.folder / rel, COPY_AGAIN)
        return data

    def _preadinto(self, rel: str, view: memoryview, offset: int) -> None:
        fd = self._fd(rel)
        read_exact(fd, view, offset, self.folder / rel, COPY_AGAIN)
        pagecache.drop(fd, offset, len(view))  # rows are read once (pagecache.py)

    def _candidates(self, meta: TensorMeta, lo: int, hi: int) -> list[ItemRef]:
        """Chunks whose first-dimension span meets ``[lo, hi)`` (a bisection in the chunks, sorted by offsets)."""
        index = self._by_start.get(meta.key)
        if index is None:
            starts = [c.offsets[0] for c in meta.chunks]
            index = self._by_start[meta.key] = (starts, max((c.sizes[0] for c in meta.chunks), default=0))
        starts, widest = index
        return list(meta.chunks[bisect.bisect_left(starts, lo - widest + 1):bisect.bisect_left(starts, hi)])

    def _layout(self, meta: TensorMeta, c: ItemRef) -> ParsedItem | None:
        cache_key = (c.file, c.offset)
        if cache_key not in self._layouts:
            try:
                layout = parse_tensor_item(self._fd(c.file), c.offset, c.length)
            except ItemRefused as e:
                raise BadInputError(f"{self.folder / c.file}: chunk {list(c.offsets)} of {meta.key!r} is refused: "
                                    f"{e}; this is not a checkpoint torch_dist wrote, or it was tampered with") from None
            if layout is not None and (layout.size != c.sizes or layout.dtype != meta.dtype):
                raise BadInputError(
                    f"{self.folder / c.file}: chunk {list(c.offsets)} of {meta.key!r} holds a {layout.dtype} "
                    f"tensor of shape {list(layout.size)} but .metadata says {meta.dtype} {list(c.sizes)}")
            self._layouts[cache_key] = layout
        return self._layouts[cache_key]

    def _load_item(self, meta: TensorMeta, c: ItemRef) -> torch.Tensor:
        import torch

        data = self._pread(c.file, c.offset, c.length)
        try:
            t = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise BadInputError(f"{self.folder / c.file}: chunk {list(c.offsets)} of {meta.key!r} is not a readable "
                                f"tensor ({type(e).__name__})") from e
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != c.sizes or t.dtype != meta.dtype:
            raise BadInputError(f"{self.folder / c.file}: chunk {list(c.offsets)} of {meta.key!r} does not match "
                                f".metadata ({meta.dtype} {list(c.sizes)})")
        return t

    def _copy_box(self, meta, c: ItemRef, blo, bhi, lo, out: torch.Tensor) -> None:
        """Copy the part ``[blo, bhi)`` (global coordinates) of chunk ``c`` into ``out`` (region from ``lo``)."""
        local_lo = tuple(a - o for a, o in zip(blo, c.offsets))
        local_hi = tuple(b - o for b, o in zip(bhi, c.offsets))
        dst_lo = tuple(a - l for a, l in zip(blo, lo))
        dst_hi = tuple(b - l for b, l in zip(bhi, lo))
        dst = out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))]
        layout = self._layout(meta, c)
        if layout is None:  # not a plain tensor archive: load the item whole (memory: one item)
            item = self._load_item(meta, c)
            dst.copy_(item[tuple(slice(a, b) for a, b in zip(local_lo, local_hi))])
            return
        itemsize = _itemsize(meta.dtype)
        if layout.standard and _contiguous_box(local_lo, local_hi, c.sizes) and dst.is_contiguous():
            import torch

            start = layout.storage_offset + sum(a * s for a, s in zip(local_lo, layout.stride))
            view = memoryview(dst.reshape(-1).view(torch.uint8).numpy())  # dst's own memory
            self._preadinto(c.file, view, layout.data_start + start * itemsize)
            return
        # strided on either side: copy through a bounded buffer, a slab of the outermost split dim at a time
        dims = [d for d in range(len(local_lo)) if local_hi[d] - local_lo[d] > 1] or [len(local_lo) - 1]
        p = dims[0]
        unit = max(1, layout.stride[p]) * itemsize
        step = max(1, COPY_BUFFER_BYTES // unit)
        for a in range(local_lo[p], local_hi[p], step):
            b = min(local_hi[p], a + step)
            sub_lo = (*local_lo[:p], a, *local_lo[p + 1:])
            sub_hi = (*local_hi[:p], b, *local_hi[p + 1:])
            part = self._read_strided(c, layout, sub_lo, sub_hi, itemsize)
            sl = [slice(x, y) for x, y in zip(dst_lo, dst_hi)]
            sl[p] = slice(dst_lo[p] + a - local_lo[p], dst_lo[p] + b - local_lo[p])
            out[tuple(sl)].copy_(part)

    def _read_strided(self, c: ItemRef, layout: ParsedItem, lo, hi, itemsize: int) -> torch.Tensor:
        start = layout.storage_offset + sum(a * s for a, s in zip(lo, layout.stride))
        end = layout.storage_offset + sum((b - 1) * s for b, s in zip(hi, layout.stride)) + 1
        import torch

        data = torch.empty((end - start) * itemsize, dtype=torch.uint8)
        self._preadinto(c.file, memoryview(data.numpy()), layout.data_start + start * itemsize)
        flat = data.view(layout.dtype.torch)
        return flat.as_strided(tuple(b - a for a, b in zip(lo, hi)), layout.stride, 0)


def _contiguous_box(lo, hi, sizes) -> bool:
    """Whether box ``[lo, hi)`` of a row-major array of ``sizes`` is one contiguous run of elements."""
    d = 0
    while d < len(sizes) and hi[d] - lo[d] == 1:
        d += 1
    return all(lo[e] == 0 and hi[e] == sizes[e] for e in range(d + 1, len(sizes)))
