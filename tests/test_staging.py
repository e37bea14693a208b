"""The zarr staging store: staged and direct writes give the same bytes, ``--keep-staging`` leaves a zarr of
the whole model that zarr-python reads back (bf16 as documented), and uneven chunkings map onto a regular
zarr grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from streamconv.cli import main
from streamconv.sinks.zarr_view import ZarrView, chunk_coords, grid_for
from streamconv.sources.torch_dist import TorchDistSource
from streamconv.plan.build import Chunk, Plan, Target
from streamconv.models import rules
from streamconv.models.config import spec_from_config
from streamconv.plan.build import import_plan
from streamconv.reference.synth import REAL_CONFIGS, llama_config, make_checkpoint, real_config

CFG = llama_config(hidden=64, layers=2, heads=8, kv_heads=2, ffn=96, vocab=192)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("st") / "hf", CFG, seed=11, shards=2, dtype=torch.bfloat16)


def convert(src, out, *extra) -> None:
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--quiet", "--max-memory", "64KiB",
                 "--distcp-size", "48KiB", *extra]) == 0


def checkpoint_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (out / "iter_0000000").iterdir() if p.is_file() and p.name != "run_config.yaml"}


def test_staged_and_direct_writes_are_byte_identical(src, tmp_path):
    convert(src, tmp_path / "staged")
    convert(src, tmp_path / "direct", "--no-staging")
    staged, direct = checkpoint_bytes(tmp_path / "staged"), checkpoint_bytes(tmp_path / "direct")
    assert sum(n.endswith(".distcp") for n in staged) >= 3
    assert staged == direct


def read_zarr_tensor(arr) -> torch.Tensor:
    """What the README tells zarr users to do with an array of the staging store."""
    data = arr[...]
    if arr.attrs["torch_dtype"] == "bfloat16":
        return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(data)


def test_keep_staging_is_a_zarr_of_the_whole_model(src, tmp_path):
    out = tmp_path / "out"
    convert(src, out)  # dropped staging ...
    assert not (out / ".streamconv" / "staging.zarr").exists()
    convert(src, out, "--keep-staging")  # ... then the same command with --keep-staging refills it
    group = zarr.open_group(out / ".streamconv" / "staging.zarr", mode="r")
    with TorchDistSource(out / "iter_0000000") as td:
        assert sorted(group.array_keys()) == sorted(td.tensors)
        for key, meta in td.tensors.items():
            arr = group[key]
            assert arr.metadata.zarr_format == 3 and arr.compressors == () and arr.shape == tuple(meta.shape)
            assert arr.attrs["torch_dtype"] == "bfloat16" and "uint16" in arr.attrs["encoding"]
            assert arr.dtype == np.uint16 and arr.nchunks_initialized == len(meta.chunks)  # one per item
            whole = read_zarr_tensor(arr)
            for c in meta.chunks:
                region = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))
                assert torch.equal(whole[region].view(torch.int16), td.read_item(key, c.offsets).view(torch.int16))


def test_uneven_chunks_map_onto_a_regular_grid(tmp_path):
    """Blocks of 4, 2 and 4 rows (as a plan splitting [gate; up] at an odd row would make): a grid of 2
    rows, each plan chunk whole zarr chunks, written, read back, checksummed and dropped as one."""
    assert grid_for((10, 3), [((0, 0), (4, 3)), ((4, 0), (4, 3)), ((8, 0), (2, 3))]) == (4, 3)
    assert grid_for((2, 10, 3), [((i, r, 0), (1, n, 3)) for i in range(2) for r, n in ((0, 6), (6, 4))]) == (1, 6, 3)
    regions = [((0, 0), (4, 3)), ((4, 0), (2, 3)), ((6, 0), (4, 3))]
    assert grid_for((10, 3), regions) == (2, 3)
    key = "decoder.final_layernorm.weight"
    chunks = [Chunk(key, o, s, (), 0, s[0] * s[1] * 2) for o, s in regions]
    plan = Plan("hf2mcore", None, {key: Target(key, (10, 3), torch.bfloat16)}, chunks)
    store = ZarrView(tmp_path / "s.zarr", plan)
    full = torch.randn(10, 3).to(torch.bfloat16)
    for c in chunks:
        crc = store.write(c, full[c.offsets[0]:c.offsets[0] + c.sizes[0]])
        assert store.checksum(c, torch.bfloat16) == crc
    assert [len(store.chunk_paths(c)) for c in chunks] == [2, 1, 2]
    assert torch.equal(store.read(chunks[2], torch.bfloat16), full[6:])
    store.drop(chunks[1])
    assert store.checksum(chunks[1], torch.bfloat16) is None  # missing, not "zeros"
    assert store.checksum(chunks[0], torch.bfloat16) is not None


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_models_stage_one_zarr_chunk_per_output_chunk(name):
    """The plans of the real Nemotron models (Nano .. Ultra) put every output chunk in exactly one zarr
    chunk of the staging grid, at the default chunk size and at a small one."""
    spec = spec_from_config(real_config(name))
    src = {t.name: torch.bfloat16 for t in rules.hf_tensors(spec)}
    for chunk_bytes in (64 << 20, 16 << 20):
        plan = import_plan(spec, src, None, chunk_bytes=chunk_bytes)
        regions: dict[str, list] = {}
        for c in plan.chunks:
            regions.setdefault(c.key, []).append((c.offsets, c.sizes))
        for key, regs in regions.items():
            grid = grid_for(plan.targets[key].shape, regs)
            assert all(len(chunk_coords(o, s, grid)) == 1 for o, s in regs), key
            assert grid == max(regs, key=lambda r: r[1])[1] or len(regs) == 1, key  # the plan's own row step
