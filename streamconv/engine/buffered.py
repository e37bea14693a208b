"""The engine's buffered path: each chunk read into a buffer of its own, transformed on a stage, written whole.

Data flows one way through three kinds of threads::

    reader threads (--workers)        main thread                  writer thread
    read_into(chunk, buffer)   ->   stage.start(buffer)    ->   stage.finish -> sink.write(chunk, tensor)
    (scatter.py: file order)        (cast on --device)           (plan order)

Every chunk is accounted from the moment its buffer is allocated until the sink has written it, at the
bytes it can hold at most (``InFlight.cost``): its read buffer, its output if the cast makes a new tensor, the
part of a read a ``reads = "rows"`` source hands back, and what the sink allocates to write it
(``sink.write_overhead(chunk)``). Fixed buffers (the CUDA stage's pinned slots, ``sink.reserved_memory``)
are taken off the budget up front. A chunk starts only when its cost fits, so what the engine holds never
exceeds ``max_memory``, whatever the model size; the reads of the next chunks run while earlier ones are
cast and written. Chunks reach the sink in plan order.
"""

from __future__ import annotations

import collections
import ctypes
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from streamconv import dtypes
from streamconv.engine import scatter
from streamconv.engine.contracts import Sink, Source, Stage, Stats
from streamconv.engine.device import CpuStage, make_stage, on_cpu
from streamconv.engine.memory import Memory
from streamconv.errors import UsageError
from streamconv.plan.build import Chunk, Plan
from streamconv.units import fmt_bytes

STOP_WAIT = 5.0  # seconds a stopping run waits for its reads in flight and its writer


@dataclass
class InFlight:
    chunk: Chunk
    shape: tuple[int, int]  # the buffer: [rows, row_elems]
    buf_dtype: dtypes.DType  # what the reads are stored in (or the output dtype for generic sources)
    out_dtype: dtypes.DType
    cost: int
    buf: torch.Tensor | None = None
    future: object = None
    raws: list = field(default_factory=list)  # buffers taken from Memory: cached again when the job is done
    slot: torch.Tensor | None = None  # CudaStage: the pinned slot the job is in
    quant: list | None = None  # the stage dequantizes: scatter.quantized_reads' rows and scales


def make_job(plan: Plan, chunk: Chunk, source: Source, sink: Sink | None = None, stage: Stage | None = None) -> InFlight:
    out_dtype = dtypes.of(plan.targets[chunk.key].dtype)
    shape = scatter.buffer_shape(chunk)
    src = scatter.read_dtype(source, chunk) or out_dtype  # mixed or unknown: each read is cast on copy
    quant = scatter.quantized_reads(source, chunk) if stage is not None and stage.dequantizes else None
    if quant is not None:  # the raw float8 bytes are read; the stage dequantizes them where it casts
        src, quant = quant
    extra = 0
    if not scatter.direct(source):  # each read comes back as a tensor of its own before it is copied
        extra = max((source.read_nbytes(r) for r in chunk.reads), default=0)
    src_bytes = shape[0] * shape[1] * src.itemsize
    cost = (stage or CpuStage()).cost(src_bytes, chunk.nbytes, src == out_dtype) + extra + (chunk.nbytes if sink is None else sink.write_overhead(chunk))
    return InFlight(chunk, shape, src, out_dtype, cost, quant=quant)


def limit_malloc_retention() -> None:
    """Make glibc return big buffers to the OS when they are freed.

    glibc raises its mmap threshold (up to 32 MiB) after the first large free, so later chunk buffers
    come from heaps (one per thread) that keep freed memory: RSS then creeps above what is in flight.
    A fixed threshold keeps every buffer >= 1 MiB in its own mapping, unmapped on free.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixing it also stops the dynamic adjustment)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


class Writer:
    """The writer thread: finishes each job's transform and hands it to the sink, in order."""

    def __init__(self, sink, stage, memory: Memory, stats: Stats, progress):
        self.sink, self.stage, self.memory, self.stats, self.progress = sink, stage, memory, stats, progress
        self.error: BaseException | None = None
        self.stopping = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="streamconv-write", daemon=True)
        self._thread.start()

    def put(self, job: InFlight, handle) -> None:
        self.check()
        self._queue.put((job, handle))

    def check(self) -> None:
        if self.error is not None:
            raise self.error
        if not self._thread.is_alive():
            raise RuntimeError("the writer thread ended unexpectedly")

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, handle = item
            if self.stopping:
                self.stage.discard(job)
                self.memory.release(job.cost)
                continue
            t0 = time.perf_counter()
            try:
                out = self.stage.finish(job, handle)
                del handle
                self.sink.write(job.chunk, out.view(job.chunk.sizes))
                del out
                self.memory.release(job.cost, keep=job.raws)  # the sink is done with them: reuse
            except BaseException as e:  # reported to the main thread, which stops the run
                self.error, self.stopping = e, True
                self.stage.discard(job)
                self.memory.release(job.cost)
                continue
            job.buf = None
            job.raws.clear()
            self.stats.write_seconds += time.perf_counter() - t0
            self.stats.bytes_done += job.chunk.nbytes
            self.stats.chunks_done += 1
            if self.progress is not None:
                self.progress.advance(job.chunk, self.memory.used)

    def close(self, stop: bool = False, timeout: float | None = None) -> None:
        """Wait for the queue to drain (``stop``: drop what is left; ``timeout``: at most that long);
        re-raise the thread's error."""
        self.stopping = self.stopping or stop
        self._queue.put(None)
        self._thread.join(timeout)
        if not stop and self.error is not None:
            raise self.error


def _timed(read_into, chunk: Chunk, buf: torch.Tensor) -> float:
    t0 = time.perf_counter()
    read_into(chunk, buf)
    return time.perf_counter() - t0


def run(plan: Plan, source: Source, sink: Sink, *, max_memory: int, workers: int, device: str, progress, skip,
        stage: Stage | None, t0: float) -> Stats:
    """Run ``plan`` on the buffered path (see the module docstring)."""
    limit_malloc_retention()
    sink_reserved = sink.reserved_memory
    chunks = plan.chunks
    if stage is None:
        stage = _stage_for(plan, source, sink, device, max_memory - sink_reserved, workers)
    memory = Memory(max_memory - stage.reserved - sink_reserved)
    stage.attach(memory)
    stats = Stats(budget=memory.limit)
    read_into = scatter.reader_for(source)
    pending: collections.deque[InFlight] = collections.deque()
    writer = Writer(sink, stage, memory, stats, progress)
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="streamconv-read")

    def hand_oldest() -> None:
        job = pending.popleft()
        w0 = time.perf_counter()
        try:
            stats.read_seconds += job.future.result()
        except BaseException:
            stage.discard(job)
            memory.release(job.cost)
            raise
        stats.wait_seconds += time.perf_counter() - w0
        writer.put(job, stage.start(job))

    try:
        for chunk in chunks:
            if skip is not None and skip(chunk):
                stats.chunks_skipped += 1
                if progress is not None:
                    progress.advance(chunk, memory.used, skipped=True)
                continue
            job = make_job(plan, chunk, source, sink, stage)
            if job.cost > memory.limit:
                fixed = max_memory - memory.limit
                held = f" less {fmt_bytes(fixed)} of fixed buffers" if fixed else ""
                raise UsageError(f"--max-memory {fmt_bytes(max_memory)}{held} is below the {fmt_bytes(job.cost)} "
                                 f"chunk {chunk.key} {list(chunk.offsets)} needs; raise --max-memory")
            acquired = False
            while pending and not acquired:
                acquired = stage.available() and memory.try_acquire(job.cost)
                if not acquired:
                    hand_oldest()
            if not acquired:  # everything earlier is with the writer: wait for it to free memory
                memory.acquire(job.cost, writer.check)
            while True:
                try:
                    job.buf = stage.buffer(job, timeout=0.2)
                    break
                except queue.Empty:
                    writer.check()
            job.future = pool.submit(_timed, read_into, chunk, job.buf)
            pending.append(job)
        while pending:
            hand_oldest()
        writer.close()
    except BaseException:
        _stop(pool, writer)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        memory.clear()
        read_into.close()
    stats.peak_in_flight = memory.peak
    stats.seconds = time.perf_counter() - t0
    return stats


def _stage_for(plan: Plan, source: Source, sink: Sink, device: str, budget: int, workers: int) -> Stage:
    """The CPU stage, or a CUDA stage with pinned slots sized for the largest chunk buffer."""
    if on_cpu(device):
        return CpuStage()
    jobs = [make_job(plan, c, source, sink) for c in plan.chunks]
    slot = max((j.shape[0] * j.shape[1] * max(j.buf_dtype.itemsize, j.out_dtype.itemsize) for j in jobs), default=1)
    largest = max((j.cost for j in jobs), default=0)
    return make_stage(device, slot, budget, largest, workers)


def _stop(pool: ThreadPoolExecutor, writer: Writer) -> None:
    """Stopping (an error, a signal): reads not started are dropped, and neither the reads in flight nor the
    writer are waited for past ``STOP_WAIT`` seconds. What is on disk is crash-safe, and the program ends
    without interpreter teardown (``cli.run``), so a thread still busy cannot hold the exit up."""
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + STOP_WAIT
    for t in list(getattr(pool, "_threads", ())):  # (the executor's own threads: no public handle)
        t.join(max(0.0, deadline - time.monotonic()))
    writer.close(stop=True, timeout=max(0.0, deadline - time.monotonic()))
