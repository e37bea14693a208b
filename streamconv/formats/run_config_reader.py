"""The HF ``config.json`` a Megatron-Bridge checkpoint describes in its ``run_config.yaml`` (the inverse of
``run_config.provider_fields_*``), for ``mcore2hf`` without ``--hf-config``.

- Heterogeneous (DeciLM / ``nemotron-nas``): ``model.heterogeneous_layers_config_encoded_json`` is the HF
  config (Bridge passes ``hf_config.to_json_string()``: the values that differ from the class defaults), or
  ``heterogeneous_layers_config_path`` names it; what it leaves out is filled from the provider fields.
- Llama (``GPTModelProvider`` and its Llama subclasses): a ``LlamaForCausalLM`` config rebuilt from the
  provider fields (sizes, norm epsilon, rope base and scaling, tying, params dtype). Fields the provider does
  not hold (token ids, llama3 low/high frequency factors) take transformers' / Llama 3.1's defaults.

Pure: YAML text in, dict out; ``yaml.safe_load`` only.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import yaml

from streamconv.errors import BadInputError, UnsupportedModelError
from streamconv.formats.run_config import HYBRID_PROVIDER, RUN_CONFIG_FILE, TOKENIZER_DIR, is_decilm

__all__ = ["RUN_CONFIG_FILE", "TOKENIZER_DIR", "hf_config_from_run_config", "hf_config_from_model_section"]

_ACTIVATIONS = {"torch.nn.functional.silu": "silu", "megatron.core.activations.silu": "silu"}


def hf_config_from_run_config(path: Path | str) -> dict:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise BadInputError(f"{path}: cannot read: {e.strerror or e}") from e
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: a number of over 4,300 digits
        raise BadInputError(f"{path}: not valid YAML ({(str(e).splitlines() or [type(e).__name__])[0][:200]}); "
                            "pass --hf-config instead") from e
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict):
        raise BadInputError(f"{path}: has no 'model:' section; pass --hf-config instead")
    return hf_config_from_model_section(model, path)


def _target(value) -> str | None:
    return value.get("_target_") if isinstance(value, dict) else value


SIDE_FILE_LIMIT = 16 * 1024 * 1024  # a config.json is kilobytes; nothing bigger is read


def _side_file(name, where) -> str:
    """The text of a file ``run_config.yaml`` names: only a regular file inside the checkpoint folder (the
    run config's own), of at most ``SIDE_FILE_LIMIT`` bytes; never a device, a FIFO or a path elsewhere."""
    base = Path(where).parent.resolve()
    p = Path(str(name))
    p = (p if p.is_absolute() else base / p).resolve()
    if base not in p.parents:
        raise ValueError(f"it names {name!r}, outside the checkpoint folder")
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{name!r} is not a regular file")
        if st.st_size > SIDE_FILE_LIMIT:
            raise ValueError(f"{name!r} has {st.st_size} bytes, more than a config can")
        return os.read(fd, SIDE_FILE_LIMIT + 1).decode("utf-8")
    finally:
        os.close(fd)


# The model section's fields read here, by kind: each is checked before it is used (a crafted value is a
# string, a stand-in object, a 100,000-digit number or an alias expanding to gigabytes).
SIZE_FIELDS = ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "kv_channels", "vocab_size", "seq_length", "mamba_num_heads", "mamba_head_dim", "mamba_num_groups",
               "mamba_state_dim", "mamba_chunk_size", "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
               "moe_shared_expert_intermediate_size", "moe_latent_size", "moe_router_num_groups",
               "moe_router_group_topk")
REAL_FIELDS = ("layernorm_epsilon", "rotary_base", "rope_scaling_factor", "attention_dropout", "init_method_std",
               "seq_len_interpolation_factor", "moe_router_topk_scaling_factor")
TEXT_FIELDS = ("normalization", "position_embedding_type", "heterogeneous_layers_config_path", "hybrid_layer_pattern",
               "hybrid_override_pattern", "mtp_hybrid_override_pattern")
MAX_SIZE = 1 << 40
MAX_ENCODED_JSON = 16 * 1024**2


def check_fields(model: dict, where) -> None:
    """Every field ``hf_config_from_model_section`` reads is a plain value of its kind: sizes positive
    integers below 2**40, reals finite numbers, texts short strings; else one line (exit 3)."""
    import math

    if not isinstance(model, dict):
        raise BadInputError(f"{where}: the model section is not a mapping; pass --hf-config")

    def refuse(key, what):
        value = model[key]
        shown = repr(value) if isinstance(value, (int, float, str, bool)) else f"a {type(value).__name__}"
        raise BadInputError(f"{where}: model.{key} must be {what}, got {shown[:80]}; pass --hf-config")

    for key in SIZE_FIELDS:
        v = model.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 < v < MAX_SIZE):
            refuse(key, "a positive integer below 2**40")
    for key in REAL_FIELDS:
        v = model.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
            refuse(key, "a finite number")
    for key in TEXT_FIELDS:
        v = model.get(key)
        if v is not None and (not isinstance(v, str) or len(v) > 4096):
            refuse(key, "a short string")
    v = model.get("heterogeneous_layers_config_encoded_json")
    if v is not None and (not isinstance(v, str) or len(v) > MAX_ENCODED_JSON):
        refuse("heterogeneous_layers_config_encoded_json", "a JSON string of at most 16 MiB")


def hf_config_from_model_section(model: dict, where: Path | str = RUN_CONFIG_FILE) -> dict:
    check_fields(model, where)
    encoded = model.get("heterogeneous_layers_config_encoded_json")
    config_path = model.get("heterogeneous_layers_config_path")
    if encoded or config_path:
        try:
            cfg = json.loads(encoded) if encoded else json.loads(_side_file(config_path, where))
        except (OSError, ValueError) as e:
            raise BadInputError(f"{where}: the heterogeneous layers config is unreadable ({e}); pass --hf-config") \
                from e
        if not isinstance(cfg, dict) or not isinstance(cfg.get("block_configs"), list):
            raise UnsupportedModelError(f"{where}: the heterogeneous layers config has no block_configs list; "
                                        "pass --hf-config")
        return _decilm_config(dict(cfg), model, where)
    if _target(model.get("_target_")) == HYBRID_PROVIDER or model.get("hybrid_layer_pattern") or \
            model.get("hybrid_override_pattern"):
        return _nemotron_h_config(model, where)
    return _llama_config(model, where)


def _nemotron_h_config(m: dict, where) -> dict:
    """A ``NemotronHForCausalLM`` config from ``HybridModelProvider`` fields (the inverse of
    ``provider_fields_nemotron_h``; Bridge's ``megatron_to_hf_config`` splits the pattern the same way: pipeline
    marks ``|`` dropped, each ``/`` block one MTP depth). The convolution width, which the provider does not hold,
    is megatron-core's (4)."""
    pattern = m.get("hybrid_layer_pattern") or m.get("hybrid_override_pattern")
    if not isinstance(pattern, str) or not pattern:
        raise BadInputError(f"{where}: model.hybrid_layer_pattern is missing; pass --hf-config")
    main, *mtp = pattern.split("/")
    main = main.replace("|", "")
    mtp = [p for p in mtp if p]
    act = str(_target(m.get("activation_func", "megatron.core.activations.squared_relu")))
    if not act.endswith("squared_relu") or m.get("gated_linear_unit") or m.get("normalization", "RMSNorm") != "RMSNorm":
        raise UnsupportedModelError(f"{where}: a hybrid model with activation {act!r} / gated_linear_unit / "
                                    f"{m.get('normalization')!r} is not Nemotron-H; pass --hf-config")
    heads = m.get("num_attention_heads")
    cfg = {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "hybrid_override_pattern": main,
        "num_hidden_layers": len(main),
        "hidden_size": m.get("hidden_size"),
        "intermediate_size": m.get("ffn_hidden_size"),
        "num_attention_heads": heads,
        "num_key_value_heads": m.get("num_query_groups") or heads,
        "head_dim": m.get("kv_channels"),
        "vocab_size": m.get("vocab_size"),
        "max_position_embeddings": m.get("seq_length") or 4096,
        "layer_norm_epsilon": float(m.get("layernorm_epsilon", 1e-5)),
        "initializer_range": float(m.get("init_method_std", 0.02)),
        "tie_word_embeddings": bool(m.get("share_embeddings_and_output_weights", False)),
        "torch_dtype": _params_dtype(m),
        "attention_bias": bool(m.get("add_qkv_bias", False)),
        "mlp_bias": False, "use_bias": False, "mamba_proj_bias": False, "use_conv_bias": True,
        "mlp_hidden_act": "relu2", "mamba_hidden_act": "silu",
        "residual_in_fp32": bool(m.get("fp32_residual_connection", False)),
        "mamba_num_heads": m.get("mamba_num_heads"),
        "mamba_head_dim": m.get("mamba_head_dim"),
        "n_groups": m.get("mamba_num_groups"),
        "ssm_state_size": m.get("mamba_state_dim"),
        "conv_kernel": 4,
        "chunk_size": m.get("mamba_chunk_size") or 128,
        "num_nextn_predict_layers": depth if isinstance(depth := m.get("mtp_num_layers"), int) and
        not isinstance(depth, bool) and 0 <= depth <= len(mtp) + 64 else len(mtp),
    }
    if mtp:
        cfg["mtp_hybrid_override_pattern"] = mtp[0]
        cfg["mtp_use_repeated_layer"] = bool(m.get("mtp_use_repeated_layer", True))
    if "E" in main + "".join(mtp):
        cfg.update({
            "n_routed_experts": m.get("num_moe_experts"),
            "num_experts_per_tok": m.get("moe_router_topk"),
            "moe_intermediate_size": m.get("moe_ffn_hidden_size"),
            "moe_shared_expert_intermediate_size": m.get("moe_shared_expert_intermediate_size"),
            "moe_latent_size": m.get("moe_latent_size"),
            "n_shared_experts": 1,
            "n_group": m.get("moe_router_num_groups") or 1,
            "topk_group": m.get("moe_router_group_topk") or 1,
            "routed_scaling_factor": float(m.get("moe_router_topk_scaling_factor") or 1.0),
            "norm_topk_prob": True,
        })
    return {k: v for k, v in cfg.items() if v is not None}


def _decilm_config(cfg: dict, m: dict, where) -> dict:
    """The encoded config, completed from the provider fields: Bridge encodes ``to_json_string()``, which
    leaves out values equal to the config class defaults (and Megatron-LM runs may encode block_configs only)."""
    if cfg.get("architectures") and not is_decilm(cfg):
        raise UnsupportedModelError(f"{where}: the heterogeneous layers config is for {cfg['architectures']}, not "
                                    "DeciLMForCausalLM; pass --hf-config")
    fill = {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "nemotron-nas",
        "hidden_size": m.get("hidden_size"),
        "num_attention_heads": m.get("num_attention_heads"),
        "num_hidden_layers": m.get("num_layers"),
        "vocab_size": m.get("vocab_size"),
        "max_position_embeddings": m.get("seq_length"),
        "rms_norm_eps": m.get("layernorm_epsilon"),
        "rope_theta": m.get("rotary_base"),
        "hidden_act": "silu",
        "tie_word_embeddings": bool(m.get("share_embeddings_and_output_weights", False)),
        "torch_dtype": _params_dtype(m),
    }
    if m.get("kv_channels") and m.get("hidden_size") and m.get("num_attention_heads") and \
            m["kv_channels"] * m["num_attention_heads"] != m["hidden_size"]:
        fill["head_dim"] = m["kv_channels"]
    if m.get("rope_scaling") and "rope_scaling" not in cfg:
        fill["rope_scaling"] = _llama3(m)
    for key, value in fill.items():
        if key not in cfg and value is not None:
            cfg[key] = value
    return cfg


def _params_dtype(m: dict) -> str:
    dtype = str(_target(m.get("params_dtype")) or "").removeprefix("torch.")
    if dtype not in ("float32", "bfloat16", "float16"):
        dtype = "bfloat16" if m.get("bf16") else "float16" if m.get("fp16") else "float32"
    return dtype


def _llama3(m: dict) -> dict:
    return {"rope_type": "llama3", "factor": float(m.get("rope_scaling_factor", 8.0)), "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _llama_config(m: dict, where) -> dict:
    def need(key):
        value = m.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise BadInputError(f"{where}: model.{key} must be a positive integer, got {value!r}; pass --hf-config")
        return value

    act = _ACTIVATIONS.get(str(_target(m.get("activation_func", "torch.nn.functional.silu"))))
    checks = {
        "normalization": (m.get("normalization", "RMSNorm") == "RMSNorm"),
        "gated_linear_unit": bool(m.get("gated_linear_unit", True)),
        "activation_func": act == "silu",
        "add_bias_linear": not m.get("add_bias_linear", False),
        "add_qkv_bias": not m.get("add_qkv_bias", False),
        "position_embedding_type": m.get("position_embedding_type", "rope") == "rope",
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise UnsupportedModelError(f"{where}: model.{bad[0]}={m.get(bad[0])!r} is not a Llama model; streamconv "
                                    "exports LlamaForCausalLM and DeciLMForCausalLM")
    hidden, heads = need("hidden_size"), need("num_attention_heads")
    dtype = _params_dtype(m)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": need("ffn_hidden_size"),
        "num_hidden_layers": need("num_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": m.get("num_query_groups") or heads,
        "vocab_size": need("vocab_size"),
        "max_position_embeddings": m.get("seq_length") or 4096,
        "rms_norm_eps": float(m.get("layernorm_epsilon", 1e-5)),
        "rope_theta": float(m.get("rotary_base", 10000.0)),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": float(m.get("attention_dropout", 0.0) or 0.0),
        "initializer_range": float(m.get("init_method_std", 0.02)),
        "tie_word_embeddings": bool(m.get("share_embeddings_and_output_weights", False)),
        "torch_dtype": dtype,
    }
    kv_channels = m.get("kv_channels")
    if kv_channels and kv_channels * heads != hidden:
        cfg["head_dim"] = kv_channels
    if m.get("rope_scaling"):
        cfg["rope_scaling"] = _llama3(m)
    elif m.get("seq_len_interpolation_factor"):
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(m["seq_len_interpolation_factor"])}
    return cfg
