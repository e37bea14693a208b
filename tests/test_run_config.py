"""run_config.yaml as Megatron-Bridge's import writes it (streamconv/formats/run_config.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streamconv.formats import run_config as rc

CONFIGS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "configs"
if not CONFIGS.is_dir():  # CI lays shared/ beside the clone; the work tree has it at /work/shared
    CONFIGS = Path("/work/shared/reference/configs")
SUPER = CONFIGS / "llama-3_3-nemotron-super-49b-v1.config.json"
ULTRA = CONFIGS / "llama-3_1-nemotron-ultra-253b-v1.config.json"

SILU = {"_target_": "torch.nn.functional.silu", "_call_": False}
BF16 = {"_target_": "torch.bfloat16", "_call_": False}

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def load(path):
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return json.loads(path.read_text())


def parse(text):
    cfg = yaml.safe_load(text)
    assert isinstance(cfg, dict)
    return cfg


def test_llama_8b_fields():
    m = rc.provider_fields_llama(LLAMA_8B, "bfloat16")
    assert m["_target_"] == "megatron.bridge.models.gpt_provider.GPTModelProvider"
    expect = {
        "num_layers": 32, "hidden_size": 4096, "ffn_hidden_size": 14336, "num_attention_heads": 32,
        "num_query_groups": 8, "kv_channels": 128, "vocab_size": 128256, "make_vocab_size_divisible_by": 128,
        "seq_length": 131072, "layernorm_epsilon": 1e-5, "init_method_std": 0.02, "rotary_base": 500000.0,
        "rope_scaling": True, "rope_scaling_factor": 8.0, "seq_len_interpolation_factor": None,
        "position_embedding_type": "rope", "rotary_percent": 1.0, "normalization": "RMSNorm",
        "gated_linear_unit": True, "activation_func": SILU, "add_bias_linear": False, "add_qkv_bias": False,
        "share_embeddings_and_output_weights": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "bf16": True, "fp16": False, "params_dtype": BF16,
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
    }
    for k, v in expect.items():
        assert m[k] == v, k


def test_llama_yaml_round_trip():
    text = rc.render_run_config(rc.provider_fields_llama(LLAMA_8B, "bf16"),
                                save_dir="/ckpt/llama8b", hf_source="nvidia/Llama-3.1-Nemotron-Nano-8B-v1")
    cfg = parse(text)
    assert cfg["_target_"] == "megatron.bridge.training.config.ConfigContainer"
    for section in ("model", "checkpoint", "tokenizer", "optimizer", "logger", "rng", "validation",
                    "profiling", "rerun_state_machine", "optimizer_config_override_provider"):
        assert cfg[section]["_target_"].startswith("megatron."), section
    for section in ("train", "ddp", "scheduler", "dataset", "dist", "peft", "ft", "mixed_precision"):
        assert cfg[section] is None, section
    m = cfg["model"]
    assert m["activation_func"] == SILU and m["params_dtype"] == BF16
    assert m["hf_model_id"] == "nvidia/Llama-3.1-Nemotron-Nano-8B-v1"
    assert m["perform_initialization"] is False and m["use_cpu_initialization"] is True
    assert m["rotary_base"] == 500000.0 and m["layernorm_epsilon"] == 1e-5
    ck = cfg["checkpoint"]
    assert ck["save"] == "/ckpt/llama8b" and ck["ckpt_format"] == "torch_dist"
    assert (ck["save_optim"], ck["save_rng"], ck["async_save"]) == (False, False, False)
    assert ck["dist_ckpt_optim_fully_reshardable"] is True and ck["fully_parallel_save"] is True
    assert cfg["optimizer"]["use_distributed_optimizer"] is False
    tok = cfg["tokenizer"]
    assert tok["tokenizer_type"] == "HuggingFaceTokenizer"
    assert tok["tokenizer_model"] == "nvidia/Llama-3.1-Nemotron-Nano-8B-v1" and tok["hf_tokenizer_kwargs"] == {}
    # Bridge dumps with yaml.safe_dump(default_flow_style=False): sorted keys, block style
    assert text == yaml.safe_dump(cfg, default_flow_style=False)
    assert "_call_: false\n    _target_: torch.nn.functional.silu" in text


def test_llama_variants():
    nano4b = dict(LLAMA_8B, hidden_size=3072, intermediate_size=9216, head_dim=128, rope_scaling=None,
                  tie_word_embeddings=True)
    m = rc.provider_fields_llama(nano4b)
    assert m["kv_channels"] == 128  # explicit head_dim, not 3072 / 32 = 96
    assert m["share_embeddings_and_output_weights"] is True
    assert m["rope_scaling"] is False and m["rope_scaling_factor"] == 1.0
    assert m["bf16"] is True  # from torch_dtype when dtype is not given

    linear = dict(LLAMA_8B, rope_scaling={"type": "linear", "factor": 4.0}, torch_dtype="float16")
    m = rc.provider_fields_llama(linear)
    assert m["seq_len_interpolation_factor"] == 4.0 and m["rope_scaling"] is False
    assert (m["fp16"], m["bf16"], m["params_dtype"]["_target_"]) == (True, False, "torch.float16")

    bare = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000}
    m = rc.provider_fields_llama(bare, "float32")
    assert m["num_query_groups"] == 4 and m["kv_channels"] == 64 and m["ffn_hidden_size"] == 11008
    assert m["make_vocab_size_divisible_by"] == 8 and m["rotary_base"] == 10000.0
    assert m["params_dtype"] == {"_target_": "torch.float32", "_call_": False}
    with pytest.raises(ValueError):
        rc.provider_fields_llama(bare, "int8")
    with pytest.raises(ValueError):
        rc.provider_fields_llama({"hidden_size": 8})


@pytest.mark.parametrize("path,layers,hidden,heads", [(SUPER, 80, 8192, 64), (ULTRA, 162, 16384, 128)])
def test_decilm_fields(path, layers, hidden, heads):
    hf = load(path)
    m = rc.provider_fields(hf, "bfloat16")
    assert m["_target_"] == ("megatron.bridge.models.llama_nemotron.llama_nemotron_provider."
                             "LlamaNemotronHeterogeneousProvider")
    assert (m["num_layers"], m["hidden_size"], m["num_attention_heads"]) == (layers, hidden, heads)
    assert m["num_query_groups"] == 8 and m["kv_channels"] == 128
    assert m["ffn_hidden_size"] == 4 * hidden
    assert m["vocab_size"] == 128256 and m["make_vocab_size_divisible_by"] == 128
    assert m["seq_length"] == 131072 and m["rotary_base"] == 500000.0
    assert m["rope_scaling"] is True and m["rope_scaling_factor"] == hf["rope_scaling"]["factor"]
    assert m["share_embeddings_and_output_weights"] is False and m["add_bias_linear"] is False
    assert m["activation_func"] == SILU and m["params_dtype"] == BF16 and m["bf16"] is True

    text = rc.render_run_config(m, save_dir="out", hf_source=str(path.parent))
    cfg = parse(text)
    mm = cfg["model"]
    assert json.loads(mm["heterogeneous_layers_config_encoded_json"]) == hf
    assert len(json.loads(mm["heterogeneous_layers_config_encoded_json"])["block_configs"]) == layers
    assert {k: v for k, v in mm.items() if k not in ("perform_initialization", "use_cpu_initialization",
                                                      "hf_model_id")} == m
    assert cfg["tokenizer"]["hf_tokenizer_kwargs"] == {"trust_remote_code": True}


def test_decilm_dispatch_and_errors():
    hf = load(SUPER)
    assert rc.provider_fields(LLAMA_8B)["_target_"] == rc.GPT_PROVIDER
    with pytest.raises(ValueError):
        rc.provider_fields_decilm({k: v for k, v in hf.items() if k != "block_configs"})
    with pytest.raises(ValueError):
        rc.provider_fields_decilm(dict(hf, architectures=["LlamaForCausalLM"], auto_map={}))
    # block 0 without attention: first block with attention decides (Bridge itself would fail here)
    blocks = [dict(b) for b in hf["block_configs"]]
    blocks[0] = dict(blocks[0], attention=dict(blocks[0]["attention"], no_op=True, n_heads_in_group=None))
    assert rc.provider_fields_decilm(dict(hf, block_configs=blocks))["num_query_groups"] == 8


def test_for_spec_duck_typed():
    class Spec:
        hf_config = LLAMA_8B
        heterogeneous = False
        torch_dtype = "bfloat16"

    class Target:
        dtype = "torch.float16"

    class Plan:
        targets = {"embedding.word_embeddings.weight": Target()}

    assert parse(rc.for_spec(Spec()))["model"]["bf16"] is True
    cfg = parse(rc.for_spec(Spec(), Plan(), save_dir="o", hf_source="h"))
    assert cfg["model"]["fp16"] is True and cfg["checkpoint"]["save"] == "o"


def test_small_files():
    ts = rc.train_state_tensors(0)
    assert list(ts) == ["step", "consumed_train_samples", "skipped_train_samples", "consumed_valid_samples",
                        "floating_point_operations_so_far", "do_train", "do_valid", "do_test"]
    assert ts["step"] == (0, "int64") and ts["floating_point_operations_so_far"] == (0.0, "float32")
    assert rc.tracker_text(0) == "0"
    assert rc.ITER_DIR_FORMAT.format(0) == "iter_0000000"


def test_module_is_pure():
    """Loaded on its own (not through the package), the module pulls in neither torch nor megatron."""
    path = Path(rc.__file__)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('run_config', {str(path)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'transformers')]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


NANO_30B = Path(__file__).parent / "data" / "nemotron_h" / "Nemotron-3-Nano-30B-A3B.config.json"
# HybridModelProvider's own fields (Megatron-Bridge v0.6.0, models/hybrid/hybrid_provider.py) and Bridge's
# TransformerConfig additions; every other key of the model section is a megatron-core TransformerConfig field.
HYBRID_PROVIDER_FIELDS = {
    "fp16_lm_cross_entropy", "parallel_output", "share_embeddings_and_output_weights", "num_layers",
    "mamba_num_groups", "mamba_chunk_size", "num_attention_heads", "hybrid_attention_ratio", "hybrid_mlp_ratio",
    "hybrid_override_pattern", "hybrid_layer_pattern", "seq_length", "position_embedding_type", "rotary_percent",
    "rotary_base", "seq_len_interpolation_factor", "apply_rope_fusion", "make_vocab_size_divisible_by",
    "gated_linear_unit", "normalization", "add_bias_linear", "hidden_dropout", "attention_dropout",
    "layernorm_epsilon", "vocab_size", "should_pad_vocab", "hf_model_id", "hf_model_revision", "mtp_num_layers",
    "mtp_hybrid_override_pattern", "keep_mtp_spec_in_bf16", "restore_modelopt_state",
    "mtp_use_repeated_layer",  # megatron-core >= 0.17 TransformerConfig, read by HybridModelProvider.finalize
}


def test_nemotron_h_fields_and_their_inverse():
    """The real Nano-30B config: Bridge's NemotronHBridge.provider_bridge values; every key is a field a
    HybridModelProvider has; and the config read back from them describes the same model."""
    import dataclasses

    from megatron.core.transformer import TransformerConfig

    from streamconv.formats.run_config_reader import hf_config_from_model_section
    from streamconv.models.config import spec_from_config

    hf = json.loads(NANO_30B.read_text())
    m = rc.provider_fields(hf)
    assert m["_target_"] == rc.HYBRID_PROVIDER
    assert m["hybrid_layer_pattern"] == hf["hybrid_override_pattern"] and m["num_layers"] == 52
    assert (m["mamba_num_heads"], m["mamba_head_dim"], m["mamba_num_groups"], m["mamba_state_dim"]) == (64, 64, 8, 128)
    assert (m["num_moe_experts"], m["moe_router_topk"], m["moe_ffn_hidden_size"],
            m["moe_shared_expert_intermediate_size"]) == (128, 6, 1856, 3712)
    assert m["moe_router_score_function"] == "sigmoid" and m["moe_router_enable_expert_bias"] is True
    assert m["moe_router_dtype"] == "fp32" and m["moe_router_topk_scaling_factor"] == 2.5
    assert m["activation_func"]["_target_"] == "megatron.core.activations.squared_relu"
    assert m["position_embedding_type"] == "none" and m["gated_linear_unit"] is False
    assert m["kv_channels"] == hf["head_dim"] and m["num_query_groups"] == hf["num_key_value_heads"]
    assert m["mtp_num_layers"] == 0  # the checkpoint holds no MTP weights (MambaModel has none to load)
    mcore_fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert set(m) - {"_target_"} <= mcore_fields | HYBRID_PROVIDER_FIELDS

    doc = parse(rc.render_run_config(m, hf_source="nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"))
    assert doc["tokenizer"]["hf_tokenizer_kwargs"] == {"use_fast": True}  # NemotronHBridge.get_hf_tokenizer_kwargs
    back = hf_config_from_model_section(doc["model"])
    assert back["hybrid_override_pattern"] == hf["hybrid_override_pattern"]
    assert spec_from_config(back) == spec_from_config(hf)


def test_a_hybrid_pattern_with_pipeline_and_mtp_marks_reads_as_the_main_pattern():
    from streamconv.formats.run_config_reader import hf_config_from_model_section

    hf = json.loads(NANO_30B.read_text())
    m = rc.provider_fields(dict(hf, mtp_hybrid_override_pattern="*E"))
    m["hybrid_layer_pattern"] = "MEM*|EME/*E/*E"
    m["mtp_num_layers"] = 2
    back = hf_config_from_model_section(m)
    assert back["hybrid_override_pattern"] == "MEM*EME" and back["num_hidden_layers"] == 7
    assert back["num_nextn_predict_layers"] == 2 and back["mtp_hybrid_override_pattern"] == "*E"
    # a training run's two depths of one shared layer set (Bridge's Super recipe: mtp_num_layers 2, repeated):
    # megatron-core holds mtp.layers.0 alone, HF its two layers; unshared, two sets and four layers
    from streamconv.models.config import spec_from_config

    for repeated, held in ((True, 2), (False, 4)):
        m["mtp_use_repeated_layer"] = repeated
        spec = spec_from_config({**hf_config_from_model_section(m), "hybrid_override_pattern": "MEM*EME"})
        assert back["num_nextn_predict_layers"] == 2 and "".join(layer.kind for layer in spec.mtp) == "*E" * (held // 2)
