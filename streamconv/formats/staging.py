"""The shard writer: output chunks staged in a Zarr v3 store, then assembled into ``torch_dist`` files.

Staging store (``<megatron-path>/.streamconv/staging.zarr``, zarr-python 3 API): one array per megatron
key in its global shape, uncompressed (a plain ``bytes`` codec, little-endian), ``write_empty_chunks`` on
(an all-zero chunk is still a file, so "written" is never confused with "missing"), a regular chunk grid
on which every plan chunk is a whole number of zarr chunks (the plan's row step; exactly one zarr chunk
per plan chunk for the plans ``import_plan`` makes). numpy has no bfloat16: bf16 arrays are stored as
their raw bits in ``uint16`` (fp8 in ``uint8``) and say so in their attributes (``torch_dtype``,
``encoding``); float32/float16 arrays are stored as such. Every staged chunk's CRC-32 is recorded in the
journal (``streamconv/resume.py``).

Crash safety. zarr writes a chunk to ``<chunk>.<uuid>.partial`` and renames it, without fsync: a kill
can leave ``.partial`` files (deleted on resume) and a power cut can leave a renamed chunk with missing
bytes. So a staged chunk counts as committed only when its journal record exists AND its bytes, read
back, match the recorded CRC-32 (checked on resume and again when the chunk is assembled): a torn or
corrupted chunk is detected and redone. Staged chunks are not fsynced (they are deleted once assembled,
and fsyncing them would write every byte to disk twice) except with ``--keep-staging``, where the store
is kept as a product. What is committed for good is fsynced: each ``.distcp`` (temporary name, fsync,
rename, folder fsync), the journal record naming it, and ``.metadata``, written last.

Pipeline. The engine's thread stages chunk after chunk (plan order, which is file by file); a background
thread appends each staged chunk to its ``.distcp`` as soon as it is staged, the bytes copied from the
chunk file to the ``.distcp`` inside the kernel (``copy_file_range``; the archive framing around them is
torch's own, see ``torch_dist.DistcpFile``), and drops a file's staged chunks once the file is renamed
into place. The engine stages at most ``files_ahead`` files beyond the one being assembled, so staged
chunks live in the page cache for seconds and are deleted before the kernel writes them out: staging
costs one in-kernel copy of every byte, and disk space for about two ``.distcp`` files. ``--keep-staging``
keeps the store: then it is a readable zarr of the whole model in megatron layout.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import threading
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from streamconv import crashpoints, resume
from streamconv.errors import OutputError, output_error
from streamconv.formats.atomic import fsync_dir, fsync_file
from streamconv.formats.torch_dist import DistcpFile, TornSource, chunks_by_file, commit_checkpoint, distcp_name

STORE_NAME = "staging.zarr"
ENCODING_BF16 = "raw bfloat16 bits in uint16: view as bfloat16 (torch: .view(torch.bfloat16); numpy: ml_dtypes)"
ENCODING_FP8 = "raw float8 bits in uint8: view as the torch_dtype attribute says"

# torch dtype -> (zarr/numpy dtype, dtype to view a torch tensor as before .numpy())
_ENCODINGS: dict[torch.dtype, tuple[str, torch.dtype]] = {
    torch.float32: ("float32", torch.float32),
    torch.float16: ("float16", torch.float16),
    torch.float64: ("float64", torch.float64),
    torch.bfloat16: ("uint16", torch.int16),
    torch.float8_e4m3fn: ("uint8", torch.uint8),
    torch.float8_e5m2: ("uint8", torch.uint8),
    torch.int64: ("int64", torch.int64),
    torch.int32: ("int32", torch.int32),
    torch.int16: ("int16", torch.int16),
    torch.int8: ("int8", torch.int8),
    torch.uint8: ("uint8", torch.uint8),
    torch.bool: ("bool", torch.bool),
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    zdtype, view = _ENCODINGS[t.dtype]
    return t.contiguous().view(view).numpy().view(zdtype)


def _from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    _, view = _ENCODINGS[dtype]
    t = torch.from_numpy(np.ascontiguousarray(a).view(torch.empty((), dtype=view).numpy().dtype))
    return t.view(dtype)


def crc32(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (C order)."""
    return zlib.crc32(_to_numpy(t).reshape(-1).view(np.uint8))


def grid_for(shape: tuple[int, ...], regions) -> tuple[int, ...]:
    """The coarsest regular chunk shape on which every ``(offsets, sizes)`` region is whole chunks: per
    dimension, the gcd of every region boundary inside the array (the row step for row-block plans)."""
    grid = []
    for d, n in enumerate(shape):
        g = 0
        for offsets, sizes in regions:
            for b in (offsets[d], offsets[d] + sizes[d]):
                if 0 < b < n:
                    g = math.gcd(g, b)
        grid.append(g or max(1, n))
    return tuple(grid)


def chunk_coords(offsets, sizes, grid) -> list[tuple[int, ...]]:
    """The zarr chunk coordinates covering region ``(offsets, sizes)`` on a chunk grid ``grid``."""
    out: list[tuple[int, ...]] = [()]
    for o, s, g in zip(offsets, sizes, grid):
        out = [c + (i,) for c in out for i in (range(o // g, (o + s - 1) // g + 1) if s else ())]
    return out


def _is_prefix(sizes, grid) -> bool:
    """Whether a region of ``sizes`` at a chunk's origin is the first elements of the chunk in C order."""
    k = next((i for i, s in enumerate(sizes) if s != 1), len(sizes))  # leading 1s pin the origin
    return all(s == g for s, g in zip(sizes[k + 1:], grid[k + 1:]))  # then a range from 0, then full dims


# --------------------------------------------------------------------------- the store

class StagedChunkMissing(Exception):
    pass


class StagingStore:
    """The zarr staging store of one plan: write, read back, checksum and drop plan chunks."""

    def __init__(self, path: Path, plan, fsync_chunks: bool = False):
        import zarr
        from zarr.storage import LocalStore

        self.path = Path(path)
        self.fsync_chunks = fsync_chunks
        self.raw_layout = sys.byteorder == "little"  # chunk files hold the raw little-endian elements
        regions: dict[str, list] = defaultdict(list)
        for c in plan.chunks:
            regions[c.key].append((c.offsets, c.sizes))
        try:
            self.group = zarr.open_group(store=LocalStore(self.path), mode="a", zarr_format=3,
                                         attributes={"streamconv": "megatron-core torch_dist layout, one array per key"})
            self.arrays = {key: self._array(key, t.shape, t.dtype, grid_for(t.shape, regions[key]))
                           for key, t in plan.targets.items()}
        except OSError as e:
            raise output_error(self.path, e) from e

    def _array(self, key: str, shape, dtype: torch.dtype, grid):
        zdtype, _ = _ENCODINGS[dtype]
        attrs = {"torch_dtype": dtype_name(dtype)}
        if dtype == torch.bfloat16:
            attrs["encoding"] = ENCODING_BF16
        elif zdtype == "uint8" and dtype != torch.uint8:
            attrs["encoding"] = ENCODING_FP8
        try:
            a = self.group[key]
            if (tuple(a.shape) == tuple(shape) and tuple(a.chunks) == tuple(grid) and str(a.dtype) == zdtype
                    and a.attrs.get("torch_dtype") == attrs["torch_dtype"]):
                return a
        except KeyError:
            pass
        names = [f"{key}.dim{i}" for i in range(len(shape))]
        if key.startswith("decoder.layers.") and not key.split(".")[2].isdigit():
            names[0] = "layer"  # a stacked [L, ...] key: the same L for all of them, so they line up in xarray
        return self.group.create_array(name=key, shape=tuple(shape), chunks=tuple(grid), dtype=zdtype,
                                       compressors=None, filters=None, fill_value=0,
                                       config={"write_empty_chunks": True}, attributes=attrs,
                                       dimension_names=names, overwrite=True)

    @staticmethod
    def _region(chunk):
        return tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))

    def chunk_paths(self, chunk) -> list[Path]:
        """The zarr chunk files holding ``chunk`` (one for a plan on its own row step)."""
        a = self.arrays[chunk.key]
        base = self.path / chunk.key
        return [base / a.metadata.encode_chunk_key(c) for c in chunk_coords(chunk.offsets, chunk.sizes, a.chunks)]

    def write(self, chunk, tensor: torch.Tensor) -> int:
        """Stage ``chunk``; returns the CRC-32 of its bytes."""
        data = _to_numpy(tensor.reshape(chunk.sizes))
        crc = zlib.crc32(data.reshape(-1).view(np.uint8))
        try:
            self.arrays[chunk.key][self._region(chunk)] = data
            if self.fsync_chunks:
                for p in self.chunk_paths(chunk):
                    fsync_file(p)
        except OSError as e:
            raise output_error(self.path / chunk.key, e) from e
        return crc

    def raw_file(self, chunk) -> Path | None:
        """The file whose first ``chunk.nbytes`` bytes are the chunk's elements in C order, if there is one:
        when the chunk is one zarr chunk whose leading elements it is (always, for ``import_plan``'s row
        blocks). With the plain little-endian ``bytes`` codec a chunk file is the chunk's elements in C
        order (zarr pads an edge chunk to the full chunk shape; a row block is its prefix)."""
        paths = self.chunk_paths(chunk)
        if len(paths) == 1 and self.raw_layout and _is_prefix(chunk.sizes, self.arrays[chunk.key].chunks):
            return paths[0]
        return None

    def read(self, chunk, dtype: torch.dtype) -> torch.Tensor:
        """The staged bytes of ``chunk`` (raises ``StagedChunkMissing`` if any of its files is absent):
        straight from its ``raw_file`` if it has one, otherwise through zarr's own indexing."""
        paths = self.chunk_paths(chunk)
        for p in paths:
            if not p.is_file():
                raise StagedChunkMissing(str(p))
        raw = self.raw_file(chunk)
        if raw is not None:
            nbytes = chunk.nbytes
            data = np.fromfile(raw, dtype=np.uint8, count=nbytes)
            if data.nbytes != nbytes:
                raise ValueError(f"{raw}: torn staged chunk ({data.nbytes} of {nbytes} bytes)")
            return torch.from_numpy(data).view(dtype).reshape(chunk.sizes)
        return _from_numpy(self.arrays[chunk.key][self._region(chunk)], dtype).reshape(chunk.sizes)

    def checksum(self, chunk, dtype: torch.dtype) -> int | None:
        """CRC-32 of the staged chunk as it is on disk; None if missing or unreadable (torn)."""
        try:
            return crc32(self.read(chunk, dtype))
        except Exception:  # a torn chunk file fails zarr's decode in various ways: it is redone
            return None

    def drop(self, chunk) -> None:
        for p in self.chunk_paths(chunk):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def clean_partials(self) -> int:
        """Delete the temporary files a killed zarr write leaves (``<chunk>.<uuid>.partial``)."""
        n = 0
        for p in self.path.rglob("*.partial"):
            p.unlink(missing_ok=True)
            n += 1
        return n

    def fsync_all(self) -> None:
        for dirpath, _, files in os.walk(self.path):
            for f in files:
                fsync_file(Path(dirpath) / f)
            fsync_dir(Path(dirpath))


# --------------------------------------------------------------------------- the sink

class _Stopped(Exception):
    pass


class StagedSink:
    """The engine's sink for hf2mcore with staging: stage, assemble ``.distcp`` files, ``.metadata`` last.

    Built on a ``resume.Journal``: records from an earlier run of the same conversion are replayed, every
    staged chunk they name is checked against its CRC-32, and ``skip(chunk)`` tells the engine what is
    already done. ``report`` counts what was resumed and what was redone.
    """

    def __init__(self, ckpt: Path, plan, journal, *, keep_staging: bool = False, extra_state=None,
                 files_ahead: int = 1):
        self.ckpt = Path(ckpt)
        self.plan = plan
        self.journal = journal
        self.keep_staging = keep_staging
        self.extra_state = extra_state
        self.files_ahead = files_ahead
        self.by_file = chunks_by_file(plan)
        self.crc: dict[tuple, int] = {}  # staged and verified chunks
        self.assembled: dict[int, list] = {}  # file -> [(key, offsets, offset, length)]
        self.report = {"chunks_verified": 0, "chunks_redone": 0, "files_resumed": 0, "partials_removed": 0}
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stop = False
        crashpoints.started()
        self.report["partials_removed"] += resume.clean_leftovers(self.ckpt)
        self.store = StagingStore(journal.dir / STORE_NAME, plan, fsync_chunks=keep_staging)
        self.report["partials_removed"] += self.store.clean_partials()
        self._replay()
        self._todo = [f for f in sorted(self.by_file) if f not in self.assembled]  # files left to assemble
        self._assembling = self._todo[0] if self._todo else None
        self._thread = threading.Thread(target=self._assembler, name="streamconv-assemble", daemon=True)
        self._thread.start()

    @property
    def reserved_memory(self) -> int:
        """Held outside the engine's chunks: a chunk read back by the assembler, for chunks that are not
        whole chunk files (none in ``import_plan``'s plans: those are copied file to file)."""
        return max((c.nbytes for c in self.plan.chunks if self.store.raw_file(c) is None), default=0)

    def write_overhead(self, chunk) -> int:
        """What ``write`` allocates: zarr's copy of the chunk on its way to the file."""
        return chunk.nbytes

    @staticmethod
    def _id(chunk) -> tuple:
        return chunk.key, tuple(chunk.offsets)

    def _dtype(self, chunk) -> torch.dtype:
        return self.plan.targets[chunk.key].dtype

    # ------------------------------------------------------------------ resume

    def _replay(self) -> None:
        records = self.journal.records()
        chunk_recs = {(r["key"], tuple(r["offsets"])): r["crc32"] for r in records if r["t"] == "chunk"}
        self.assembled = resume.committed_files(records, self.ckpt, self.by_file)
        self.report["files_resumed"] = len(self.assembled)
        for c in self.plan.chunks:
            cid = self._id(c)
            if c.file in self.assembled or cid not in chunk_recs:
                continue
            if self.store.checksum(c, self._dtype(c)) == chunk_recs[cid]:
                self.crc[cid] = chunk_recs[cid]
                self.report["chunks_verified"] += 1
            else:  # torn, corrupted or dropped: do it again
                self.report["chunks_redone"] += 1

    def skip(self, chunk) -> bool:
        return chunk.file in self.assembled or self._id(chunk) in self.crc

    # ------------------------------------------------------------------ staging (engine thread)

    def write(self, chunk, tensor: torch.Tensor) -> None:
        with self._cond:  # back-pressure: stage at most ``files_ahead`` files beyond the one being assembled
            while (self._error is None and self._assembling is not None
                   and chunk.file > self._assembling + self.files_ahead):
                self._cond.wait()
        self._check()
        crashpoints.slow(0.5)
        crc = self.store.write(chunk, tensor)
        crashpoints.slow(0.5)
        self.journal.append({"t": "chunk", "key": chunk.key, "offsets": list(chunk.offsets), "crc32": crc})
        with self._cond:
            self.crc[self._id(chunk)] = crc
            self._cond.notify_all()
        crashpoints.pause("staged")

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------------ assembly (background thread)

    def _assembler(self) -> None:
        """Files in plan order; each chunk appended as soon as it is staged, so the staged chunks of a
        file live only until that file is renamed into place."""
        try:
            for f in self._todo:
                with self._cond:
                    self._assembling = f
                    self._cond.notify_all()
                self._assemble(f)
        except _Stopped:
            pass
        except BaseException as e:  # reported to the engine thread at its next write/close
            self._error = e
        finally:
            with self._cond:
                self._assembling = None
                self._cond.notify_all()

    def _wait_staged(self, c) -> None:
        cid = self._id(c)
        with self._cond:
            while cid not in self.crc:
                if self._stop:
                    raise _Stopped
                self._cond.wait()

    def _assemble(self, f: int) -> None:
        out = DistcpFile(self.ckpt, f)
        try:
            for c in self.by_file[f]:
                self._wait_staged(c)
                if self._stop:
                    raise _Stopped
                self._append(out, c)
                crashpoints.pause("assemble")
            out.finish()
        except BaseException:
            out.abort()
            raise
        self.journal.append(resume.file_record(f, out.path, out.entries), sync=True)
        with self._cond:
            self.assembled[f] = out.entries
        if not self.keep_staging:
            for c in self.by_file[f]:
                self.store.drop(c)

    def _append(self, out: DistcpFile, c) -> None:
        """Append a staged chunk to ``out``: copied file to file by the kernel when its chunk file holds it
        as is, else read back. Not checksummed again: a chunk staged by this process is what it wrote
        (through the page cache); one staged by an earlier run was checked by ``_replay``."""
        try:
            raw = self.store.raw_file(c)
            if raw is None:
                out.append_tensor(c.key, tuple(c.offsets), self.store.read(c, self._dtype(c)))
            else:
                out.append_copy(c.key, tuple(c.offsets), c.sizes, self._dtype(c), raw, self.crc[self._id(c)])
        except (StagedChunkMissing, FileNotFoundError, TornSource, ValueError) as e:
            raise OutputError(f"{e}: staged chunk of {c.key} at {list(c.offsets)} is missing or torn; run the "
                              "same command again to redo it") from None

    # ------------------------------------------------------------------ commit

    def _wait_assembled(self) -> None:
        unstaged = [c for c in self.plan.chunks if c.file not in self.assembled and self._id(c) not in self.crc]
        if unstaged:  # the engine is done: nothing else will stage them
            self._shutdown()
            raise RuntimeError(f"{len(unstaged)} chunks were never staged, first {unstaged[0].key} "
                               f"{list(unstaged[0].offsets)}")
        self._thread.join()
        self._check()
        missing = [f for f in self.by_file if f not in self.assembled]
        if missing:
            raise RuntimeError(f"files {missing} were never assembled")

    def close(self) -> None:
        """Wait for assembly; objects and common state; ``.metadata`` last (the commit)."""
        self._wait_assembled()
        self._shutdown()
        if self.keep_staging:
            self._refill_staging()
            self.store.fsync_all()
        else:
            shutil.rmtree(self.store.path, ignore_errors=True)
        commit_checkpoint(self.ckpt, self.plan, self.by_file, self.assembled, self.extra_state)
        self.journal.append({"t": "done"}, sync=True)
        self.journal.close()

    def _refill_staging(self) -> None:
        """``--keep-staging`` on a resumed run: chunks an earlier run dropped are read back from the ``.distcp``."""
        import io

        for f, entries in self.assembled.items():
            path = self.ckpt / distcp_name(f)
            with open(path, "rb") as fh:
                for c, (_, _, off, n) in zip(self.by_file[f], entries):
                    if all(p.is_file() for p in self.store.chunk_paths(c)):
                        continue
                    fh.seek(off)
                    t = torch.load(io.BytesIO(fh.read(n)), map_location="cpu", weights_only=True)
                    self.store.write(c, t)

    def _shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

    def abort(self) -> None:
        """Stop the assembler (a ``.partial`` file may stay: the next run deletes it); state stays resumable."""
        self._shutdown()
        self.journal.close()
