"""The plan: a deterministic list of output chunks, each with the recipe that makes it.

A chunk is one piece of one output tensor (key, offsets, sizes inside its global shape) plus the source
row slices (``Read``) whose row-wise concatenation, cast to the target dtype, is that piece. Planning is
pure: it needs the ModelSpec and the source dtypes, never the weights. ``streamconv plan`` prints it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from streamconv import dtypes
from streamconv.dtypes import DType
from streamconv.errors import BadInputError
from streamconv.formats.names import is_quant_companion
from streamconv.models import rules
from streamconv.models.spec import ModelSpec
from streamconv.plan.layout import fused_rows_for_source, fused_rows_of, layout_segments, sources_for_fused_rows

DEFAULT_CHUNK_BYTES = 64 * 1024**2
DEFAULT_FILE_BYTES = 512 * 1024**2
DEFAULT_SHARD_BYTES = 5 * 10**9  # HF save_pretrained's max_shard_size="5GB"

# Tensors some HF checkpoints carry that are not weights (recomputed buffers): ignored on import.
IGNORED_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
MTP_HF = re.compile(r"^mtp\.")  # Nemotron-H's multi-token-prediction layers (HF and megatron-core names alike)


@dataclass(frozen=True)
class Read:
    """Rows ``[row0, row1)`` of source tensor ``name`` (after narrowing its leading dims to ``index``)."""

    name: str
    row0: int
    row1: int
    index: tuple[int, ...] = ()


@dataclass(frozen=True)
class Chunk:
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    reads: tuple[Read, ...]
    file: int  # which output file (``__0_{file}.distcp`` or a safetensors shard) holds it
    nbytes: int  # bytes of the output piece

    @property
    def id(self) -> tuple:
        """``(key, offsets)``: how the journal, the sinks and ``.metadata`` name this chunk."""
        return self.key, tuple(self.offsets)

    @property
    def layer(self) -> int | None:
        """The main layer the chunk belongs to (None: embedding, final norm, output layer, MTP layers)."""
        if MTP_HF.search(self.key):
            return None
        m = re.search(r"layers\.(\d+)\.", self.key)
        if m:
            return int(m.group(1))
        return self.offsets[0] if self.key.startswith("decoder.layers.") else None


@dataclass(frozen=True)
class Target:
    key: str
    shape: tuple[int, ...]
    dtype: DType

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Plan:
    direction: str  # "hf2mcore" | "mcore2hf"
    spec: ModelSpec
    targets: dict[str, Target]
    chunks: list[Chunk]
    objects: list[str] = field(default_factory=list)  # BYTE_IO keys (``_extra_state``) to write
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    @property
    def total_bytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)

    @property
    def num_files(self) -> int:
        return 1 + max((c.file for c in self.chunks), default=-1)

    def max_chunk_bytes(self) -> int:
        return max((c.nbytes for c in self.chunks), default=0)

    def by_file(self) -> dict[int, list[Chunk]]:
        """The chunks of each output file, in plan order."""
        out: dict[int, list[Chunk]] = {}
        for c in self.chunks:
            out.setdefault(c.file, []).append(c)
        return out

    def file_bytes(self) -> dict[int, int]:
        """Bytes of chunk data per output file."""
        out: dict[int, int] = {}
        for c in self.chunks:
            out[c.file] = out.get(c.file, 0) + c.nbytes
        return out

    def part(self, files) -> "Plan":
        """The plan's chunks of ``files`` only (in plan order): one rank's part of a distributed run."""
        files = set(files)
        return dataclasses.replace(self, chunks=[c for c in self.chunks if c.file in files])


def _itemsize(dtype) -> int:
    return dtypes.of(dtype).itemsize


def row_spans(rows: int, row_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Split ``rows`` into contiguous blocks of at most ``chunk_bytes`` (at least one row each)."""
    step = max(1, chunk_bytes // max(1, row_bytes))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)] or [(0, 0)]


FLOAT8 = dtypes.FLOAT8
WEIGHT_DTYPES = (dtypes.BFLOAT16, dtypes.FLOAT16, dtypes.FLOAT32)  # what a model's weights may be stored as


def check_quantization(spec: ModelSpec, infos: dict, quant=None) -> None:
    """A quantized checkpoint is refused whole unless ``quant`` (``formats.quantized.Quantization``) says how
    to dequantize it: its scale tensors are never "unused" (``--allow-unused`` does not apply to them) and a
    float8 weight is never copied or cast as if it were the weight."""
    expected = {t.name for t in rules.hf_tensors(spec)}
    known = quant.companions if quant is not None else set()
    scaled = quant.scales if quant is not None else {}
    companions = sorted(n for n in infos if is_quant_companion(n) and n not in known)
    fp8 = sorted(n for n in expected if n in infos and dtypes.of(infos[n].dtype) in FLOAT8 and n not in scaled)
    if companions or fp8:
        first = companions[0] if companions else fp8[0]
        where = getattr(infos[first], "path", None)
        what = (f"{len(companions)} quantization tensor(s) such as {first!r}" if companions
                else f"float8 weights such as {first!r}")
        raise BadInputError(f"{str(where.parent) + ': ' if where is not None else ''}this is a quantized checkpoint "
                            f"({what}); streamconv converts bf16/fp16/fp32 checkpoints only (--allow-unused does not "
                            "apply to quantization scales); use the unquantized model")


def unused_tensors(spec: ModelSpec, infos: dict, quant=None) -> list[str]:
    """The source's tensors the mapping leaves out (what ``--allow-unused`` / ``--drop-mtp`` let through)."""
    expected = {t.name for t in rules.hf_tensors(spec)}
    return sorted(n for n in infos if n not in expected and not IGNORED_HF.search(n)
                  and (quant is None or n not in quant.companions))


def with_held_mtp(spec: ModelSpec, names, drop: bool = False) -> ModelSpec:
    """``spec`` with its multi-token-prediction layers only when the checkpoint holds them (``names``: its HF
    tensor names or megatron-core keys) and they are not dropped (``--drop-mtp``): a config may declare MTP
    while its weights have none (transformers saves none)."""
    if spec.mtp and (drop or not any(MTP_HF.search(n) for n in names)):
        return spec.without_mtp()
    return spec


def check_source(spec: ModelSpec, infos: dict, allow_unused: bool = False, quant=None, drop_mtp: bool = False) -> None:
    """Every HF tensor the mapping needs is present with the right shape; nothing unexpected is there
    (``quant``: the scales of a quantized checkpoint, consumed by the dequantization; ``allow_unused``: any
    tensor may be left out; ``drop_mtp``: a Nemotron-H's multi-token-prediction layers, ``mtp.*``, may)."""
    check_quantization(spec, infos, quant)
    if quant is not None:
        infos = {n: i for n, i in infos.items() if n not in quant.companions}
    expected = {t.name: t.shape for t in rules.hf_tensors(spec)}
    for name, shape in expected.items():
        if name not in infos:
            folders = sorted({str(i.path.parent) for i in infos.values() if hasattr(i, "path")})
            where = f"{folders[0]}: " if len(folders) == 1 else ""
            raise BadInputError(f"{where}tensor {name!r} is needed for {spec.architecture} but is not in the "
                                "checkpoint; check that the download is complete and that config.json belongs to "
                                "these weights")
        got = tuple(infos[name].shape)
        if got != shape:
            raise BadInputError(
                f"{infos[name].path}: tensor {name!r} has shape {list(got)} but config.json implies {list(shape)}"
            )
        dtype = dtypes.of(infos[name].dtype)
        if dtype not in WEIGHT_DTYPES and not (quant is not None and name in quant.scales):
            raise BadInputError(
                f"{infos[name].path}: tensor {name!r} is {dtype.name}; Megatron checkpoints hold bfloat16, float16 or "
                "float32 weights: convert the model to one of them first")
    extra = unused_tensors(spec, infos)
    mtp = [n for n in extra if MTP_HF.search(n)]
    if mtp and not allow_unused and not drop_mtp:
        raise BadInputError(
            f"the checkpoint holds {len(mtp)} multi-token-prediction tensor(s) (mtp.*, first {mtp[0]!r}) that "
            "config.json does not describe (num_nextn_predict_layers, mtp_hybrid_override_pattern; "
            "mtp_use_repeated_layer, true when unset, means one layer set shared by every depth); pass "
            "--drop-mtp to convert the model without them (--json lists them)")
    if drop_mtp:
        extra = [n for n in extra if not MTP_HF.search(n)]
    if extra and not allow_unused:
        hint = " (tie_word_embeddings is true but lm_head.weight is present)" if extra == ["lm_head.weight"] else ""
        raise BadInputError(
            f"{len(extra)} tensor(s) in the checkpoint are not used by the {spec.architecture} mapping, first "
            f"{extra[0]!r}{hint}; pass --allow-unused to ignore them"
        )


def import_plan(
    spec: ModelSpec,
    src_dtypes: dict[str, DType],
    out_dtype: DType | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    file_bytes: int = DEFAULT_FILE_BYTES,
) -> Plan:
    """hf2mcore: every megatron tensor in row blocks of at most ``chunk_bytes``, packed into files.

    ``src_dtypes`` maps HF names to their stored dtype; with ``out_dtype=None`` each output keeps the
    dtype of its sources (bit-exact), otherwise it is cast.
    """
    out_dtype = dtypes.maybe(out_dtype)
    targets: dict[str, Target] = {}
    chunks: list[Chunk] = []
    file, file_fill = 0, 0
    for b in rules.bindings(spec):
        kinds = {dtypes.of(src_dtypes[t.name]) for t in b.hf}
        if out_dtype is None and len(kinds) > 1:
            raise BadInputError(f"{b.key}: its sources have different dtypes {sorted(map(str, kinds))}; pass --dtype")
        dtype = out_dtype or kinds.pop()
        target = targets.setdefault(b.key, Target(b.key, b.global_shape, dtype))
        if target.dtype != dtype:
            raise BadInputError(f"{b.key}: layers have different dtypes ({target.dtype} vs {dtype}); pass --dtype")
        segs = layout_segments(b.layout, [t.nrows for t in b.hf], b.heads_per_group, b.head_dim)
        shape = b.shape
        row_bytes = math.prod(shape[1:]) * max(_itemsize(dtype), *(_itemsize(src_dtypes[t.name]) for t in b.hf))
        lead = tuple(b.index)
        for r0, r1 in row_spans(fused_rows_of(segs), row_bytes, chunk_bytes):
            reads = tuple(Read(b.hf[s].name, b.hf[s].row0 + a, b.hf[s].row0 + z)
                          for s, a, z in sources_for_fused_rows(segs, r0, r1))
            nbytes = (r1 - r0) * math.prod(shape[1:]) * _itemsize(dtype)
            if file_fill and file_fill + nbytes > file_bytes:
                file, file_fill = file + 1, 0
            file_fill += nbytes
            offsets = (*lead, r0, *(0 for _ in shape[1:]))
            sizes = (*(1 for _ in lead), r1 - r0, *shape[1:])
            chunks.append(Chunk(b.key, offsets, sizes, reads, file, nbytes))
    return Plan("hf2mcore", spec, targets, merge_stacked(chunks, targets, chunk_bytes), rules.extra_state_keys(spec),
                chunk_bytes)


STACKED_EXPERTS = ".mlp.experts.experts."  # a per-layer key stacked over experts (a layer-stacked one is not merged)


def merge_stacked(chunks: list[Chunk], targets: dict[str, Target], chunk_bytes: int) -> list[Chunk]:
    """Whole slices of a stacked key that follow each other (a Nemotron-H layer's experts ``[E, Fm, L]``, one HF
    tensor each) joined into chunks of up to ``chunk_bytes``: ``[k, Fm, L]`` from k whole HF tensors, read one
    after the other. Thousands of sub-megabyte chunks would cost more in per-chunk work than in bytes."""
    out: list[Chunk] = []
    for c in chunks:
        shape = targets[c.key].shape
        whole = (STACKED_EXPERTS in c.key and len(c.sizes) == len(shape) == 3 and c.sizes[0] == 1
                 and tuple(c.sizes[1:]) == shape[1:])
        prev = out[-1] if out else None
        if (whole and prev is not None and prev.key == c.key and prev.file == c.file
                and prev.offsets[0] + prev.sizes[0] == c.offsets[0] and tuple(prev.sizes[1:]) == shape[1:]
                and prev.nbytes + c.nbytes <= chunk_bytes):
            out[-1] = Chunk(c.key, prev.offsets, (prev.sizes[0] + 1, *prev.sizes[1:]), prev.reads + c.reads,
                            c.file, prev.nbytes + c.nbytes)
        else:
            out.append(c)
    return out


def export_plan(
    spec: ModelSpec,
    mcore_dtypes: dict[str, DType],
    out_dtype: DType | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Plan:
    """mcore2hf: every HF tensor in row blocks of at most ``chunk_bytes``; the inverse of ``import_plan``,
    read off the same bindings and segment layouts (QKV split per group, [gate; up] split, unstacking).

    ``mcore_dtypes`` maps megatron keys to their stored dtype (``out_dtype=None`` keeps it, bit-exact).
    ``chunk.file`` is the safetensors shard: whole tensors, in plan order, a new shard when the next tensor
    would take the current one past ``shard_bytes`` (as HF's ``save_pretrained(max_shard_size=...)``).
    """
    out_dtype = dtypes.maybe(out_dtype)
    targets: dict[str, Target] = {}
    chunks: list[Chunk] = []
    shard, shard_fill = 0, 0
    for b in rules.bindings(spec):
        src_dtype = dtypes.of(mcore_dtypes[b.key])
        dtype = out_dtype or src_dtype
        segs = layout_segments(b.layout, [t.nrows for t in b.hf], b.heads_per_group, b.head_dim)
        for j, t in enumerate(b.hf):
            if t.name in targets:  # another part of a tensor split over keys (in_proj's z, x, B, C, dt)
                if targets[t.name].dtype != dtype:
                    raise BadInputError(f"{t.name}: its parts are stored as {targets[t.name].dtype} and {dtype}; "
                                        "pass --dtype")
            else:
                target = targets[t.name] = Target(t.name, t.shape, dtype)
                if shard_fill and shard_fill + target.nbytes > shard_bytes:
                    shard, shard_fill = shard + 1, 0
                shard_fill += target.nbytes
            inner = math.prod(t.shape[1:])
            row_bytes = inner * max(_itemsize(dtype), _itemsize(src_dtype))
            for r0, r1 in row_spans(t.nrows, row_bytes, chunk_bytes):
                reads = tuple(Read(b.key, a, z, b.index) for a, z in fused_rows_for_source(segs, j, r0, r1))
                offsets = (t.row0 + r0, *(0 for _ in t.shape[1:]))
                sizes = (r1 - r0, *t.shape[1:])
                chunks.append(Chunk(t.name, offsets, sizes, reads, shard, (r1 - r0) * inner * _itemsize(dtype)))
    return Plan("mcore2hf", spec, targets, chunks, [], chunk_bytes)


def describe(plan: Plan) -> dict:
    """A JSON-able summary: what ``streamconv plan`` prints."""
    return {
        "direction": plan.direction,
        "architecture": plan.spec.architecture,
        "layers": plan.spec.num_layers,
        "parameters": rules.param_count(plan.spec),  # (as transformers counts them: buffers left out)
        "tensors": len(plan.targets),
        "objects": len(plan.objects),
        "chunks": len(plan.chunks),
        # the files written: hf2mcore's .distcp files and the objects file (what inspect counts), or the shards
        "files": plan.num_files + (1 if plan.direction == "hf2mcore" else 0),
        "bytes": plan.total_bytes,
        "largest_tensor": max(plan.targets.values(), key=lambda t: t.nbytes).key if plan.targets else None,
        "largest_tensor_bytes": max((t.nbytes for t in plan.targets.values()), default=0),
        "largest_chunk_bytes": plan.max_chunk_bytes(),
        **({"mtp": mtp_facts(plan)} if plan.spec.mtp else {}),
    }


def mtp_facts(plan: Plan) -> dict:
    """A Nemotron-H plan's multi-token-prediction part: one depth's layers, the depths predicted and held (one,
    shared, with ``mtp_use_repeated_layer``), and the bytes written for them."""
    depths = rules.held_mtp_depths(plan.spec)
    return {"layers": "".join(layer.kind for _, layer, _, _ in depths[0]),
            "depths": plan.spec.hf_config.get("num_nextn_predict_layers"), "held": len(depths),
            "bytes": sum(c.nbytes for c in plan.chunks if MTP_HF.search(c.key))}
