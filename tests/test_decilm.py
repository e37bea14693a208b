"""hf2mcore on heterogeneous DeciLM (nemotron-nas) checkpoints, judged by the real client: a megatron-core
GPTModel built with HeterogeneousTransformerConfig and the heterogeneous (local) layer spec loads the output
at default strictness, and its logits equal streamconv.reference.forward (an independent forward of the HF weights),
which is itself checked against transformers' LlamaForCausalLM."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from streamconv.engine import runner
from streamconv.cli import main
from streamconv.sources.safetensors import SafetensorsSource
from streamconv.inputs import chunk_bytes_for, import_plan_for as build_plan
from streamconv.models import rules
from streamconv.models.config import spec_from_config
from streamconv.reference.forward import reference_logits
from streamconv.reference.synth import (CONFIGS_DIR, REAL_CONFIGS, decilm_block, decilm_config, llama_config, make_checkpoint,
                              mixed_decilm_config, real_config, scale_config)

mh = pytest.importorskip("mcore_harness")

TOKENS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
# original_max_position_embeddings 64 (not 8192) with 40 tokens: at these small head dims the llama3 scaled
# and smoothed bands then change the logits, so a wrong llama3 formula fails the comparison.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
LONG_TOKENS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))


def hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def convert_and_check(tmp_path: Path, cfg: dict, seed: int = 1, tokens: torch.Tensor = TOKENS) -> Path:
    """Generate, convert with the CLI, load into megatron-core (default strictness), compare logits."""
    src = make_checkpoint(tmp_path / "hf", cfg, seed=seed, shards=3)
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(tmp_path / "mcore"), "--quiet"]) == 0
    ckpt = tmp_path / "mcore" / "iter_0000000"
    model = mh.build_hetero_gpt(cfg)
    # every key the model asks for is written (the linear replacements' _extra_state too), and nothing else
    assert mh.checkpoint_keys(ckpt) - {"common_state/shard_0_1"} == mh.model_checkpoint_keys(model)
    mh.load_checkpoint(model, ckpt, check_extra=False)
    ours = mh.logits(model, tokens)
    ref = reference_logits(cfg, hf_weights(src), tokens)
    assert ours.shape == ref.shape == (*tokens.shape, cfg["vocab_size"])
    assert (ours - ref).abs().max().item() <= 1e-4
    return ckpt


def kinds(spec) -> list[tuple]:
    return [(layer.attention, layer.num_query_groups, layer.mlp, layer.ffn_hidden_size) for layer in spec.layers]


def test_every_block_variant(tmp_path):
    """(a) attention full (2, 4 and 8 query groups), no_op and replace_with_linear; FFN full with three
    ffn_mult widths, no_op and replace_with_linear; a fully empty layer; both linear."""
    cfg = mixed_decilm_config(hidden=64, heads=8, vocab=256, rope_scaling=LLAMA3_ROPE)
    spec_kinds = kinds(spec_from_config(cfg))
    assert {k[0] for k in spec_kinds} == {"attention", "no_op", "linear"}
    assert {k[2] for k in spec_kinds} == {"mlp", "no_op", "linear"}
    assert len({k[1] for k in spec_kinds if k[0] == "attention"}) >= 2
    assert len({k[3] for k in spec_kinds if k[2] == "mlp"}) >= 3
    assert ("no_op", None, "no_op", None) in spec_kinds
    ckpt = convert_and_check(tmp_path, cfg, tokens=LONG_TOKENS)

    # Bridge-style run_config.yaml carries what megatron-core needs to rebuild the model
    import yaml

    run_config = yaml.safe_load((ckpt / "run_config.yaml").read_text())
    encoded = json.loads(run_config["model"]["heterogeneous_layers_config_encoded_json"])
    assert encoded["block_configs"] == cfg["block_configs"]


# (b), (c): every layer of the real model (80 and 162), same variants per layer, small widths; heads chosen so
# that every full attention layer keeps 2 query groups (Super: 64/8 -> 16/8, Ultra: 128/16 -> 32/16).
SCALED = {"super-49b-v1": dict(hidden=128, heads=16), "ultra-253b-v1": dict(hidden=128, heads=32)}


@pytest.mark.parametrize("name", sorted(SCALED))
def test_scaled_real_block_pattern(tmp_path, name):
    real = real_config(name)
    cfg = scale_config(real, vocab=256, **SCALED[name])
    real_kinds, small_kinds = kinds(spec_from_config(real)), kinds(spec_from_config(cfg))
    assert len(small_kinds) == real["num_hidden_layers"]
    assert [(a, m) for a, _, m, _ in small_kinds] == [(a, m) for a, _, m, _ in real_kinds]
    assert {g for _, g, _, _ in small_kinds if g} == {2}
    if name == "ultra-253b-v1":  # its four extremely wide FFNs stay the widest
        widths = [w or 0 for *_, w in small_kinds]
        assert sorted(range(len(widths)), key=widths.__getitem__)[-4:] == [149, 143, 125, 134]
    convert_and_check(tmp_path, cfg)


def test_scale_config_layer_subsets():
    ultra = real_config("ultra-253b-v1")
    cfg = scale_config(ultra, hidden=64, heads=16, layers=[0, 9, 125, 134])
    assert cfg["num_hidden_layers"] == 4
    assert cfg["block_configs"] == [ultra["block_configs"][i] for i in (0, 9, 125, 134)]
    assert scale_config(ultra, hidden=64, heads=16, layers=3)["block_configs"] == ultra["block_configs"][:3]
    with pytest.raises(ValueError, match="n_heads_in_group=16"):
        scale_config(ultra, hidden=64, heads=8)


# ---------------------------------------------------------------------------------------------- reference


def llama_logits(cfg: dict, weights: dict, tokens) -> torch.Tensor:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="eager")).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    with torch.no_grad():
        return model(tokens).logits




@pytest.mark.parametrize("kwargs", [
    dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, rope_theta=10000.0, rope_scaling=LLAMA3_ROPE),
    dict(hidden=48, layers=2, heads=4, kv_heads=4, head_dim=16, ffn=64, tied=True),
], ids=["gqa-llama3-rope", "mha-tied-headdim"])
def test_reference_equals_transformers_llama(tmp_path, kwargs):
    cfg = llama_config(vocab=256, **kwargs)
    weights = hf_weights(make_checkpoint(tmp_path, cfg, seed=7, shards=1))
    ref = reference_logits(cfg, weights, LONG_TOKENS)
    assert (ref - llama_logits(cfg, weights, LONG_TOKENS)).abs().max().item() <= 1e-4


def test_reference_decilm_with_full_blocks_equals_llama(tmp_path):
    """A DeciLM whose blocks are all full (same groups, same width) is a Llama: same logits as transformers."""
    blocks = [decilm_block("full", 4, "full", 6.0)] * 3  # 8 heads / 4 = 2 groups; int(2*6*64/3) = 256
    cfg = decilm_config(blocks, hidden=64, heads=8, vocab=256, rope_theta=10000.0, rope_scaling=LLAMA3_ROPE)
    weights = hf_weights(make_checkpoint(tmp_path, cfg, seed=2, shards=1))
    as_llama = llama_config(hidden=64, layers=3, heads=8, kv_heads=2, ffn=256, vocab=256, rope_theta=10000.0,
                            rope_scaling=LLAMA3_ROPE)
    ref = reference_logits(cfg, weights, LONG_TOKENS)
    assert (ref - llama_logits(as_llama, weights, LONG_TOKENS)).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------- refusals


def _set(path: str, value):
    def edit(cfg):
        *keys, last = path.split(".")
        node = cfg
        for k in keys:
            node = node[int(k)] if k.isdigit() else node[k]
        node[last] = value
    return edit


REFUSED = {
    # name: (edit of the mixed config, text the one-line error must hold)
    "sparsify": (_set("block_configs.3.ffn.sparsify", ["attn"]), "layer 3 (block_configs[3]): ffn.sparsify"),
    "window_length": (_set("block_configs.0.attention.window_length", 128), "layer 0 (block_configs[0]): attention.window_length=128"),
    "num_sink_tokens": (_set("block_configs.7.attention.num_sink_tokens", 4), "layer 7 (block_configs[7]): attention.num_sink_tokens=4"),
    "n_heads_in_group-not-dividing": (_set("block_configs.4.attention.n_heads_in_group", 3), "layer 4 (block_configs[4]): attention.n_heads_in_group=3"),
    "n_heads_in_group-null": (_set("block_configs.0.attention.n_heads_in_group", None), "layer 0 (block_configs[0]): attention.n_heads_in_group=None"),
    "no_op-with-groups": (_set("block_configs.1.attention.n_heads_in_group", 4), "layer 1 (block_configs[1]): attention is no_op but n_heads_in_group=4"),
    "no_op-and-linear": (_set("block_configs.6.ffn.no_op", True), "layer 6 (block_configs[6]): ffn is both no_op and replace_with_linear"),
    "ffn_mult-zero": (_set("block_configs.2.ffn.ffn_mult", 0), "layer 2 (block_configs[2]): ffn.ffn_mult=0"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unmappable_config_is_refused_naming_the_layer(tmp_path, capsys, case):
    edit, expected = REFUSED[case]
    cfg = mixed_decilm_config()
    src = make_checkpoint(tmp_path / "hf", cfg, shards=1)
    bad = json.loads(json.dumps(cfg))
    edit(bad)
    (src / "config.json").write_text(json.dumps(bad))
    capsys.readouterr()
    rc = main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 3
    assert "\n" not in err and expected in err, err
    assert not (tmp_path / "out" / "iter_0000000" / ".metadata").exists()


# ---------------------------------------------------------------------------------------------- plan


def independent_count(cfg: dict) -> int:
    """Parameters of a HF Llama / DeciLM config, counted here from the formulas (not streamconv's tables)."""
    h, heads, vocab = cfg["hidden_size"], cfg["num_attention_heads"], cfg["vocab_size"]
    d = cfg.get("head_dim") or h // heads
    total = vocab * h * (1 if cfg.get("tie_word_embeddings") else 2) + h
    blocks = cfg.get("block_configs") or [
        {"attention": {"n_heads_in_group": heads // (cfg.get("num_key_value_heads") or heads)},
         "ffn": {"width": cfg["intermediate_size"]}}] * cfg["num_hidden_layers"]
    for b in blocks:
        a, f = b["attention"], b["ffn"]
        if a.get("replace_with_linear"):
            total += h * h + h
        elif not a.get("no_op"):
            total += 2 * heads * d * h + 2 * (heads // a["n_heads_in_group"]) * d * h + h
        if f.get("replace_with_linear"):
            total += h * h + h
        elif not f.get("no_op"):
            width = f.get("width") or -(-int(2 * f["ffn_mult"] * h / 3) // 256) * 256
            total += 3 * width * h + h
    return total


PUBLISHED_B = {"super-49b-v1": 49.9, "ultra-253b-v1": 253.4, "nano-4b-v1.1": 4.5, "nano-8b-v1": 8.0,
               "70b-instruct-hf": 70.6}


def plan_json(*args) -> dict:
    r = subprocess.run([sys.executable, "-m", "streamconv", "plan", "--json", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("name", ["super-49b-v1", "ultra-253b-v1"])
def test_plan_on_real_configs(name):
    cfg = real_config(name)
    out = plan_json("--hf-model", str(CONFIGS_DIR / REAL_CONFIGS[name]))
    assert out["parameters"] == independent_count(cfg)
    assert round(out["parameters"] / 1e9, 1) == PUBLISHED_B[name]
    assert out["dtype"] == "bfloat16" and out["bytes"] == 2 * out["parameters"]
    layers = out["per_layer"]
    assert len(layers) == cfg["num_hidden_layers"]
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    assert sum(r["parameters"] for r in layers) + 2 * vocab * h + h == out["parameters"]
    assert max(r["memory_bytes"] for r in layers) <= out["min_memory_bytes"] <= out["max_memory_bytes"]
    if name == "ultra-253b-v1":
        wide = layers[134]  # 425984-wide FFN: one fused linear_fc1 of ~28 GB, converted in 64 MiB pieces
        assert (wide["attention"], wide["ffn_hidden_size"]) == ("no_op", 425984)
        assert wide["largest_tensor_bytes"] == 2 * 425984 * h * 2
        assert wide["memory_bytes"] <= 256 * 2**20
        assert sum(r["attention"] == "no_op" and r["mlp"] == "no_op" for r in layers) == 81


def test_plan_on_real_llama_configs():
    for name in ("nano-4b-v1.1", "nano-8b-v1", "70b-instruct-hf"):
        cfg = real_config(name)
        assert rules.param_count(spec_from_config(cfg)) == independent_count(cfg)
        assert round(independent_count(cfg) / 1e9, 1) == PUBLISHED_B[name]


def test_plan_memory_is_what_the_conversion_needs(tmp_path):
    """The per-layer memory `plan` reports from config.json alone is the engine's own accounting on the real
    checkpoint, and a conversion under exactly the reported budget runs."""
    cfg = scale_config(real_config("ultra-253b-v1"), hidden=64, heads=16, layers=[0, 9, 44, 125, 134, 161],
                       vocab=256)
    src = make_checkpoint(tmp_path / "hf", cfg, dtype=torch.bfloat16, shards=2)
    budget = 96 * 1024
    out = plan_json("--hf-model", str(src), "--max-memory", str(budget))
    source = SafetensorsSource(src)
    try:
        plan = build_plan(source, spec_from_config(cfg), None, chunk_bytes_for(budget))
        assert out["chunks"] == len(plan.chunks)
        for row in out["per_layer"]:
            layer_plan = dataclasses.replace(plan, chunks=[c for c in plan.chunks if c.layer == row["layer"]])
            assert row["memory_bytes"] == runner.min_memory(layer_plan, source), row
        assert out["min_memory_bytes"] == runner.min_memory(plan, source)
    finally:
        source.close()
    assert max(r["memory_bytes"] for r in out["per_layer"]) <= out["min_memory_bytes"] <= budget
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(tmp_path / "ok"), "--quiet",
                 "--max-memory", str(budget)]) == 0
