"""The output folder of a command: never the input, one writer at a time, cleared markers first.

- ``refuse_overlap``: an output that is, contains or lies inside an input (symlinks resolved) is refused
  before anything is created or deleted (``--overwrite`` would delete the model being read).
- ``OutputLock``: an exclusive ``flock`` on ``<out>/.streamconv.lock`` (which holds the owner's pid), held
  for the whole run; a second run on the same folder is refused at once, naming that pid. The owner
  removes the file when it ends (while holding the lock; a run that opened the old file checks, once
  it has the lock, that the name still leads to it), so a folder carries no lock file between runs.
- ``clear``: empty a folder for ``--overwrite``: the commit markers first (tracker, ``.metadata``, the
  index), so a kill in the middle never leaves an old checkpoint's markers over a half-deleted folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from streamconv.errors import OutputError, UsageError, output_error
from streamconv.files.atomic import NOFOLLOW
from streamconv.formats.names import LOCK_FILE



def _both(path) -> set[Path]:
    """A path as given (absolute, normalized) and with its symlinks resolved (a loop of links: one line)."""
    p = Path(path).expanduser()
    try:
        return {Path(os.path.abspath(p)), p.resolve()}
    except (RuntimeError, OSError) as e:  # RuntimeError: "Symlink loop" (Python < 3.13)
        raise UsageError(f"{p}: its symlinks do not resolve ({e}); pass a real folder") from None


def refuse_overlap(out: Path, inputs, flag: str) -> None:
    """``out`` must be apart from every folder in ``inputs``: not the same, not above, not inside, both as
    the paths are written and with symlinks resolved (``--overwrite`` deletes what is under ``out``)."""
    outs = _both(out)
    for i in inputs:
        for p in _both(i):
            for o in outs:
                if p == o:
                    raise UsageError(f"{out}: the output folder is the input {p}; choose another {flag}")
                if o in p.parents:
                    raise UsageError(f"{out}: the output folder holds the input {p}; choose another {flag}")
                if p in o.parents:
                    raise UsageError(f"{out}: the output folder lies inside the input {p}; choose another {flag}")


class OutputLock:
    """``with OutputLock(out):`` -- this process is the only streamconv writing ``out`` (created if needed)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        path = self.out / LOCK_FILE
        for _ in range(100):  # a lock file removed by its owner between our open and our flock: open again
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644)
            except OSError as e:
                raise output_error(path, e) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise OutputError(f"{self.out}: another streamconv is writing this folder (pid {owner}); wait for "
                                  "it to end, or choose another output folder") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise OutputError(f"{self.out}: cannot lock {LOCK_FILE} (it keeps disappearing)")
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            raise output_error(path, e) from e
        return self

    def __exit__(self, *exc) -> None:
        """Remove the lock file, then let go (holding the lock, so no one else's file is removed; a run that
        opened it meanwhile sees it gone and opens a new one)."""
        if self.fd is not None:
            try:
                (self.out / LOCK_FILE).unlink()
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def job_lock(out: Path, job):
    """``OutputLock`` for a run alone or for a distributed job (``dist.Job``): rank 0 takes it, and a refusal
    reaches every rank as rank 0's own line (not as a rank that "ended unexpectedly")."""
    if job is None:
        with OutputLock(out):
            yield
        return
    lock = OutputLock(out) if job.rank == 0 else None
    job.on_rank0((lambda: lock.__enter__() and None) if lock is not None else None)
    try:
        yield
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def clear(out: Path, markers) -> None:
    """Delete everything in ``out`` but the lock file: ``markers`` (paths relative to ``out``) first."""
    try:
        for m in markers:
            p = Path(out) / m
            if p.is_file() or p.is_symlink():
                p.unlink()
        for p in Path(out).iterdir():
            if p.name == LOCK_FILE:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    except OSError as e:
        raise output_error(out, e) from e


def refuse_linked_folders(out: Path) -> None:
    """An output folder to resume in must hold no symlinked folder (``iter_0000000``, ``.streamconv``, the zarr
    view's chunk folders): a resume would write, and delete leftovers, through it, outside ``out``. Files are
    opened ``O_NOFOLLOW`` already; folders are refused here, in one line (exit 4)."""
    for root, dirs, _ in os.walk(out):  # os.walk does not descend into symlinked folders
        for d in dirs:
            p = Path(root) / d
            if p.is_symlink():
                raise OutputError(f"{p}: a symlinked folder inside the output (-> {os.readlink(p)}); streamconv "
                                  "never writes through links: remove it, pass --overwrite, or choose another folder")


def is_empty(out: Path) -> bool:
    """Nothing in ``out`` but (maybe) our lock file."""
    return not any(p.name != LOCK_FILE for p in Path(out).iterdir())
