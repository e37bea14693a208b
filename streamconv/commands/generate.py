"""``streamconv generate``: run the converted checkpoint (the third step of the upstream page).

Builds the real megatron-core model the checkpoint describes (``GPTModel`` for Llama and heterogeneous DeciLM,
``MambaModel`` for Nemotron-H, see ``reference/mcore_hybrid.py``; from its
``run_config.yaml``, the training args in its common state, or ``--hf-model``'s config), loads it with
``dist_checkpointing.load`` at default strictness, tokenizes with the Hugging Face tokenizer (the
checkpoint's own ``tokenizer/`` folder, else ``--hf-model``; ``--chat`` applies its chat template), and
decodes greedily (the whole sequence each step: megatron-core's inference engine needs CUDA), streaming the
text as it comes. ``--compare-hf <folder>`` also runs the HF model (transformers for Llama; for DeciLM the
project's own reference forward, ``reference.py``) on the same prompt and reports whether the greedy tokens
are the same and the largest logit difference of the first step. Under torchrun, ``--tp N`` splits the
model tensor-parallel over the N processes (gloo on the CPU, nccl on GPUs); rank 0 prints.

Memory: parameters x the dtype's bytes (divided by ``--tp``) is stated up front and refused when it is
above ``--max-memory`` (default: the memory available now, of the host or of the GPU).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from streamconv.errors import EXIT_MISMATCH, BadInputError, UsageError
from streamconv.formats.names import MODEL_PREFIXES
from streamconv.units import fmt_bytes



def available_memory(device: str) -> int:
    """Bytes the model may take: free GPU memory, or the host's MemAvailable."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def tokenizer_folder(ckpt: Path, hf_model: str | None) -> Path:
    from streamconv.formats.run_config_reader import TOKENIZER_DIR
    from streamconv.inputs import resolve_hf_model

    own = ckpt / TOKENIZER_DIR
    if hf_model is None and (own / "tokenizer_config.json").is_file():
        return own
    if hf_model is not None:
        folder = resolve_hf_model(hf_model, allow_patterns=["*.json", "tokenizer.model", "*.jinja"])
        if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            raise BadInputError(f"{folder}: no tokenizer files (tokenizer.json, tokenizer.model or "
                                "tokenizer_config.json); pass the --hf-model folder the model was converted from")
        return folder
    raise UsageError(f"{ckpt}: no tokenizer/ folder beside the checkpoint; pass --hf-model <HF folder | hub id> for "
                     "its tokenizer")


def encode(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("--chat: the tokenizer has no chat template; leave --chat out")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tokenizer(prompt)["input_ids"])


def greedy(step, prompt_ids: list[int], new_tokens: int, eos: int | None, on_token=None) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding with ``step(ids [1, s]) -> logits [1, s, V]``: the new ids, and the first step's logits."""
    ids = list(prompt_ids)
    first = None
    out: list[int] = []
    for _ in range(new_tokens):
        logits = step(torch.tensor([ids]))[0, -1].float()
        if first is None:
            first = logits
        nxt = int(torch.argmax(logits))
        out.append(nxt)
        ids.append(nxt)
        if on_token is not None:
            on_token(out)
        if eos is not None and nxt == eos:
            break
    return out, first


def hf_step(folder: Path, cfg: dict):
    """The HF side of ``--compare-hf``: transformers' Llama or NemotronH, or the reference forward for DeciLM."""
    from streamconv.formats.run_config import is_nemotron_h

    if is_nemotron_h(cfg):
        from transformers import NemotronHForCausalLM

        nemotron_h = NemotronHForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

        def nemotron_h_step(ids):
            with torch.no_grad():
                return nemotron_h(ids).logits

        return nemotron_h_step
    if cfg.get("block_configs"):
        from streamconv.reference.forward import reference_logits
        from safetensors.torch import load_file

        weights = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
        hcfg = json.loads((folder / "config.json").read_text())
        return lambda ids: reference_logits(hcfg, weights, ids)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager").eval()

    def step(ids):
        with torch.no_grad():
            return model(ids).logits

    return step


def _quiet_libraries() -> None:
    """megatron-core's, torch's and transformers' deprecation notes and load bars are not for this screen."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _require(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UsageError(f"streamconv generate needs {module} (and megatron-core, transformers, einops): "
                         "pip install 'streamconv[generate]'")


def generate(args) -> dict:
    """Build the model the checkpoint describes, load it (default strictness), decode greedily; the result."""
    for module in ("megatron.core", "transformers", "einops"):  # einops: megatron-core's Mamba mixer
        _require(module)
    _quiet_libraries()
    from transformers import AutoTokenizer

    ckpt, cfg, dtype, params, shows = _check(args)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder(ckpt, args.hf_model)))
    prompt_ids = encode(tokenizer, args.prompt, args.chat)
    if not prompt_ids:
        raise UsageError("--prompt: empty after tokenization")
    t0 = time.perf_counter()
    step = _load(ckpt, cfg, dtype, args.device, args.tp)
    load_seconds = time.perf_counter() - t0
    shown = [""]

    def stream(out_ids):
        if not shows:
            return
        text = tokenizer.decode(out_ids, skip_special_tokens=True)
        sys.stdout.write(text[len(shown[0]):])
        sys.stdout.flush()
        shown[0] = text

    if shows:
        sys.stdout.write(args.prompt if not args.chat else "")
    t1 = time.perf_counter()
    new_ids, first = greedy(step, prompt_ids, args.max_new_tokens, tokenizer.eos_token_id, stream)
    gen_seconds = time.perf_counter() - t1
    if shows:
        sys.stdout.write("\n")
    result = {"command": "generate", "checkpoint": str(ckpt), "prompt": args.prompt, "prompt_tokens": len(prompt_ids),
              "tokens": new_ids, "text": tokenizer.decode(new_ids, skip_special_tokens=True),
              "dtype": str(dtype).removeprefix("torch."), "device": args.device, "tp": args.tp, "parameters": params,
              "load_seconds": round(load_seconds, 2), "tokens_per_s": round(len(new_ids) / max(gen_seconds, 1e-9), 2)}
    if args.compare_hf:
        result["compare_hf"] = _compare_hf(args.compare_hf, cfg, prompt_ids, new_ids, first)
    return result


def _check(args):
    """The checkpoint, its config, the dtype, its parameters, and whether this process shows text: refused in
    one line when the ranks do not match ``--tp`` or the model does not fit the memory."""
    from streamconv.inputs import check_checkpoint, model_config, parse_dtype, resolve_checkpoint, vocab_padding
    from streamconv.models import rules
    from streamconv.plan.build import with_held_mtp
    from streamconv.models.config import spec_from_config
    from streamconv.runtime import dist
    from streamconv.sources.torch_dist import TorchDistSource

    ckpt = resolve_checkpoint(args.megatron_path)
    try:
        cfg = model_config(ckpt, None, args.max_memory)[0]
    except UsageError:
        if args.hf_model is None:
            raise
        cfg = model_config(ckpt, args.hf_model)[0]
    spec = spec_from_config(cfg)  # refuses what streamconv does not know, in one line
    dtype = (parse_dtype(args.dtype) or parse_dtype("fp32" if args.device == "cpu"
                                                    else str(cfg.get("torch_dtype", "bf16")))).torch
    tp = args.tp
    job = dist.current()
    world = job.world if job is not None else 1
    if tp != world:
        raise UsageError(f"--tp {tp} needs {tp} processes (torchrun --nproc-per-node {tp} -m streamconv generate ...); "
                         f"this run has {world}")
    with TorchDistSource(ckpt, args.max_memory) as source:
        # the model built from the config must be the one stored (megatron-core loads the embedding even when
        # its shape differs), and its size is the model's, not the stored tensors'
        check_checkpoint(with_held_mtp(spec, source.tensors), source, strict=False,
                         pad_multiple=vocab_padding(ckpt, source))
        source.check_objects(MODEL_PREFIXES)  # megatron-core unpickles them with weights_only=False: plain data only
    # the model generate builds: without MTP layers (they train a draft head; next-token logits do not use them)
    params = sum(math.prod(shape) for shape in {b.key: b.global_shape
                                                for b in rules.bindings(spec.without_mtp())}.values())
    need = params * dtype.itemsize // tp
    have = args.max_memory or available_memory(args.device)
    what = (f"the model: {params:,} parameters x {dtype.itemsize} bytes ({str(dtype).removeprefix('torch.')})"
            f"{f' / {tp} ranks' if tp > 1 else ''} = {fmt_bytes(need)} per process")
    if need > have:
        raise UsageError(f"{what}, above the {fmt_bytes(have)} {'--max-memory allows' if args.max_memory else 'free'}"
                         f"; use --dtype bf16, more --tp ranks, or a bigger machine")
    shows = (job is None or job.rank == 0) and not (args.json or args.quiet)  # rank 0, for a person
    if shows:
        print(f"{what}; loading {ckpt}", file=sys.stderr, flush=True)
    return ckpt, cfg, dtype, params, shows


def _load(ckpt, cfg: dict, dtype, device: str, tp: int):
    """megatron-core's model for ``cfg``, loaded from ``ckpt``; returns its ``step(ids) -> logits``."""
    from streamconv.formats.run_config import is_nemotron_h
    from streamconv.reference import mcore as mh

    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if is_nemotron_h(cfg):  # MambaModel: mamba_ssm's kernels where installed, pure-torch stand-ins elsewhere
        from streamconv.reference import mcore_hybrid

        model = mcore_hybrid.build_mamba(cfg, tp=tp, dtype=dtype, parallel_output=False)
        mcore_hybrid.load(model, ckpt, check_extra=False)
        forward = mcore_hybrid.logits_of
    else:
        build = mh.build_hetero_gpt if cfg.get("block_configs") else mh.build_gpt
        model = build(cfg, tp=tp, dtype=dtype, parallel_output=False)
        mh.load_checkpoint(model, ckpt, check_extra=False)  # default strictness
        forward = mh.logits
    if device.startswith("cuda"):
        model = model.to(device)

    def step(ids):
        return forward(model, ids.to(device) if device != "cpu" else ids).cpu()

    return step


def _compare_hf(hf_folder: str, cfg: dict, prompt_ids, new_ids, first) -> dict:
    """The HF model's greedy tokens and first-step logits beside ours (``--compare-hf``)."""
    from streamconv.inputs import resolve_hf_model

    folder = resolve_hf_model(hf_folder)
    ref_ids, ref_first = greedy(hf_step(folder, cfg), prompt_ids, len(new_ids), None)
    return {"folder": str(folder), "identical": ref_ids == new_ids, "hf_tokens": ref_ids,
            "first_difference": next((i for i, (a, b) in enumerate(zip(new_ids, ref_ids)) if a != b), None),
            "first_step_max_abs_logit_diff": float((first - ref_first.float()).abs().max())}


def generate_command(args) -> int:
    from streamconv.runtime import dist

    job = None
    if dist.launched():  # under torchrun: the --tp ranks (nccl between GPUs, gloo on the CPU)
        job = dist.Job.start(backend="nccl" if args.device.startswith("cuda") else "gloo")
    try:
        result = generate(args)
    finally:
        if job is not None:
            job.close()
    speaks = job is None or job.rank == 0
    cmp = result.get("compare_hf")
    if speaks:
        if args.json:
            print(json.dumps(result, indent=2))
        elif cmp is not None:
            verdict = "identical" if cmp["identical"] else f"differ from token {cmp['first_difference']}"
            print(f"compare-hf: greedy tokens {verdict} ({len(result['tokens'])} tokens); first step max |dlogit| "
                  f"{cmp['first_step_max_abs_logit_diff']:.3g}", file=sys.stderr)
    return EXIT_MISMATCH if cmp is not None and not cmp["identical"] else 0
