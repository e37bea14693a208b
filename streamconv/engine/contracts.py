"""The engine's contracts: what it asks of a source, a sink and a stage, and what it hands them.

A conversion runs in this order (the command drives it; the engine does 3):

1) plan     the command builds a ``plan.build.Plan`` from the source's tensors (headers only)
2) place    a placing sink fixes, before a byte is read, where every chunk's bytes go (``PlacingSink.place``)
3) write    ``runner.run`` moves every chunk not yet done (``skip``) from the source to the sink:
            the direct path (``direct.py``) copies a ``FileSource``'s extents piece by piece to their place and
            calls ``placed(chunk, placement, crc)``; the buffered path (``buffered.py``) reads a chunk into a
            buffer, transforms it on a ``Stage`` and calls ``sink.write(chunk, tensor)``
4) commit   the command commits the sink once every chunk is written (``.metadata`` / the index last)

A source or a sink says what it can do by the class it declares, not by the methods the engine probes for:
``Source.reads`` says how its bytes reach a buffer, ``Sink.places`` whether it has ``place``/``placed``.
Classes that subclass these Protocols get their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Literal, Mapping, Protocol

if TYPE_CHECKING:  # (typing only: the engine never imports torch or the plan for these)
    import torch

    from streamconv.dtypes import DType
    from streamconv.plan.build import Chunk, Read

NO_SCALES: Mapping[str, Any] = MappingProxyType({})


class Source(Protocol):
    """Where a tensor's bytes come from.

    ``reads`` declares how the engine fills a chunk's buffer from it:

    - ``"extents"``: a ``FileSource``; every read is a list of byte ranges of files (``spans``), which the
      engine reads itself straight into place (``preadv``): the direct path when the sink places chunks.
    - ``"buffer"``: the source fills a chunk's buffer itself (``read_into``), with no tensor of its own.
    - ``"rows"``: each read comes back as a tensor (``read_rows``) and is copied into the buffer.
    """

    reads: ClassVar[Literal["extents", "buffer", "rows"]] = "rows"
    dequant: Mapping[str, Any] = NO_SCALES  # quantized weight -> its ``sources.quantized.Scale``: read dequantized

    def dtype_of(self, name: str) -> DType | None:
        """The dtype tensor ``name`` is stored in (None: the source cannot say)."""

    def read_nbytes(self, read: Read) -> int:
        """Bytes ``read_rows`` returns for ``read``."""

    def read_rows(self, name: str, row0: int, row1: int, index: tuple[int, ...] = ()) -> torch.Tensor:
        """Rows ``[row0, row1)`` of ``name`` (along dim 0, after the leading ``index``), as a tensor."""

    def read_into(self, chunk: Chunk, buf: torch.Tensor) -> None:
        """``reads == "buffer"``: fill ``buf`` (``scatter.buffer_shape(chunk)``) with the chunk's reads."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the source holds open."""


class FileSource(Source, Protocol):
    """A source whose reads are byte ranges of files (``reads = "extents"``): the engine reads them itself."""

    reads: ClassVar[Literal["extents"]] = "extents"

    def info(self, name: str) -> Any:
        """Tensor ``name``'s ``dtype`` and ``shape``."""

    def spans(self, read: Read) -> Iterable[tuple[Any, int, int]]:
        """``(file, byte offset, length)`` ranges whose concatenation is ``read``'s rows, row-major, in the
        dtype ``dtype_of(read.name)`` (one range for a safetensors tensor; one per stored item, or per row of
        an item split by columns, for a torch_dist one). ``file`` is a path the engine opens itself."""


@dataclass
class Placement:
    """Where a chunk's bytes go: ``fd`` at ``offset`` (and the same bytes to each ``(fd, offset)`` of ``also``)."""

    fd: int
    offset: int
    path: object  # for messages
    also: list = field(default_factory=list)


class Sink(Protocol):
    """Where chunks go. Every sink takes whole chunks as tensors (``write``, the buffered path)."""

    places: ClassVar[bool] = False  # a ``PlacingSink``: the direct path may copy chunks straight into place
    reserved_memory: int = 0  # bytes the sink holds for the whole run (taken off the budget up front)

    def write_overhead(self, chunk: Chunk) -> int:
        """Bytes ``write`` allocates for ``chunk`` (accounted while the chunk is in flight): one copy."""
        return chunk.nbytes

    def write(self, chunk: Chunk, tensor: torch.Tensor) -> None:
        """Write one chunk (a tensor of ``chunk.sizes`` in the target dtype). Called in plan order."""

    def close(self) -> None:
        """Release what the sink holds open (the command commits or aborts it)."""


class PlacingSink(Sink, Protocol):
    """A sink that knows every chunk's place before a byte is read (``places = True``)."""

    places: ClassVar[bool] = True

    def place(self, chunk: Chunk) -> Placement:
        """Where ``chunk``'s bytes go (called from any worker thread)."""

    def placed(self, chunk: Chunk, placement: Placement, crc: int) -> None:
        """``chunk``'s bytes are all written at ``placement`` with CRC-32 ``crc``: frame and journal it."""


class Stage(Protocol):
    """Where a chunk's transform (cast, dequantization) runs on the buffered path (``device.py``)."""

    device: str
    reserved: int  # fixed bytes (pinned slots), taken off the budget up front
    dequantizes: bool  # takes a quantized weight's raw float8 bytes and dequantizes them itself

    def attach(self, memory) -> None: ...
    def cost(self, src_bytes: int, out_bytes: int, same_dtype: bool) -> int: ...
    def available(self) -> bool: ...
    def buffer(self, job, timeout: float | None = None) -> torch.Tensor: ...
    def start(self, job): ...
    def finish(self, job, handle) -> torch.Tensor: ...
    def discard(self, job) -> None: ...


@dataclass
class Phases:
    """Seconds spent per phase on the direct path, summed over threads."""

    read: float = 0.0
    cast: float = 0.0
    crc: float = 0.0
    write: float = 0.0
    complete: float = 0.0  # the sink's framing, journal and file commits

    def add(self, other: "Phases") -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))


@dataclass
class Stats:
    """What a run did (``runner.run`` returns it)."""

    bytes_done: int = 0
    chunks_done: int = 0
    chunks_skipped: int = 0
    seconds: float = 0.0
    peak_in_flight: int = 0  # most bytes accounted at once (<= budget)
    budget: int = 0  # bytes chunks may hold (max_memory less fixed reservations)
    read_seconds: float = 0.0  # buffered: time reader threads spent reading (summed over threads)
    write_seconds: float = 0.0  # buffered: time the writer thread spent finishing and writing
    wait_seconds: float = 0.0  # buffered: time the main thread waited for reads
    phases: Phases = field(default_factory=Phases)  # direct: seconds per phase
    path: str = "buffered"  # "direct" (direct.py) or "buffered" (buffered.py)

    def phase_seconds(self) -> dict:
        """Seconds per phase (summed over threads): the profile ``bench/import_profile.py`` reads."""
        if self.path == "direct":
            return {k: round(v, 3) for k, v in vars(self.phases).items()}
        return {"read": round(self.read_seconds, 3), "wait_for_reads": round(self.wait_seconds, 3),
                "cast_and_write": round(self.write_seconds, 3)}
