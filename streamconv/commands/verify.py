"""``streamconv verify``: is every tensor of a torch_dist checkpoint, bit for bit, its HF source under the mapping?

Streaming and memory-bounded like the conversion itself: the checkpoint's own items (read from
``.metadata``, by ``(file, offset, length)``, with the restricted reader of ``formats/torch_dist_reader``)
become the chunks of a plan whose recipes read the matching source rows; the engine runs that plan under
``--max-memory`` and a comparing sink checks each item against what the source makes of it (same cast, same
QKV / gate-up layouts). It does not depend on how the checkpoint was chunked (any row blocks, any number of
layers per item), only on the mapping table.

It reports, and exits 5 (``EXIT_MISMATCH``) on, any difference: a missing or unexpected tensor, a wrong
shape or dtype, chunks that do not tile a tensor, a missing ``_extra_state`` object, and every item whose
bytes differ (named by tensor and chunk offsets, with the count and first position of the differing
elements) or that cannot be read.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time


from streamconv.engine import runner
from streamconv.errors import EXIT_MISMATCH, BadInputError, printable
from streamconv.formats.names import MODEL_PREFIXES, is_extra_state
from streamconv.models import rules
from streamconv.plan.build import Chunk, Plan, Read, Target, import_plan, with_held_mtp
from streamconv.plan.layout import layout_segments, sources_for_fused_rows
from streamconv.sinks.compare import ItemCompare, Report
from streamconv.units import fmt_bytes

def _bindings_by_key(spec) -> dict[tuple[str, tuple[int, ...]], tuple]:
    out = {}
    for b in rules.bindings(spec):
        segs = layout_segments(b.layout, [t.nrows for t in b.hf], b.heads_per_group, b.head_dim)
        out[(b.key, tuple(b.index))] = (b, segs)
    return out


def row_dims(bindings, key: str, offsets) -> int:
    """How many leading dimensions of ``key`` are the layer index and the rows (2 stacked, else 1)."""
    return 2 if (key, (offsets[0],)) in bindings else 1


def full_rows(bindings, key: str, shape, offsets, sizes) -> tuple[tuple, tuple]:
    """The region of whole rows that holds region ``(offsets, sizes)``."""
    k = row_dims(bindings, key, offsets)
    return tuple(offsets[:k]) + (0,) * (len(shape) - k), tuple(sizes[:k]) + tuple(shape[k:])


def region_reads(bindings, key: str, shape: tuple[int, ...], offsets, sizes) -> tuple[Read, ...]:
    """The source row slices whose row-wise concatenation is region ``(offsets, sizes)`` of ``key``."""
    lead = row_dims(bindings, key, offsets) - 1
    if any(o != 0 or s != n for o, s, n in zip(offsets[lead + 1:], sizes[lead + 1:], shape[lead + 1:])):
        raise ValueError("split along a dimension other than rows")
    reads = []
    r0, r1 = offsets[lead], offsets[lead] + sizes[lead]
    for idx in itertools.product(*(range(o, o + s) for o, s in zip(offsets[:lead], sizes[:lead]))):
        b, segs = bindings[(key, tuple(idx))]
        reads += [Read(b.hf[s].name, b.hf[s].row0 + a, b.hf[s].row0 + z) for s, a, z in sources_for_fused_rows(segs, r0, r1)]
    return tuple(reads)


def tiling_problem(shape: tuple[int, ...], regions) -> str | None:
    """Whether ``regions`` (offsets, sizes) tile ``shape`` exactly; a description of the first problem."""
    total = 0
    for offsets, sizes in regions:
        if len(offsets) != len(shape) or any(o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape)):
            return f"chunk at {list(offsets)} sizes {list(sizes)} lies outside the tensor {list(shape)}"
        total += math.prod(sizes)
    if total != math.prod(shape):
        return f"its chunks hold {total} elements, the tensor has {math.prod(shape)}"
    boxes = sorted((tuple(o), tuple(o_ + s for o_, s in zip(o, sz))) for o, sz in regions)
    for (lo0, hi0), (lo1, hi1) in zip(boxes, boxes[1:]):  # sorted by offsets: overlaps show up as neighbours
        if all(max(a0, a1) < min(b0, b1) for a0, b0, a1, b1 in zip(lo0, hi0, lo1, hi1)):
            return f"chunks at {list(lo0)} and {list(lo1)} overlap"
    return None


def expected_dtypes(spec, src_dtypes: dict, out_tensors: dict) -> Plan:
    """The import plan whose dtypes match the checkpoint's (a run with ``--dtype`` casts every tensor)."""
    out_dtypes = {t.dtype for t in out_tensors.values()}
    try:
        plan = import_plan(spec, src_dtypes, None)
        if all(out_tensors[k].dtype == t.dtype for k, t in plan.targets.items() if k in out_tensors):
            return plan
    except BadInputError:
        pass
    if len(out_dtypes) == 1:
        return import_plan(spec, src_dtypes, out_dtypes.pop())
    return import_plan(spec, src_dtypes, None)


class NotItsSource(BadInputError):
    exit_code = EXIT_MISMATCH


def _describe_spec(spec) -> str:
    return (f"{spec.architecture} with {spec.num_layers} layers, hidden {spec.hidden_size}, "
            f"{spec.num_attention_heads} heads, vocabulary {spec.vocab_size}")


def check_same_model(spec, ckpt_dir, folder, max_memory: int) -> None:
    """When the checkpoint describes its model (run_config.yaml or training args), it must be the source's:
    one line (exit 5) instead of a mismatch per tensor."""
    import dataclasses

    from streamconv.inputs import model_config
    from streamconv.models.config import spec_from_config

    from streamconv.errors import StreamconvError

    try:
        described = spec_from_config(model_config(ckpt_dir, None, max_memory)[0])
    except StreamconvError:  # nothing (readable) describes it, e.g. a plain torch_dist save: tensor by tensor
        return
    # the MTP layers a conversion holds depend on its weights and --drop-mtp (checked tensor by tensor), not the model
    if dataclasses.replace(described.without_mtp(), torch_dtype=spec.torch_dtype) != spec.without_mtp():
        raise NotItsSource(f"{ckpt_dir}: the checkpoint is a {_describe_spec(described)} model, {folder} a "
                           f"{_describe_spec(spec)} one: this is not its source; pass the --hf-model it was "
                           "converted from")


def verify(hf_model: str, megatron_path: str, *, max_memory: int = runner.DEFAULT_MAX_MEMORY, workers: int = 4,
           device: str = "cpu", quiet: bool = True, revision: str | None = None) -> Report:
    from streamconv.sources.torch_dist import TorchDistSource
    from streamconv.inputs import open_hf_source, resolve_checkpoint, source_dtypes
    from streamconv.models.config import spec_from_config
    from streamconv.runtime.progress import make_progress

    t0 = time.perf_counter()
    ckpt_dir = resolve_checkpoint(megatron_path)
    # a hub id's weights are read over HTTP (never downloaded); a quantized source dequantizes as the conversion did
    folder, cfg, source, _ = open_hf_source(hf_model, revision)
    try:
        spec = spec_from_config(cfg)
        check_same_model(spec, ckpt_dir, folder, max_memory)
        ckpt = TorchDistSource(ckpt_dir, max_memory)
    except BaseException:
        source.close()
        raise
    report = Report(str(ckpt_dir), str(folder))
    # MTP layers in the source the checkpoint holds none of (hf2mcore --drop-mtp): said, not compared
    in_source = with_held_mtp(spec, source.tensors)
    spec = with_held_mtp(in_source, ckpt.tensors)
    report.not_compared = sorted({t.name for t in rules.hf_tensors(in_source)} - {t.name for t in rules.hf_tensors(spec)})
    try:
        src_dtypes = source_dtypes(source)
        for t in rules.hf_tensors(spec):
            if t.name not in src_dtypes:
                raise BadInputError(f"{folder}: tensor {t.name!r} is needed for {spec.architecture} but is not in "
                                    "the source checkpoint")
        ref = expected_dtypes(spec, src_dtypes, ckpt.tensors)
        bindings = _bindings_by_key(spec)
        report.tensors = len(ref.targets)
        for key in sorted(k for k in set(ckpt.tensors) - set(ref.targets)
                          if k.startswith(MODEL_PREFIXES) and not is_extra_state(k)):
            report.mismatches.append(f"{key}: in the checkpoint but not made from any source tensor")
        for key in ref.objects:
            if key not in ckpt.objects:
                report.mismatches.append(f"{key}: object missing (megatron-core refuses to load without it)")
        for key in sorted(k for k in ckpt.objects if k.startswith(MODEL_PREFIXES)):
            try:  # torch DCP's loader unpickles these in full: anything but plain data could run code there
                ckpt.read_object(key)
            except BadInputError as e:
                report.mismatches.append(f"{key}: not plain data, refused ({e})")
        targets: dict[str, Target] = {}
        chunks: list[Chunk] = []
        items: dict[tuple, list] = {}  # (key, full-row offsets) -> the items in those rows
        for key, want in ref.targets.items():
            got = ckpt.tensors.get(key)
            if got is None:
                report.mismatches.append(f"{key}: tensor missing from the checkpoint")
                continue
            if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
                report.mismatches.append(f"{key}: is {got.dtype} {list(got.shape)}, expected {want.dtype} "
                                         f"{list(want.shape)}")
                continue
            regions = [(tuple(c.offsets), tuple(c.sizes)) for c in got.chunks]
            problem = tiling_problem(want.shape, regions)
            if problem:
                report.mismatches.append(f"{key}: {problem}")
                continue
            targets[key] = want
            itemsize = want.dtype.itemsize
            groups: dict[tuple, list] = {}  # items split along columns (tensor parallel): compared per full rows
            for offsets, sizes in regions:
                groups.setdefault(full_rows(bindings, key, want.shape, offsets, sizes), []).append((offsets, sizes))
            for (offsets, sizes), parts in groups.items():
                reads = region_reads(bindings, key, want.shape, offsets, sizes)
                chunks.append(Chunk(key, offsets, sizes, reads, 0, math.prod(sizes) * itemsize))
                items[(key, offsets)] = parts
        report.items = sum(len(v) for v in items.values())
        report.bytes = sum(c.nbytes for c in chunks)
        plan = Plan("verify", spec, targets, chunks)
        sink = ItemCompare(ckpt, report, items)
        progress = make_progress(quiet, "verify", report.bytes, len(chunks), max_memory, plan=plan)
        with progress:
            runner.run(plan, source, sink, max_memory=max_memory, workers=workers, device=device, progress=progress)
    finally:
        source.close()
        ckpt.close()
    report.seconds = time.perf_counter() - t0
    return report


def verify_command(args) -> int:
    report = verify(args.hf_model, args.megatron_path, max_memory=args.max_memory,
                    workers=args.workers or runner.default_workers(),
                    device=args.device, quiet=args.quiet or args.json, revision=args.revision)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0 if report.ok else EXIT_MISMATCH
    for line in report.mismatches[:50]:
        print(f"MISMATCH {printable(line)}", file=sys.stderr)
    if len(report.mismatches) > 50:
        print(f"... and {len(report.mismatches) - 50} more", file=sys.stderr)
    summary = printable(f"{report.tensors} tensors, {report.items_checked}/{report.items} items, "
                        f"{fmt_bytes(report.bytes)} of {report.checkpoint} against {report.source} "
                        f"in {report.seconds:.1f}s")
    if report.ok:
        if not args.quiet:
            print(f"verify: OK: {summary}: every tensor is bit-identical to its source")
            if report.not_compared:
                print(f"verify: the checkpoint holds none of the source's {len(report.not_compared)} "
                      "multi-token-prediction tensors (converted with --drop-mtp): not compared")
        return 0
    print(f"verify: FAILED: {len(report.mismatches)} problem(s); {summary}", file=sys.stderr)
    return EXIT_MISMATCH

