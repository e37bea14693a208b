"""Crash safety and exact resume of hf2mcore, with real processes: a real CLI process is SIGKILLed (at
random moments, mid-assembly of a .distcp, mid-.metadata), re-run until done, and the output must be
byte-identical to an uninterrupted run, pass ``streamconv verify``, and never look complete before the end;
with staging (the default) and with ``--no-staging`` (which resumes whole .distcp files). Torn/corrupted
staged chunks are detected and redone; another input or setting on the folder is refused."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from streamconv import errors
from streamconv.cli import main
from streamconv.synth import llama_config, make_checkpoint

CFG = llama_config(hidden=64, layers=3, heads=8, kv_heads=2, ffn=160, vocab=320)
# a 64 KiB budget makes 8 KiB chunks (50 of them) and --distcp-size 40KiB about 9 .distcp files
SETTINGS = ["--max-memory", "64KiB", "--distcp-size", "40KiB"]
ITER = "iter_0000000"
TRACKER = "latest_checkpointed_iteration.txt"
PATH_DEPENDENT = {"run_config.yaml"}  # names the output folder


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("src") / "hf", CFG, seed=3, shards=3, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def ref(src, tmp_path_factory) -> dict[str, bytes]:
    """The files of an uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert convert(src, out) == 0
    files = output_files(out)
    assert sum(name.endswith(".distcp") for name in files) >= 5  # several files: assembly is pipelined
    return files


def convert(src, out, *extra) -> int:
    return main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--quiet", *SETTINGS, *extra])


def output_files(out: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in (out / ITER).iterdir() if p.is_file() and p.name not in PATH_DEPENDENT}
    files.update({f"../{p.name}": p.read_bytes() for p in out.iterdir() if p.is_file()})
    return files


MODES = pytest.mark.parametrize("mode", [(), ("--no-staging",)], ids=["staged", "direct"])


def launch(src, out, *extra, **env) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(src), "--megatron-path", str(out),
           "--quiet", *SETTINGS, *extra]
    return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(cond, proc, timeout=60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"conversion ended first (rc {proc.returncode}): {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def kill_at(src, out, tmp_path, point: str, *extra) -> None:
    """Run the CLI until it reaches ``point`` (streamconv/crashpoints.py), then SIGKILL it."""
    marker = tmp_path / f"reached-{point.replace(':', '-')}"
    proc = launch(src, out, *extra, STREAMCONV_TEST_PAUSE=point, STREAMCONV_TEST_PAUSE_FILE=str(marker))
    wait_until(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def assert_never_complete_early(out: Path, ref: dict[str, bytes]) -> None:
    """A killed run's folder is not a checkpoint, unless its commit (.metadata) was written, and then
    everything it commits is complete and identical to the uninterrupted run."""
    ckpt = out / ITER
    if (out / TRACKER).exists():
        assert (ckpt / ".metadata").exists()
    if (ckpt / ".metadata").exists():
        got = output_files(out)
        assert {k: v for k, v in got.items() if not k.startswith("../")} == \
               {k: v for k, v in ref.items() if not k.startswith("../")}


def finish_and_check(src, out, ref, capsys, *extra) -> dict:
    """Re-run the same command until done: identical to the uninterrupted run, and verify passes."""
    capsys.readouterr()
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--json", *SETTINGS, *extra]) == 0
    summary = json.loads(capsys.readouterr().out)
    got = output_files(out)
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert got[name] == ref[name], f"{name} differs from the uninterrupted run"
    assert main(["verify", "--hf-model", str(src), "--megatron-path", str(out), "--quiet"]) == 0
    assert not (out / ".streamconv" / "staging.zarr").exists()  # dropped once assembled
    return summary


@MODES
def test_sigkill_at_random_moments_then_resume(src, ref, tmp_path, capsys, mode):
    out = tmp_path / "out"
    rng = random.Random(20260529)
    kills = 0
    started = tmp_path / "started"
    for _ in range(3):
        # a deterministic slow-down (sleeps around each chunk's zarr write) spreads the work over ~1 s;
        # the kill comes at a random moment after the sink starts (resuming, staging, assembling, committing)
        started.unlink(missing_ok=True)
        proc = launch(src, out, *mode, STREAMCONV_TEST_SLOW="0.02", STREAMCONV_TEST_STARTED=str(started))
        wait_until(started.exists, proc)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        assert_never_complete_early(out, ref)
    assert kills >= 2
    summary = finish_and_check(src, out, ref, capsys, *mode)
    assert summary["chunks_resumed"] > 0


@MODES
def test_sigkill_during_assembly_and_while_writing_metadata(src, ref, tmp_path, capsys, mode):
    out = tmp_path / "out"
    kill_at(src, out, tmp_path, "assemble:7", *mode)  # the 7th item appended to a .distcp being assembled
    ckpt = out / ITER
    assert list(ckpt.glob("*.distcp.partial")), "killed mid-assembly: a .distcp under its temporary name"
    assert not (ckpt / ".metadata").exists() and not (out / TRACKER).exists()

    kill_at(src, out, tmp_path, "metadata", *mode)  # half of .metadata written to its temporary file
    assert (ckpt / ".metadata.tmp").exists() and not (ckpt / ".metadata").exists()
    assert not (out / TRACKER).exists() and not list(ckpt.glob("*.partial"))
    assert len(list(ckpt.glob("*.distcp"))) == sum(n.endswith(".distcp") for n in ref)

    summary = finish_and_check(src, out, ref, capsys, *mode)
    assert summary["files_resumed"] == sum(n.endswith(".distcp") for n in ref) - 1  # all but the objects file
    assert summary["chunks"] == 0  # nothing to convert again
    assert not (ckpt / ".metadata.tmp").exists()


def _staged_chunk_file(out: Path, record: dict) -> Path:
    """The zarr chunk file of a journal ``chunk`` record (one zarr chunk per plan chunk)."""
    store = out / ".streamconv" / "staging.zarr" / record["key"]
    grid = json.loads((store / "zarr.json").read_text())["chunk_grid"]["configuration"]["chunk_shape"]
    return store.joinpath("c", *(str(o // g) for o, g in zip(record["offsets"], grid)))


def kill_point_inside_a_file(src) -> int:
    """A count n of staged chunks after which the file of chunks n-1 and n still waits for chunk n+1."""
    from streamconv.formats.safetensors import SafetensorsSource
    from streamconv.hf2mcore import build_plan, chunk_bytes_for
    from streamconv.models.spec import load_config, spec_from_config

    source = SafetensorsSource(src)
    plan = build_plan(source, spec_from_config(load_config(src)), None, chunk_bytes_for(64 * 1024),
                      file_bytes=40 * 1024)
    source.close()
    files = [c.file for c in plan.chunks]
    return next(n for n in range(len(files) // 2, len(files) - 1) if files[n - 2] == files[n - 1] == files[n])


def test_corrupted_and_torn_staged_chunks_are_redone(src, ref, tmp_path, capsys):
    out = tmp_path / "out"
    kill_at(src, out, tmp_path, f"staged:{kill_point_inside_a_file(src)}")
    journal = (out / ".streamconv" / "journal.jsonl").read_text().splitlines()
    chunks = [json.loads(line) for line in journal if '"t":"chunk"' in line]
    assembled = {c["key"] + str(c["offsets"]) for line in journal if '"t":"file"' in line
                 for c in [{"key": k, "offsets": o} for k, o, *_ in json.loads(line)["items"]]}
    staged = [c for c in chunks if c["key"] + str(c["offsets"]) not in assembled]
    assert len(staged) >= 2, "the kill should leave staged chunks not yet assembled"
    flipped, torn = _staged_chunk_file(out, staged[-1]), _staged_chunk_file(out, staged[-2])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    flipped.write_bytes(data)
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # a chunk cut short (power loss)
    stray = flipped.with_name(flipped.name + ".0123456789abcdef.partial")  # what a killed zarr write leaves
    stray.write_bytes(b"\0" * 100)

    summary = finish_and_check(src, out, ref, capsys)
    assert summary["chunks_redone"] == 2
    assert summary["chunks_verified"] == len(staged) - 2
    assert summary["partials_removed"] >= 1 and not stray.exists()


def test_sigterm_says_how_to_resume_and_resumes(src, ref, tmp_path, capsys):
    out = tmp_path / "out"
    proc = launch(src, out, STREAMCONV_TEST_SLOW="0.02")
    journal = out / ".streamconv" / "journal.jsonl"
    wait_until(lambda: journal.is_file() and journal.read_text().count('"t":"chunk"') >= 3, proc)  # staging
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert len(err.strip().splitlines()) == 1 and "run the same command again to resume" in err
    assert not (out / ITER / ".metadata").exists() and not (out / TRACKER).exists()
    summary = finish_and_check(src, out, ref, capsys)
    assert summary["chunks_resumed"] > 0


def test_other_input_or_settings_are_refused(src, ref, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert(src, out) == 0
    before = output_files(out)
    other = make_checkpoint(tmp_path / "other", CFG, seed=4, shards=3, dtype=torch.bfloat16)  # same shapes
    cases = [
        ([str(other)], "different input"),
        ([str(src), "--dtype", "fp32"], "--dtype"),
        ([str(src), "--max-memory", "32KiB"], "chunks"),
        ([str(src), "--distcp-size", "1MiB"], "--distcp-size"),
        ([str(src), "--no-staging"], "--no-staging"),
    ]
    for (model, *extra), needle in cases:
        capsys.readouterr()
        rc = main(["hf2mcore", "--hf-model", model, "--megatron-path", str(out), "--quiet", *SETTINGS, *extra])
        err = capsys.readouterr().err.strip()
        assert rc == errors.EXIT_IO, err
        assert len(err.splitlines()) == 1 and "cannot resume" in err and needle in err and "--overwrite" in err, err
        assert output_files(out) == before  # untouched
    # the same command again: resumes a complete output, nothing to redo, the same bytes
    assert convert(src, out) == 0
    assert output_files(out) == before == ref
    # --overwrite starts over
    assert main(["hf2mcore", "--hf-model", str(other), "--megatron-path", str(out), "--quiet", "--overwrite",
                 *SETTINGS]) == 0
    assert main(["verify", "--hf-model", str(other), "--megatron-path", str(out), "--quiet"]) == 0
    assert main(["verify", "--hf-model", str(src), "--megatron-path", str(out), "--quiet"]) == errors.EXIT_MISMATCH
