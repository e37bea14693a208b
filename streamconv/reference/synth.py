"""Synthetic Hugging Face checkpoints: seeded, any size, several shards, written tensor by tensor.

Used by ``streamconv demo``, the tests and the benchmarks (CLI: ``tools/make_checkpoint.py``). Values
are generated in fixed row blocks from a generator seeded by (seed, tensor name), so the same call
always writes the same bytes, and memory stays at one block whatever the model size.
"""

from __future__ import annotations

import json
import math
import random
import re
import zlib
from pathlib import Path

import torch

from streamconv.formats.safetensors import itemsize
from streamconv.sinks.safetensors import ShardWriter
from streamconv.models import rules
from streamconv.models.config import spec_from_config

BLOCK_ELEMS = 1 << 22  # values generated per block (fixed: it is part of what makes output deterministic)


def _common_fields(vocab, tied, dtype, rope_theta, rope_scaling) -> dict:
    """The config.json fields Llama and DeciLM configs share."""
    return {
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


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
        **_common_fields(vocab, tied, dtype, rope_theta, None),
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


KEEP_FP32 = re.compile(r"\.mixer\.gate\.(weight|e_score_correction_bias)$")


def dtype_of(name: str, dtype: torch.dtype) -> torch.dtype:
    """A tensor's dtype in a checkpoint of ``dtype``: transformers keeps a Nemotron-H router (its weight and
    score correction) in float32 whatever the model's dtype (``_keep_in_fp32_modules_strict``), and saves it so."""
    return torch.float32 if KEEP_FP32.search(name) else dtype


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
    sizes = [math.prod(s) * itemsize(dtype_of(n, dtype)) for n, s in tensors]
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
        writer = ShardWriter(out / fname, [(n, dtype_of(n, dtype), s) for n, s in group], metadata={"format": "pt"})
        for name, shape in group:
            for block in tensor_values(name, shape, dtype_of(name, dtype), seed):
                writer.write(name, block)
            weight_map[name] = fname
        writer.close()
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = dict(config)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


# --------------------------------------------------------------------------- tokenizer

TOKENIZER_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'-:;()\n"


def make_tokenizer(out: Path | str, vocab_size: int) -> Path:
    """A character-level Hugging Face tokenizer (``tokenizer.json``, ``tokenizer_config.json``) of
    ``vocab_size`` ids (<unk>, <s>, </s>, the characters, then unused filler) and a chat template, for
    synthetic models: ``AutoTokenizer.from_pretrained(out)`` loads it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in TOKENIZER_ALPHABET:
        vocab.setdefault(ch, len(vocab))
    for i in range(len(vocab), vocab_size):
        vocab[f"<extra_{i}>"] = i
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is below the {len(vocab)} tokens of the alphabet")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    fast.save_pretrained(str(out))
    return out


# --------------------------------------------------------------------------- FP8 checkpoints (Model Optimizer)

FP8_MAX = 448.0  # float8_e4m3fn


def _fp8_quantize(w: torch.Tensor, method: str, block) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale) as Model Optimizer computes them: scale = amax / 448 per tensor, per
    row or per block; weight = w / scale, rounded to float8_e4m3fn."""
    w = w.to(torch.float32)
    if method == "FP8":
        scale = (w.abs().max() / FP8_MAX).clamp(min=1e-12).reshape(())
        q = w / scale
    elif method == "FP8_PER_CHANNEL_PER_TOKEN":
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
        q = w / scale.unsqueeze(1)
    else:  # blocks
        b0, b1 = block
        rows, cols = w.shape
        nr, nc = math.ceil(rows / b0), math.ceil(cols / b1)
        padded = torch.nn.functional.pad(w.abs(), (0, nc * b1 - cols, 0, nr * b0 - rows))
        scale = (padded.view(nr, b0, nc, b1).amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
        q = w / scale.repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
    return q.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_checkpoint(src: Path | str, out: Path | str, method: str = "FP8", *, block=(128, 128),
                        exclude=("lm_head",), kv_scales: bool = True, shards: int = 2) -> Path:
    """An FP8 copy of the HF checkpoint ``src`` in ``out``, laid out as Model Optimizer exports one: every 2-D
    ``.weight`` of the decoder layers (``model.layers.*``, Nemotron-H's ``backbone.layers.*``) in float8_e4m3fn with its ``weight_scale`` (``FP8``: a scalar;
    ``FP8_PER_CHANNEL_PER_TOKEN``: one per row; ``FP8_PB_WO``: one per ``block``), an ``input_scale`` per
    quantized linear, ``k_scale``/``v_scale`` (FP8 kv cache), ``hf_quant_config.json`` and config.json's
    ``quantization_config``. ``method="fp8"``: the fine-grained format transformers reads instead
    (``weight_scale_inv`` per ``block``, ``quantization_config.weight_block_size``, no hf_quant_config.json).
    Embeddings, norms and ``exclude`` stay as they are."""
    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {}
    for f in sorted(src.glob("*.safetensors")):
        weights.update(load_file(f))
    tensors: dict[str, torch.Tensor] = {}
    for name, w in sorted(weights.items()):
        module = name.removesuffix(".weight")
        if (".layers." not in name or w.dim() != 2 or not name.endswith(".weight")
                or any(module.endswith(e) for e in exclude)):
            tensors[name] = w
            continue
        q, scale = _fp8_quantize(w, "FP8_PB_WO" if method == "fp8" else method, block)
        tensors[name] = q
        tensors[f"{module}.weight_scale_inv" if method == "fp8" else f"{module}.weight_scale"] = scale
        if method != "fp8":
            tensors[f"{module}.input_scale"] = torch.tensor(0.0125)
            if kv_scales and module.endswith(("k_proj", "v_proj")):
                tensors[f"{module}.{module[-6]}_scale"] = torch.tensor(1.0)
    names = sorted(tensors)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = json.loads((src / "config.json").read_text())
    if method == "fp8":
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                      "weight_block_size": list(block)}
    else:
        quant = {"quant_algo": method, "kv_cache_quant_algo": "FP8" if kv_scales else None,
                 "exclude_modules": list(exclude)}
        if method == "FP8_PB_WO":
            quant["block_size"] = list(block)
        (out / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt", "version": "0.29.0"}, "quantization": quant}, indent=4))
        cfg["quantization_config"] = {"quant_method": "modelopt", **quant}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def dequantized_copy(src: Path | str, out: Path | str) -> Path:
    """What ``src`` (an FP8 checkpoint) means: each weight ``bf16(fp8.float() * scale)`` (the config's dtype),
    scales dropped, as a plain checkpoint in ``out``: the reference for tests."""
    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    qc = cfg.pop("quantization_config", {})
    block = tuple(qc.get("weight_block_size") or qc.get("block_size") or (128, 128))
    dtype = getattr(torch, str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").removeprefix("torch."))
    weights = {}
    for f in sorted(src.glob("*.safetensors")):
        weights.update(load_file(f))
    plain = {}
    for name, w in weights.items():
        if name.endswith(("_scale", "_scale_inv")):
            continue
        scale = weights.get(name.removesuffix(".weight") + ".weight_scale",
                            weights.get(name.removesuffix(".weight") + ".weight_scale_inv"))
        if scale is None:
            plain[name] = w
            continue
        if scale.dim() == 0:
            full = scale
        elif scale.dim() == 1:
            full = scale.unsqueeze(1)
        else:
            full = scale.repeat_interleave(block[0], 0)[:w.shape[0]].repeat_interleave(block[1], 1)[:, :w.shape[1]]
        plain[name] = (w.to(torch.float32) * full).to(dtype)
    save_file(plain, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


# --------------------------------------------------------------------------- DeciLM (nemotron-nas) configs

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
# Published config.json files shipped with streamconv (see configs/README.md for where each comes from).
REAL_CONFIGS = {
    "nano-4b-v1.1": "llama-3_1-nemotron-nano-4b-v1_1.config.json",
    "nano-8b-v1": "llama-3_1-nemotron-nano-8b-v1.config.json",
    "70b-instruct-hf": "llama-3_1-nemotron-70b-instruct-hf.config.json",
    "super-49b-v1": "llama-3_3-nemotron-super-49b-v1.config.json",
    "ultra-253b-v1": "llama-3_1-nemotron-ultra-253b-v1.config.json",
}


def real_config(name: str) -> dict:
    """A shipped real ``config.json`` by short name (``REAL_CONFIGS``), e.g. ``"ultra-253b-v1"``."""
    if name not in REAL_CONFIGS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(REAL_CONFIGS)}")
    return json.loads((CONFIGS_DIR / REAL_CONFIGS[name]).read_text())


def decilm_block(attention: str = "full", n_heads_in_group: int | None = None, ffn: str = "full",
                 ffn_mult: float | None = None) -> dict:
    """One ``block_configs`` entry with the fields (and null values) of the published configs.

    ``attention`` and ``ffn`` are ``"full"``, ``"no_op"`` or ``"linear"`` (``replace_with_linear``).
    """
    for kind in (attention, ffn):
        if kind not in ("full", "no_op", "linear"):
            raise ValueError(f"block kind {kind!r}: choose full, no_op or linear")
    return {
        "attention": {
            "n_heads_in_group": n_heads_in_group if attention == "full" else None,
            "no_op": attention == "no_op",
            "num_sink_tokens": None,
            "replace_with_linear": attention == "linear",
            "sparsify": None,
            "unshifted_sink": False,
            "use_prefill_window_in_sink_attention": False,
            "window_length": None,
        },
        "ffn": {
            "ffn_mult": ffn_mult if ffn == "full" else None,
            "no_op": ffn == "no_op",
            "replace_with_linear": ffn == "linear",
            "sparsify": None,
        },
    }


def decilm_config(blocks: list[dict], hidden=64, heads=8, vocab=256, tied=False, dtype="float32",
                  rope_theta=10000.0, rope_scaling=None, **extra) -> dict:
    """A ``DeciLMForCausalLM`` (``nemotron-nas``) config.json dict with the given ``block_configs``."""
    cfg = {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "nemotron-nas",
        "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig",
                     "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"},
        "block_configs": [json.loads(json.dumps(b)) for b in blocks],
        "hidden_size": hidden,
        "intermediate_size": None,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": heads,
        "num_key_value_heads": None,
        **_common_fields(vocab, tied, dtype, rope_theta, rope_scaling),
    }
    cfg.update(extra)
    return cfg


def mixed_decilm_config(hidden=64, heads=8, vocab=256, **extra) -> dict:
    """A DeciLM config that uses every block variant megatron-core can express, one per layer.

    Layers: full attention with three different ``n_heads_in_group`` (2 and 4 query groups, and MHA), FFNs
    of three widths (``ffn_mult`` 2.625, 9 and 15: 256, 512 and 768 at hidden 64, different at any size),
    attention ``no_op``, attention ``replace_with_linear``, FFN ``no_op``, FFN ``replace_with_linear``,
    both replaced by linear maps, and a fully empty layer (both ``no_op``). ``heads`` must be a multiple of 4.
    """
    b = decilm_block
    blocks = [
        b("full", heads // 2, "full", 2.625),  # 2 query groups
        b("no_op", ffn="full", ffn_mult=9.0),  # attention skipped
        b("linear", ffn="full", ffn_mult=15.0),  # attention -> one linear map
        b("full", heads // 4, "no_op"),  # 4 query groups, FFN skipped
        b("full", 1, "linear"),  # MHA, FFN -> one linear map
        b("no_op", ffn="no_op"),  # fully empty layer
        b("linear", ffn="linear"),  # both linear
        b("full", heads // 2, "full", 1.0),
    ]
    return decilm_config(blocks, hidden=hidden, heads=heads, vocab=vocab, **extra)


def scale_config(cfg: dict, hidden: int, heads: int, layers=None, vocab: int | None = 512) -> dict:
    """A small copy of a real config that keeps its per-layer block pattern.

    DeciLM: every kept layer keeps its ``block_configs`` entry as is (``n_heads_in_group``, ``ffn_mult``,
    ``no_op``, ``replace_with_linear``), so the FFN widths follow ``ffn_mult`` at the new ``hidden`` exactly
    as in the real model, and ``heads`` must be a multiple of every ``n_heads_in_group``. Llama: the
    key/value heads keep their ratio to the heads and ``intermediate_size`` its ratio to ``hidden``;
    an explicit ``head_dim`` keeps its ratio to ``hidden / heads``.

    ``layers``: ``None`` keeps all layers, an int keeps the first N, a list keeps those layer indices in
    order. ``vocab=None`` keeps the real vocabulary size.
    """
    out = json.loads(json.dumps(cfg))
    n = cfg["num_hidden_layers"]
    if layers is None:
        keep = list(range(n))
    elif isinstance(layers, int):
        keep = list(range(min(layers, n)))
    else:
        keep = list(layers)
    if not keep or any(not 0 <= i < n for i in keep):
        raise ValueError(f"layers {layers!r}: choose indices in [0, {n})")
    old_hidden, old_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    out.pop("_name_or_path", None)
    out.update(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=len(keep))
    if vocab is not None:
        out["vocab_size"] = vocab
    if cfg.get("head_dim") is not None:
        head_dim = cfg["head_dim"] * old_heads * hidden / (old_hidden * heads)
        if head_dim != int(head_dim) or int(head_dim) % 2:
            raise ValueError(f"hidden={hidden}, heads={heads}: the scaled head_dim {head_dim} is not an even integer")
        out["head_dim"] = int(head_dim)
    elif hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"hidden={hidden}, heads={heads}: head_dim must be an even integer")
    if "block_configs" in cfg:
        out["block_configs"] = [json.loads(json.dumps(cfg["block_configs"][i])) for i in keep]
        for i, block in zip(keep, out["block_configs"]):
            per = (block.get("attention") or {}).get("n_heads_in_group")
            if per and heads % per:
                raise ValueError(f"heads={heads} is not a multiple of layer {i}'s n_heads_in_group={per}")
    else:
        kv = cfg.get("num_key_value_heads") or old_heads
        if (heads * kv) % old_heads:
            raise ValueError(f"heads={heads} cannot keep the ratio {old_heads}:{kv} of heads to kv heads")
        out["num_key_value_heads"] = heads * kv // old_heads
        out["intermediate_size"] = max(1, round(cfg["intermediate_size"] * hidden / old_hidden))
    return out
