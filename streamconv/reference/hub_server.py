"""A local stand-in for the Hugging Face Hub (tests/test_hub_stream.py, bench/hub.py): a real HTTP server on
127.0.0.1 speaking the part of the Hub's protocol that ``huggingface_hub`` uses to read a model, with faults a
test can inject.

Served (``HF_ENDPOINT=http://127.0.0.1:<port>`` points the real client at it):
- ``GET /api/models/<owner>/<name>[/revision/<rev>]``: the model's info: ``sha`` (the commit a branch or sha
  resolves to) and ``siblings`` (``rfilename``, ``size``, ``lfs.sha256`` for weight files, with ``blobs=True``);
- ``HEAD``/``GET /<owner>/<name>/resolve/<rev>/<file>``: the file, with the Hub's headers (``X-Repo-Commit``,
  ``ETag`` / ``X-Linked-Etag``: the git blob id, or the SHA-256 of an LFS file; ``X-Linked-Size``;
  ``Accept-Ranges``), ``Range: bytes=a-b`` answered with ``206`` and ``Content-Range``.

Faults (``Hub.faults``, each consumed as it fires): a status for the next requests of a file (``503``, ``429``
with ``Retry-After``, ``404``, ``401``), a body dropped after some bytes (the connection closed mid-body, the
headers having promised more), one byte flipped in what is sent, a cap on the bytes per second of each
connection. ``Hub.sent`` counts the body bytes sent per file; ``Hub.requests`` every request line.

    hub = Hub({"nvidia/Tiny": {"main": folder}})   # a branch -> a folder of files
    with hub.serving() as endpoint: ...
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".model")


def _sha(folder: Path) -> str:
    """A commit id for a folder's content (the same content, the same id)."""
    h = hashlib.sha1()
    for p in sorted(folder.iterdir()):
        if p.is_file():
            h.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


@dataclass
class Faults:
    status: dict = field(default_factory=dict)  # file -> [status, ...] answered (and consumed) first
    retry_after: str | None = None  # the Retry-After header sent with a 429 / 503
    drop_after: dict = field(default_factory=dict)  # file -> [n, ...]: the next GETs send n body bytes, then close
    flip: dict = field(default_factory=dict)  # file -> byte offset flipped (once) in what is sent
    rate: int | None = None  # bytes per second per connection


class Hub:
    def __init__(self, repos: dict[str, dict[str, Path]]):
        """``repos``: repo id -> {branch: folder}; each folder's content is a commit (its sha from the content)."""
        self.repos: dict[str, dict[str, str]] = {}  # repo -> {branch: sha}
        self.history: dict[str, set[str]] = {}  # repo -> every commit it ever had (a sha stays readable)
        self.commits: dict[str, Path] = {}  # sha -> folder
        for repo, branches in repos.items():
            self.set_branches(repo, branches)
        self.faults = Faults()
        self.sent: dict[str, int] = {}
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self._digests: dict = {}

    def set_branches(self, repo: str, branches: dict[str, Path]) -> None:
        refs = self.repos.setdefault(repo, {})
        for branch, folder in branches.items():
            sha = _sha(Path(folder))
            self.commits[sha] = Path(folder)
            refs[branch] = sha
            self.history.setdefault(repo, set()).add(sha)

    def bytes_sent(self, suffix: str = ".safetensors") -> int:
        with self.lock:
            return sum(n for f, n in self.sent.items() if f.endswith(suffix))

    @contextlib.contextmanager
    def serving(self):
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()

    # ------------------------------------------------------------------ what the handler asks

    def resolve(self, repo: str, rev: str) -> str | None:
        refs = self.repos.get(repo)
        if refs is None:
            return None
        if rev in refs:
            return refs[rev]
        return rev if rev in self.history.get(repo, ()) else None

    def digest(self, path: Path, kind: str) -> str:
        """A file's SHA-256 or SHA-1, computed once (a commit's files do not change)."""
        key = (path, kind)
        with self.lock:
            if key in self._digests:
                return self._digests[key]
        h = hashlib.new(kind)
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
        with self.lock:
            self._digests[key] = h.hexdigest()
        return self._digests[key]

    def take(self, table: dict, name: str):
        with self.lock:
            queue = table.get(name)
            if queue:
                return queue.pop(0)
        return None


class _Handler(BaseHTTPRequestHandler):
    hub: Hub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        self._serve(body=True)

    def do_HEAD(self):
        self._serve(body=False)

    def _send_json(self, status: int, obj, extra: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        extra = {"X-Error-Code": code, "X-Error-Message": message}
        if status in (429, 503) and self.hub.faults.retry_after is not None:
            extra["Retry-After"] = self.hub.faults.retry_after
        self._send_json(status, {"error": message}, extra)

    def _serve(self, body: bool) -> None:
        hub = self.hub
        url = urlparse(self.path)
        path = unquote(url.path)
        with hub.lock:
            hub.requests.append(f"{self.command} {self.path} {self.headers.get('Range', '')}")
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)/?", path)
        if m:
            return self._tree(m.group(1), m.group(2))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if m:
            return self._info(m.group(1), m.group(2) or "main", parse_qs(url.query))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._file(m.group(1), m.group(2), m.group(3), body)
        self._error(404, "EntryNotFound", "no such route")

    def _info(self, repo: str, rev: str, query) -> None:
        hub = self.hub
        sha = hub.resolve(repo, rev)
        if repo not in hub.repos:
            return self._error(404, "RepoNotFound", f"Repository not found: {repo}")
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        folder = hub.commits[sha]
        siblings = []
        for p in sorted(folder.iterdir()):
            if not p.is_file():
                continue
            s = {"rfilename": p.name}
            if query.get("blobs") == ["True"] or query.get("blobs") == ["true"]:
                s["size"] = p.stat().st_size
                s["blobId"] = hub.digest(p, "sha1")
                if p.name.endswith(LFS_SUFFIXES):
                    s["lfs"] = {"sha256": hub.digest(p, "sha256"), "size": p.stat().st_size, "pointerSize": 134}
            siblings.append(s)
        self._send_json(200, {"id": repo, "modelId": repo, "sha": sha, "private": False, "siblings": siblings})

    def _tree(self, repo: str, rev: str) -> None:
        """``list_repo_tree`` (what ``snapshot_download`` lists): one page, every file."""
        sha = self.hub.resolve(repo, rev)
        if sha is None:
            return self._error(404, "RevisionNotFound" if repo in self.hub.repos else "RepoNotFound", rev)
        entries = []
        for p in sorted(self.hub.commits[sha].iterdir()):
            size = p.stat().st_size
            e = {"type": "file", "path": p.name, "size": size, "oid": self.hub.digest(p, "sha1")}
            if p.name.endswith(LFS_SUFFIXES):
                e["lfs"] = {"oid": self.hub.digest(p, "sha256"), "size": size, "pointerSize": 134}
            entries.append(e)
        self._send_json(200, entries)

    def _file(self, repo: str, rev: str, name: str, body: bool) -> None:
        hub = self.hub
        status = hub.take(hub.faults.status, name)
        if status is not None:
            codes = {401: "Unauthorized", 403: "GatedRepo", 404: "EntryNotFound", 429: "TooManyRequests",
                     503: "ServiceUnavailable"}
            return self._error(status, codes.get(status, "Error"), f"injected {status}")
        sha = hub.resolve(repo, rev)
        if sha is None:
            return self._error(404, "RepoNotFound" if repo not in hub.repos else "RevisionNotFound",
                               f"{repo}@{rev} not found")
        p = hub.commits[sha] / name
        if not p.is_file():
            return self._error(404, "EntryNotFound", f"{name} not found in {repo}@{sha}")
        size = p.stat().st_size
        lfs = name.endswith(LFS_SUFFIXES)
        etag = hub.digest(p, "sha256" if lfs else "sha1")
        start, end = 0, size - 1
        rng = self.headers.get("Range")
        partial = False
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m or int(m.group(1)) >= size:
                return self._error(416, "RangeNotSatisfiable", rng)
            start = int(m.group(1))
            end = min(size - 1, int(m.group(2))) if m.group(2) else size - 1
            partial = True
        self.send_response(206 if partial else 200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Repo-Commit", sha)
        self.send_header("ETag", f'"{etag}"')
        if lfs:
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(size))
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        drop = hub.take(hub.faults.drop_after, name)
        flip = hub.faults.flip.get(name)
        if drop is None and flip is None:  # the kernel copies (os.sendfile): a Python loop per 64 KiB would
            return self._sendfile(name, p, start, end - start + 1)  # hold the GIL for every connection
        with open(p, "rb") as f:
            f.seek(start)
            pos, left = start, end - start + 1
            while left:
                block = f.read(min(left, 1 << 16))
                if flip is not None and pos <= flip < pos + len(block):
                    with hub.lock:
                        if hub.faults.flip.pop(name, None) is not None:
                            b = bytearray(block)
                            b[flip - pos] ^= 0x01
                            block = bytes(b)
                if drop is not None and pos - start + len(block) > drop:
                    block = block[:max(0, drop - (pos - start))]
                    self._write(name, block)
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self._write(name, block)
                pos += len(block)
                left -= len(block)

    def _sendfile(self, name: str, p: Path, start: int, count: int) -> None:
        rate = self.hub.faults.rate
        step = max(64 * 1024, rate // 20) if rate else 8 << 20  # with a cap: 50 ms of it at a time
        with open(p, "rb") as f:
            pos, left = start, count
            while left:
                t0 = time.monotonic()
                n = os.sendfile(self.connection.fileno(), f.fileno(), pos, min(step, left))
                if n <= 0:
                    return
                pos, left = pos + n, left - n
                with self.hub.lock:
                    self.hub.sent[name] = self.hub.sent.get(name, 0) + n
                if rate:
                    wait = n / rate - (time.monotonic() - t0)
                    if wait > 0:
                        time.sleep(wait)

    def _write(self, name: str, block: bytes) -> None:
        rate = self.hub.faults.rate
        t0 = time.monotonic()
        self.wfile.write(block)
        with self.hub.lock:
            self.hub.sent[name] = self.hub.sent.get(name, 0) + len(block)
        if rate:  # a per-connection cap: sleep what the block would take at that rate
            wait = len(block) / rate - (time.monotonic() - t0)
            if wait > 0:
                time.sleep(wait)
