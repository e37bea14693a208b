"""Synthetic Hugging Face checkpoints: seeded, any size, several shards, written tensor by tensor.

Used by ``streamconv demo``, the tests and the benchmarks (CLI: ``tools/make_checkpoint.py``). Values
are generated in fixed row blocks from a generator seeded by (seed, tensor name), so the same call
always writes the same bytes, and memory stays at one block whatever the model size.
"""

from __future__ import annotations

import json
import math
import random
import zlib
from pathlib import Path

import torch

from streamconv.formats.safetensors import ShardWriter, itemsize
from streamconv.models import rules
from streamconv.models.spec import spec_from_config

BLOCK_ELEMS = 1 << 22  # values generated per block (fixed: it is part of what makes output deterministic)


def llama_config(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=256, head_dim=None, tied=False,
                 dtype="float32", rope_theta=10000.0, **extra) -> dict:
    """A LlamaForCausalLM config.json dict."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    cfg.update(extra)
    return cfg


def tensor_values(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int):
    """Yield the tensor's values in row blocks (each a ``[rows, ...]`` tensor of ``dtype``)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if len(shape) == 1:  # norm weights: around 1
        yield (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
        return
    rows, row = shape[0], math.prod(shape[1:])
    scale = 1.0 / math.sqrt(row) if "embed" not in name else 0.5
    step = max(1, BLOCK_ELEMS // max(1, row))
    for r in range(0, rows, step):
        n = min(step, rows - r)
        yield (torch.randn((n, *shape[1:]), generator=gen) * scale).to(dtype)


def make_checkpoint(out: Path | str, config: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    shards: int = 3, shuffle: bool = True) -> Path:
    """Write ``config.json``, ``model-0000i-of-0000n.safetensors`` shards and the index into ``out``.

    ``shuffle`` stores tensors in a seeded order unlike the layer order (as real checkpoints may).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = spec_from_config(config)
    tensors = [(t.name, t.shape) for t in rules.hf_tensors(spec)]
    if shuffle:
        random.Random(seed).shuffle(tensors)
    sizes = [math.prod(s) * itemsize(dtype) for _, s in tensors]
    total, shards = sum(sizes), max(1, min(shards, len(tensors)))
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(shards)]
    acc = 0
    for (name, shape), size in zip(tensors, sizes):  # contiguous runs of ~equal bytes
        groups[min(shards - 1, acc * shards // max(1, total))].append((name, shape))
        acc += size
    groups = [g for g in groups if g]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else "model.safetensors"
        writer = ShardWriter(out / fname, [(n, dtype, s) for n, s in group], metadata={"format": "pt"})
        for name, shape in group:
            for block in tensor_values(name, shape, dtype, seed):
                writer.write(name, block)
            weight_map[name] = fname
        writer.close()
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = dict(config)
    cfg["torch_dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
