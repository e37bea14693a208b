"""Scale-out over torch.distributed: one conversion run by several processes (``torchrun``, ``srun``).

Under a launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (torchrun does;
``srun`` with them exported), ``hf2mcore`` and ``mcore2hf`` split their plan between the processes by
output file (``split``: contiguous runs of files, balanced by bytes, so each rank reads its sources in
order). Every rank plans the whole conversion (planning reads headers only) and checks that all ranks
planned the same (``Job.agree``); rank 0 alone prepares the output folder and holds its lock
(``Job.on_rank0``); each rank then runs the ordinary bounded-memory engine on its files; rank 0 commits
(``.metadata`` or the HF index, then the tracker) once every rank has reported its files written.
The collectives are gloo's, on the CPU: no GPU is needed.

While the engine runs, a ``Heartbeat`` thread exchanges each rank's state with all the others, a small
all-gather on a group of its own every ``HEARTBEAT_SECONDS`` (or at once when the state changes): bytes
done and kept (rank 0 draws the whole job's progress from them), and failures. A rank whose part fails
publishes its one-line error in the next round, and every other rank stops with that line
(``PeerFailed``, the same exit code). A rank that dies (SIGKILL, OOM) breaks the round's connections
(gloo: "connection closed by peer"): the others stop at once, naming the rank whose process is gone
when it ran on their host. torchrun also sends the survivors SIGTERM when a rank dies; they then say
which rank ended.

Without a launcher (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``) none of this is imported and nothing changes.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import threading
import time
from pathlib import Path
from contextlib import contextmanager

from streamconv.runtime import interrupt
from streamconv.errors import EXIT_INTERNAL, StreamconvError, UsageError

HEARTBEAT_SECONDS = 0.5  # how often ranks exchange state while they work (latency of progress and of errors)
SETUP_TIMEOUT = datetime.timedelta(minutes=30)  # planning, the output's preparation, the commit
WORK_TIMEOUT = datetime.timedelta(days=7)  # the heartbeat group waits as long as the slowest rank works
FAIL_WAIT_SECONDS = 30.0  # a failing rank waits this long, at most, for its error to reach the others

_current: "Job | None" = None


def launched() -> bool:
    """Whether this process is one of several started by a launcher (WORLD_SIZE > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def current() -> "Job | None":
    """The job this process belongs to, once ``Job.start`` ran; None when it runs alone."""
    return _current


def place(job: "Job | None") -> tuple[int, int]:
    """``(rank, world)`` of this process: ``(0, 1)`` alone."""
    return (job.rank, job.world) if job is not None else (0, 1)


def set_up(job: "Job | None", setup, identity_of, close, what: str):
    """``setup()``: alone, or on every rank of ``job`` with the ranks checked to agree (``Job.same_everywhere``)."""
    return setup() if job is None else job.same_everywhere(setup, identity_of, close, what)


def split(sizes: dict[int, int], world: int) -> list[set[int]]:
    """Which files each rank writes: contiguous runs in file order, cut where the bytes pass each rank's
    share (a file goes to the rank its middle byte falls in). Pure, the same on every rank."""
    out: list[set[int]] = [set() for _ in range(world)]
    total = sum(sizes.values())
    at = 0
    for f in sorted(sizes):
        middle = at + sizes[f] / 2
        r = min(world - 1, int(middle * world / total)) if total else f % world
        out[r].add(f)
        at += sizes[f]
    return out


def idle_note(parts: list[set[int]], unit: str, option: str, total: int) -> str | None:
    """The line for a split that leaves ranks without a file (fewer files than ranks), naming them and the
    option that makes more files; None when every rank has work. Pure."""
    idle = [r for r, part in enumerate(parts) if not part]
    if not idle:
        return None
    files = sum(len(part) for part in parts)
    share = total // len(parts)
    share = f"{share // 2**20}MiB" if share >= 2**20 else f"{max(1, share // 2**10)}KiB"
    return (f"{files} {unit}{'' if files == 1 else 's'} for {len(parts)} processes: rank "
            f"{', '.join(map(str, idle))} {'has' if len(idle) == 1 else 'have'} nothing to write ({option} "
            f"{share} or less gives every rank some)")


class PeerFailed(StreamconvError):
    """Another rank of the job failed: its line, and its exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def error_state(e: BaseException) -> tuple[int, str]:
    """(exit code, one line) of an exception, as the CLI would report it."""
    if isinstance(e, PeerFailed):
        return e.exit_code, str(e)
    if isinstance(e, StreamconvError):
        return e.exit_code, str(e)
    if isinstance(e, KeyboardInterrupt):
        sig = interrupt.received()
        return 128 + sig, f"interrupted by signal {sig}"
    return EXIT_INTERNAL, f"internal error: {type(e).__name__}: {e}"


DEATH_POLLS = 200  # x DEATH_POLL_SECONDS: how long a lost rank's process may take to show as dead
DEATH_POLL_SECONDS = 0.01


class Job:
    """This process's place in a distributed conversion: rank, world, the collectives it uses."""

    def __init__(self, rank: int, world: int, local_world: int):
        self.rank, self.world, self.local_world = rank, world, local_world
        self.peers: list[tuple[str, int]] = []  # (host, pid) per rank
        self._dist = None
        self._beat_group = None

    @classmethod
    def start(cls, backend: str = "gloo") -> "Job":
        """Join the job the launcher started (gloo, unless ``backend``): every rank calls it."""
        global _current
        try:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        except (KeyError, ValueError):
            raise UsageError("WORLD_SIZE is set but RANK is not (or not a number): launch with torchrun, or with "
                             "srun exporting RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT") from None
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise UsageError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: launch with torchrun, or "
                             "export MASTER_ADDR and MASTER_PORT of rank 0's host")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
        import torch.distributed as td

        job = cls(rank, world, local_world)
        job._dist = td
        try:
            td.init_process_group(backend, rank=rank, world_size=world, timeout=SETUP_TIMEOUT)
            job._beat_group = td.new_group(backend="gloo", timeout=WORK_TIMEOUT)
        except (RuntimeError, ValueError) as e:
            raise UsageError(f"rank {rank} of {world}: cannot join the job at {os.environ['MASTER_ADDR']}:"
                             f"{os.environ['MASTER_PORT']} ({str(e).splitlines()[0][:200]})") from None
        job.peers = [tuple(p) for p in job.gather((socket.gethostname(), os.getpid()))]
        # torch's import left ~170,000 objects that live as long as the process: out of the collector's reach,
        # so that a full collection does not walk them all (rank 0's commit builds .metadata's many objects;
        # docs/benchmarks.md has the figures)
        gc.freeze()
        _current = job
        return job

    def close(self) -> None:
        """Leave the job's process groups (``current()`` stays: the CLI names the rank in its last line)."""
        if self._dist is not None and self._dist.is_initialized():
            self._dist.destroy_process_group()

    @property
    def prefix(self) -> str:
        return f"rank {self.rank}: "

    # ---------------------------------------------------------------------- who is gone

    def dead_peers(self) -> list[int]:
        """Ranks on this host whose process is gone (or a zombie): a rank on another host is not seen."""
        here = socket.gethostname()
        dead = []
        for r, (host, pid) in enumerate(self.peers):
            if r == self.rank or host != here:
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    gone = f.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
            except OSError:
                gone = True
            if gone:
                dead.append(r)
        return dead

    def lost(self) -> PeerFailed:
        """The error for a job that lost a rank (its connections closed). A killed process closes its sockets
        a moment before it shows as a zombie: its state is polled until one shows dead, at most
        ``DEATH_POLLS`` times (a rank on another host never shows: then "another rank")."""
        dead = self.dead_peers()
        for _ in range(DEATH_POLLS):
            if dead:
                break
            time.sleep(DEATH_POLL_SECONDS)
            dead = self.dead_peers()
        who = (f"rank {', '.join(map(str, dead))} ended unexpectedly (killed or crashed)" if dead
               else "another rank ended unexpectedly (killed, crashed, or its host is unreachable)")
        return PeerFailed(f"stopped: {who}; nothing was committed, re-run the same command to resume", 1)

    @contextmanager
    def _collective(self):
        try:
            yield
        except RuntimeError as e:  # gloo: a peer's connection closed, or the wait timed out
            raise self.lost() from e

    # ---------------------------------------------------------------------- collectives

    def gather(self, obj, group=None) -> list:
        """``obj`` of every rank, in rank order (on every rank)."""
        out = [None] * self.world
        with self._collective():
            self._dist.all_gather_object(out, obj, group=group)
        return out

    def agree(self, fn):
        """Run ``fn()`` on every rank; if any rank fails, every rank raises: its own error, or the first
        failing rank's line as ``PeerFailed``. Returns every rank's result."""
        try:
            mine = ("ok", fn())
        except StreamconvError as e:
            mine = ("error", e.exit_code, str(e))
            error = e
        else:
            error = None
        everyone = self.gather(mine)
        for r, got in enumerate(everyone):
            if got[0] == "error":
                if error is not None:
                    raise error
                raise PeerFailed(f"stopped: rank {r} failed: {got[2]}", got[1])
        return [got[1] for got in everyone]

    def same_everywhere(self, setup, identity_of, close, what: str):
        """``setup()`` on every rank (``agree``: a failure anywhere stops all); every rank must find the same
        ``identity_of(result)`` (else ``close(result)`` and a one-line refusal naming the first rank that
        differs, and ``what`` it sees). Returns this rank's result."""
        got: list = []
        identities = self.agree(lambda: identity_of(got.append(setup()) or got[0]))
        other = next((r for r, i in enumerate(identities) if i != identities[0]), None)
        if other is not None:
            close(got[0])
            raise UsageError(f"rank {other} sees {what} than rank 0 (the same files on a shared file system, the same "
                             "streamconv and the same options on every rank are needed)")
        return got[0]

    def same_folder(self, folder: Path, token_file: str, flag: str) -> None:
        """Every rank writes into the folder rank 0 prepared: rank 0 writes a token of its own there (after
        preparing it), every rank reads it back, and a rank whose ``folder`` is another one (another path, a
        relative path on another working directory, a node-local folder of the same name) stops the job in
        one line, before anything is written."""
        import secrets

        from streamconv.files.atomic import fsync_write

        path = Path(folder) / token_file

        def write() -> str:
            token = secrets.token_hex(16)
            path.parent.mkdir(parents=True, exist_ok=True)
            fsync_write(path, token.encode())
            return token

        token = self.on_rank0(write)

        def check() -> None:
            try:
                seen = path.read_text()
            except OSError:
                seen = None
            if seen != token:
                raise UsageError(f"{folder}: not the folder rank 0 prepared ({flag} must name one folder on a file "
                                 "system every rank sees, with the same path on every node)")

        self.agree(check)

    def on_rank0(self, fn):
        """Run ``fn()`` on rank 0 only and hand its result (or its error) to every rank."""
        box = [None]
        error = None
        if self.rank == 0:
            try:
                box[0] = ("ok", fn())
            except BaseException as e:
                error = e
                box[0] = ("error", *error_state(e))
        with self._collective():
            self._dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0][0] == "error":
            raise PeerFailed(f"stopped: rank 0 failed: {box[0][2]}", box[0][1])
        return box[0][1]

    def heartbeat(self, on_round=None) -> "Heartbeat":
        return Heartbeat(self, on_round)


class Heartbeat:
    """The job's pulse while ranks work (see the module docstring): ``with job.heartbeat() as hb:``.

    ``hb.state`` holds this rank's figures (``done``, ``kept`` bytes, ``chunks``); ``hb.finish(result)``
    waits for every rank to finish and returns their results; an exception leaving the block is sent to
    the others before it goes on.
    """

    def __init__(self, job: Job, on_round=None):
        self.job = job
        self.on_round = on_round
        self.state = {"state": "working", "done": 0, "kept": 0, "chunks": 0}
        self.results: list | None = None
        self.failure: BaseException | None = None
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="streamconv-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None and self.failure is None:  # ours: tell the others before going on
            code, line = error_state(exc)
            self.state = {**self.state, "state": "failed", "code": code, "line": line}
            self._wake.set()
            self._thread.join(FAIL_WAIT_SECONDS)

    def _loop(self) -> None:
        while True:
            mine = dict(self.state)
            try:
                everyone = self.job.gather(mine, group=self.job._beat_group)
            except PeerFailed as e:
                if self.state["state"] != "failed":
                    self._stop(e)
                return
            if self.on_round is not None:
                self.on_round(everyone)
            failed = [(r, s) for r, s in enumerate(everyone) if s["state"] == "failed"]
            if failed:
                if mine["state"] != "failed":
                    r, s = failed[0]
                    self._stop(PeerFailed(f"stopped: rank {r} failed: {s['line']}", s["code"]))
                return
            if all(s["state"] == "finished" for s in everyone):
                self.results = [s["result"] for s in everyone]
                return
            if mine["state"] == "finished":  # straight into the next round: it ends when the last rank finishes
                continue  # (a rank that is done waits in the gather, not asleep: up to 0.5 s saved at the end)
            self._wake.wait(HEARTBEAT_SECONDS)
            self._wake.clear()

    def _stop(self, error: PeerFailed) -> None:
        self.failure = error
        interrupt.cancel(error)

    def finish(self, result):
        """This rank's part is done (``result`` goes to every rank): wait for all, return their results."""
        self.state = {**self.state, "state": "finished", "result": result}
        self._wake.set()
        while self._thread.is_alive():
            self._thread.join(0.2)  # short waits: a signal, or a peer's failure, reaches this thread
        if self.results is None:
            raise self.failure or self.job.lost()
        return self.results


def job_progress(progress, hb_ranks: int):
    """An ``on_round`` for rank 0: the other ranks' bytes and chunks into rank 0's progress display."""
    seen = [{"done": 0, "kept": 0, "chunks": 0} for _ in range(hb_ranks)]
    remote = getattr(progress, "remote", None)
    if remote is None:  # nothing drawn (--quiet, not a terminal)
        return None

    def on_round(everyone) -> None:
        for r, s in enumerate(everyone):
            if r == 0:
                continue
            delta = {k: s[k] - seen[r][k] for k in ("done", "kept", "chunks")}
            seen[r] = {k: s[k] for k in ("done", "kept", "chunks")}
            if any(delta.values()):
                remote(delta["done"], delta["kept"], delta["chunks"])

    return on_round


class Counting:
    """A progress sink that counts this rank's figures into the heartbeat's state, then passes on."""

    def __init__(self, inner, hb: Heartbeat):
        self.inner, self.hb = inner, hb
        self._lock = threading.Lock()

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def advance(self, chunk, in_flight: int, skipped: bool = False) -> None:
        with self._lock:
            s = dict(self.hb.state)
            s["kept" if skipped else "done"] += chunk.nbytes
            s["chunks"] += 1
            self.hb.state = s
        self.inner.advance(chunk, in_flight, skipped)

    def remote(self, done: int, kept: int, chunks: int) -> None:
        remote = getattr(self.inner, "remote", None)
        if remote is not None:
            remote(done, kept, chunks)
