"""hf2mcore straight from the Hub: the real huggingface_hub client against a local server speaking the Hub's
protocol (streamconv/reference/hub_server.py, HF_ENDPOINT), with faults injected. No weight byte goes to HF_HOME; the output
is the conversion of the same model from a local folder, byte for byte."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamconv.reference.hub_server import Hub
from streamconv.cli import main
from streamconv.reference.synth import llama_config, make_checkpoint

REPO = "nvidia/Tiny-Nemotron"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two commits of one model (other weights), and its local conversion."""
    root = tmp_path_factory.mktemp("hub")
    cfg = llama_config(hidden=64, layers=2, heads=8, kv_heads=2, ffn=160, vocab=256)
    first = make_checkpoint(root / "first", cfg, seed=1, shards=3)
    second = make_checkpoint(root / "second", cfg, seed=2, shards=3)
    assert main(["hf2mcore", "--hf-model", str(first), "--megatron-path", str(root / "local"), "--quiet",
                 "--max-memory", "64KiB"]) == 0
    return first, second, root / "local"


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def checkpoint_bytes(out: Path) -> dict[str, bytes]:
    """The torch_dist part of an output (run_config.yaml names its source, so it differs by design)."""
    ckpt = out / "iter_0000000"
    return {p.name: p.read_bytes() for p in ckpt.iterdir() if p.suffix == ".distcp" or p.name == ".metadata"}


def launch(endpoint: str, home: Path, out: Path, *extra, **env) -> subprocess.Popen:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "STREAMCONV_TEST_HUB_WAIT": "0.01",
           **env}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_HUB_CACHE", None)
    return subprocess.Popen([sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", REPO, "--megatron-path",
                             str(out), "--max-memory", "64KiB", "--json", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def convert(endpoint: str, home: Path, out: Path, *extra) -> tuple[int, dict | None, str]:
    p = launch(endpoint, home, out, *extra)
    stdout, stderr = p.communicate(timeout=300)
    return p.returncode, (json.loads(stdout) if p.returncode == 0 else None), stderr


def half_way(model: Path) -> int:
    """The chunk of the plan (at the tests' --max-memory) where half of the model's bytes are done."""
    from streamconv.inputs import chunk_bytes_for, import_plan_for
    from streamconv.models.config import load_config, spec_from_config
    from streamconv.sources.safetensors import SafetensorsSource

    with_source = SafetensorsSource(model)
    plan = import_plan_for(with_source, spec_from_config(load_config(model)), None, chunk_bytes_for(64 * 1024))
    with_source.close()
    n, done = 0, 0
    while done < plan.total_bytes / 2:
        done += plan.chunks[n].nbytes
        n += 1
    return n


def no_weights_in(home: Path, model: Path) -> bool:
    """HF_HOME holds no weight byte: nothing there as large as the smallest shard, no .safetensors blob."""
    smallest = min(p.stat().st_size for p in model.glob("*.safetensors"))
    files = [p for p in home.rglob("*") if p.is_file()]
    return all(p.stat().st_size < smallest and not p.name.endswith(".safetensors") for p in files)


def test_a_hub_id_streams_the_weights_and_writes_only_the_output(models, tmp_path):
    first, _, local = models
    hub = Hub({REPO: {"main": first}})
    with hub.serving() as endpoint:
        rc, summary, err = convert(endpoint, tmp_path / "home", tmp_path / "out")
    assert rc == 0, err
    assert checkpoint_bytes(tmp_path / "out") == checkpoint_bytes(local)
    assert no_weights_in(tmp_path / "home", first)
    assert hub.bytes_sent() <= 1.1 * weights_bytes(first)
    assert summary["hub"]["sha"] == hub.repos[REPO]["main"] and summary["hub"]["retries"] == 0
    assert summary["hub"]["bytes_fetched"] == hub.bytes_sent()
    weights = [r for r in hub.requests if r.split()[1].endswith(".safetensors")]
    assert weights and all(r.startswith("GET") and "bytes=" in r for r in weights)  # ranges only, never a whole file


def test_dropped_bodies_503_and_429_are_survived(models, tmp_path):
    first, _, local = models
    hub = Hub({REPO: {"main": first}})
    shards = sorted(p.name for p in first.glob("*.safetensors"))
    hub.faults.drop_after = {shards[0]: [3, 5000, 20000], shards[1]: [100]}
    hub.faults.status = {shards[1]: [503, 503], shards[2]: [429]}
    hub.faults.retry_after = "0"
    with hub.serving() as endpoint:
        rc, summary, err = convert(endpoint, tmp_path / "home", tmp_path / "out")
    assert rc == 0, err
    assert checkpoint_bytes(tmp_path / "out") == checkpoint_bytes(local)
    assert summary["hub"]["retries"] >= 4  # the four broken bodies, each asked for again from where it stopped
    assert hub.bytes_sent() <= 1.1 * weights_bytes(first)
    assert not hub.faults.drop_after[shards[0]] and not hub.faults.status[shards[1]]  # every fault fired


def test_a_byte_flipped_in_transit_is_caught_and_nothing_wrong_is_kept(models, tmp_path):
    """One byte flipped in what the Hub sends: the shard's SHA-256 differs, the run ends in one line with nothing
    committed and the .distcp files made from that shard removed; the same command then converts it right."""
    first, _, local = models
    hub = Hub({REPO: {"main": first}})
    shard = sorted(p.name for p in first.glob("*.safetensors"))[1]
    hub.faults.flip = {shard: (first / shard).stat().st_size - 5}  # inside the shard's last tensor
    with hub.serving() as endpoint:
        rc, _, err = convert(endpoint, tmp_path / "home", tmp_path / "out")
        lines = err.strip().splitlines()
        assert rc == 3 and len(lines) == 1 and "SHA-256" in lines[0] and shard in lines[0], err
        assert not (tmp_path / "out" / "iter_0000000" / ".metadata").exists()
        assert not hub.faults.flip  # it fired
        rc, summary, err = convert(endpoint, tmp_path / "home", tmp_path / "out")
    assert rc == 0, err
    assert summary["hub"]["shards_checked"] == 3 and summary["hub"]["bytes_refetched"] < weights_bytes(first) / 10
    assert checkpoint_bytes(tmp_path / "out") == checkpoint_bytes(local)


def test_a_hub_that_stays_unreachable_is_one_line_exit_4_and_nothing_looks_complete(models, tmp_path):
    first, _, _ = models
    hub = Hub({REPO: {"main": first}})
    shard = sorted(p.name for p in first.glob("*.safetensors"))[-1]
    hub.faults.status = {shard: [503] * 500}
    with hub.serving() as endpoint:
        rc, _, err = convert(endpoint, tmp_path / "home", tmp_path / "out")
    lines = err.strip().splitlines()
    assert rc == 4 and len(lines) == 1 and REPO in lines[0] and "cannot be reached" in lines[0], err
    assert not (tmp_path / "out" / "iter_0000000" / ".metadata").exists()
    assert not (tmp_path / "out" / "latest_checkpointed_iteration.txt").exists()


@pytest.mark.parametrize("status,needle", [(404, "not in the repository"), (401, "log in")])
def test_a_missing_or_forbidden_file_is_one_line_that_says_what_to_do(models, tmp_path, status, needle):
    first, _, _ = models
    hub = Hub({REPO: {"main": first}})
    shard = sorted(p.name for p in first.glob("*.safetensors"))[1]
    hub.faults.status = {shard: [status] * 50}
    with hub.serving() as endpoint:
        rc, _, err = convert(endpoint, tmp_path / "home", tmp_path / "out")
    lines = err.strip().splitlines()
    assert rc == 3 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


def test_an_unknown_repo_or_revision_is_one_line(models, tmp_path):
    first, _, _ = models
    hub = Hub({REPO: {"main": first}})
    with hub.serving() as endpoint:
        rc, _, err = convert(endpoint, tmp_path / "home", tmp_path / "out", "--revision", "no-such-branch")
    assert rc == 3 and len(err.strip().splitlines()) == 1 and "no such revision" in err, err


def test_a_killed_run_resumes_on_its_pinned_commit_after_the_branch_moved(models, tmp_path):
    """Killed at half, then main moves to another commit: the re-run says so, finishes the commit it started
    from (what it kept and what it fetches agree), and the Hub sent at most 1.6x the model in all."""
    first, second, local = models
    hub = Hub({REPO: {"main": first}})
    out, home = tmp_path / "out", tmp_path / "home"
    with hub.serving() as endpoint:
        marker = tmp_path / "paused"
        p = launch(endpoint, home, out, "--connections", "1", STREAMCONV_TEST_PAUSE=f"chunk:{half_way(first)}",
                   STREAMCONV_TEST_PAUSE_FILE=str(marker))
        while not marker.exists():  # the run's own progress decides when, not a timer
            assert p.poll() is None, p.communicate()[1]
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        before = hub.bytes_sent()
        assert 0.4 * weights_bytes(first) < before < weights_bytes(first)  # (reads run ahead of the journal)
        hub.set_branches(REPO, {"main": second})
        rc, summary, err = convert(endpoint, home, out)
    assert rc == 0, err
    assert summary["hub"]["revision_now_at"] == hub.repos[REPO]["main"] != summary["hub"]["sha"]
    assert summary["chunks_resumed"] >= half_way(first)
    assert checkpoint_bytes(out) == checkpoint_bytes(local)
    assert hub.bytes_sent() <= 1.6 * weights_bytes(first)


def test_a_fully_cached_model_is_read_from_the_cache(models, tmp_path):
    """--download-first fills the cache; a later run finds every weight there and reads none over HTTP."""
    first, _, local = models
    hub = Hub({REPO: {"main": first}})
    home = tmp_path / "home"
    with hub.serving() as endpoint:
        rc, summary, err = convert(endpoint, home, tmp_path / "a", "--download-first")
        assert rc == 0 and "hub" not in summary, err
        sent = hub.bytes_sent()
        assert sent >= weights_bytes(first)  # downloaded whole, once
        rc, summary, err = convert(endpoint, home, tmp_path / "b")
        assert rc == 0 and "hub" not in summary, err
        assert hub.bytes_sent() == sent  # nothing fetched again
    assert checkpoint_bytes(tmp_path / "a") == checkpoint_bytes(local) == checkpoint_bytes(tmp_path / "b")
    # a cached shard that is not the blob the Hub records (its SHA-256 names the blob): streamed instead
    blob = next((home / "hub").rglob(f"snapshots/*/{sorted(p.name for p in first.glob('*.safetensors'))[0]}")).resolve()
    blob.rename(blob.with_name("0" * 64))
    with hub.serving() as endpoint:
        rc, summary, err = convert(endpoint, home, tmp_path / "c")
    assert rc == 0 and summary["hub"]["bytes_fetched"] >= weights_bytes(first), err
    assert checkpoint_bytes(tmp_path / "c") == checkpoint_bytes(local)
    shutil.rmtree(home)


def test_verify_reads_a_hub_id_over_http_too(models, tmp_path):
    first, _, local = models
    hub = Hub({REPO: {"main": first}})
    with hub.serving() as endpoint:
        env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "home"),
               "STREAMCONV_TEST_HUB_WAIT": "0.01"}
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("HF_HUB_CACHE", None)
        r = subprocess.run([sys.executable, "-m", "streamconv", "verify", "--hf-model", REPO, "--megatron-path",
                            str(local), "--json"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["items_checked"] > 0
    assert no_weights_in(tmp_path / "home", first)
    assert weights_bytes(first) * 0.9 <= hub.bytes_sent() <= 1.1 * weights_bytes(first)


def hub_env(endpoint: str, home: Path) -> dict:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "STREAMCONV_TEST_HUB_WAIT": "0.01"}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_HUB_CACHE", None)
    return env


def test_inspect_reads_a_hub_id_from_its_headers(models, tmp_path):
    first, _, _ = models
    hub = Hub({REPO: {"main": first}})
    with hub.serving() as endpoint:
        r = subprocess.run([sys.executable, "-m", "streamconv", "inspect", REPO, "--json"],
                           env=hub_env(endpoint, tmp_path / "home"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["path"] == f"{REPO}@{hub.repos[REPO]['main']}" and report["architecture"] == "LlamaForCausalLM"
    assert len(report["tensors"]) == 21 and report["convertible"] is not False
    assert hub.bytes_sent() < 0.05 * weights_bytes(first)  # headers only
    assert no_weights_in(tmp_path / "home", first)


def test_under_torchrun_each_rank_reads_its_own_files_from_the_hub(models, tmp_path):
    first, _, local = models
    hub = Hub({REPO: {"main": first}})
    with hub.serving() as endpoint:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "streamconv", "hf2mcore", "--hf-model", REPO, "--megatron-path", str(tmp_path / "out"),
                            "--max-memory", "64KiB", "--distcp-size", "64KiB", "--json"],
                           env={**hub_env(endpoint, tmp_path / "home"), "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["processes"] == 2 and all(rank["bytes"] > 0 for rank in summary["ranks"])
    assert hub.bytes_sent() <= 1.1 * weights_bytes(first)
    assert no_weights_in(tmp_path / "home", first)
    # the same tensors as the local conversion (a smaller --distcp-size lays them out in more files)
    assert main(["verify", "--hf-model", str(first), "--megatron-path", str(tmp_path / "out"), "--quiet"]) == 0


@pytest.mark.parametrize("method", ["FP8", "FP8_PB_WO"])
def test_an_fp8_checkpoint_streams_and_dequantizes_as_from_a_folder(models, tmp_path, method):
    """Model Optimizer's FP8 layout from the Hub: hf_quant_config.json comes with the small files, the scales are
    read over HTTP, each weight dequantized as from a local folder, byte for byte."""
    from streamconv.reference.synth import quantize_checkpoint

    first, _, _ = models
    fp8 = quantize_checkpoint(first, tmp_path / "fp8", method, block=(32, 32))
    assert main(["hf2mcore", "--hf-model", str(fp8), "--megatron-path", str(tmp_path / "local"), "--quiet",
                 "--max-memory", "64KiB"]) == 0
    hub = Hub({REPO: {"main": fp8}})
    with hub.serving() as endpoint:
        rc, summary, err = convert(endpoint, tmp_path / "home", tmp_path / "out")
    assert rc == 0, err
    assert summary["quantization"]["method"] == method and summary["hub"]["shards_checked"] >= 1
    assert checkpoint_bytes(tmp_path / "out") == checkpoint_bytes(tmp_path / "local")
    assert no_weights_in(tmp_path / "home", fp8)
