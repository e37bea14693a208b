"""``streamconv verify``: passes on real conversions (any chunking, cast dtypes, DeciLM per-layer keys) and
catches what a user must not miss: a flipped byte in a .distcp, the wrong source, a missing tensor."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile

import pytest
import torch

from streamconv import errors
from streamconv.cli import main
from streamconv.sources.torch_dist import TorchDistSource
from streamconv.reference.synth import llama_config, make_checkpoint, mixed_decilm_config

CFG = llama_config(hidden=64, layers=2, heads=8, kv_heads=2, ffn=96, vocab=192)


def convert(src, out, *extra) -> None:
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--quiet", *extra]) == 0


def verify(src, out, capsys, *extra) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["verify", "--hf-model", str(src), "--megatron-path", str(out), *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def bf16_src(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("v") / "hf", CFG, seed=7, shards=2, dtype=torch.bfloat16)


def item_bytes(ckpt, key: str, i: int):
    """The ``i``-th stored chunk of ``key``: its offsets, its ``.distcp`` path, where it lies, the file's bytes."""
    with TorchDistSource(ckpt) as td:
        chunk = td.tensors[key].chunks[i]
        where = td.item_info(key, chunk.offsets)
    path = ckpt / where.file
    return chunk.offsets, path, where, bytearray(path.read_bytes())


def test_flipped_byte_in_a_distcp_is_named(bf16_src, tmp_path, capsys):
    out = tmp_path / "out"
    convert(bf16_src, out, "--max-memory", "64KiB")  # row-block chunks
    rc, stdout, _ = verify(bf16_src, out, capsys, "--max-memory", "64KiB")
    assert rc == 0 and stdout.startswith("verify: OK") and "bit-identical" in stdout

    ckpt = out / "iter_0000000"
    key = "decoder.layers.mlp.linear_fc1.weight"
    offsets, path, where, data = item_bytes(ckpt, key, 3)
    data[where.offset + where.length // 2] ^= 0x04  # inside the item's tensor data
    path.write_bytes(data)

    rc, _, err = verify(bf16_src, out, capsys)
    assert rc == errors.EXIT_MISMATCH
    lines = err.strip().splitlines()
    assert len(lines) == 2, err  # the mismatch, and the verdict
    assert lines[0].startswith(f"MISMATCH {key} chunk at offsets {list(offsets)}") and "1 of" in lines[0]
    assert lines[1].startswith("verify: FAILED: 1 problem")

    rc, stdout, _ = verify(bf16_src, out, capsys, "--json")
    report = json.loads(stdout)
    assert rc == errors.EXIT_MISMATCH and report["ok"] is False and len(report["mismatches"]) == 1
    assert report["items_checked"] == report["items"] == sum(len(t.chunks) for t in TorchDistSource(ckpt).tensors.values())


def test_any_chunking_and_the_wrong_source(bf16_src, tmp_path, capsys):
    """Whole-layer items (default budget) verify too; another checkpoint of the same shapes does not."""
    out = tmp_path / "out"
    convert(bf16_src, out, "--no-staging")
    rc, _, _ = verify(bf16_src, out, capsys, "--quiet")
    assert rc == 0
    other = make_checkpoint(tmp_path / "other", CFG, seed=8, shards=1, dtype=torch.bfloat16)
    rc, stdout, _ = verify(other, out, capsys, "--json")
    report = json.loads(stdout)
    assert rc == errors.EXIT_MISMATCH and len(report["mismatches"]) == report["items"] > 0


def test_decilm_with_cast_dtype(tmp_path, capsys):
    cfg = mixed_decilm_config(hidden=64, heads=8, vocab=128)
    src = make_checkpoint(tmp_path / "hf", cfg, seed=2, shards=2)  # fp32
    out = tmp_path / "out"
    convert(src, out, "--dtype", "bf16", "--max-memory", "128KiB")
    rc, stdout, _ = verify(src, out, capsys, "--json")
    report = json.loads(stdout)
    assert rc == 0, report["mismatches"]
    with TorchDistSource(out / "iter_0000000") as td:
        assert any(k.startswith("decoder.layers.0.") for k in td.tensors)  # heterogeneous: per-layer keys
        assert {str(t.dtype) for t in td.tensors.values()} == {"torch.bfloat16"}
        assert report["items"] == sum(len(t.chunks) for t in td.tensors.values())


def test_missing_tensor_and_incomplete_checkpoint(bf16_src, tmp_path, capsys):
    out = tmp_path / "out"
    convert(bf16_src, out)
    ckpt = out / "iter_0000000"
    meta_path = ckpt / ".metadata"
    good = meta_path.read_bytes()
    meta = pickle.loads(good)  # our own test's file, with torch's classes, to save a variant of
    del meta.state_dict_metadata["output_layer.weight"]
    meta.storage_data = {k: v for k, v in meta.storage_data.items() if k.fqn != "output_layer.weight"}
    meta_path.write_bytes(pickle.dumps(meta))
    rc, _, err = verify(bf16_src, out, capsys)
    assert rc == errors.EXIT_MISMATCH and "MISMATCH output_layer.weight: tensor missing from the checkpoint" in err

    meta_path.write_bytes(good)
    (out / "latest_checkpointed_iteration.txt").unlink()
    meta_path.unlink()  # what an interrupted conversion looks like
    rc, _, err = verify(bf16_src, out, capsys)
    assert rc == errors.EXIT_BAD_INPUT and len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_a_broken_item_archive_is_named_unreadable(bf16_src, tmp_path, capsys):
    """An item whose torch.save archive is damaged (its data.pkl record) is not read around: verify names it."""
    out = tmp_path / "out"
    convert(bf16_src, out, "--max-memory", "64KiB")
    key = "decoder.layers.self_attention.linear_qkv.weight"
    offsets, path, where, data = item_bytes(out / "iter_0000000", key, 1)
    item = zipfile.ZipFile(io.BytesIO(bytes(data[where.offset:where.offset + where.length])))
    info = item.getinfo(next(n for n in item.namelist() if n.endswith("/data.pkl")))
    name_len, extra_len = struct.unpack_from("<HH", data, where.offset + info.header_offset + 26)
    start = where.offset + info.header_offset + 30 + name_len + extra_len
    data[start:start + 16] = b"\xff" * 16  # the pickle's opening bytes
    path.write_bytes(data)

    rc, _, err = verify(bf16_src, out, capsys)
    assert rc == errors.EXIT_MISMATCH
    assert f"MISMATCH {key} chunk at offsets {list(offsets)}" in err and "unreadable" in err, err


def test_verify_against_another_model_says_so_in_one_line(tmp_path, capsys):
    from streamconv.reference.synth import llama_config, make_checkpoint

    a = make_checkpoint(tmp_path / "a", llama_config(hidden=64, layers=2, heads=8, kv_heads=2, ffn=160, vocab=256),
                        seed=1, shards=1)
    b = make_checkpoint(tmp_path / "b", llama_config(hidden=64, layers=3, heads=8, kv_heads=2, ffn=160, vocab=256),
                        seed=1, shards=1)
    assert main(["hf2mcore", "--hf-model", str(a), "--megatron-path", str(tmp_path / "out"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["verify", "--hf-model", str(b), "--megatron-path", str(tmp_path / "out")]) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "with 2 layers" in err[0] and "with 3 layers" in err[0] and "not its source" in err[0]
