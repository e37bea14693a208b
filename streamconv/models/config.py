"""From ``config.json`` to a ``ModelSpec``: read the file, dispatch on ``architectures`` to the family parser
(``llama``, ``decilm``), check the result is a plausible model. No ``trust_remote_code``, no network: the
config is plain JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

from streamconv.errors import BadInputError, UnsupportedModelError
from streamconv.models import decilm, llama, nemotron_h, rules
from streamconv.models.spec import MAX_DIM, MAX_LAYERS, MAX_PARAMETERS, ModelSpec


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
    archs = cfg.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else cfg.get("model_type", "?")
    parsers = {"LlamaForCausalLM": llama.parse_config, "DeciLMForCausalLM": decilm.parse_config,
               "NemotronHForCausalLM": nemotron_h.parse_config}
    if not isinstance(arch, str) or arch not in parsers:
        raise UnsupportedModelError(
            f"unsupported architecture {str(arch)[:80]!r}: streamconv converts {', '.join(sorted(parsers))}"
        )
    layers = cfg.get("num_hidden_layers")
    pattern = cfg.get("hybrid_override_pattern")
    if isinstance(pattern, str) and len(pattern) > MAX_LAYERS:
        layers = len(pattern)
    if isinstance(layers, int) and layers > MAX_LAYERS:  # before a parser builds one entry per layer
        raise UnsupportedModelError(f"config.json: num_hidden_layers={layers} is out of range (1..{MAX_LAYERS})")
    try:
        spec = parsers[arch](cfg)
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as e:  # a value of the wrong kind or size
        raise UnsupportedModelError(f"config.json: unusable value for {arch} ({type(e).__name__}: "
                                    f"{str(e)[:120]}); check the file") from e
    check_limits(spec)
    return spec


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
    if rules.param_count(spec) > MAX_PARAMETERS:
        raise UnsupportedModelError(f"config.json describes {rules.param_count(spec):.3g} parameters: not a real model")
