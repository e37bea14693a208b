"""Llama (``LlamaForCausalLM``: Nemotron Nano 4B/8B, 70B): config parsing.

The mapping table itself lives in ``rules.py`` (shared with DeciLM, whose full blocks are Llama blocks);
a Llama model is stored by megatron-core with layers stacked on a leading axis.
"""

from __future__ import annotations

from streamconv.errors import UnsupportedModelError
from streamconv.models.spec import LayerSpec, ModelSpec, make_spec, require

# Fields whose non-default values change the math megatron-core would run on these weights
# (absent = transformers' LlamaConfig default, which is the first value).
_MUST_BE = {
    "hidden_act": ("silu", None),
    "attention_bias": (False, None),
    "mlp_bias": (False, None),
}
_ROPE_TYPES = (None, "default", "llama3", "linear", "dynamic")


def check_common(cfg: dict) -> None:
    for key, allowed in _MUST_BE.items():
        if cfg.get(key) not in allowed:
            raise UnsupportedModelError(
                f"config.json: {key}={cfg.get(key)!r} is not supported (streamconv maps {key} in {allowed})"
            )
    rope = cfg.get("rope_scaling")
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if rope is not None and (not isinstance(rope, dict) or rope_type not in _ROPE_TYPES):
        raise UnsupportedModelError(f"config.json: rope_scaling {rope!r} is not supported")


def parse_config(cfg: dict) -> ModelSpec:
    check_common(cfg)
    heads = require(cfg, "num_attention_heads")
    n_layers = require(cfg, "num_hidden_layers")
    kv = cfg.get("num_key_value_heads") or heads
    ffn = require(cfg, "intermediate_size")
    if not isinstance(kv, int) or kv <= 0 or heads % kv:
        raise UnsupportedModelError(
            f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}"
        )
    layers = [LayerSpec(num_query_groups=kv, ffn_hidden_size=ffn) for _ in range(n_layers)]
    return make_spec(cfg, "llama", "LlamaForCausalLM", layers, default_dtype="float32")
