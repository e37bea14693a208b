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
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInputError(f"{path}: not found (a Hugging Face model folder needs a config.json)") from None
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path}: unreadable config ({e})") from e
    if not isinstance(cfg, dict):
        raise BadInputError(f"{path}: config.json is not a JSON object")
    return cfg


def spec_from_config(cfg: dict) -> ModelSpec:
    """Dispatch on ``architectures`` to the family parser."""
    from streamconv.models import decilm, llama

    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else cfg.get("model_type", "?")
    parsers = {"LlamaForCausalLM": llama.parse_config, "DeciLMForCausalLM": decilm.parse_config}
    if arch not in parsers:
        raise UnsupportedModelError(
            f"unsupported architecture {arch!r}: streamconv converts {', '.join(sorted(parsers))}"
        )
    return parsers[arch](cfg)


def require(cfg: dict, key: str, kind=int):
    """A required config field of the given type, or a clear error."""
    value = cfg.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, kind):
        raise UnsupportedModelError(f"config.json: field {key!r} must be a {kind.__name__}, got {value!r}")
    return value
