"""The Zarr v3 view of a conversion (``--keep-staging``): the whole model in megatron layout.

``<megatron-path>/.streamconv/staging.zarr`` (zarr-python 3 API): one array per megatron key in its global
shape, uncompressed (a plain ``bytes`` codec, little-endian), ``write_empty_chunks`` on, a regular chunk grid
on which every plan chunk is exactly one zarr chunk (the plan's row step; ``import_plan``'s row blocks are
each one chunk, or its leading rows for the last block of an array, which zarr pads to the full chunk
shape). numpy has no bfloat16: bf16 arrays are stored as their raw bits in ``uint16`` (fp8 in ``uint8``)
and say so in their attributes (``torch_dtype``, ``encoding``); float32/float16 arrays are stored as such.

The torch_dist sink (``torch_dist_sink.py``) writes every chunk's bytes into its ``.distcp`` and, in the
same pass from the same buffer, into its zarr chunk file here (``open_chunk``/``close_chunk``): one extra
write per byte, no extra read. A chunk a resumed run did not write (an earlier run did, or it was dropped)
is copied from its ``.distcp`` at the end (``finish``), and the store is fsynced. Without
``--keep-staging`` there is no store: the journal (``resume.py``) keeps what resume needs.
"""

from __future__ import annotations

import math
import os
import sys
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from streamconv.dtypes import to_torch
from streamconv.errors import UsageError, output_error
from streamconv.files.atomic import fsync_dir, fsync_file
from streamconv.files.pagecache import copy_range

ENCODING_BF16 = "raw bfloat16 bits in uint16: view as bfloat16 (torch: .view(torch.bfloat16); numpy: ml_dtypes)"
ENCODING_FP8 = "raw float8 bits in uint8: view as the torch_dtype attribute says"

# torch dtype -> (zarr/numpy dtype, dtype to view a torch tensor as before .numpy())
_ENCODINGS: dict[torch.dtype, tuple[str, torch.dtype]] = {
    torch.float32: ("float32", torch.float32),
    torch.float16: ("float16", torch.float16),
    torch.float64: ("float64", torch.float64),
    torch.bfloat16: ("uint16", torch.int16),
    torch.float8_e4m3fn: ("uint8", torch.uint8),
    torch.float8_e5m2: ("uint8", torch.uint8),
    torch.int64: ("int64", torch.int64),
    torch.int32: ("int32", torch.int32),
    torch.int16: ("int16", torch.int16),
    torch.int8: ("int8", torch.int8),
    torch.uint8: ("uint8", torch.uint8),
    torch.bool: ("bool", torch.bool),
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    zdtype, view = _ENCODINGS[to_torch(t.dtype)]
    return t.contiguous().view(view).numpy().view(zdtype)


def _from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    _, view = _ENCODINGS[to_torch(dtype)]
    t = torch.from_numpy(np.ascontiguousarray(a).view(torch.empty((), dtype=view).numpy().dtype))
    return t.view(to_torch(dtype))


def crc32(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (C order)."""
    return zlib.crc32(_to_numpy(t).reshape(-1).view(np.uint8))


def grid_for(shape: tuple[int, ...], regions) -> tuple[int, ...]:
    """The coarsest regular chunk shape on which every ``(offsets, sizes)`` region is whole chunks: per
    dimension, the gcd of every region boundary inside the array (the row step for row-block plans)."""
    grid = []
    for d, n in enumerate(shape):
        g = 0
        for offsets, sizes in regions:
            for b in (offsets[d], offsets[d] + sizes[d]):
                if 0 < b < n:
                    g = math.gcd(g, b)
        grid.append(g or max(1, n))
    return tuple(grid)


def chunk_coords(offsets, sizes, grid) -> list[tuple[int, ...]]:
    """The zarr chunk coordinates covering region ``(offsets, sizes)`` on a chunk grid ``grid``."""
    out: list[tuple[int, ...]] = [()]
    for o, s, g in zip(offsets, sizes, grid):
        out = [c + (i,) for c in out for i in (range(o // g, (o + s - 1) // g + 1) if s else ())]
    return out


def _is_prefix(sizes, grid) -> bool:
    """Whether a region of ``sizes`` at a chunk's origin is the first elements of the chunk in C order."""
    k = next((i for i, s in enumerate(sizes) if s != 1), len(sizes))  # leading 1s pin the origin
    return all(s == g for s, g in zip(sizes[k + 1:], grid[k + 1:]))  # then a range from 0, then full dims


# --------------------------------------------------------------------------- the store

class StagedChunkMissing(Exception):
    pass


class ZarrView:
    """The zarr view of one plan: write, read back, checksum and drop plan chunks."""

    def __init__(self, path: Path, plan, fsync_chunks: bool = False):
        import zarr
        from zarr.storage import LocalStore

        self.path = Path(path)
        self.fsync_chunks = fsync_chunks
        self.raw_layout = sys.byteorder == "little"  # chunk files hold the raw little-endian elements
        self.written: set[tuple] = set()  # chunks whose bytes this run wrote
        regions: dict[str, list] = defaultdict(list)
        for c in plan.chunks:
            regions[c.key].append((c.offsets, c.sizes))
        try:
            self.group = zarr.open_group(store=LocalStore(self.path), mode="a", zarr_format=3,
                                         attributes={"streamconv": "megatron-core torch_dist layout, one array per key"})
            self.arrays = {key: self._array(key, t.shape, t.dtype, grid_for(t.shape, regions[key]))
                           for key, t in plan.targets.items()}
        except OSError as e:
            raise output_error(self.path, e) from e

    def _array(self, key: str, shape, dtype: torch.dtype, grid):
        zdtype, _ = _ENCODINGS[to_torch(dtype)]
        attrs = {"torch_dtype": dtype_name(dtype)}
        if dtype == torch.bfloat16:
            attrs["encoding"] = ENCODING_BF16
        elif zdtype == "uint8" and dtype != torch.uint8:
            attrs["encoding"] = ENCODING_FP8
        try:
            a = self.group[key]
            if (tuple(a.shape) == tuple(shape) and tuple(a.chunks) == tuple(grid) and str(a.dtype) == zdtype
                    and a.attrs.get("torch_dtype") == attrs["torch_dtype"]):
                return a
        except KeyError:
            pass
        names = [f"{key}.dim{i}" for i in range(len(shape))]
        if key.startswith("decoder.layers.") and not key.split(".")[2].isdigit():
            names[0] = "layer"  # a stacked [L, ...] key: the same L for all of them, so they line up in xarray
        return self.group.create_array(name=key, shape=tuple(shape), chunks=tuple(grid), dtype=zdtype,
                                       compressors=None, filters=None, fill_value=0,
                                       config={"write_empty_chunks": True}, attributes=attrs,
                                       dimension_names=names, overwrite=True)

    @staticmethod
    def _region(chunk):
        return tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))

    def chunk_paths(self, chunk) -> list[Path]:
        """The zarr chunk files holding ``chunk`` (one for a plan on its own row step)."""
        a = self.arrays[chunk.key]
        base = self.path / chunk.key
        return [base / a.metadata.encode_chunk_key(c) for c in chunk_coords(chunk.offsets, chunk.sizes, a.chunks)]

    def write(self, chunk, tensor: torch.Tensor) -> int:
        """Stage ``chunk``; returns the CRC-32 of its bytes."""
        data = _to_numpy(tensor.reshape(chunk.sizes))
        crc = zlib.crc32(data.reshape(-1).view(np.uint8))
        try:
            self.arrays[chunk.key][self._region(chunk)] = data
            if self.fsync_chunks:
                for p in self.chunk_paths(chunk):
                    fsync_file(p)
        except OSError as e:
            raise output_error(self.path / chunk.key, e) from e
        return crc

    def raw_file(self, chunk) -> Path | None:
        """The file whose first ``chunk.nbytes`` bytes are the chunk's elements in C order, if there is one:
        when the chunk is one zarr chunk whose leading elements it is (always, for ``import_plan``'s row
        blocks). With the plain little-endian ``bytes`` codec a chunk file is the chunk's elements in C
        order (zarr pads an edge chunk to the full chunk shape; a row block is its prefix)."""
        paths = self.chunk_paths(chunk)
        if len(paths) == 1 and self.raw_layout and _is_prefix(chunk.sizes, self.arrays[chunk.key].chunks):
            return paths[0]
        return None

    def read(self, chunk, dtype: torch.dtype) -> torch.Tensor:
        """The staged bytes of ``chunk`` (raises ``StagedChunkMissing`` if any of its files is absent):
        straight from its ``raw_file`` if it has one, otherwise through zarr's own indexing."""
        paths = self.chunk_paths(chunk)
        for p in paths:
            if not p.is_file():
                raise StagedChunkMissing(str(p))
        raw = self.raw_file(chunk)
        if raw is not None:
            nbytes = chunk.nbytes
            data = np.fromfile(raw, dtype=np.uint8, count=nbytes)
            if data.nbytes != nbytes:
                raise ValueError(f"{raw}: torn staged chunk ({data.nbytes} of {nbytes} bytes)")
            return torch.from_numpy(data).view(to_torch(dtype)).reshape(chunk.sizes)
        return _from_numpy(self.arrays[chunk.key][self._region(chunk)], dtype).reshape(chunk.sizes)

    def checksum(self, chunk, dtype: torch.dtype) -> int | None:
        """CRC-32 of the staged chunk as it is on disk; None if missing or unreadable (torn)."""
        try:
            return crc32(self.read(chunk, dtype))
        except Exception:  # a torn chunk file fails zarr's decode in various ways: it is redone
            return None

    def drop(self, chunk) -> None:
        for p in self.chunk_paths(chunk):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ the view written beside the .distcp

    def check_raw(self, plan) -> None:
        """Every chunk must be one zarr chunk file holding its bytes as they are (``raw_file``)."""
        if not self.raw_layout:
            raise UsageError("--keep-staging needs a little-endian host (zarr chunks hold raw little-endian bytes)")
        odd = next((c for c in plan.chunks if self.raw_file(c) is None), None)
        if odd is not None:
            raise UsageError(f"--keep-staging: chunk {odd.key} {list(odd.offsets)} is not one zarr chunk")

    def _padded_nbytes(self, chunk) -> int:
        a = self.arrays[chunk.key]
        return math.prod(a.chunks) * np.dtype(str(a.dtype)).itemsize

    def open_chunk(self, chunk) -> int:
        """A descriptor to write ``chunk``'s bytes to, from offset 0 of its zarr chunk file."""
        path = self.raw_file(chunk)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise output_error(path, e) from e

    def close_chunk(self, chunk, fd: int) -> None:
        """The chunk's bytes are written: pad it to zarr's full chunk shape (zeros: the fill value)."""
        try:
            os.ftruncate(fd, self._padded_nbytes(chunk))
        except OSError as e:
            raise output_error(self.raw_file(chunk), e) from e
        finally:
            os.close(fd)
        self.written.add(chunk.id)

    def finish(self, sink) -> None:
        """Chunks this run did not write are copied from their ``.distcp``; then the store is made durable."""
        for c in sink.plan.chunks:
            if c.id in self.written:
                continue
            path, at, n = sink.item_bytes(c)
            fd = self.open_chunk(c)
            try:
                src = os.open(path, os.O_RDONLY)
                try:
                    copy_range(src, at, fd, 0, n)
                finally:
                    os.close(src)
            except OSError as e:
                os.close(fd)
                raise output_error(self.raw_file(c), e) from e
            self.close_chunk(c, fd)
        self.fsync_all()

    def fsync_all(self) -> None:
        for dirpath, _, files in os.walk(self.path):
            for f in files:
                fsync_file(Path(dirpath) / f)
            fsync_dir(Path(dirpath))
