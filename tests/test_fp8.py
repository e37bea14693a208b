"""FP8 Hugging Face inputs (Model Optimizer FP8 / FP8_PER_CHANNEL_PER_TOKEN / FP8_PB_WO, fine-grained fp8):
dequantized on the fly, bit for bit ``dtype(fp8.float() * scale)``, loaded by real megatron-core with the
logits of the dequantized model; other quantizations refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from streamconv.cli import main
from streamconv.reference.synth import dequantized_copy, llama_config, make_checkpoint, mixed_decilm_config, quantize_checkpoint

mh = pytest.importorskip("mcore_harness")
ITER = "iter_0000000"


def convert(src: Path, out: Path, capsys, *extra) -> dict:
    capsys.readouterr()
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def checkpoint_files(out: Path, src: Path) -> dict[str, bytes]:
    """The checkpoint's files; in run_config.yaml the output and source paths replaced by placeholders."""
    files = {}
    for p in sorted((out / ITER).iterdir()):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "run_config.yaml":
                data = data.replace(str(out.resolve()).encode(), b"<out>").replace(str(src).encode(), b"<src>")
            files[p.name] = data
    return files


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


LLAMA = dict(hidden=256, layers=2, heads=8, kv_heads=2, ffn=384, vocab=384)  # 128x128 blocks: 2 x 3, some partial
METHODS = {
    "FP8": dict(method="FP8"),
    "FP8_PER_CHANNEL_PER_TOKEN": dict(method="FP8_PER_CHANNEL_PER_TOKEN"),
    "FP8_PB_WO": dict(method="FP8_PB_WO"),
    "fine-grained": dict(method="fp8", block=(48, 80)),  # blocks that do not divide the shapes
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_tensor_is_the_dequantized_weight_bit_for_bit(tmp_path, capsys, name, dtype):
    src = make_checkpoint(tmp_path / "hf", llama_config(**LLAMA), seed=2, shards=2, dtype=dtype)
    fp8 = quantize_checkpoint(src, tmp_path / "fp8", **METHODS[name])
    ref = dequantized_copy(fp8, tmp_path / "ref")  # bf16(fp8.float() * scale), the config's dtype
    assert any(t.dtype == torch.float8_e4m3fn for t in weights(fp8).values())

    # a small budget: every weight in several row-block chunks, each dequantized in pieces
    got = convert(fp8, tmp_path / "out", capsys, "--max-memory", "256KiB")
    want = convert(ref, tmp_path / "want", capsys, "--max-memory", "256KiB")
    assert checkpoint_files(tmp_path / "out", fp8) == checkpoint_files(tmp_path / "want", ref)
    assert got["chunks"] == want["chunks"] > got["tensors"]
    q = got["quantization"]
    assert q["method"] == {"fine-grained": "fp8 (fine-grained)"}.get(name, name)
    assert q["quantized_weights"] == 2 * 7 and q["dequantized_to"] == str(dtype).removeprefix("torch.")
    assert q["skipped_scales"] == (0 if name == "fine-grained" else 2 * 7 + 2 * 2)  # input, k and v scales
    assert got["peak_in_flight_bytes"] <= got["max_memory_bytes"]
    # verify recomputes the dequantization (through the engine's other path) and finds the same bits
    assert main(["verify", "--hf-model", str(fp8), "--megatron-path", str(tmp_path / "out"), "--quiet"]) == 0


def test_llama_fp8_loads_in_megatron_with_the_dequantized_models_logits(tmp_path, capsys):
    from transformers import LlamaForCausalLM

    cfg = llama_config(**LLAMA)
    src = make_checkpoint(tmp_path / "hf", cfg, seed=3, shards=2, dtype=torch.float32)
    fp8 = quantize_checkpoint(src, tmp_path / "fp8", "FP8_PB_WO")
    ref = dequantized_copy(fp8, tmp_path / "ref")
    convert(fp8, tmp_path / "out", capsys)
    model = mh.build_gpt(cfg)
    ckpt = tmp_path / "out" / ITER
    assert mh.checkpoint_keys(ckpt) - {"common_state/shard_0_1"} == mh.model_checkpoint_keys(model)
    mh.load_checkpoint(model, ckpt, check_extra=False)  # default strictness
    tokens = torch.randint(0, cfg["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    hf = LlamaForCausalLM.from_pretrained(ref, torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (mh.logits(model, tokens) - expected).abs().max().item() <= 1e-3
    # the quantization changed the weights: the original model's logits are not these
    orig = LlamaForCausalLM.from_pretrained(src, torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        assert (orig(tokens).logits - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize("method,block", [("FP8", None), ("FP8_PB_WO", (16, 32))])
def test_decilm_fp8_every_block_variant_loads_with_the_reference_logits(tmp_path, capsys, method, block):
    from streamconv.reference.forward import reference_logits

    cfg = {**mixed_decilm_config(hidden=64, heads=8, vocab=256), "torch_dtype": "float32"}
    src = make_checkpoint(tmp_path / "hf", cfg, seed=4, shards=2, dtype=torch.float32)
    fp8 = quantize_checkpoint(src, tmp_path / "fp8", method, **({"block": block} if block else {}))
    ref = dequantized_copy(fp8, tmp_path / "ref")
    convert(fp8, tmp_path / "out", capsys, "--max-memory", "64KiB")
    convert(ref, tmp_path / "want", capsys, "--max-memory", "64KiB")
    assert checkpoint_files(tmp_path / "out", fp8) == checkpoint_files(tmp_path / "want", ref)
    model = mh.build_hetero_gpt(cfg)
    mh.load_checkpoint(model, tmp_path / "out" / ITER, check_extra=False)
    tokens = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    expected = reference_logits(cfg, weights(ref), tokens)
    assert (mh.logits(model, tokens) - expected).abs().max().item() <= 1e-3


def test_plan_and_inspect_show_the_quantization(tmp_path, capsys):
    src = make_checkpoint(tmp_path / "hf", llama_config(**LLAMA), seed=2, shards=2, dtype=torch.bfloat16)
    fp8 = quantize_checkpoint(src, tmp_path / "fp8", "FP8")
    capsys.readouterr()
    assert main(["plan", "--hf-model", str(fp8), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["quantization"] == "FP8" and plan["dtype"] == "bfloat16"
    plain = sum(t.numel() * 2 for t in weights(src).values())
    assert plan["bytes"] == plain  # the output: every weight in bf16
    assert main(["inspect", str(fp8), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["convertible"] is True
    assert report["model"]["quantization"].startswith("FP8 (per tensor), dequantized to bfloat16")
    assert f"({plain:,} bytes)" in report["model"]["output"]


def _nvfp4_like(src: Path, out: Path) -> Path:
    """The tensors and config of an NVFP4 export (uint8-packed weights, fp8 block scales, a second scale)."""
    out.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    tensors = {}
    for name, w in weights(src).items():
        if name.startswith("model.layers.") and w.dim() == 2:
            m = name.removesuffix(".weight")
            tensors[name] = torch.zeros(w.shape[0], w.shape[1] // 2, dtype=torch.uint8)
            tensors[f"{m}.weight_scale"] = torch.ones(w.shape[0], w.shape[1] // 16).to(torch.float8_e4m3fn)
            tensors[f"{m}.weight_scale_2"] = torch.tensor(1.0)
            tensors[f"{m}.input_scale"] = torch.tensor(1.0)
        else:
            tensors[name] = w
    save_file(tensors, str(out / "model.safetensors"))
    quant = {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}
    (out / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": quant}))
    (out / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "modelopt", **quant}}))
    return out


def test_other_quantizations_are_refused_in_one_line(tmp_path, capsys):
    src = make_checkpoint(tmp_path / "hf", llama_config(hidden=64, layers=1, heads=4, kv_heads=2, ffn=128,
                                                        vocab=128), seed=1, shards=1, dtype=torch.bfloat16)
    nvfp4 = _nvfp4_like(src, tmp_path / "nvfp4")
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    (gptq / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    for folder, method in ((nvfp4, "'NVFP4'"), (gptq, "'gptq'")):
        for cmd in (["hf2mcore", "--hf-model", str(folder), "--megatron-path", str(tmp_path / f"out-{folder.name}"),
                     "--quiet"], ["plan", "--hf-model", str(folder)]):
            capsys.readouterr()
            assert main(cmd) == 3
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and method in err and "use the bf16 model" in err, err
        assert not (tmp_path / f"out-{folder.name}" / ITER / ".metadata").exists()


def test_a_scale_without_its_weight_or_a_weight_without_its_scale_is_refused(tmp_path, capsys):
    src = make_checkpoint(tmp_path / "hf", llama_config(hidden=64, layers=1, heads=4, kv_heads=2, ffn=128,
                                                        vocab=128), seed=1, shards=1, dtype=torch.bfloat16)
    fp8 = quantize_checkpoint(src, tmp_path / "fp8", "FP8")
    tensors = weights(fp8)
    victim = "model.layers.0.mlp.down_proj.weight_scale"
    del tensors[victim]
    for f in fp8.glob("*.safetensors"):
        f.unlink()
    (fp8 / "model.safetensors.index.json").unlink()
    save_file(tensors, str(fp8 / "model.safetensors"))
    capsys.readouterr()
    assert main(["hf2mcore", "--hf-model", str(fp8), "--megatron-path", str(tmp_path / "out"), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "'model.layers.0.mlp.down_proj.weight' is float8 but has no weight_scale" in err


@pytest.mark.parametrize("kind", ["tensor", "row", "blocks", "partial-blocks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_is_the_float32_product_rounded_once(kind, dtype):
    """transforms.dequantize (table look-ups) against the definition, on rows starting mid-tensor, with
    every float8 code (NaNs included) and blocks that do not divide the shape; and the device form
    (``dequantize_on_device``, tensor operations only) with the same bits."""
    import math

    from streamconv.engine.transforms import dequantize, dequantize_on_device

    g = torch.Generator().manual_seed(0)
    rows, cols, row0 = 41, 300, 7
    codes = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8)
    codes[0, :256] = torch.arange(256, dtype=torch.uint8)
    w = codes.view(torch.float8_e4m3fn)
    block = {"blocks": (8, 100), "partial-blocks": (3, 11)}.get(kind)
    if kind == "tensor":
        scale, full = torch.tensor(0.0137), torch.tensor(0.0137)
    elif kind == "row":
        scale = torch.rand(rows + row0, generator=g)
        full = scale[row0:].unsqueeze(1)
    else:
        scale = torch.rand(math.ceil((rows + row0) / block[0]), math.ceil(cols / block[1]), generator=g)
        full = scale[torch.arange(row0, row0 + rows) // block[0]].repeat_interleave(block[1], 1)[:, :cols]
    got = dequantize(w, scale, block, row0, dtype)
    want = (w.float() * full).to(dtype)
    bits = {2: torch.int16, 4: torch.int32}[dtype.itemsize]
    assert got.dtype == dtype and torch.equal(got.view(bits), want.view(bits))
    on_device = dequantize_on_device(w, scale, block, row0, torch.empty(rows, cols, dtype=dtype))
    assert torch.equal(on_device.view(bits), want.view(bits))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_cuda_stage_dequantizes_with_the_cpus_bits(tmp_path, name):
    """The CUDA stage (its code path run on the CPU: slots without pinning, no stream) is handed the raw
    float8 bytes and dequantizes them where it casts (``transforms.dequantize_on_device``, tensor operations
    only); every chunk equals the CPU's table look-ups bit for bit, QKV and gate/up fusions included."""
    from streamconv.engine import buffered, runner
    from streamconv.inputs import chunk_bytes_for, import_plan_for as build_plan
    from streamconv.sources.safetensors import SafetensorsSource
    from streamconv.engine.device import CudaStage
    from streamconv.models.config import load_config, spec_from_config
    from streamconv.sinks.digest import DigestSink

    src = make_checkpoint(tmp_path / "hf", llama_config(**LLAMA), seed=2, shards=2, dtype=torch.bfloat16)
    fp8 = quantize_checkpoint(src, tmp_path / "fp8", **METHODS[name])
    cfg = load_config(fp8)
    digests = []
    for cuda_path in (False, True):
        source = SafetensorsSource(fp8, cfg)
        try:
            plan = build_plan(source, spec_from_config(cfg), None, chunk_bytes_for(256 << 10))
            stage, budget = None, 256 << 10
            if cuda_path:
                jobs = [buffered.make_job(plan, c, source) for c in plan.chunks]
                slot = max(j.shape[0] * j.shape[1] * max(j.buf_dtype.itemsize, j.out_dtype.itemsize) for j in jobs)
                stage = CudaStage("cpu", slot, 3, pin=False)
                budget += stage.reserved
                raw = [buffered.make_job(plan, c, source, stage=stage) for c in plan.chunks]
                assert sum(j.quant is not None and j.buf_dtype == torch.float8_e4m3fn for j in raw) > 2 * 7
            sink = DigestSink(plan, source, verify_every=1)
            runner.run(plan, source, sink, max_memory=budget, workers=2, stage=stage)
        finally:
            source.close()
        assert sink.verified == len(plan.chunks) and not sink.mismatches, sink.mismatches[:3]
        digests.append(sink.crc)
        if cuda_path:
            assert len(stage._scales) == 2 * 7  # every quantized weight's scale went to the device once
    assert digests[0] == digests[1]
