"""DeciLM (``DeciLMForCausalLM``, ``model_type: nemotron-nas``: Nemotron Super 49B, Ultra 253B).

Each layer has its own ``block_configs`` entry: attention is full (with its own ``n_heads_in_group``),
skipped (``no_op``) or one linear map (``replace_with_linear``); the FFN is full (width from
``ffn_mult``), skipped or one linear map. megatron-core stores these with per-layer keys.
"""

from __future__ import annotations

from streamconv.errors import UnsupportedModelError
from streamconv.models import llama
from streamconv.models.spec import (ATTN_FULL, ATTN_LINEAR, ATTN_NOOP, MAX_DIM, MLP_FULL, MLP_LINEAR, MLP_NOOP,
                                    LayerSpec, ModelSpec, make_spec, require)

# block_configs fields streamconv maps; any other field must be absent or hold one of its "off" values
# (null/false in the published configs; newer DeciLM code adds fields such as llama4, mamba, moe, gated,
# hidden_act, parallel_blocks): a field that is set changes the math, and megatron-core cannot express it.
_ATTN_MAPPED = {"no_op", "replace_with_linear", "n_heads_in_group"}
_FFN_MAPPED = {"no_op", "replace_with_linear", "ffn_mult"}


def _off(key: str, value) -> bool:
    if key == "gated":  # newer DeciLM: true = the gated (SwiGLU) MLP, false = a plain MLP
        return value is None or value is True
    return value is None or value is False or (key == "hidden_act" and value == "silu")


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def ffn_hidden_size(ffn_mult: float, hidden: int) -> int:
    """DeciLM's FFN width: ``find_multiple(int(2 * ffn_mult * hidden / 3), 256)``."""
    return find_multiple(int(2 * ffn_mult * hidden / 3), 256)


def _refuse(i: int, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"config.json: layer {i} (block_configs[{i}]): {what}")


def _check_unmapped(i: int, part: str, entry: dict, mapped: set) -> None:
    for key, value in entry.items():
        if key not in mapped and not _off(key, value):
            raise _refuse(i, f"{part}{key}={str(value)[:60]} is not supported (megatron-core's heterogeneous "
                             f"layers express only no_op, replace_with_linear, n_heads_in_group and ffn_mult)")


def _flag(i: int, part: str, entry: dict, key: str) -> bool:
    value = entry.get(key, False)
    if value is not None and value is not False and value is not True:
        raise _refuse(i, f"{part}.{key}={str(value)[:60]} must be true or false")
    return bool(value)


def parse_layer(i: int, block, hidden: int, heads: int) -> LayerSpec:
    """One ``block_configs`` entry -> LayerSpec, or an error naming the layer."""
    if not isinstance(block, dict) or not isinstance(block.get("attention"), dict) \
            or not isinstance(block.get("ffn"), dict):
        raise _refuse(i, "each entry needs an 'attention' and an 'ffn' object")
    _check_unmapped(i, "", {k: v for k, v in block.items() if k not in ("attention", "ffn")}, set())
    attn, ffn = block["attention"], block["ffn"]
    _check_unmapped(i, "attention.", attn, _ATTN_MAPPED)
    _check_unmapped(i, "ffn.", ffn, _FFN_MAPPED)
    groups = None
    per = attn.get("n_heads_in_group")
    if _flag(i, "attention", attn, "no_op") + _flag(i, "attention", attn, "replace_with_linear") > 1:
        raise _refuse(i, "attention is both no_op and replace_with_linear")
    if attn.get("no_op") or attn.get("replace_with_linear"):
        attention = ATTN_NOOP if attn.get("no_op") else ATTN_LINEAR
        if per is not None:  # megatron-core's HeterogeneousTransformerConfig asserts on this combination
            raise _refuse(i, f"attention is {'no_op' if attn.get('no_op') else 'replace_with_linear'} but "
                             f"n_heads_in_group={str(per)[:20]} is set (megatron-core refuses that; it must be null)")
    else:
        if not isinstance(per, int) or isinstance(per, bool) or per <= 0 or heads % per:
            raise _refuse(i, f"attention.n_heads_in_group={str(per)[:20]} must be a positive integer dividing "
                             f"num_attention_heads={heads}")
        attention, groups = ATTN_FULL, heads // per
    width = None
    mult = ffn.get("ffn_mult")
    if _flag(i, "ffn", ffn, "no_op") + _flag(i, "ffn", ffn, "replace_with_linear") > 1:
        raise _refuse(i, "ffn is both no_op and replace_with_linear")
    if ffn.get("no_op") or ffn.get("replace_with_linear"):
        mlp = MLP_NOOP if ffn.get("no_op") else MLP_LINEAR
        if mult is not None:
            raise _refuse(i, f"ffn is {'no_op' if ffn.get('no_op') else 'replace_with_linear'} but "
                             f"ffn_mult={str(mult)[:20]} is set (megatron-core refuses that; it must be null)")
    else:
        if not isinstance(mult, (int, float)) or isinstance(mult, bool) or not 0 < mult < float("inf"):
            raise _refuse(i, f"ffn.ffn_mult={str(mult)[:20]} must be a positive number")
        mlp, width = MLP_FULL, ffn_hidden_size(mult, hidden)
        if width <= 0:
            raise _refuse(i, f"ffn.ffn_mult={mult} gives an empty FFN at hidden_size={hidden}")
        if width > MAX_DIM:
            raise _refuse(i, f"ffn.ffn_mult={mult} gives an FFN of {width:.3g} at hidden_size={hidden}: not a real model")
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
            f"got {len(blocks) if isinstance(blocks, list) else str(blocks)[:60]}"
        )
    if cfg.get("position_embedding_type") not in (None, "rope"):
        raise UnsupportedModelError(f"config.json: position_embedding_type={str(cfg['position_embedding_type'])[:40]!r}"
                                    f" is not supported (streamconv maps rope)")
    layers = [parse_layer(i, b, hidden, heads) for i, b in enumerate(blocks)]
    return make_spec(cfg, "decilm", "DeciLMForCausalLM", layers, default_dtype="bfloat16")
