"""The common state of a Megatron-LM training checkpoint, read without running its pickles, and the HF
config its ``args`` describe (``mcore2hf`` of a training checkpoint needs no ``--hf-config``).

Megatron-LM's training loop saves the non-sharded state (``args``, ``iteration``, ``checkpoint_version``,
the optimizer's scheduler, ...) in ``common.pt`` (megatron-core 0.16-0.18) or as the object
``common_state/shard_0_1`` inside the ``.distcp`` files (0.19+). Both are ``torch.save`` pickles. They are
read here with an allow-list unpickler: ``argparse.Namespace``, ``collections.OrderedDict``, torch dtypes
(as ``dtypes.DType``) and plain containers are rebuilt; tensors become ``None`` (their bytes are never read); any other global (an
enum of megatron's, a partial, a class) becomes a ``Foreign`` stand-in that records its name and arguments.
Nothing is imported and no code from the checkpoint runs.

``args`` -> the provider fields ``run_config_reader`` reads (sizes, query groups, vocabulary, norm epsilon,
rope base and scaling, tying, dtype, and the heterogeneous layers config for DeciLM), -> the HF config.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import io
import pickle
import zipfile
from pathlib import Path

from streamconv import dtypes
from streamconv.errors import BadInputError
from streamconv.formats.names import COMMON_FILE, COMMON_STATE_KEY

MAX_PICKLE_BYTES = 64 * 1024**2  # a common state is kilobytes to a few MB


class Foreign:
    """An object of a global the allow-list does not rebuild (a class of its own per name, made here, with
    only these methods): its name, what it was called with, its state."""

    name = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(map(repr, self.args))})"


MAX_FOREIGN = 1024  # distinct globals a common state may name that the allow-list does not rebuild


def _foreign(name: str) -> type:
    return type("Foreign", (Foreign,), {"name": name})


_ALLOWED = {
    ("argparse", "Namespace"): argparse.Namespace,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
}


class _Unpickler(pickle.Unpickler):
    """The allow-list unpickler. Every other global becomes a ``Foreign`` stand-in: one class per name,
    interned, at most ``MAX_FOREIGN`` names (a crafted pickle naming millions would otherwise build a class
    for each)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._foreign: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        # torch.save's protocol 2 names Python 2's modules (__builtin__.set): read them as Python 3's
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and name in dtypes.BY_NAME:
            return dtypes.BY_NAME[name]  # a dtype, as ``dtypes.DType`` (torch is not imported for it)
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter"):
            return lambda *a, **k: None  # a tensor: its bytes are never read
        full = f"{module}.{name}"
        stand_in = self._foreign.get(full)
        if stand_in is None:
            if len(self._foreign) >= MAX_FOREIGN or len(full) > 512:
                raise pickle.UnpicklingError(f"it names more than {MAX_FOREIGN} unknown globals (or one of "
                                             f"{len(full)} characters); a common state names a few")
            stand_in = self._foreign[full] = _foreign(full)
        return stand_in

    def persistent_load(self, pid):
        return None  # a tensor's storage


def unpickle(data: bytes, where) -> object:
    try:
        return _Unpickler(io.BytesIO(data)).load()
    except Exception as e:  # a damaged pickle: one line, never a traceback
        raise BadInputError(f"{where}: the common state is not readable ({type(e).__name__}: {e})") from None


def load_torch_save(data: bytes, where) -> object:
    """What ``torch.save`` wrote (a zip with ``<name>/data.pkl``), tensors as ``None``."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names:
                raise BadInputError(f"{where}: not a torch.save archive (no data.pkl)")
            info = z.getinfo(names[0])
            if info.file_size > MAX_PICKLE_BYTES:
                raise BadInputError(f"{where}: its pickle is {info.file_size} bytes; a common state is far smaller")
            payload = z.read(names[0])
    except zipfile.BadZipFile:
        payload = data  # the legacy (non-zip) format is a plain pickle
    return unpickle(payload, where)


def common_state(ckpt: Path, source=None) -> dict | None:
    """The common state of checkpoint folder ``ckpt`` (``common.pt``, or the ``common_state`` object of
    ``source``, a ``TorchDistSource``); None when neither is there."""
    path = Path(ckpt) / COMMON_FILE
    if path.is_file():
        if path.stat().st_size > MAX_PICKLE_BYTES:
            raise BadInputError(f"{path}: {path.stat().st_size} bytes; a common state is far smaller")
        state = load_torch_save(path.read_bytes(), path)
    elif source is not None and COMMON_STATE_KEY in getattr(source, "objects", {}):
        raw = load_torch_save(source.read_bytes(COMMON_STATE_KEY), f"{ckpt}: {COMMON_STATE_KEY}")
        state = raw[0] if isinstance(raw, list) and raw else raw
    else:
        return None
    return state if isinstance(state, dict) else None


def _dtype_name(value) -> str | None:
    if isinstance(value, dtypes.DType):
        return str(value)
    return None


# Megatron-LM's args of a hybrid (Nemotron-H) model that are provider fields of the same name (TransformerConfig's)
HYBRID_ARGS = ("mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim", "moe_router_topk",
               "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_latent_size",
               "moe_router_topk_scaling_factor", "moe_router_num_groups", "moe_router_group_topk", "mtp_num_layers",
               "mtp_use_repeated_layer")


def _activation(a: dict) -> str:
    """The activation's dotted name: ``--swiglu``, ``--squared-relu``, else the function the args hold (a global
    the allow-list does not rebuild keeps its name)."""
    if a.get("swiglu"):
        return "torch.nn.functional.silu"
    if a.get("squared_relu"):
        return "megatron.core.activations.squared_relu"
    name = getattr(a.get("activation_func"), "name", None)
    return name if isinstance(name, str) else str(a.get("activation_func"))


def _hybrid_fields(a: dict) -> dict:
    """A hybrid model's fields (``--hybrid-layer-pattern``, or the older ``--hybrid-override-pattern`` with
    ``--mtp-hybrid-override-pattern``, which Megatron-LM itself unifies the same way)."""
    pattern = a.get("hybrid_layer_pattern") or a.get("hybrid_override_pattern")
    if not isinstance(pattern, str) or not pattern:
        return {}
    mtp, depths = a.get("mtp_hybrid_override_pattern"), a.get("mtp_num_layers")
    if isinstance(mtp, str) and mtp and isinstance(depths, int) and 0 < depths <= 64 and "/" not in pattern:
        pattern += ("/" + mtp) * depths
    return {"hybrid_layer_pattern": pattern, "num_moe_experts": a.get("num_experts"),
            **{k: a.get(k) for k in HYBRID_ARGS}}


def model_section(args: argparse.Namespace) -> dict:
    """Megatron-LM's ``args`` as the provider fields of a ``run_config.yaml`` model section."""
    a = vars(args)
    heads = a.get("num_attention_heads")
    groups = a.get("num_query_groups") if a.get("group_query_attention") else heads
    m = {
        "hidden_size": a.get("hidden_size"),
        "num_layers": a.get("num_layers"),
        "num_attention_heads": heads,
        "num_query_groups": groups,
        "ffn_hidden_size": a.get("ffn_hidden_size"),
        "kv_channels": a.get("kv_channels"),
        "vocab_size": a.get("vocab_size") or a.get("padded_vocab_size"),
        "seq_length": a.get("max_position_embeddings") or a.get("seq_length"),
        "layernorm_epsilon": a.get("norm_epsilon", 1e-5),
        "rotary_base": a.get("rotary_base", 10000),
        "share_embeddings_and_output_weights": not a.get("untie_embeddings_and_output_weights", False),
        "params_dtype": _dtype_name(a.get("params_dtype")),
        "bf16": bool(a.get("bf16")),
        "fp16": bool(a.get("fp16")),
        "normalization": a.get("normalization", "RMSNorm"),
        "gated_linear_unit": bool(a.get("swiglu", False)),
        "activation_func": _activation(a),
        "add_bias_linear": bool(a.get("add_bias_linear", False)),
        "add_qkv_bias": bool(a.get("add_qkv_bias", False)),
        "position_embedding_type": a.get("position_embedding_type", "rope"),
        "rope_scaling": bool(a.get("use_rope_scaling", False)),
        "rope_scaling_factor": a.get("rope_scaling_factor", 8.0),
        "attention_dropout": a.get("attention_dropout", 0.0),
        "init_method_std": a.get("init_method_std", 0.02),
        "heterogeneous_layers_config_encoded_json": a.get("heterogeneous_layers_config_encoded_json"),
        "heterogeneous_layers_config_path": a.get("heterogeneous_layers_config_path"),
        **_hybrid_fields(a),
    }
    return {k: v for k, v in m.items() if v is not None}


def hf_config_from_args(args, where) -> dict:
    """The HF config the training ``args`` describe (Llama, DeciLM with a heterogeneous layers config, or
    Nemotron-H with a hybrid layer pattern)."""
    from streamconv.formats.run_config_reader import hf_config_from_model_section

    if not isinstance(args, argparse.Namespace):
        raise BadInputError(f"{where}: the common state's 'args' is not an argparse.Namespace; pass --hf-config")
    return hf_config_from_model_section(model_section(args), where)
