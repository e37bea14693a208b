"""The bytes ``torch.save`` writes, without importing torch.

A conversion that only moves bytes never needs torch (whose import takes seconds), but every item of a
``.distcp`` file, ``common.pt`` and ``train_state.pt`` are ``torch.save`` archives. Their format is small
and fixed: a zip file (no compression, every record's data aligned to 64 bytes by an ``FB`` extra field of
``Z`` bytes, a data descriptor after each record, a zip64 end record) holding ``data.pkl`` (a protocol-2
pickle whose tensors refer to storages by persistent id), ``.format_version``, ``.storage_alignment``,
``byteorder``, one ``data/<i>`` record per storage, ``version`` and ``.data/serialization_id``: 20 digits
of the record names' hashes folded in the order of torch's ``std::unordered_set`` (so a constant for each
set of names: ``SERIALIZATION_ID_HEADS``, by number of storages), then 20 digits of the records' CRC-32s
folded with ``c10::hash_combine`` (an empty record has no data descriptor and is not folded).

``tests/test_torch_save.py`` compares every archive made here with ``torch.save``'s, byte for byte, over
shapes, dtypes, empty tensors, dicts of tensors and plain objects.
"""

from __future__ import annotations

import math
import pickle
import struct
import zlib
from dataclasses import dataclass

from streamconv.dtypes import DType

ALIGNMENT = 64
PREFIX = "archive/"  # torch.save into a file object names its records archive/...
# the name-hash half of .data/serialization_id, by number of storages: one tensor (a .distcp item), none
# (an object item, common.pt), eight (train_state.pt); other sets of names are not reproduced here
SERIALIZATION_ID_HEADS = {1: b"15728199511854643026", 0: b"02908468677762923104", 8: b"08268647735604577700"}
STORAGE_CLASSES = {  # torch.<X>Storage, as torch pickles a storage of each dtype
    "float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage", "bfloat16": "BFloat16Storage",
    "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage", "int8": "CharStorage",
    "uint8": "ByteStorage", "bool": "BoolStorage",
}
_U64 = (1 << 64) - 1
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_DESCRIPTOR = struct.Struct("<IIII")
_CENTRAL = struct.Struct("<I6H3I5H2I")
_ZIP64_END = struct.Struct("<IQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_END = struct.Struct("<IHHHHIIH")


class Unsupported(ValueError):
    """What this writer does not reproduce (a dtype torch pickles otherwise, a record of 4 GiB or more)."""


@dataclass(frozen=True)
class TensorRef:
    """A contiguous CPU tensor of ``shape`` and ``dtype``, for ``tensor_pickle`` (its bytes travel apart)."""

    shape: tuple[int, ...]
    dtype: DType

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def stride(self) -> tuple[int, ...]:
        out, step = [], 1
        for s in reversed(self.shape):  # torch's contiguous strides: a dimension of 0 counts as 1
            out.append(step)
            step *= max(1, s)
        return tuple(reversed(out))


def hash_combine(seed: int, value: int) -> int:
    """``c10::hash_combine`` on 64 bits: how torch folds each record's CRC-32 into the serialization id."""
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & _U64) + (seed >> 2)) & _U64)) & _U64


class _Pickle:
    """Protocol-2 opcodes as ``torch.save``'s pickler emits them for tensors and dicts of tensors, memo and all
    (objects torch reuses, such as the rebuild function and the ``'storage'`` and ``'cpu'`` strings, are
    memoized once and fetched after)."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")
        self.memo: dict = {}
        self.next = 0  # the next memo index
        self.storages = 0

    def put(self) -> None:
        n = self.next
        self.out += b"q" + bytes((n,)) if n < 256 else b"r" + struct.pack("<I", n)
        self.next += 1

    def shared(self, key, data: bytes) -> None:
        """An object torch pickles by reference after its first time."""
        n = self.memo.get(key)
        if n is not None:
            self.out += b"h" + bytes((n,)) if n < 256 else b"j" + struct.pack("<I", n)
            return
        self.out += data
        self.memo[key] = self.next
        self.put()

    def glob(self, module: str, name: str) -> None:
        self.shared(("global", module, name), f"c{module}\n{name}\n".encode())

    def text(self, s: str) -> None:
        data = s.encode("utf-8", "surrogatepass")
        self.out += b"X" + struct.pack("<I", len(data)) + data
        self.put()

    def interned(self, s: str) -> None:
        self.shared(("str", s), b"X" + struct.pack("<I", len(s)) + s.encode())

    def int(self, v: int) -> None:
        if 0 <= v < 256:
            self.out += b"K" + bytes((v,))
        elif 0 <= v < 65536:
            self.out += b"M" + struct.pack("<H", v)
        elif -2**31 <= v < 2**31:
            self.out += b"J" + struct.pack("<i", v)
        else:
            data = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes((len(data),)) + data

    def ints(self, values: tuple[int, ...]) -> None:
        if not values:
            self.out += b")"
            return
        if len(values) > 3:
            self.out += b"("
        for v in values:
            self.int(v)
        self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(values), b"t")
        self.put()

    def tensor(self, t: TensorRef) -> None:
        cls = STORAGE_CLASSES.get(t.dtype.name)
        if cls is None:
            raise Unsupported(f"torch.save of a {t.dtype} tensor is not reproduced here")
        self.glob("torch._utils", "_rebuild_tensor_v2")
        self.out += b"(("
        self.interned("storage")
        self.glob("torch", cls)
        self.text(str(self.storages))
        self.storages += 1
        self.interned("cpu")
        self.int(t.numel)
        self.out += b"t"
        self.put()
        self.out += b"Q"  # BINPERSID
        self.int(0)  # storage offset
        self.ints(t.shape)
        self.ints(t.stride)
        self.out += b"\x89"  # requires_grad False
        self.glob("collections", "OrderedDict")
        self.out += b")R"
        self.put()
        self.out += b"t"
        self.put()
        self.out += b"R"
        self.put()

    def dict(self, items: dict) -> None:
        self.out += b"}"
        self.put()
        if len(items) > 1:
            self.out += b"("
        for k, v in items.items():
            self.text(k)
            self.tensor(v)
        if items:
            self.out += b"u" if len(items) > 1 else b"s"

    def done(self) -> bytes:
        return bytes(self.out + b".")


def tensor_pickle(obj: TensorRef | dict) -> bytes:
    """``data.pkl`` of ``torch.save(obj)`` for a tensor or a ``{str: tensor}`` dict; storages numbered in order."""
    p = _Pickle()
    if isinstance(obj, dict):
        if len(obj) > 1000:  # the pickler batches SETITEMS by 1000
            raise Unsupported("a dict of more than 1000 tensors")
        p.dict(obj)
    else:
        p.tensor(obj)
    return p.done()


def _pieces(pkl: bytes, sizes: list[int], crcs: list[int] | None) -> list[bytes | None]:
    """The archive as pieces, ``None`` where each storage's bytes go (``crcs``: theirs; None: not known yet,
    and then only the pieces before the first storage are right)."""
    head = SERIALIZATION_ID_HEADS.get(len(sizes))
    if head is None:
        raise Unsupported(f"torch.save of {len(sizes)} storages")
    records = [("data.pkl", pkl), (".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little"),
               *[(f"data/{i}", n) for i, n in enumerate(sizes)], ("version", b"3\n")]
    out: list[bytes | None] = []
    directory = []  # (name, crc, size, offset, flags)
    pos, storage, combined = 0, 0, 0

    def record(name: str, data, crc: int) -> None:
        nonlocal pos, combined
        n = data if isinstance(data, int) else len(data)
        if n >= 0xFFFFFFFF:
            raise Unsupported("a record of 4 GiB or more (zip64 records)")
        raw = _name(name)
        flags = 0x0808 if n else 0x0800  # an empty record has no data descriptor
        header = _local_header(raw, pos, flags)
        out.extend([header, None] if isinstance(data, int) else [header + data])
        if n:
            out.append(_DESCRIPTOR.pack(0x08074B50, crc, n, n))
            combined = hash_combine(combined, crc)
        directory.append((raw, crc, n, pos, flags))
        pos += len(header) + n + (_DESCRIPTOR.size if n else 0)

    for name, data in records:
        if isinstance(data, int):  # a storage: its bytes are not here
            record(name, data, crcs[storage] if crcs is not None else 0)
            storage += 1
        else:
            record(name, data, zlib.crc32(data))
    sid = head + b"%020d" % combined
    record(".data/serialization_id", sid, zlib.crc32(sid))
    out.append(_directory(directory, pos))
    return out


class ItemLayout:
    """``torch.save`` of one tensor of ``shape``/``dtype`` around its bytes: ``prefix + <bytes> +
    suffix(crc)``, where ``crc`` is the CRC-32 of the tensor's bytes (an empty tensor: ``suffix(0)``);
    ``length`` bytes in all."""

    def __init__(self, shape, dtype: DType):
        ref = TensorRef(tuple(int(s) for s in shape), dtype)
        self.nbytes = ref.nbytes
        self._pkl = tensor_pickle(ref)
        pieces = _pieces(self._pkl, [self.nbytes], None)
        hole = pieces.index(None)
        self.prefix = b"".join(pieces[:hole])
        self.length = len(self.prefix) + self.nbytes + sum(len(p) for p in pieces[hole + 1:])

    def suffix(self, crc: int) -> bytes:
        pieces = _pieces(self._pkl, [self.nbytes], [crc])
        return b"".join(pieces[pieces.index(None) + 1:])


def _name(name: str) -> bytes:
    return (PREFIX + name).encode()


def _local_header(name: bytes, pos: int, flags: int) -> bytes:
    if pos >= 0xFFFFFFFF:
        raise Unsupported("an archive of 4 GiB or more (zip64 records)")
    start = pos + _LOCAL.size + len(name) + 4  # where the data would start with an empty FB field
    pad = -start % ALIGNMENT
    return (_LOCAL.pack(0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0, len(name), pad + 4) + name
            + b"FB" + struct.pack("<H", pad) + b"Z" * pad)


def _directory(records, at: int) -> bytes:
    out = bytearray()
    for name, crc, n, offset, flags in records:
        out += _CENTRAL.pack(0x02014B50, 0, 0, flags, 0, 0, 0, crc, n, n, len(name), 0, 0, 0, 0, 0, offset) + name
    count, size = len(records), len(out)
    out += _ZIP64_END.pack(0x06064B50, 44, 0x031E, 0x2D, 0, 0, count, count, size, at)
    out += _ZIP64_LOCATOR.pack(0x07064B50, 0, at + size, 1)
    out += _END.pack(0x06054B50, 0, 0, count, count, size, at, 0)
    return bytes(out)


def save_bytes(obj, storages=()) -> bytes:
    """``torch.save(obj)`` into memory. ``obj``: a ``TensorRef`` or a ``{str: TensorRef}`` dict, with
    ``storages`` their bytes in order; or a plain object without tensors (pickled as torch's pickler does:
    the standard protocol 2)."""
    refs = list(obj.values()) if isinstance(obj, dict) and obj and all(
        isinstance(v, TensorRef) for v in obj.values()) else [obj] if isinstance(obj, TensorRef) else []
    storages = [bytes(s) for s in storages]
    if len(storages) != len(refs) or any(len(s) != r.nbytes for s, r in zip(storages, refs)):
        raise ValueError("save_bytes needs one storage of the right size per tensor")
    pkl = tensor_pickle(obj) if refs else pickle.dumps(obj, protocol=2)
    pieces = _pieces(pkl, [len(s) for s in storages], [zlib.crc32(s) for s in storages])
    data = iter(storages)
    return b"".join(next(data) if p is None else p for p in pieces)
