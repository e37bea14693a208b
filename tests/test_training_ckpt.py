"""What Megatron-LM's training loop leaves behind: a torch_dist checkpoint with the trained model, Adam state
(megatron-core's own optimizer sharding helpers), rng objects, ``args`` and ``iteration`` 500 in the common
state, under ``iter_0000500`` and no ``run_config.yaml``. ``mcore2hf`` exports the trained weights from it
without ``--hf-config`` and never reads the optimizer's bytes; ``inspect`` says what else is there."""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from streamconv.cli import main
from streamconv.reference.synth import llama_config, make_checkpoint, mixed_decilm_config

mh = pytest.importorskip("mcore_harness")


def megatron_args(cfg: dict) -> argparse.Namespace:
    """The model fields of Megatron-LM's ``args`` (plus a few of what else it holds)."""
    from megatron.core.transformer.enums import AttnBackend  # a global of megatron's: read, never imported

    heads = cfg["num_attention_heads"]
    args = argparse.Namespace(
        num_layers=cfg.get("num_hidden_layers"), hidden_size=cfg["hidden_size"], num_attention_heads=heads,
        ffn_hidden_size=cfg.get("intermediate_size"), group_query_attention=True,
        num_query_groups=cfg.get("num_key_value_heads") or heads, kv_channels=cfg["hidden_size"] // heads,
        max_position_embeddings=cfg.get("max_position_embeddings"), position_embedding_type="rope",
        rotary_base=int(cfg.get("rope_theta", 10000)), use_rope_scaling=False, norm_epsilon=cfg.get("rms_norm_eps"),
        normalization="RMSNorm", swiglu=True, untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings"),
        add_bias_linear=False, add_qkv_bias=False, vocab_size=None, padded_vocab_size=cfg["vocab_size"],
        params_dtype=torch.float32, bf16=False, fp16=False, lr=3e-4, micro_batch_size=1, train_iters=1000,
        save="/lustre/run7/checkpoints", attention_backend=AttnBackend.auto, seed=1234,
    )
    if "block_configs" in cfg:
        args.heterogeneous_layers_config_encoded_json = json.dumps(cfg)
        args.ffn_hidden_size = None
    if cfg.get("model_type") == "nemotron_h":  # a hybrid run: --hybrid-layer-pattern, --squared-relu, the sizes
        from megatron.core.activations import squared_relu

        from streamconv.reference import mcore_hybrid

        vars(args).update(
            num_layers=None, hybrid_layer_pattern=mcore_hybrid.unified_pattern(cfg, mcore_hybrid.has_mtp(cfg)),
            kv_channels=cfg["head_dim"], max_position_embeddings=4096, position_embedding_type="none",
            rotary_base=10000, norm_epsilon=cfg["layer_norm_epsilon"], swiglu=False, squared_relu=True,
            activation_func=squared_relu, mamba_num_heads=cfg["mamba_num_heads"],
            mamba_head_dim=cfg["mamba_head_dim"], mamba_num_groups=cfg["n_groups"],
            mamba_state_dim=cfg["ssm_state_size"], num_experts=cfg["n_routed_experts"],
            moe_router_topk=cfg["num_experts_per_tok"], moe_ffn_hidden_size=cfg["moe_intermediate_size"],
            moe_shared_expert_intermediate_size=cfg["moe_shared_expert_intermediate_size"],
            moe_latent_size=cfg["moe_latent_size"], moe_router_topk_scaling_factor=cfg["routed_scaling_factor"],
            mtp_num_layers=cfg["num_nextn_predict_layers"] if mcore_hybrid.has_mtp(cfg) else None)
    return args


def save_training_checkpoint(model, args, out: Path, iteration: int, patches=None) -> Path:
    """``dist_checkpointing.save`` of what Megatron-LM's ``save_checkpoint`` gathers (model, optimizer, rng,
    args, iteration), after one Adam step so that the weights are not the imported ones."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            optim_state_to_sharding_state)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    g = torch.Generator().manual_seed(7)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    ckpt = out / f"iter_{iteration:07d}"
    ckpt.mkdir(parents=True)
    with (patches or mh.cpu_patches)():
        model_sd = model.sharded_state_dict()
        optim_sd = opt.state_dict()
        id_map = get_param_id_to_sharded_param_map(model_sd, itertools.chain.from_iterable(
            group["params"] for group in opt.param_groups))
        optim_state_to_sharding_state(optim_sd, id_map, exclude_keys=("step",))  # as megatron-core does
        rng = {"random_rng_state": random.getstate(), "torch_rng_state": torch.get_rng_state()}
        state = {"model": model_sd, "optimizer": optim_sd,
                 "rng_state": [ShardedObject("rng_state", [rng], (1, 1), (0, 0), replica_id=0)],
                 "args": args, "checkpoint_version": 3.0, "iteration": iteration,
                 "opt_param_scheduler": {"max_lr": 3e-4, "num_steps": iteration}}
        dist_checkpointing.save(state, str(ckpt))
    (out / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return ckpt


def trained_weights_export(model, cfg_folder: Path, tmp_path: Path, patches=None) -> dict[str, torch.Tensor]:
    """The trained model saved weights-only and exported with --hf-config: what the export must equal."""
    with (patches or mh.cpu_patches)():
        ckpt = mh.save_reference_checkpoint(model, tmp_path / "weights-only")
    assert main(["mcore2hf", "--megatron-path", str(ckpt), "--hf-path", str(tmp_path / "expected"),
                 "--hf-config", str(cfg_folder), "--quiet"]) == 0
    return load_folder(tmp_path / "expected")


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


NEMOTRON_H = Path(__file__).parent / "data" / "nemotron_h" / "tiny_hf_config.json"
CASES = {
    "llama": lambda: llama_config(hidden=64, layers=2, heads=8, kv_heads=2, ffn=160, vocab=256),
    "decilm": lambda: {**mixed_decilm_config(hidden=64, heads=8, vocab=256), "torch_dtype": "float32"},
    "nemotron_h": lambda: json.loads(NEMOTRON_H.read_text()),  # Mamba2, attention, MLP, latent MoE (+ MTP on 0.17+)
}


def trainable(case: str, cfg: dict, ckpt: Path):
    """megatron-core's model of ``cfg`` loaded from ``ckpt``, and the context its state dict needs on the CPU."""
    if case == "nemotron_h":
        from streamconv.reference import mcore_hybrid

        model = mcore_hybrid.build_mamba(cfg, mtp=mcore_hybrid.has_mtp(cfg))
        mcore_hybrid.load(model, ckpt)
        return model, mcore_hybrid.cpu_stand_ins
    model = mh.build_hetero_gpt(cfg) if case == "decilm" else mh.build_gpt(cfg)
    mh.load_checkpoint(model, ckpt, check_extra=False)
    return model, mh.cpu_patches


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_training_checkpoint_exports_its_trained_weights_without_hf_config(tmp_path, capsys, case):
    cfg = CASES[case]()
    src = make_checkpoint(tmp_path / "hf", cfg, seed=3, shards=2)
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(tmp_path / "mcore"), "--quiet"]) == 0
    model, patches = trainable(case, cfg, tmp_path / "mcore" / "iter_0000000")
    train = tmp_path / "train"
    ckpt = save_training_checkpoint(model, megatron_args(cfg), train, 500, patches)
    assert not (ckpt / "run_config.yaml").exists()
    expected = trained_weights_export(model, src, tmp_path, patches)

    # the optimizer's bytes are never read: make every optimizer item unreadable garbage
    from streamconv.sources.torch_dist import TorchDistSource

    with TorchDistSource(ckpt) as reader:
        optimizer = [c for k, t in reader.tensors.items() if k.startswith("optimizer.") for c in t.chunks]
    assert len(optimizer) >= 2 * len(list(model.parameters()))  # exp_avg and exp_avg_sq of every parameter
    for item in optimizer:
        with open(ckpt / item.file, "r+b") as f:
            f.seek(item.offset)
            f.write(b"\xff" * item.length)

    capsys.readouterr()
    assert main(["mcore2hf", "--megatron-path", str(train), "--hf-path", str(tmp_path / "out"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["config_from"] == "the training args in the checkpoint's common state"
    assert summary["input"].endswith("iter_0000500")
    got = load_folder(tmp_path / "out")
    original = {n: t for n, t in load_folder(src).items() if n in expected or not n.startswith("mtp.")}
    assert sorted(got) == sorted(expected) == sorted(original)  # (MTP layers where megatron-core has them: 0.17+)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name  # the trained weights, bit for bit
    assert any(not torch.equal(got[n], original[n]) for n in got)  # ... which are not the imported ones
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    if case == "nemotron_h":
        assert written["hybrid_override_pattern"] == "M*-ME" and written["architectures"] == cfg["architectures"]
        for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                    "intermediate_size", "mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size",
                    "n_routed_experts", "moe_latent_size", "layer_norm_epsilon", "tie_word_embeddings"):
            assert written[key] == cfg[key], key
        return
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "rms_norm_eps",
                "tie_word_embeddings", "torch_dtype", *(("block_configs",) if case == "decilm" else
                                                       ("intermediate_size", "num_key_value_heads"))):
        assert written[key] == cfg[key], key

    # verify reads the weights of the training checkpoint (optimizer state skipped) against the trained export
    assert main(["verify", "--hf-model", str(tmp_path / "out"), "--megatron-path", str(train), "--quiet"]) == 0
    assert main(["verify", "--hf-model", str(src), "--megatron-path", str(train), "--quiet"]) == 5  # not the originals
    capsys.readouterr()
    assert main(["inspect", str(train), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    training = report["training_state"]
    assert training["iteration"] == 500 and training["optimizer_tensors"] == len(optimizer)
    assert training["rng_state"] == 1 and training["args"] is True


def test_common_state_reader_never_runs_a_pickle(tmp_path):
    """A common.pt whose pickle would run code if loaded: read, the payload stays an inert stand-in."""
    import io
    import os

    from streamconv.formats.megatron_args import Foreign, load_torch_save

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    buf = io.BytesIO()
    torch.save({"args": argparse.Namespace(hidden_size=8, evil=Payload()), "iteration": 3}, buf)
    state = load_torch_save(buf.getvalue(), "common.pt")
    assert state["iteration"] == 3 and state["args"].hidden_size == 8
    assert isinstance(state["args"].evil, Foreign) and state["args"].evil.name == "posix.system"
    assert not (tmp_path / "pwned").exists()
