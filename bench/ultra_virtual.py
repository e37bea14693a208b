#!/usr/bin/env python
"""(3) The real Llama-Nemotron Ultra-253B plan through the engine, ~506 GB of traffic, no disk.

    python bench/ultra_virtual.py [--max-memory 512MiB] [--workers 2] [--verify-every 200] [--limit-gb N]

The plan is the one ``streamconv hf2mcore`` makes for Ultra-253B (its published config.json, bf16, chunk
size from the budget): 162 heterogeneous layers, four FFNs wider than 300k rows whose fused ``linear_fc1``
is up to 28 GB, converted in budget-sized pieces. The source is ``streamconv.sources.virtual.VirtualSource``
(deterministic values made on the fly for every read), the sink ``DigestSink`` (a CRC-32 over every output
byte in plan order, then discarded; every ``--verify-every``-th chunk, about, is rebuilt independently and
compared bit for bit). Reports throughput, wall time, the peak RSS of the process (getrusage) and of the
engine run alone (start-up excluded), RSS sampled every second while it runs (flat), and the digest.
``--limit-gb`` runs only the first N GB of the plan (a quick check); ``--runs`` repeats (default 1: the
full plan takes a while).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

CONFIG = c.ROOT / "streamconv" / "configs" / "llama-3_1-nemotron-ultra-253b-v1.config.json"


class Sampler:
    """RSS of this process every ``every`` seconds, in a thread."""

    def __init__(self, every: float = 1.0):
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from streamconv.runtime import rss

        while not self._stop.wait(1.0):
            self.samples.append((time.perf_counter() - self._t0, rss.current()))

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join()
        return self.samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(CONFIG), help="config.json of the model (default: Ultra-253B-v1)")
    ap.add_argument("--max-memory", default="512MiB")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--verify-every", type=int, default=200)
    ap.add_argument("--limit-gb", type=float, default=None, help="only the first N GB of the plan")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from streamconv.engine import runner
    from streamconv.runtime import rss
    from streamconv.inputs import chunk_bytes_for
    from streamconv.units import fmt_bytes, parse_size
    from streamconv.models import rules
    from streamconv.models.config import load_config, spec_from_config
    from streamconv.plan.build import describe, import_plan
    from streamconv.runtime.progress import make_progress
    from streamconv.sinks.digest import DigestSink
    from streamconv.sources.virtual import VirtualSource

    budget = parse_size(args.max_memory)
    spec = spec_from_config(load_config(args.config))
    plan = import_plan(spec, {t.name: torch.bfloat16 for t in rules.hf_tensors(spec)}, None,
                       chunk_bytes=chunk_bytes_for(budget))
    d = describe(plan)
    print(f"plan: {d['architecture']}, {d['layers']} layers, {d['parameters'] / 1e9:.3f} B parameters, "
          f"{d['bytes'] / 1e9:.1f} GB, {d['chunks']} chunks of at most {fmt_bytes(d['largest_chunk_bytes'])}, "
          f"largest tensor {d['largest_tensor']} ({d['largest_tensor_bytes'] / 1e9:.1f} GB)")
    if args.limit_gb:
        keep, total = [], 0
        for ch in plan.chunks:
            if total >= args.limit_gb * 1e9:
                break
            keep.append(ch)
            total += ch.nbytes
        plan = dataclasses.replace(plan, chunks=keep)
    source = VirtualSource(spec)
    name = Path(args.config).name.removesuffix(".config.json").removesuffix(".json")  # what the tables call it
    info = c.machine()
    results = []
    for run in range(args.runs):
        sink = DigestSink(plan, source, verify_every=args.verify_every)
        progress = make_progress(False, f"{name} (virtual)", plan.total_bytes, len(plan.chunks), budget, plan=plan)
        rss.reset_peak()
        sampler = Sampler()
        with progress:
            stats = runner.run(plan, source, sink, max_memory=budget, workers=args.workers, progress=progress)
        samples = sampler.stop()
        late = [r for t, r in samples if t > 10] or [r for _, r in samples]
        res = {
            "bytes": sink.bytes, "chunks": sink.chunks, "seconds": round(stats.seconds, 1),
            "gb_per_s": round(sink.bytes / 1e9 / stats.seconds, 3),
            "peak_rss_bytes": rss.run_peak(), "engine_peak_rss_bytes": rss.window_peak(),
            "rss_after_10s_min": min(late) if late else None, "rss_after_10s_max": max(late) if late else None,
            "peak_in_flight_bytes": stats.peak_in_flight, "budget_bytes": budget,
            "crc32": f"{sink.crc:08x}", "chunks_verified": sink.verified, "mismatches": sink.mismatches[:5],
            "read_seconds": round(stats.read_seconds, 1), "write_seconds": round(stats.write_seconds, 1),
        }
        results.append(res)
        print(json.dumps(res), flush=True)
        if sink.bytes != plan.total_bytes or sink.mismatches:
            sys.exit("the run did not produce the plan's bytes exactly")
    med = {k: c.median([r[k] for r in results]) for k in ("seconds", "gb_per_s", "peak_rss_bytes",
                                                            "engine_peak_rss_bytes", "rss_after_10s_max")}
    r0 = results[0]
    c.print_table(f"{name} plan through the engine, virtual source, digest sink ({args.runs} run(s), "
                  f"medians)", ["what", "value"], [
                      ["traffic", f"{r0['bytes'] / 1e9:.1f} GB in {r0['chunks']:,} chunks"],
                      ["wall", f"{med['seconds']:.0f} s"],
                      ["throughput", f"{med['gb_per_s']:.2f} GB/s"],
                      ["--max-memory", c.fmt_gib(budget)],
                      ["peak in flight (accounted)", c.fmt_gib(r0["peak_in_flight_bytes"])],
                      ["peak RSS (process)", c.fmt_gib(med["peak_rss_bytes"])],
                      ["peak RSS (engine run)", c.fmt_gib(med["engine_peak_rss_bytes"])],
                      ["RSS after 10 s, min..max", f"{c.fmt_gib(r0['rss_after_10s_min'])} .. "
                                                   f"{c.fmt_gib(r0['rss_after_10s_max'])}"],
                      ["digest (CRC-32 of all output)", r0["crc32"]],
                      ["chunks rebuilt and compared", f"{r0['chunks_verified']:,}, {len(r0['mismatches'])} mismatches"],
                      ["machine", f"{info['nproc']} CPUs, {info['ram_gib']} GiB RAM, {info['date']}"],
                  ])
    if args.json:
        print(json.dumps({"machine": info, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
