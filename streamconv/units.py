"""Sizes: the one parser every size flag uses, and how sizes are shown (binary units: KiB, MiB, GiB).

No torch here: the command line parses its flags before the engine (and torch) is imported.
"""

from __future__ import annotations

import math


def fmt_bytes(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    exp = min(int(math.log(n, 1024)), 5)
    return f"{n / 1024**exp:.1f} {'BKMGTP'[exp]}iB"


def parse_size(text: str) -> int:
    """A size flag -> bytes, read as ``save_pretrained`` reads ``max_shard_size``: ``5GB`` = 5 * 10**9,
    ``2GiB`` = 2 * 2**30; a bare ``K``/``M``/``G``/``T`` (``1.5G``) is binary too; no unit = bytes."""
    s = text.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "B": 1}
    scale = next((mult for unit, mult in units.items() if s.endswith(unit)), 1)
    s = next((s[: -len(unit)] for unit in units if s.endswith(unit)), s)
    try:
        value = float(s)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 512MiB, 2GiB, 5GB)") from None
    if not 0 < value < float("inf"):
        raise ValueError(f"size must be positive: {text!r}")
    return int(value * scale)
