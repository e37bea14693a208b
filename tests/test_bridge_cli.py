"""Megatron-Bridge's spellings work with ``streamconv`` in place of ``convert_checkpoints.py``: ``import`` /
``export``, ``--hf-model`` on export for the HF side, ``--torch-dtype bfloat16``, ``--trust-remote-code``;
the result is the same as with streamconv's own names."""

from __future__ import annotations

import subprocess
import sys

import torch

from streamconv.reference.synth import llama_config, make_checkpoint


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamconv", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_bridge_spellings(tmp_path):
    src = make_checkpoint(tmp_path / "hf", llama_config(hidden=32, layers=1, heads=2, kv_heads=1, ffn=64, vocab=64),
                          seed=4, dtype=torch.float32)
    r = run("import", "--hf-model", src, "--megatron-path", tmp_path / "a", "--torch-dtype", "bfloat16",
            "--trust-remote-code", "--quiet")
    assert r.returncode == 0, r.stderr
    r = run("hf2mcore", "--hf-model", src, "--megatron-path", tmp_path / "b", "--dtype", "bf16", "--quiet")
    assert r.returncode == 0, r.stderr
    for name in ("__0_0.distcp", ".metadata"):
        assert (tmp_path / "a" / "iter_0000000" / name).read_bytes() == (tmp_path / "b" / "iter_0000000" / name).read_bytes()
    r = run("export", "--hf-model", src, "--megatron-path", tmp_path / "a", "--hf-path", tmp_path / "back",
            "--trust-remote-code", "--torch-dtype", "float32", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "back" / "config.json").read_bytes() != b""
    r = run("import", "--hf-model", src, "--megatron-path", tmp_path / "a", "--quiet")  # another dtype: refused
    assert r.returncode == 4 and "holds a finished conversion" in r.stderr and "--dtype" in r.stderr


def test_not_strict_leaves_out_what_the_mapping_does_not_know(tmp_path, capsys):
    """Bridge's --not-strict: a checkpoint with an output layer exported under a config that ties the
    embeddings is refused (naming the flag), and with --not-strict exported without it, said in the summary."""
    import json

    from streamconv.cli import main
    from streamconv.reference.synth import llama_config, make_checkpoint

    untied = llama_config(hidden=64, layers=2, heads=8, kv_heads=2, ffn=160, vocab=256)
    src = make_checkpoint(tmp_path / "hf", untied, seed=2, shards=1)
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(tmp_path / "mcore"), "--quiet"]) == 0
    tied = tmp_path / "tied"
    tied.mkdir()
    (tied / "config.json").write_text(json.dumps({**untied, "tie_word_embeddings": True}))
    capsys.readouterr()
    args = ["export", "--megatron-path", str(tmp_path / "mcore"), "--hf-model", str(tied), "--hf-path"]
    assert main([*args, str(tmp_path / "strict"), "--quiet"]) == 3
    assert "--not-strict" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "loose"), "--not-strict", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["left_out"] == ["output_layer.weight"]
