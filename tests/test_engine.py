"""The engine: output independent of budget, workers and stage; memory never over the budget (measured on
the live tensors, not only the engine's own count); reads overlap writes; errors and interrupts stop it."""

from __future__ import annotations

import gc
import io
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from streamconv.engine import buffered, runner
from streamconv.engine import scatter
from streamconv.engine.contracts import Sink
from streamconv.engine.device import CudaStage
from streamconv.errors import BadInputError, UsageError
from streamconv.sources.safetensors import SafetensorsSource
from streamconv.inputs import chunk_bytes_for, import_plan_for as build_plan
from streamconv.engine.memory import Memory
from streamconv.models.config import spec_from_config
from streamconv.runtime.progress import RichProgress
from streamconv.reference.synth import llama_config, make_checkpoint, mixed_decilm_config
from streamconv.sinks.digest import DigestSink
from streamconv.sources.virtual import VirtualSource

CFG = llama_config(hidden=64, layers=3, heads=8, kv_heads=2, ffn=160, vocab=320)


SMALL = llama_config(hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, vocab=96)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A bf16 and an fp32 copy of one small Llama, tensors shuffled over 3 shards (and a smaller one)."""
    root = tmp_path_factory.mktemp("engine")
    out = {dtype: make_checkpoint(root / str(dtype), CFG, seed=2, dtype=dtype, shards=3)
           for dtype in (torch.bfloat16, torch.float32)}
    out["small"] = make_checkpoint(root / "small", SMALL, seed=3, shards=2)
    return out


def plan_for(source, budget: int, dtype=None, cfg=CFG):
    return build_plan(source, spec_from_config(cfg), dtype, chunk_bytes_for(budget))


def run_digest(folder, budget, workers=2, dtype=None, cuda_path_slots=0):
    """Convert into a DigestSink that rebuilds every chunk from ``read_rows`` and compares it.

    ``cuda_path_slots``: run the CUDA stage's code path (pinned slots, without pinning) on the CPU."""
    source = SafetensorsSource(folder)
    try:
        plan = plan_for(source, budget, dtype)
        stage, max_memory = None, budget
        if cuda_path_slots:
            jobs = [buffered.make_job(plan, c, source) for c in plan.chunks]
            slot = max(j.shape[0] * j.shape[1] * max(j.buf_dtype.itemsize, j.out_dtype.itemsize) for j in jobs)
            stage = CudaStage("cpu", slot, cuda_path_slots, pin=False)
            max_memory += stage.reserved
        sink = DigestSink(plan, source, verify_every=1)
        stats = runner.run(plan, source, sink, max_memory=max_memory, workers=workers, stage=stage)
    finally:
        source.close()
    assert sink.verified == len(plan.chunks) and not sink.mismatches, sink.mismatches[:3]
    assert sink.bytes == plan.total_bytes
    return sink.crc, stats, plan


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["keep", "cast-fp32-to-bf16"])
def test_output_is_the_same_whatever_the_budget_workers_and_stage(ckpt, dtype):
    """Scatter reads equal ``read_rows`` + concatenate + cast, chunk by chunk; the byte stream in plan order
    is the same for a roomy budget, a tiny one, one or four readers, and the CUDA stage's code path
    (pinned slots, copy out of the slot) run on the CPU."""
    folder = ckpt[torch.float32]
    digests = set()
    for budget, workers in [(64 << 20, 1), (96 << 10, 4), (24 << 10, 2)]:
        crc, stats, plan = run_digest(folder, budget, workers, dtype)
        digests.add(crc)
        assert stats.peak_in_flight <= stats.budget == budget
        assert len(plan.chunks) > len(plan.targets) or budget > 1 << 20
    crc, stats, _ = run_digest(folder, 96 << 10, 2, dtype, cuda_path_slots=3)
    digests.add(crc)
    assert len(digests) == 1


def test_bf16_scatter_reads_are_bit_exact(ckpt):
    crc_a, _, _ = run_digest(ckpt[torch.bfloat16], 64 << 20, 1)
    crc_b, stats, plan = run_digest(ckpt[torch.bfloat16], 20 << 10, 3)
    assert crc_a == crc_b and len(plan.chunks) > 3 * len(plan.targets)


def live_tensor_bytes() -> dict[int, int]:
    """Every tensor storage Python can see: data pointer -> bytes."""
    out = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.device.type == "cpu":
            try:
                s = o.untyped_storage()
                out[s.data_ptr()] = s.nbytes()
            except RuntimeError:  # a fake tensor (a traced model of an earlier test): no data
                continue
    return out


class LiveBytesSink(Sink):
    """Measures, at every write, the bytes of all live tensors that were not there before the run."""

    def __init__(self, baseline: dict[int, int]):
        self.baseline = baseline
        self.peak = 0

    def write_overhead(self, chunk) -> int:
        return 0  # this sink allocates nothing of its own per chunk

    def write(self, chunk, tensor) -> None:
        live = live_tensor_bytes()
        self.peak = max(self.peak, sum(n for p, n in live.items() if p not in self.baseline))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["keep", "cast"])
def test_live_chunk_memory_never_exceeds_the_budget(ckpt, dtype):
    """The bytes of every buffer alive while the sink writes (read buffers in flight on reader threads,
    cast outputs, buffers cached for reuse) stay within the budget, and the run did hold several chunks at
    once (so the bound is not met by running one chunk at a time)."""
    budget = 48 << 10
    source = SafetensorsSource(ckpt["small"])
    try:
        plan = plan_for(source, budget, dtype, cfg=SMALL)
        largest = max(runner.chunk_cost(plan, c, source) for c in plan.chunks)
        gc.collect()
        sink = LiveBytesSink(live_tensor_bytes())
        stats = runner.run(plan, source, sink, max_memory=budget, workers=4)
    finally:
        source.close()
    assert sink.peak <= budget
    assert stats.peak_in_flight <= budget
    assert sink.peak > 2 * largest, "several chunks should be in flight at once"


class SlowSource(VirtualSource):
    """A virtual source behind a slow disk."""

    delay = 0.03

    def read_into(self, chunk, buf):
        time.sleep(self.delay)
        super().read_into(chunk, buf)


class SlowSink(DigestSink):
    delay = 0.03

    def write(self, chunk, tensor):
        time.sleep(self.delay)
        super().write(chunk, tensor)


def test_reads_run_ahead_while_chunks_are_written():
    spec = spec_from_config(CFG)
    source = SlowSource(spec)
    plan = build_plan_virtual(spec, 8 << 10)
    sink = SlowSink(plan, source)
    n = len(plan.chunks)
    stats = runner.run(plan, source, sink, max_memory=256 << 10, workers=2)
    serial = n * (SlowSource.delay + SlowSink.delay)
    assert stats.read_seconds >= n * SlowSource.delay and stats.write_seconds >= n * SlowSink.delay
    assert stats.seconds < 0.75 * serial, (stats.seconds, serial)


def build_plan_virtual(spec, chunk_bytes, dtype=torch.bfloat16):
    from streamconv.models import rules
    from streamconv.plan.build import import_plan

    return import_plan(spec, {t.name: dtype for t in rules.hf_tensors(spec)}, None, chunk_bytes=chunk_bytes)


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("streamconv-")]


def test_a_truncated_shard_stops_the_run_with_one_clear_error(tmp_path):
    src = make_checkpoint(tmp_path / "hf", CFG, seed=1, dtype=torch.bfloat16, shards=1)
    source = SafetensorsSource(src)  # headers read while the file is whole
    plan = plan_for(source, 64 << 10)
    shard = next(src.glob("*.safetensors"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(BadInputError, match="truncated"):
        runner.run(plan, source, DigestSink(plan, source), max_memory=64 << 10, workers=3)
    source.close()
    assert not engine_threads()


class FailingSink(DigestSink):
    def __init__(self, plan, source, after: int, exc: BaseException):
        super().__init__(plan, source)
        self.after, self.exc = after, exc

    def write(self, chunk, tensor):
        if self.chunks == self.after:
            raise self.exc
        super().write(chunk, tensor)


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_a_failing_sink_stops_the_run_and_no_write_follows(exc):
    spec = spec_from_config(CFG)
    source = VirtualSource(spec)
    plan = build_plan_virtual(spec, 4 << 10)
    sink = FailingSink(plan, source, after=5, exc=exc)
    with pytest.raises(type(exc)):
        runner.run(plan, source, sink, max_memory=64 << 10, workers=2)
    assert sink.chunks == 5
    assert not engine_threads()


def test_a_budget_below_one_chunk_is_refused():
    spec = spec_from_config(CFG)
    source = VirtualSource(spec)
    plan = build_plan_virtual(spec, 64 << 10)
    sink = DigestSink(plan, source)
    need = runner.min_memory(plan, source, sink)
    assert need == max(c.nbytes for c in plan.chunks)  # read straight into the buffer; the sink copies nothing
    with pytest.raises(UsageError, match="--max-memory"):
        runner.run(plan, source, sink, max_memory=need - 1)
    runner.run(plan, source, sink, max_memory=need)  # exactly enough runs, one chunk at a time
    assert sink.bytes == plan.total_bytes


def test_progress_counts_tensors_chunks_and_bytes():
    cfg = mixed_decilm_config(hidden=32, heads=8, vocab=128)
    spec = spec_from_config(cfg)
    source = VirtualSource(spec)
    plan = build_plan_virtual(spec, 2 << 10)
    out = io.StringIO()
    with RichProgress("test", plan.total_bytes, len(plan.chunks), 32 << 10,
                      console=Console(file=out, force_terminal=True, width=200), plan=plan) as progress:
        runner.run(plan, source, DigestSink(plan, source), max_memory=32 << 10, progress=progress)
    counter = progress._count  # what moves: the source tensors read (more of them than megatron tensors here)
    assert counter.label == "source tensors" and counter.count == counter.total == len(
        {r.name for c in plan.chunks for r in c.reads})
    assert progress.chunks == len(plan.chunks)
    task = progress.progress.tasks[0]
    assert task.completed == task.total == plan.total_bytes
    assert f"{counter.total}/{counter.total} source tensors, {len(plan.chunks)}/{len(plan.chunks)} chunks" in \
        out.getvalue()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.lists(st.tuples(st.sampled_from(["acquire", "release"]),
                                                st.integers(1, 64), st.integers(0, 3)), max_size=60))
def test_memory_held_plus_cached_never_exceeds_the_limit(limit, ops):
    """Whatever is acquired, taken, released and kept for reuse, used + cached stays within the limit, and a
    buffer of a size seen before is reused rather than allocated."""
    mem = Memory(limit)
    held: list[tuple[int, list]] = []
    for op, n, k in ops:
        if op == "acquire" and mem.try_acquire(n):
            bufs = []
            for i in range(min(k, 2)):
                size = n // 2
                if size:
                    free_before = mem._free.get(size, [])
                    reuse = free_before[-1].data_ptr() if free_before else None
                    t = mem.take(size)
                    assert reuse is None or t.data_ptr() == reuse
                    bufs.append(t)
            held.append((n, bufs))
        elif op == "release" and held:
            n, bufs = held.pop(k % len(held))
            mem.release(n, keep=bufs)
        assert 0 <= mem.used and mem.used + mem.cached <= limit
        assert mem.cached == sum(t.numel() for free in mem._free.values() for t in free)
    assert mem.peak <= limit


def test_scatter_reads_each_file_in_order(ckpt):
    """A QKV chunk's q rows of several query groups are one contiguous file range: one request."""
    source = SafetensorsSource(ckpt[torch.bfloat16])
    plan = plan_for(source, 64 << 20)
    chunk = next(c for c in plan.chunks if c.key.endswith("linear_qkv.weight"))
    reader = scatter.FileScatter(source)
    calls = []
    import os

    real = os.preadv

    def counting(fd, views, pos):
        calls.append((fd, pos, sum(len(v) for v in views), len(views)))
        return real(fd, views, pos)

    buf = torch.empty(scatter.buffer_shape(chunk), dtype=torch.bfloat16)
    os.preadv = counting
    try:
        reader(chunk, buf)
    finally:
        os.preadv = real
        reader.close()
    ref = torch.cat([source.read_rows(r.name, r.row0, r.row1, r.index) for r in chunk.reads])
    source.close()
    assert torch.equal(buf.view(torch.int16), ref.view(torch.int16))
    assert len(chunk.reads) == 3 * 2  # q, k, v for each of the 2 query groups
    assert len(calls) == 3 and all(n == 2 for *_, n in calls)  # one request per source tensor


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [None, "bf16"], ids=["keep", "cast-fp32-to-bf16"])
def test_cuda_device_writes_the_same_bytes_as_the_cpu(ckpt, tmp_path, dtype):
    """On a GPU machine: --device cuda (pinned slots, async copies, cast on the GPU) == --device cpu, byte for byte."""
    import filecmp

    from streamconv.cli import main

    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / device
        args = ["hf2mcore", "--hf-model", str(ckpt[torch.float32]), "--megatron-path", str(outs[device]), "--quiet",
                "--max-memory", "256KiB", "--device", device, "--no-staging"]
        assert main(args + (["--dtype", dtype] if dtype else [])) == 0
    a, b = outs["cpu"] / "iter_0000000", outs["cuda"] / "iter_0000000"
    names = sorted(p.name for p in a.iterdir() if p.suffix == ".distcp" or p.name == ".metadata")
    assert names and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)
