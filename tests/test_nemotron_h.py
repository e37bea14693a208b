"""Nemotron-H (issue 27): the spec and the mapping table. What the plan makes of the tiny config equals what
megatron-core writes (its torch_dist keys, shapes and _extra_state objects, dumped in tests/data/nemotron_h/ by
tools/nemotron_h_mcore_keys.py: 0.16.1's MambaModel, from shared/reference/nemotron_h, and 0.19.2's HybridModel
with its multi-token-prediction layers, shared and not) and the HF names and shapes transformers 5.25 saves (MTP:
Megatron-Bridge's flattened names); the real Nano-30B config counts its published parameters. Conversions, loads
and logits: test_nemotron_h_mcore.py."""

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


def mcore_dump(name: str = "mcore_torch_dist_metadata_keys.txt") -> tuple[dict[str, tuple], set[str]]:
    """megatron-core's .metadata of the tiny model: {tensor key: shape}, {object keys}."""
    tensors, objects = {}, set()
    for line in (DATA / name).read_text().splitlines():
        key, rest = line.split(" ", 1)
        if rest == "bytes":
            objects.add(key)
        else:
            tensors[key] = tuple(int(x) for x in re.search(r"\(([^)]*)\)", rest).group(1).split(",") if x.strip())
    return tensors, objects


@pytest.mark.parametrize("mtp,dump", [
    (None, "mcore_torch_dist_metadata_keys.txt"),  # MambaModel 0.16.1 (no MTP); 0.19.2 writes the same keys
    ({}, "mcore019_mtp_torch_dist_metadata_keys.txt"),  # one MTP depth ("*E"), shared (Bridge's default)
    ({"num_nextn_predict_layers": 2, "mtp_use_repeated_layer": False}, "mcore019_mtp2_unshared_torch_dist_metadata_keys.txt"),
])
def test_the_plan_has_the_keys_shapes_and_objects_megatron_core_writes(mtp, dump):
    spec = spec_from_config({**tiny(), **(mtp or {})})
    spec = spec if mtp is not None else spec.without_mtp()
    plan = import_plan(spec, {t.name: "float32" for t in rules.hf_tensors(spec)})
    tensors, objects = mcore_dump(dump)
    assert {k: tuple(t.shape) for k, t in plan.targets.items()} == tensors
    assert set(plan.objects) == objects
    # transformers' count (the router's score correction is a buffer), plus megatron-core's MTP parameters
    assert rules.param_count(spec) == 145_200 + 47_680 * len(spec.mtp) // 2


def test_the_hf_side_is_what_transformers_saves_and_bridges_mtp_names():
    spec = spec_from_config(tiny())
    saved = {line.split()[0]: json.loads(line[line.index("["):line.index("]") + 1])
             for line in (DATA / "hf_safetensors_keys.txt").read_text().splitlines()}
    assert {t.name: list(t.shape) for t in rules.hf_tensors(spec.without_mtp())} == saved
    # MTP (transformers has none): Bridge's HF names, depth o's layer i is mtp.layers.{o*2+i}, its norms and
    # projection on its first layer, its final norm on its last; each layer named as a main layer of its kind
    two = spec_from_config({**tiny(), "num_nextn_predict_layers": 2, "mtp_use_repeated_layer": False})
    mtp = {t.name: t.shape for t in rules.hf_tensors(two) if t.name.startswith("mtp.")}
    for o in range(2):
        first, last = f"mtp.layers.{2 * o}.", f"mtp.layers.{2 * o + 1}."
        assert mtp[first + "eh_proj.weight"] == (64, 128) and mtp[first + "enorm.weight"] == (64,)
        assert mtp[first + "hnorm.weight"] == (64,) and mtp[last + "final_layernorm.weight"] == (64,)
        assert {n.removeprefix(first) for n in mtp if n.startswith(first)} - {"eh_proj.weight", "enorm.weight",
                                                                           "hnorm.weight"} == \
            {n.removeprefix("backbone.layers.1.") for n in saved if n.startswith("backbone.layers.1.")}  # attention
        assert {n.removeprefix(last) for n in mtp if n.startswith(last)} - {"final_layernorm.weight"} == \
            {n.removeprefix("backbone.layers.4.") for n in saved if n.startswith("backbone.layers.4.")}  # MoE
    assert len(mtp) == 2 * (3 + 5 + 15 + 1) and not any(n.startswith("mtp.layers.4.") for n in mtp)


def test_in_proj_and_conv1d_split_into_their_parts_and_back():
    """in_proj's rows are z | x | B | C | dt and conv1d's x | B | C: each part is a key of its own, read from its
    rows, and the export writes every row of the HF tensor back from them (d_inner = heads x head_dim)."""
    spec = spec_from_config(tiny()).without_mtp()
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
                                         ("n_groups", 3), ("num_nextn_predict_layers", "1"),
                                         ("mtp_use_repeated_layer", "false"), ("mtp_layers_block_type", ["moe", "x"])])
def test_a_config_streamconv_cannot_map_is_one_line(tmp_path, field, value):
    cfg = {**tiny(), field: value}
    if field == "hybrid_override_pattern":
        cfg.pop("layers_block_type")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "streamconv", "plan", "--hf-model", str(tmp_path)],
                       capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 3 and len(lines) == 1 and "config.json" in lines[0], r.stderr


def _hf2mcore(src: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(src), "--megatron-path",
                           str(out), *flags], capture_output=True, text=True)


def test_mtp_layers_convert_and_are_left_out_only_when_asked_and_then_listed(tmp_path):
    """A checkpoint with the multi-token-prediction layers its config declares converts them (for megatron-core
    0.17+'s HybridModel; run_config.yaml says mtp_num_layers 1); --drop-mtp leaves them out, lists every one under
    left_out in --json and says mtp_num_layers 0; mcore2hf of either gives back what was converted, bit for bit."""
    import yaml
    from safetensors.torch import load_file

    from streamconv.reference.synth import make_checkpoint

    src = make_checkpoint(tmp_path / "hf", tiny(), seed=1, shards=2)
    mtp = sorted(n for f in src.glob("*.safetensors") for n in load_file(f) if n.startswith("mtp."))
    assert len(mtp) == 24  # eh_proj, enorm, hnorm; an attention layer (4 + norm); a MoE layer (14 + norm); final norm
    r = subprocess.run([sys.executable, "-m", "streamconv", "plan", "--hf-model", str(src), "--json"],
                       capture_output=True, text=True)
    planned = json.loads(r.stdout)
    facts = planned["mtp"]
    assert (facts["layers"], facts["depths"], facts["held"]) == ("*E", 1, 1) and facts["bytes"] == 47_680 * 4 + 4 * 4
    mtp_rows = [row for row in planned["per_layer"] if str(row["layer"]).startswith("mtp.")]
    assert [row["layer"] for row in mtp_rows] == ["mtp.0", "mtp.1"] and mtp_rows[1]["mlp"] == "moe 4x48"
    assert sum(row["bytes"] for row in mtp_rows) == facts["bytes"] and sum(row["parameters"] for row in mtp_rows) == 47_680
    for flags, held in (((), True), (("--drop-mtp",), False)):
        out = tmp_path / f"o{int(held)}"
        r = _hf2mcore(src, out, "--json", *flags)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout).get("left_out", []) == ([] if held else mtp)
        model = yaml.safe_load((out / "iter_0000000" / "run_config.yaml").read_text())["model"]
        assert (model["mtp_num_layers"], model["hybrid_layer_pattern"]) == ((1, "M*-ME/*E") if held else (0, "M*-ME"))
        r = subprocess.run([sys.executable, "-m", "streamconv", "inspect", str(out), "--json"], capture_output=True,
                           text=True)
        seen = json.loads(r.stdout)
        assert seen["convertible"] and seen["model"].get("mtp_layers") == ("*E" if held else None), r.stdout[-1500:]
        assert main(["mcore2hf", "--megatron-path", str(out), "--hf-path", str(tmp_path / f"b{int(held)}"), "--quiet"]) == 0
        back = {n: t for f in (tmp_path / f"b{int(held)}").glob("*.safetensors") for n, t in load_file(f).items()}
        source = {n: t for f in src.glob("*.safetensors") for n, t in load_file(f).items() if held or n not in mtp}
        assert back.keys() == source.keys() and all(back[n].equal(source[n]) for n in source)
        assert (tmp_path / f"b{int(held)}" / "config.json").read_bytes() == (src / "config.json").read_bytes()
        r = subprocess.run([sys.executable, "-m", "streamconv", "verify", "--hf-model", str(src), "--megatron-path",
                            str(out), "--json"], capture_output=True, text=True)
        report = json.loads(r.stdout)
        assert r.returncode == 0 and report["ok"] and report["not_compared"] == ([] if held else mtp), r.stderr


def test_mtp_tensors_the_config_does_not_declare_or_a_missing_one_are_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    from streamconv.reference.synth import make_checkpoint

    src = make_checkpoint(tmp_path / "hf", {**tiny(), "num_nextn_predict_layers": 0}, seed=1, shards=1)
    extra = {"mtp.layers.0.eh_proj.weight": load_file(src / "model.safetensors")["backbone.layers.1.mixer.q_proj.weight"]}
    save_file({**load_file(src / "model.safetensors"), **extra}, src / "model.safetensors", metadata={"format": "pt"})
    r = _hf2mcore(src, tmp_path / "o")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 3 and len(lines) == 1 and "--drop-mtp" in lines[0] and "num_nextn_predict_layers" in lines[0]
    r = _hf2mcore(src, tmp_path / "o", "--drop-mtp", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["left_out"] == sorted(extra), r.stderr

    full = make_checkpoint(tmp_path / "full", tiny(), seed=1, shards=1)
    weights = load_file(full / "model.safetensors")
    del weights["mtp.layers.1.mixer.experts.3.down_proj.weight"]
    save_file(weights, full / "model.safetensors", metadata={"format": "pt"})
    r = _hf2mcore(full, tmp_path / "p")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 3 and len(lines) == 1 and "mtp.layers.1.mixer.experts.3.down_proj.weight" in lines[0], r.stderr


def test_a_config_declaring_mtp_whose_weights_hold_none_converts_without_them(tmp_path):
    """transformers saves no MTP weights whatever its config declares: such a checkpoint converts without MTP
    (nothing left out, run_config.yaml says mtp_num_layers 0), inspect finds it convertible, and the export gives
    back the same tensors and config.json."""
    import yaml
    from safetensors.torch import load_file, save_file

    from streamconv.reference.synth import make_checkpoint

    src = make_checkpoint(tmp_path / "hf", tiny(), seed=2, shards=1)
    weights = {n: t for n, t in load_file(src / "model.safetensors").items() if not n.startswith("mtp.")}
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    r = _hf2mcore(src, tmp_path / "o", "--json")
    assert r.returncode == 0 and "left_out" not in json.loads(r.stdout), r.stderr
    model = yaml.safe_load((tmp_path / "o" / "iter_0000000" / "run_config.yaml").read_text())["model"]
    assert model["mtp_num_layers"] == 0 and model["hybrid_layer_pattern"] == "M*-ME"
    r = subprocess.run([sys.executable, "-m", "streamconv", "inspect", str(src), "--json"], capture_output=True, text=True)
    assert json.loads(r.stdout)["convertible"] is True, r.stdout[-2000:]
    assert main(["mcore2hf", "--megatron-path", str(tmp_path / "o"), "--hf-path", str(tmp_path / "b"), "--quiet"]) == 0
    back = load_file(tmp_path / "b" / "model.safetensors")
    assert back.keys() == weights.keys() and all(back[n].equal(weights[n]) for n in weights)
    assert (tmp_path / "b" / "config.json").read_bytes() == (src / "config.json").read_bytes()
