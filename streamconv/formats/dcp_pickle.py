"""``.metadata`` as a pickle, written without importing ``torch.distributed.checkpoint``.

``.metadata`` is a pickled ``torch.distributed.checkpoint.metadata.Metadata``. Importing that package
takes 1-1.5 s here (it pulls in DTensor, sympy, ...), more than a small conversion takes, and the writer
only needs the pickle's bytes. So this module emits the same object graph as pickle opcodes (protocol 4)
from plain stand-ins: ``Global`` (a class or function, by module and name), ``Call`` (a callable applied
to arguments: ``torch.Size((..))``) and ``New`` (``cls.__new__(cls)`` then its state, as ``pickle`` does
for dataclasses). Each object gets exactly the reduction ``pickle.dumps`` gives it
(``tests/test_dcp_pickle.py`` loads the result with the real classes and compares it with ``Metadata``
built from them, field by field, and with megatron-core loads everywhere else).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

DCP_METADATA = "torch.distributed.checkpoint.metadata"


@dataclass(frozen=True)
class Global:
    module: str
    name: str


@dataclass(frozen=True)
class Call:
    func: Global
    args: tuple


@dataclass(frozen=True, eq=False)  # by identity: a MetadataIndex is a dict key
class New:
    cls: Global
    state: object = None


def size(dims) -> Call:
    return Call(Global("torch", "Size"), (tuple(int(d) for d in dims),))


def tensor_properties(dtype_name: str) -> New:
    """``TensorProperties(dtype)``: strided, contiguous, no grad, not pinned (its ``__getstate__`` tuple)."""
    return New(Global(DCP_METADATA, "TensorProperties"), (
        Global("torch", dtype_name),
        Call(Global("torch.serialization", "_get_layout"), ("torch.strided",)),
        False,
        Call(Global(DCP_METADATA, "_MEM_FORMAT_ENCODING"), (0,)),  # TORCH_CONTIGUOUS_FORMAT
        False,
    ))


def metadata(targets, chunks_by_key, objects, storage) -> New:
    """The ``Metadata`` of a checkpoint. ``targets``: {key: (shape, dtype name)}; ``chunks_by_key``:
    {key: [(offsets, sizes)]}; ``objects``: [key]; ``storage``: [(key, offsets|None, relative_path, offset,
    length)]."""
    sd = {}
    for key, (shape, dtype) in targets.items():
        chunks = [New(Global(DCP_METADATA, "ChunkStorageMetadata"), {"offsets": size(o), "sizes": size(s)})
                  for o, s in chunks_by_key[key]]
        sd[key] = New(Global(DCP_METADATA, "TensorStorageMetadata"),
                      {"properties": tensor_properties(dtype), "size": size(shape), "chunks": chunks})
    for key in objects:
        sd[key] = New(Global(DCP_METADATA, "BytesStorageMetadata"))
    storage_data = {}
    for key, offsets, rel, off, length in storage:
        state = {"fqn": key, "index": None} if offsets is None else {"fqn": key, "index": None, "offset": size(offsets)}
        index = New(Global(DCP_METADATA, "MetadataIndex"), state)
        storage_data[index] = New(Global("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                                  {"relative_path": rel, "offset": int(off), "length": int(length)})
    storage_meta = New(Global(DCP_METADATA, "StorageMeta"),
                       {"checkpoint_id": None, "save_id": None, "load_id": None, "modules": []})
    return New(Global(DCP_METADATA, "Metadata"), {"state_dict_metadata": sd, "planner_data": None,
                                                  "storage_data": storage_data, "storage_meta": storage_meta,
                                                  "version": "1.0.0"})


def dumps(obj) -> bytes:
    out = bytearray(b"\x80\x04")  # PROTO 4
    _emit(obj, out)
    out += b"."  # STOP
    return bytes(out)


def _emit(obj, out: bytearray) -> None:
    if obj is None:
        out += b"N"
    elif obj is True:
        out += b"\x88"
    elif obj is False:
        out += b"\x89"
    elif isinstance(obj, int):
        if 0 <= obj < 256:
            out += b"K" + bytes((obj,))
        elif 0 <= obj < 65536:
            out += b"M" + struct.pack("<H", obj)
        elif -2**31 <= obj < 2**31:
            out += b"J" + struct.pack("<i", obj)
        else:
            data = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
            out += b"\x8a" + bytes((len(data),)) + data  # LONG1
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        out += (b"\x8c" + bytes((len(data),)) if len(data) < 256 else b"X" + struct.pack("<I", len(data))) + data
    elif isinstance(obj, tuple):
        out += b"("
        for x in obj:
            _emit(x, out)
        out += b"t"
    elif isinstance(obj, list):
        out += b"]"
        if obj:
            out += b"("
            for x in obj:
                _emit(x, out)
            out += b"e"  # APPENDS
    elif isinstance(obj, dict):
        out += b"}"
        if obj:
            out += b"("
            for k, v in obj.items():
                _emit(k, out)
                _emit(v, out)
            out += b"u"  # SETITEMS
    elif isinstance(obj, Global):
        _emit(obj.module, out)
        _emit(obj.name, out)
        out += b"\x93"  # STACK_GLOBAL
    elif isinstance(obj, Call):
        _emit(obj.func, out)
        _emit(obj.args, out)
        out += b"R"  # REDUCE
    elif isinstance(obj, New):
        _emit(obj.cls, out)
        out += b")\x81"  # EMPTY_TUPLE NEWOBJ
        if obj.state is not None:
            _emit(obj.state, out)
            out += b"b"  # BUILD
    else:
        raise TypeError(f"cannot write {type(obj).__name__} into .metadata")


# --------------------------------------------------------------------------- reading, without torch

class Record:
    """A DCP class as ``.metadata`` is read without torch (``sources/torch_dist.RestrictedUnpickler``): an
    inert object holding the fields pickle gives it (the state dict of a dataclass; an Enum's value). Its class
    is named as the DCP class it stands for (``record_class``): nothing of the checkpoint's is ever called."""

    def __init__(self, *args):
        self.args = args  # an Enum member rebuilt from its value (WriteItemType, _MEM_FORMAT_ENCODING)

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict, slots)
            state = {**(state[0] or {}), **state[1]}
        if not isinstance(state, dict):
            raise ValueError(f"{type(self).__name__}: state of type {type(state).__name__}")
        self.__dict__.update({str(k): v for k, v in state.items()})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class TensorPropertiesRecord(Record):
    """``TensorProperties`` pickles as a tuple: ``(dtype, layout, requires_grad, memory format, pin_memory)``."""

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise ValueError("TensorProperties: its state is not the 5 fields torch writes")
        self.dtype, self.layout, self.requires_grad, self.memory_format, self.pin_memory = state


_RECORDS: dict[str, type] = {}
# fields the DCP dataclasses default (pickle leaves out nothing, but a writer may: ours leaves out an object's
# MetadataIndex.offset, as DCP's own does not need it)
_DEFAULTS = {"MetadataIndex": {"offset": None, "index": None}, "_StorageInfo": {"transform_descriptors": None},
             "Metadata": {"planner_data": None, "storage_data": None, "storage_meta": None}}


def record_class(name: str) -> type:
    """The stand-in class of the DCP class ``name`` (one per name: ``type(x).__name__`` says what it is)."""
    cls = _RECORDS.get(name)
    if cls is None:
        cls = _RECORDS[name] = type(name, (TensorPropertiesRecord if name == "TensorProperties" else Record,),
                                    dict(_DEFAULTS.get(name, {})))
    return cls


class TorchConstant(str):
    """A torch value named in the file (``torch.strided``, ``torch.complex64``: not an element type streamconv
    reads, which are ``dtypes.DType``), kept as its name."""

    def __repr__(self) -> str:
        return f"torch.{str(self)}"


def torch_size(dims) -> tuple:
    """``torch.Size(dims)`` as read: a tuple."""
    return tuple(dims)
