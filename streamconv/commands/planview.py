"""``streamconv plan``: the conversion plan from ``config.json`` alone, without reading weights."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

from rich.table import Table

from streamconv.runtime.progress import stdout_console

from streamconv import dtypes
from streamconv.engine import runner
from streamconv.engine.contracts import Source
from streamconv.inputs import check_budget, check_fits, chunk_bytes_for, parse_dtype, resolve_hf_model
from streamconv.models import rules
from streamconv.models.config import load_config, spec_from_config
from streamconv.plan.build import describe, import_plan
from streamconv.units import fmt_bytes

CONFIG_DTYPES = {"bfloat16": dtypes.BFLOAT16, "float16": dtypes.FLOAT16, "float32": dtypes.FLOAT32}


class ShapeSource(Source):
    """What the engine's memory accounting needs from a source, computed from the spec (no weights)."""

    reads = "extents"  # it stands in for a safetensors source: reads land in the chunk's buffer (scatter.py)

    def __init__(self, spec, dtype: dtypes.DType):
        self.shapes = {t.name: t.shape for t in rules.hf_tensors(spec)}
        self.dtype = dtype
        self.itemsize = dtypes.of(dtype).itemsize

    def dtype_of(self, name: str) -> dtypes.DType:  # what the real source reports: every tensor in ``dtype``
        return self.dtype

    def read_nbytes(self, read) -> int:
        shape = self.shapes[read.name][len(read.index):]
        return (read.row1 - read.row0) * math.prod(shape[1:]) * self.itemsize


def layer_rows(plan, source) -> list[dict]:
    """Per layer: its block kinds, parameters, output bytes and chunks, its largest whole tensor, and the
    memory converting it needs (its costliest chunk in flight: the rows read plus the piece written, as the
    engine accounts it). The layers' ``memory_bytes`` maximum is the plan's ``min_memory_bytes``. A Nemotron-H's
    MTP layers follow, named as HF names them (``"layer": "mtp.{k}"``; a depth's norms and projection counted
    with its first layer, its final norm with its last)."""
    spec = plan.spec
    layers = list(spec.layers) + list(spec.mtp)
    rows = [{"layer": i if i < spec.num_layers else f"mtp.{i - spec.num_layers}", "attention": layer.attention,
             "query_groups": layer.num_query_groups, "mlp": layer.mlp, "ffn_hidden_size": layer.ffn_hidden_size,
             "parameters": 0, "bytes": 0, "chunks": 0, "largest_tensor_bytes": 0, "memory_bytes": 0}
            for i, layer in enumerate(layers)]
    for row, layer in zip(rows, layers):  # a hybrid layer's one mixer, by name
        if layer.kind == "M":
            row["attention"] = "mamba2"
        elif layer.kind == "E":
            row["mlp"] = f"moe {spec.dim('experts')}x{spec.dim('moe_ffn')}"
    block = spec.dim("mtp_block") if spec.mtp else 0
    for b in rules.bindings(spec):
        row = _row_of(b.key, b.index, spec.num_layers, block)
        if row is not None:
            rows[row]["parameters"] += sum(t.numel * t.nrows // t.shape[0] for t in b.hf if t.shape[0]
                                           and not rules.BUFFERS.search(t.name))
    sizes: dict[tuple[str, int], int] = {}
    chunks: list[list] = [[] for _ in rows]
    for c in plan.chunks:
        row = c.layer if c.layer is not None else _row_of(c.key, (), spec.num_layers, block)
        if row is None:
            continue
        rows[row]["bytes"] += c.nbytes
        rows[row]["chunks"] += 1
        chunks[row].append(c)
        sizes[(c.key, row)] = sizes.get((c.key, row), 0) + c.nbytes
    for row, layer_chunks in zip(rows, chunks):  # the engine's own accounting, on this layer's chunks
        row["memory_bytes"] = runner.min_memory(dataclasses.replace(plan, chunks=layer_chunks), source)
    for (key, row), nbytes in sizes.items():  # a stacked key's layer slice, or a per-layer key
        rows[row]["largest_tensor_bytes"] = max(rows[row]["largest_tensor_bytes"], nbytes)
    return rows


MTP_KEY = re.compile(r"^mtp\.layers\.(\d+)\.(?:mtp_model_layer\.layers\.(\d+)\.|(final_layernorm)\.)?")


def _row_of(key: str, index: tuple, num_layers: int, block: int) -> int | None:
    """A binding's row in ``layer_rows``: a main layer's number, from a per-layer key's name (a leading index
    there is an expert) or a stacked key's leading index; an MTP layer's after the main ones (``block``: the
    layers of one MTP depth); None for the rest (embedding, final norm, output layer)."""
    m = MTP_KEY.search(key)
    if m:
        depth, inner, last = m.groups()
        return num_layers + int(depth) * block + (int(inner) if inner else block - 1 if last else 0)
    m = re.search(r"layers\.(\d+)\.", key)
    if m:
        return int(m.group(1))
    return index[0] if index else None


def plan_command(args) -> int:
    check_budget(args.max_memory, quiet=args.json or args.quiet)
    path = Path(args.hf_model).expanduser()
    if not path.is_file():  # a config.json file is used as is; folders and hub ids are resolved
        path = resolve_hf_model(args.hf_model, allow_patterns=["config.json"])
    cfg = load_config(path)
    spec = spec_from_config(cfg)
    from streamconv.sources import quantized

    folder = path.parent if path.is_file() else path
    method, _ = quantized.method_of(folder, cfg)  # refuses a quantization that is not dequantized here
    src_dtype = CONFIG_DTYPES.get(spec.torch_dtype, dtypes.BFLOAT16)
    out_dtype = parse_dtype(args.dtype) or src_dtype
    names = [t.name for t in rules.hf_tensors(spec)]
    plan = import_plan(spec, {n: src_dtype for n in names}, out_dtype, chunk_bytes=chunk_bytes_for(args.max_memory))
    summary = describe(plan)
    summary["source_dtype"] = str(src_dtype).replace("torch.", "")
    summary["dtype"] = str(out_dtype).replace("torch.", "")
    summary["quantization"] = method  # None: a plain checkpoint; else its weights are dequantized to dtype
    summary["chunk_bytes"] = plan.chunk_bytes
    summary["max_memory_bytes"] = args.max_memory
    shapes = ShapeSource(spec, src_dtype)
    summary["min_memory_bytes"] = check_fits(plan, shapes, args.max_memory)  # what hf2mcore refuses, plan does too
    per_layer = layer_rows(plan, shapes)
    by_key: dict[str, int] = {}
    for c in plan.chunks:
        by_key[c.key] = by_key.get(c.key, 0) + 1
    if args.json:
        if args.tensors:
            summary["targets"] = [{"key": t.key, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                                   "bytes": t.nbytes, "chunks": by_key[t.key]} for t in plan.targets.values()]
        summary["per_layer"] = per_layer
        print(json.dumps(summary, indent=2))
        return 0
    console = stdout_console()
    if args.tensors:
        table = Table(title="output tensors")
        for col in ("key", "shape", "dtype", "bytes", "chunks"):
            table.add_column(col, justify="right" if col in ("bytes", "chunks") else "left")
        for t in plan.targets.values():
            table.add_row(t.key, str(list(t.shape)), str(t.dtype).replace("torch.", ""), fmt_bytes(t.nbytes),
                          str(by_key[t.key]))
        console.print(table)
    if getattr(args, "layers", False):
        table = Table(title="per layer (largest = its biggest whole tensor; memory = what converting it holds at most)")
        for col in ("layer", "attention", "ffn", "params", "output", "chunks", "largest", "memory"):
            table.add_column(col, justify="left" if col in ("attention", "ffn") else "right")
        for r in per_layer:
            attn = f"{r['query_groups']} groups" if r["attention"] == "attention" else r["attention"]
            ffn = str(r["ffn_hidden_size"]) if r["mlp"] == "mlp" else r["mlp"]
            table.add_row(str(r["layer"]), attn, ffn, f"{r['parameters'] / 1e6:,.1f}M",
                          fmt_bytes(r["bytes"]), str(r["chunks"]), fmt_bytes(r["largest_tensor_bytes"]),
                          fmt_bytes(r["memory_bytes"]))
        console.print(table)
    grid = Table(title=f"plan: {spec.architecture}, {spec.num_layers} layers", show_header=False)
    grid.add_column(style="bold")
    grid.add_column(justify="right")
    grid.add_row("parameters", f"{summary['parameters']:,} ({summary['parameters'] / 1e9:.3f} B)")
    if method is not None:
        grid.add_row("quantization", f"{method}: weights dequantized on the fly (fp8 x scale)")
    grid.add_row("output", f"{fmt_bytes(summary['bytes'])} as {summary['dtype']}")
    grid.add_row("tensors / objects", f"{summary['tensors']} / {summary['objects']}")
    grid.add_row("chunks / files", f"{summary['chunks']} / {summary['files']}")
    grid.add_row("largest tensor", f"{summary['largest_tensor']} ({fmt_bytes(summary['largest_tensor_bytes'])})")
    grid.add_row("largest chunk", fmt_bytes(summary["largest_chunk_bytes"]))
    widest = max(per_layer, key=lambda r: r["largest_tensor_bytes"], default=None)
    if widest is not None:
        grid.add_row("largest layer tensor", f"layer {widest['layer']}: {fmt_bytes(widest['largest_tensor_bytes'])}"
                                             f" whole, converted with {fmt_bytes(widest['memory_bytes'])} in flight")
    if "mtp" in summary:
        mtp = summary["mtp"]
        grid.add_row("multi-token prediction", f"{mtp['depths']} depth(s) of {mtp['layers']}, "
                     f"{mtp['held']} held{' (shared)' if mtp['held'] < mtp['depths'] else ''}: "
                     f"{fmt_bytes(mtp['bytes'])}")
    grid.add_row("memory budget", f"{fmt_bytes(args.max_memory)} (at least "
                                  f"{fmt_bytes(summary['min_memory_bytes'])} needed)")
    console.print(grid)
    return 0
