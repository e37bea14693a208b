"""Run real megatron-core GPT models on CPU, in one process (used by `streamconv demo` and the tests).

The harness is the "real client" of DESIGN.md: it builds a megatron-core
``GPTModel`` from a Hugging Face ``config.json`` dict (plain Llama, or DeciLM /
``nemotron-nas`` through ``HeterogeneousTransformerConfig``), loads a
``torch_dist`` checkpoint with ``dist_checkpointing.load`` at default
strictness, and computes logits.

    model = build_gpt(hf_config)            # or build_hetero_gpt(hf_config)
    save_reference_checkpoint(model, dir)   # ground truth written by mcore itself
    load_checkpoint(model, dir)             # raises on missing / unexpected keys
    out = logits(model, tokens)             # [b, s, V] float32
    checkpoint_tensors(dir)                 # {key: global tensor}, for bit-exact comparisons

Everything runs on CPU, fp32, with the local (non Transformer Engine) layer specs;
weights are initialised from torch's global RNG (seed it for reproducible models).
megatron-core assumes CUDA in a few places; ``cpu_patches()`` is the one context
manager that papers over them and every public function here runs inside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")

from megatron.core import dist_checkpointing, parallel_state  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.models.gpt.heterogeneous.heterogeneous_layer_specs import (  # noqa: E402
    get_gpt_heterogeneous_layer_spec,
)
from megatron.core.tensor_parallel import random as mcore_random  # noqa: E402
from megatron.core.transformer.heterogeneous.heterogeneous_config import (  # noqa: E402
    HeterogeneousTransformerConfig,
)
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402

__all__ = [
    "cpu_patches",
    "init_distributed",
    "build_gpt",
    "build_hetero_gpt",
    "load_checkpoint",
    "CheckpointLoadError",
    "save_reference_checkpoint",
    "checkpoint_keys",
    "checkpoint_tensors",
    "model_checkpoint_keys",
    "logits",
]

MAX_SEQ_LEN = 4096


# --------------------------------------------------------------------------- CPU patches


@contextlib.contextmanager
def cpu_patches():
    """Make megatron-core's CUDA assumptions hold on CPU, for the duration of the block.

    - ``torch.cuda.current_device()`` returns "cpu" (used as a ``device=`` argument);
    - ``CudaRNGStatesTracker.fork`` is a null context (it would save/restore CUDA rng state);
    - ``torch.cuda.synchronize`` is a no-op (the torch_dist saver calls it after its D2H copy).
    Re-entrant: nested uses are no-ops.
    """
    if getattr(cpu_patches, "_depth", 0):
        cpu_patches._depth += 1
        try:
            yield
        finally:
            cpu_patches._depth -= 1
        return
    saved_current_device = torch.cuda.current_device
    saved_synchronize = torch.cuda.synchronize
    trackers = [mcore_random.CudaRNGStatesTracker]
    saved_forks = [t.fork for t in trackers]
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    for t in trackers:
        t.fork = lambda self, *a, **k: contextlib.nullcontext()
    cpu_patches._depth = 1
    try:
        yield
    finally:
        cpu_patches._depth = 0
        torch.cuda.current_device = saved_current_device
        torch.cuda.synchronize = saved_synchronize
        for t, f in zip(trackers, saved_forks):
            t.fork = f


# --------------------------------------------------------------------------- process setup


def init_distributed(tp: int = 1) -> None:
    """A process group (gloo, world size 1, unless one is initialized already: torchrun's) + mcore model
    parallel (``tp``, 1). Idempotent."""
    if not torch.distributed.is_initialized():
        fd, path = tempfile.mkstemp(prefix="mcore_harness_pg_")
        os.close(fd)
        os.unlink(path)
        torch.distributed.init_process_group(
            backend="gloo", init_method=f"file://{path}", world_size=1, rank=0
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tp, 1)


# --------------------------------------------------------------------------- model builders


def _common_config_kwargs(cfg: dict, tp: int = 1, dtype: torch.dtype = torch.float32) -> dict:
    """TransformerConfig kwargs shared by the Llama and DeciLM builders (``tp``: tensor-parallel ranks;
    ``dtype``: the parameters')."""
    h = cfg["hidden_size"]
    nq = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or h // nq
    return dict(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=h,
        num_attention_heads=nq,
        kv_channels=head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.get("rms_norm_eps", 1e-6),  # LlamaConfig's default
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        perform_initialization=True,
        init_method_std=cfg.get("initializer_range", 0.02),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
    )


def _rope(cfg: dict):
    """(rope_theta, llama3 scaling or None) from a HF config dict.

    Reads transformers 4.x keys (``rope_theta``, ``rope_scaling``) and transformers 5.x
    ``rope_parameters`` (which holds ``rope_theta`` and the scaling fields together).
    llama3 scaling -> (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
    """
    rp = cfg.get("rope_parameters") or {}
    rs = cfg.get("rope_scaling") or rp
    theta = float(cfg.get("rope_theta") or rp.get("rope_theta") or 10000.0)
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise NotImplementedError(f"rope type {kind!r} is not supported by the harness")
    return theta, (
        float(rs["factor"]),
        float(rs.get("low_freq_factor", 1.0)),
        float(rs.get("high_freq_factor", 4.0)),
        int(rs.get("original_max_position_embeddings", 8192)),
    )


def _gpt_model(config: TransformerConfig, spec, cfg: dict, parallel_output: bool = True) -> GPTModel:
    theta, scaling = _rope(cfg)
    with cpu_patches():
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=cfg["vocab_size"],
            max_sequence_length=cfg.get("max_position_embeddings", MAX_SEQ_LEN),
            pre_process=parallel_state.is_pipeline_first_stage(),  # True unless pipeline parallel
            post_process=parallel_state.is_pipeline_last_stage(),
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=theta,
            rope_scaling=scaling is not None,
            rope_scaling_factor=scaling[0] if scaling else 8.0,
        )
    if scaling is not None:
        # mcore hard-codes low=1, high=4, original=8192 in _apply_scaling; recompute
        # inv_freq with the config's own values (identical for Llama 3.1 configs).
        rope = model.rotary_pos_emb
        dim = config.kv_channels
        base = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor, low, high, orig = scaling
        rope.inv_freq = rope._apply_scaling(
            base,
            factor=factor,
            low_freq_factor=low,
            high_freq_factor=high,
            original_max_position_embeddings=orig,
        )
    return model.eval()


def build_gpt(cfg: dict, tp: int = 1, dtype: torch.dtype = torch.float32, parallel_output: bool = True) -> GPTModel:
    """Homogeneous Llama GPTModel (local spec, fp32 unless ``dtype``, CPU) from a HF LlamaConfig dict; ``tp``:
    tensor parallel over the initialized process group (``init_distributed(tp)``); ``parallel_output=False``:
    full-vocabulary logits on every rank."""
    init_distributed(tp)
    config = TransformerConfig(
        **_common_config_kwargs(cfg, tp, dtype),
        num_query_groups=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        ffn_hidden_size=cfg["intermediate_size"],
    )
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    return _gpt_model(config, spec, cfg, parallel_output)


def build_hetero_gpt(hf_config: dict, tp: int = 1, dtype: torch.dtype = torch.float32,
                     parallel_output: bool = True) -> GPTModel:
    """Heterogeneous DeciLM (nemotron-nas, ``block_configs``) GPTModel, local spec, fp32, CPU.

    Per-layer ``n_heads_in_group`` / ``ffn_mult`` / ``no_op`` / ``replace_with_linear`` are
    read by mcore's ``HeterogeneousTransformerConfig`` from the encoded json; the top-level
    ``num_query_groups`` / ``ffn_hidden_size`` are only defaults that every block overrides.
    """
    init_distributed(tp)
    cfg = hf_config
    config = HeterogeneousTransformerConfig(
        **_common_config_kwargs(cfg, tp, dtype),
        num_query_groups=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        ffn_hidden_size=cfg.get("intermediate_size") or 4 * cfg["hidden_size"],
        heterogeneous_layers_config_encoded_json=json.dumps(hf_config),
    )
    spec = get_gpt_heterogeneous_layer_spec(config, use_te=False)
    return _gpt_model(config, spec, cfg, parallel_output)


# --------------------------------------------------------------------------- checkpoints


def model_checkpoint_keys(model: GPTModel) -> set[str]:
    """The DCP keys ``dist_checkpointing`` reads/writes for this model's sharded state dict.

    ShardedTensor -> its key; ShardedObject -> ``key/shard_{offset}_{shape}`` (``unique_key``).
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    with cpu_patches():
        ssd = model.sharded_state_dict()
    keys = set()
    for v in nested_values(ssd):
        if isinstance(v, ShardedTensorFactory):
            v = v.build()
            for sub in nested_values(v):
                keys.add(sub.unique_key if isinstance(sub, ShardedObject) else sub.key)
        elif isinstance(v, ShardedObject):
            keys.add(v.unique_key)
        elif isinstance(v, ShardedTensor):
            keys.add(v.key)
    return keys


def checkpoint_keys(ckpt_dir) -> set[str]:
    """The state_dict_metadata keys of a torch_dist checkpoint folder (via torch DCP)."""
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata)


def checkpoint_tensors(ckpt_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist folder, assembled to its global shape (objects skipped)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(ckpt_dir))
    meta = reader.read_metadata().state_dict_metadata
    out = {
        k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for k, m in meta.items()
        if isinstance(m, TensorStorageMetadata)
    }
    dcp.load(out, storage_reader=reader, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    return out


def load_checkpoint(model: GPTModel, ckpt_dir, check_extra: bool = True, ignore: tuple[str, ...] = ()) -> dict:
    """Load a torch_dist folder into ``model``; raise on any key mismatch. Returns the common state.

    Like Megatron-LM / Megatron-Bridge, the model's sharded state dict is nested under
    ``"model"`` (this changes no checkpoint key) so that a ``common.pt`` holding
    ``checkpoint_version`` / ``iteration`` / ``content_metadata`` loads as well as the empty
    one written by a bare ``dist_checkpointing.save``. ``dist_checkpointing.load`` runs at its
    default strictness (it raises when the model asks for a key the checkpoint lacks);
    ``load_state_dict(strict=True)`` then refuses any module key left unfilled. mcore's default
    silently ignores keys present in the checkpoint but unknown to the model, so with
    ``check_extra`` those are compared against ``.metadata`` and raise too (except the
    mcore >= 0.19 common-state object ``common_state/shard_0_1``, which 0.16 ignores, and keys starting with one
    of ``ignore``).
    """
    ckpt_dir = Path(ckpt_dir)  # a Path: mcore 0.16's "common.pt missing" error path needs one
    if check_extra:
        extra = {
            k
            for k in checkpoint_keys(ckpt_dir) - model_checkpoint_keys(model)
            if not k.startswith(("common_state/", *ignore))
        }
        if extra:
            raise RuntimeError(f"checkpoint has keys the model does not expect: {sorted(extra)}")
    with cpu_patches():
        try:
            loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt_dir)
        except CheckpointException as e:  # a BaseException: pytest.raises(Exception) misses it
            raise CheckpointLoadError(_describe(e)) from e
        model.load_state_dict(loaded.pop("model"), strict=True)
    return loaded


class CheckpointLoadError(RuntimeError):
    """torch DCP's CheckpointException (a BaseException) re-raised as a RuntimeError."""


def _describe(e: CheckpointException) -> str:
    parts = []
    for rank, failure in (getattr(e, "failures", None) or {}).items():
        exc = failure[0] if isinstance(failure, tuple) else failure  # (exception, traceback)
        parts.append(f"rank {rank}: {type(exc).__name__}: {exc}")
    return "; ".join(parts) or str(e)


MEGATRON_LM_COMMON = {"checkpoint_version": 3.0, "iteration": 0}
MEGATRON_LM_CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def save_reference_checkpoint(
    model: GPTModel, ckpt_dir, common: dict | None = None, content_metadata: dict | None = None
) -> Path:
    """Save ``model`` with mcore's own torch_dist writer (ground truth for the format).

    Default: exactly ``dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)``
    (``common.pt`` is then ``{}``). With ``common`` (e.g. ``MEGATRON_LM_COMMON``) the model is
    nested under ``"model"`` next to those entries, as Megatron-LM / Bridge save it;
    ``content_metadata`` is passed through to ``save`` (it lands in ``common.pt``).

    Note: mcore's writer starts a ``multiprocessing`` *spawn* Manager the first time it saves;
    a script calling this must guard its top level with ``if __name__ == "__main__":``.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with cpu_patches():
        ssd = model.sharded_state_dict(metadata=content_metadata)
        state = ssd if common is None else {"model": ssd, **common}
        dist_checkpointing.save(state, str(ckpt_dir), content_metadata=content_metadata)
    return ckpt_dir


# --------------------------------------------------------------------------- forward


@torch.no_grad()
def logits(model: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s] token ids -> [b, s, V] float32 logits, on CPU, with an explicit causal mask."""
    tokens = tokens.long()
    b, s = tokens.shape
    position_ids = torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s)
    # mcore convention: True = masked out; shape [b, 1, s, s]
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None].expand(b, 1, s, s)
    with cpu_patches():
        out = model(input_ids=tokens, position_ids=position_ids, attention_mask=mask)
    return out.float()
