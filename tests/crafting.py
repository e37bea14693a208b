"""Crafted inputs several test modules build the same way."""

from __future__ import annotations

import json
import os
from pathlib import Path


def flip_behind_the_file_systems_back(shard: Path, at: int, out: Path) -> None:
    """Flip a bit of ``shard`` at byte ``at`` with its size and mtime kept, and the ctime the identity of the
    conversion in ``out`` recorded forged to the new one: what bit rot, or a file system keeping no ctime,
    leaves (only ``--recheck`` can see it)."""
    st = shard.stat()
    with open(shard, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x08]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    ident_path = out / ".streamconv" / "identity.json"
    ident = json.loads(ident_path.read_text())
    for f in ident["input"]["files"]:
        if f["name"] == shard.name:
            f["ctime_ns"] = shard.stat().st_ctime_ns
    ident_path.write_text(json.dumps(ident))
