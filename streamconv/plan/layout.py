"""How fused megatron tensors are made of HF row blocks: integer arithmetic only (no tensors, no torch).

Every fused megatron tensor is a row-wise concatenation of row blocks of HF tensors. A *layout* says
which: a list of ``Segment(src, src_row, dst_row, rows)`` meaning "rows ``[src_row, src_row+rows)`` of
source tensor ``src`` land at rows ``[dst_row, dst_row+rows)`` of the fused tensor". Import reads the
segments that overlap a block of fused rows; export reads the fused rows that feed a block of one source.
Both directions come from the same segment list, so they cannot drift, and both work on any row range
of any size, so a 28 GB fused tensor is handled in bounded pieces.

Layouts:
- ``copy``: one source, rows unchanged.
- ``gate_up``: megatron's ``linear_fc1`` = ``[gate; up]`` (SwiGLU).
- ``qkv``: megatron's ``linear_qkv`` interleaved per query group:
  ``[q (heads/groups heads), k (1 head), v (1 head)] x groups`` (head_dim rows per head).

The plan (``plan.py``) and ``verify`` use these; ``transforms.py`` applies them to whole tensors.
"""

from __future__ import annotations

from typing import NamedTuple


class Segment(NamedTuple):
    src: int  # which source tensor
    src_row: int  # first row in the source
    dst_row: int  # first row in the fused tensor
    rows: int


def layout_segments(layout: str, src_rows: list[int], heads_per_group: int = 1, head_dim: int = 1) -> list[Segment]:
    """The segments of ``layout`` for sources with ``src_rows`` rows each, sorted by ``dst_row``."""
    if layout == "copy":
        (n,) = src_rows
        return [Segment(0, 0, 0, n)]
    if layout == "gate_up":
        gate, up = src_rows
        if gate != up:
            raise ValueError(f"gate and up have different widths: {gate} != {up}")
        return [Segment(0, 0, 0, gate), Segment(1, 0, gate, up)]
    if layout == "qkv":
        q_rows, k_rows, v_rows = src_rows
        groups = k_rows // head_dim
        if k_rows != v_rows or q_rows != groups * heads_per_group * head_dim or k_rows % head_dim:
            raise ValueError(f"q/k/v rows {src_rows} do not fit {groups} groups of {heads_per_group} heads x {head_dim}")
        q_per, stride = heads_per_group * head_dim, (heads_per_group + 2) * head_dim
        out = []
        for g in range(groups):
            base = g * stride
            out += [
                Segment(0, g * q_per, base, q_per),
                Segment(1, g * head_dim, base + q_per, head_dim),
                Segment(2, g * head_dim, base + q_per + head_dim, head_dim),
            ]
        return out
    raise ValueError(f"unknown layout {layout!r}")


def fused_rows_of(segments: list[Segment]) -> int:
    return sum(s.rows for s in segments)


def sources_for_fused_rows(segments: list[Segment], row0: int, row1: int) -> list[tuple[int, int, int]]:
    """``(src, src_row0, src_row1)`` blocks whose concatenation is fused rows ``[row0, row1)``."""
    out = []
    for s in segments:
        lo, hi = max(row0, s.dst_row), min(row1, s.dst_row + s.rows)
        if lo < hi:
            a, b = s.src_row + lo - s.dst_row, s.src_row + hi - s.dst_row
            if out and out[-1][0] == s.src and out[-1][2] == a:  # merge contiguous reads
                out[-1] = (s.src, out[-1][1], b)
            else:
                out.append((s.src, a, b))
    return out


def fused_rows_for_source(segments: list[Segment], src: int, row0: int, row1: int) -> list[tuple[int, int]]:
    """``(fused_row0, fused_row1)`` blocks whose concatenation is rows ``[row0, row1)`` of source ``src``."""
    out = []
    for s in sorted((s for s in segments if s.src == src), key=lambda s: s.src_row):
        lo, hi = max(row0, s.src_row), min(row1, s.src_row + s.rows)
        if lo < hi:
            a, b = s.dst_row + lo - s.src_row, s.dst_row + hi - s.src_row
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
    return out
