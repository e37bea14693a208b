"""The hf2mcore sink: every chunk written once, in its final place in its ``.distcp`` file.

Where each item lies is fixed by the plan before any byte is read: items follow each other in plan order,
and an item is ``frame.prefix + <chunk bytes> + frame.suffix(crc)`` (torch.save's own archive,
``torch_dist.frame_for``). So ``place(chunk)`` says where a chunk's bytes go, the engine writes them there
(on any of its threads, in any order), and ``placed(chunk, placement, crc)`` completes the item: the
framing around the bytes, a journal record with the CRC-32, and, once a file has all its chunks, its
commit (fsync, rename from ``.partial``, a journal record, fsync). ``write(chunk, tensor)`` does the same
from a tensor in memory (the buffered engine path: --device cuda, other sources). After the last file:
the objects file, the common files, then ``.metadata`` (``torch_dist.commit_checkpoint``).

Resume (``resume.Journal``). With ``chunk_journal`` (the default), each chunk's record is its commit,
written once its bytes and framing are on disk (``fdatasync``): a re-run keeps every committed file and,
in each ``.partial`` file left by the killed run, every journaled chunk, without reading it again, and
redoes the rest. Without it (``--no-staging``), whole files are kept and ``.partial`` files are redone.
The output is byte for byte the same in both modes, resumed or not.

``view`` (``--keep-staging``): a ``zarr_view.ZarrView`` that receives every chunk's bytes too, in the
same pass: a Zarr v3 view of the model in megatron layout.

Distributed (``dist.py``): ``files`` are the ``.distcp`` files this rank writes (the layout of each is the
same whichever rank writes it, so the output does not depend on the number of ranks); ``finish_files``
ends this rank's part and returns its files' items; rank 0 ``commit``s every rank's items.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from streamconv import crashpoints
from streamconv.runtime import resume
from streamconv.files.checksum import crc32, crc32_range
from streamconv.engine.contracts import PlacingSink, Placement
from streamconv.files.fileio import pwrite_all
from streamconv.errors import output_error
from streamconv.files.atomic import NOFOLLOW, PartialFile
from streamconv.formats.names import distcp_name
from streamconv.formats.torch_dist import commit_checkpoint, frame_for, standalone
from streamconv.sinks.kept import keep_journaled, redo_bad_chunks
from streamconv.sinks.committer import Committer


def item_slots(plan) -> tuple[dict[tuple, tuple[int, int]], dict[int, int], dict[int, list]]:
    """Where every chunk's item lies: ``{(key, offsets): (item offset, data offset)}``, each file's size, and
    each file's items ``[(key, offsets, offset, length)]`` in plan order (what ``.metadata`` records)."""
    slots, sizes, entries = {}, {}, {}
    for c in plan.chunks:
        frame = frame_for(c.sizes, plan.targets[c.key].dtype)
        at = sizes.get(c.file, 0)
        slots[c.id] = (at, at + len(frame.prefix))
        entries.setdefault(c.file, []).append((c.key, tuple(c.offsets), at, frame.length))
        sizes[c.file] = at + frame.length
    return slots, sizes, entries


class TorchDistSink(PlacingSink):
    def __init__(self, ckpt: Path, plan, journal, *, chunk_journal: bool = True, view=None, extra_state=None,
                 files=None, leader: bool = True):
        self.ckpt = Path(ckpt)
        self.plan = plan
        self.journal = journal
        self.chunk_journal = chunk_journal
        self.view = view
        self.extra_state = extra_state
        self.by_file = plan.by_file()
        self.mine = set(self.by_file) if files is None else set(files)  # the files this process writes
        self.leader = leader  # the process that cleans the folder's other leftovers and commits
        self.slots, self.sizes, self.entries = item_slots(plan)
        self.report = {"files_resumed": 0, "chunks_kept": 0, "partials_removed": 0}
        self.done: set[tuple] = set()  # chunks whose items are complete in a ``.partial`` file
        self._open: dict[int, PartialFile] = {}
        self._left: dict[int, int] = {}  # chunks still to come per file
        self._lock = threading.Lock()
        crashpoints.started()
        records = journal.records()
        self.committed: dict[int, list] = {f: items for f, items in
                                           resume.committed_files(records, self.ckpt, self.entries).items()
                                           if f in self.mine}  # final names
        self.report["files_resumed"] = len(self.committed)
        keep = {distcp_name(f) + ".partial" for f in self.by_file if f not in self.mine}  # other ranks'
        if chunk_journal:
            keep |= {distcp_name(f) + ".partial" for f in self.mine if f not in self.committed}
        self.report["partials_removed"] = resume.clean_leftovers(
            self.ckpt, keep=keep, patterns=resume.LEFTOVER_PATTERNS if leader else ("*.partial",))
        for f in self.mine:
            if f not in self.committed:
                self._left[f] = len(self.by_file[f])
        if chunk_journal:
            self._resume_partials(records)
        self._journaled = resume.journaled_crcs(records)
        self._committer = Committer(journal, self._done) if chunk_journal else None

    # ------------------------------------------------------------------ resume

    def _resume_partials(self, records) -> None:
        """Keep the journaled chunks of each ``.partial`` file: a chunk's record is written only after its
        bytes and framing are on disk (``fdatasync``), so a record that survived a crash names a chunk that
        did; a chunk without one (a kill mid-chunk, a lost last line) is done again."""
        recs = resume.chunks_of_last_open(records, {c.id: c.file for c in self.plan.chunks})
        for f in list(self._left):
            tmp = self.ckpt / (distcp_name(f) + ".partial")
            if not tmp.is_file() or tmp.is_symlink():
                continue
            if tmp.stat().st_size != self.sizes[f]:  # not the file this plan lays out: start it again
                tmp.unlink()
                self.report["partials_removed"] += 1
                continue
            self._file(f, fresh=False)
            keep_journaled(self, f, recs)
            if self._left[f] == 0:
                self._commit_file(f)

    def recheck_output(self, workers: int = 1) -> dict:
        """``--recheck``: read back every item this run keeps (in a committed ``.distcp`` or a ``.partial``) and
        compare its framing with the plan's and its bytes' CRC-32 with the journal's. A kept chunk that differs
        (a byte changed on disk, a record forged for a hole, no record at all) is done again: in a ``.partial``,
        the chunk alone (a ``redo`` record voids its old one first); in a committed file, the whole file
        (removed, so no later run keeps it). Returns ``{"output_rechecked_chunks", "output_rechecked_bytes",
        "output_chunks_redone"}``."""
        from concurrent.futures import ThreadPoolExecutor

        jobs = []
        for f in sorted(self.mine):
            if f in self.committed:
                jobs.append((f, self.ckpt / distcp_name(f), self.by_file[f]))
            elif f in self._open:
                jobs.append((f, self._open[f].tmp, [c for c in self.by_file[f] if c.id in self.done]))
        with ThreadPoolExecutor(max(1, min(workers, len(jobs) or 1)), thread_name_prefix="streamconv-recheck") as pool:
            found = list(pool.map(lambda job: self._reread(*job), jobs))
        redone = redo_bad_chunks(self, [(f, path, bad) for (f, path, _), (_, bad) in zip(jobs, found)],
                                 self.committed.__delitem__, "files_resumed")
        return {"output_rechecked_chunks": sum(len(chunks) for _, _, chunks in jobs),
                "output_rechecked_bytes": sum(n for n, _ in found), "output_chunks_redone": redone}

    def _reread(self, f: int, path: Path, chunks) -> tuple[int, list]:
        """The kept ``chunks`` of file ``f`` at ``path``, read back: (bytes read, the chunks that differ)."""
        bad, nbytes = [], 0
        buf = memoryview(bytearray(1 << 20))
        try:
            fd = os.open(path, os.O_RDONLY | NOFOLLOW)
        except OSError as e:
            raise output_error(path, e) from e
        try:
            for c in chunks:
                frame = frame_for(c.sizes, self.plan.targets[c.key].dtype)
                item_at, data_at = self.slots[c.id]
                want = self._journaled.get(c.id)
                prefix = os.pread(fd, len(frame.prefix), item_at)
                crc, got = crc32_range(fd, data_at, frame.nbytes, buf)
                at, end = data_at + got, data_at + frame.nbytes
                suffix = os.pread(fd, frame.length - frame.nbytes - len(frame.prefix), end) if at == end else b""
                nbytes += at - item_at + len(suffix)
                if want is None or crc != want or prefix != frame.prefix or suffix != frame.suffix(want):
                    bad.append(c)
        except OSError as e:
            raise output_error(path, e) from e
        finally:
            os.close(fd)
        return nbytes, bad

    def skip(self, chunk) -> bool:
        return chunk.file in self.committed or chunk.id in self.done

    def kept_crcs(self) -> dict[tuple, int]:
        """``{(key, offsets): CRC-32}`` of the chunks this run keeps, as journaled when they were written (the
        last record of a chunk is the one of the bytes in place): what ``compare.recheck_kept`` compares against."""
        return {c.id: self._journaled[c.id]
                for f in sorted(self.mine) for c in self.by_file[f]
                if self.skip(c) and c.id in self._journaled}

    # ------------------------------------------------------------------ writing (any engine thread)

    def _file(self, f: int, fresh: bool = True) -> PartialFile:
        with self._lock:
            opened = self._open.get(f)
            if opened is None:
                if fresh and self.chunk_journal:  # the chunk records of any earlier file of this name are void
                    self.journal.append({"t": "open", "file": f}, sync=True)
                opened = self._open[f] = PartialFile(self.ckpt / distcp_name(f), self.sizes[f], fresh)
            return opened

    def place(self, chunk) -> Placement:
        opened = self._file(chunk.file)
        also = []
        if self.view is not None:
            also.append((self.view.open_chunk(chunk), 0))
        return Placement(opened.fd, self.slots[chunk.id][1], opened.tmp, also)

    def placed(self, chunk, place: Placement, crc: int) -> None:
        """``chunk``'s bytes are at ``place``: complete its item; then (on the committer thread, with the
        chunk journal) make it durable and journal it (``committer.py``); commit its file when full."""
        self._check()
        for fd, _ in place.also:
            self.view.close_chunk(chunk, fd)
        self._complete(chunk, place.fd, crc)
        crashpoints.slow(1.0)
        if self._committer is not None:
            self._committer.put(chunk, place, crc)
        else:
            self._done(chunk)

    def _done(self, chunk) -> None:
        crashpoints.pause("chunk")
        with self._lock:
            self._left[chunk.file] -= 1
            full = self._left[chunk.file] == 0
        if full:
            self._commit_file(chunk.file)

    def _check(self) -> None:
        if self._committer is not None:
            self._committer.check()

    def _stop_committer(self) -> None:
        if self._committer is not None:
            self._committer.stop()

    def write(self, chunk, tensor) -> None:
        """A chunk held in memory (the buffered engine path)."""
        import torch

        t = standalone(tensor)
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        place = self.place(chunk)
        try:
            pwrite_all(place.fd, data, place.offset)
            for fd, at in place.also:
                pwrite_all(fd, data, at)
        except OSError as e:
            raise output_error(place.path, e) from e
        self.placed(chunk, place, crc32(data))

    def _complete(self, chunk, fd: int, crc: int) -> None:
        frame = frame_for(chunk.sizes, self.plan.targets[chunk.key].dtype)
        item_at, data_at = self.slots[chunk.id]
        try:
            pwrite_all(fd, frame.prefix, item_at)
            pwrite_all(fd, frame.suffix(crc), data_at + frame.nbytes)
        except OSError as e:
            raise output_error(self.ckpt / (distcp_name(chunk.file) + ".partial"), e) from e

    def _commit_file(self, f: int) -> None:
        with self._lock:
            opened = self._open.pop(f)
        opened.commit()
        self.journal.append(resume.file_record(f, opened.path, self.entries[f]), sync=True)
        with self._lock:
            self.committed[f] = self.entries[f]

    # ------------------------------------------------------------------ the end

    def close(self) -> None:
        """Objects, common state, then ``.metadata`` last (the commit)."""
        self.commit(self.finish_files())

    def finish_files(self) -> dict[int, list]:
        """Wait for this process's files to be committed; their items ``{file: [(key, offsets, offset,
        length)]}``, as written."""
        self._stop_committer()
        self._check()
        missing = [f for f in sorted(self.mine) if f not in self.committed]
        if missing:
            raise RuntimeError(f"files {missing} were never completed")
        if self.view is not None:
            self.view.finish(self)
        elif self.leader:
            resume.drop_zarr_view(self.journal)
        return dict(self.committed)

    def commit(self, entries: dict[int, list]) -> None:
        """The leader, once every file is written (``entries``: every file's items): the objects file, the
        common files, then ``.metadata`` last."""
        if self.leader:
            if sorted(entries) != sorted(self.by_file) or any(
                    [(k, tuple(o)) for k, o, *_ in entries[f]] != [c.id for c in self.by_file[f]]
                    for f in entries):
                raise RuntimeError("the files written are not the ones the plan lays out")
            commit_checkpoint(self.ckpt, self.plan, self.by_file, entries, self.extra_state)
            self.journal.append({"t": "done"}, sync=True)
        self.journal.close()

    def abort(self) -> None:
        """Close what is open; ``.partial`` files stay for the next run (which checks them)."""
        if self._committer is not None:
            self._committer.abort()  # it journals nothing more
        with self._lock:
            for opened in self._open.values():
                opened.close()
            self._open.clear()
        self.journal.close()

    def item_bytes(self, chunk) -> tuple[Path, int, int]:
        """Where a committed chunk's bytes are: (file, data offset, length)."""
        return self.ckpt / distcp_name(chunk.file), self.slots[chunk.id][1], chunk.nbytes

