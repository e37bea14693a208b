"""Quantized Hugging Face checkpoints: which ones streamconv dequantizes on the fly, and which it refuses.

FP8 checkpoints as NVIDIA Model Optimizer exports them (``hf_quant_config.json`` ``{"quantization":
{"quant_algo": ..., "kv_cache_quant_algo": ..., "exclude_modules": [...]}}``, or ``config.json``
``quantization_config`` with ``quant_method: modelopt``), and the fine-grained FP8 format transformers reads
(``quantization_config: {quant_method: fp8, weight_block_size: [128, 128]}``). Each quantized weight is
``float8_e4m3fn`` with a float32 scale beside it, and its value is ``fp8.float() * scale``:

============================  =====================  ===============================================
method                        scale tensor           scale shape
============================  =====================  ===============================================
``FP8`` (per tensor)          ``<m>.weight_scale``   ``[]`` (or ``[1]``)
``FP8_PER_CHANNEL_PER_TOKEN`` ``<m>.weight_scale``   ``[rows]`` or ``[rows, 1]``
``FP8_PB_WO`` (blocks)        ``<m>.weight_scale``   ``[ceil(rows/128), ceil(cols/128)]``
fine-grained ``fp8``          ``<m>.weight_scale_inv`` ``[ceil(rows/b0), ceil(cols/b1)]`` (``weight_block_size``)
============================  =====================  ===============================================

Excluded modules (``lm_head``) are stored unquantized and pass through. Activation scales
(``input_scale``) and kv-cache scales (``k_scale``, ``v_scale``) are not weights of the dequantized model:
they are skipped (the summary counts them). Every other quantization (NVFP4, INT4/INT8 AWQ, GPTQ,
compressed-tensors packing, bitsandbytes, ...) is refused in one line naming the method.

The scales are small (one float per tensor, per row or per 128x128 block: ~60 MB for a 253B model in
blocks) and are read once, up front; the weights are dequantized piece by piece inside the engine
(``transforms.dequantize``), to the output dtype in one rounding.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from streamconv import dtypes
from streamconv.errors import BadInputError
from streamconv.formats.names import OTHER_COMPANIONS, QUANT_CONFIG_FILE, SKIPPED_SCALES as SKIPPED, WEIGHT_SCALE

FLOAT8 = dtypes.FLOAT8
SUPPORTED_MODELOPT = {"FP8": "per-tensor", "FP8_PER_CHANNEL_PER_TOKEN": "per-channel", "FP8_PB_WO": "block"}
DEFAULT_BLOCK = (128, 128)  # Model Optimizer's FP8_PB_WO blocks


@dataclass(frozen=True)
class Scale:
    """How one weight dequantizes: ``values`` (float32; ``[]``, ``[rows]`` or ``[row blocks, col blocks]``)."""

    values: "torch.Tensor"  # noqa: F821 (torch is imported once a checkpoint is quantized)
    block: tuple[int, int] | None = None  # None: per tensor or per row

    @property
    def kind(self) -> str:
        if self.block is not None:
            return f"{self.block[0]}x{self.block[1]} blocks"
        return "per tensor" if self.values.numel() == 1 else "per row"


@dataclass
class Quantization:
    method: str  # as the checkpoint names it: "FP8", "FP8_PB_WO", "fp8 (fine-grained)", ...
    dtype: dtypes.DType  # what the weights dequantize to by default (config torch_dtype; --dtype overrides)
    scales: dict[str, Scale] = field(default_factory=dict)  # weight name -> its scale
    companions: set[str] = field(default_factory=set)  # every scale tensor of the checkpoint (consumed)
    skipped: list[str] = field(default_factory=list)  # activation and kv-cache scales, not carried over
    exclude_modules: list[str] = field(default_factory=list)
    kv_cache: str | None = None

    def describe(self) -> str:
        kinds = sorted({s.kind for s in self.scales.values()})
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.method} ({', '.join(kinds) or 'no quantized weights'}), dequantized to {dtype}"

    def as_dict(self) -> dict:
        return {"method": self.method, "scales": sorted({s.kind for s in self.scales.values()}),
                "quantized_weights": len(self.scales), "skipped_scales": len(self.skipped),
                "exclude_modules": self.exclude_modules, "kv_cache_quant_algo": self.kv_cache,
                "dequantized_to": str(self.dtype).removeprefix("torch.")}


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path}: not readable JSON ({e})") from None
    return data if isinstance(data, dict) else None


def method_of(folder: Path, cfg: dict) -> tuple[str | None, dict]:
    """The checkpoint's quantization method and its settings, from ``hf_quant_config.json`` or
    ``config.json``'s ``quantization_config``; (None, {}) when neither names one. Refuses what is not
    dequantized here."""
    folder = Path(folder)
    modelopt = _read_json(folder / QUANT_CONFIG_FILE)
    qc = cfg.get("quantization_config") if isinstance(cfg.get("quantization_config"), dict) else None
    where = folder / QUANT_CONFIG_FILE if modelopt else folder / "config.json"
    if modelopt is not None:
        q = modelopt.get("quantization", modelopt)
        settings = q if isinstance(q, dict) else {}
        algo = settings.get("quant_algo")
    elif qc is not None:
        settings = qc
        method = str(qc.get("quant_method", "")).lower()
        if method == "modelopt":
            algo = qc.get("quant_algo")
        elif method == "fp8":
            if not qc.get("weight_block_size"):
                raise BadInputError(f"{where}: quantization_config fp8 without weight_block_size is not a format "
                                    "streamconv knows; use the bf16 model")
            return "fp8 (fine-grained)", settings
        elif method:
            raise BadInputError(f"{where}: this checkpoint is quantized with {qc.get('quant_method')!r}; streamconv "
                                "dequantizes FP8 checkpoints only (Model Optimizer FP8, FP8_PB_WO, fine-grained fp8); "
                                "use the bf16 model")
        else:
            return None, {}
    else:
        return None, {}
    if algo is None and settings.get("kv_cache_quant_algo") and modelopt is not None:
        return "none (kv-cache scales only)", settings
    if algo not in SUPPORTED_MODELOPT:
        raise BadInputError(f"{where}: this checkpoint is quantized with {algo!r} (Model Optimizer); streamconv "
                            "dequantizes FP8, FP8_PER_CHANNEL_PER_TOKEN and FP8_PB_WO only; use the bf16 model")
    return str(algo), settings


def default_dtype(cfg: dict) -> dtypes.DType:
    name = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").removeprefix("torch.")
    dtype = dtypes.BY_NAME.get(name)
    if dtype is None or dtype in FLOAT8 or not dtype.is_floating_point:
        return dtypes.BFLOAT16
    return dtype


def detect(source, folder: Path, cfg: dict, read_values: bool = True) -> Quantization | None:
    """The quantization of ``source`` (a ``SafetensorsSource``), its scales read (unless ``read_values`` is
    False); None for a plain checkpoint. Refuses other quantizations, and FP8 weights or scales that do not pair
    up."""
    infos = source.tensors
    method, settings = method_of(folder, cfg)
    others = sorted(n for n in infos if OTHER_COMPANIONS.search(n))
    fp8 = sorted(n for n, i in infos.items() if dtypes.of(i.dtype) in FLOAT8)
    scale_names = sorted(n for n in infos if WEIGHT_SCALE.match(n))
    skipped = sorted(n for n in infos if SKIPPED.search(n))
    if method is None:
        if others or fp8 or scale_names or skipped:
            first = (others or fp8 or scale_names or skipped)[0]
            raise BadInputError(f"{folder}: this is a quantized checkpoint ({first!r}) but neither "
                                f"{QUANT_CONFIG_FILE} nor config.json's quantization_config says how; streamconv "
                                "dequantizes Model Optimizer and fine-grained FP8 checkpoints only (--allow-unused "
                                "does not apply to quantization scales); use the bf16 model")
        return None
    if others:
        raise BadInputError(f"{folder}: tensor {others[0]!r} belongs to a quantization streamconv does not "
                            f"dequantize (the config says {method}); use the bf16 model")
    block = None
    if method == "FP8_PB_WO":
        block = tuple(settings.get("weight_block_size") or settings.get("block_size") or DEFAULT_BLOCK)
    elif method == "fp8 (fine-grained)":
        block = tuple(settings["weight_block_size"])
    if block is not None and (len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block)):
        raise BadInputError(f"{folder}: weight_block_size {list(block)} is not two positive integers")
    quant = Quantization(method, default_dtype(cfg), companions=set(scale_names) | set(skipped), skipped=skipped,
                         exclude_modules=list(settings.get("exclude_modules") or settings.get("modules_to_not_convert")
                                              or []),
                         kv_cache=settings.get("kv_cache_quant_algo"))
    for name in scale_names:
        weight = WEIGHT_SCALE.match(name)["m"] + ".weight"
        if weight not in infos:
            raise BadInputError(f"{infos[name].path}: scale {name!r} has no weight {weight!r} beside it")
        if weight in quant.scales:
            raise BadInputError(f"{infos[name].path}: {weight!r} has both a weight_scale and a weight_scale_inv; "
                                "which one applies is ambiguous: the checkpoint is not one format or the other")
        quant.scales[weight] = _scale(source, name, infos[weight], block, read_values)
    for name in fp8:
        if name not in quant.scales:
            raise BadInputError(f"{infos[name].path}: {name!r} is float8 but has no weight_scale beside it; the "
                                "checkpoint is incomplete")
    for name in quant.scales:
        if dtypes.of(infos[name].dtype) not in FLOAT8:
            raise BadInputError(f"{infos[name].path}: {name!r} has a weight_scale but is {infos[name].dtype}, not "
                                "float8")
    return quant


def _check_values(path, name: str, values) -> None:
    """Scales must be finite and non-zero (NaN, inf or 0 would make the whole weight NaN, inf or 0); a
    negative one is legal arithmetic but no quantizer writes it: said once on stderr."""
    import sys

    import torch

    bad = ~torch.isfinite(values) | (values == 0)
    if bool(bad.any()):
        first = values.reshape(-1)[bad.reshape(-1).nonzero()[0, 0]].item()
        raise BadInputError(f"{path}: scale {name!r} holds {int(bad.sum())} value(s) that are NaN, infinite or zero "
                            f"(first: {first}): the weight would dequantize to NaN, infinities or zeros; the "
                            "checkpoint is corrupt")
    if bool((values < 0).any()):
        sys.stderr.write(f"warning: {path}: scale {name!r} holds negative values; quantizers write positive "
                         "scales (the weight's signs flip)\n")


def _scale(source, name: str, weight, block, read_values: bool = True) -> Scale:
    """The scale of ``weight``, its shape checked; ``read_values=False`` (inspect: headers only): the values
    are not read (a meta tensor of the right shape stands in)."""
    import torch

    info = source.tensors[name]
    if info.dtype not in (dtypes.FLOAT32, dtypes.BFLOAT16, dtypes.FLOAT16):
        raise BadInputError(f"{info.path}: scale {name!r} is {info.dtype}; float32 expected")
    if math.prod(info.shape) > 64 * 1024**2:
        raise BadInputError(f"{info.path}: scale {name!r} {list(info.shape)} is implausibly large")
    rows = info.shape[0] if info.shape else 1
    values = (source.read_rows(name, 0, rows).to(torch.float32).clone().reshape(info.shape) if read_values
              else torch.empty(info.shape, dtype=torch.float32, device="meta"))
    shape = tuple(weight.shape)
    if len(shape) != 2:
        raise BadInputError(f"{weight.path}: quantized weight {name[:-len('_scale')]!r} is {list(shape)}, not 2-D")
    if read_values:
        _check_values(info.path, name, values)
    n = values.numel()
    if n == 1 and (block is None or values.dim() < 2):
        return Scale(values.reshape(()))
    if block is None:
        if tuple(values.shape) in ((shape[0],), (shape[0], 1)):  # one per row (output channel), as a column
            return Scale(values.reshape(-1))
        raise BadInputError(f"{info.path}: scale {name!r} {list(info.shape)} fits neither one per tensor nor one "
                            f"per row ([{shape[0]}] or [{shape[0]}, 1]) of {list(shape)}")
    want = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    if tuple(values.shape) != want:
        raise BadInputError(f"{info.path}: scale {name!r} is {list(info.shape)}; {block[0]}x{block[1]} blocks of "
                            f"{list(shape)} need {list(want)}")
    return Scale(values, block)
