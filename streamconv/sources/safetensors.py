"""The lazy safetensors source: a HF checkpoint folder's shards, read only where a plan asks (row slices).

Headers are parsed up front (``formats/safetensors.py``); every read after that is one byte range of a
shard (``extent``, the engine's ``spans``), which the engine reads itself (``preadv``): a shard is never loaded whole.
"""

from __future__ import annotations

import math
from pathlib import Path

from streamconv.dtypes import DType
from streamconv.engine.contracts import FileSource
from streamconv.errors import BadInputError
from streamconv.files.fileio import OpenFiles, read_exact
from streamconv.formats.safetensors import TensorInfo, itemsize, read_header, read_index


def rows_extent(info: TensorInfo, row0: int, row1: int, index: tuple[int, ...] = ()) -> tuple[Path, int, int]:
    """``(file, byte offset, length)`` of rows ``[row0, row1)`` of the tensor ``info`` describes (along dim 0,
    after the leading ``index``): one contiguous range, as a safetensors shard stores tensors row-major."""
    full = info.shape
    shape = full[len(index):]
    rows = shape[0] if shape else 1
    if len(index) > len(full) or any(not 0 <= i < n for i, n in zip(index, full)) or not 0 <= row0 <= row1 <= rows:
        raise BadInputError(
            f"{info.path}: rows [{row0}, {row1}) of index {list(index)} are outside tensor {info.name!r} {list(full)}"
        )
    row_bytes = math.prod(shape[1:]) * itemsize(info.dtype)
    first_row = 0
    for i, n in zip(index, full):  # row-major: flatten the leading index into a row number
        first_row = first_row * n + i
    first_row = first_row * rows + row0
    return info.path, info.start + first_row * row_bytes, (row1 - row0) * row_bytes


def tensors_of(where, shards, header_of, weight_map: dict | None, shard_path) -> dict[str, TensorInfo]:
    """Every tensor of ``shards`` (``header_of(shard)``: its parsed header): with an index (``weight_map``) only
    where the index puts it, and every tensor the index lists must be found; a tensor in two shards is refused.
    ``where`` (the model) and ``shard_path(shard)`` name them in messages."""
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in header_of(shard).items():
            if weight_map is not None and weight_map.get(name) != shard:
                continue  # the index is authoritative when present
            if name in tensors:
                raise BadInputError(f"{where}: tensor {name!r} is stored in two shards")
            tensors[name] = info
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise BadInputError(f"{shard_path(weight_map[missing[0]])}: tensor {missing[0]!r} is listed in the index "
                                "but not in the shard")
    return tensors


def rows_tensor(info: TensorInfo, buf, row0: int, row1: int, index: tuple[int, ...], scale=None):
    """Rows ``[row0, row1)`` of tensor ``info`` (after the leading ``index``) from their bytes ``buf``, as a
    tensor; a quantized weight's (``scale``: its ``sources.quantized.Scale``) as its float32 value."""
    import torch

    shape = info.shape[len(index):]
    out_shape = (row1 - row0, *shape[1:]) if shape else ()
    if len(buf) == 0:
        return torch.empty(out_shape, dtype=torch.float32 if scale is not None else info.dtype.torch)
    values = torch.frombuffer(buf, dtype=info.dtype.torch).view(out_shape)
    if scale is not None and not index:  # a quantized weight: its value, in float32
        from streamconv.engine.transforms import dequantize

        return dequantize(values, scale.values, scale.block, row0, torch.float32)
    return values


class SafetensorsSource(FileSource):
    """A lazy view of a HF checkpoint folder: one or more ``*.safetensors`` shards.

    With ``model.safetensors.index.json`` the index names each tensor's shard; without it every
    ``*.safetensors`` file in the folder is read. Headers only are parsed up front. Given the model's
    config (``cfg``), a quantized checkpoint's method is recognized and its scales read
    (``sources/quantized.py``): ``quant`` describes it, and ``dequant`` maps each quantized weight to its
    scale, so its reads give its dequantized values.
    """

    def __init__(self, folder: Path | str, cfg: dict | None = None):
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
        self.tensors = tensors_of(self.folder, shards, lambda shard: read_header(self.folder / shard), weight_map,
                                  lambda shard: self.folder / shard)
        self._files = OpenFiles()
        self.quant = None  # sources.quantized.Quantization of a quantized checkpoint
        self.dequant: dict = {}  # weight name -> sources.quantized.Scale: read_rows gives its float32 values
        if cfg is not None:
            from streamconv.sources import quantized

            try:
                self.quant = quantized.detect(self, self.folder, cfg)
            except BaseException:
                self.close()
                raise
            self.dequant = self.quant.scales if self.quant is not None else {}

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise BadInputError(f"{self.folder}: tensor {name!r} is needed but not in the checkpoint") from None

    def files(self) -> list[Path]:
        """The shard files the tensors are read from (as named in the folder: symlinks not resolved)."""
        return sorted({info.path for info in self.tensors.values()})

    def dtype_of(self, name: str) -> DType:
        return self.info(name).dtype

    def read_nbytes(self, read) -> int:
        """Bytes that ``read_rows`` returns for a plan ``Read``."""
        info = self.info(read.name)
        shape = info.shape[len(read.index):]
        return (read.row1 - read.row0) * math.prod(shape[1:]) * itemsize(info.dtype)

    def extent(self, name: str, row0: int, row1: int, index: tuple[int, ...] = ()) -> tuple[Path, int, int]:
        """``(file, byte offset, length)`` of rows ``[row0, row1)`` of tensor ``name`` (along dim 0, after the
        leading ``index``): one contiguous range, as tensors are stored row-major."""
        return rows_extent(self.info(name), row0, row1, index)

    def spans(self, read) -> list[tuple[Path, int, int]]:
        """The engine's reads (``FileSource``): a read's rows are one range of a shard."""
        return [self.extent(read.name, read.row0, read.row1, read.index)]

    def read_rows(self, name: str, row0: int, row1: int, index: tuple[int, ...] = ()):
        """Rows ``[row0, row1)`` of tensor ``name`` (along dim 0, after the leading ``index``), a tensor."""
        path, pos, length = self.extent(name, row0, row1, index)
        buf = bytearray(length)
        read_exact(self._files.fd(path), memoryview(buf), pos, path)
        return rows_tensor(self.info(name), buf, row0, row1, index, self.dequant.get(name))

    def close(self) -> None:
        self._files.close()
