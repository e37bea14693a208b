"""The Hub source: a model on the Hugging Face Hub read where the plan asks, over HTTP range requests.

No weight byte is written locally. ``HubModel.resolve`` pins the revision (a branch, a tag or a sha) to its
commit once, at planning (``HfApi.model_info``: the commit and every file's size and, for LFS files, SHA-256);
every request after that names the commit, so a branch that moves during a run (or between a run and its
resume) changes nothing. ``HubModel.fetch_small`` puts the small files (config, index, tokenizer, generation
config) in the Hugging Face cache with ``hf_hub_download``, as any client would. ``HubSource`` reads each
shard's safetensors header with two range requests, then each chunk's bytes with one range request per run of
contiguous bytes, straight into the chunk's buffer (the engine's buffered path, one reader thread per
connection: ``--connections``).

All HTTP goes through ``huggingface_hub``: its endpoint (``HF_ENDPOINT``), token (``HF_TOKEN``, ``hf auth
login``), user agent, proxies and session (``get_session``), and its ``http_stream_backoff``, which retries a
request on connection errors, ``429`` (honouring ``Retry-After``) and ``5xx``. A body that breaks off (a dropped
connection, a short body) is asked for again from the byte where it stopped, with backoff, ``RETRIES`` times;
a Hub that stays unreachable ends the run in one line (exit 4: ``SourceIOError``); ``401``/``403``/``404`` say
what to do (exit 3).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from streamconv import crashpoints
from streamconv.dtypes import DType
from streamconv.engine.contracts import Source
from streamconv.engine.scatter import contiguous_runs
from streamconv.errors import BadInputError, SourceIOError
from streamconv.formats.names import TOKENIZER_FILES
from streamconv.formats.safetensors import TensorInfo, header_length, parse_header
from streamconv.sources.safetensors import rows_extent, rows_tensor, tensors_of

INDEX_FILE = "model.safetensors.index.json"
# what is fetched into the cache: never a weight
SMALL_FILES = ("config.json", INDEX_FILE, "generation_config.json", "hf_quant_config.json", *TOKENIZER_FILES)
RETRIES = 8  # tries of one range after a body broke off (each request is also retried by huggingface_hub)
DEFAULT_CONNECTIONS = 16
BASE_WAIT = float(os.environ.get(crashpoints.HUB_WAIT_HOOK, "1.0"))  # seconds before the first retry


def _errors():
    """huggingface_hub's exception classes, imported when first needed."""
    from huggingface_hub import errors

    return errors


def hub_error(repo_id: str, what: str, e: Exception) -> Exception:
    """One line for a failure of the Hub, with what to do: a ``BadInputError`` (exit 3) for what the user can
    fix (an id, a revision, access), a ``SourceIOError`` (exit 4) for a Hub that cannot be reached."""
    errs = _errors()
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, errs.GatedRepoError):
        return BadInputError(f"{repo_id}: gated on the Hub: request access on its page, then log in (hf auth login, "
                             "or HF_TOKEN)")
    if isinstance(e, errs.RevisionNotFoundError):
        return BadInputError(f"{repo_id}: {what}: no such revision on the Hub; check --revision")
    if isinstance(e, errs.EntryNotFoundError):
        return BadInputError(f"{repo_id}: {what}: not in the repository at the pinned revision")
    if isinstance(e, errs.RepositoryNotFoundError) or status == 401:
        return BadInputError(f"{repo_id}: not found on the Hub, or private: check the id, or log in (hf auth login, "
                             "or HF_TOKEN) with an account that may read it")
    if status == 403:
        return BadInputError(f"{repo_id}: {what}: access refused (403): log in with an account that may read it")
    if status == 416:
        return BadInputError(f"{repo_id}: {what}: the Hub refused a byte range inside the file (416): its size "
                             "changed; run again")
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    return SourceIOError(f"{repo_id}: {what}: the Hub cannot be reached ({detail[:200]}); check the network "
                         "(HF_ENDPOINT, proxies), then run the same command again: it resumes")


@dataclass(frozen=True)
class HubFile:
    name: str
    size: int
    sha256: str | None  # the SHA-256 of an LFS file, as the Hub records it


@dataclass
class HubModel:
    """A repository at a pinned commit, and its files."""

    repo_id: str
    revision: str  # as asked (a branch, a tag or a sha)
    sha: str  # the commit it resolved to
    files: dict[str, HubFile]

    @classmethod
    def resolve(cls, repo_id: str, revision: str | None = None) -> "HubModel":
        from huggingface_hub import HfApi

        quiet_hub_logs()
        try:
            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        except Exception as e:  # the Hub raises many types (offline, not found, auth, network)
            raise hub_error(repo_id, f"revision {revision or 'main'}", e) from None
        files = {}
        for s in info.siblings or []:
            lfs = getattr(s, "lfs", None)
            files[s.rfilename] = HubFile(s.rfilename, int(s.size or 0), getattr(lfs, "sha256", None) if lfs else None)
        if not isinstance(info.sha, str) or len(info.sha) != 40:
            raise BadInputError(f"{repo_id}: the Hub gave no commit for revision {revision or 'main'}")
        return cls(repo_id, revision or "main", info.sha, files)

    def url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, name, revision=self.sha)

    def weights(self) -> list[str]:
        return sorted(n for n in self.files if n.endswith(".safetensors") and "/" not in n)

    def fetch_small(self) -> Path:
        """The small files, through the cache; returns the snapshot folder holding them (never a weight)."""
        from huggingface_hub import hf_hub_download

        folder = None
        for name in SMALL_FILES:
            if name not in self.files:
                continue
            try:
                folder = Path(hf_hub_download(self.repo_id, name, revision=self.sha)).parent
            except Exception as e:
                raise hub_error(self.repo_id, name, e) from None
        if folder is None or not (folder / "config.json").is_file():
            raise BadInputError(f"{self.repo_id}: no config.json in the repository at {self.sha[:12]}: not a "
                                "transformers model")
        return folder

    def cached_folder(self) -> Path | None:
        """The cache's snapshot folder when every weight file of the pinned commit is in the local cache, each
        the blob the Hub records (the cache names an LFS blob by its SHA-256: a cached file whose blob has
        another name, or that is not a link to a blob of its size, is not taken; then the model is streamed)."""
        from huggingface_hub import try_to_load_from_cache

        found = [try_to_load_from_cache(self.repo_id, n, revision=self.sha) for n in self.weights()]
        if not found or not all(isinstance(p, str) for p in found):
            return None
        for name, p in zip(self.weights(), found):
            blob = Path(p).resolve()
            want = self.files[name]
            if (want.sha256 is not None and blob.name != want.sha256) or not blob.is_file() or \
                    blob.stat().st_size != want.size:
                return None
        return Path(found[0]).parent

    def identity(self) -> dict:
        """What a resumed run must find again (``runtime/resume.py``): the repository, the pinned commit, and
        each weight file's size and SHA-256 (not the revision asked for: a branch is resumed on its commit)."""
        return {"hub": self.repo_id, "sha": self.sha,
                "files": [{"name": n, "size": self.files[n].size, "sha256": self.files[n].sha256}
                          for n in self.weights()]}


@dataclass
class HubStats:
    """What the Hub source did (``--json``'s ``hub``)."""

    bytes_fetched: int = 0
    requests: int = 0
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)


class _RetryCounter(logging.Filter):
    """huggingface_hub says each retry of its backoff as a warning on stderr: counted here (``--json``'s
    ``retries``) instead of printed, so a run that recovers prints nothing and one that fails one line."""

    def __init__(self):
        super().__init__()
        self.stats: HubStats | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if self.stats is not None and record.getMessage().startswith(("Retrying", "Rate limited")):
            self.stats.add(retries=1)
        return False


_COUNTER = _RetryCounter()


def quiet_hub_logs(stats: HubStats | None = None) -> None:
    """Count huggingface_hub's retry warnings into ``stats`` instead of printing them."""
    logger = logging.getLogger("huggingface_hub.utils._http")
    if _COUNTER not in logger.filters:
        logger.addFilter(_COUNTER)
    if stats is not None:
        _COUNTER.stats = stats


class HubSource(Source):
    """The weights of ``model`` read over HTTP (``folder``: its small files, from ``fetch_small``). The engine
    fills each chunk's buffer through ``read_into`` (``reads = "buffer"``); thread-safe."""

    reads = "buffer"

    def __init__(self, model: HubModel, folder: Path, cfg: dict | None = None):
        from huggingface_hub.utils import build_hf_headers

        self.model = model
        self.folder = Path(folder)
        self.stats = HubStats()
        quiet_hub_logs(self.stats)
        self._headers = {**build_hf_headers(), "Accept-Encoding": "identity"}
        index = self.folder / INDEX_FILE
        weight_map = None
        if index.is_file():
            from streamconv.formats.safetensors import read_index

            weight_map = read_index(index)
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if shard not in model.files:
                    raise BadInputError(f"{model.repo_id}: shard {shard} named in {INDEX_FILE} is not in the "
                                        f"repository at {model.sha[:12]}")
        else:
            shards = model.weights()
            if not shards:
                raise BadInputError(f"{model.repo_id}: no *.safetensors files in the repository at {model.sha[:12]}")
        self.tensors = tensors_of(model.repo_id, shards, self._read_header, weight_map, self.where)
        self.quant = None
        self.dequant: dict = {}
        if cfg is not None:
            from streamconv.sources import quantized

            self.quant = quantized.detect(self, self.folder, cfg)
            self.dequant = self.quant.scales if self.quant is not None else {}

    def where(self, shard: str) -> PurePosixPath:
        """How a shard is named in messages: ``hf:owner/name@<sha>/<file>``."""
        return PurePosixPath(f"hf:{self.model.repo_id}@{self.model.sha[:12]}") / shard

    def _read_header(self, shard: str) -> dict[str, TensorInfo]:
        size = self.model.files[shard].size
        where = self.where(shard)
        if size < 8:
            raise BadInputError(f"{where}: not a safetensors file ({size} bytes)")
        head = bytearray(8)
        self.fetch(shard, 0, [memoryview(head)])
        n = header_length(where, bytes(head), size)
        raw = bytearray(n)
        if n:
            self.fetch(shard, 8, [memoryview(raw)])
        return parse_header(where, bytes(raw), n, size)

    # ------------------------------------------------------------------ engine interface

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise BadInputError(f"{self.model.repo_id}: tensor {name!r} is needed but not in the checkpoint") from None

    def dtype_of(self, name: str) -> DType:
        return self.info(name).dtype

    def read_nbytes(self, read) -> int:
        return rows_extent(self.info(read.name), read.row0, read.row1, read.index)[2]

    def read_rows(self, name: str, row0: int, row1: int, index: tuple[int, ...] = ()):
        info = self.info(name)
        path, pos, length = rows_extent(info, row0, row1, index)
        buf = bytearray(length)
        self.fetch(path.name, pos, [memoryview(buf)])
        return rows_tensor(info, buf, row0, row1, index, self.dequant.get(name))

    def read_into(self, chunk, buf) -> None:
        """The chunk's reads into the rows of ``buf``: the byte runs that continue each other in a shard are one
        range request, scattered into their places (a read of another dtype, or a quantized weight, is read
        as a tensor and cast on copy)."""
        import torch

        raw = buf.reshape(-1).view(torch.uint8).numpy()
        pieces, row = [], 0
        row_bytes = buf.shape[1] * buf.element_size()  # buf: [rows, row elements]
        for r in chunk.reads:
            n_rows = r.row1 - r.row0
            if self.dtype_of(r.name) != buf.dtype or r.name in self.dequant:
                part = self.read_rows(r.name, r.row0, r.row1, r.index)
                buf[row:row + n_rows].copy_(part.reshape(buf[row:row + n_rows].shape))
            else:
                path, off, n = rows_extent(self.info(r.name), r.row0, r.row1, r.index)
                if n:
                    pieces.append((path.name, off, n, row * row_bytes))
            row += n_rows
        for run in contiguous_runs(pieces):  # one range request per run
            self.fetch(run[0][0], run[0][1], [memoryview(raw[d:d + n]) for _, _, n, d in run])

    # ------------------------------------------------------------------ HTTP

    def fetch(self, shard: str, start: int, views: list[memoryview]) -> None:
        """Bytes ``[start, start + sum of views)`` of ``shard`` at the pinned commit into ``views``, in order."""
        import httpx2
        from huggingface_hub.utils import hf_raise_for_status, http_stream_backoff

        total = sum(len(v) for v in views)
        if total == 0:
            return
        url = self.model.url(shard)
        got, failures, wait = 0, 0, BASE_WAIT
        while got < total:
            error: Exception | None = None
            try:
                headers = {**self._headers, "Range": f"bytes={start + got}-{start + total - 1}"}
                self.stats.add(requests=1)
                with http_stream_backoff("GET", url, headers=headers, follow_redirects=True, timeout=60,
                                         max_retries=RETRIES, base_wait_time=BASE_WAIT, max_wait_time=30) as r:
                    hf_raise_for_status(r)
                    want = f"bytes {start + got}-{start + total - 1}/"
                    if r.status_code != 206 or not r.headers.get("Content-Range", "").startswith(want):
                        raise BadInputError(f"{self.where(shard)}: the Hub answered a byte-range request with "
                                            f"{r.status_code} {r.headers.get('Content-Range', '')!r}, not the range")
                    try:  # (an error raised out of this block would be taken for the request's and retried whole)
                        for block in r.iter_bytes(1 << 20):
                            got = _scatter(views, got, block, total, self.where(shard))
                            self.stats.add(bytes_fetched=len(block))
                    except (httpx2.TransportError, httpx2.StreamError) as e:  # the body broke off
                        error = e
            except (httpx2.TransportError, _errors().HfHubHTTPError) as e:  # still failing after its retries
                raise hub_error(self.model.repo_id, shard, e) from None
            if got < total:
                failures += 1
                self.stats.add(retries=1)
                if failures > RETRIES:
                    raise hub_error(self.model.repo_id, shard, error or ConnectionError(
                        f"the body broke off {RETRIES + 1} times")) from None
                time.sleep(wait)
                wait = min(30.0, wait * 2)

    def files(self) -> list[str]:
        return sorted({info.path.name for info in self.tensors.values()})

    # ------------------------------------------------------------------ integrity

    def check_hashes(self, plan, placed, workers: int = 2) -> dict:
        """Every shard the plan read, hashed in order and compared with the SHA-256 the Hub records for it.

        SHA-256 needs a file's bytes in order, and the plan reads them in its own order; holding what arrives
        early would take up to a whole tensor. So the bytes are hashed from where they now are: each source
        range a chunk copied unchanged (no cast, no dequantization) is read back from the output
        (``placed(chunk)``: the file and offset of the chunk's bytes there), and the rest of the shard (its
        header, tensors the plan leaves out, ranges a cast changed) is fetched again from the Hub. Memory: a
        piece of 8 MiB per thread. Returns the figures and ``mismatched``: the shards whose hash differs
        (what the Hub sent is not the file it records: the output made from it must not be committed)."""
        import hashlib
        from concurrent.futures import ThreadPoolExecutor

        segments: dict[str, list] = {}
        for c in plan.chunks:
            out = placed(c)
            same = out is not None and all(self.dtype_of(r.name) == plan.targets[c.key].dtype
                                           and r.name not in self.dequant for r in c.reads)
            pos = 0
            for r in c.reads:
                path, off, n = rows_extent(self.info(r.name), r.row0, r.row1, r.index)
                if n and same:
                    segments.setdefault(path.name, []).append((off, n, out[0], out[1] + pos))
                pos += n
        shards = [f for f in self.files() if self.model.files[f].sha256]
        figures = {"shards_checked": 0, "bytes_hashed": 0, "bytes_refetched": 0, "mismatched": []}
        lock = threading.Lock()
        piece = 8 << 20

        def one(shard: str) -> None:
            h, at, refetched = hashlib.sha256(), 0, 0
            buf = bytearray(piece)
            size = self.model.files[shard].size

            def fetch_upto(end: int) -> None:
                nonlocal at, refetched
                while at < end:
                    n = min(piece, end - at)
                    view = memoryview(buf)[:n]
                    self.fetch(shard, at, [view])
                    h.update(view)
                    at, refetched = at + n, refetched + n

            for off, n, path, out_off in sorted(segments.get(shard, [])):
                fetch_upto(off)
                skip = max(0, at - off)  # a range read twice (a tied embedding): hashed once
                if skip >= n:
                    continue
                with open(path, "rb", buffering=0) as f:
                    pos, end = out_off + skip, out_off + n
                    while pos < end:
                        got = os.preadv(f.fileno(), [memoryview(buf)[:min(piece, end - pos)]], pos)
                        if got <= 0:
                            raise BadInputError(f"{path}: ended while its bytes were checked against the Hub")
                        h.update(memoryview(buf)[:got])
                        pos += got
                at = off + n
            fetch_upto(size)
            with lock:
                figures["shards_checked"] += 1
                figures["bytes_hashed"] += size
                figures["bytes_refetched"] += refetched
                if h.hexdigest() != self.model.files[shard].sha256:
                    figures["mismatched"].append(shard)

        with ThreadPoolExecutor(max(1, min(workers, len(shards) or 1)), thread_name_prefix="streamconv-hash") as pool:
            list(pool.map(one, shards))
        figures["mismatched"].sort()
        return figures

    def close(self) -> None:
        pass


def _scatter(views: list[memoryview], at: int, block: bytes, total: int, where) -> int:
    """Copy ``block`` into ``views`` (one byte stream of ``total`` bytes) from stream position ``at``."""
    if at + len(block) > total:
        raise BadInputError(f"{where}: the Hub sent more bytes than the range asked for")
    pos, i, base = 0, 0, 0
    while i < len(views) and base + len(views[i]) <= at:
        base += len(views[i])
        i += 1
    while pos < len(block):
        v = views[i]
        off = at + pos - base
        n = min(len(v) - off, len(block) - pos)
        v[off:off + n] = block[pos:pos + n]
        pos += n
        if off + n == len(v):
            base += len(v)
            i += 1
    return at + len(block)
