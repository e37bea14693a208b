"""Element types as the plan sees them, without importing torch.

A conversion that only moves bytes (the common case: a bf16 checkpoint to a bf16 torch_dist, on the CPU)
never needs torch, whose import costs seconds; so plans, safetensors headers and the direct copier describe
element types with ``DType``, and code that makes tensors asks for ``dtype.torch`` (importing torch then).

A ``DType`` compares equal to the torch dtype of the same name (``DType == torch.bfloat16`` and the
reverse), prints as torch does (``torch.bfloat16``), and has torch's ``itemsize`` and
``is_floating_point``. It hashes by name, so dicts and sets of dtypes are keyed by ``DType`` (``of``
turns a torch dtype or a name into one).
"""

from __future__ import annotations


class DType:
    __slots__ = ("name", "itemsize", "safetensors", "is_floating_point", "is_float8")

    def __init__(self, name: str, itemsize: int, safetensors: str | None, floating: bool, float8: bool = False):
        self.name = name  # torch's name: torch.<name>
        self.itemsize = itemsize
        self.safetensors = safetensors  # the safetensors header's name ("BF16"), or None
        self.is_floating_point = floating
        self.is_float8 = float8

    @property
    def torch(self):
        import torch

        return getattr(torch, self.name)

    def __eq__(self, other) -> bool:
        if isinstance(other, DType):
            return other.name == self.name
        return type(other).__name__ == "dtype" and type(other).__module__ == "torch" and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return f"torch.{self.name}"

    __repr__ = __str__

    def __reduce__(self):
        return of, (self.name,)


FLOAT64 = DType("float64", 8, "F64", True)
FLOAT32 = DType("float32", 4, "F32", True)
FLOAT16 = DType("float16", 2, "F16", True)
BFLOAT16 = DType("bfloat16", 2, "BF16", True)
FLOAT8_E4M3FN = DType("float8_e4m3fn", 1, "F8_E4M3", True, float8=True)
FLOAT8_E5M2 = DType("float8_e5m2", 1, "F8_E5M2", True, float8=True)
FLOAT8_E4M3FNUZ = DType("float8_e4m3fnuz", 1, None, True, float8=True)
FLOAT8_E5M2FNUZ = DType("float8_e5m2fnuz", 1, None, True, float8=True)
INT64 = DType("int64", 8, "I64", False)
INT32 = DType("int32", 4, "I32", False)
INT16 = DType("int16", 2, "I16", False)
INT8 = DType("int8", 1, "I8", False)
UINT8 = DType("uint8", 1, "U8", False)
BOOL = DType("bool", 1, "BOOL", False)

ALL = (FLOAT64, FLOAT32, FLOAT16, BFLOAT16, FLOAT8_E4M3FN, FLOAT8_E5M2, FLOAT8_E4M3FNUZ, FLOAT8_E5M2FNUZ,
       INT64, INT32, INT16, INT8, UINT8, BOOL)
BY_NAME = {d.name: d for d in ALL}
BY_SAFETENSORS = {d.safetensors: d for d in ALL if d.safetensors}
FLOAT8 = frozenset(d for d in ALL if d.is_float8)


def of(dtype) -> DType:
    """``dtype`` (a DType, a torch dtype, or a name such as ``bfloat16`` / ``torch.bfloat16``) as a DType."""
    if isinstance(dtype, DType):
        return dtype
    name = str(dtype).removeprefix("torch.")
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}") from None


def maybe(dtype) -> DType | None:
    """``of(dtype)``, with None kept."""
    return None if dtype is None else of(dtype)


def to_torch(dtype):
    """The torch dtype for ``dtype`` (a DType, or already a torch dtype); None stays None."""
    return dtype.torch if isinstance(dtype, DType) else dtype
