"""``run_config.yaml`` and the other small files Megatron-Bridge's ``import_ckpt`` writes.

Pure module: no torch, no megatron. ``provider_fields_*`` map a HF ``config.json`` dict to the provider
fields the way Bridge's bridge classes do; ``render_run_config`` turns them into the YAML text Bridge's
``ConfigContainer.to_yaml`` would write for an import.

Matched against Megatron-Bridge v0.6.0 (tag, commit 51885cf132b2814188b6855c25a8588254274c2a; the
fields used here are unchanged at main 067f987df03b) and its pinned Megatron-LM (megatron-core 0.19.0,
commit cd4afffa648426a959dc7cb1e24b5ce7d0c3ff54):

- ``models/conversion/auto_bridge.py``: ``import_ckpt`` -> ``to_megatron_model(wrap_with_ddp=False,
  use_cpu_initialization=True)`` -> ``save_megatron_model(hf_tokenizer_path=<hf id>, low_memory_save=True)``;
  ``to_megatron_provider`` sets ``perform_initialization=False`` and ``hf_model_id``.
- ``models/conversion/model_bridge.py``: ``CONFIG_MAPPING`` / ``hf_config_to_provider_kwargs`` /
  ``provider_bridge`` / ``make_vocab_size_divisible_by`` (largest power of two <= 128 dividing the vocab) /
  ``dtype_from_hf`` (``torch_dtype``, float32 when absent).
- ``models/llama/llama_bridge.py``: Llama defaults and rope scaling (llama3 -> ``rope_scaling`` +
  ``rope_scaling_factor``; linear -> ``seq_len_interpolation_factor``); target ``GPTModelProvider``
  (Bridge no longer has per-size ``Llama31ModelProvider8B`` classes on import).
- ``models/llama_nemotron/llama_nemotron_bridge.py`` + ``llama_nemotron_provider.py``:
  ``LlamaNemotronHeterogeneousProvider``, ``num_query_groups = heads // block_configs[0].attention.n_heads_in_group``,
  ``heterogeneous_layers_config_encoded_json = hf_config.to_json_string()``.
- ``training/model_load_save.py`` ``save_megatron_model``: the ``ConfigContainer`` (train/ddp/scheduler/
  dataset/dist = None, ``OptimizerConfig(use_distributed_optimizer=False)``, ``LoggerConfig()``,
  HF ``TokenizerConfig``, ``CheckpointConfig(async_save=False, save=path, save_optim=False, save_rng=False,
  ckpt_format="torch_dist", dist_ckpt_optim_fully_reshardable=True)``).
- ``training/checkpointing.py`` ``save_checkpoint`` (files, see ``BRIDGE_FILES``) and Megatron-LM
  ``megatron/training/config/container.py`` (``to_dict``: ``_target_`` = ``module.QualName`` on every
  dataclass, fields starting with ``_`` skipped) + ``yaml_utils.py`` (``yaml.safe_dump(...,
  default_flow_style=False)``, so keys sorted; a function -> ``{_target_: module.name, _call_: false}``,
  a torch dtype -> ``{_target_: torch.bfloat16, _call_: false}``).

Deliberately left out (a loader gets the same values back from the class defaults / ``finalize()``):
Bridge dumps *every* dataclass field after ``finalize()`` (several hundred TransformerConfig fields, the
full OptimizerConfig/LoggerConfig/CheckpointConfig, computed ``init_method`` partials, the host-dependent
``gradient_accumulation_fusion``, ``transformer_layer_spec``). Here each section holds its ``_target_``,
every value Bridge's import sets (bridge mapping, import flow, ``save_megatron_model``), the
architecture fields even when equal to the class default, and every key Bridge's loaders index directly
(``model.tensor_model_parallel_size``/``pipeline_model_parallel_size``; ``checkpoint.save_rng``/
``save_optim``/``fully_parallel_save``). Fewer keys also keeps the file loadable by Bridge versions whose
dataclasses lack a field that another version has. The encoded JSON is the full ``config.json``
(``json.dumps(indent=2, sort_keys=True) + "\\n"``, HF's ``to_json_string`` format), not HF's diff-to-defaults
dict: megatron-core only reads ``block_configs`` from it.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

BRIDGE_VERSION = "0.6.0"
BRIDGE_COMMIT = "51885cf132b2814188b6855c25a8588254274c2a"

GPT_PROVIDER = "megatron.bridge.models.gpt_provider.GPTModelProvider"
HETEROGENEOUS_PROVIDER = (
    "megatron.bridge.models.llama_nemotron.llama_nemotron_provider.LlamaNemotronHeterogeneousProvider"
)
HYBRID_PROVIDER = "megatron.bridge.models.hybrid.hybrid_provider.HybridModelProvider"
CONFIG_CONTAINER = "megatron.bridge.training.config.ConfigContainer"
_CFG = "megatron.bridge.training.config."

# What Bridge's import leaves on disk besides the torch_dist files (.metadata, __*_*.distcp, metadata.json,
# and common.pt before mcore 0.19). train_state.pt = torch.save(train_state_tensors(0)); the latest_ copy is
# shutil.copy of it; Bridge finds iteration 0 through latest_train_state.pt: its legacy-tracker reader
# asserts ``iteration > 0`` and so refuses a tracker holding "0".
from streamconv.formats.names import (ITER_DIR_FORMAT, LATEST_TRAIN_STATE_FILE, RUN_CONFIG_FILE,  # noqa: E402,F401
                                      TOKENIZER_DIR, TRACKER_FILE, TRAIN_STATE_FILE)
BRIDGE_FILES = (RUN_CONFIG_FILE, TRAIN_STATE_FILE, TOKENIZER_DIR, LATEST_TRAIN_STATE_FILE, TRACKER_FILE)

# transformers' LlamaConfig defaults: Bridge reads a config *object*, so absent keys take these.
_LLAMA_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
    "initializer_range": 0.02, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0,
    "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
}
_DTYPES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16", "bf16-mixed": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16", "16": "float16", "16-mixed": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32", "32": "float32", "32-true": "float32",
}
_ACTIVATIONS = {  # Bridge utils/activation_map.py ACTIVATION_FUNC_MAP, as the YAML names them
    "silu": "torch.nn.functional.silu", "gelu": "torch.nn.functional.gelu", "relu": "torch.nn.functional.relu",
    "sigmoid": "torch.nn.functional.sigmoid", "tanh": "torch.tanh",
    "relu2": "megatron.core.activations.squared_relu", "squared_relu": "megatron.core.activations.squared_relu",
    "gelu_pytorch_tanh": "megatron.core.activations.fast_gelu", "fast_gelu": "megatron.core.activations.fast_gelu",
}
_YARN_KEYS = (  # model_bridge.py YARN_ROPE_SCALING_MAPPING
    ("factor", "yarn_rotary_scaling_factor"), ("original_max_position_embeddings", "yarn_original_max_position_embeddings"),
    ("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"), ("mscale", "yarn_mscale"),
    ("mscale_all_dim", "yarn_mscale_all_dim"),
)


def callable_ref(target: str) -> dict:
    """A function as Bridge's YAML writes it (``_function_representer``)."""
    return {"_target_": target, "_call_": False}


def dtype_ref(dtype: str) -> dict:
    """A torch dtype as Bridge's YAML writes it (``_torch_dtype_representer``)."""
    return {"_target_": f"torch.{normalize_dtype(dtype)}", "_call_": False}


def normalize_dtype(dtype: Any) -> str:
    """'bf16' / 'torch.bfloat16' / torch.bfloat16 -> 'bfloat16' (also float16, float32)."""
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: use bfloat16, float16 or float32")
    return _DTYPES[name]


def encode_hf_config(hf_config: dict) -> str:
    """The config JSON text for ``heterogeneous_layers_config_encoded_json`` (HF ``to_json_string`` format).
    A quantized source's ``quantization_config`` is left out: the converted weights are dequantized."""
    plain = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    return json.dumps(plain, indent=2, sort_keys=True) + "\n"


def make_vocab_size_divisible_by(vocab_size: int) -> int:
    base = 128
    while vocab_size % base:
        base //= 2
    return base


def _cfg(hf_config: dict, key: str) -> Any:
    value = hf_config.get(key)
    return _LLAMA_DEFAULTS.get(key) if value is None else value


def _dtype(hf_config: dict, dtype: str | None) -> str:
    if dtype is None or dtype == "auto":
        dtype = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
        try:
            return normalize_dtype(dtype)
        except ValueError:
            return "float32"  # Bridge's dtype_from_str falls back to float32
    return normalize_dtype(dtype)


def _rope(hf_config: dict) -> dict:
    """``rope_scaling`` (transformers < 5) or ``rope_parameters`` (>= 5); {} when none."""
    rope = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
    return rope if isinstance(rope, dict) else {}


def _rope_theta(hf_config: dict) -> Any:
    theta = hf_config.get("rope_theta")
    if theta is None:
        theta = (hf_config.get("rope_parameters") or {}).get("rope_theta")
    return _LLAMA_DEFAULTS["rope_theta"] if theta is None else theta


def _common(dtype: str) -> dict:
    """Fields every import sets: dtype flags and the default (1-way) parallelism Bridge saves with."""
    return {
        "bf16": dtype == "bfloat16",
        "fp16": dtype == "float16",
        "params_dtype": dtype_ref(dtype),
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "virtual_pipeline_model_parallel_size": None,
        "context_parallel_size": 1,
        "expert_model_parallel_size": 1,
        "sequence_parallel": False,
    }


def _attention_and_vocab(hf_config: dict, query_groups: int) -> dict:
    """The provider fields both families share, in Bridge's order: heads, groups, head size, vocabulary and its
    padding, sequence length, norm epsilon, init std."""
    heads, hidden, vocab = hf_config["num_attention_heads"], hf_config["hidden_size"], hf_config["vocab_size"]
    return {
        "num_attention_heads": heads,
        "num_query_groups": query_groups,
        "kv_channels": hf_config.get("head_dim") or hidden // heads,
        "vocab_size": vocab,
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by(vocab),
        "seq_length": _cfg(hf_config, "max_position_embeddings"),
        "layernorm_epsilon": _cfg(hf_config, "rms_norm_eps"),
        "init_method_std": _cfg(hf_config, "initializer_range"),
    }


def _require(hf_config: dict, *keys: str) -> None:
    missing = [k for k in keys if hf_config.get(k) is None]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")


def provider_fields_llama(hf_config: dict, dtype: str | None = None) -> dict:
    """The ``model:`` section for a ``LlamaForCausalLM`` config (``LlamaBridge.provider_bridge``).

    ``dtype``: the params dtype of the output (None/'auto': the config's ``torch_dtype``, else float32).
    Values are post-``finalize()`` (``num_query_groups``/``kv_channels`` resolved as the config object does).
    """
    _require(hf_config, "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    heads = hf_config["num_attention_heads"]
    hidden = hf_config["hidden_size"]
    act = _cfg(hf_config, "hidden_act")
    if act not in _ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {act!r}")
    fields = {
        "_target_": GPT_PROVIDER,
        "num_layers": hf_config["num_hidden_layers"],
        "hidden_size": hidden,
        "ffn_hidden_size": _cfg(hf_config, "intermediate_size"),
        **_attention_and_vocab(hf_config, hf_config.get("num_key_value_heads") or heads),
        "attention_dropout": _cfg(hf_config, "attention_dropout"),
        "hidden_dropout": 0.0,
        "share_embeddings_and_output_weights": bool(_cfg(hf_config, "tie_word_embeddings")),
        "add_qkv_bias": bool(_cfg(hf_config, "attention_bias")),
        "add_bias_linear": bool(_cfg(hf_config, "mlp_bias")),
        "rotary_base": _rope_theta(hf_config),
        "rotary_percent": 1.0,
        "position_embedding_type": "rope",
        "rope_scaling": False,
        "rope_scaling_factor": 1.0,
        "seq_len_interpolation_factor": None,
        "normalization": "RMSNorm",
        "gated_linear_unit": True,
        "activation_func": callable_ref(_ACTIVATIONS[act]),
        "bias_activation_fusion": True,
        "masked_softmax_fusion": True,
        "persist_layer_norm": True,
        "bias_dropout_fusion": True,
        "apply_rope_fusion": True,
        **_common(_dtype(hf_config, dtype)),
    }
    rope = _rope(hf_config)
    rope_type = rope.get("type") or rope.get("rope_type")
    if rope_type == "llama3":
        fields["rope_scaling"] = True
        fields["rope_scaling_factor"] = rope.get("factor", 8.0)
    elif rope_type == "linear":
        fields["seq_len_interpolation_factor"] = rope["factor"]
    elif rope_type == "yarn":
        fields["position_embedding_type"] = "yarn"
        for hf_key, key in _YARN_KEYS:
            if rope.get(hf_key) is not None:
                fields[key] = rope[hf_key]
        if "truncate" in rope:
            fields["yarn_correction_range_round_to_int"] = rope["truncate"]
    return fields


def is_decilm(hf_config: dict) -> bool:
    auto_map = hf_config.get("auto_map") or {}
    return "DeciLMForCausalLM" in (hf_config.get("architectures") or []) or str(
        auto_map.get("AutoModelForCausalLM", "")).endswith("DeciLMForCausalLM")


def provider_fields_decilm(hf_config: dict, dtype: str | None = None) -> dict:
    """The ``model:`` section for a heterogeneous ``DeciLMForCausalLM`` config (``LlamaNemotronBridge``).

    ``heterogeneous_layers_config_encoded_json`` carries the whole config; ``num_query_groups`` comes from
    block 0 (the first block with attention when block 0 has none, where Bridge would fail);
    ``ffn_hidden_size``/``kv_channels`` are the values ``finalize()`` gives (DeciLM's config object drops
    ``intermediate_size``: 4 * hidden; ``head_dim`` or hidden // heads). The per-layer sizes live in the JSON.
    """
    blocks = hf_config.get("block_configs")
    if not blocks:
        raise ValueError("a DeciLM (nemotron-nas) config needs block_configs; without them use the Llama path")
    if not is_decilm(hf_config):
        raise ValueError("heterogeneous configs must be DeciLMForCausalLM (architectures or auto_map)")
    _require(hf_config, "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    heads = hf_config["num_attention_heads"]
    hidden = hf_config["hidden_size"]
    groups_per = [(b.get("attention") or {}).get("n_heads_in_group") for b in blocks]
    n_in_group = next((n for n in groups_per if n), None)
    fields = {
        "_target_": HETEROGENEOUS_PROVIDER,
        "num_layers": hf_config["num_hidden_layers"],
        "hidden_size": hidden,
        "ffn_hidden_size": 4 * hidden,
        **_attention_and_vocab(hf_config, heads // n_in_group if n_in_group
                               else (hf_config.get("num_key_value_heads") or heads)),
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "share_embeddings_and_output_weights": bool(_cfg(hf_config, "tie_word_embeddings")),
        "add_bias_linear": False,
        "rotary_base": _rope_theta(hf_config),
        "rotary_percent": 1.0,
        "position_embedding_type": "rope",
        "rope_scaling": False,
        "rope_scaling_factor": 1.0,
        "normalization": "RMSNorm",
        "gated_linear_unit": True,
        "activation_func": callable_ref(_ACTIVATIONS["silu"]),
        "bias_activation_fusion": True,
        "masked_softmax_fusion": True,
        "persist_layer_norm": True,
        "bias_dropout_fusion": True,
        "apply_rope_fusion": True,
        "heterogeneous_layers_config_path": None,
        "heterogeneous_layers_config_encoded_json": encode_hf_config(hf_config),
        **_common(_dtype(hf_config, dtype)),
    }
    rope = _rope(hf_config)
    if rope.get("rope_type") == "llama3":  # this bridge reads only "rope_type", not "type"
        fields["rope_scaling"] = True
        fields["rope_scaling_factor"] = rope.get("factor") if rope.get("factor") is not None else 8.0
    return fields


def is_nemotron_h(hf_config: dict) -> bool:
    return "NemotronHForCausalLM" in (hf_config.get("architectures") or []) or hf_config.get("model_type") == "nemotron_h"


def _first_of(hf_config: dict, *keys: str, default: Any = None) -> Any:
    return next((hf_config[k] for k in keys if hf_config.get(k) is not None), default)


def provider_fields_nemotron_h(hf_config: dict, dtype: str | None = None, mtp_layers: int = 0,
                               pattern: str | None = None, mtp_pattern: str | None = None) -> dict:
    """The ``model:`` section for a ``NemotronHForCausalLM`` config (``NemotronHBridge.provider_bridge``, Bridge
    v0.6.0: ``HybridModelProvider`` building megatron-core's ``HybridModel``; ``MambaModel`` in 0.16).

    ``hybrid_layer_pattern`` is the config's layer string (``M`` Mamba2, ``*`` attention, ``-`` MLP, ``E`` MoE),
    followed by one ``/<mtp pattern>`` per MTP depth the checkpoint holds (``mtp_layers``: 0 when its MTP
    weights were not converted, whatever the config says). ``pattern`` / ``mtp_pattern``: the layer strings when the
    config spells them as transformers 5's ``layers_block_type`` / ``mtp_layers_block_type`` (``for_spec`` passes
    the spec's). Values are post-``finalize()``."""
    _require(hf_config, "hidden_size", "num_attention_heads", "vocab_size")
    pattern = pattern or hf_config.get("hybrid_override_pattern")
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("a Nemotron-H config needs hybrid_override_pattern (or pass the layer pattern)")
    heads, hidden = hf_config["num_attention_heads"], hf_config["hidden_size"]
    mtp_pattern = (mtp_pattern or hf_config.get("mtp_hybrid_override_pattern")) if mtp_layers else None
    fields = {
        "_target_": HYBRID_PROVIDER,
        "num_layers": len(pattern),
        "hidden_size": hidden,
        "ffn_hidden_size": hf_config.get("intermediate_size") or 4 * hidden,
        **_attention_and_vocab(hf_config, hf_config.get("num_key_value_heads") or heads),
        "kv_channels": _first_of(hf_config, "head_dim", "attention_head_dim", default=hidden // heads),
        "layernorm_epsilon": _first_of(hf_config, "layer_norm_epsilon", "rms_norm_eps", default=1e-5),
        "hybrid_layer_pattern": pattern + "".join("/" + mtp_pattern for _ in range(mtp_layers if mtp_pattern else 0)),
        "hybrid_override_pattern": None,
        "mamba_num_heads": hf_config.get("mamba_num_heads"),
        "mamba_head_dim": hf_config.get("mamba_head_dim"),
        "mamba_num_groups": _first_of(hf_config, "n_groups", "mamba_n_groups", default=8),
        "mamba_state_dim": hf_config.get("ssm_state_size"),
        "mamba_chunk_size": hf_config.get("chunk_size") or 128,
        "fp32_residual_connection": bool(hf_config.get("residual_in_fp32", False)),
        "attention_dropout": hf_config.get("attention_dropout") or 0.0,
        "hidden_dropout": hf_config.get("hidden_dropout") or 0.0,
        "share_embeddings_and_output_weights": bool(hf_config.get("tie_word_embeddings", False)),
        "add_qkv_bias": bool(hf_config.get("attention_bias", False)),
        "add_bias_linear": bool(_first_of(hf_config, "use_bias", "mlp_bias", default=False)),
        "position_embedding_type": "none",
        "normalization": "RMSNorm",
        "gated_linear_unit": False,
        "activation_func": callable_ref(_ACTIVATIONS["relu2"]),
        "masked_softmax_fusion": True,
        "apply_query_key_layer_scaling": False,
        "persist_layer_norm": True,
        "attention_softmax_in_fp32": False,
        "first_last_layers_bf16": True,
        "is_hybrid_model": True,
        "mtp_num_layers": mtp_layers,
        "mtp_hybrid_override_pattern": mtp_pattern,
        "mtp_use_repeated_layer": bool(mtp_layers and hf_config.get("mtp_use_repeated_layer", True)),
        "keep_mtp_spec_in_bf16": bool(mtp_layers and hf_config.get("keep_mtp_spec_in_bf16", True)),
        **_common(_dtype(hf_config, dtype)),
    }
    if mtp_layers:
        fields["mtp_loss_scaling_factor"] = hf_config.get("mtp_loss_scaling_factor", 0.3)
    if "E" in pattern:
        fields.update({
            "num_moe_experts": hf_config.get("n_routed_experts"),
            "moe_router_topk": hf_config.get("num_experts_per_tok"),
            "moe_ffn_hidden_size": hf_config.get("moe_intermediate_size"),
            "moe_shared_expert_intermediate_size": hf_config.get("moe_shared_expert_intermediate_size"),
            "moe_latent_size": hf_config.get("moe_latent_size"),
            "moe_router_num_groups": hf_config.get("n_group"),
            "moe_router_group_topk": hf_config.get("topk_group"),
            "moe_router_topk_scaling_factor": hf_config.get("routed_scaling_factor"),
            "moe_aux_loss_coeff": 0.0001,
            "moe_router_score_function": "sigmoid",
            "moe_router_enable_expert_bias": True,
            "moe_router_load_balancing_type": "seq_aux_loss",
            "moe_router_dtype": "fp32",
            "moe_grouped_gemm": True,
            "moe_token_dispatcher_type": "alltoall",
            "moe_permute_fusion": True,
            "moe_shared_expert_overlap": bool(hf_config.get("moe_shared_expert_overlap", True)),
        })
    return fields


def provider_fields(hf_config: dict, dtype: str | None = None) -> dict:
    """Dispatch as Bridge does: Nemotron-H -> hybrid; DeciLM with ``block_configs`` -> heterogeneous; else Llama."""
    if is_nemotron_h(hf_config):
        return provider_fields_nemotron_h(hf_config, dtype)
    if is_decilm(hf_config):
        return provider_fields_decilm(hf_config, dtype)
    return provider_fields_llama(hf_config, dtype)


def run_config_dict(provider: dict, *, save_dir: str | None = None, hf_source: str | None = None,
                    trust_remote_code: bool | None = None) -> dict:
    """The whole ``ConfigContainer.to_dict()`` for a bare import of ``provider`` (a ``provider_fields*`` dict).

    ``save_dir``: the ``<out>`` folder as given (Bridge writes ``checkpoint.save = str(path)``);
    ``hf_source``: the HF id/folder imported (``model.hf_model_id`` and the tokenizer; None: no tokenizer,
    as Bridge without ``hf_tokenizer_path``); ``trust_remote_code``: put into ``hf_tokenizer_kwargs``
    (None: True for the heterogeneous provider, whose import needs ``--trust-remote-code``).
    """
    if "_target_" not in provider:
        raise ValueError("provider dict needs a '_target_' (use provider_fields_llama/_decilm)")
    model = dict(provider)
    model["perform_initialization"] = False  # to_megatron_provider(load_weights=True)
    model["use_cpu_initialization"] = True  # import_ckpt -> to_megatron_model(use_cpu_initialization=True)
    if hf_source is not None:
        model["hf_model_id"] = str(hf_source)
    tokenizer = None
    if hf_source is not None:
        if trust_remote_code is None:
            trust_remote_code = provider["_target_"] == HETEROGENEOUS_PROVIDER
        tokenizer = {
            "_target_": "megatron.bridge.training.tokenizers.config.TokenizerConfig",
            "tokenizer_type": "HuggingFaceTokenizer",
            "tokenizer_model": str(hf_source),
            # NemotronHBridge.get_hf_tokenizer_kwargs: its models ship only a fast tokenizer
            "hf_tokenizer_kwargs": {**({"use_fast": True} if provider["_target_"] == HYBRID_PROVIDER else {}),
                                    **({"trust_remote_code": True} if trust_remote_code else {})},
        }
    return {
        "_target_": CONFIG_CONTAINER,
        "env_vars": {},
        "rng": {"_target_": "megatron.training.config.common_config.RNGConfig"},
        "rerun_state_machine": {"_target_": _CFG + "RerunStateMachineConfig"},
        "train": None,
        "model": model,
        "optimizer": {"_target_": _CFG + "OptimizerConfig", "use_distributed_optimizer": False},
        "optimizer_config_override_provider": {"_target_": _CFG + "OptimizerConfigOverrideProvider"},
        "ddp": None,
        "validation": {"_target_": "megatron.training.config.training_config.ValidationConfig"},
        "scheduler": None,
        "dataset": None,
        "logger": {"_target_": _CFG + "LoggerConfig"},
        "tokenizer": tokenizer,
        "checkpoint": {
            "_target_": _CFG + "CheckpointConfig",
            "save": None if save_dir is None else str(save_dir),
            "async_save": False,
            "save_optim": False,
            "save_rng": False,
            "ckpt_format": "torch_dist",
            "dist_ckpt_optim_fully_reshardable": True,
            "fully_parallel_save": True,
        },
        "dist": None,
        "ft": None,
        "straggler": None,
        "nvrx_straggler": None,
        "profiling": {"_target_": _CFG + "ProfilingConfig"},
        "peft": None,
        "comm_overlap": None,
        "mixed_precision": None,
        "tensor_inspect": None,
        "inprocess_restart": None,
    }


def render_run_config(provider: dict, *, save_dir: str | None = None, hf_source: str | None = None,
                      trust_remote_code: bool | None = None) -> str:
    """The ``run_config.yaml`` text (same dumper call as Bridge: sorted keys, block style)."""
    cfg = run_config_dict(provider, save_dir=save_dir, hf_source=hf_source, trust_remote_code=trust_remote_code)
    return yaml.safe_dump(cfg, default_flow_style=False)


def for_spec(spec: Any, plan: Any = None, *, save_dir: str | None = None, hf_source: str | None = None) -> str:
    """``render_run_config`` for a streamconv ``ModelSpec`` (its ``hf_config``); the params dtype is the
    plan's output dtype when a plan is given, else the spec's ``torch_dtype``."""
    dtype = getattr(spec, "torch_dtype", None)
    targets = getattr(plan, "targets", None)
    if targets:  # the dtype of most bytes (a bf16 Nemotron-H keeps its router in float32)
        by_dtype: dict[str, int] = {}
        for t in targets.values():
            by_dtype[str(t.dtype)] = by_dtype.get(str(t.dtype), 0) + int(getattr(t, "nbytes", 1))
        dtype = max(by_dtype, key=by_dtype.get)
    hf_config = spec.hf_config
    if getattr(spec, "family", None) == "nemotron_h":
        mtp = spec.mtp[:spec.dim("mtp_block")] if spec.mtp else ()  # one depth's layers, when they are converted
        depths = (hf_config.get("num_nextn_predict_layers") or 0) if mtp else 0
        fields = provider_fields_nemotron_h(hf_config, dtype, depths, pattern="".join(layer.kind for layer in spec.layers),
                                            mtp_pattern="".join(layer.kind for layer in mtp) or None)
    elif getattr(spec, "heterogeneous", False):
        fields = provider_fields_decilm(hf_config, dtype)
    else:
        fields = provider_fields_llama(hf_config, dtype)
    return render_run_config(fields, save_dir=save_dir, hf_source=hf_source)


def train_state_tensors(step: int = 0) -> dict[str, tuple[Any, str]]:
    """``train_state.pt`` content: ``{name: (value, torch dtype name)}``, in Bridge's order; save it as
    ``torch.save({k: torch.tensor(v, dtype=getattr(torch, d)) for k, (v, d) in ...})`` (0-dim tensors).
    ``floating_point_operations_so_far`` is float32: the save finalizer replaces TrainState's float64."""
    return {
        "step": (step, "int64"),
        "consumed_train_samples": (0, "int64"),
        "skipped_train_samples": (0, "int64"),
        "consumed_valid_samples": (0, "int64"),
        "floating_point_operations_so_far": (0.0, "float32"),
        "do_train": (False, "bool"),
        "do_valid": (False, "bool"),
        "do_test": (False, "bool"),
    }


def tracker_text(step: int = 0) -> str:
    """``latest_checkpointed_iteration.txt``: ``str(step)``, no newline."""
    return str(step)
