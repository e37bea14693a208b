"""A command's inputs, resolved and checked: the HF model or checkpoint a user names, the dtype, the budget.

Every command resolves its inputs through here (no command imports another): ``resolve_hf_model`` (a local
folder, a config.json, or a hub id), ``resolve_checkpoint`` (a torch_dist folder, an ``iter_*``/``release``
folder or their parent), ``model_config`` (what describes a checkpoint's model), ``parse_dtype`` (the one
``--dtype`` vocabulary), ``check_budget``/``chunk_bytes_for``/``check_fits`` (``--max-memory``) and
``import_plan_for`` (a source's plan, its tensors checked first).
"""

from __future__ import annotations

import json
from pathlib import Path

from streamconv import dtypes
from streamconv.engine import runner
from streamconv.errors import BadInputError, UsageError
from streamconv.formats import run_config_reader
from streamconv.formats.names import HF_CONFIG_DIR, IDENTITY_FILE, METADATA_FILE, MODEL_PREFIXES, STATE_DIR, \
    TRACKER_FILE, is_extra_state
from streamconv.models import rules
from streamconv.models.config import load_config, spec_from_config
from streamconv.models.spec import ModelSpec
from streamconv.plan.build import DEFAULT_CHUNK_BYTES, DEFAULT_FILE_BYTES, Plan, check_source, import_plan
from streamconv.units import fmt_bytes

# Tensors a (padded) vocabulary may make longer than the config's vocab_size: the extra rows are dropped.
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
DEFAULT_VOCAB_DIVISOR = 128  # Megatron-LM's --make-vocab-size-divisible-by
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]
CONFIG_PATTERNS = ["*.json", "tokenizer.model"]  # what a hub --hf-config fetches: never the weights
DTYPES = {
    "bf16": dtypes.BFLOAT16, "bfloat16": dtypes.BFLOAT16,
    "fp16": dtypes.FLOAT16, "float16": dtypes.FLOAT16, "half": dtypes.FLOAT16,
    "fp32": dtypes.FLOAT32, "float32": dtypes.FLOAT32, "float": dtypes.FLOAT32,
}
# the one vocabulary --help and errors use (DTYPES also takes float/half and the like, as torch names them)
DTYPE_CHOICES = "choose bf16, fp16 or fp32 (also spelled bfloat16, float16, float32), or auto (keep the source's)"


def parse_dtype(name: str | None) -> dtypes.DType | None:
    if name is None or name == "auto":
        return None
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise UsageError(f"--dtype {name!r}: {DTYPE_CHOICES}") from None


def resolve_hf_model(hf_model: str, allow_patterns=HUB_PATTERNS, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub repo id, fetched (only the needed files) or found in the cache."""
    path = Path(hf_model).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.name == "config.json":
        return path.parent
    if path.is_file():
        hint = ("a single safetensors file: pass the folder that holds it with its config.json"
                if path.suffix == ".safetensors" else "a file, not a model folder: pass the folder holding config.json")
        raise BadInputError(f"{hf_model}: {hint}")
    if path.exists():
        raise BadInputError(f"{hf_model}: not a folder; pass the model folder holding config.json")
    if hf_model.startswith((".", "/", "~")) or hf_model.count("/") != 1:
        raise BadInputError(f"{hf_model}: no such folder, and not a Hugging Face repo id (owner/name); check the path")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=hf_model, revision=revision, allow_patterns=allow_patterns))
    except Exception as e:  # the hub raises many types (offline, not found, auth, network)
        raise BadInputError(
            f"{hf_model}: cannot get it from the Hugging Face hub or its cache ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); pass a local folder or check HF_HUB_OFFLINE/HF_TOKEN"
        ) from e


def split_hub_id(hf_model: str, revision: str | None) -> tuple[str, str | None]:
    """``owner/name@revision`` -> (``owner/name``, revision); ``--revision`` given too must agree."""
    repo_id, at, rev = hf_model.partition("@")
    if at and revision is not None and revision != rev:
        raise UsageError(f"--hf-model {hf_model} names revision {rev!r} but --revision says {revision!r}")
    return repo_id, (rev if at else revision)


def is_hub_id(hf_model: str) -> bool:
    """Not a local path, and shaped as ``owner/name`` (with an optional ``@revision``)."""
    repo_id = hf_model.partition("@")[0]
    return not Path(hf_model).expanduser().exists() and not hf_model.startswith((".", "/", "~")) and \
        repo_id.count("/") == 1 and all(repo_id.split("/"))


def open_hf_model(hf_model: str, revision: str | None = None, download_first: bool = False,
                  pinned: str | None = None):
    """What ``--hf-model`` names, ready to read: ``(folder, hub)``. A local folder (or config.json) as is, hub
    None. A hub id: its revision pinned to a commit (``pinned``: the commit an interrupted run of this output
    was pinned to, resumed on); a model whose weights are all in the local cache, or with ``download_first``
    (fetched whole first), is read from the cache as a folder (hub None); otherwise only its small files go
    to the cache and ``hub`` (a ``sources.hub.HubModel``) streams the weights. ``HF_HUB_OFFLINE``: the cache only."""
    if not is_hub_id(hf_model):
        return resolve_hf_model(hf_model), None
    from huggingface_hub import constants

    repo_id, rev = split_hub_id(hf_model, revision)
    if constants.HF_HUB_OFFLINE:
        return resolve_hf_model(repo_id, revision=rev), None
    from streamconv.errors import SourceIOError
    from streamconv.sources.hub import HubModel, hub_error

    try:
        model = HubModel.resolve(repo_id, pinned or rev)
    except SourceIOError as unreachable:  # the Hub cannot be reached: a model in the local cache is read there
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(repo_id, revision=pinned or rev, allow_patterns=HUB_PATTERNS,
                                          local_files_only=True)), None
        except Exception:
            raise unreachable from None

    if download_first or model.cached_folder() is not None:  # (cached weights: a missing small file is fetched)
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(repo_id, revision=model.sha, allow_patterns=HUB_PATTERNS)), None
        except Exception as e:
            raise hub_error(repo_id, "downloading" if download_first else "the cache", e) from None
    return model.fetch_small(), model


def open_hf_source(hf_model: str, revision: str | None = None, download_first: bool = False,
                   pinned: str | None = None):
    """``(folder, cfg, source, hub)`` for ``--hf-model`` (``open_hf_model``): a ``SafetensorsSource`` over a
    local folder or cache snapshot, or a ``HubSource`` streaming the weights of ``hub`` (a quantized
    checkpoint's scales are read here)."""
    from streamconv.sources.hub import HubSource
    from streamconv.sources.safetensors import SafetensorsSource

    folder, hub = open_hf_model(hf_model, revision, download_first, pinned)
    cfg = load_config(folder)
    return folder, cfg, (HubSource(hub, folder, cfg) if hub is not None else SafetensorsSource(folder, cfg)), hub


def chunk_bytes_for(max_memory: int) -> int:
    """Chunks small enough that several (buffer, cast output, sink copy) fit the budget at once.

    No floor of its own: ``check_budget`` refuses budgets under ``MIN_MAX_MEMORY`` (tests lift that floor to
    split a tiny model into many chunks).
    """
    return max(1, min(DEFAULT_CHUNK_BYTES, max_memory // 8))


SMALL_CHUNK_BYTES = 1024**2  # below this, framing and per-chunk work dominate
MIN_MAX_MEMORY = 1024**2  # the smallest --max-memory accepted: chunks of 128 KiB, framing under 1% of each
TINY_BUDGET_HOOK = "STREAMCONV_TEST_TINY_BUDGET"  # tests split tiny models into many chunks (crashpoints.py)


def check_budget(max_memory: int, quiet: bool = False) -> None:
    """A budget below ``MIN_MAX_MEMORY`` is refused (chunks of a few KiB, each a torch.save archive of its
    own, would make the output larger than the model and the run slow); one that makes chunks under
    ``SMALL_CHUNK_BYTES`` is allowed, and said. Tests lift the floor with ``STREAMCONV_TEST_TINY_BUDGET=1``."""
    import os
    import sys

    chunk = chunk_bytes_for(max_memory)
    if max_memory < MIN_MAX_MEMORY and not os.environ.get(TINY_BUDGET_HOOK):
        raise UsageError(f"--max-memory {fmt_bytes(max_memory)} is below the {fmt_bytes(MIN_MAX_MEMORY)} "
                         f"streamconv accepts: it would make chunks of {fmt_bytes(chunk)}, each framed as an "
                         "archive of its own (~1 KiB), so the output would grow and the run crawl; pass "
                         f"--max-memory {fmt_bytes(8 * SMALL_CHUNK_BYTES)} or more")
    if chunk < SMALL_CHUNK_BYTES and not quiet:
        sys.stderr.write(f"warning: --max-memory {fmt_bytes(max_memory)} makes chunks of at most "
                         f"{fmt_bytes(chunk)}: each is a torch.save archive of its own (framing of ~1 KiB "
                         f"each) and a step of its own, so the output grows and the run slows; "
                         f"--max-memory {fmt_bytes(8 * SMALL_CHUNK_BYTES)} or more avoids it\n")


def check_fits(plan: Plan, source, max_memory: int) -> int:
    """The budget holds the plan's largest chunk; returns what that chunk needs (``runner.min_memory``)."""
    need = runner.min_memory(plan, source)
    if need > max_memory:
        raise UsageError(f"--max-memory {fmt_bytes(max_memory)} is below the {fmt_bytes(need)} one chunk needs")
    return need


def source_dtypes(source) -> dict:
    """Each source tensor's dtype as the plan sees it: a quantized weight has the dtype it dequantizes to."""
    quant = source.quant
    return {name: quant.dtype if quant is not None and name in quant.scales else info.dtype
            for name, info in source.tensors.items() if quant is None or name not in quant.companions}


def import_plan_for(source, spec, dtype: dtypes.DType | None, chunk_bytes: int, allow_unused: bool = False,
                    file_bytes: int = DEFAULT_FILE_BYTES, drop_mtp: bool = False) -> Plan:
    """The import plan of ``source`` (a ``SafetensorsSource``), after checking its tensors against ``spec``."""
    check_source(spec, source.tensors, allow_unused=allow_unused, quant=source.quant, drop_mtp=drop_mtp)
    return import_plan(spec, source_dtypes(source), dtype, chunk_bytes=chunk_bytes, file_bytes=file_bytes)


def refuse_unfinished(p: Path) -> None:
    """An hf2mcore output (or its iter_0000000) that was interrupted: say so, and how to finish it."""
    unfinished = next((d for d in (p, p.parent) if (d / STATE_DIR / IDENTITY_FILE).is_file()), None)
    if unfinished is not None:
        raise BadInputError(f"{unfinished}: an unfinished streamconv conversion (no {METADATA_FILE} yet: it was "
                            "interrupted); run the same hf2mcore command again to finish it, then use it")


def resolve_checkpoint(path: str | Path) -> Path:
    """The folder holding ``.metadata``: ``path`` itself, the one its tracker file names, or its only
    ``iter_*``/``release`` folder."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise BadInputError(f"{p}: not found (pass a torch_dist checkpoint folder or its parent)")
    if (p / METADATA_FILE).is_file():
        return p
    tracker = p / TRACKER_FILE
    if tracker.is_file():
        text = tracker.read_text(errors="replace").strip()
        if text == "release":
            sub = p / "release"
        elif text.isascii() and text.isdigit():
            sub = p / f"iter_{int(text):07d}"
        else:
            raise BadInputError(f"{tracker}: holds {text[:40]!r}, not an iteration number or 'release'")
        if not (sub / METADATA_FILE).is_file():
            raise BadInputError(f"{sub}: named by {TRACKER_FILE} but holds no {METADATA_FILE}: the checkpoint is "
                                "incomplete or was moved")
        return sub
    found = sorted(d for d in p.iterdir()
                   if d.is_dir() and (d.name.startswith("iter_") or d.name == "release") and (d / METADATA_FILE).is_file())
    if len(found) == 1:
        return found[0]
    if found:
        raise BadInputError(f"{p}: holds {len(found)} checkpoints ({', '.join(d.name for d in found[:4])}"
                            f"{', ...' if len(found) > 4 else ''}) and no {TRACKER_FILE}; pass one of them")
    refuse_unfinished(p)
    raise BadInputError(f"{p}: not a torch_dist checkpoint (no {METADATA_FILE}, no {TRACKER_FILE}, no iter_*/release "
                        "folder with one)")


def model_config(ckpt: Path, hf_config: str | None, max_memory: int | None = None,
                 source=None) -> tuple[dict, Path | None, bytes | None, str]:
    """The HF config dict, the folder it came from (tokenizer files may be there), when given as a file its
    exact bytes (copied verbatim), and what described the model (for the summary's ``config_from``).
    ``max_memory``: what reading ``.metadata`` may build (``TorchDistSource``); ``source``: the checkpoint's
    ``TorchDistSource`` when the caller has it open (its ``.metadata`` is then not read again)."""
    if hf_config is not None:
        folder = resolve_hf_model(hf_config, allow_patterns=CONFIG_PATTERNS)
        cfg = load_config(folder)
        return cfg, folder, (folder / "config.json").read_bytes(), f"--hf-config {hf_config}"
    path = ckpt / run_config_reader.RUN_CONFIG_FILE
    if path.is_file():
        derived = run_config_reader.hf_config_from_run_config(path)
        carried = carried_config(ckpt, derived)
        if carried is not None:
            return (*carried, f"{HF_CONFIG_DIR}/config.json (the source's, checked against "
                              f"{run_config_reader.RUN_CONFIG_FILE})")
        return derived, None, None, run_config_reader.RUN_CONFIG_FILE
    from streamconv.formats import megatron_args
    from streamconv.sources.torch_dist import TorchDistSource

    if source is not None:  # a Megatron-LM training checkpoint: its args in the common state
        state = megatron_args.common_state(ckpt, source)
    else:
        with TorchDistSource(ckpt, max_memory) as opened:
            state = megatron_args.common_state(ckpt, opened)
    if state is not None and state.get("args") is not None:
        where = ckpt / megatron_args.COMMON_FILE if (ckpt / megatron_args.COMMON_FILE).is_file() else ckpt
        return (megatron_args.hf_config_from_args(state["args"], where), None, None,
                "the training args in the checkpoint's common state")
    raise UsageError(f"{ckpt}: nothing describes the model (no {run_config_reader.RUN_CONFIG_FILE} as Megatron-Bridge "
                     "writes, no training args in the common state as Megatron-LM writes); pass --hf-config <HF model "
                     "folder | config.json | hub id>")


def carried_config(ckpt: Path, derived: dict) -> tuple[dict, None, bytes] | None:
    """The source's config.json that hf2mcore kept (``hf_config/config.json``), when it still describes the
    model ``run_config.yaml`` describes (same spec and rope): exported as it was, token ids included."""
    path = ckpt / HF_CONFIG_DIR / "config.json"
    if not path.is_file() or path.is_symlink() or path.stat().st_size > 16 * 1024**2:
        return None
    try:
        raw = path.read_bytes()
        carried = json.loads(raw)
        a, b = spec_from_config(carried), spec_from_config(derived)
    except (ValueError, OSError, BadInputError):
        return None
    import dataclasses

    same_rope = float(carried.get("rope_theta", 10000.0)) == float(derived.get("rope_theta", 10000.0)) and \
        bool(carried.get("rope_scaling")) == bool(derived.get("rope_scaling"))
    # (run_config.yaml names the MTP layers converted, which --drop-mtp leaves out; the source's config declares them)
    if dataclasses.replace(a.without_mtp(), torch_dtype=b.torch_dtype) != b.without_mtp() or not same_rope:
        return None
    return carried, None, raw


def vocab_padding(ckpt: Path, source) -> int:
    """What Megatron padded the vocabulary to a multiple of: ``make_vocab_size_divisible_by`` x
    ``tensor_model_parallel_size`` of the training args in the checkpoint's common state, else 128 (its
    default divisor, one rank)."""
    from streamconv.formats import megatron_args

    try:
        args = (megatron_args.common_state(ckpt, source) or {}).get("args")
    except BadInputError:
        args = None
    divisor, tp = (getattr(args, name, None) for name in ("make_vocab_size_divisible_by", "tensor_model_parallel_size"))
    if isinstance(divisor, int) and isinstance(tp, int) and 0 < divisor <= 1 << 16 and 0 < tp <= 1 << 16:
        return divisor * tp
    return DEFAULT_VOCAB_DIVISOR


def check_checkpoint(spec: ModelSpec, source, strict: bool = True,
                     pad_multiple: int = 128) -> list[str]:
    """Every megatron tensor the spec implies is in ``source`` (a ``TorchDistSource``) with its shape; no model
    tensor is left over. The
    vocabulary tensors may be longer only by Megatron's padding: to the next multiple of ``pad_multiple``."""
    expected: dict[str, tuple[int, ...]] = {}
    for b in rules.bindings(spec):
        expected[b.key] = b.global_shape
    where = source.folder
    hint = "check that --hf-config (or the checkpoint's run_config.yaml) describes this checkpoint"
    missing = [k for k in expected if k not in source.tensors]
    if missing:
        raise BadInputError(f"{where}: tensor {missing[0]!r} is needed for {spec.architecture} with this config but "
                            f"is not in the checkpoint ({len(missing)} missing); {hint}")
    for key, shape in expected.items():
        meta = source.tensors[key]
        got = meta.shape
        padded = key in VOCAB_KEYS and got[1:] == shape[1:] and got[0] == -(-shape[0] // pad_multiple) * pad_multiple
        if got != shape and key in VOCAB_KEYS and got[1:] == shape[1:] and got[0] > shape[0] and not padded:
            raise BadInputError(f"{where}: tensor {key!r} has {got[0]} rows but the config's vocabulary is {shape[0]}: "
                                f"more than Megatron's padding to a multiple of {pad_multiple} "
                                f"({-(-shape[0] // pad_multiple) * pad_multiple} rows); cutting it would drop real "
                                f"tokens; {hint}")
        if got != shape and not padded:
            raise BadInputError(f"{where}: tensor {key!r} has shape {list(got)} but the config implies "
                                f"{list(shape)}; {hint}")
        if str(meta.dtype).removeprefix("torch.") not in dtypes.BY_NAME or not dtypes.of(meta.dtype).safetensors:
            raise BadInputError(f"{where}: tensor {key!r} is {meta.dtype}, which safetensors cannot store")
    unused = sorted(k for k in source.tensors if k not in expected and k.startswith(MODEL_PREFIXES)
                    and not is_extra_state(k))
    if unused and not strict:  # --not-strict: exported without them, and said in the summary
        return unused
    if unused:
        tied = " (the config ties the embeddings but the checkpoint has an output layer)" \
            if unused[0] == "output_layer.weight" else ""
        raise BadInputError(f"{where}: {len(unused)} model tensor(s) are not in the {spec.architecture} mapping of "
                            f"this config, first {unused[0]!r}{tied}; {hint} (or --not-strict to leave them out)")
    return []
