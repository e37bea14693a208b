"""ModelSpec: what streamconv needs to know about a model (the data, and the helpers every family's parser
uses). ``models/config.py`` reads ``config.json`` and dispatches to the family parsers (``llama``,
``decilm``); nothing here imports them or the mapping rules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from streamconv.errors import UnsupportedModelError

ATTN_FULL, ATTN_NOOP, ATTN_LINEAR = "attention", "no_op", "linear"
MLP_FULL, MLP_NOOP, MLP_LINEAR = "mlp", "no_op", "linear"


@dataclass(frozen=True)
class LayerSpec:
    """One transformer block: its attention and MLP kinds and sizes."""

    attention: str = ATTN_FULL  # attention | no_op | linear
    num_query_groups: int | None = None  # for attention == "attention"
    mlp: str = MLP_FULL  # mlp | no_op | linear
    ffn_hidden_size: int | None = None  # for mlp == "mlp"
    kind: str | None = None  # a hybrid (Nemotron-H) layer's one mixer: M (Mamba2), * (attention), - (MLP), E (MoE)


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "llama" | "decilm" | "nemotron_h": selects the mapping rules
    architecture: str
    hidden_size: int
    num_attention_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    layers: tuple[LayerSpec, ...]
    rms_norm_eps: float
    torch_dtype: str
    hf_config: dict = field(compare=False, repr=False, hash=False)
    dims: tuple[tuple[str, int], ...] = ()  # a family's own sizes (Nemotron-H: Mamba and MoE), by name
    # Nemotron-H's multi-token-prediction layers, as HF numbers them (``mtp.layers.{k}``): ``dim("mtp_block")``
    # layers per MTP depth megatron-core holds; empty when the conversion leaves them out (``without_mtp``)
    mtp: tuple[LayerSpec, ...] = ()

    def dim(self, name: str) -> int:
        return dict(self.dims)[name]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def without_mtp(self) -> "ModelSpec":
        """This model without its multi-token-prediction layers (a checkpoint that holds none, ``--drop-mtp``)."""
        return dataclasses.replace(self, mtp=(), dims=tuple(d for d in self.dims if d[0] != "mtp_block"))

    @property
    def heterogeneous(self) -> bool:
        """True when megatron-core uses per-layer keys (no stacked layer axis)."""
        return self.family in ("decilm", "nemotron_h")


# Far beyond any real model (Ultra 253B: 162 layers, hidden 16384, vocab 128256): a config past these is
# corrupt, and planning it would only run for hours.
MAX_LAYERS = 10_000
MAX_DIM = 1 << 24
MAX_PARAMETERS = 10**14


def make_spec(cfg: dict, family: str, architecture: str, layers, default_dtype: str) -> ModelSpec:
    """The ModelSpec fields every family reads the same way from ``config.json``, around its ``layers``."""
    hidden = require(cfg, "hidden_size")
    heads = require(cfg, "num_attention_heads")
    if cfg.get("head_dim") is None and hidden % heads:
        raise UnsupportedModelError(f"config.json: hidden_size={hidden} is not a multiple of heads={heads}")
    return ModelSpec(
        family=family,
        architecture=architecture,
        hidden_size=hidden,
        num_attention_heads=heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        vocab_size=require(cfg, "vocab_size"),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        layers=tuple(layers),
        rms_norm_eps=norm_eps(cfg),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or default_dtype),
        hf_config=cfg,
    )


def norm_eps(cfg: dict) -> float:
    """``rms_norm_eps``: a finite number in (0, 1) (the RMSNorm epsilon of every Nemotron is 1e-5 or 1e-6)."""
    value = cfg.get("rms_norm_eps", 1e-5)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise UnsupportedModelError(f"config.json: rms_norm_eps={str(value)[:40]} must be a number between 0 and 1")
    return float(value)


def require(cfg: dict, key: str, kind=int):
    """A required config field of the given type, or a clear error."""
    value = cfg.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, kind):
        raise UnsupportedModelError(f"config.json: field {key!r} must be a {kind.__name__}, got {str(value)[:80]}")
    if kind is int and value <= 0:
        raise UnsupportedModelError(f"config.json: field {key!r} must be positive, got {value}")
    return value
