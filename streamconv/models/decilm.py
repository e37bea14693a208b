"""DeciLM (``DeciLMForCausalLM``, ``model_type: nemotron-nas``: Nemotron Super 49B, Ultra 253B).

Each layer has its own ``block_configs`` entry: attention is full (with its own ``n_heads_in_group``),
skipped (``no_op``) or one linear map (``replace_with_linear``); the FFN is full (width from
``ffn_mult``), skipped or one linear map. megatron-core stores these with per-layer keys.
"""

from __future__ import annotations

from streamconv.errors import UnsupportedModelError
from streamconv.models import llama
from streamconv.models.spec import (ATTN_FULL, ATTN_LINEAR, ATTN_NOOP, MLP_FULL, MLP_LINEAR, MLP_NOOP, LayerSpec,
                                    ModelSpec, require)

# block_configs fields megatron-core cannot express: any value but these is refused.
_ATTN_UNSUPPORTED = {"sparsify": (None,), "window_length": (None,), "num_sink_tokens": (None,),
                     "unshifted_sink": (None, False), "use_prefill_window_in_sink_attention": (None, False)}
_FFN_UNSUPPORTED = {"sparsify": (None,)}


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def ffn_hidden_size(ffn_mult: float, hidden: int) -> int:
    """DeciLM's FFN width: ``find_multiple(int(2 * ffn_mult * hidden / 3), 256)``."""
    return find_multiple(int(2 * ffn_mult * hidden / 3), 256)


def _check(block: dict, unsupported: dict, where: str) -> None:
    for key, allowed in unsupported.items():
        if block.get(key) not in allowed:
            raise UnsupportedModelError(f"config.json: {where}: {key}={block.get(key)!r} is not supported")


def parse_layer(i: int, block: dict, hidden: int, heads: int) -> LayerSpec:
    attn, ffn = block.get("attention") or {}, block.get("ffn") or {}
    _check(attn, _ATTN_UNSUPPORTED, f"block_configs[{i}].attention")
    _check(ffn, _FFN_UNSUPPORTED, f"block_configs[{i}].ffn")
    if attn.get("no_op") and attn.get("replace_with_linear"):
        raise UnsupportedModelError(f"config.json: block_configs[{i}].attention is both no_op and replace_with_linear")
    if ffn.get("no_op") and ffn.get("replace_with_linear"):
        raise UnsupportedModelError(f"config.json: block_configs[{i}].ffn is both no_op and replace_with_linear")
    groups = None
    if attn.get("no_op"):
        attention = ATTN_NOOP
    elif attn.get("replace_with_linear"):
        attention = ATTN_LINEAR
    else:
        attention, per = ATTN_FULL, attn.get("n_heads_in_group")
        if not isinstance(per, int) or isinstance(per, bool) or per <= 0 or heads % per:
            raise UnsupportedModelError(
                f"config.json: block_configs[{i}].attention.n_heads_in_group={per!r} does not divide {heads} heads"
            )
        groups = heads // per
    width = None
    if ffn.get("no_op"):
        mlp = MLP_NOOP
    elif ffn.get("replace_with_linear"):
        mlp = MLP_LINEAR
    else:
        mult = ffn.get("ffn_mult")
        if not isinstance(mult, (int, float)) or isinstance(mult, bool) or mult <= 0:
            raise UnsupportedModelError(f"config.json: block_configs[{i}].ffn.ffn_mult={mult!r} must be a positive number")
        mlp, width = MLP_FULL, ffn_hidden_size(mult, hidden)
    return LayerSpec(attention, groups, mlp, width)


def parse_config(cfg: dict) -> ModelSpec:
    llama.check_common(cfg)
    hidden = require(cfg, "hidden_size")
    heads = require(cfg, "num_attention_heads")
    n_layers = require(cfg, "num_hidden_layers")
    blocks = cfg.get("block_configs")
    if not isinstance(blocks, list) or len(blocks) != n_layers:
        raise UnsupportedModelError(
            f"config.json: block_configs must list one entry per layer ({n_layers}), "
            f"got {len(blocks) if isinstance(blocks, list) else blocks!r}"
        )
    head_dim = cfg.get("head_dim") or hidden // heads
    if cfg.get("head_dim") is None and hidden % heads:
        raise UnsupportedModelError(f"config.json: hidden_size={hidden} is not a multiple of heads={heads}")
    return ModelSpec(
        family="decilm",
        architecture="DeciLMForCausalLM",
        hidden_size=hidden,
        num_attention_heads=heads,
        head_dim=head_dim,
        vocab_size=require(cfg, "vocab_size"),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        layers=tuple(parse_layer(i, b if isinstance(b, dict) else {}, hidden, heads) for i, b in enumerate(blocks)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        hf_config=cfg,
    )
