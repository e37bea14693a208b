"""``formats/torch_save.py`` writes what ``torch.save`` writes, byte for byte, without torch: tensor items of
every shape and output dtype (empty ones included), a tensor split into its layout and its CRC-completed tail,
plain objects (``common.pt``, object items) and the dict of 0-d tensors of ``train_state.pt``."""

from __future__ import annotations

import io
import zlib

import pytest
import torch

from streamconv import dtypes
from streamconv.formats import run_config, torch_save
from streamconv.formats.torch_dist import COMMON_STATE


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def raw(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


SHAPES = [(), (1,), (7,), (0,), (0, 5), (5, 0), (3, 5), (2, 3, 4), (1, 2, 3, 4), (2, 1, 3, 1, 2), (300, 700),
          (255,), (256,), (65535,), (65536,), (70000, 3)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64,
                                   torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool])
def test_a_tensor_item_is_torch_saves_archive(dtype):
    g = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        t = (torch.rand(shape, generator=g) * 100).to(dtype)
        want = saved(t)
        ref = torch_save.TensorRef(shape, dtypes.of(dtype))
        assert torch_save.save_bytes(ref, [raw(t)]) == want, shape
        layout = torch_save.ItemLayout(shape, dtypes.of(dtype))
        assert layout.prefix + raw(t) + layout.suffix(zlib.crc32(raw(t))) == want, shape
        assert layout.length == len(want)


def test_objects_and_the_train_state_are_torch_saves_archives():
    for obj in [[None], [dict(COMMON_STATE)], dict(COMMON_STATE)]:
        assert torch_save.save_bytes(obj) == saved(obj)
    state = run_config.train_state_tensors(0)
    tensors = {k: torch.tensor(v, dtype=getattr(torch, d)) for k, (v, d) in state.items()}
    refs = {k: torch_save.TensorRef((), dtypes.of(d)) for k, (_, d) in state.items()}
    assert torch_save.save_bytes(refs, [raw(t) for t in tensors.values()]) == saved(tensors)
    assert torch.load(io.BytesIO(torch_save.save_bytes(refs, [raw(t) for t in tensors.values()])),
                      weights_only=True)["step"].item() == 0


def test_what_is_not_reproduced_is_refused_not_guessed():
    with pytest.raises(torch_save.Unsupported):
        torch_save.ItemLayout((4,), dtypes.FLOAT8_E4M3FN)
    with pytest.raises(torch_save.Unsupported):  # zip64 records
        torch_save.ItemLayout((2**32,), dtypes.UINT8)
    with pytest.raises(torch_save.Unsupported):
        torch_save.save_bytes({"a": torch_save.TensorRef((1,), dtypes.FLOAT32),
                               "b": torch_save.TensorRef((1,), dtypes.FLOAT32)}, [b"\0" * 4] * 2)
