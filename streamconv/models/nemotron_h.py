"""Nemotron-H (``NemotronHForCausalLM``: Nemotron-H 4B-56B, Nemotron Nano 9B/12B v2, Nemotron 3 Nano/Super/Ultra):
config parsing.

A hybrid model: each layer is one mixer, named by ``hybrid_override_pattern`` (``M`` Mamba2, ``*`` attention
without RoPE, ``-`` a squared-ReLU MLP, ``E`` a mixture of experts), or by ``layers_block_type`` (what
transformers 5 writes). megatron-core stores it with per-layer keys. The facts are in
``shared/reference/nemotron_h/NEMOTRON_H.md``; the mapping rows in ``rules.py``.
"""

from __future__ import annotations

import dataclasses

from streamconv.errors import UnsupportedModelError
from streamconv.models.spec import ATTN_FULL, ATTN_NOOP, MLP_FULL, MLP_NOOP, LayerSpec, ModelSpec, make_spec, require

MAMBA, ATTENTION, MLP, MOE = "M", "*", "-", "E"
BLOCK_TYPES = {"linear_attention": MAMBA, "mamba": MAMBA, "full_attention": ATTENTION, "attention": ATTENTION,
               "mlp": MLP, "moe": MOE}
_MUST_BE = {"mlp_hidden_act": ("relu2", None), "mamba_hidden_act": ("silu", None), "attention_bias": (False, None),
            "mlp_bias": (False, None), "use_conv_bias": (True, None), "mamba_proj_bias": (False, None),
            "residual_in_fp32": (False, None)}


def layer_kinds(cfg: dict) -> list[str]:
    """One of M * - E per layer, from ``hybrid_override_pattern`` or ``layers_block_type``."""
    pattern = cfg.get("hybrid_override_pattern")
    if pattern is not None:
        if not isinstance(pattern, str) or not pattern or set(pattern) - {MAMBA, ATTENTION, MLP, MOE}:
            raise UnsupportedModelError(f"config.json: hybrid_override_pattern {str(pattern)[:80]!r} must be a "
                                        "string of M, *, - and E (pipeline '|' and MTP '/' marks are not read)")
        return list(pattern)
    types = cfg.get("layers_block_type")
    if not isinstance(types, list) or not types or not all(t in BLOCK_TYPES for t in types):
        raise UnsupportedModelError("config.json: a Nemotron-H config needs hybrid_override_pattern or "
                                    f"layers_block_type (of {', '.join(BLOCK_TYPES)})")
    return [BLOCK_TYPES[t] for t in types]


def mtp_kinds(cfg: dict) -> list[str]:
    """The layers of one multi-token-prediction depth (``mtp_hybrid_override_pattern``, or transformers 5's
    ``mtp_layers_block_type``); empty when the config has no MTP (``num_nextn_predict_layers`` 0)."""
    if not mtp_depths(cfg):
        return []
    pattern = cfg.get("mtp_hybrid_override_pattern")
    if pattern is None and cfg.get("mtp_layers_block_type") is not None:
        return layer_kinds({"layers_block_type": cfg["mtp_layers_block_type"]})
    if pattern is None:
        raise UnsupportedModelError("config.json: num_nextn_predict_layers is set but neither "
                                    "mtp_hybrid_override_pattern nor mtp_layers_block_type says what an MTP depth holds")
    return layer_kinds({"hybrid_override_pattern": pattern})


def mtp_depths(cfg: dict) -> int:
    """``num_nextn_predict_layers``: how many tokens ahead the MTP head predicts (megatron's ``mtp_num_layers``)."""
    n = cfg.get("num_nextn_predict_layers") or 0
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 64:
        raise UnsupportedModelError(f"config.json: num_nextn_predict_layers={str(n)[:40]} must be an integer 0-64")
    return n


def mtp_repeated(cfg: dict) -> bool:
    """One MTP depth's layers shared by every depth (``mtp_use_repeated_layer``; Megatron-Bridge's default for
    Nemotron-H is true): megatron-core then holds one set, ``mtp.layers.0``."""
    value = cfg.get("mtp_use_repeated_layer")
    if value is not None and not isinstance(value, bool):
        raise UnsupportedModelError(f"config.json: mtp_use_repeated_layer={str(value)[:40]!r} must be true or false")
    return value is not False


def _first(cfg: dict, *names: str):
    """The first of ``names`` the config sets (newer and older spellings of one field)."""
    for name in names:
        if cfg.get(name) is not None:
            return {**cfg, names[0]: cfg[name]}
    return cfg


def parse_config(cfg: dict) -> ModelSpec:
    for key, allowed in _MUST_BE.items():
        if cfg.get(key) not in allowed:
            raise UnsupportedModelError(f"config.json: {key}={cfg.get(key)!r} is not supported (streamconv maps "
                                        f"{key} in {allowed})")
    cfg_norm = _first(_first(_first(_first(cfg, "n_groups", "mamba_n_groups"), "conv_kernel", "mamba_d_conv"),
                             "head_dim", "attention_head_dim"), "rms_norm_eps", "layer_norm_epsilon", "norm_eps")
    kinds, mtp_block = layer_kinds(cfg), mtp_kinds(cfg)
    every = set(kinds) | set(mtp_block)  # the sizes of every kind the main or the MTP layers use
    heads = require(cfg_norm, "num_attention_heads")
    kv = cfg_norm.get("num_key_value_heads") or heads
    if not isinstance(kv, int) or kv <= 0 or heads % kv:
        raise UnsupportedModelError(f"config.json: num_key_value_heads={kv!r} must divide num_attention_heads={heads}")
    dims = {"mamba_heads": require(cfg_norm, "mamba_num_heads"), "mamba_head_dim": require(cfg_norm, "mamba_head_dim"),
            "mamba_groups": require(cfg_norm, "n_groups"), "state": require(cfg_norm, "ssm_state_size"),
            "conv_kernel": require(cfg_norm, "conv_kernel")} if MAMBA in every else {}
    if dims and dims["mamba_heads"] % dims["mamba_groups"]:
        raise UnsupportedModelError(f"config.json: n_groups={dims['mamba_groups']} must divide "
                                    f"mamba_num_heads={dims['mamba_heads']}")
    if MOE in every:
        dims.update(experts=require(cfg_norm, "n_routed_experts"), moe_ffn=require(cfg_norm, "moe_intermediate_size"),
                    shared_ffn=require(cfg_norm, "moe_shared_expert_intermediate_size"))
        latent = cfg_norm.get("moe_latent_size")
        if latent is not None:
            dims["latent"] = require(cfg_norm, "moe_latent_size")
        if cfg_norm.get("n_shared_experts", 1) != 1:
            raise UnsupportedModelError(f"config.json: n_shared_experts={cfg_norm.get('n_shared_experts')!r}: "
                                        "Nemotron-H has one shared expert")
    ffn = require(cfg_norm, "intermediate_size") if MLP in every else None

    def layer(k: str) -> LayerSpec:
        return LayerSpec(attention=ATTN_FULL if k == ATTENTION else ATTN_NOOP,
                         num_query_groups=kv if k == ATTENTION else None, mlp=MLP_FULL if k == MLP else MLP_NOOP,
                         ffn_hidden_size=ffn if k == MLP else None, kind=k)

    spec = make_spec(cfg_norm, "nemotron_h", "NemotronHForCausalLM", [layer(k) for k in kinds], "bfloat16")
    if mtp_block:
        dims["mtp_block"] = len(mtp_block)
    held = 1 if mtp_repeated(cfg) else mtp_depths(cfg)  # the depths megatron-core holds weights for
    spec = dataclasses.replace(spec, mtp=tuple(layer(k) for _ in range(held) for k in mtp_block))
    return dataclasses.replace(spec, hf_config=cfg, dims=tuple(sorted(dims.items())))
