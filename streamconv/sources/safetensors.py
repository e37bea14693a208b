"""Lazy safetensors reading and streaming safetensors writing.

Reading parses the header of each shard itself (bounded, validated) and reads only the byte ranges a
plan asks for (row slices) with ``os.pread``: a shard is never loaded whole. Writing lays out the
header first and then streams tensors in header order, so a writer never holds more than one tensor.
The format: ``u64 little-endian header length N``, ``N`` bytes of JSON ``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}``, then the data region.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from streamconv import dtypes
from streamconv.dtypes import DType
from streamconv.errors import BadInputError, output_error
from streamconv.files.atomic import commit, create_temporary
from streamconv.files.pagecache import WriteBehind

# Headers of real checkpoints are a few hundred KiB; refuse absurd sizes before allocating.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, DType] = dict(dtypes.BY_SAFETENSORS)  # the header's names ("BF16") -> element types


def itemsize(dtype) -> int:
    return dtypes.of(dtype).itemsize


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte range, dtype and shape."""

    name: str
    path: Path
    dtype: DType
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


REDOWNLOAD = "re-download it"


def _ints(value, count: int | None = None) -> tuple[int, ...] | None:
    """``value`` as a tuple of non-negative JSON integers (``count`` of them if given), else None."""
    if not isinstance(value, list) or (count is not None and len(value) != count):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return None
    return tuple(value)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a shard's header; every inconsistency is a one-line BadInputError.

    Bounded: the header length is checked against the file size (and ``MAX_HEADER_BYTES``) before
    anything is allocated, and every tensor's byte range must lie inside the data region, match its
    dtype and shape, and not overlap another.
    """
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise BadInputError(f"{path}: not a regular file; pass the safetensors files themselves")
        size = st.st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BadInputError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte "
                                    f"header length); {REDOWNLOAD}")
            (n,) = struct.unpack("<Q", head)
            if n + 8 > size:
                raise BadInputError(f"{path}: header length {n} is larger than the file ({size} bytes): truncated "
                                    f"or not a safetensors file; {REDOWNLOAD}")
            if n > MAX_HEADER_BYTES:
                raise BadInputError(f"{path}: header length {n} is over the {MAX_HEADER_BYTES} bytes streamconv "
                                    "accepts: not a safetensors checkpoint")
            raw = f.read(n)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read: {e.strerror or e}") from e
    if len(raw) != n:
        raise BadInputError(f"{path}: the file ended inside its header; {REDOWNLOAD}")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        detail = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise BadInputError(f"{path}: malformed safetensors header JSON ({detail}); {REDOWNLOAD}") from e
    if not isinstance(header, dict):
        raise BadInputError(f"{path}: malformed safetensors header (not a JSON object); {REDOWNLOAD}")
    header.pop("__metadata__", None)
    data_start = 8 + n
    data_len = size - data_start
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        dtype_name = entry.get("dtype") if isinstance(entry, dict) else None
        shape = _ints(entry.get("shape")) if isinstance(entry, dict) else None
        offsets = _ints(entry.get("data_offsets"), 2) if isinstance(entry, dict) else None
        if not isinstance(dtype_name, str) or shape is None or offsets is None:
            raise BadInputError(f"{path}: malformed header entry for tensor {name!r} (needs a dtype string, a shape "
                                f"and two data_offsets, all non-negative integers); {REDOWNLOAD}")
        if dtype_name not in DTYPES:
            raise BadInputError(f"{path}: tensor {name!r} has unknown dtype {dtype_name[:40]!r} "
                                f"(streamconv reads {', '.join(DTYPES)})")
        begin, end = offsets
        dtype = DTYPES[dtype_name]
        expected = math.prod(shape) * itemsize(dtype)
        if end - begin != expected:
            raise BadInputError(
                f"{path}: tensor {name!r} {dtype_name}{list(shape)} needs {expected} bytes but its byte range "
                f"[{begin}, {end}) holds {end - begin}: the header is corrupt; {REDOWNLOAD}"
            )
        if end > data_len:
            raise BadInputError(
                f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes: "
                f"the shard is truncated or its header is corrupt; {REDOWNLOAD}"
            )
        spans.append((begin, end, name))
        infos[name] = TensorInfo(name, path, dtype, shape, data_start + begin, expected)
    reach, owner = 0, None  # the furthest end so far, and whose
    for begin, end, name in sorted(spans):
        if end == begin:  # empty tensors hold no bytes
            continue
        if begin < reach:
            raise BadInputError(f"{path}: tensors {owner!r} and {name!r} overlap in the file: the header is "
                                f"corrupt; {REDOWNLOAD}")
        reach, owner = end, name
    return infos


def read_index(index: Path) -> dict[str, str]:
    """``weight_map`` of ``model.safetensors.index.json``: tensor name -> shard file name in the same folder."""
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
    except OSError as e:
        raise BadInputError(f"{index}: cannot read: {e.strerror or e}") from e
    except (ValueError, RecursionError, KeyError, TypeError) as e:
        raise BadInputError(f"{index}: unreadable index (no JSON object with a 'weight_map'); re-download it") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise BadInputError(f"{index}: 'weight_map' must map tensor names to shard file names; re-download it")
    for shard in weight_map.values():
        if not shard or Path(shard).name != shard or shard in (".", ".."):
            raise BadInputError(f"{index}: shard name {shard[:80]!r} is not a file name in the model folder")
    return weight_map


class SafetensorsSource:
    """A lazy view of a HF checkpoint folder: one or more ``*.safetensors`` shards.

    With ``model.safetensors.index.json`` the index names each tensor's shard; without it every
    ``*.safetensors`` file in the folder is read. Headers only are parsed up front.
    """

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.tensors: dict[str, TensorInfo] = {}
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_index(index)
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (self.folder / shard).is_file():
                    raise BadInputError(
                        f"{self.folder / shard}: shard named in model.safetensors.index.json is missing; "
                        "finish the download"
                    )
        else:
            weight_map = None
            shards = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not shards:
                raise BadInputError(f"{self.folder}: no *.safetensors files found")
        for shard in shards:
            for name, info in read_header(self.folder / shard).items():
                if weight_map is not None and weight_map.get(name) != shard:
                    continue  # the index is authoritative when present
                if name in self.tensors:
                    raise BadInputError(f"{self.folder}: tensor {name!r} is stored in two shards")
                self.tensors[name] = info
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.tensors))
            if missing:
                raise BadInputError(
                    f"{self.folder / weight_map[missing[0]]}: tensor {missing[0]!r} is listed in the index but "
                    "not in the shard"
                )
        self._fds: dict[Path, int] = {}
        self.quant = None  # formats.quantized.Quantization of a quantized checkpoint (hf2mcore.open_source)
        self.dequant: dict = {}  # weight name -> formats.quantized.Scale: read_rows gives its float32 values

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise BadInputError(f"{self.folder}: tensor {name!r} is needed but not in the checkpoint") from None

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read_nbytes(self, read) -> int:
        """Bytes that ``read_rows`` returns for a plan ``Read``."""
        info = self.info(read.name)
        shape = info.shape[len(read.index):]
        return (read.row1 - read.row0) * math.prod(shape[1:]) * itemsize(info.dtype)

    def extent(self, name: str, row0: int, row1: int, index: tuple[int, ...] = ()) -> tuple[Path, int, int]:
        """``(file, byte offset, length)`` of rows ``[row0, row1)`` of tensor ``name`` (along dim 0, after the
        leading ``index``): one contiguous range, as tensors are stored row-major."""
        info = self.info(name)
        full = info.shape
        shape = full[len(index):]
        rows = shape[0] if shape else 1
        if len(index) > len(full) or any(not 0 <= i < n for i, n in zip(index, full)) or not 0 <= row0 <= row1 <= rows:
            raise BadInputError(
                f"{info.path}: rows [{row0}, {row1}) of index {list(index)} are outside tensor {name!r} {list(full)}"
            )
        row_bytes = math.prod(shape[1:]) * itemsize(info.dtype)
        first_row = 0
        for i, n in zip(index, full):  # row-major: flatten the leading index into a row number
            first_row = first_row * n + i
        first_row = first_row * rows + row0
        return info.path, info.start + first_row * row_bytes, (row1 - row0) * row_bytes

    def read_rows(self, name: str, row0: int, row1: int, index: tuple[int, ...] = ()):
        """Rows ``[row0, row1)`` of tensor ``name`` (along dim 0, after the leading ``index``), a tensor."""
        import torch

        path, pos, length = self.extent(name, row0, row1, index)
        shape = self.info(name).shape[len(index):]
        buf = bytearray(length)
        view = memoryview(buf)
        fd, done = self._fd(path), 0
        while done < length:
            got = os.preadv(fd, [view[done:]], pos + done)
            if got <= 0:
                raise BadInputError(f"{path}: unexpected end of file reading tensor {name!r}; re-download it")
            done += got
        out_shape = (row1 - row0, *shape[1:]) if shape else ()
        dtype = self.info(name).dtype
        if length == 0:
            return torch.empty(out_shape, dtype=torch.float32 if name in self.dequant else dtype.torch)
        values = torch.frombuffer(buf, dtype=dtype.torch).view(out_shape)
        scale = self.dequant.get(name)
        if scale is not None and not index:  # a quantized weight: its value, in float32
            from streamconv.engine.transforms import dequantize

            return dequantize(values, scale.values, scale.block, row0, torch.float32)
        return values

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def encode_header(entries: list[tuple[str, DType, tuple[int, ...]]], metadata: dict | None = None) -> bytes:
    """The header bytes (length prefix included) for tensors stored back to back in ``entries`` order."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in entries:
        n = math.prod(shape) * itemsize(dtype)
        header[name] = {"dtype": dtypes.of(dtype).safetensors, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


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
