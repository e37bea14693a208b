"""The safetensors format: the header (read bounded and validated; encoded), the index, element sizes.

A file is ``u64 little-endian header length N``, ``N`` bytes of JSON ``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}``, then the data region. The lazy reader is
``sources/safetensors.py``; the streaming writer ``sinks/safetensors.py``.
"""

from __future__ import annotations

import json
import math
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from streamconv import dtypes
from streamconv.dtypes import DType
from streamconv.errors import BadInputError

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
            n = header_length(path, head, size)
            raw = f.read(n)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read: {e.strerror or e}") from e
    return parse_header(path, raw, n, size)


def header_length(path, head: bytes, size: int) -> int:
    """The header's length from a shard's first 8 bytes (``size``: the shard's), checked before anything is
    allocated for it."""
    (n,) = struct.unpack("<Q", head)
    if n + 8 > size:
        raise BadInputError(f"{path}: header length {n} is larger than the file ({size} bytes): truncated "
                            f"or not a safetensors file; {REDOWNLOAD}")
    if n > MAX_HEADER_BYTES:
        raise BadInputError(f"{path}: header length {n} is over the {MAX_HEADER_BYTES} bytes streamconv "
                            "accepts: not a safetensors checkpoint")
    return n


def parse_header(path, raw: bytes, n: int, size: int) -> dict[str, TensorInfo]:
    """The tensors a header ``raw`` of declared length ``n`` describes in a shard of ``size`` bytes at ``path``
    (a local path, or where a remote shard is: only printed and kept in ``TensorInfo.path``), validated."""
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
