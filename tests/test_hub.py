"""A hub repo id resolves through huggingface_hub's cache, offline (no weights are ever downloaded in tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from streamconv.reference.synth import llama_config, make_checkpoint

REV = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root, repo_id, files_from):
    """Lay files out exactly as huggingface_hub's cache does: blobs behind snapshots/<rev>, refs/main."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True)
    for f in files_from.iterdir():
        shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return snap


def run(args, cache):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "streamconv", *args], capture_output=True, text=True, env=env)


def test_repo_id_from_offline_cache(tmp_path):
    src = make_checkpoint(tmp_path / "src", llama_config(), shards=2)
    fake_hub_cache(tmp_path / "cache", "nvidia/Tiny-Nemotron", src)
    r = run(["hf2mcore", "--hf-model", "nvidia/Tiny-Nemotron", "--megatron-path", str(tmp_path / "out"), "--json"],
            tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "iter_0000000" / ".metadata").is_file()
    assert "nvidia/Tiny-Nemotron" in (tmp_path / "out" / "iter_0000000" / "run_config.yaml").read_text()


def test_repo_id_missing_offline_is_one_clear_line(tmp_path):
    (tmp_path / "cache").mkdir()
    r = run(["hf2mcore", "--hf-model", "nvidia/Not-Here", "--megatron-path", str(tmp_path / "out")], tmp_path / "cache")
    assert r.returncode == 3
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nvidia/Not-Here" in lines[0] and "hub" in lines[0]
    assert "Traceback" not in r.stderr


def test_a_cached_model_converts_when_the_hub_cannot_be_reached(tmp_path):
    """Not offline, but the Hub unreachable (nothing listens at HF_ENDPOINT): a model in the cache is read from
    there, as snapshot_download did; one that is not is one line, exit 4."""
    import socket

    src = make_checkpoint(tmp_path / "src", llama_config(), shards=2)
    fake_hub_cache(tmp_path / "cache", "nvidia/Tiny-Nemotron", src)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HUB_CACHE=str(tmp_path / "cache"), HF_ENDPOINT=f"http://127.0.0.1:{port}",
               STREAMCONV_TEST_HUB_WAIT="0.01", HF_HUB_ETAG_TIMEOUT="1")
    r = subprocess.run([sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", "nvidia/Tiny-Nemotron",
                        "--megatron-path", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "iter_0000000" / ".metadata").is_file()
    r = subprocess.run([sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", "nvidia/Not-Cached",
                        "--megatron-path", str(tmp_path / "out2"), "--quiet"], capture_output=True, text=True, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 4 and len(lines) == 1 and "cannot be reached" in lines[0], r.stderr
