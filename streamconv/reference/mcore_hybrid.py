"""Run megatron-core's ``MambaModel`` (0.16; ``HybridModel`` on 0.17+, with its multi-token-prediction block when
asked) for Nemotron-H (Mamba2, attention, MLP and MoE layers) on CPU, in one process or under torchrun (tensor
parallel over gloo). Used by ``streamconv generate`` and the tests.

    model = build_mamba(hf_config, mtp=has_mtp(hf_config))   # NemotronHForCausalLM config.json dict
    load(model, ckpt_dir)                                    # default strictness, as for GPT models
    out = logits_of(model, tokens)                           # [b, s, V] float32

megatron-core 0.16.1 ships only Transformer Engine specs for this model and leans on ``mamba_ssm``,
``causal_conv1d`` and Triton for its kernels. Where those are installed (a GPU host) they are used as they are.
Where they are missing, ``cpu_stand_ins()`` fills the gaps with plain torch, each piece checked against
transformers' own CPU path (``NemotronHForCausalLM``, the tests):

- ``mamba_chunk_scan_combined`` (the selective scan): the exact sequential recurrence of Mamba2's SSD,
  ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t + D x_t``, in float32;
- ``RMSNormGated`` (mamba_ssm's grouped gated norm, a ``MagicMock`` when mamba_ssm is absent):
  ``rmsnorm_per_group(y * silu(z)) * weight``;
- the Triton tensor ops megatron-core's dynamic-batching inference imports (never called here: they raise);
- ``TELinear(parallel_mode="duplicated")`` for the MoE latent projections (megatron-core asserts TE): a plain
  replicated linear with the same parameter and ``_extra_state`` keys;
- ``te_general_gemm`` is set to None (0.16.1 names it without defining it when TE is absent);
- ``MambaStack``'s hard-coded ``TENorm`` final norm is the torch RMSNorm megatron-core wraps itself.

The layer spec is the local (non-TE) equivalent of ``mamba_stack_spec``, with the key maps that make the
checkpoint keys those of the TE spec (its norms are fused into the following linear there): what
Megatron-Bridge's ``HybridModelProvider`` reads and writes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types

import torch
import torch.nn.functional as F

from streamconv.models import nemotron_h
from streamconv.reference import mcore

__all__ = ["build_mamba", "cpu_stand_ins", "selective_scan", "GatedRMSNorm"]


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


_TRITON_OPS = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"


def _stub_triton_ops() -> None:
    """megatron-core's mixer imports Triton kernels used only by dynamic-batching inference; without Triton the
    import fails. A module whose functions say so stands in."""
    if not _missing("triton") or _TRITON_OPS in sys.modules:
        return
    stub = types.ModuleType(_TRITON_OPS)

    def needs_triton(*_a, **_k):
        raise RuntimeError("dynamic-batching inference needs Triton (a GPU host); streamconv runs static batches")

    stub.tensor_get_slice_after = stub.tensor_masked_update = stub.tensor_merge = needs_triton
    sys.modules[_TRITON_OPS] = stub


_stub_triton_ops()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.activations import squared_relu  # noqa: E402
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec  # noqa: E402
from megatron.core.ssm import mamba_context_parallel, mamba_mixer  # noqa: E402
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules  # noqa: E402
from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules  # noqa: E402
from megatron.core.ssm.mlp_layer import MLPLayer  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules  # noqa: E402
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.mlp import MLP, MLPSubmodules  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.moe import moe_layer, moe_utils  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.torch_norm import WrappedTorchNorm  # noqa: E402
from megatron.core.transformer.transformer_layer import (  # noqa: E402
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint  # noqa: E402
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add  # noqa: E402

try:  # megatron-core 0.17+: HybridModel (MambaModel is its deprecated alias), multi-token prediction
    from megatron.core.models.hybrid import hybrid_block as stack_module
    from megatron.core.models.hybrid.hybrid_block import HybridStack as Stack, HybridStackSubmodules as StackSubmodules
    from megatron.core.models.hybrid.hybrid_model import HybridModel as Model
    HYBRID_MODEL = True
except ImportError:  # 0.16: MambaModel, no multi-token prediction
    from megatron.core.ssm import mamba_block as stack_module
    from megatron.core.ssm.mamba_block import MambaStack as Stack, MambaStackSubmodules as StackSubmodules
    from megatron.core.models.mamba.mamba_model import MambaModel as Model
    HYBRID_MODEL = False


# --------------------------------------------------------------------------- the pure-torch pieces


def selective_scan(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None, dt_softplus=False,
                   return_final_states=False, seq_idx=None, cu_seqlens=None, return_varlen_states=False,
                   initial_states=None, dt_limit=(0.0, float("inf"))):
    """``mamba_chunk_scan_combined``'s contract, computed by the sequential recurrence (float32).

    x ``[b, l, h, p]``, dt ``[b, l, h]``, A ``[h]``, B and C ``[b, l, g, n]``, D ``[h]`` or ``[h, p]``,
    z ``[b, l, h, p]`` (gate, when the norm is not separate) -> y ``[b, l, h, p]`` (and the final state
    ``[b, h, p, n]`` with ``return_final_states``). ``chunk_size`` only tiles the kernel's work: the result
    does not depend on it."""
    if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError("packed sequences need mamba_ssm's kernels")
    out_dtype = x.dtype
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    A, x = A.float(), x.float()
    Bh = B.float().repeat_interleave(h // g, dim=2)  # [b, l, h, n]: heads share their group's B and C
    Ch = C.float().repeat_interleave(h // g, dim=2)
    decay = torch.exp(dt * A)  # [b, l, h]
    state = initial_states.float().clone() if initial_states is not None else x.new_zeros(b, h, p, n)
    ys = []
    for t in range(l):
        state = state * decay[:, t, :, None, None] + (dt[:, t, :, None, None] * x[:, t, :, :, None]) * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p)
    if D is not None:
        y = y + x * (D.float()[:, None] if D.dim() == 1 else D.float())
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(out_dtype)
    return (y, state) if return_final_states else y


class GatedRMSNorm(torch.nn.Module):
    """mamba_ssm's ``RMSNorm`` (``layernorm_gated``) with ``norm_before_gate=False``: ``y * silu(z)``, normalised
    over groups of ``group_size`` channels, times ``weight``; plus the sharded state dict of megatron-core's
    ``ExtendedRMSNorm`` (the weight split over tensor-parallel ranks along its only axis)."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        if norm_before_gate:
            raise NotImplementedError("megatron-core's Mamba mixer gates before the norm")
        self.eps = eps
        self.group_size = group_size or hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, z=None):
        dtype = x.dtype
        y = x.float()
        if z is not None:
            y = y * F.silu(z.float())
        shape = y.shape
        y = y.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y.reshape(shape) * self.weight.float()).to(dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0},
                                                   sharded_offsets, tp_group=parallel_state.get_tensor_model_parallel_group(),
                                                   dp_cp_group=metadata["dp_cp_group"])


class DuplicatedLinear(MegatronModule):
    """``TELinear(parallel_mode="duplicated")`` without TE: a linear replicated on every rank, returning
    ``(y, None)``, with the same ``weight`` and ``_extra_state`` checkpoint keys."""

    def __init__(self, input_size, output_size, *, parallel_mode, config, init_method, bias, skip_bias_add,
                 skip_weight_param_allocation=False, is_expert=False, **_):
        super().__init__(config)
        if parallel_mode != "duplicated" or bias or is_expert:
            raise NotImplementedError("only the MoE latent projections' duplicated, bias-free linear")
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
        if config.perform_initialization:
            init_method(self.weight)

    def forward(self, x):
        return F.linear(x, self.weight), None

    def get_extra_state(self):
        return None

    def set_extra_state(self, state):
        pass

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, None,
                                                   sharded_offsets, tp_group=parallel_state.get_tensor_model_parallel_group(),
                                                   dp_cp_group=metadata["dp_cp_group"])


@contextlib.contextmanager
def cpu_stand_ins():
    """The pure-torch pieces in place of the kernels that are not installed, for the block (re-entrant; kernels
    that are installed are left alone). Runs inside ``mcore.cpu_patches()``."""
    saved = []

    def put(module, name, value):
        saved.append((module, name, getattr(module, name, None)))
        setattr(module, name, value)

    if not mamba_mixer.HAVE_MAMBA_SSM:
        put(mamba_mixer, "HAVE_MAMBA_SSM", True)
        put(mamba_mixer, "RMSNormGated", GatedRMSNorm)
        put(mamba_mixer, "ExtendedRMSNorm", GatedRMSNorm)
        put(mamba_mixer, "mamba_chunk_scan_combined", selective_scan)
    if not mamba_mixer.HAVE_EINOPS or not mamba_context_parallel.HAVE_EINOPS:
        raise ImportError("megatron-core's Mamba mixer needs einops: pip install einops")
    if not getattr(moe_layer, "HAVE_TE", False):
        put(moe_layer, "HAVE_TE", True)
        put(moe_layer, "TELinear", DuplicatedLinear)
    if not hasattr(moe_utils, "te_general_gemm"):
        put(moe_utils, "te_general_gemm", None)
    if stack_module.TENorm.__module__.endswith("transformer_engine") and _missing("transformer_engine"):
        put(stack_module, "TENorm", WrappedTorchNorm)
    try:
        with mcore.cpu_patches():
            yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


# --------------------------------------------------------------------------- spec, config, model


def local_mtp_block_spec() -> ModuleSpec:
    """``hybrid_layer_specs._hybrid_mtp_block_spec`` with local layers (megatron-core 0.17+): the norms and the
    projection of each MTP depth; its inner layers are built from the stack's own layer specs."""
    from megatron.core.transformer.multi_token_prediction import (
        MultiTokenPredictionBlock, MultiTokenPredictionBlockSubmodules, MultiTokenPredictionLayer,
        MultiTokenPredictionLayerSubmodules)

    norm = WrappedTorchNorm
    return ModuleSpec(module=MultiTokenPredictionBlock, submodules=MultiTokenPredictionBlockSubmodules(layer_specs=[
        ModuleSpec(module=MultiTokenPredictionLayer, submodules=MultiTokenPredictionLayerSubmodules(
            enorm=norm, hnorm=norm, eh_proj=ColumnParallelLinear, mtp_model_layer=None, layer_norm=norm))]))


def local_stack_spec(num_experts: int | None, mtp: bool = False) -> ModuleSpec:
    """``mamba_stack_spec`` with local layers; the key maps give the TE spec's checkpoint keys. ``mtp``: with the
    multi-token-prediction block (megatron-core 0.17+)."""
    norm = WrappedTorchNorm
    layers = dict(
        mamba_layer=ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
            norm=norm,
            mixer=ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(
                in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)),
            mamba_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"})),
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                      submodules=SelfAttentionSubmodules(
                                          linear_qkv=ColumnParallelLinear, core_attention=DotProductAttention,
                                          linear_proj=RowParallelLinear)),
            self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"})),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"})),
    )
    if num_experts:
        layers["moe_layer"] = ModuleSpec(module=MoETransformerLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm, mlp=get_moe_module_spec(use_te=False, num_experts=num_experts,
                                                            moe_grouped_gemm=False),
            mlp_bda=get_bias_dropout_add))
    if mtp:
        layers["mtp_block_spec"] = local_mtp_block_spec()
    return ModuleSpec(module=Stack, submodules=StackSubmodules(**layers))


def pattern_of(cfg: dict) -> str:
    """The ``M * - E`` layer string of a Nemotron-H config (``hybrid_override_pattern`` or transformers 5's
    ``layers_block_type``)."""
    return "".join(nemotron_h.layer_kinds(cfg))


def unified_pattern(cfg: dict, mtp: bool) -> str:
    """megatron-core 0.17+'s ``hybrid_layer_pattern``: the layers, then one ``/<mtp pattern>`` per MTP depth
    (as Megatron-Bridge's ``HybridModelProvider.finalize`` writes it)."""
    pattern = pattern_of(cfg)
    if mtp:
        pattern += ("/" + "".join(nemotron_h.mtp_kinds(cfg))) * nemotron_h.mtp_depths(cfg)
    return pattern


def _get(cfg: dict, *names, default=None):
    return next((cfg[n] for n in names if cfg.get(n) is not None), default)


def transformer_config(cfg: dict, tp: int = 1, dtype: torch.dtype = torch.float32, mtp: bool = False) -> TransformerConfig:
    """megatron-core's config for a ``NemotronHForCausalLM`` config.json dict (the fields Megatron-Bridge's
    Nemotron-H bridge maps; inference settings: no dropout, static routing without auxiliary loss)."""
    pattern = pattern_of(cfg)
    heads = cfg["num_attention_heads"]
    kw = dict(
        num_layers=len(pattern), hidden_size=cfg["hidden_size"], num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=_get(cfg, "head_dim", "attention_head_dim", default=cfg["hidden_size"] // heads),
        ffn_hidden_size=cfg.get("intermediate_size") or 4 * cfg["hidden_size"],
        normalization="RMSNorm", layernorm_epsilon=_get(cfg, "layer_norm_epsilon", "rms_norm_eps", default=1e-5),
        activation_func=squared_relu, gated_linear_unit=False, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0, masked_softmax_fusion=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        apply_rope_fusion=False, attention_softmax_in_fp32=True,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=True, perform_initialization=True,
        init_method_std=cfg.get("initializer_range", 0.02),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
        use_mamba_mem_eff_path=False,
    )
    if "M" in pattern:
        kw.update(mamba_state_dim=cfg["ssm_state_size"], mamba_head_dim=cfg["mamba_head_dim"],
                  mamba_num_groups=_get(cfg, "n_groups", "mamba_n_groups"), mamba_num_heads=cfg["mamba_num_heads"])
    if "E" in pattern:
        groups = cfg.get("n_group") or 1
        kw.update(num_moe_experts=cfg["n_routed_experts"], moe_router_topk=cfg["num_experts_per_tok"],
                  moe_ffn_hidden_size=cfg["moe_intermediate_size"],
                  moe_shared_expert_intermediate_size=cfg["moe_shared_expert_intermediate_size"],
                  moe_latent_size=cfg.get("moe_latent_size"), moe_router_score_function="sigmoid",
                  moe_router_enable_expert_bias=True, moe_router_dtype="fp32",
                  moe_router_topk_scaling_factor=cfg.get("routed_scaling_factor") or 1.0,
                  moe_router_num_groups=groups if groups > 1 else None,
                  moe_router_group_topk=cfg.get("topk_group") if groups > 1 else None,
                  moe_token_dispatcher_type="allgather", moe_grouped_gemm=False,
                  moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)
    if mtp:
        kw.update(mtp_num_layers=nemotron_h.mtp_depths(cfg), mtp_use_repeated_layer=nemotron_h.mtp_repeated(cfg))
    return TransformerConfig(**kw)


def has_mtp(cfg: dict) -> bool:
    """The config declares multi-token-prediction layers and this megatron-core can build them (0.17+)."""
    return HYBRID_MODEL and bool(nemotron_h.mtp_kinds(cfg))


def build_mamba(cfg: dict, tp: int = 1, dtype: torch.dtype = torch.float32, parallel_output: bool = True,
                mtp: bool = False):
    """megatron-core ``MambaModel`` (local spec, CPU unless the kernels are there) for a ``NemotronHForCausalLM``
    config dict; ``tp``: tensor parallel over the initialized process group; ``parallel_output=False``:
    full-vocabulary logits on every rank; ``mtp``: with the config's multi-token-prediction layers (megatron-core
    0.17+'s ``HybridModel``). Forward it with ``mcore.logits`` (inside ``cpu_stand_ins()``, which ``logits_of``
    does)."""
    if mtp and not HYBRID_MODEL:
        raise RuntimeError("multi-token prediction needs megatron-core 0.17+ (HybridModel); this is "
                           "megatron-core's MambaModel, which has none")
    mcore.init_distributed(tp)
    config = transformer_config(cfg, tp, dtype, mtp)
    with cpu_stand_ins():
        spec = local_stack_spec(cfg.get("n_routed_experts"), mtp)
        stack = {"hybrid_stack_spec": spec, "hybrid_layer_pattern": unified_pattern(cfg, mtp)} if HYBRID_MODEL \
            else {"mamba_stack_spec": spec, "hybrid_override_pattern": pattern_of(cfg)}
        model = Model(config=config, vocab_size=cfg["vocab_size"],
                      max_sequence_length=cfg.get("max_position_embeddings", 4096), parallel_output=parallel_output,
                      share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
                      position_embedding_type="none", **stack)
    return model.eval()


def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    """``mcore.logits`` with the stand-ins in place."""
    with cpu_stand_ins():
        return mcore.logits(model, tokens)


def load(model, ckpt_dir, check_extra: bool = True) -> dict:
    """``mcore.load_checkpoint`` with the stand-ins in place (their state dicts name the keys). A model built
    without MTP layers (``MambaModel`` 0.16, or ``mtp=False``) leaves the checkpoint's ``mtp.*`` keys unread, as
    megatron-core's default strictness does; one built with them reads every key."""
    with cpu_stand_ins():
        return mcore.load_checkpoint(model, ckpt_dir, check_extra,
                                     ignore=() if getattr(model, "mtp_process", False) else ("mtp.",))
