"""ModelSpec: what streamconv needs to know about a model, parsed from its ``config.json``.

No ``trust_remote_code``, no network: the config is plain JSON and each family module parses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from streamconv.errors import BadInputError, UnsupportedModelError

ATTN_FULL, ATTN_NOOP, ATTN_LINEAR = "attention", "no_op", "linear"
MLP_FULL, MLP_NOOP, MLP_LINEAR = "mlp", "no_op", "linear"


@dataclass(frozen=True)
class LayerSpec:
    """One transformer block: its attention and MLP kinds and sizes."""

    attention: str = ATTN_FULL  # attention | no_op | linear
    num_query_groups: int | None = None  # for attention == "attention"
    mlp: str = MLP_FULL  # mlp | no_op | linear
    ffn_hidden_size: int | None = None  # for mlp == "mlp"


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "llama" | "decilm": selects the mapping rules
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

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def heterogeneous(self) -> bool:
        """True when megatron-core uses per-layer keys (no stacked layer axis)."""
        return self.family == "decilm"

    def param_count(self) -> int:
        from streamconv.models import rules  # local: rules imports this module

        return sum(t.numel for t in rules.hf_tensors(self))


def load_config(path: Path | str) -> dict:
    """Read ``config.json`` (a folder holding one, or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if path.exists() and not path.is_file():  # a FIFO or device would block
        raise BadInputError(f"{path}: not a regular file; a Hugging Face model folder needs a config.json file")
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInputError(f"{path}: not found (a Hugging Face model folder needs a config.json)") from None
    except (OSError, ValueError, RecursionError) as e:
        detail = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise BadInputError(f"{path}: unreadable config ({detail}); it must be the model's JSON config.json") from e
    if not isinstance(cfg, dict):
        raise BadInputError(f"{path}: config.json is not a JSON object")
    return cfg


def spec_from_config(cfg: dict) -> ModelSpec:
    """Dispatch on ``architectures`` to the family parser."""
    from streamconv.models import decilm, llama

    archs = cfg.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else cfg.get("model_type", "?")
    parsers = {"LlamaForCausalLM": llama.parse_config, "DeciLMForCausalLM": decilm.parse_config}
    if not isinstance(arch, str) or arch not in parsers:
        raise UnsupportedModelError(
            f"unsupported architecture {str(arch)[:80]!r}: streamconv converts {', '.join(sorted(parsers))}"
        )
    layers = cfg.get("num_hidden_layers")
    if isinstance(layers, int) and layers > MAX_LAYERS:  # before a parser builds one entry per layer
        raise UnsupportedModelError(f"config.json: num_hidden_layers={layers} is out of range (1..{MAX_LAYERS})")
    try:
        spec = parsers[arch](cfg)
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as e:  # a value of the wrong kind or size
        raise UnsupportedModelError(f"config.json: unusable value for {arch} ({type(e).__name__}: "
                                    f"{str(e)[:120]}); check the file") from e
    check_limits(spec)
    return spec


# Far beyond any real model (Ultra 253B: 162 layers, hidden 16384, vocab 128256): a config past these is
# corrupt, and planning it would only run for hours.
MAX_LAYERS = 10_000
MAX_DIM = 1 << 24
MAX_PARAMETERS = 10**14


def check_limits(spec: ModelSpec) -> None:
    dims = {"hidden_size": spec.hidden_size, "num_attention_heads": spec.num_attention_heads,
            "head_dim": spec.head_dim, "vocab_size": spec.vocab_size}
    ffn = [layer.ffn_hidden_size for layer in spec.layers if layer.ffn_hidden_size is not None]
    if ffn:
        dims["ffn hidden size"] = max(ffn)
    for key, value in dims.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value > MAX_DIM:
            raise UnsupportedModelError(f"config.json: {key}={value!r} is out of range (1..{MAX_DIM})")
    if not 0 < spec.num_layers <= MAX_LAYERS:
        raise UnsupportedModelError(f"config.json: num_hidden_layers={spec.num_layers} is out of range (1..{MAX_LAYERS})")
    if spec.param_count() > MAX_PARAMETERS:
        raise UnsupportedModelError(f"config.json describes {spec.param_count():.3g} parameters: not a real model")


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
