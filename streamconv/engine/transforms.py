"""Pure tensor transforms between HF and megatron-core layouts (``layout.py`` says which rows go where).

``gather``/``cast`` make a chunk of row blocks; ``fuse``/``split`` apply a layout to whole tensors (the
reference form of the row-block recipes); ``dequantize`` turns float8 weights and their scales into
values. No I/O, no globals: the functions take tensors (on any device) or integers and return new ones.
"""

from __future__ import annotations

import numpy as np
import torch

from streamconv.dtypes import to_torch
from streamconv.plan.layout import fused_rows_for_source, fused_rows_of, layout_segments, sources_for_fused_rows


def gather(parts: list[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Concatenate row blocks and cast: the one tensor operation every recipe needs."""
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return cast(out, dtype) if dtype is not None else out


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(to_torch(dtype))


def fuse(layout: str, sources: list[torch.Tensor], heads_per_group: int = 1, head_dim: int = 1) -> torch.Tensor:
    """The whole fused tensor from whole sources (reference form of the row-block recipes)."""
    segs = layout_segments(layout, [s.shape[0] for s in sources], heads_per_group, head_dim)
    return gather([sources[i][a:b] for i, a, b in sources_for_fused_rows(segs, 0, fused_rows_of(segs))])


def split(layout: str, fused: torch.Tensor, src_rows: list[int], heads_per_group: int = 1, head_dim: int = 1):
    """Inverse of ``fuse``: the source tensors, from the whole fused tensor."""
    segs = layout_segments(layout, src_rows, heads_per_group, head_dim)
    return [gather([fused[a:b] for a, b in fused_rows_for_source(segs, j, 0, n)]) for j, n in enumerate(src_rows)]


_FLOAT8_VALUES: dict = {}  # float8 dtype -> its 256 values as float32 (numpy), torch's own conversion
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # a tensor's bits, by element size


def _values_of(dtype: torch.dtype) -> np.ndarray:
    table = _FLOAT8_VALUES.get(dtype)
    if table is None:
        table = _FLOAT8_VALUES[dtype] = torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float32).numpy()
    return table


def _lookup(table: torch.Tensor, values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``table[byte]`` for each float8 element of ``values`` (into ``out`` if given): a 256-entry table
    look-up (torch's float8 conversion is element by element; a look-up runs at memory speed)."""
    codes = values.contiguous().view(torch.uint8).numpy()
    ints = INT_VIEW[table.element_size()]
    if out is None:
        return torch.from_numpy(np.take(table.contiguous().view(ints).numpy(), codes, mode="clip")).view(table.dtype)
    np.take(table.contiguous().view(ints).numpy(), codes, out=out.view(ints).numpy(), mode="clip")  # unbuffered
    return out


def dequantize(values: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, row0: int,
               out_dtype: torch.dtype, out: torch.Tensor | None = None, work: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Rows ``[row0, row0 + n)`` of a quantized weight (``values``: ``[n, cols]`` float8) as ``out_dtype``:
    ``fp8.float() * scale`` in float32, rounded once. ``scale``: float32 ``[]`` (per tensor), ``[rows]`` (per
    row), or ``[row blocks, col blocks]`` with ``block`` = (rows, cols) of a block. ``out`` (``[n, cols]``
    of ``out_dtype``) and ``work`` (``[n, cols]`` float32) are used instead of new tensors when given.

    The same bits as ``(values.float() * expanded_scale).to(out_dtype)``: per tensor, through a table of the
    256 possible products; otherwise the float32 values through a table, then the products."""
    out_dtype = to_torch(out_dtype)
    f32 = torch.from_numpy(_values_of(values.dtype))
    if block is None and scale.dim() == 0:
        return _lookup((f32 * scale).to(out_dtype), values, out)
    x = _scaled(_lookup(f32, values, work), scale, block, row0)
    if out_dtype == torch.float32:
        return x if out is None else out.copy_(x)
    return x.to(out_dtype) if out is None else out.copy_(x)


def _scaled(x: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, row0: int) -> torch.Tensor:
    """``x`` (float32 ``[n, cols]``: rows ``[row0, row0 + n)``) multiplied in place by its scales."""
    n, cols = x.shape
    if block is None:
        return x.mul_(scale if scale.dim() == 0 else scale[row0:row0 + n].unsqueeze(1))
    b0, b1 = block
    by_row = scale.index_select(0, torch.arange(row0, row0 + n, device=scale.device) // b0)  # [n, col blocks]
    whole = cols // b1
    if whole:
        x[:, :whole * b1].view(n, whole, b1).mul_(by_row[:, :whole].unsqueeze(2))
    if cols % b1:
        x[:, whole * b1:].mul_(by_row[:, whole:whole + 1])
    return x


def dequantize_on_device(values: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, row0: int,
                         out: torch.Tensor) -> torch.Tensor:
    """``dequantize`` with tensor operations only, where ``values`` (float8 ``[n, cols]``), ``scale`` and
    ``out`` (``[n, cols]`` of the output dtype) live: the CUDA stage's form (``device.CudaStage``). The same
    bits as the table look-ups: the float8 -> float32 conversion is exact, the product is one float32
    multiplication, and the cast rounds to nearest even on every device."""
    x = _scaled(values.to(torch.float32), scale, block, row0)
    return out.copy_(x)
