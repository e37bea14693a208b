"""``streamconv inspect``: tensors, totals and architecture of HF and torch_dist checkpoints, checked
against what the real libraries (safetensors, torch.distributed.checkpoint) read from the same files;
and a crafted ``.metadata`` that would run code is refused without running it."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from streamconv.cli import main
from streamconv.reference.synth import llama_config, make_checkpoint, mixed_decilm_config

ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def inspect_json(path, capsys, rc: int = 0) -> dict:
    got = main(["inspect", str(path), "--json"])
    out, err = capsys.readouterr()
    assert got == rc, err
    return json.loads(out)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("hf") / "llama", llama_config(tied=False), seed=4,
                           dtype=torch.bfloat16, shards=3)


@pytest.fixture(scope="module")
def converted(hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("mcore") / "out"
    assert main(["hf2mcore", "--hf-model", str(hf), "--megatron-path", str(out), "--quiet"]) == 0
    return out


def test_hf_folder_matches_safetensors(hf, capsys):
    report = inspect_json(hf, capsys)
    truth = {}
    for shard in hf.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                shape = list(sl.get_shape())
                truth[name] = (shape, ST_DTYPES[sl.get_dtype()], math.prod(shape) * 2, shard.name)
    got = {t["name"]: (t["shape"], t["dtype"], t["bytes"], t["file"]) for t in report["tensors"]}
    assert got == truth
    assert report["kind"] == "hf" and report["architecture"] == "LlamaForCausalLM"
    assert report["model"]["layers"] == 2 and report["model"]["hidden_size"] == 64
    assert report["check"].startswith("ok")
    tot = report["totals"]
    assert tot["tensors"] == len(truth) and tot["files"] == 3
    assert tot["bytes"] == sum(v[2] for v in truth.values()) == tot["bytes_by_dtype"]["bfloat16"]
    assert tot["parameters"] == sum(math.prod(v[0]) for v in truth.values())
    names = [t["name"] for t in report["tensors"]]
    assert names.index("model.layers.1.mlp.up_proj.weight") < names.index("model.norm.weight")


def test_single_safetensors_file(hf, capsys):
    shard = sorted(hf.glob("*.safetensors"))[0]
    report = inspect_json(shard, capsys)
    with safe_open(str(shard), "pt") as f:
        assert sorted(t["name"] for t in report["tensors"]) == sorted(f.keys())
    assert {t["file"] for t in report["tensors"]} == {shard.name}


def test_hf_table_output(hf, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["inspect", str(hf)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj.weight" in out and "LlamaForCausalLM" in out
    assert "bfloat16" in out and "[64, 64]" in out and "parameters" in out


def test_hf_problems_are_reported_not_fatal(hf, tmp_path, capsys):
    """A config streamconv cannot convert, or a missing weight, is shown in the report's check line: the
    whole report is printed, and the exit code (3) says the checkpoint would not convert."""
    src = shutil.copytree(hf, tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    report = inspect_json(src, capsys, rc=3)
    assert "model.layers.2." in report["check"] and "is needed" in report["check"]
    assert report["convertible"] is False
    (src / "config.json").write_text(json.dumps(dict(cfg, architectures=["MixtralForCausalLM"])))
    report = inspect_json(src, capsys, rc=3)
    assert report["architecture"] == "MixtralForCausalLM" and report["check"].startswith("not convertible")
    assert report["totals"]["tensors"] == 21


def test_torch_dist_matches_dcp_metadata(converted, capsys):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ckpt = converted / "iter_0000000"
    reports = [inspect_json(p, capsys) for p in (converted, ckpt, ckpt / ".metadata")]
    assert reports[0] == reports[1] == reports[2]
    report = reports[0]
    meta = FileSystemReader(str(ckpt)).read_metadata()
    truth = {k: (list(v.size), str(v.properties.dtype).removeprefix("torch."), len(v.chunks))
             for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    got = {t["name"]: (t["shape"], t["dtype"], t["chunks"]) for t in report["tensors"]}
    assert got == truth
    files = {info.relative_path for info in meta.storage_data.values()}
    assert set().union(*(t["files"] for t in report["tensors"])) <= files
    assert report["totals"]["files"] == len(files) == len(report["files"])  # the real count, the objects file too
    assert set(report["objects"]) == set(meta.state_dict_metadata) - set(truth)
    assert report["kind"] == "torch_dist" and report["architecture"] == "LlamaForCausalLM"
    assert report["model"]["layer_keys"].startswith("stacked")
    assert report["check"].startswith("ok: every weight")
    assert report["totals"]["bytes"] == sum(math.prod(s) * 2 for s, _, _ in truth.values())


def test_torch_dist_heterogeneous(tmp_path, capsys):
    src = make_checkpoint(tmp_path / "hf", mixed_decilm_config(), seed=1, shards=2)
    out = tmp_path / "out"
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--quiet"]) == 0
    report = inspect_json(out, capsys)
    assert report["architecture"] == "DeciLMForCausalLM"
    assert report["model"]["layer_keys"].startswith("per-layer")
    assert report["check"].startswith("ok")
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in {t["name"] for t in report["tensors"]}

    (out / "iter_0000000" / "run_config.yaml").unlink()  # without Bridge's file: a guess from the keys
    report = inspect_json(out, capsys)
    assert report["architecture"].startswith("heterogeneous") and "guessed" in report["check"]


def test_crafted_metadata_is_refused_and_nothing_runs(converted, tmp_path):
    """A ``.metadata`` whose unpickling would run a shell command: one-line refusal, the command never ran."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted / "iter_0000000", ckpt)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / ".metadata").write_bytes(pickle.dumps(Exploit()))
    r = subprocess.run([sys.executable, "-m", "streamconv", "inspect", str(ckpt)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "refused" in r.stderr and ("posix.system" in r.stderr or "os.system" in r.stderr)
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["inspect", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a checkpoint" in err and err.count("\n") == 1


def test_tables_into_a_pipe_are_complete(hf, tmp_path):
    """Redirected to a file or a pipe (no terminal: rich would assume 80 columns), every column of every
    row is there, nothing cut with an ellipsis."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "streamconv", "inspect", str(hf)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if ".weight" in line and "│" in line]
    assert len(rows) == 21 and "…" not in r.stdout
    assert all(".safetensors" in row and ("B │" in row) for row in rows)
    cfg = Path(__file__).resolve().parents[1] / "streamconv" / "configs" / "llama-3_1-nemotron-ultra-253b-v1.config.json"
    r = subprocess.run([sys.executable, "-m", "streamconv", "plan", "--hf-model", str(cfg), "--layers"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout
    assert sum(line.strip().startswith("│") for line in r.stdout.splitlines()) >= 162  # a row per layer
