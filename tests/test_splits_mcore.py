"""Every way the engine splits a tensor into DCP chunks is reassembled by megatron-core at load.

A tiny ``--max-memory`` makes tiny chunks: embedding and output layer in row blocks, fused QKV blocks
that straddle q/k/v and query-group boundaries, ``[gate; up]`` blocks that straddle the gate/up boundary,
and (at the smallest budget) even the norm vectors in pieces. megatron-core loads the result at default
strictness and its logits equal an independent forward of the HF weights.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from streamconv.cli import main
from streamconv.models import rules
from streamconv.models.config import spec_from_config
from streamconv.reference.forward import reference_logits
from streamconv.reference.synth import llama_config, make_checkpoint, mixed_decilm_config

mh = pytest.importorskip("mcore_harness")

TOKENS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))

CASES = {
    # name: (config, --max-memory, whether every tensor (norms too) must be split)
    # hidden 48 fp32: a [*, 48] row is 192 B; budget/8 = 960 B chunks = 5 rows, which straddle q/k/v and
    # query-group boundaries (every 12 rows) and the gate/up boundary (row 136)
    "llama-5-row-blocks": (llama_config(hidden=48, layers=2, heads=4, kv_heads=2, ffn=136, vocab=256), 7680, False),
    # 160 B chunks, under one 192 B row or norm vector: everything in pieces, the norms too
    "llama-everything-split": (llama_config(hidden=48, layers=2, heads=4, kv_heads=2, ffn=40, vocab=256,
                                            tied=True), 1280, True),
    # 7-row blocks (1344 B): FFN widths 256 and 512 and the head groups do not line up with them
    "decilm-every-block-7-row-blocks": (mixed_decilm_config(hidden=48, heads=8, vocab=256), 10752, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_split_loads_in_megatron(tmp_path, case):
    cfg, budget, norms_too = CASES[case]
    src = make_checkpoint(tmp_path / "hf", cfg, seed=7, shards=3)
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(tmp_path / "mcore"), "--quiet",
                 "--max-memory", str(budget)]) == 0
    ckpt = tmp_path / "mcore" / "iter_0000000"
    meta = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    spec = spec_from_config(cfg)

    # the splits this test is about really happened
    straddle = {"qkv": False, "gate_up": False}
    for b in rules.bindings(spec):
        m = meta[b.key]
        stacked = bool(b.stacked_layers)
        per_piece = [c for c in m.chunks if not stacked or c.offsets[0] == b.index[0]]
        if len(b.shape) == 2 or norms_too:
            assert len(per_piece) > 1, f"{b.key} {list(b.index)} is one chunk"
        rows = [(c.offsets[1 if stacked else 0], c.offsets[1 if stacked else 0] + c.sizes[1 if stacked else 0])
                for c in per_piece]
        if b.layout == "qkv":
            stride = (b.heads_per_group + 2) * b.head_dim
            bounds = {g * stride + o for g in range(b.shape[0] // stride)
                      for o in (b.heads_per_group * b.head_dim, (b.heads_per_group + 1) * b.head_dim, stride)}
            straddle["qkv"] |= any(r0 < x < r1 for r0, r1 in rows for x in bounds)
        if b.layout == "gate_up":
            half = b.shape[0] // 2
            straddle["gate_up"] |= any(r0 < half < r1 for r0, r1 in rows)
    if not norms_too:
        assert straddle == {"qkv": True, "gate_up": True}

    model = mh.build_hetero_gpt(cfg) if spec.heterogeneous else mh.build_gpt(cfg)
    assert mh.checkpoint_keys(ckpt) - {"common_state/shard_0_1"} == mh.model_checkpoint_keys(model)
    mh.load_checkpoint(model, ckpt, check_extra=False)  # default strictness
    weights = {}
    for f in sorted(src.glob("*.safetensors")):
        weights.update(load_file(f))
    ours = mh.logits(model, TOKENS)
    ref = reference_logits(cfg, weights, TOKENS)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4
