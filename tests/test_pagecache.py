"""What the writers put on disk and what they leave in the page cache.

- A ``.distcp`` tensor item is byte for byte the archive ``torch.save(tensor)`` writes, though its framing
  comes from ``torch.save`` under ``skip_data`` before its bytes are written, in place, by any thread
  (streamconv completes the CRC-32s and the serialization id).
- A conversion leaves neither its source's nor its output's pages in the page cache (``pagecache.py``).
"""

from __future__ import annotations

import ctypes
import errno
import io
import mmap
import os
import zipfile

import pytest
import torch

from streamconv.files import pagecache
from streamconv.cli import main
from streamconv.formats.torch_dist import tensor_item_bytes
from streamconv.sources.torch_dist import TorchDistSource
from streamconv.reference.synth import llama_config, make_checkpoint

TENSORS = [
    torch.randn(37, 19, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16),
    torch.randn(5, generator=torch.Generator().manual_seed(2)),
    torch.zeros(0, 4),
    torch.tensor(3.0),
    torch.randint(-9, 9, (7, 3, 2), generator=torch.Generator().manual_seed(3)),
    torch.ones(3, dtype=torch.bool),
    torch.randn(300, 1000, generator=torch.Generator().manual_seed(4)).to(torch.float16),
]


def torch_save_bytes(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def test_items_are_what_torch_save_writes():
    for t in TENSORS:
        item = tensor_item_bytes(t)
        assert item == torch_save_bytes(t)
        assert zipfile.ZipFile(io.BytesIO(item)).testzip() is None  # every CRC-32 right
        assert torch.equal(torch.load(io.BytesIO(item), weights_only=True), t)


@pytest.mark.parametrize("mode", [[], ["--no-staging"], ["--workers", "1"], ["--dtype", "fp16"]],
                         ids=["staged", "direct", "one-worker", "cast"])
def test_a_conversions_items_are_what_torch_save_writes(tmp_path, mode):
    """Every tensor item of a real conversion (chunks placed by several threads, framing completed after
    their bytes) is byte for byte ``torch.save`` of the tensor it holds."""
    cfg = llama_config(hidden=64, layers=2, heads=4, kv_heads=2, ffn=160, vocab=300)
    src = make_checkpoint(tmp_path / "hf", cfg, seed=6, shards=2, dtype=torch.bfloat16)
    out = tmp_path / "out"
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--quiet",
                 "--max-memory", "64KiB", "--distcp-size", "64KiB", *mode]) == 0
    ckpt = out / "iter_0000000"
    td = TorchDistSource(ckpt)
    n = 0
    for key, meta in td.tensors.items():
        for c in meta.chunks:
            item = (ckpt / c.file).read_bytes()[c.offset:c.offset + c.length]
            assert item == torch_save_bytes(torch.load(io.BytesIO(item), weights_only=True)), key
            n += 1
    assert n > 20


def test_copy_range_without_copy_file_range(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = os.urandom(3 * pagecache.COPY_BUFFER + 123)
    src.write_bytes(data)

    def unsupported(*args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    fi, fo = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR | os.O_CREAT)
    try:
        assert pagecache.copy_range(fi, 7, fo, 100, len(data) - 7) == len(data) - 7
        assert pagecache.copy_range(fi, len(data) - 5, fo, 0, 50) == 5  # the source ends first
    finally:
        os.close(fi)
        os.close(fo)
    out = dst.read_bytes()
    assert out[100:] == data[7:] and out[:5] == data[-5:]


# --------------------------------------------------------------------------- page cache

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def cached_fraction(path) -> float:
    """Share of ``path``'s pages in the page cache (``mincore`` on a mapping of it)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = ctypes.create_string_buffer(pages)
            assert _libc.mincore(addr, size, vec) == 0
            return sum(b & 1 for b in vec.raw) / pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def drops_pages(folder) -> bool:
    """Whether this file system lets a clean file's pages go on ``POSIX_FADV_DONTNEED`` (tmpfs does not)."""
    probe = folder / "probe"
    probe.write_bytes(os.urandom(1 << 20))
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.read(fd, 1 << 20)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    ok = cached_fraction(probe) < 0.1
    probe.unlink()
    return ok


@pytest.mark.parametrize("staging", [True, False], ids=["staged", "direct"])
def test_a_conversion_leaves_its_files_out_of_the_page_cache(tmp_path, staging):
    if not hasattr(os, "posix_fadvise") or not drops_pages(tmp_path):
        pytest.skip("this file system keeps pages on POSIX_FADV_DONTNEED")
    cfg = llama_config(hidden=256, layers=2, heads=8, kv_heads=2, ffn=512, vocab=1024)  # ~5 MB
    src = make_checkpoint(tmp_path / "hf", cfg, seed=5, shards=2, dtype=torch.float32)
    os.sync()  # clean pages: only those can be dropped
    shards = sorted(src.glob("*.safetensors"))
    for p in shards:
        p.read_bytes()
    assert min(cached_fraction(p) for p in shards) > 0.9  # the source starts in the cache
    out = tmp_path / "out"
    extra = [] if staging else ["--no-staging"]
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--quiet",
                 "--max-memory", "4MiB", "--distcp-size", "1MiB", *extra]) == 0
    distcp = sorted((out / "iter_0000000").glob("*.distcp"))
    assert len(distcp) >= 4
    for p in shards:  # only pages shared by two reads (a few per tensor boundary) may stay
        assert cached_fraction(p) < 0.1, p
    for p in distcp:
        assert cached_fraction(p) == 0.0, p
