"""The holes an adversarial pass found (issue 14), each closed: real processes, real files, crafted inputs.

Nothing lost (an output on or around the input, two writers on one folder, a changed source on resume,
planted symlinks, a failed commit), nothing silently wrong (quantized weights), nothing that hangs or runs
away (a FIFO or /dev/zero named by a checkpoint), and one clean line for what a checkpoint can forge.
"""

from __future__ import annotations

import collections
import errno
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from streamconv import crashpoints, errors
from streamconv.cli import main
from streamconv.reference.synth import llama_config, make_checkpoint, mixed_decilm_config

CFG = llama_config(hidden=64, layers=2, heads=4, kv_heads=2, ffn=160, vocab=300)
SMALL = ["--max-memory", "64KiB", "--distcp-size", "40KiB"]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("src") / "hf", CFG, seed=1, shards=2, dtype=torch.bfloat16)


def run_cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamconv", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_line(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    err = r.stderr.strip()
    assert r.returncode == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------ 1. the output is never the input

@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_an_output_on_or_around_the_input_is_refused_before_anything_is_deleted(src, tmp_path, where):
    model = tmp_path / "models" / "hf"
    model.parent.mkdir()
    os.symlink(src, model)  # reached through a symlink: resolved
    before = snapshot(src)
    out = {"same": model, "parent": model.parent, "inside": model / "mcore"}[where]
    r = run_cli("hf2mcore", "--hf-model", model, "--megatron-path", out, "--overwrite", "--quiet")
    one_line(r, errors.EXIT_USAGE, "--megatron-path", "input")
    assert snapshot(src) == before
    assert not (src / "mcore").exists()


def test_an_export_into_or_around_its_checkpoint_is_refused(src, tmp_path):
    out = tmp_path / "mc"
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--quiet"]) == 0
    before = snapshot(out)
    for hf in (out, out / "iter_0000000" / "hf", tmp_path):
        r = run_cli("mcore2hf", "--megatron-path", out, "--hf-path", hf, "--overwrite", "--quiet")
        one_line(r, errors.EXIT_USAGE, "--hf-path")
    assert snapshot(out) == before


# ------------------------------------------------------------------------ 2. one writer per folder

def start_paused(src, out, point="chunk:1", *extra) -> subprocess.Popen:
    """A conversion stopped (SIGSTOP, every thread) at ``point``; returns once it is there."""
    marker = out.parent / f"paused-{out.name}"
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(src),
                             "--megatron-path", str(out), "--quiet", *SMALL, *extra],
                            env={**os.environ, "STREAMCONV_TEST_PAUSE": point, "STREAMCONV_TEST_PAUSE_FILE": str(marker)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not marker.exists():  # the run's own progress decides when, not a timer
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.005)
    return proc


def test_a_second_run_on_a_folder_being_written_is_refused(src, tmp_path):
    out = tmp_path / "out"
    other = make_checkpoint(tmp_path / "other", llama_config(hidden=32, layers=1, heads=2, kv_heads=1, ffn=64,
                                                             vocab=100), seed=2)
    first = start_paused(src, out)
    try:
        for model in (src, other):  # the same conversion, and another model (the race that mixed two models)
            r = run_cli("hf2mcore", "--hf-model", model, "--megatron-path", out, "--quiet", *SMALL)
            one_line(r, errors.EXIT_IO, "another streamconv is writing this folder", f"pid {first.pid}")
        r = run_cli("hf2mcore", "--hf-model", src, "--megatron-path", out, "--quiet", "--overwrite", *SMALL)
        one_line(r, errors.EXIT_IO, "another streamconv is writing this folder")
    finally:
        first.kill()
        first.wait()
    r = run_cli("hf2mcore", "--hf-model", src, "--megatron-path", out, "--quiet", *SMALL)  # now it resumes
    assert r.returncode == 0, r.stderr
    assert not (out / ".streamconv.lock").exists()  # a finished folder carries no lock file
    assert main(["verify", "--hf-model", str(src), "--megatron-path", str(out), "--quiet"]) == 0


# ------------------------------------------------------------------------ 3. a source changed before resume

def test_a_source_changed_in_place_is_not_resumed(src, tmp_path):
    model = tmp_path / "hf"
    model.mkdir()
    for p in src.iterdir():
        (model / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    proc = start_paused(model, out, "chunk:3")
    proc.kill()
    proc.wait()
    shard = sorted(model.glob("*.safetensors"))[0]
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40  # a flipped bit in a tensor, the header, size and mtime as they were
    shard.write_bytes(data)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size and shard.stat().st_mtime_ns == st.st_mtime_ns
    r = run_cli("hf2mcore", "--hf-model", model, "--megatron-path", out, "--quiet", *SMALL)
    one_line(r, errors.EXIT_IO, "cannot resume", shard.name, "status-change time")


def _kill_and_change_a_kept_chunks_source(model, out, *extra):
    """A run killed after some chunks; then a byte flipped in the source of a chunk it journaled, behind the
    file system's back: the shard's size, mtime and header as they were, and its ctime as the identity has it
    (a file system that keeps no ctime, or bit rot). Returns the shard changed."""
    proc = start_paused(model, out, "chunk:6", *extra)
    proc.kill()
    proc.wait()
    records = [json.loads(line) for line in (out / ".streamconv" / "journal.jsonl").read_text().splitlines()]
    kept = next(r for r in records if r["t"] == "chunk")
    from streamconv.sources.safetensors import SafetensorsSource
    from streamconv.inputs import chunk_bytes_for, import_plan_for as build_plan
    from streamconv.models.config import load_config, spec_from_config

    source = SafetensorsSource(model)
    dtype = torch.float32 if "fp32" in extra else None
    plan = build_plan(source, spec_from_config(load_config(model)), dtype, chunk_bytes_for(64 * 1024),
                      file_bytes=40 * 1024)
    chunk = next(c for c in plan.chunks if (c.key, list(c.offsets)) == (kept["key"], kept["offsets"]))
    shard, at, n = source.extent(chunk.reads[0].name, chunk.reads[0].row0, chunk.reads[0].row1, chunk.reads[0].index)
    source.close()
    from crafting import flip_behind_the_file_systems_back

    flip_behind_the_file_systems_back(shard, at + n // 2, out)
    return shard


@pytest.mark.parametrize("extra", [(), ("--dtype", "fp32")], ids=["bytes", "cast"])
def test_recheck_finds_a_kept_chunks_source_changed_behind_the_file_systems_back(src, tmp_path, extra):
    """What the identity cannot see, ``--recheck`` does: it re-reads the source of every kept chunk and
    compares the CRC-32 of its conversion with the journal's. Without it the resumed output is wrong (and
    ``verify`` says so)."""
    model = tmp_path / "hf"
    model.mkdir()
    for p in src.iterdir():
        (model / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    shard = _kill_and_change_a_kept_chunks_source(model, out, *extra)
    r = run_cli("hf2mcore", "--hf-model", model, "--megatron-path", out, "--quiet", "--recheck", *SMALL, *extra)
    one_line(r, errors.EXIT_BAD_INPUT, shard.name, "changed since the interrupted run", "--overwrite")
    assert not (out / "iter_0000000" / ".metadata").exists()
    r = run_cli("hf2mcore", "--hf-model", model, "--megatron-path", out, "--quiet", *SMALL, *extra)  # no recheck
    assert r.returncode == 0, r.stderr
    r = run_cli("verify", "--hf-model", model, "--megatron-path", out, "--quiet")
    assert r.returncode == errors.EXIT_MISMATCH, r.stderr  # the hole --recheck closes
    r = run_cli("hf2mcore", "--hf-model", model, "--megatron-path", out, "--quiet", "--overwrite", *SMALL, *extra)
    assert r.returncode == 0, r.stderr
    assert main(["verify", "--hf-model", str(model), "--megatron-path", str(out), "--quiet"]) == 0


def test_recheck_of_an_unchanged_source_resumes_to_the_same_bytes(src, tmp_path, capsys):
    ref = tmp_path / "ref"
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(ref), "--quiet", *SMALL]) == 0
    out = tmp_path / "out"
    proc = start_paused(src, out, "chunk:6")
    proc.kill()
    proc.wait()
    capsys.readouterr()
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--json", "--recheck", *SMALL]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rechecked_chunks"] == summary["chunks_resumed"] >= 6
    assert 0 < summary["rechecked_bytes"] < sum(p.stat().st_size for p in src.glob("*.safetensors"))
    assert _same_but_run_config(out, ref)
    r = run_cli("hf2mcore", "--hf-model", src, "--megatron-path", tmp_path / "x", "--recheck", "--no-staging", *SMALL)
    one_line(r, errors.EXIT_USAGE, "--recheck", "--no-staging")


def _same_but_run_config(a: Path, b: Path) -> bool:
    """The two outputs' files are equal byte for byte, but for run_config.yaml (which names its folder)."""
    x, y = snapshot(a / "iter_0000000"), snapshot(b / "iter_0000000")
    return x.keys() == y.keys() and all(x[k] == y[k] for k in x if k.name != "run_config.yaml")


# ------------------------------------------------------------------------ 4. quantized weights

def test_a_quantized_checkpoint_is_refused_even_with_allow_unused(src, tmp_path):
    """float8 weights with scales but no config saying which quantization: refused (tests/test_fp8.py converts
    the ones that say)."""
    model = tmp_path / "fp8"
    model.mkdir()
    (model / "config.json").write_bytes((src / "config.json").read_bytes())
    from safetensors.torch import load_file

    tensors = {}
    for p in src.glob("*.safetensors"):
        tensors.update(load_file(p))
    for name in list(tensors):
        if name.endswith("proj.weight"):
            w = tensors[name].float()
            scale = w.abs().max() / 448
            tensors[name] = (w / scale).to(torch.float8_e4m3fn)
            tensors[name + "_scale"] = scale.reshape(())
            tensors[name.replace(".weight", ".input_scale")] = torch.tensor(1.0)
    save_file(tensors, model / "model.safetensors")
    for extra in ([], ["--allow-unused"]):
        r = run_cli("hf2mcore", "--hf-model", model, "--megatron-path", tmp_path / f"out{len(extra)}", "--quiet",
                    *extra)
        one_line(r, errors.EXIT_BAD_INPUT, "quantized checkpoint", "--allow-unused does not apply",
                 "hf_quant_config.json")
        assert not (tmp_path / f"out{len(extra)}" / "iter_0000000" / ".metadata").exists()


# ------------------------------------------------------------------------ 5. planted symlinks

def test_temporaries_never_write_through_a_planted_symlink(src, tmp_path):
    out = tmp_path / "out"
    (out / "iter_0000000").mkdir(parents=True)
    victims = []
    for name in ("latest_checkpointed_iteration.txt.tmp", "latest_train_state.pt.tmp",
                 "iter_0000000/.metadata.tmp", "iter_0000000/__0_0.distcp.partial", "iter_0000000/common.pt.tmp"):
        victim = tmp_path / f"victim-{name.replace('/', '-')}"
        victim.write_text("precious")
        os.symlink(victim, out / name)
        victims.append(victim)
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--quiet", "--overwrite"]) == 0
    assert all(v.read_text() == "precious" for v in victims)
    assert main(["verify", "--hf-model", str(src), "--megatron-path", str(out), "--quiet"]) == 0


# ------------------------------------------------------------------------ 6. a failed commit is undone

def test_a_disk_full_at_the_tracker_leaves_no_commit_markers(src, tmp_path, monkeypatch, capsys):
    """The disk fills exactly when the tracker is written (the last file): nothing may look complete."""
    from streamconv.commands import hf2mcore as h

    real = h.fsync_write

    def full_at_tracker(path, data):
        if Path(path).name == h.TRACKER_FILE:
            raise errors.output_error(path, OSError(errno.ENOSPC, "No space left on device", str(path)))
        return real(path, data)

    monkeypatch.setattr(h, "fsync_write", full_at_tracker)
    out = tmp_path / "out"
    for mode in ([], ["--no-staging"]):
        rc = main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--quiet", "--overwrite", *mode])
        assert rc == errors.EXIT_IO
        assert h.TRACKER_FILE in capsys.readouterr().err
        for marker in ("latest_checkpointed_iteration.txt", "latest_train_state.pt", "iter_0000000/.metadata"):
            assert not (out / marker).exists(), marker
    monkeypatch.setattr(h, "fsync_write", real)
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--quiet", "--no-staging"]) == 0
    assert (out / "latest_checkpointed_iteration.txt").is_file()


def test_a_kill_during_overwrite_never_leaves_old_markers_over_missing_files(src, tmp_path):
    out = tmp_path / "out"
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--quiet", *SMALL]) == 0
    proc = start_paused(src, out, "chunk:1", "--overwrite")
    proc.kill()
    proc.wait()
    assert not (out / "iter_0000000" / ".metadata").exists()
    assert not (out / "latest_checkpointed_iteration.txt").exists()


# ------------------------------------------------------------------------ 7-10. what a checkpoint can forge

@pytest.fixture(scope="module")
def decilm_ckpt(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("decilm")
    hf = make_checkpoint(base / "hf", mixed_decilm_config(hidden=64, heads=4, vocab=128), seed=2)
    out = base / "mc"
    assert main(["hf2mcore", "--hf-model", str(hf), "--megatron-path", str(out), "--quiet"]) == 0
    return out


def with_config_path(ckpt: Path, tmp_path: Path, target: str) -> Path:
    """A copy of ``ckpt`` whose run_config.yaml names ``target`` as the layers config (no encoded json)."""
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    import yaml

    rc = copy / "iter_0000000" / "run_config.yaml"
    cfg = yaml.safe_load(rc.read_text())
    del cfg["model"]["heterogeneous_layers_config_encoded_json"]
    cfg["model"]["heterogeneous_layers_config_path"] = target
    rc.write_text(yaml.safe_dump(cfg))
    return copy


@pytest.mark.parametrize("target", ["/dev/zero", "layers.fifo", "/etc/hostname", "../../outside.json"])
def test_a_layers_config_path_is_read_only_inside_the_checkpoint(decilm_ckpt, tmp_path, target):
    """A device, a FIFO inside the checkpoint, files outside it: refused at once, nothing read or waited for."""
    ckpt = with_config_path(decilm_ckpt, tmp_path, target)
    if target.endswith(".fifo"):
        os.mkfifo(ckpt / "iter_0000000" / target)
    (tmp_path / "outside.json").write_text(json.dumps(mixed_decilm_config(hidden=64, heads=4, vocab=128)))
    r = run_cli("mcore2hf", "--megatron-path", ckpt, "--hf-path", tmp_path / "hf", "--quiet", timeout=60)
    one_line(r, errors.EXIT_BAD_INPUT, "heterogeneous layers config", "--hf-config")


def test_a_fifo_in_place_of_a_checkpoint_file_is_refused(src, tmp_path):
    out = tmp_path / "out"
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--quiet", *SMALL]) == 0
    victim = sorted((out / "iter_0000000").glob("*.distcp"))[0]
    victim.unlink()
    os.mkfifo(victim)
    for cmd in (["mcore2hf", "--megatron-path", out, "--hf-path", tmp_path / "hf"],
                ["verify", "--hf-model", src, "--megatron-path", out],
                ["inspect", out]):
        r = run_cli(*cmd, "--quiet" if cmd[0] != "inspect" else "--json", timeout=60)
        one_line(r, errors.EXIT_BAD_INPUT, victim.name, "not a regular file")
    meta = out / "iter_0000000" / ".metadata"
    meta.unlink()
    os.mkfifo(meta)
    r = run_cli("mcore2hf", "--megatron-path", out, "--hf-path", tmp_path / "hf2", "--quiet", timeout=60)
    one_line(r, errors.EXIT_BAD_INPUT, ".metadata")  # no hang: a FIFO is not taken for the file


def test_a_tracker_with_a_non_ascii_digit_is_bad_input(src, tmp_path):
    out = tmp_path / "out"
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--quiet"]) == 0
    (out / "latest_checkpointed_iteration.txt").write_text("²")
    r = run_cli("mcore2hf", "--megatron-path", out, "--hf-path", tmp_path / "hf", "--quiet")
    one_line(r, errors.EXIT_BAD_INPUT, "latest_checkpointed_iteration.txt", "not an iteration number")


# ------------------------------------------------------------------------ 13-14. messages and limits

def test_control_characters_from_inputs_are_escaped(src, tmp_path):
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_bytes((src / "config.json").read_bytes())
    evil = "model\n\x1b[31merror: all good\x1b[0m.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": evil}}))
    r = run_cli("hf2mcore", "--hf-model", model, "--megatron-path", tmp_path / "out", "--quiet", "--json")
    err = one_line(r, errors.EXIT_BAD_INPUT)
    assert "\x1b" not in err and "\\x1b" in err and "\\n" in err
    assert json.loads(r.stdout)["exit_code"] == errors.EXIT_BAD_INPUT  # --json: an error object for scripts


@pytest.mark.parametrize("field,value", [("rms_norm_eps", float("nan")), ("rms_norm_eps", -1.0)])
def test_nonsense_norm_epsilon_is_refused(src, tmp_path, field, value):
    model = tmp_path / "hf"
    model.mkdir()
    for p in src.iterdir():
        if p.name != "config.json":
            os.symlink(p, model / p.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg[field] = value
    (model / "config.json").write_text(json.dumps(cfg))
    r = run_cli("hf2mcore", "--hf-model", model, "--megatron-path", tmp_path / "out", "--quiet")
    one_line(r, errors.EXIT_BAD_INPUT, field)


def test_a_huge_ffn_mult_is_refused(tmp_path):
    cfg = mixed_decilm_config(hidden=64, heads=4, vocab=128)
    block = next(b for b in cfg["block_configs"] if b["ffn"].get("ffn_mult"))
    block["ffn"]["ffn_mult"] = 1e30
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(cfg))
    r = run_cli("plan", "--hf-model", model / "config.json")
    one_line(r, errors.EXIT_BAD_INPUT, "ffn_mult", "not a real model")


# ------------------------------------------------------------------------ 8, 10. crafted .metadata and items

def crafted(src, tmp_path, change) -> Path:
    """A conversion of ``src`` whose .metadata (loaded with the real classes) ``change(meta, ckpt)`` edits."""
    import pickle

    from torch.distributed.checkpoint.metadata import Metadata  # noqa: F401  (the classes the pickle names)

    out = tmp_path / "mc"
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--quiet"]) == 0
    ckpt = out / "iter_0000000"
    meta = pickle.loads((ckpt / ".metadata").read_bytes())  # our own file, in a test
    change(meta, ckpt)
    (ckpt / ".metadata").write_bytes(pickle.dumps(meta))
    return out


def first_tensor_item(meta):
    return next((i, v) for i, v in meta.storage_data.items() if i.offset is not None)


def replace_first_item(meta, ckpt: Path, make) -> None:
    """Point the first tensor chunk of ``meta`` at ``make(sizes, nbytes)``, appended to its file."""
    index, info = first_tensor_item(meta)
    sizes = tuple(meta.state_dict_metadata[index.fqn].chunks[0].sizes)
    item = make(sizes, 2 * math.prod(sizes))  # bf16
    path = ckpt / info.relative_path
    info.offset = path.stat().st_size
    with open(path, "ab") as f:
        f.write(item)
    info.length = len(item)


def item_archive(pickle_bytes: bytes, storage: bytes, compress: int = 0) -> bytes:
    """A zip laid out as torch.save's, with the given data.pkl (``compress``: zipfile's method for it)."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes, compress_type=compress or zipfile.ZIP_STORED)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/data/0", storage)
        z.writestr("archive/version", b"3\n")
    return buf.getvalue()


def tensor_pickle(sizes, storage_offset: int) -> bytes:
    """data.pkl of a bf16 tensor of ``sizes`` at ``storage_offset`` of its storage (torch.save's record)."""
    import io
    import pickle

    class Storage:  # pickled by persistent id, as torch.save does
        pass

    numel = 1
    for n in sizes:
        numel *= n
    storage = Storage()

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.BFloat16Storage, "0", "cpu", numel) if obj is storage else None

    strides = tuple(int(torch.empty(sizes).stride(i)) for i in range(len(sizes)))
    buf = io.BytesIO()
    P(buf, protocol=2).dump(_Rebuild(storage, storage_offset, sizes, strides))
    return buf.getvalue()


class _Rebuild:
    def __init__(self, storage, offset, sizes, strides):
        self.args = (storage, offset, tuple(sizes), strides, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


def test_an_item_whose_storage_offset_points_before_its_storage_is_refused(src, tmp_path):
    def change(meta, ckpt):
        replace_first_item(meta, ckpt, lambda sizes, nbytes: item_archive(tensor_pickle(sizes, -10), bytes(nbytes)))

    out = crafted(src, tmp_path, change)
    r = run_cli("mcore2hf", "--megatron-path", out, "--hf-path", tmp_path / "hf", "--quiet")
    one_line(r, errors.EXIT_BAD_INPUT, "storage offset -10")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_a_compressed_item_is_refused_before_it_inflates(src, tmp_path):
    import zipfile

    def bomb(sizes, nbytes):
        item = item_archive(tensor_pickle(sizes, 0) + bytes(256 << 20),  # 256 MiB of zeros after the pickle
                            bytes(nbytes), compress=zipfile.ZIP_DEFLATED)
        assert len(item) < 2 << 20  # a small item
        return item

    def change(meta, ckpt):
        replace_first_item(meta, ckpt, bomb)

    out = crafted(src, tmp_path, change)
    r = run_cli("mcore2hf", "--megatron-path", out, "--hf-path", tmp_path / "hf", "--quiet", "--max-memory", "64MiB")
    one_line(r, errors.EXIT_BAD_INPUT, "compressed records")


def test_overlapping_items_are_refused(src, tmp_path):
    def change(meta, ckpt):
        items = [(i, v) for i, v in meta.storage_data.items() if i.offset is not None]
        (_, a), (_, b) = items[0], next((i, v) for i, v in items[1:] if v.relative_path == items[0][1].relative_path)
        b.offset = a.offset  # two entries, one item

    out = crafted(src, tmp_path, change)
    for cmd in (["mcore2hf", "--megatron-path", out, "--hf-path", tmp_path / "hf", "--quiet"],
                ["verify", "--hf-model", src, "--megatron-path", out, "--quiet"]):
        one_line(run_cli(*cmd), errors.EXIT_BAD_INPUT, "overlap")


def test_malformed_allow_listed_metadata_is_bad_input_not_a_bug(src, tmp_path):
    def change(meta, ckpt):
        key = next(k for k, v in meta.state_dict_metadata.items() if hasattr(v, "size"))
        meta.state_dict_metadata[key].size = None  # an allow-listed object holding nonsense

    out = crafted(src, tmp_path, change)
    r = run_cli("mcore2hf", "--megatron-path", out, "--hf-path", tmp_path / "hf", "--quiet")
    one_line(r, errors.EXIT_BAD_INPUT, ".metadata", "malformed")


# ------------------------------------------------------------------------ address-space limits (ulimit -v)

@pytest.mark.parametrize("limit_mb", [400, 700])
def test_an_address_space_limit_gets_one_line_not_an_abort(src, tmp_path, limit_mb):
    """Below what torch needs to load, a real process under RLIMIT_AS: one line and exit 4 (torch's import
    would abort from C++ at 400 MB; at ~780 MB thread creation fails, also one line, exit 4)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_mb * 2**20, resource.RLIM_INFINITY))

    r = subprocess.run([sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(src), "--megatron-path",
                        str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, preexec_fn=limit,
                       timeout=120)
    assert r.returncode == errors.EXIT_IO, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and ("ulimit" in lines[0]), r.stderr
    assert not (tmp_path / "out" / "iter_0000000" / ".metadata").exists()


# ------------------------------------------------------------------------ 11. signals while threads work

@pytest.fixture(scope="module")
def many_items(src, tmp_path_factory) -> Path:
    """A checkpoint of ~500 items: long enough to be stopped mid-way with reader threads busy."""
    out = tmp_path_factory.mktemp("many") / "mcore"
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--max-memory", "8KiB",
                 "--quiet"]) == 0
    return out


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", ["verify", "mcore2hf"])
def test_a_signal_mid_run_ends_it_cleanly(src, many_items, tmp_path, command, sig):
    """The signal arrives while the engine's threads are at work (the process is held at its 100th chunk,
    signalled, then let go: progress, not the clock): exit 128+signal and one line, never an abort from a
    thread still running at exit ("terminate called without an active exception", exit 134)."""
    import signal

    marker = tmp_path / "paused"
    args = {"verify": ["--hf-model", src, "--megatron-path", many_items],
            "mcore2hf": ["--megatron-path", many_items, "--hf-path", tmp_path / "hf"]}[command]
    env = {**os.environ, "STREAMCONV_TEST_PAUSE": "chunk:100", "STREAMCONV_TEST_PAUSE_FILE": str(marker),
           "STREAMCONV_TEST_PAUSE_CONTINUE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "streamconv", command, *map(str, args), "--max-memory", "8KiB",
                             "--workers", "4"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.exists(), proc.communicate(timeout=60)[1]
    crashpoints.wait_stopped(proc.pid)  # else the SIGCONT below may come before the stop, and be lost
    signum = getattr(signal, sig)
    proc.send_signal(signum)  # pending while the process is stopped; handled once it goes on
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("warning: --max-memory")]
    assert len(lines) == 1 and lines[0].startswith(f"error: interrupted by {sig}"), err
    assert not (tmp_path / "hf" / "model.safetensors.index.json").exists()
