"""Crash safety and exact resume of hf2mcore, with real processes: a real CLI process is SIGKILLed (after a
random number of chunks, mid-file, mid-.metadata), re-run until done, and the output must be byte-identical
to an uninterrupted run, pass ``streamconv verify``, and never look complete before the end; by default
(chunk-granular resume) and with ``--no-staging`` (which resumes whole .distcp files). Torn/corrupted
chunks of an unfinished file are detected and redone; another input or setting on the folder is refused."""

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
from streamconv.reference.synth import llama_config, make_checkpoint

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


def chunks_kept(out: Path, plan, staged: bool) -> set:
    """The chunks a re-run on ``out`` keeps: those of committed files and, staged, those journaled since
    their ``.partial`` was created."""
    from streamconv.runtime.resume import chunks_of_last_open

    journal = out / ".streamconv" / "journal.jsonl"
    if not journal.exists():
        return set()
    records = [json.loads(line) for line in journal.read_text().splitlines() if line.endswith("}")]
    files = {r["file"] for r in records if r["t"] == "file"}
    kept = {(c.key, tuple(c.offsets)) for c in plan.chunks if c.file in files}
    if staged:
        kept |= chunks_of_last_open(records, {(c.key, tuple(c.offsets)): c.file for c in plan.chunks})
    return kept


def plan_of(src):
    from streamconv.sources.safetensors import SafetensorsSource
    from streamconv.inputs import chunk_bytes_for, import_plan_for as build_plan
    from streamconv.models.config import load_config, spec_from_config

    source = SafetensorsSource(src)
    plan = build_plan(source, spec_from_config(load_config(src)), None, chunk_bytes_for(64 * 1024),
                      file_bytes=40 * 1024)
    source.close()
    return plan


@MODES
def test_sigkill_at_random_moments_then_resume(src, ref, tmp_path, capsys, mode):
    """Three SIGKILLs, each after a random number of chunks is done (the kill follows progress, not the
    clock, so it lands in real work however loaded the machine is), then a run to the end."""
    out = tmp_path / "out"
    rng = random.Random(20260529)
    plan = plan_of(src)
    for i in range(3):  # the process stops at the kill point (every thread): each run does exactly n chunks
        left = len(plan.chunks) - len(chunks_kept(out, plan, staged=not mode))
        kill_at(src, out, tmp_path, f"chunk:{rng.randint(left // 4, left // 2)}", *mode)
        assert_never_complete_early(out, ref)
    summary = finish_and_check(src, out, ref, capsys, *mode)
    assert summary["chunks_resumed"] > 0


@MODES
def test_sigkill_mid_file_and_while_writing_metadata(src, ref, tmp_path, capsys, mode):
    out = tmp_path / "out"
    kill_at(src, out, tmp_path, "chunk:7", *mode)  # the 7th chunk written into a .distcp not yet complete
    ckpt = out / ITER
    assert list(ckpt.glob("*.distcp.partial")), "killed mid-file: a .distcp under its temporary name"
    assert not (ckpt / ".metadata").exists() and not (out / TRACKER).exists()

    kill_at(src, out, tmp_path, "metadata", *mode)  # half of .metadata written to its temporary file
    assert (ckpt / ".metadata.tmp").exists() and not (ckpt / ".metadata").exists()
    assert not (out / TRACKER).exists() and not list(ckpt.glob("*.partial"))
    assert len(list(ckpt.glob("*.distcp"))) == sum(n.endswith(".distcp") for n in ref)

    summary = finish_and_check(src, out, ref, capsys, *mode)
    assert summary["files_resumed"] == sum(n.endswith(".distcp") for n in ref) - 1  # all but the objects file
    assert summary["chunks"] == 0  # nothing to convert again
    assert not (ckpt / ".metadata.tmp").exists()


def test_a_resumed_run_keeps_the_chunks_of_an_unfinished_file(src, ref, tmp_path, capsys):
    """Chunk-granular resume: a run killed inside a file keeps that file's journaled chunks."""
    plan = plan_of(src)
    n = kill_point_inside_a_file(plan)
    out = tmp_path / "out"
    kill_at(src, out, tmp_path, f"chunk:{n}", "--workers", "1")
    summary = finish_and_check(src, out, ref, capsys)
    assert summary["chunks_kept"] >= 2
    assert summary["chunks_resumed"] == n  # every chunk done before the kill, none twice
    assert summary["chunks"] == len(plan.chunks) - n


def kill_point_inside_a_file(plan) -> int:
    """A count n of chunks after which the file of chunks n-1 and n still waits for chunk n+1."""
    files = [c.file for c in plan.chunks]
    return next(n for n in range(len(files) // 2, len(files) - 1) if files[n - 2] == files[n - 1] == files[n])


def test_a_lost_journal_line_and_a_foreign_partial_file_are_redone(src, ref, tmp_path, capsys):
    """What a crash can leave: the journal's last line cut short (its chunk is done again), a ``.partial``
    file that is not the size this plan gives it (started again), a ``.partial`` of no file of the plan
    (deleted). The result is still the uninterrupted run's bytes."""
    plan = plan_of(src)
    out = tmp_path / "out"
    kill_at(src, out, tmp_path, f"chunk:{kill_point_inside_a_file(plan)}", "--workers", "1")
    journal = out / ".streamconv" / "journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    records = [json.loads(line) for line in lines]
    committed = {r["file"] for r in records if r["t"] == "file"}
    pending = [r for r in records if r["t"] == "chunk" and (r["key"], tuple(r["offsets"])) in
               {(c.key, tuple(c.offsets)) for c in plan.chunks if c.file not in committed}]
    assert len(pending) >= 2, "the kill should leave journaled chunks in an unfinished file"
    last = max(i for i, line in enumerate(lines) if line.startswith('{"t":"chunk"'))
    lines[last] = lines[last][: len(lines[last]) // 2] + "\n"  # its record lost (a torn append)
    journal.write_text("".join(lines))
    committed_file = out / ITER / f"__0_{min(committed)}.distcp"
    foreign = out / ITER / f"__0_{max(c.file for c in plan.chunks)}.distcp.partial"
    foreign.write_bytes(b"\0" * 100)  # the last file of the plan, but not its size
    stray = out / ITER / "__0_999.distcp.partial"  # not part of this plan
    stray.write_bytes(b"\0" * 100)

    summary = finish_and_check(src, out, ref, capsys)
    assert summary["chunks_kept"] == len(pending) - 1
    assert summary["partials_removed"] >= 2 and not stray.exists()
    assert summary["files_resumed"] >= 1 and committed_file.is_file()


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
        assert len(err.splitlines()) == 1 and "holds a finished conversion that is not this one" in err, err
        assert needle in err and "--overwrite" in err, err
        assert output_files(out) == before  # untouched
    # the same command again: resumes a complete output, nothing to redo, the same bytes
    assert convert(src, out) == 0
    assert output_files(out) == before == ref
    # --overwrite starts over
    assert main(["hf2mcore", "--hf-model", str(other), "--megatron-path", str(out), "--quiet", "--overwrite",
                 *SETTINGS]) == 0
    assert main(["verify", "--hf-model", str(other), "--megatron-path", str(out), "--quiet"]) == 0
    assert main(["verify", "--hf-model", str(src), "--megatron-path", str(out), "--quiet"]) == errors.EXIT_MISMATCH


@pytest.fixture(scope="module")
def nemotron_h(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """A Nemotron-H checkpoint (every layer kind, latent MoE, its MTP layers) and an uninterrupted run's files."""
    cfg = json.loads((Path(__file__).parent / "data" / "nemotron_h" / "tiny_hf_config.json").read_text())
    root = tmp_path_factory.mktemp("nh")
    src = make_checkpoint(root / "hf", cfg, seed=4, shards=3, dtype=torch.bfloat16)
    assert convert(src, root / "ref") == 0
    return src, output_files(root / "ref")


def test_a_killed_nemotron_h_conversion_resumes_to_the_same_bytes(nemotron_h, tmp_path, capsys):
    """The hybrid family goes through the same journal: killed after a third of its chunks (in-proj parts, expert
    blocks read from several tensors, MTP layers), then again near the middle of the MTP layers' chunks (they come
    last in plan order), it resumes to the bytes of an uninterrupted run, and verify passes."""
    src, ref = nemotron_h
    plan = plan_of(src)
    out = tmp_path / "out"
    mtp = [i for i, c in enumerate(plan.chunks) if c.key.startswith("mtp.")]
    assert mtp and any(len({r.name for r in c.reads}) > 1 for c in plan.chunks)  # expert chunks read several tensors
    kill_at(src, out, tmp_path, f"chunk:{len(plan.chunks) // 3}")
    assert_never_complete_early(out, ref)
    left = len(plan.chunks) - len(chunks_kept(out, plan, staged=True))
    kill_at(src, out, tmp_path, f"chunk:{max(1, left - (len(plan.chunks) - mtp[len(mtp) // 2]))}")
    assert_never_complete_early(out, ref)
    summary = finish_and_check(src, out, ref, capsys)
    assert summary["chunks_resumed"] > 0
