"""The mapping table: HF tensor names <-> megatron-core keys, one row per weight.

Read it like Megatron-Bridge's per-family bridge: ``*`` is the layer number. ``when`` says which layers
(or models) a row applies to; ``layout`` names the pure transform (``layout.layout_segments``).
Import (hf2mcore) and export (mcore2hf) are both read off this one table.

Llama models store every block as a full attention + MLP block, with layers stacked on a leading axis of
each megatron key (``decoder.layers.self_attention...`` of shape ``[L, ...]``). DeciLM (heterogeneous)
models use per-layer keys (``decoder.layers.{i}.self_attention...``) and per-layer block kinds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from streamconv.models.spec import ATTN_FULL, ATTN_LINEAR, MLP_FULL, MLP_LINEAR, LayerSpec, ModelSpec


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: tuple[str, ...]
    layout: str = "copy"
    when: str = "always"  # always | untied | attention | attn_linear | mlp | mlp_linear | M | * | - | E | latent
    part: str | None = None  # the rows of the (one) HF tensor this key holds (``hf_rows``: in_proj's z, x, B, C, dt)
    experts: bool = False  # one key for all experts, ``{e}`` in the HF name: stacked on a leading expert axis


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

# Nemotron-H (``NemotronHForCausalLM``): one mixer per layer, its kind in ``when`` (M Mamba2, * attention,
# - MLP, E MoE); every layer's one HF norm goes to the key of its kind's first linear (as megatron-core's fused
# TE norms name it) or, for a MoE layer, to ``pre_mlp_layernorm``. megatron-core splits in_proj and conv1d into
# their parts on disk (``part``); the routed experts of a layer are one key, stacked over the experts.
B = "backbone.layers.*."
NEMOTRON_H_RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("backbone.embeddings.weight",)),
    Rule("decoder.layers.*.mixer.in_proj.layer_norm_weight", (B + "norm.weight",), when="M"),
    *(Rule(f"decoder.layers.*.mixer.in_proj.weight.{p}", (B + "mixer.in_proj.weight",), when="M", part=p)
      for p in ("z", "x", "B", "C", "dt")),
    *(Rule(f"decoder.layers.*.mixer.conv1d.{w}.{p}", (B + f"mixer.conv1d.{w}",), when="M", part=p)
      for w in ("weight", "bias") for p in ("x", "B", "C")),
    *(Rule(f"decoder.layers.*.mixer.{n}", (B + f"mixer.{n}",), when="M") for n in ("A_log", "D", "dt_bias")),
    Rule("decoder.layers.*.mixer.norm.weight", (B + "mixer.norm.weight",), when="M"),
    Rule("decoder.layers.*.mixer.out_proj.weight", (B + "mixer.out_proj.weight",), when="M"),
    Rule("decoder.layers.*.self_attention.linear_qkv.layer_norm_weight", (B + "norm.weight",), when="*"),
    Rule("decoder.layers.*.self_attention.linear_qkv.weight",
         (B + "mixer.q_proj.weight", B + "mixer.k_proj.weight", B + "mixer.v_proj.weight"), layout="qkv", when="*"),
    Rule("decoder.layers.*.self_attention.linear_proj.weight", (B + "mixer.o_proj.weight",), when="*"),
    Rule("decoder.layers.*.mlp.linear_fc1.layer_norm_weight", (B + "norm.weight",), when="-"),
    Rule("decoder.layers.*.mlp.linear_fc1.weight", (B + "mixer.up_proj.weight",), when="-"),
    Rule("decoder.layers.*.mlp.linear_fc2.weight", (B + "mixer.down_proj.weight",), when="-"),
    Rule("decoder.layers.*.pre_mlp_layernorm.weight", (B + "norm.weight",), when="E"),
    Rule("decoder.layers.*.mlp.router.weight", (B + "mixer.gate.weight",), when="E"),
    Rule("decoder.layers.*.mlp.router.expert_bias", (B + "mixer.gate.e_score_correction_bias",), when="E"),
    Rule("decoder.layers.*.mlp.experts.experts.linear_fc1.weight", (B + "mixer.experts.{e}.up_proj.weight",),
         when="E", experts=True),
    Rule("decoder.layers.*.mlp.experts.experts.linear_fc2.weight", (B + "mixer.experts.{e}.down_proj.weight",),
         when="E", experts=True),
    Rule("decoder.layers.*.mlp.shared_experts.linear_fc1.weight", (B + "mixer.shared_experts.up_proj.weight",), when="E"),
    Rule("decoder.layers.*.mlp.shared_experts.linear_fc2.weight", (B + "mixer.shared_experts.down_proj.weight",),
         when="E"),
    Rule("decoder.layers.*.mlp.fc1_latent_proj.weight", (B + "mixer.fc1_latent_proj.weight",), when="latent"),
    Rule("decoder.layers.*.mlp.fc2_latent_proj.weight", (B + "mixer.fc2_latent_proj.weight",), when="latent"),
    Rule("decoder.final_norm.weight", ("backbone.norm_f.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), when="untied"),
)
# Nemotron-H's multi-token prediction (megatron-core 0.17+'s HybridModel; Megatron-Bridge's flattened names): MTP
# depth ``o`` holds L layers (the MTP pattern's), HF ``mtp.layers.{o*L+i}``, megatron-core
# ``mtp.layers.{o}.mtp_model_layer.layers.{i}``, each mapped by the rows above as a main layer of its kind
# (``MTP_LAYER``: the prefixes swapped). The depth's own norms and projection are named on its first HF layer,
# its final norm on its last; ``*`` is the depth.
NEMOTRON_H_MTP_RULES: tuple[Rule, ...] = (
    Rule("mtp.layers.*.enorm.weight", ("mtp.layers.{first}.enorm.weight",)),
    Rule("mtp.layers.*.hnorm.weight", ("mtp.layers.{first}.hnorm.weight",)),
    Rule("mtp.layers.*.eh_proj.weight", ("mtp.layers.{first}.eh_proj.weight",)),
    Rule("mtp.layers.*.final_layernorm.weight", ("mtp.layers.{last}.final_layernorm.weight",)),
)
MTP_LAYER = {"decoder.layers.*.": "mtp.layers.{o}.mtp_model_layer.layers.{i}.", B: "mtp.layers.{k}."}
MTP_EXTRA_STATE = ("mtp.layers.*.eh_proj",)

# (module, kind): the linear layers whose ``_extra_state`` megatron-core's MambaModel saves (the routed
# experts' one per expert, ``shard_{e}_{E}``; the output layer's too)
NEMOTRON_H_EXTRA_STATE: tuple[tuple[str, str], ...] = (
    ("decoder.layers.*.mixer.in_proj", "M"), ("decoder.layers.*.mixer.out_proj", "M"),
    ("decoder.layers.*.self_attention.linear_qkv", "*"), ("decoder.layers.*.self_attention.linear_proj", "*"),
    ("decoder.layers.*.mlp.linear_fc1", "-"), ("decoder.layers.*.mlp.linear_fc2", "-"),
    ("decoder.layers.*.mlp.experts.experts.linear_fc1", "experts"),
    ("decoder.layers.*.mlp.experts.experts.linear_fc2", "experts"),
    ("decoder.layers.*.mlp.shared_experts.linear_fc1", "E"), ("decoder.layers.*.mlp.shared_experts.linear_fc2", "E"),
    ("decoder.layers.*.mlp.fc1_latent_proj", "latent"), ("decoder.layers.*.mlp.fc2_latent_proj", "latent"),
    ("output_layer", "untied"),
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
    if layer.kind is not None:  # a hybrid layer: its one mixer
        if when in ("latent", "experts"):
            return layer.kind == "E" and (when == "experts" or "latent" in dict(spec.dims))
        return layer.kind == when
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


# Nemotron-H tensor shapes by name (a layer's name without ``backbone.layers.{i}.``; experts as ``{e}``)
_NH_SHAPES = {
    "backbone.embeddings.weight": ("vocab", "hidden"), "lm_head.weight": ("vocab", "hidden"),
    "backbone.norm_f.weight": ("hidden",), "norm.weight": ("hidden",),
    "mixer.in_proj.weight": ("in_proj", "hidden"), "mixer.conv1d.weight": ("conv", "one", "kernel"),
    "mixer.conv1d.bias": ("conv",), "mixer.A_log": ("heads",), "mixer.D": ("heads",), "mixer.dt_bias": ("heads",),
    "mixer.norm.weight": ("inner",), "mixer.out_proj.weight": ("hidden", "inner"),
    "mixer.q_proj.weight": ("q", "hidden"), "mixer.k_proj.weight": ("kv", "hidden"),
    "mixer.v_proj.weight": ("kv", "hidden"), "mixer.o_proj.weight": ("hidden", "q"),
    "mixer.up_proj.weight": ("ffn", "hidden"), "mixer.down_proj.weight": ("hidden", "ffn"),
    "mixer.gate.weight": ("experts", "hidden"), "mixer.gate.e_score_correction_bias": ("experts",),
    "mixer.experts.{e}.up_proj.weight": ("moe_ffn", "latent"), "mixer.experts.{e}.down_proj.weight": ("latent", "moe_ffn"),
    "mixer.shared_experts.up_proj.weight": ("shared_ffn", "hidden"),
    "mixer.shared_experts.down_proj.weight": ("hidden", "shared_ffn"),
    "mixer.fc1_latent_proj.weight": ("latent", "hidden"), "mixer.fc2_latent_proj.weight": ("hidden", "latent"),
    "enorm.weight": ("hidden",), "hnorm.weight": ("hidden",), "final_layernorm.weight": ("hidden",),
    "eh_proj.weight": ("hidden", "hidden2"),
}


def _nh_dims(spec: ModelSpec, layer: LayerSpec | None) -> dict[str, int]:
    d = dict(spec.dims)
    out = {**_dims(spec, layer), "one": 1, "hidden2": 2 * spec.hidden_size}
    if "mamba_heads" in d:
        inner, gn = d["mamba_heads"] * d["mamba_head_dim"], d["mamba_groups"] * d["state"]
        out.update(inner=inner, groups_state=gn, heads=d["mamba_heads"], kernel=d["conv_kernel"],
                   in_proj=2 * inner + 2 * gn + d["mamba_heads"], conv=inner + 2 * gn)
    if "experts" in d:
        out.update(experts=d["experts"], moe_ffn=d["moe_ffn"], shared_ffn=d["shared_ffn"],
                   latent=d.get("latent", spec.hidden_size))
    return out


def hf_rows(part: str, name: str, spec: ModelSpec) -> tuple[int, int]:
    """The rows of in_proj (z | x | B | C | dt) or conv1d (x | B | C) that megatron-core's key ``part`` holds."""
    d = _nh_dims(spec, None)
    inner, gn = d["inner"], d["groups_state"]
    order = (("z", inner), ("x", inner), ("B", gn), ("C", gn), ("dt", d["heads"])) if ".in_proj." in name \
        else (("x", inner), ("B", gn), ("C", gn))
    at = 0
    for p, n in order:
        if p == part:
            return at, at + n
        at += n
    raise KeyError(f"{name}: no part {part!r}")


def hf_shape(name: str, spec: ModelSpec, layer: LayerSpec | None) -> tuple[int, ...]:
    if spec.family == "nemotron_h":
        key = re.sub(r"^(backbone|mtp)\.layers\.\d+\.", "", name)
        key = re.sub(r"\.experts\.\d+\.", ".experts.{e}.", key)
        d = _nh_dims(spec, layer)
        return tuple(d[x] for x in _NH_SHAPES[key])
    suffix = name.split(".", 2)[-1] if name.startswith("model.layers.") else name
    for key, dims in _HF_SHAPES.items():
        if suffix.endswith(key):
            d = _dims(spec, layer)
            return tuple(d[x] for x in dims)
    raise KeyError(name)


@dataclass(frozen=True)
class HFTensor:
    name: str
    shape: tuple[int, ...]  # the whole HF tensor's
    rows: tuple[int, int] | None = None  # the rows of it a binding takes (a ``part``), else all

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def row0(self) -> int:
        return self.rows[0] if self.rows else 0

    @property
    def nrows(self) -> int:
        return self.rows[1] - self.rows[0] if self.rows else self.shape[0]


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
        rows = sum(t.nrows for t in self.hf)
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
    one by one, then the rules below them (embedding first, final norm and output layer last), then a
    Nemotron-H's MTP depths (each: its norms and projection, its layers, its final norm)."""
    table = NEMOTRON_H_RULES if spec.family == "nemotron_h" else RULES
    first = min(i for i, r in enumerate(table) if "*" in r.mcore)
    lead = [r for r in table[:first]]
    trail = [r for r in table[first:] if "*" not in r.mcore]
    per_layer = [r for r in table if "*" in r.mcore]

    def whole(rule: Rule, mcore: str | None = None, hf_names=None) -> list[Binding]:
        if not applies(rule.when, spec, None):
            return []
        hf = tuple(HFTensor(n, hf_shape(n, spec, None)) for n in hf_names or rule.hf)
        return [Binding(mcore or rule.mcore, (), 0, hf, rule.layout, 1, 1)]

    def layer_bindings(i: int, layer: LayerSpec, mcore_prefix: str | None = None, hf_prefix: str | None = None):
        for rule in per_layer:
            if applies(rule.when, spec, layer):
                if mcore_prefix is None:
                    key, index = _layer_key(rule.mcore, i, spec)
                    names = [n.replace("*", str(i)) for n in rule.hf]
                else:  # an MTP layer: the main rows, under its prefixes
                    key, index = rule.mcore.replace("decoder.layers.*.", mcore_prefix), ()
                    names = [n.replace(B, hf_prefix) for n in rule.hf]
                groups = layer.num_query_groups or 1
                experts = spec.dim("experts") if rule.experts else 0
                for e in range(experts) if rule.experts else [None]:  # routed experts: one key, stacked on e
                    hf = tuple(HFTensor(n.replace("{e}", str(e)), hf_shape(n.replace("{e}", str(e)), spec, layer),
                                        hf_rows(rule.part, n, spec) if rule.part else None) for n in names)
                    yield Binding(key, index if e is None else (e,),
                                  experts or (0 if spec.heterogeneous else spec.num_layers), hf, rule.layout,
                                  spec.num_attention_heads // groups, spec.head_dim)

    out: list[Binding] = [b for r in lead for b in whole(r)]
    for i, layer in enumerate(spec.layers):
        out += layer_bindings(i, layer)
    out += [b for r in trail for b in whole(r)]
    head = {r.mcore.rsplit(".", 2)[-2]: r for r in NEMOTRON_H_MTP_RULES}  # enorm, hnorm, eh_proj, final_layernorm

    def depth_rule(name: str, o: int, first: int, last: int) -> list[Binding]:
        r = head[name]
        return whole(r, r.mcore.replace("*", str(o)), [n.format(first=first, last=last) for n in r.hf])

    for o, depth in enumerate(held_mtp_depths(spec)):
        first, last = depth[0][0], depth[-1][0]
        out += depth_rule("enorm", o, first, last) + depth_rule("hnorm", o, first, last) + \
            depth_rule("eh_proj", o, first, last)
        for k, layer, mcore_prefix, hf_prefix in depth:
            out += layer_bindings(k, layer, mcore_prefix, hf_prefix)
        out += depth_rule("final_layernorm", o, first, last)
    return out


def held_mtp_depths(spec: ModelSpec) -> list[list[tuple[int, LayerSpec, str, str]]]:
    """The MTP depths megatron-core holds, each its layers as ``(k, layer, megatron-core prefix, HF prefix)``:
    HF's ``mtp.layers.{k}``, k = o * L + i for layer i of depth o (L = ``dim("mtp_block")``)."""
    if not spec.mtp:
        return []
    block = spec.dim("mtp_block")
    return [[(o * block + i, spec.mtp[o * block + i], MTP_LAYER["decoder.layers.*."].format(o=o, i=i),
              MTP_LAYER[B].format(k=o * block + i)) for i in range(block)] for o in range(len(spec.mtp) // block)]


def extra_state_keys(spec: ModelSpec) -> list[str]:
    """The ``_extra_state`` object keys megatron-core expects, in its ``/shard_{i}_{n}`` naming."""
    out = []
    if spec.family == "nemotron_h":
        for module, when in NEMOTRON_H_EXTRA_STATE:
            if "*" not in module:
                out += [f"{module}._extra_state/shard_0_1"] if applies(when, spec, None) else []
                continue
            for i, layer in enumerate(spec.layers):
                if applies(when, spec, layer):
                    m = module.replace("*", str(i))
                    n = spec.dim("experts") if when == "experts" else 1
                    out += [f"{m}._extra_state/shard_{e}_{n}" for e in range(n)]
        for o, depth in enumerate(held_mtp_depths(spec)):
            out += [f"{m.replace('*', str(o))}._extra_state/shard_0_1" for m in MTP_EXTRA_STATE]
            for _, layer, prefix, _ in depth:
                for module, when in NEMOTRON_H_EXTRA_STATE:
                    if "*" in module and applies(when, spec, layer):
                        n = spec.dim("experts") if when == "experts" else 1
                        m = module.replace("decoder.layers.*.", prefix)
                        out += [f"{m}._extra_state/shard_{e}_{n}" for e in range(n)]
        return out
    for module, when in EXTRA_STATE:
        if spec.heterogeneous:
            out += [f"{module.replace('*', str(i))}._extra_state/shard_0_1"
                    for i, layer in enumerate(spec.layers) if applies(when, spec, layer)]
        elif all(applies(when, spec, layer) for layer in spec.layers):  # stacked: every layer has the module
            n = spec.num_layers
            out += [f"{module.replace('layers.*.', 'layers.')}._extra_state/shard_{i}_{n}" for i in range(n)]
    return out


def hf_tensors(spec: ModelSpec) -> list[HFTensor]:
    """Every HF tensor the model has, in megatron order, once (a tensor split into parts, whole)."""
    seen: dict[str, HFTensor] = {}
    for b in bindings(spec):
        for t in b.hf:
            seen.setdefault(t.name, HFTensor(t.name, t.shape))
    return list(seen.values())


# HF tensors that are buffers, not parameters (transformers counts them out): a MoE router's score correction
BUFFERS = re.compile(r"\.e_score_correction_bias$")


def param_count(spec: ModelSpec) -> int:
    """Parameters of the model ``spec`` describes (its HF tensors' elements, buffers left out), as transformers
    counts them."""
    return sum(t.numel for t in hf_tensors(spec) if not BUFFERS.search(t.name))
