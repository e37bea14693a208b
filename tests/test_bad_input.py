"""The bad-input matrix: every way a user's input or output folder can be wrong gets one clear line on
stderr (what is wrong, which file/tensor, what to do), its documented exit code, no traceback, and an
output folder that is not a loadable checkpoint (no ``.metadata``, no tracker file)."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamconv import errors
from streamconv.cli import build_parser, main
from streamconv.reference.synth import llama_config, make_checkpoint

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
COMPLETE_MARKERS = (".metadata", "latest_checkpointed_iteration.txt", "latest_train_state.pt")


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A good two-shard Llama checkpoint (converted fine in test_good_input_converts)."""
    return make_checkpoint(tmp_path_factory.mktemp("base") / "hf", llama_config(), seed=1, shards=2)


@pytest.fixture
def src(base, tmp_path) -> Path:
    """A private copy of ``base`` to break."""
    return Path(shutil.copytree(base, tmp_path / "hf"))


def read_shard(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_shard(path: Path, header: dict, data: bytes) -> None:
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def edit_header(path: Path, edit) -> None:
    header, data = read_shard(path)
    edit(header)
    write_shard(path, header, data)


def tensors_of(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def convert(src, out, *extra, capsys) -> tuple[int, str]:
    rc = main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--quiet", *extra])
    return rc, capsys.readouterr().err


def assert_one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def assert_not_a_checkpoint(out: Path) -> None:
    """Nothing a loader (megatron-core, Megatron-LM, Bridge) takes as a finished checkpoint."""
    if not out.exists():
        return
    found = [str(p) for marker in COMPLETE_MARKERS for p in out.rglob(marker)]
    assert not found, f"incomplete output looks complete: {found}"


def check_refused(src, tmp_path, capsys, code, *needles, extra=()) -> None:
    out = tmp_path / "out"
    rc, err = convert(src, out, *extra, capsys=capsys)
    assert rc == code, err
    assert_one_line_error(err, *needles)
    assert_not_a_checkpoint(out)


# ------------------------------------------------------------------------------- bad safetensors shards


def test_good_input_converts(src, tmp_path, capsys):
    """The base of every case below converts: each failure is caused by its one change."""
    rc, err = convert(src, tmp_path / "out", capsys=capsys)
    assert rc == 0, err
    assert all((tmp_path / "out" / m).exists() for m in COMPLETE_MARKERS[1:])
    assert (tmp_path / "out" / "iter_0000000" / ".metadata").is_file()


def test_truncated_shard(src, tmp_path, capsys):
    shard = src / SHARD1
    shard.write_bytes(shard.read_bytes()[:-100])  # a download that stopped early
    check_refused(src, tmp_path, capsys, 3, str(shard), "truncated", "re-download")


def test_shard_cut_inside_its_header(src, tmp_path, capsys):
    shard = src / SHARD2
    shard.write_bytes(shard.read_bytes()[:50])
    check_refused(src, tmp_path, capsys, 3, str(shard), "header length", "larger than the file", "re-download")


def test_header_length_larger_than_file(src, tmp_path, capsys):
    shard = src / SHARD1
    raw = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    check_refused(src, tmp_path, capsys, 3, str(shard), f"header length {len(raw)}", "larger than the file")


def test_absurd_header_length_is_refused_before_allocating(src, tmp_path, capsys):
    shard = src / SHARD1
    shard.write_bytes(struct.pack("<Q", 2**63) + shard.read_bytes()[8:])
    check_refused(src, tmp_path, capsys, 3, str(shard), "header length", "re-download")


def test_malformed_header_json(src, tmp_path, capsys):
    shard = src / SHARD2
    raw = bytearray(shard.read_bytes())
    raw[8:10] = b"{{"
    shard.write_bytes(bytes(raw))
    check_refused(src, tmp_path, capsys, 3, str(shard), "malformed safetensors header JSON", "re-download")


def test_tensor_byte_range_outside_the_file(src, tmp_path, capsys):
    shard = src / SHARD1
    header, data = read_shard(shard)
    name = tensors_of(header)[0]
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b + len(data), e + len(data)]
    write_shard(shard, header, data)
    check_refused(src, tmp_path, capsys, 3, str(shard), repr(name), "the file has", "re-download")


def test_tensors_overlapping_in_the_file(src, tmp_path, capsys):
    shard = src / SHARD1
    header, data = read_shard(shard)
    by_size: dict = {}
    for name in tensors_of(header):
        b, e = header[name]["data_offsets"]
        by_size.setdefault((header[name]["dtype"], e - b), []).append(name)
    a, b = next(names for names in by_size.values() if len(names) >= 2)[:2]
    header[b]["data_offsets"] = list(header[a]["data_offsets"])  # b now reads a's bytes
    write_shard(shard, header, data)
    check_refused(src, tmp_path, capsys, 3, str(shard), "overlap", "re-download")


def test_shape_disagrees_with_byte_length(src, tmp_path, capsys):
    shard = src / SHARD2
    header, data = read_shard(shard)
    name = next(n for n in tensors_of(header) if len(header[n]["shape"]) == 2)
    header[name]["shape"][0] += 1
    write_shard(shard, header, data)
    check_refused(src, tmp_path, capsys, 3, str(shard), repr(name), "needs", "bytes but its byte range")


def test_dtype_disagrees_with_byte_length(src, tmp_path, capsys):
    shard = src / SHARD2
    header, data = read_shard(shard)
    name = tensors_of(header)[0]
    header[name]["dtype"] = "F16"  # stored as F32: half the bytes the range holds
    write_shard(shard, header, data)
    check_refused(src, tmp_path, capsys, 3, str(shard), repr(name), "F16", "bytes but its byte range")


def test_unknown_dtype(src, tmp_path, capsys):
    shard = src / SHARD1
    name = tensors_of(read_shard(shard)[0])[-1]
    edit_header(shard, lambda h: h[name].update(dtype="F7"))
    check_refused(src, tmp_path, capsys, 3, str(shard), repr(name), "unknown dtype 'F7'", "BF16")


def test_shard_named_in_index_but_missing(src, tmp_path, capsys):
    (src / SHARD2).unlink()
    check_refused(src, tmp_path, capsys, 3, str(src / SHARD2), "index", "missing", "finish the download")


def test_index_pointing_outside_the_folder(src, tmp_path, capsys):
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(data["weight_map"])[0]
    data["weight_map"][first] = "../../etc/passwd"
    index.write_text(json.dumps(data))
    check_refused(src, tmp_path, capsys, 3, str(index), "../../etc/passwd", "not a file name")


def test_tensor_listed_in_index_but_not_in_its_shard(src, tmp_path, capsys):
    shard = src / SHARD1
    name = tensors_of(read_shard(shard)[0])[0]
    edit_header(shard, lambda h: h.pop(name))
    check_refused(src, tmp_path, capsys, 3, repr(name), "listed in the index but not in the shard")


class Hung(Exception):
    pass


def convert_within(seconds: int, src, out, capsys) -> tuple[int, str]:
    """``convert``, failing the test (instead of hanging it) after ``seconds``."""
    def on_alarm(signum, frame):
        raise Hung(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        return convert(src, out, capsys=capsys)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_fifo_instead_of_a_file_does_not_hang(src, tmp_path, capsys):
    """A special file where a shard or config.json should be (reading a FIFO blocks forever): refused at once."""
    (src / "model.safetensors.index.json").unlink()
    for name in (SHARD1, "config.json"):
        (src / name).unlink()
        os.mkfifo(src / name)
    rc, err = convert_within(30, src, tmp_path / "out", capsys)
    assert rc == errors.EXIT_BAD_INPUT
    assert_one_line_error(err, "config.json", "not a regular file")
    (src / "config.json").unlink()
    (src / "config.json").write_text(json.dumps(llama_config()))
    rc, err = convert_within(30, src, tmp_path / "out", capsys)
    assert rc == errors.EXIT_BAD_INPUT
    assert_one_line_error(err, SHARD1, "not a regular file")
    assert_not_a_checkpoint(tmp_path / "out")


# --------------------------------------------------------------------------- tensors vs the model mapping


def drop_tensor(src: Path, name: str) -> None:
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = data["weight_map"].pop(name)
    index.write_text(json.dumps(data))
    edit_header(src / shard, lambda h: h.pop(name))


def add_tensor(src: Path, shard: str, name: str, shape: list[int]) -> None:
    header, data = read_shard(src / shard)
    n = 4 * shape[0] * shape[1]
    header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + n]}
    write_shard(src / shard, header, data + bytes(n))
    index = src / "model.safetensors.index.json"
    meta = json.loads(index.read_text())
    meta["weight_map"][name] = shard
    index.write_text(json.dumps(meta))


def test_tensor_the_mapping_needs_is_absent(src, tmp_path, capsys):
    name = "model.layers.1.mlp.up_proj.weight"
    drop_tensor(src, name)
    check_refused(src, tmp_path, capsys, 3, str(src), repr(name), "is needed for LlamaForCausalLM",
                  "download is complete")


def test_shape_disagrees_with_config(src, tmp_path, capsys):
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] += 32
    (src / "config.json").write_text(json.dumps(cfg))
    check_refused(src, tmp_path, capsys, 3, "mlp", "has shape", "config.json implies")


def test_unexpected_extra_tensor_is_refused_unless_allow_unused(src, tmp_path, capsys):
    name = "model.layers.0.mlp.experts.0.weight"
    add_tensor(src, SHARD2, name, [4, 64])
    check_refused(src, tmp_path, capsys, 3, repr(name), "not used", "--allow-unused")

    rc, err = convert(src, tmp_path / "out2", "--allow-unused", capsys=capsys)
    assert rc == 0, err
    assert (tmp_path / "out2" / "iter_0000000" / ".metadata").is_file()


# ----------------------------------------------------------------------------------------- config.json

BAD_CONFIGS = {
    # case: (change to config.json, expected words)
    "architecture": ({"architectures": ["MixtralForCausalLM"]}, ("unsupported architecture 'MixtralForCausalLM'",
                                                                 "LlamaForCausalLM")),
    "activation": ({"hidden_act": "gelu"}, ("hidden_act='gelu'", "not supported")),
    "bias": ({"attention_bias": True}, ("attention_bias=True", "not supported")),
    "rope": ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ("rope_scaling", "not supported")),
    "kv-heads": ({"num_key_value_heads": 3}, ("num_key_value_heads=3",)),
    "zero-heads": ({"num_attention_heads": 0}, ("num_attention_heads", "positive")),
    "string-size": ({"hidden_size": "64"}, ("hidden_size", "must be a int")),
    "absurd-layers": ({"num_hidden_layers": 10**12}, ("num_hidden_layers", "out of range")),
    "absurd-vocab": ({"vocab_size": 2**40}, ("vocab_size", "out of range")),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_unsupported_architecture_or_config_values(src, tmp_path, capsys, case):
    change, needles = BAD_CONFIGS[case]
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(change)
    (src / "config.json").write_text(json.dumps(cfg))
    check_refused(src, tmp_path, capsys, 3, "config.json" if case != "architecture" else "", *needles)


def test_config_that_is_not_json(src, tmp_path, capsys):
    (src / "config.json").write_text("[" * 100_000)  # also deeper than the JSON parser's recursion limit
    check_refused(src, tmp_path, capsys, 3, str(src / "config.json"), "unreadable config")


# ------------------------------------------------------------------------------------------ output folder


def test_non_empty_output_folder(src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, err = convert(src, out, capsys=capsys)
    assert rc == errors.EXIT_IO
    assert_one_line_error(err, str(out), "not empty", "--overwrite")
    assert (out / "notes.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["notes.txt"]


def _try_mount(target: Path, options: str) -> str | None:
    """Mount a tmpfs on ``target``; None if done, else why it cannot be done here."""
    if os.geteuid() != 0:
        return "not root: cannot mount a tmpfs"
    if not shutil.which("mount"):
        return "no mount command"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True, text=True)
    return None if r.returncode == 0 else f"mount -t tmpfs failed here: {r.stderr.strip()}"


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(options) -> folder``: a fresh tmpfs mounted for this test (unmounted after)."""
    mounted = []

    def mount(options: str) -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        why = _try_mount(target, options)
        if why:
            pytest.skip(why)
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture
def read_only_folder(tmp_path, tmpfs):
    """An existing, empty folder nobody can write into: chmod for a normal user; for root (whom chmod does
    not stop) a read-only tmpfs mount."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    else:
        yield tmpfs("ro,size=64k")


def test_read_only_output_folder(src, read_only_folder, capsys):
    for out in (read_only_folder, read_only_folder / "new-subfolder"):
        rc, err = convert(src, out, capsys=capsys)
        assert rc == errors.EXIT_IO, err
        assert_one_line_error(err, str(read_only_folder))
        assert "read-only file system" in err or "permission denied" in err, err
        assert "choose" in err
        assert not any(read_only_folder.iterdir())


def test_overwrite_of_a_read_only_folder(src, tmp_path, tmpfs, capsys):
    """--overwrite cannot delete what is there: one line, and what was there is untouched."""
    if os.geteuid() != 0:
        out = tmp_path / "ro"
        out.mkdir()
        (out / "old.txt").write_text("old")
        out.chmod(0o555)
    else:
        out = tmpfs("size=64k")
        (out / "old.txt").write_text("old")
        subprocess.run(["mount", "-o", "remount,ro", str(out)], check=True)
    try:
        rc, err = convert(src, out, "--overwrite", capsys=capsys)
    finally:
        out.chmod(0o755) if os.geteuid() != 0 else None
    assert rc == errors.EXIT_IO, err
    assert_one_line_error(err, str(out), "choose")
    assert "read-only file system" in err or "permission denied" in err, err
    assert (out / "old.txt").read_text() == "old"


@pytest.mark.parametrize("mode", [(), ("--no-staging",)], ids=["staged", "direct"])
def test_disk_full_while_writing_then_run_again(src, tmpfs, capsys, mode):
    """A real full disk: a 256 KiB tmpfs, smaller than the ~430 KiB checkpoint. Then what the message says:
    free space (grow the tmpfs) and run again, which finishes the conversion."""
    disk = tmpfs("size=256k")
    out = disk / "out"
    rc, err = convert(src, out, "--max-memory", "256KiB", *mode, capsys=capsys)
    assert rc == errors.EXIT_IO, err
    assert_one_line_error(err, f"{out}/", "disk full", "free space", "run again")  # names the file it was writing
    assert_not_a_checkpoint(out)

    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
    rc, err = convert(src, out, "--max-memory", "256KiB", *mode, capsys=capsys)
    assert rc == 0, err
    assert all((out / m).exists() for m in COMPLETE_MARKERS[1:]) and (out / "iter_0000000" / ".metadata").is_file()


def test_disk_full_while_exporting(src, tmp_path, tmpfs, capsys):
    """mcore2hf on a full disk: one line, exit 4, and no HF folder that looks complete (no config.json,
    no index, no shard under its final name)."""
    mcore = tmp_path / "mcore"
    assert convert(src, mcore, capsys=capsys)[0] == 0
    out = tmpfs("size=128k") / "hf"
    rc = main(["mcore2hf", "--megatron-path", str(mcore), "--hf-path", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == errors.EXIT_IO, err
    assert_one_line_error(err, f"{out}/", "disk full", "free space")
    names = os.listdir(out)
    assert not {"config.json", "model.safetensors", "model.safetensors.index.json"} & set(names), names


def test_file_size_limit_while_writing(src, tmp_path):
    """The kernel refuses a write mid-file (RLIMIT_FSIZE, EFBIG) in a real CLI process: one line, exit 4,
    nothing complete-looking. Runs everywhere, unlike the tmpfs mount."""
    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    r = subprocess.run([sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(src), "--megatron-path",
                        str(out), "--max-memory", "8MiB"], capture_output=True, text=True, preexec_fn=limit,
                       timeout=120)
    assert r.returncode == errors.EXIT_IO, r.stderr
    assert_one_line_error(r.stderr, f"{out}/", "file too large")
    assert_not_a_checkpoint(out)


def test_output_error_messages():
    for code, words in [(errno.ENOSPC, "disk full"), (errno.EROFS, "read-only"), (errno.EACCES, "permission"),
                        (errno.EIO, "cannot write: Input/output error")]:
        e = errors.output_error(Path("/x/y"), OSError(code, os.strerror(code)))
        assert isinstance(e, errors.OutputError) and e.exit_code == errors.EXIT_IO
        assert str(e).startswith("/x/y: ") and words in str(e) and "\n" not in str(e)


# --------------------------------------------------------------------------------- SIGINT and SIGTERM


@pytest.fixture(scope="module")
def bigger(tmp_path_factory) -> Path:
    """Big enough (~8.5 MB, ~270 chunks at a 256 KiB budget) that a conversion can be caught mid-write."""
    cfg = llama_config(hidden=128, layers=6, heads=8, kv_heads=2, ffn=384, vocab=4096)
    return make_checkpoint(tmp_path_factory.mktemp("bigger") / "hf", cfg, seed=2, shards=2)


def interrupt_conversion(cmd: list[str], out: Path, sig: int) -> str:
    """Start ``cmd``, send ``sig`` once its journal shows work kept for a re-run (a committed file, or three
    committed chunks): progress, not time. Returns its stderr (exit code checked)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "STREAMCONV_TEST_SLOW": "0.01"})
    journal = out / ".streamconv" / "journal.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        text = journal.read_text() if journal.is_file() else ""
        if '"t":"file"' in text or text.count('"t":"chunk"') >= 3:
            break  # mid-write, with something to resume
        if "--no-staging" in cmd and list(out.glob("iter_*/*.distcp.partial")):
            break  # (whole files are journaled only: a file being written is mid-write)
        time.sleep(0.005)
    assert proc.poll() is None, "conversion ended before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    return err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_running_conversion_then_resume(bigger, tmp_path, sig):
    """A real CLI process interrupted mid-write: one line saying how to resume, exit 128+signal, an output
    folder that is not a checkpoint; and doing what the line says (the same command again) finishes it."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(bigger), "--megatron-path", str(out),
           "--max-memory", "256KiB", "--json"]
    err = interrupt_conversion(cmd, out, sig)
    assert_one_line_error(err, f"interrupted by {signal.Signals(sig).name}", "not a loadable checkpoint",
                          "run the same command again to resume")
    assert_not_a_checkpoint(out)
    if sig == signal.SIGINT:
        return  # resuming once is enough (tests/test_resume.py checks resumed output bit for bit)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["chunks_resumed"] > 0
    assert all((out / m).exists() for m in COMPLETE_MARKERS[1:]) and (out / "iter_0000000" / ".metadata").is_file()


def test_interrupt_unstaged_conversion_then_resume(bigger, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(bigger), "--megatron-path", str(out),
           "--max-memory", "256KiB", "--json", "--no-staging"]
    err = interrupt_conversion(cmd, out, signal.SIGTERM)
    assert_one_line_error(err, "interrupted by SIGTERM", "not a loadable checkpoint", "run the same command again")
    assert_not_a_checkpoint(out)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (out / "iter_0000000" / ".metadata").is_file()


def test_signals_restored_after_main(src, tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    convert(src, tmp_path / "out", capsys=capsys)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# ------------------------------------------------------------------------ garbage into every command


def _garbage_inputs(tmp_path: Path) -> dict[str, Path]:
    rnd = bytes((i * 7919 + 13) % 251 for i in range(5000))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(rnd)
    folder = tmp_path / "junk-folder"
    folder.mkdir()
    (folder / "config.json").write_bytes(rnd[:300])
    (folder / "model.safetensors").write_bytes(rnd)
    (folder / ".metadata").write_bytes(rnd)
    (folder / "latest_checkpointed_iteration.txt").write_bytes(rnd[:40])
    hf = tmp_path / "junk-hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(llama_config()))
    (hf / "model.safetensors").write_bytes(struct.pack("<Q", 24) + b'{"a":{"dtype":1}}'.ljust(24))
    return {"file": junk, "folder": folder, "hf-with-bad-shard": hf, "missing": tmp_path / "does-not-exist"}


# The output argument of each command that writes (everything else is given the garbage input).
OUTPUT_DEST = {"hf2mcore": "megatron_path", "mcore2hf": "hf_path"}


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: p for name, p in sub.choices.items() if name != "demo"}


@pytest.mark.parametrize("command", sorted(_commands()))
def test_garbage_into_every_command(command, tmp_path, capsys):
    """Any command given a garbage file or folder answers with one line and a non-internal exit code."""
    sub = _commands()[command]
    for kind, garbage in _garbage_inputs(tmp_path).items():
        argv, out = [command], tmp_path / f"out-{kind}"
        for action in sub._actions:
            value = str(out) if action.dest == OUTPUT_DEST.get(command) else str(garbage)
            if not action.option_strings:
                argv.append(value)
            elif action.required:
                argv += [action.option_strings[-1], value]
        rc = main(argv)
        err = capsys.readouterr().err
        if rc == 0 and kind == "hf-with-bad-shard":  # a command that reads config.json only (plan) is fine
            assert err == ""
            continue
        assert rc in (errors.EXIT_USAGE, errors.EXIT_BAD_INPUT, errors.EXIT_IO), (kind, argv, err)
        assert_one_line_error(err)
        assert_not_a_checkpoint(out)


def test_garbage_in_a_real_process_prints_no_traceback(tmp_path):
    """The same through the installed entry point: what the user's terminal shows, warnings included."""
    garbage = _garbage_inputs(tmp_path)
    r = subprocess.run([sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(garbage["hf-with-bad-shard"]),
                        "--megatron-path", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == errors.EXIT_BAD_INPUT
    assert_one_line_error(r.stderr, "model.safetensors", "malformed header entry for tensor 'a'")
    r = subprocess.run([sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(garbage["folder"]),
                        "--megatron-path", str(tmp_path / "o"), "--debug"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr  # --debug shows it


def test_an_unknown_flag_gets_the_subcommands_usage_and_help_has_examples(capsys):
    from streamconv.cli import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["hf2mcore", "--hf-model", "x", "--megatron-path", "y", "--bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: streamconv hf2mcore" in err and "unrecognized arguments: --bogus" in err
    for cmd in ("hf2mcore", "mcore2hf", "verify", "generate", "plan", "inspect"):
        with pytest.raises(SystemExit):
            cli_main([cmd, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out and "exit codes:" in out and f"streamconv {cmd}" in out.split("examples:")[1], cmd


def test_a_tiny_budget_is_said_and_plan_refuses_what_the_conversion_refuses(tmp_path, capsys):
    from streamconv.cli import main as cli_main
    from streamconv.reference.synth import llama_config, make_checkpoint

    src = make_checkpoint(tmp_path / "hf", llama_config(hidden=64, layers=2, heads=8, kv_heads=2, ffn=160,
                                                        vocab=256), seed=1, shards=1)
    capsys.readouterr()
    assert cli_main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err
    assert cli_main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(tmp_path / "o2"),
                     "--max-memory", "256KiB"]) == 0
    assert "warning: --max-memory 256.0 KiB makes chunks of at most 32.0 KiB" in capsys.readouterr().err
    assert cli_main(["plan", "--hf-model", str(src), "--max-memory", "1KiB"]) == 2
    planned = capsys.readouterr().err.strip().splitlines()[-1]
    assert cli_main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(tmp_path / "o3"),
                     "--max-memory", "1KiB"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == planned  # the same refusal, the same words
    assert "is below the" in planned


@pytest.mark.parametrize("cmd", ["hf2mcore", "plan", "mcore2hf"])
def test_a_budget_under_the_floor_is_refused_in_one_line(tmp_path, capsys, monkeypatch, cmd):
    """Outside tests, --max-memory under 1 MiB is refused before anything is read or written (issue 14:
    16 KiB made 205k chunks and a checkpoint 73% larger than the model)."""
    from streamconv.cli import main as cli_main

    monkeypatch.delenv("STREAMCONV_TEST_TINY_BUDGET", raising=False)
    out = tmp_path / "out"
    args = {"hf2mcore": ["--hf-model", str(tmp_path), "--megatron-path", str(out)],
            "plan": ["--hf-model", str(tmp_path)],
            "mcore2hf": ["--megatron-path", str(tmp_path), "--hf-path", str(out)]}[cmd]
    capsys.readouterr()
    assert cli_main([cmd, *args, "--max-memory", "16KiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-memory 16.0 KiB is below the 1.0 MiB streamconv accepts" in err[0], err
    assert not out.exists()


def test_dtype_errors_and_help_speak_one_vocabulary(tmp_path, capsys):
    from streamconv.cli import build_parser, main as cli_main

    src = make_checkpoint(tmp_path / "hf", llama_config(hidden=64, layers=1, heads=4, kv_heads=2, ffn=128, vocab=128),
                          seed=1, shards=1)
    assert cli_main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(tmp_path / "o"),
                     "--dtype", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("choose bf16, fp16 or fp32 (also spelled bfloat16, float16, float32), or auto (keep the "
                        "source's)") and "half" not in err
    helps = " ".join(a.help for p in build_parser()._subparsers._group_actions[0].choices.values()
                     for a in p._actions if "--dtype" in a.option_strings and a.help)
    assert "half" not in helps and "bf16, fp16 or fp32 (also spelled bfloat16, float16, float32)" in helps
