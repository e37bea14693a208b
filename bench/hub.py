#!/usr/bin/env python
"""Converting straight from the Hub against downloading first: `hf2mcore --hf-model owner/name` (streaming range
reads) vs `snapshot_download` (its default workers) followed by a local `hf2mcore` of the cache.

    python bench/hub.py [--gb 1] [--rate 40MB] [--rounds 3] [--workdir DIR]

The Hub is the local stand-in (``streamconv/reference/hub_server.py``: a real HTTP server speaking the Hub's
protocol to the real ``huggingface_hub`` client through ``HF_ENDPOINT``), each connection capped at ``--rate``
bytes per second, serving the bf16 Llama of the benchmarks (``_common.family_config``). Each round runs both, in
alternation, each with an empty ``HF_HOME`` and output folder on the work folder's disk; medians of wall time
(the whole commands), bytes the server sent, and the peak local disk (``HF_HOME`` plus the output, sampled every
50 ms). The outputs are checked byte for byte against each other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

REPO = "bench/Llama-bf16"


def disk_bytes(*folders: Path) -> int:
    total = 0
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_blocks * 512
                except OSError:
                    pass
    return total


class DiskPeak:
    """The most bytes ``folders`` held at once, sampled every 50 ms while running."""

    def __init__(self, *folders: Path):
        self.folders, self.peak, self._stop = folders, 0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, disk_bytes(*self.folders))
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, disk_bytes(*self.folders))


def run(cmd, env) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stderr[-2000:]}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="model size in GB (default 1)")
    ap.add_argument("--rate", default="40MB", help="bytes per second per connection (default 40MB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--workdir", help="where the model, caches and outputs go (default: a folder under /var/tmp)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from streamconv.units import parse_size
    from streamconv.reference.hub_server import Hub

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="streamconv-hub-", dir="/var/tmp"))
    model = c.checkpoint(work, args.gb)
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    hub = Hub({REPO: {"main": model}})
    hub.faults.rate = parse_size(args.rate)
    rows: dict[str, list] = {"stream": [], "download+convert": []}
    with hub.serving() as endpoint:
        for i in range(args.rounds):
            for name in rows:
                home, out = work / f"home-{name[:6]}", work / f"out-{name[:6]}"
                c.rmtree(home)
                c.rmtree(out)
                env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(home)}
                env.pop("HF_HUB_OFFLINE", None)
                env.pop("HF_HUB_CACHE", None)
                sent0 = hub.bytes_sent()
                convert = [sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", REPO, "--megatron-path",
                           str(out), "--quiet", "--connections", str(args.connections)]
                c.settle_memory()
                with DiskPeak(home, out) as peak:
                    if name == "stream":
                        wall = run(convert, env)
                    else:
                        wall = run([sys.executable, "-c", "import sys; from huggingface_hub import snapshot_download; "
                                    "snapshot_download(sys.argv[1])", REPO], env)
                        wall += run(convert, env)
                rows[name].append({"wall": wall, "sent": hub.bytes_sent() - sent0, "peak_disk": peak.peak})
            same = c.same_tensors(work / "out-stream" / "iter_0000000", work / "out-downlo" / "iter_0000000")
            assert same is None, same
            print(json.dumps({k: v[-1] for k, v in rows.items()}), flush=True)
    report = {"machine": c.machine(), "gb": round(size / 1e9, 3), "rate_per_connection": hub.faults.rate,
              "connections": args.connections}
    for name, rs in rows.items():
        report[name] = {"wall": round(c.median([r["wall"] for r in rs]), 2),
                        "sent_x_model": round(c.median([r["sent"] for r in rs]) / size, 3),
                        "peak_disk_gb": round(max(r["peak_disk"] for r in rs) / 1e9, 2)}
    report["stream_vs_download"] = round(report["stream"]["wall"] / report["download+convert"]["wall"], 2)
    print(json.dumps(report, indent=2, default=str))
    if not args.keep and not args.workdir:
        c.rmtree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
