"""``streamconv plan``: the conversion plan from ``config.json`` alone, without reading weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from streamconv import engine
from streamconv.hf2mcore import chunk_bytes_for, parse_dtype, resolve_hf_model
from streamconv.models import rules
from streamconv.models.spec import load_config, spec_from_config
from streamconv.plan import describe, import_plan

CONFIG_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ShapeSource:
    """What the engine's memory accounting needs from a source, computed from the spec (no weights)."""

    def __init__(self, spec, dtype: torch.dtype):
        self.shapes = {t.name: t.shape for t in rules.hf_tensors(spec)}
        self.itemsize = torch.empty((), dtype=dtype).element_size()

    def read_nbytes(self, read) -> int:
        shape = self.shapes[read.name][len(read.index):]
        return (read.row1 - read.row0) * math.prod(shape[1:]) * self.itemsize


def plan_command(args) -> int:
    path = Path(args.hf_model).expanduser()
    if not path.is_file():  # a config.json file is used as is; folders and hub ids are resolved
        path = resolve_hf_model(args.hf_model, allow_patterns=["config.json"])
    spec = spec_from_config(load_config(path))
    src_dtype = CONFIG_DTYPES.get(spec.torch_dtype, torch.bfloat16)
    out_dtype = parse_dtype(args.dtype) or src_dtype
    names = [t.name for t in rules.hf_tensors(spec)]
    plan = import_plan(spec, {n: src_dtype for n in names}, out_dtype, chunk_bytes=chunk_bytes_for(args.max_memory))
    summary = describe(plan)
    summary["source_dtype"] = str(src_dtype).replace("torch.", "")
    summary["dtype"] = str(out_dtype).replace("torch.", "")
    summary["chunk_bytes"] = plan.chunk_bytes
    summary["max_memory_bytes"] = args.max_memory
    summary["min_memory_bytes"] = engine.min_memory(plan, ShapeSource(spec, src_dtype))
    by_key: dict[str, int] = {}
    for c in plan.chunks:
        by_key[c.key] = by_key.get(c.key, 0) + 1
    if args.json:
        if args.tensors:
            summary["targets"] = [{"key": t.key, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                                   "bytes": t.nbytes, "chunks": by_key[t.key]} for t in plan.targets.values()]
        print(json.dumps(summary, indent=2))
        return 0
    console = Console()
    if args.tensors:
        table = Table(title="output tensors")
        for col in ("key", "shape", "dtype", "bytes", "chunks"):
            table.add_column(col, justify="right" if col in ("bytes", "chunks") else "left")
        for t in plan.targets.values():
            table.add_row(t.key, str(list(t.shape)), str(t.dtype).replace("torch.", ""), engine.fmt_bytes(t.nbytes),
                          str(by_key[t.key]))
        console.print(table)
    grid = Table(title=f"plan: {spec.architecture}, {spec.num_layers} layers", show_header=False)
    grid.add_column(style="bold")
    grid.add_column(justify="right")
    grid.add_row("parameters", f"{summary['parameters']:,} ({summary['parameters'] / 1e9:.3f} B)")
    grid.add_row("output", f"{engine.fmt_bytes(summary['bytes'])} as {summary['dtype']}")
    grid.add_row("tensors / objects", f"{summary['tensors']} / {summary['objects']}")
    grid.add_row("chunks / files", f"{summary['chunks']} / {summary['files'] + 1}")
    grid.add_row("largest tensor", f"{summary['largest_tensor']} ({engine.fmt_bytes(summary['largest_tensor_bytes'])})")
    grid.add_row("largest chunk", engine.fmt_bytes(summary["largest_chunk_bytes"]))
    grid.add_row("memory budget", f"{engine.fmt_bytes(args.max_memory)} (at least "
                                  f"{engine.fmt_bytes(summary['min_memory_bytes'])} needed)")
    console.print(grid)
    return 0
