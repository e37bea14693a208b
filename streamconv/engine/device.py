"""Where a chunk's transform (the cast; fusion is done by the reads) runs: the CPU, or a CUDA device.

A stage hands out the buffer a chunk is read into, starts the transform (``start``, on the engine's
main thread), and returns the finished output (``finish``, on the writer thread) as a host tensor that
owns exactly its bytes (so a sink that serializes it never copies a larger base storage).

- ``CpuStage``: buffers from the engine's ``Memory`` (reused, exact size); the cast (if any) is a copy
  into a second buffer. The default.
- ``CudaStage``: a fixed pool of pinned host slots, allocated once and reused, so pinned memory is a
  constant part of the budget. ``start`` issues, on a side stream, an async host->device copy, the cast,
  and an async device->host copy back into the same slot (stream order makes that safe), then records an
  event; ``finish`` waits for the event, copies the bytes out of the slot and returns the slot to the
  pool. The GPU work of one chunk overlaps the reads and writes of others. Same bytes as the CPU path:
  a dtype cast is the same IEEE round-to-nearest-even on both (NaN payloads aside). A quantized weight's
  float8 bytes come in raw and are dequantized on the device (``transforms.dequantize_on_device``).

``cost`` is what a chunk holds outside the stage's fixed ``reserved`` bytes.
"""

from __future__ import annotations

import queue

from streamconv import dtypes
from streamconv.errors import UsageError


def on_cpu(device: str) -> bool:
    """Whether ``--device`` names the CPU (``cpu``, ``cpu:0``): said without importing torch."""
    return str(device).split(":")[0] == "cpu"


def _view(raw, shape, dtype):
    """``raw`` (a uint8 tensor) as a ``shape`` tensor of ``dtype`` (a DType or a torch dtype)."""
    n = 1
    for s in shape:
        n *= s
    dtype = dtypes.of(dtype)
    return raw[: n * dtype.itemsize].view(dtype.torch).view(shape)


def _nbytes(shape, dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


class CpuStage:
    """Buffers from the engine's ``Memory`` (reused, exact size); the cast is a copy into a second one."""

    device = "cpu"
    reserved = 0
    memory = None
    dequantizes = False  # a quantized weight comes in dequantized (``scatter.copy_reads``)

    def attach(self, memory) -> None:
        self.memory = memory

    def cost(self, src_bytes: int, out_bytes: int, same_dtype: bool) -> int:
        return out_bytes if same_dtype else src_bytes + out_bytes

    def available(self) -> bool:
        return True

    def buffer(self, job, timeout: float | None = None) -> torch.Tensor:
        raw = self.memory.take(_nbytes(job.shape, job.buf_dtype))
        job.raws.append(raw)
        return _view(raw, job.shape, job.buf_dtype)

    def start(self, job):
        if job.buf.dtype == job.out_dtype:  # (a torch dtype against a DType: equal by name)
            return job.buf
        raw = self.memory.take(_nbytes(job.shape, job.out_dtype))
        job.raws.append(raw)
        out = _view(raw, job.shape, job.out_dtype)
        out.copy_(job.buf)  # the cast: round to nearest even, as Tensor.to
        return out

    def finish(self, job, handle) -> torch.Tensor:
        return handle

    def discard(self, job) -> None:
        pass


class CudaStage:
    """Pinned slots of ``slot_bytes`` (the largest chunk buffer), ``slots`` of them, reserved up front."""

    def __init__(self, device: str, slot_bytes: int, slots: int, pin: bool = True):
        import torch

        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # torch's pinned (caching host) allocator rounds every block up to a power of two: count that
        self.slot_bytes = 1 << max(0, slot_bytes - 1).bit_length() if pin else max(1, slot_bytes)
        self.reserved = slots * self.slot_bytes
        self.memory = None
        self._free: queue.Queue = queue.Queue()
        for _ in range(slots):
            self._free.put(torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=pin))
        self._scales: dict[int, torch.Tensor] = {}  # id(Scale) -> its values on the device (kept: small)

    def attach(self, memory) -> None:
        self.memory = memory

    def cost(self, src_bytes: int, out_bytes: int, same_dtype: bool) -> int:
        return out_bytes  # the exact-size copy ``finish`` returns; the slots are ``reserved``

    def available(self) -> bool:
        return not self._free.empty()

    def buffer(self, job, timeout: float | None = None) -> torch.Tensor:
        job.slot = self._free.get(timeout=timeout)  # raises queue.Empty on timeout
        return _view(job.slot, job.shape, job.buf_dtype)

    dequantizes = True  # a quantized weight's float8 bytes come in raw (engine.make_job); ``_transform``

    def _scale(self, scale) -> torch.Tensor:
        values = self._scales.get(id(scale))
        if values is None:
            values = self._scales[id(scale)] = scale.values.to(self.device)
        return values

    def _transform(self, job, dev_in: torch.Tensor) -> torch.Tensor:
        """The cast, or the dequantization of each read's rows (``transforms.dequantize_on_device``)."""
        import torch

        if job.quant is None:
            return dev_in.to(dtypes.of(job.out_dtype).torch)
        from streamconv.engine.transforms import dequantize_on_device

        dev_out = torch.empty(dev_in.shape, dtype=dtypes.of(job.out_dtype).torch, device=self.device)
        for row, n, scale, row0 in job.quant:
            dequantize_on_device(dev_in[row:row + n], self._scale(scale), scale.block, row0, dev_out[row:row + n])
        return dev_out

    def start(self, job):
        import torch

        host_in = job.buf
        host_out = _view(job.slot, job.shape, job.out_dtype)
        if self.stream is None:  # the same sequence without CUDA (tests of this path on CPU)
            host_out.copy_(self._transform(job, host_in.to(self.device)))
            return host_out, None
        with torch.cuda.stream(self.stream):
            dev_in = host_in.to(self.device, non_blocking=True)
            dev_out = self._transform(job, dev_in)
            host_out.copy_(dev_out, non_blocking=True)  # into the same slot: after the H2D copy, in stream order
            done = torch.cuda.Event()
            done.record(self.stream)
        # dev_in/dev_out were allocated on self.stream: their memory is reused only by later work on it
        return host_out, done

    def finish(self, job, handle) -> torch.Tensor:
        host_out, done = handle
        if done is not None:
            done.synchronize()
        raw = self.memory.take(_nbytes(job.shape, job.out_dtype))
        job.raws.append(raw)
        out = _view(raw, job.shape, job.out_dtype)
        out.copy_(host_out)
        self.discard(job)
        return out

    def discard(self, job) -> None:
        if job.slot is not None:
            self._free.put(job.slot)
            job.slot = None


def make_stage(device: str, slot_bytes: int, budget: int, largest_cost: int, workers: int):
    """The stage for ``device``; a CUDA stage gets as many slots as the budget allows (2 to workers+2)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cpu":
        return CpuStage()
    if dev.type != "cuda":
        raise UsageError(f"--device {device}: choose cpu or cuda")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here; use --device cpu")
    slot_bytes = 1 << max(0, slot_bytes - 1).bit_length()
    slots = min(workers + 2, (budget - largest_cost) // slot_bytes)
    if slots < 2:
        raise UsageError(f"--max-memory is too small for --device {device}: it needs two pinned buffers of "
                         f"{slot_bytes} bytes besides the chunks in flight; raise --max-memory")
    return CudaStage(device, slot_bytes, slots)
