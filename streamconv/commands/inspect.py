"""``streamconv inspect <path>``: what a checkpoint holds, from its headers and metadata alone.

The first thing to run on a strange checkpoint. Accepts a HF folder (or one ``.safetensors`` file, or
its ``config.json``) and a torch_dist checkpoint (the folder holding ``.metadata``, an ``iter_*`` /
``release`` folder, or their parent with ``latest_checkpointed_iteration.txt``). Prints every tensor
(name, shape, dtype, bytes, file), the totals and the architecture (HF: ``config.json``; torch_dist: the
``run_config.yaml`` Megatron-Bridge writes beside it). No weight is read, nothing is unpickled except
``.metadata`` through the torch_dist reader's allow-list, and every problem is a one-line error.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from streamconv.errors import EXIT_BAD_INPUT, BadInputError, StreamconvError, printable
from streamconv.formats.names import METADATA_FILE, MODEL_PREFIXES, RUN_CONFIG_FILE, TRACKER_FILE


@dataclass
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    file: str  # where it is, for people ("__0_0.distcp +8": the first file and how many more)
    chunks: int = 1  # stored pieces (torch_dist); 1 for safetensors
    files: list[str] = field(default_factory=list)  # torch_dist: every file holding a piece of it


@dataclass
class Report:
    kind: str  # "hf" | "torch_dist"
    path: str  # the folder (or file) actually read
    architecture: str | None
    model: dict  # layers, hidden size, ... as far as known
    check: str  # "ok" or what would stop a conversion
    tensors: list[Entry]
    objects: list[str] = field(default_factory=list)  # torch_dist BYTE_IO keys
    files: list[str] = field(default_factory=list)  # every file of the checkpoint (torch_dist: objects' too)
    convertible: bool | None = None  # False: what ``check`` names would stop a conversion (inspect exits 3)
    training_state: dict | None = None  # torch_dist from a training run: iteration, optimizer, rng, args

    def totals(self) -> dict:
        dtypes: dict[str, int] = {}
        for t in self.tensors:
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.bytes
        return {
            "tensors": len(self.tensors),
            "objects": len(self.objects),
            "parameters": sum(math.prod(t.shape) for t in self.tensors),
            "bytes": sum(t.bytes for t in self.tensors),
            "files": len(self.files) if self.files else len({t.file for t in self.tensors}),
            "bytes_by_dtype": dtypes,
        }

    def to_json(self) -> dict:
        d = asdict(self)
        for t in d["tensors"]:
            t["shape"] = list(t["shape"])
            if self.kind == "hf":
                del t["chunks"], t["files"]
            else:
                del t["file"]  # the display string; "files" lists them
        d["totals"] = self.totals()
        return d


def natural_key(name: str):
    """``layers.2`` before ``layers.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------ detection


def inspect_path(path: str | Path, max_memory: int | None = None) -> Report:
    p = Path(path).expanduser()
    if not p.exists():
        from streamconv.inputs import is_hub_id

        if is_hub_id(str(path)):
            return hub_report(str(path))
        raise BadInputError(f"{p}: not found")
    if p.is_file():
        if p.name == METADATA_FILE:
            return torch_dist_report(p.parent, max_memory)
        if p.name == "config.json":
            return hf_report(p.parent)
        return hf_file_report(p)
    if (p / METADATA_FILE).is_file() or (p / TRACKER_FILE).is_file() or _checkpoint_subfolders(p):
        return torch_dist_report(_resolve_torch_dist(p), max_memory)
    if any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file():
        return hf_report(p)
    from streamconv.inputs import refuse_unfinished

    refuse_unfinished(p)
    raise BadInputError(f"{p}: not a checkpoint: no *.safetensors (Hugging Face), no {METADATA_FILE}, "
                        f"{TRACKER_FILE} or iter_*/release folder (torch_dist)")


def _checkpoint_subfolders(p: Path) -> list[Path]:
    return [d for d in p.iterdir() if d.is_dir() and (d.name.startswith("iter_") or d.name == "release")]


def _resolve_torch_dist(p: Path) -> Path:
    from streamconv.inputs import resolve_checkpoint

    return resolve_checkpoint(p)


# ------------------------------------------------------------------------------------------ Hugging Face


def hf_file_report(path: Path) -> Report:
    from streamconv.formats.safetensors import read_header

    infos = read_header(path)
    tensors = [Entry(n, tuple(i.shape), dtype_name(i.dtype), i.nbytes, path.name) for n, i in infos.items()]
    arch, model, check = _hf_architecture(path.parent, infos if (path.parent / "config.json").is_file() else None)
    if not (path.parent / "config.json").is_file():
        check = "one safetensors file without config.json: nothing to check it against"
    return Report("hf", str(path), arch, model, check, sorted(tensors, key=lambda t: natural_key(t.name)))


def hub_report(hf_model: str) -> Report:
    """A hub id, from its headers read over HTTP (two range requests per shard; nothing downloaded but the
    small files), or from the local cache when the model is all there."""
    from streamconv.inputs import open_hf_model
    from streamconv.sources.hub import HubSource

    folder, hub = open_hf_model(hf_model)
    if hub is None:
        return hf_report(folder)
    report = hf_report(folder, HubSource(hub, folder))
    report.path = f"{hub.repo_id}@{hub.sha}"
    return report


def hf_report(folder: Path, source=None) -> Report:
    """A HF folder (``source``: its tensors read otherwise, e.g. from the Hub)."""
    from streamconv.sources.safetensors import SafetensorsSource

    from streamconv.sources import quantized
    from streamconv.units import fmt_bytes

    source = source if source is not None else SafetensorsSource(folder)
    quant, refused = None, None
    try:
        infos = source.tensors
        tensors = [Entry(n, tuple(i.shape), dtype_name(i.dtype), i.nbytes, i.path.name) for n, i in infos.items()]
        if (folder / "config.json").is_file():
            from streamconv.models.config import load_config

            try:
                quant = quantized.detect(source, folder, load_config(folder), read_values=False)  # headers only
            except StreamconvError as e:
                refused = str(e)
    finally:
        source.close()
    arch, model, check = _hf_architecture(folder, infos, quant)
    if refused is not None:
        check = f"not convertible: {refused}"
    if quant is not None:
        item = quant.dtype.itemsize
        model["quantization"] = quant.describe()
        out = sum(i.nbytes if n not in quant.scales else math.prod(i.shape) * item
                  for n, i in infos.items() if n not in quant.companions)
        model["output"] = f"{fmt_bytes(out)} ({out:,} bytes) once dequantized"
        model["skipped_scales"] = f"{len(quant.skipped)} activation/kv-cache scales (not weights: not converted)"
    known = (folder / "config.json").is_file()
    return Report("hf", str(folder), arch, model, check, sorted(tensors, key=lambda t: natural_key(t.name)),
                  convertible=check.startswith("ok") if known else None)


def _hf_architecture(folder: Path, infos: dict | None, quant=None) -> tuple[str | None, dict, str]:
    """(architecture, model facts, conversion check) from ``config.json``; a config streamconv cannot
    convert is reported, not raised: inspect is for strange checkpoints."""
    from streamconv.models.config import load_config, spec_from_config
    from streamconv.plan.build import check_source, with_held_mtp

    if not (folder / "config.json").is_file():
        return None, {}, "no config.json: the architecture is unknown"
    cfg = load_config(folder)
    archs = cfg.get("architectures")
    named = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    try:
        spec = spec_from_config(cfg)
    except StreamconvError as e:
        return named or str(cfg.get("model_type", "unknown")), {}, f"not convertible: {e}"
    if infos is not None:  # a config may declare MTP layers its weights do not hold (transformers saves none)
        spec = with_held_mtp(spec, infos)
    model = _spec_facts(spec)
    if infos is None:
        return spec.architecture, model, "ok"
    check = ""
    try:
        check_source(spec, infos, quant=quant)
        check = "ok: every tensor the mapping needs is present with the shape config.json implies"
    except StreamconvError as e:
        check = f"not convertible: {e}" if check.startswith("ok") else str(e)
    return spec.architecture, model, check


HYBRID_KINDS = {"M": "mamba2", "*": "attention", "-": "mlp", "E": "moe"}  # Nemotron-H's layer letters


def _spec_facts(spec) -> dict:
    kinds: dict[str, int] = {}
    for layer in spec.layers:
        key = HYBRID_KINDS.get(layer.kind) or f"{layer.attention}+{layer.mlp}"
        kinds[key] = kinds.get(key, 0) + 1
    return {
        "family": spec.family,
        "layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "attention_heads": spec.num_attention_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "tied_embeddings": spec.tied_embeddings,
        "layer_kinds": kinds,
        **({"mtp_layers": "".join(layer.kind for layer in spec.mtp)} if spec.mtp else {}),
    }


# ------------------------------------------------------------------------------------------ torch_dist


def torch_dist_report(folder: Path, max_memory: int | None = None) -> Report:
    from streamconv.sources.torch_dist import TorchDistSource

    source = TorchDistSource(folder, max_memory)  # .metadata through the allow-list unpickler, storage validated
    try:
        tensors = []
        for key, meta in source.tensors.items():
            files = sorted({c.file for c in meta.chunks}, key=natural_key)
            where = files[0] + (f" +{len(files) - 1}" if len(files) > 1 else "") if files else ""
            tensors.append(Entry(key, tuple(meta.shape), dtype_name(meta.dtype), meta.nbytes, where,
                                 len(meta.chunks), files))
        objects = sorted(source.objects, key=natural_key)
        try:  # what a model load would unpickle must be plain data (torch DCP runs pickles in full)
            source.check_objects(MODEL_PREFIXES)
            unsafe = None
        except BadInputError as e:
            unsafe = str(e)
        all_files = sorted({ref.file for ref in source._storage.values()}, key=natural_key)
        from streamconv.formats import megatron_args

        try:
            common = megatron_args.common_state(folder, source)
        except StreamconvError:
            common = None
    finally:
        source.close()
    args = (common or {}).get("args")
    arch, model, check = _torch_dist_architecture(folder, {t.name: t.shape for t in tensors}, args)
    if unsafe is not None:
        check = f"refused: {unsafe}"
    return Report("torch_dist", str(folder), arch, model, check, sorted(tensors, key=lambda t: natural_key(t.name)),
                  objects, all_files, convertible=check.startswith("ok") if check != NO_RUN_CONFIG else None,
                  training_state=training_state(tensors, objects, common))


def training_state(tensors: list[Entry], objects: list[str], common: dict | None) -> dict | None:
    """What a training save holds beside the weights (None for a weights-only checkpoint)."""
    optimizer = [t for t in tensors if t.name.startswith("optimizer.")]
    rng = [o for o in objects if o.startswith("rng_state")]
    common = common or {}
    if not optimizer and not rng and "args" not in common and not common.get("iteration"):
        return None
    return {"iteration": common.get("iteration"), "checkpoint_version": common.get("checkpoint_version"),
            "args": "args" in common, "optimizer_tensors": sum(t.chunks for t in optimizer),
            "optimizer_bytes": sum(t.bytes for t in optimizer), "rng_state": len(rng),
            "other_common_keys": sorted(k for k in common if k not in ("args", "iteration", "checkpoint_version"))}


NO_RUN_CONFIG = "no run_config.yaml: architecture guessed from the key layout"


def _torch_dist_architecture(folder: Path, keys: dict[str, tuple], args=None) -> tuple[str | None, dict, str]:
    """From Megatron-Bridge's ``run_config.yaml`` when there, else from Megatron-LM's training ``args``
    (then the keys are checked against the mapping); else a guess from the key layout."""
    run_config = folder / RUN_CONFIG_FILE
    per_layer = any(re.match(r"decoder\.layers\.\d+\.", k) for k in keys)
    layout = {"layer_keys": "per-layer (heterogeneous)" if per_layer else "stacked [L, ...]"}
    if not run_config.is_file() and args is not None:
        from streamconv.formats.megatron_args import hf_config_from_args
        from streamconv.models.config import spec_from_config

        try:
            spec = spec_from_config(hf_config_from_args(args, folder))
        except StreamconvError as e:
            return None, layout, f"training args: {e}"
        return spec.architecture, {**_spec_facts(spec), **layout, "described_by": "training args"}, \
            _check_keys(spec, keys, "the training args")
    if not run_config.is_file():
        guess = "heterogeneous GPT (DeciLM-like)" if per_layer else "GPT (Llama-like)" if keys else None
        return guess, layout, NO_RUN_CONFIG
    from streamconv.formats.run_config_reader import hf_config_from_run_config
    from streamconv.models.config import spec_from_config

    try:
        spec = spec_from_config(hf_config_from_run_config(run_config))
    except StreamconvError as e:
        return None, layout, f"{run_config.name}: {e}"
    return spec.architecture, {**_spec_facts(spec), **layout}, _check_keys(spec, keys)


def _check_keys(spec, keys: dict[str, tuple], described_by: str = "run_config.yaml") -> str:
    """Does the checkpoint hold exactly the weights the mapping expects for ``spec``, in their shapes?"""
    from streamconv.models import rules

    from streamconv.plan.build import with_held_mtp

    spec = with_held_mtp(spec, keys)  # a Bridge-style config declares MTP the checkpoint was converted without
    expected = {b.key: tuple(b.global_shape) for b in rules.bindings(spec)}
    missing = sorted(set(expected) - set(keys), key=natural_key)
    if missing:
        return f"{len(missing)} weight(s) the {spec.architecture} mapping needs are missing, first {missing[0]!r}"
    wrong = [k for k, shape in expected.items() if tuple(keys[k]) != shape]
    if wrong:
        return f"{wrong[0]!r} has shape {list(keys[wrong[0]])} but {described_by} implies {list(expected[wrong[0]])}"
    extra = sorted(set(keys) - set(expected), key=natural_key)
    if extra and all(k.startswith("optimizer.") for k in extra):
        return (f"ok: every weight the mapping needs is present with the shape {described_by} implies (and "
                f"{len(extra)} optimizer tensors, not read)")
    if extra:
        return f"ok for the weights; {len(extra)} other tensor(s) (e.g. optimizer state), first {extra[0]!r}"
    return f"ok: every weight the mapping needs is present with the shape {described_by} implies"


# ------------------------------------------------------------------------------------------ output


def render(report: Report, console) -> None:
    from rich.table import Table
    from rich.text import Text

    from streamconv.units import fmt_bytes

    torch_dist = report.kind == "torch_dist"
    table = Table(title=Text(printable(f"{report.path} ({'torch_dist' if torch_dist else 'Hugging Face safetensors'})")))
    longest = max((len(t.name) for t in report.tensors), default=4)
    for col in ("name", "shape", "dtype", "bytes", "file", *(("chunks",) if torch_dist else ())):
        table.add_column(col, justify="right" if col in ("bytes", "chunks") else "left", overflow="fold",
                         min_width=min(longest, 64) if col == "name" else None)
    for t in report.tensors:
        row = [Text(printable(t.name)), "[" + ", ".join(map(str, t.shape)) + "]", t.dtype, fmt_bytes(t.bytes),
               Text(printable(t.file))]
        table.add_row(*row, *((str(t.chunks),) if torch_dist else ()))
    console.print(table)
    tot = report.totals()
    grid = Table(show_header=False, box=None)
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("architecture", Text(printable(report.architecture or "unknown")))
    for key, value in report.model.items():
        grid.add_row(Text(printable(f"  {key}")), Text(printable(
            ", ".join(f"{k}: {v}" for k, v in value.items()) if isinstance(value, dict) else str(value))))
    grid.add_row("tensors", f"{tot['tensors']:,}" + (f" (+{tot['objects']} objects)" if tot["objects"] else ""))
    grid.add_row("parameters", f"{tot['parameters']:,} ({tot['parameters'] / 1e9:.3f} B)")
    grid.add_row("bytes", f"{tot['bytes']:,} ({fmt_bytes(tot['bytes'])}) in {tot['files']} file(s)")
    grid.add_row("by dtype", ", ".join(f"{d}: {fmt_bytes(b)}" for d, b in sorted(tot["bytes_by_dtype"].items())))
    if report.training_state:
        ts = report.training_state
        grid.add_row("training state", f"iteration {ts['iteration']}, optimizer: {ts['optimizer_tensors']} tensors "
                                       f"({fmt_bytes(ts['optimizer_bytes'])}), rng_state: {ts['rng_state']} object(s), "
                                       f"args: {'yes' if ts['args'] else 'no'}"
                     + (f", also {', '.join(ts['other_common_keys'])}" if ts["other_common_keys"] else ""))
    grid.add_row("check", Text(printable(report.check)))
    console.print(grid)


def inspect_command(args) -> int:
    """Exit 0, or 3 (bad input) when the check found what would stop a conversion (the report is printed)."""
    report = inspect_path(args.path, args.max_memory)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        from streamconv.runtime.progress import stdout_console

        render(report, stdout_console())
    return EXIT_BAD_INPUT if report.convertible is False else 0
