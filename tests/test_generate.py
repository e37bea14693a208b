"""``streamconv generate``: the converted checkpoint in real megatron-core, greedy tokens equal to
transformers' (Llama, Nemotron-H) or the reference forward's (DeciLM) for 20 new tokens; tokenizer from the checkpoint's
``tokenizer/`` or from ``--hf-model``; ``--tp 2`` under torchrun gives the same tokens; a model that does not
fit the stated memory is refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamconv.cli import main
from streamconv.reference.synth import llama_config, make_checkpoint, make_tokenizer, mixed_decilm_config

pytest.importorskip("mcore_harness")
pytest.importorskip("transformers")

PROMPT = "Hello world, streaming"


def converted(tmp_path, cfg, *flags):
    src = make_checkpoint(tmp_path / "hf", cfg, seed=5, shards=2, dtype=torch.float32)
    make_tokenizer(src, cfg["vocab_size"])
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(tmp_path / "mcore"), "--quiet", *flags]) == 0
    return src, tmp_path / "mcore"


def generate(capsys, *args) -> tuple[int, dict | str]:
    capsys.readouterr()
    rc = main(["generate", *args])
    out = capsys.readouterr()
    return rc, (json.loads(out.out) if "--json" in args and out.out.strip().startswith("{") else out)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return converted(tmp_path_factory.mktemp("gen"), llama_config(hidden=64, layers=2, heads=8, kv_heads=2,
                                                                  ffn=160, vocab=128))


def test_greedy_tokens_equal_transformers_and_the_tokenizer_comes_from_the_checkpoint(llama, capsys):
    src, out = llama
    assert (out / "iter_0000000" / "tokenizer" / "tokenizer.json").is_file()
    rc, result = generate(capsys, "--megatron-path", str(out), "--prompt", PROMPT, "--max-new-tokens", "20",
                          "--compare-hf", str(src), "--json")
    assert rc == 0
    cmp = result["compare_hf"]
    assert len(result["tokens"]) == 20 and cmp["identical"] and cmp["hf_tokens"] == result["tokens"]
    assert cmp["first_step_max_abs_logit_diff"] <= 1e-4
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    assert result["prompt_tokens"] == len(tok(PROMPT)["input_ids"])
    assert result["text"] == tok.decode(result["tokens"], skip_special_tokens=True)


def test_the_tokenizer_from_hf_model_the_chat_template_and_the_streamed_text(llama, tmp_path, capsys):
    src, out = llama
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    shutil.rmtree(bare / "iter_0000000" / "tokenizer")
    rc, err = generate(capsys, "--megatron-path", str(bare), "--prompt", PROMPT, "--max-new-tokens", "3")
    assert rc == 2 and "pass --hf-model" in err.err
    rc, plain = generate(capsys, "--megatron-path", str(bare), "--hf-model", str(src), "--prompt", PROMPT,
                         "--max-new-tokens", "20", "--json")
    assert rc == 0
    _, own = generate(capsys, "--megatron-path", str(out), "--prompt", PROMPT, "--max-new-tokens", "20", "--json")
    assert plain["tokens"] == own["tokens"]

    rc, chat = generate(capsys, "--megatron-path", str(out), "--prompt", PROMPT, "--max-new-tokens", "5", "--chat",
                        "--compare-hf", str(src), "--json")
    assert rc == 0 and chat["compare_hf"]["identical"]
    assert chat["prompt_tokens"] == len(f"user: {PROMPT}\nassistant: ")  # one token per character

    rc, shown = generate(capsys, "--megatron-path", str(out), "--prompt", PROMPT, "--max-new-tokens", "20")
    assert rc == 0 and shown.out == PROMPT + own["text"] + "\n"  # streamed as it came, then the end of line
    assert "parameters x 4 bytes (float32)" in shown.err


def test_decilm_greedy_tokens_equal_the_reference_forward(tmp_path, capsys):
    cfg = {**mixed_decilm_config(hidden=64, heads=8, vocab=256), "torch_dtype": "float32"}
    src, out = converted(tmp_path, cfg)
    rc, result = generate(capsys, "--megatron-path", str(out), "--prompt", PROMPT, "--max-new-tokens", "20",
                          "--compare-hf", str(src), "--json")
    assert rc == 0 and result["compare_hf"]["identical"] and len(result["tokens"]) == 20
    assert result["compare_hf"]["first_step_max_abs_logit_diff"] <= 1e-4


@pytest.mark.parametrize("flags", [(), ("--drop-mtp",)])
def test_nemotron_h_greedy_tokens_equal_transformers(tmp_path, capsys, flags):
    """A hybrid model (Mamba2, attention, MLP, latent MoE) in megatron-core's MambaModel on the CPU, with the
    pure-torch selective scan: the tokens transformers' NemotronHForCausalLM picks; converted with its MTP layers
    (which next-token generation does not use) or without them."""
    cfg = json.loads((Path(__file__).parent / "data" / "nemotron_h" / "tiny_hf_config.json").read_text())
    src, out = converted(tmp_path, cfg, *flags)
    rc, result = generate(capsys, "--megatron-path", str(out), "--prompt", PROMPT, "--max-new-tokens", "12",
                          "--compare-hf", str(src), "--json")
    assert rc == 0 and result["compare_hf"]["identical"] and len(result["tokens"]) == 12
    assert result["compare_hf"]["first_step_max_abs_logit_diff"] <= 1e-4


def test_tensor_parallel_under_torchrun_gives_the_same_tokens(llama, capsys):
    src, out = llama
    _, one = generate(capsys, "--megatron-path", str(out), "--prompt", PROMPT, "--max-new-tokens", "20", "--json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "streamconv",
           "generate", "--megatron-path", str(out), "--prompt", PROMPT, "--max-new-tokens", "20", "--tp", "2",
           "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    two = json.loads(p.stdout)  # rank 0 alone prints
    assert two["tp"] == 2 and two["tokens"] == one["tokens"]


def test_a_model_that_does_not_fit_is_refused_in_one_line(llama, capsys):
    _, out = llama
    rc, result = generate(capsys, "--megatron-path", str(out), "--prompt", PROMPT, "--max-memory", "100KiB")
    assert rc == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "parameters x 4 bytes (float32)" in lines[0] and "above the 100.0 KiB" in lines[0]
    rc, _ = generate(capsys, "--megatron-path", str(out), "--prompt", PROMPT, "--max-new-tokens", "1",
                     "--dtype", "bf16", "--max-memory", "300KiB")  # half the bytes: it fits
    assert rc == 0
    rc, result = generate(capsys, "--megatron-path", str(out), "--prompt", PROMPT, "--tp", "2")
    assert rc == 2 and "needs 2 processes" in result.err
