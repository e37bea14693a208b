"""The mapping table: HF tensor names <-> megatron-core keys, one row per weight.

Read it like Megatron-Bridge's per-family bridge: ``*`` is the layer number. ``when`` says which layers
(or models) a row applies to; ``layout`` names the pure transform (``layout.layout_segments``).
Import (hf2mcore) and export (mcore2hf) are both read off this one table.

Llama models store every block as a full attention + MLP block, with layers stacked on a leading axis of
each megatron key (``decoder.layers.self_attention...`` of shape ``[L, ...]``). DeciLM (heterogeneous)
models use per-layer keys (``decoder.layers.{i}.self_attention...``) and per-layer block kinds.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamconv.models.spec import ATTN_FULL, ATTN_LINEAR, MLP_FULL, MLP_LINEAR, LayerSpec, ModelSpec


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: tuple[str, ...]
    layout: str = "copy"
    when: str = "always"  # always | untied | attention | attn_linear | mlp | mlp_linear


L = "model.layers.*."
RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    # full attention block
    Rule("decoder.layers.*.self_attention.linear_qkv.layer_norm_weight", (L + "input_layernorm.weight",), when="attention"),
    Rule("decoder.layers.*.self_attention.linear_qkv.weight",
         (L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"),
         layout="qkv", when="attention"),
    Rule("decoder.layers.*.self_attention.linear_proj.weight", (L + "self_attn.o_proj.weight",), when="attention"),
    # attention replaced by one linear map (DeciLM replace_with_linear)
    Rule("decoder.layers.*.self_attention.layer_norm_weight", (L + "input_layernorm.weight",), when="attn_linear"),
    Rule("decoder.layers.*.self_attention.weight", (L + "self_attn.linear_attn.weight",), when="attn_linear"),
    # gated MLP block
    Rule("decoder.layers.*.mlp.linear_fc1.layer_norm_weight", (L + "post_attention_layernorm.weight",), when="mlp"),
    Rule("decoder.layers.*.mlp.linear_fc1.weight", (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"),
         layout="gate_up", when="mlp"),
    Rule("decoder.layers.*.mlp.linear_fc2.weight", (L + "mlp.down_proj.weight",), when="mlp"),
    # MLP replaced by one linear map (DeciLM replace_with_linear)
    Rule("decoder.layers.*.mlp.layer_norm_weight", (L + "post_attention_layernorm.weight",), when="mlp_linear"),
    Rule("decoder.layers.*.mlp.weight", (L + "mlp.linear_mlp.weight",), when="mlp_linear"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), when="untied"),
)

# Modules whose ``_extra_state`` megatron-core saves (and, at default strictness, requires on load): every
# linear layer (local spec: ColumnParallelLinear / RowParallelLinear, which includes the linear replacements
# ``ColumnParallelLinearGathered``); norms, skipped (``no_op`` = IdentityOp) blocks and the embedding have none.
EXTRA_STATE: tuple[tuple[str, str], ...] = (
    ("decoder.layers.*.self_attention.linear_qkv", "attention"),
    ("decoder.layers.*.self_attention.linear_proj", "attention"),
    ("decoder.layers.*.self_attention", "attn_linear"),
    ("decoder.layers.*.mlp.linear_fc1", "mlp"),
    ("decoder.layers.*.mlp.linear_fc2", "mlp"),
    ("decoder.layers.*.mlp", "mlp_linear"),
)

# HF tensor shapes by name suffix, in terms of the dims below.
_HF_SHAPES = {
    "embed_tokens.weight": ("vocab", "hidden"),
    "lm_head.weight": ("vocab", "hidden"),
    "norm.weight": ("hidden",),
    "input_layernorm.weight": ("hidden",),
    "post_attention_layernorm.weight": ("hidden",),
    "q_proj.weight": ("q", "hidden"),
    "k_proj.weight": ("kv", "hidden"),
    "v_proj.weight": ("kv", "hidden"),
    "o_proj.weight": ("hidden", "q"),
    "linear_attn.weight": ("hidden", "hidden"),
    "gate_proj.weight": ("ffn", "hidden"),
    "up_proj.weight": ("ffn", "hidden"),
    "down_proj.weight": ("hidden", "ffn"),
    "linear_mlp.weight": ("hidden", "hidden"),
}


def applies(when: str, spec: ModelSpec, layer: LayerSpec | None) -> bool:
    if when == "always":
        return True
    if when == "untied":
        return not spec.tied_embeddings
    assert layer is not None
    return {
        "attention": layer.attention == ATTN_FULL,
        "attn_linear": layer.attention == ATTN_LINEAR,
        "mlp": layer.mlp == MLP_FULL,
        "mlp_linear": layer.mlp == MLP_LINEAR,
    }[when]


def _dims(spec: ModelSpec, layer: LayerSpec | None) -> dict[str, int]:
    dims = {"vocab": spec.vocab_size, "hidden": spec.hidden_size, "q": spec.num_attention_heads * spec.head_dim}
    if layer is not None:
        dims["kv"] = (layer.num_query_groups or 0) * spec.head_dim
        dims["ffn"] = layer.ffn_hidden_size or 0
    return dims


def hf_shape(name: str, spec: ModelSpec, layer: LayerSpec | None) -> tuple[int, ...]:
    suffix = name.split(".", 2)[-1] if name.startswith("model.layers.") else name
    for key, dims in _HF_SHAPES.items():
        if suffix.endswith(key):
            d = _dims(spec, layer)
            return tuple(d[x] for x in dims)
    raise KeyError(name)


@dataclass(frozen=True)
class HFTensor:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Binding:
    """One megatron tensor (or one layer of a stacked one) and the HF tensors that make it."""

    key: str  # megatron key (stacked or per-layer form)
    index: tuple[int, ...]  # leading index inside the megatron key: (layer,) when stacked, else ()
    stacked_layers: int  # L for a stacked key, 0 otherwise
    hf: tuple[HFTensor, ...]
    layout: str
    heads_per_group: int
    head_dim: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of this binding's part of the megatron tensor (without the stacked axis)."""
        rows = sum(t.shape[0] for t in self.hf)
        return (rows, *self.hf[0].shape[1:])

    @property
    def global_shape(self) -> tuple[int, ...]:
        return (self.stacked_layers, *self.shape) if self.stacked_layers else self.shape


def _layer_key(template: str, i: int, spec: ModelSpec) -> tuple[str, tuple[int, ...]]:
    if "*" not in template:
        return template, ()
    if spec.heterogeneous:
        return template.replace("*", str(i)), ()
    return template.replace("layers.*.", "layers."), (i,)


def bindings(spec: ModelSpec) -> list[Binding]:
    """Every megatron tensor piece of ``spec`` in file order: rules above the layer rules, the layers
    one by one, then the rules below them (embedding first, final norm and output layer last)."""
    first = min(i for i, r in enumerate(RULES) if "*" in r.mcore)
    lead = [r for r in RULES[:first]]
    trail = [r for r in RULES[first:] if "*" not in r.mcore]
    per_layer = [r for r in RULES if "*" in r.mcore]

    def whole(rule: Rule) -> list[Binding]:
        if not applies(rule.when, spec, None):
            return []
        hf = tuple(HFTensor(n, hf_shape(n, spec, None)) for n in rule.hf)
        return [Binding(rule.mcore, (), 0, hf, rule.layout, 1, 1)]

    out: list[Binding] = [b for r in lead for b in whole(r)]
    for i, layer in enumerate(spec.layers):
        for rule in per_layer:
            if applies(rule.when, spec, layer):
                names = [n.replace("*", str(i)) for n in rule.hf]
                hf = tuple(HFTensor(n, hf_shape(n, spec, layer)) for n in names)
                key, index = _layer_key(rule.mcore, i, spec)
                groups = layer.num_query_groups or 1
                out.append(Binding(key, index, 0 if spec.heterogeneous else spec.num_layers, hf, rule.layout,
                                   spec.num_attention_heads // groups, spec.head_dim))
    return out + [b for r in trail for b in whole(r)]


def extra_state_keys(spec: ModelSpec) -> list[str]:
    """The ``_extra_state`` object keys megatron-core expects, in its ``/shard_{i}_{n}`` naming."""
    out = []
    for module, when in EXTRA_STATE:
        if spec.heterogeneous:
            out += [f"{module.replace('*', str(i))}._extra_state/shard_0_1"
                    for i, layer in enumerate(spec.layers) if applies(when, spec, layer)]
        elif all(applies(when, spec, layer) for layer in spec.layers):  # stacked: every layer has the module
            n = spec.num_layers
            out += [f"{module.replace('layers.*.', 'layers.')}._extra_state/shard_{i}_{n}" for i in range(n)]
    return out


def hf_tensors(spec: ModelSpec) -> list[HFTensor]:
    """Every HF tensor the model has, in megatron order."""
    return [t for b in bindings(spec) for t in b.hf]


def param_count(spec: ModelSpec) -> int:
    """Parameters of the model ``spec`` describes (its HF tensors' elements)."""
    return sum(t.numel for t in hf_tensors(spec))
