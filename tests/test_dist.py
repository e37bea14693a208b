"""Scale-out: ``torchrun --nproc-per-node N -m streamconv hf2mcore|mcore2hf`` (gloo, CPU processes).

Judged as a single-process run is: real megatron-core loads the output at default strictness and its logits
equal the reference; the output is byte for byte the single-process output (the layout does not depend on
the number of processes); the export is bit-exact; a rank SIGKILLed mid-run leaves no commit, and the same
launch (or another number of processes) resumes to the same bytes; a fault one rank meets stops every rank,
each with one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from streamconv import crashpoints
from streamconv.runtime import dist
from streamconv.cli import main
from streamconv.reference.synth import llama_config, make_checkpoint, mixed_decilm_config

mh = pytest.importorskip("mcore_harness")

SETTINGS = ["--distcp-size", "64KiB"]  # many files, so that every rank has several
ITER = "iter_0000000"


def torchrun(n: int, *args, **env) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           "-m", "streamconv", *args]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_torchrun(n: int, *args, **env) -> tuple[int, str, str]:
    proc = torchrun(n, *args, **env)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def hf2mcore_args(src, out, *extra) -> list[str]:
    return ["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), *SETTINGS, *extra]


def output_files(out: Path) -> dict[str, bytes]:
    """Every file of a conversion but the state folder; run_config.yaml with the output path taken out."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and ".streamconv" not in p.parts:
            data = p.read_bytes()
            if p.name == "run_config.yaml":
                data = data.replace(str(out.resolve()).encode(), b"<out>")
            files[str(p.relative_to(out))] = data
    return files


def streamconv_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(("error:", "internal error:"))]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the job ended first (rc {proc.returncode}): {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    while len(path.read_text().split()) < 2:  # written in one call, but read it whole
        time.sleep(0.01)


def test_split_is_contiguous_balanced_and_whole():
    sizes = {f: s for f, s in enumerate([5, 1, 1, 1, 4, 4, 2, 2, 8, 1])}
    for world in (1, 2, 3, 4, 16):
        parts = dist.split(sizes, world)
        assert len(parts) == world
        assert sorted(f for p in parts for f in p) == sorted(sizes)  # every file, once
        order = [r for f in sorted(sizes) for r, p in enumerate(parts) if f in p]
        assert order == sorted(order)  # contiguous runs, in file order
    two = dist.split(sizes, 2)
    assert abs(sum(sizes[f] for f in two[0]) - sum(sizes[f] for f in two[1])) <= 8  # within one file
    assert dist.split({0: 10, 1: 10, 2: 10, 3: 10}, 2) == [{0, 1}, {2, 3}]


CASES = {
    "llama": lambda: llama_config(hidden=64, layers=3, heads=8, kv_heads=2, ffn=160, vocab=320),
    "decilm": lambda: {**mixed_decilm_config(hidden=64, heads=8, vocab=256), "torch_dtype": "float32"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_convert_and_export_what_one_does(tmp_path, case, capsys):
    cfg = CASES[case]()
    src = make_checkpoint(tmp_path / "hf", cfg, seed=7, shards=3)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(hf2mcore_args(src, one, "--quiet")) == 0

    rc, out, err = run_torchrun(2, *hf2mcore_args(src, two, "--json"))
    assert rc == 0, err[-3000:]
    summary = json.loads(out)  # rank 0 alone prints it
    assert summary["processes"] == 2 and [r["rank"] for r in summary["ranks"]] == [0, 1]
    assert all(r["bytes"] > 0 for r in summary["ranks"])  # both ranks worked
    assert summary["bytes"] == sum(r["bytes"] for r in summary["ranks"])
    job_figures(summary)
    assert streamconv_lines(err) == []
    assert output_files(two) == output_files(one)  # byte for byte, .metadata included
    assert sorted(p.name for p in (two / ".streamconv").glob("journal*")) == ["journal.rank0.jsonl",
                                                                            "journal.rank1.jsonl"]

    ckpt = two / ITER
    tokens = torch.randint(0, cfg["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    model = mh.build_hetero_gpt(cfg) if case == "decilm" else mh.build_gpt(cfg)
    assert mh.checkpoint_keys(ckpt) - {"common_state/shard_0_1"} == mh.model_checkpoint_keys(model)
    mh.load_checkpoint(model, ckpt, check_extra=False)  # default strictness
    from streamconv.reference.forward import reference_logits

    weights = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert (mh.logits(model, tokens) - reference_logits(cfg, weights, tokens)).abs().max().item() <= 1e-4

    hf = tmp_path / "back"
    rc, out, err = run_torchrun(2, "mcore2hf", "--megatron-path", str(two), "--hf-path", str(hf),
                                "--max-shard-size", "60KB", "--json")
    assert rc == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["shards"] >= 4 and all(r["bytes"] > 0 for r in summary["ranks"])
    assert summary["seconds"] >= summary["engine_seconds"] == max(r["engine_seconds"] for r in summary["ranks"])
    assert summary["peak_in_flight_bytes"] == max(r["peak_in_flight_bytes"] for r in summary["ranks"]) > 0
    back = {k: v for f in sorted(hf.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert sorted(back) == sorted(weights)
    for name, t in weights.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name].view(torch.uint8), t.view(torch.uint8)), name
    assert (hf / "model.safetensors.index.json").is_file() and not (hf / ".streamconv-mcore2hf.json").exists()


def job_figures(summary: dict) -> None:
    """A distributed hf2mcore's summary describes the job, not rank 0: its time covers every rank's, CPU and
    phases are summed over ranks, peaks are the highest."""
    ranks = summary["ranks"]
    assert summary["seconds"] >= max(r["seconds"] for r in ranks)
    assert summary["engine_seconds"] == max(r["engine_seconds"] for r in ranks)
    assert summary["cpu_seconds"] == pytest.approx(sum(r["cpu_seconds"] for r in ranks), abs=0.002)
    for k, v in summary["phases"].items():
        assert v == pytest.approx(sum(r["phases"][k] for r in ranks), abs=0.002), k
    assert summary["peak_in_flight_bytes"] == max(r["peak_in_flight_bytes"] for r in ranks) > 0
    assert summary["conversion_peak_rss_bytes"] == max(r["conversion_peak_rss_bytes"] for r in ranks)


def test_idle_note_names_the_ranks_without_files_and_a_size_that_gives_each_some():
    assert dist.idle_note(dist.split({0: 10, 1: 10}, 2), "shard", "--max-shard-size", 20) is None
    one = dist.split({0: 3 * 2**30}, 2)
    assert dist.idle_note(one, "shard", "--max-shard-size", 3 * 2**30) == (
        "1 shard for 2 processes: rank 0 has nothing to write (--max-shard-size 1536MiB or less gives every rank "
        "some)")
    note = dist.idle_note(dist.split({0: 300_000, 1: 300_000}, 4), ".distcp file", "--distcp-size", 600_000)
    assert note.startswith("2 .distcp files for 4 processes: rank ") and " have nothing to write (--distcp-size " \
        "146KiB or less" in note


def test_an_export_with_fewer_shards_than_ranks_says_so_and_its_hint_gives_every_rank_a_shard(llama, tmp_path):
    import re

    src = llama[0]
    ckpt = tmp_path / "ckpt"
    assert main(hf2mcore_args(src, ckpt, "--quiet")) == 0
    rc, out, err = run_torchrun(2, "mcore2hf", "--megatron-path", str(ckpt), "--hf-path", str(tmp_path / "a"),
                                STREAMCONV_PROGRESS="1")
    assert rc == 0, err[-3000:]
    line = next(x for x in err.splitlines() if "for 2 processes" in x)
    assert "1 shard for 2 processes: rank 0 has nothing to write" in line  # said once, by rank 0
    assert err.count("for 2 processes") == 1
    size = re.search(r"--max-shard-size (\S+) or less", line).group(1)
    rc, out, err = run_torchrun(2, "mcore2hf", "--megatron-path", str(ckpt), "--hf-path", str(tmp_path / "b"),
                                "--max-shard-size", size, "--json")
    assert rc == 0, err[-3000:]
    assert all(r["bytes"] > 0 for r in json.loads(out)["ranks"])  # the hint holds: both ranks worked
    a = {k: v for f in sorted((tmp_path / "a").glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted((tmp_path / "b").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A Llama source and the files one process makes of it."""
    base = tmp_path_factory.mktemp("dist")
    src = make_checkpoint(base / "hf", llama_config(hidden=64, layers=4, heads=8, kv_heads=2, ffn=160, vocab=320),
                          seed=9, shards=3, dtype=torch.bfloat16)
    assert main(hf2mcore_args(src, base / "one", "--quiet")) == 0
    return src, output_files(base / "one")


def plan_of(src: Path, source=None):
    """The plan a conversion of ``src`` with SETTINGS makes."""
    from streamconv.sources.safetensors import SafetensorsSource
    from streamconv.inputs import import_plan_for as build_plan
    from streamconv.models.config import load_config, spec_from_config
    from streamconv.plan.build import DEFAULT_CHUNK_BYTES
    from streamconv.units import parse_size

    own = source is None
    source = source or SafetensorsSource(src)
    try:
        return build_plan(source, spec_from_config(load_config(src)), None, DEFAULT_CHUNK_BYTES,
                          file_bytes=parse_size(SETTINGS[1]))
    finally:
        if own:
            source.close()


def test_rank_0_alone_shows_the_whole_jobs_progress(llama, tmp_path):
    import re

    src = llama[0]
    plan = plan_of(src)
    rc, out, err = run_torchrun(2, *hf2mcore_args(src, tmp_path / "out"), STREAMCONV_PROGRESS="1", COLUMNS="200")
    assert rc == 0, err[-3000:]
    lines = err.splitlines()
    bars = [i for i, line in enumerate(lines) if line.startswith("hf2mcore ")]
    assert len(bars) == 1, err[-3000:]  # one display: rank 0's; the other rank draws nothing
    n = len(plan.chunks)
    assert f"{n}/{n} chunks" in lines[bars[0] + 1]  # every rank's chunks, counted on rank 0
    bars = [lines[bars[0]]]
    done, total, unit = re.search(r"([\d.]+)/([\d.]+) (KiB|MiB)", bars[0]).groups()
    assert done == total and abs(float(total) - plan.total_bytes / {"KiB": 2**10, "MiB": 2**20}[unit]) < 0.1
    assert out.count("wrote ") == 1 and "with 2 processes" in out


def kill_rank(src, out, tmp_path, rank: int, point: str) -> str:
    """Launch 2 processes, SIGKILL ``rank`` when it reaches ``point``; the job's stderr."""
    marker = tmp_path / f"paused-{rank}"
    proc = torchrun(2, *hf2mcore_args(src, out, "--quiet"), STREAMCONV_TEST_PAUSE=point,
                    STREAMCONV_TEST_RANK=str(rank), STREAMCONV_TEST_PAUSE_FILE=str(marker))
    wait_for(marker, proc)
    os.kill(int(marker.read_text().split()[1]), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    return err


@pytest.mark.parametrize("relaunch", [2, 3, 1], ids=["same-launch", "three-processes", "one-process"])
def test_a_killed_rank_stops_the_job_and_the_launch_resumes(llama, tmp_path, capsys, relaunch):
    src, ref = llama
    out = tmp_path / "out"
    err = kill_rank(src, out, tmp_path, 1, "chunk:3")
    survivor = [line for line in streamconv_lines(err) if line.startswith("error: rank 0:")]
    assert len(survivor) == 1 and "rank 1 ended unexpectedly" in survivor[0], err[-3000:]
    assert not (out / ITER / ".metadata").exists() and not (out / "latest_checkpointed_iteration.txt").exists()
    assert (out / ".streamconv" / "journal.rank1.jsonl").read_text().count('"t":"chunk"') >= 3

    if relaunch > 1:
        recheck = ("--recheck",) if relaunch == 2 else ()  # each rank rechecks the sources of what it keeps
        rc, stdout, err = run_torchrun(relaunch, *hf2mcore_args(src, out, "--json", *recheck))
        assert rc == 0, err[-3000:]
        summary = json.loads(stdout)
        assert len(summary["ranks"]) == relaunch
        if relaunch == 2:
            assert summary["ranks"][1]["chunks_resumed"] >= 3  # rank 1 kept what it had journaled
            assert [r["rechecked_chunks"] for r in summary["ranks"]] == [r["chunks_resumed"] for r in summary["ranks"]]
        else:  # another number of processes: the files committed are kept, the rest redone
            assert sorted(p.name for p in (out / ".streamconv").glob("journal*")) == [
                f"journal.rank{r}.jsonl" for r in range(relaunch)]
    else:
        capsys.readouterr()
        assert main(hf2mcore_args(src, out, "--json")) == 0
        summary = json.loads(capsys.readouterr().out)
        assert sorted(p.name for p in (out / ".streamconv").glob("journal*")) == ["journal.jsonl"]
    assert summary["files_resumed"] >= 1
    assert output_files(out) == ref
    assert main(["verify", "--hf-model", str(src), "--megatron-path", str(out), "--quiet"]) == 0


def test_without_torchrun_as_srun_starts_it_a_killed_rank_still_stops_the_job(llama, tmp_path):
    """Processes started with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT only (as srun with torchrun's
    variables exported): no agent to kill the others; rank 0 sees rank 1's death through the heartbeat and
    stops by itself, naming it. The same launch then finishes the job."""
    import socket

    src, ref = llama
    out = tmp_path / "out"

    def launch(**extra) -> list[subprocess.Popen]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", **extra}
        return [subprocess.Popen([sys.executable, "-m", "streamconv", *hf2mcore_args(src, out, "--quiet")],
                                 env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for r in range(2)]

    marker = tmp_path / "paused"
    procs = launch(STREAMCONV_TEST_PAUSE="chunk:2", STREAMCONV_TEST_RANK="1", STREAMCONV_TEST_PAUSE_FILE=str(marker))
    wait_for(marker, procs[0])
    os.kill(int(marker.read_text().split()[1]), signal.SIGKILL)
    _, err = procs[0].communicate(timeout=120)
    procs[1].communicate(timeout=120)
    assert procs[0].returncode == 1
    assert streamconv_lines(err) == ["error: rank 0: stopped: rank 1 ended unexpectedly (killed or crashed); nothing "
                                     "was committed, re-run the same command to resume"]
    assert not (out / ITER / ".metadata").exists()

    procs = launch()
    for proc in procs:
        proc.communicate(timeout=120)
        assert proc.returncode == 0
    assert output_files(out) == ref


def test_a_fault_one_rank_meets_stops_every_rank_with_one_line_each(llama, tmp_path):
    """Rank 1 is held before its first chunk; a shard is cut short past every byte rank 0 reads of it but
    before bytes rank 1 reads; rank 1 goes on, fails on the read, and rank 0 stops with rank 1's line."""
    import shutil

    from streamconv.sources.safetensors import SafetensorsSource

    src = Path(shutil.copytree(llama[0], tmp_path / "hf"))
    source = SafetensorsSource(src)
    plan = plan_of(src, source)
    parts = dist.split(plan.file_bytes(), 2)
    ends: list[dict] = [{}, {}]  # per rank: shard -> the end of the last byte it reads there
    for rank, part in enumerate(parts):
        for c in plan.chunks:
            if c.file in part:
                for r in c.reads:
                    path, off, n = source.extent(r.name, r.row0, r.row1, r.index)
                    ends[rank][path] = max(ends[rank].get(path, 0), off + n)
    source.close()
    victim, cut = next((path, ends[0].get(path, 0)) for path, end in sorted(ends[1].items())
                       if end > ends[0].get(path, 0))

    marker = tmp_path / "held"
    proc = torchrun(2, *hf2mcore_args(src, tmp_path / "out", "--quiet"), STREAMCONV_TEST_PAUSE="work",
                    STREAMCONV_TEST_PAUSE_CONTINUE="1", STREAMCONV_TEST_RANK="1",
                    STREAMCONV_TEST_PAUSE_FILE=str(marker))
    wait_for(marker, proc)
    held = int(marker.read_text().split()[1])
    crashpoints.wait_stopped(held)  # else the SIGCONT below may come before the stop, and be lost
    os.truncate(victim, cut)
    os.kill(held, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    lines = streamconv_lines(err)
    assert len(lines) == 2, err[-3000:]
    mine = next(line for line in lines if line.startswith("error: rank 1:"))
    theirs = next(line for line in lines if line.startswith("error: rank 0:"))
    assert "truncated" in mine and victim.name in mine
    assert theirs.startswith("error: rank 0: stopped: rank 1 failed: ") and mine.split(": ", 2)[2] in theirs
    assert "exitcode  : 3" in err  # the bad-input code (torchrun may stop the other rank before it exits by itself)
    assert not (tmp_path / "out" / ITER / ".metadata").exists()


def test_ranks_that_see_other_inputs_are_refused(llama, tmp_path):
    """A rank whose planning fails (here: every rank, on a missing folder) says so; none starts."""
    rc, _, err = run_torchrun(2, *hf2mcore_args(tmp_path / "nowhere", tmp_path / "out", "--quiet"))
    assert rc != 0
    lines = streamconv_lines(err)
    assert len(lines) == 2 and all("no such folder" in line for line in lines), err[-3000:]
    assert {line.split(":")[1].strip() for line in lines} == {"rank 0", "rank 1"}


def test_ranks_given_different_output_folders_refuse_before_writing(llama, tmp_path):
    """The srun recipe run from two working directories with a relative --megatron-path: each rank would write
    its files into its own folder and rank 0 would commit a checkpoint missing rank 1's. Every rank stops in
    one line; neither folder gets a checkpoint."""
    import socket

    src, _ = llama
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2", "PYTHONPATH": os.pathsep.join(sys.path)}
    dirs = [tmp_path / "node0", tmp_path / "node1"]
    procs = []
    for r, d in enumerate(dirs):
        d.mkdir()
        procs.append(subprocess.Popen([sys.executable, "-m", "streamconv", *hf2mcore_args(src, "out", "--quiet")],
                                      cwd=d, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], errs
    for err in errs:
        mine = streamconv_lines(err)
        assert len(mine) == 1 and "output folder" in mine[0], err
    for d in dirs:
        assert not (d / "out" / ITER / ".metadata").exists() and not list((d / "out").rglob("*.distcp"))


def test_a_job_refused_the_output_lock_says_so_on_every_rank(llama, tmp_path):
    """Another streamconv holds the folder: rank 0 is refused the lock, and rank 1 reports rank 0's line, not
    a rank that "ended unexpectedly"."""
    import fcntl

    src, _ = llama
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ".streamconv.lock", os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"4242\n", 0)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        rc, _, err = run_torchrun(2, *hf2mcore_args(src, out, "--quiet"))
    finally:
        os.close(fd)
    mine = streamconv_lines(err)
    assert rc != 0 and any("rank 0:" in line and "pid 4242" in line for line in mine), err
    assert any(line.startswith("error: rank 1: stopped: rank 0 failed:") and "pid 4242" in line for line in mine), err
    assert not any("ended unexpectedly" in line for line in mine), err
