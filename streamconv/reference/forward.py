"""An independent reference forward of the Llama / DeciLM (``nemotron-nas``) architecture.

Pure torch, fp32, written from the Hugging Face modeling code (``LlamaForCausalLM``; NVIDIA's
``modeling_decilm.py`` ``DeciLMDecoderLayer``), reading the weights by their HF names. It shares no code
with streamconv's mapping (``models/``, ``transforms``, ``plan``): it is what the converted checkpoint is
checked against (tests, ``streamconv demo``).

    logits = reference_logits(hf_config, weights, tokens)   # [b, s] ids -> [b, s, V] float32

A DeciLM layer, per its ``block_configs`` entry (a Llama config has no ``block_configs``: every layer is
full attention + gated MLP with ``num_key_value_heads`` / ``intermediate_size``)::

    attention no_op:               x = x                                  (no norm, no weights)
    attention replace_with_linear: x = x + self_attn.linear_attn(input_layernorm(x))
    attention:                     x = x + o_proj(GQA(q_proj, k_proj, v_proj of input_layernorm(x)))
    ffn no_op:                     x = x
    ffn replace_with_linear:       x = x + mlp.linear_mlp(post_attention_layernorm(x))
    ffn:                           x = x + down_proj(silu(gate_proj(h)) * up_proj(h)),
                                   h = post_attention_layernorm(x)

Query groups per layer: ``heads / n_heads_in_group``; FFN width: ``find_multiple(int(2*ffn_mult*h/3), 256)``
(checked against the weight shapes). RoPE: ``rope_theta`` with no scaling, ``llama3`` or ``linear``
scaling, rotate-half convention. Causal mask, softmax in fp32, no dropout, no KV cache.
"""

from __future__ import annotations

import math

import torch

__all__ = ["reference_logits"]


def reference_logits(hf_config: dict, weights: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` token ids -> ``[b, s, vocab]`` float32 logits of the HF model ``hf_config`` with ``weights``."""
    cfg = hf_config
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    eps = float(cfg.get("rms_norm_eps", 1e-6))  # LlamaConfig's default
    w = {k: v.float() for k, v in weights.items()}
    tokens = tokens.long()
    b, s = tokens.shape

    cos, sin = _rope_tables(cfg, head_dim, s)
    mask = torch.full((s, s), float("-inf")).triu(1)  # added to the scores: -inf above the diagonal

    x = w["model.embed_tokens.weight"][tokens]
    for i, (attn, ffn) in enumerate(_blocks(cfg)):
        p = f"model.layers.{i}."
        if attn["kind"] == "linear":
            x = x + _rms_norm(x, w[p + "input_layernorm.weight"], eps) @ w[p + "self_attn.linear_attn.weight"].T
        elif attn["kind"] == "full":
            h = _rms_norm(x, w[p + "input_layernorm.weight"], eps)
            x = x + _attention(h, w, p + "self_attn.", heads, attn["kv_heads"], head_dim, cos, sin, mask)
        if ffn["kind"] == "linear":
            x = x + _rms_norm(x, w[p + "post_attention_layernorm.weight"], eps) @ w[p + "mlp.linear_mlp.weight"].T
        elif ffn["kind"] == "full":
            h = _rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
            gate, up, down = (w[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
            if gate.shape[0] != ffn["width"]:
                raise ValueError(f"layer {i}: gate_proj has {gate.shape[0]} rows, the config implies {ffn['width']}")
            x = x + (torch.nn.functional.silu(h @ gate.T) * (h @ up.T)) @ down.T
    x = _rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings", False) else w["lm_head.weight"]
    return x @ head.T


def _blocks(cfg: dict):
    """(attention, ffn) descriptions per layer, from ``block_configs`` or the Llama fields."""
    heads = cfg["num_attention_heads"]
    if "block_configs" not in cfg:
        kv = cfg.get("num_key_value_heads") or heads
        for _ in range(cfg["num_hidden_layers"]):
            yield {"kind": "full", "kv_heads": kv}, {"kind": "full", "width": cfg["intermediate_size"]}
        return
    for block in cfg["block_configs"]:
        a, f = block["attention"], block.get("ffn") or block.get("mlp")
        if a.get("no_op"):
            attn = {"kind": "no_op"}
        elif a.get("replace_with_linear"):
            attn = {"kind": "linear"}
        else:
            attn = {"kind": "full", "kv_heads": heads // a["n_heads_in_group"]}
        if f.get("no_op"):
            ffn = {"kind": "no_op"}
        elif f.get("replace_with_linear"):
            ffn = {"kind": "linear"}
        else:
            width = int(2 * f["ffn_mult"] * cfg["hidden_size"] / 3)
            ffn = {"kind": "full", "width": width + (-width) % 256}
        yield attn, ffn


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope_tables(cfg: dict, head_dim: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape ``[seq, head_dim]`` (frequencies repeated for the two halves)."""
    params = cfg.get("rope_parameters") or {}  # transformers 5 keeps theta and scaling together here
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    scaling = cfg.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind not in (None, "default"):
        raise NotImplementedError(f"rope type {kind!r} is not implemented by the reference forward")
    freqs = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq.float().double())
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _attention(h, w, p, heads, kv_heads, head_dim, cos, sin, mask) -> torch.Tensor:
    b, s, _ = h.shape
    q = (h @ w[p + "q_proj.weight"].T).view(b, s, heads, head_dim).transpose(1, 2)
    k = (h @ w[p + "k_proj.weight"].T).view(b, s, kv_heads, head_dim).transpose(1, 2)
    v = (h @ w[p + "v_proj.weight"].T).view(b, s, kv_heads, head_dim).transpose(1, 2)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    # query head j uses key/value head j // (heads / kv_heads)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + mask
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).reshape(b, s, heads * head_dim) @ w[p + "o_proj.weight"].T
