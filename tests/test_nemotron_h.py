"""Nemotron-H (issue 27): the spec and the mapping table. What the plan makes of the tiny config equals what
megatron-core 0.16.1's MambaModel writes (its torch_dist keys, shapes and _extra_state objects, dumped in
tests/data/nemotron_h/ from shared/reference/nemotron_h) and the HF names and shapes transformers 5.25 saves;
the real Nano-30B config counts its published parameters. Conversions, loads and logits:
test_nemotron_h_mcore.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from streamconv.cli import main
from streamconv.models import rules
from streamconv.models.config import spec_from_config
from streamconv.plan.build import export_plan, import_plan

DATA = Path(__file__).parent / "data" / "nemotron_h"


def tiny() -> dict:
    return json.loads((DATA / "tiny_hf_config.json").read_text())


def mcore_dump() -> tuple[dict[str, tuple], set[str]]:
    """megatron-core's .metadata of the tiny model: {tensor key: shape}, {object keys}."""
    tensors, objects = {}, set()
    for line in (DATA / "mcore_torch_dist_metadata_keys.txt").read_text().splitlines():
        key, rest = line.split(" ", 1)
        if rest == "bytes":
            objects.add(key)
        else:
            tensors[key] = tuple(int(x) for x in re.search(r"\(([^)]*)\)", rest).group(1).split(",") if x.strip())
    return tensors, objects


def test_the_plan_has_the_keys_shapes_and_objects_megatron_core_writes():
    spec = spec_from_config(tiny())
    plan = import_plan(spec, {t.name: "float32" for t in rules.hf_tensors(spec)})
    tensors, objects = mcore_dump()
    assert {k: tuple(t.shape) for k, t in plan.targets.items()} == tensors
    assert set(plan.objects) == objects
    assert rules.param_count(spec) == 145_200  # transformers' count (the router's score correction is a buffer)


def test_the_hf_side_is_what_transformers_saves():
    spec = spec_from_config(tiny())
    saved = {line.split()[0]: json.loads(line[line.index("["):line.index("]") + 1])
             for line in (DATA / "hf_safetensors_keys.txt").read_text().splitlines()}
    assert {t.name: list(t.shape) for t in rules.hf_tensors(spec)} == saved


def test_in_proj_and_conv1d_split_into_their_parts_and_back():
    """in_proj's rows are z | x | B | C | dt and conv1d's x | B | C: each part is a key of its own, read from its
    rows, and the export writes every row of the HF tensor back from them (d_inner = heads x head_dim)."""
    spec = spec_from_config(tiny())
    d, gn, h = 8 * 16, 2 * 16, 8  # mamba_num_heads x mamba_head_dim (not expand x hidden), n_groups x state
    plan = import_plan(spec, {t.name: "float32" for t in rules.hf_tensors(spec)}, chunk_bytes=10**9)
    reads = {c.key: c.reads for c in plan.chunks if c.key.startswith("decoder.layers.0.mixer.")}
    name = "backbone.layers.0.mixer.in_proj.weight"
    assert [(r.row0, r.row1) for p in "z x B C dt".split() for r in reads[f"decoder.layers.0.mixer.in_proj.weight.{p}"]
            ] == [(0, d), (d, 2 * d), (2 * d, 2 * d + gn), (2 * d + gn, 2 * d + 2 * gn), (2 * d + 2 * gn, 2 * d + 2 * gn + h)]
    assert all(r.name == name for p in "z x B C dt".split() for r in reads[f"decoder.layers.0.mixer.in_proj.weight.{p}"])
    assert [(r.row0, r.row1) for p in "x B C".split() for r in reads[f"decoder.layers.0.mixer.conv1d.bias.{p}"]] == \
        [(0, d), (d, d + gn), (d + gn, d + 2 * gn)]
    back = export_plan(spec, {k: "float32" for k in plan.targets}, chunk_bytes=4096)
    rows = sorted((c.offsets[0], c.offsets[0] + c.sizes[0]) for c in back.chunks if c.key == name)
    assert rows[0][0] == 0 and rows[-1][1] == 2 * d + 2 * gn + h and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    assert len(back.targets) == 44 and back.targets[name].shape == (2 * d + 2 * gn + h, 64)


def test_routed_experts_are_one_key_stacked_over_the_experts():
    spec = spec_from_config(tiny())
    plan = import_plan(spec, {t.name: "float32" for t in rules.hf_tensors(spec)}, chunk_bytes=10**9)
    fc1 = [c for c in plan.chunks if c.key == "decoder.layers.4.mlp.experts.experts.linear_fc1.weight"]
    # whole experts that follow each other are one chunk, read from each expert's tensor in turn
    assert [(c.offsets, c.sizes) for c in fc1] == [((0, 0, 0), (4, 48, 32))]
    assert [r.name for r in fc1[0].reads] == [f"backbone.layers.4.mixer.experts.{e}.up_proj.weight" for e in range(4)]
    small = import_plan(spec, {t.name: "float32" for t in rules.hf_tensors(spec)}, chunk_bytes=2 * 48 * 32 * 4)
    fc1 = [c for c in small.chunks if c.key == "decoder.layers.4.mlp.experts.experts.linear_fc1.weight"]
    assert [(c.offsets, c.sizes) for c in fc1] == [((0, 0, 0), (2, 48, 32)), ((2, 0, 0), (2, 48, 32))]
    _, objects = mcore_dump()
    assert {f"decoder.layers.4.mlp.experts.experts.linear_fc2._extra_state/shard_{e}_4" for e in range(4)} <= objects


def test_the_real_nano_30b_config_plans_its_published_parameters(tmp_path, capsys):
    (tmp_path / "config.json").write_bytes((DATA / "Nemotron-3-Nano-30B-A3B.config.json").read_bytes())
    capsys.readouterr()
    assert main(["plan", "--hf-model", str(tmp_path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["parameters"] == 31_577_937_344 and plan["layers"] == 52
    assert plan["architecture"] == "NemotronHForCausalLM"
    spec = spec_from_config(json.loads((tmp_path / "config.json").read_text()))
    assert [layer.kind for layer in spec.layers].count("E") == 23 and [l.kind for l in spec.layers].count("*") == 6


@pytest.mark.parametrize("field,value", [("hybrid_override_pattern", "M*X"), ("mlp_hidden_act", "silu"),
                                         ("n_groups", 3)])
def test_a_config_streamconv_cannot_map_is_one_line(tmp_path, field, value):
    cfg = {**tiny(), field: value}
    if field == "hybrid_override_pattern":
        cfg.pop("layers_block_type")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "streamconv", "plan", "--hf-model", str(tmp_path)],
                       capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 3 and len(lines) == 1 and "config.json" in lines[0], r.stderr


def test_mtp_layers_are_left_out_only_when_asked_and_then_listed(tmp_path):
    """A checkpoint with multi-token-prediction layers (mtp.*: transformers ignores them, megatron-core's
    MambaModel has none): refused in one line naming --drop-mtp; with it, converted, and every MTP tensor is
    listed in the --json summary under left_out."""
    import torch
    from safetensors.torch import save_file

    from streamconv.reference.synth import make_checkpoint

    src = make_checkpoint(tmp_path / "hf", tiny(), seed=1, shards=2)
    mtp = {"mtp.layers.0.eh_proj.weight": torch.zeros(64, 128), "mtp.layers.0.norm.weight": torch.ones(64)}
    save_file(mtp, src / "mtp.safetensors", metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].update({name: "mtp.safetensors" for name in mtp})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    cmd = [sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(src), "--megatron-path", str(tmp_path / "o")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 3 and len(lines) == 1 and "--drop-mtp" in lines[0] and "mtp." in lines[0], r.stderr
    r = subprocess.run(cmd + ["--drop-mtp", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["left_out"] == sorted(mtp)
