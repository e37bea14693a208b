"""``streamconv demo``: tiny Nemotron-shaped checkpoints, generated on the spot, converted, loaded back by
real megatron-core and checked against an independent reference forward of the HF weights.

Two models: a scaled-down Nano-8B (Llama, GQA) and a scaled-down Super-49B (DeciLM: skipped attention
and per-layer FFN widths as in the real block pattern). Needs megatron-core (``pip install -e '.[mcore]'``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from streamconv.errors import OutputError, StreamconvError, UsageError
from streamconv.formats.names import ITER_DIR
from streamconv.reference.synth import make_checkpoint, real_config, scale_config

TOLERANCE = 1e-4
MODELS = (
    # (label, real config, scaled hidden, heads, layers kept)
    ("Nano-8B shape (Llama)", "nano-8b-v1", 128, 8, 4),
    # Super's layers with each FFN width it has (ffn_mult 2.625, 5.25, 3.28125, 1.3125, 1.0, 0.5) and
    # with attention skipped (6, 11, 42, 54, 62) as well as kept
    ("Super-49B shape (DeciLM)", "super-49b-v1", 128, 8, [0, 1, 6, 11, 42, 54, 62, 79]),
)


def _hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(f))
    return weights


def convert(src: Path, out: Path, overwrite: bool) -> dict:
    """``streamconv hf2mcore`` as a user runs it (a process of its own); its ``--json`` summary."""
    cmd = [sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(src), "--megatron-path", str(out),
           "--quiet", "--json"] + (["--overwrite"] if overwrite else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise StreamconvError(f"streamconv hf2mcore failed (exit {r.returncode}): "
                              f"{(r.stderr.strip().splitlines() or [''])[-1]}")
    return json.loads(r.stdout)


def check_model(label: str, cfg: dict, workdir: Path, overwrite: bool) -> dict:
    """Generate, convert, load with megatron-core, compare logits. Returns a result row. Folders the demo
    would write that hold something already are refused unless ``overwrite``."""
    warnings.filterwarnings("ignore", category=UserWarning)  # megatron-core's deprecation chatter
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from streamconv.reference import mcore
    except ImportError as e:
        raise UsageError(f"the demo needs megatron-core ({e}); install with: pip install -e '.[mcore]'") from None
    from streamconv.reference.forward import reference_logits

    name = label.split()[0].lower()
    for folder in (workdir / f"{name}-hf", workdir / f"{name}-mcore"):
        if not overwrite and (folder.is_symlink() or folder.exists() and (not folder.is_dir() or any(folder.iterdir()))):
            raise OutputError(f"{folder}: exists and is not empty; choose another --workdir or pass --overwrite")
    if overwrite and (workdir / f"{name}-hf").is_dir():
        import shutil

        shutil.rmtree(workdir / f"{name}-hf")
    src = make_checkpoint(workdir / f"{name}-hf", cfg, seed=0, dtype=torch.float32, shards=3)
    t0 = time.perf_counter()
    summary = convert(src, workdir / f"{name}-mcore", overwrite)
    seconds = time.perf_counter() - t0
    ckpt = workdir / f"{name}-mcore" / ITER_DIR
    model = mcore.build_hetero_gpt(cfg) if "block_configs" in cfg else mcore.build_gpt(cfg)
    mcore.load_checkpoint(model, ckpt)  # default strictness, and no key the model does not ask for
    tokens = torch.randint(0, cfg["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    ours = mcore.logits(model, tokens)
    ref = reference_logits(cfg, _hf_weights(src), tokens)
    diff = (ours - ref).abs().max().item()
    return {"model": label, "layers": cfg["num_hidden_layers"], "tensors": summary["tensors"],
            "bytes": summary["bytes"], "seconds": seconds, "max_abs_diff": diff, "ok": diff <= TOLERANCE}


def run_demo(args) -> int:
    quiet = getattr(args, "quiet", False)
    console = Console(quiet=quiet)  # the result table, on stdout
    status = Console(stderr=True, quiet=quiet)  # what is happening, on stderr (stdout stays JSON with --json)
    with tempfile.TemporaryDirectory(prefix="streamconv-demo-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = []
        for label, real, hidden, heads, layers in MODELS:
            cfg = scale_config(real_config(real), hidden=hidden, heads=heads, layers=layers, vocab=512)
            status.print(f"[bold]{label}[/]: generating, converting with streamconv, loading with megatron-core ...")
            rows.append(check_model(label, cfg, workdir, overwrite=not args.workdir or args.overwrite))
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
    else:
        table = Table(title="streamconv demo: HF -> torch_dist -> megatron-core GPTModel, logits vs reference")
        for col in ("model", "layers", "tensors", "MB", "convert s", "max |logit diff|", "result"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["model"], str(r["layers"]), str(r["tensors"]), f"{r['bytes'] / 1e6:.1f}",
                          f"{r['seconds']:.2f}", f"{r['max_abs_diff']:.2e}",
                          "[green]PASS[/]" if r["ok"] else "[red]FAIL[/]")
        console.print(table)
    return 0 if all(r["ok"] for r in rows) else 1
