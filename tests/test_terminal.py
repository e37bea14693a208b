"""What a person sees, in a real pseudo-terminal of a given width: the progress display keeps bytes
done/total, rate and ETA on screen unabridged at 80 and 60 columns; status lines come before the bar."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

import pytest
import torch

from streamconv.reference.synth import llama_config, make_checkpoint

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tty") / "hf", llama_config(hidden=128, layers=4, heads=8,
                                                                               kv_heads=2, ffn=320, vocab=512),
                           seed=1, shards=2, dtype=torch.bfloat16)


def run_in_terminal(cmd: list[str], columns: int, rows: int = 24) -> str:
    """``cmd`` with stdin, stdout and stderr on a pseudo-terminal of ``columns`` x ``rows``; what it drew."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "STREAMCONV_PROGRESS")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            proc.kill()
            raise AssertionError("no output for 60 s")
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(master)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")[-2000:]
    return b"".join(chunks).decode(errors="replace")


def screen_lines(raw: str) -> list[str]:
    """The lines as they end up (each frame's redraw separated; escape codes removed)."""
    text = ANSI.sub("", raw).replace("\r\n", "\n")
    return [line.split("\r")[-1].rstrip() for line in text.split("\n")]


@pytest.mark.parametrize("columns", [80, 60])
def test_the_progress_keeps_its_essentials_at_narrow_widths(src, tmp_path, columns):
    out = tmp_path / f"out{columns}"
    raw = run_in_terminal([sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(src), "--megatron-path",
                           str(out), "--distcp-size", "256KiB"], columns)
    lines = screen_lines(raw)
    assert lines[0].startswith("streamconv: hf2mcore: reading the headers of")  # said at once, before torch loads
    assert any(line.startswith("streamconv: planned ") for line in lines)
    bars = [i for i, line in enumerate(lines) if line.startswith("hf2mcore ")]
    assert bars, raw[-2000:]
    final, status = lines[bars[-1]], lines[bars[-1] + 1]
    drawn = [line for i in bars for line in lines[i:i + 2]]  # every frame of the display: two lines each
    assert all(len(line) <= columns for line in drawn), [line for line in drawn if len(line) > columns]
    assert re.search(r"(\d+(\.\d+)?)/\1 (KiB|MiB)", final), final  # done = total, unabridged
    assert re.search(r"\d+(\.\d+)? (B|KiB|MiB|GiB)/s", final) and "0:00:00" in final, final  # rate and ETA
    assert "…" not in final
    assert re.search(r"(\d+)/\1 source tensors, (\d+)/\2 chunks · mem ", status), status
    assert any(line.startswith("wrote ") for line in lines[bars[-1]:])


@pytest.mark.parametrize("columns", [80, 60])
def test_inspect_and_plan_fit_the_terminal(src, columns):
    """In a terminal the tables fit its width (long names fold inside their cell) and the totals are there."""
    raw = run_in_terminal([sys.executable, "-m", "streamconv", "inspect", str(src)], columns)
    lines = [line for line in screen_lines(raw) if line]
    assert all(len(line) <= columns for line in lines), [line for line in lines if len(line) > columns]
    text = "\n".join(lines)
    for row in ("architecture", "tensors", "parameters", "bytes", "check"):
        assert any(line.lstrip().startswith(row) for line in lines), (row, text[-1500:])
    assert "ok: every tensor the mapping needs" in text.replace("\n", " ") or "ok:" in text
    raw = run_in_terminal([sys.executable, "-m", "streamconv", "plan", "--hf-model", str(src), "--layers"], columns)
    lines = [line for line in screen_lines(raw) if line]
    assert all(len(line) <= columns for line in lines), [line for line in lines if len(line) > columns]
    assert any("memory budget" in line for line in lines) and any("parameters" in line for line in lines)
