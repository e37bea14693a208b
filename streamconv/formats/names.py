"""The names of checkpoint files, folders and special keys: each declared here once.

A torch_dist checkpoint as Megatron-Bridge's import lays it out::

    <out>/latest_checkpointed_iteration.txt      TRACKER_FILE (written last)
    <out>/latest_train_state.pt                  LATEST_TRAIN_STATE_FILE
    <out>/iter_0000000/                          ITER_DIR
        .metadata                                METADATA_FILE (the commit: written after every .distcp)
        __0_0.distcp ...                         distcp_name()
        common.pt, metadata.json                 COMMON_FILE, METADATA_JSON_FILE
        run_config.yaml, train_state.pt          RUN_CONFIG_FILE, TRAIN_STATE_FILE
        tokenizer/, hf_config/config.json        TOKENIZER_DIR, HF_CONFIG_DIR
    <out>/.streamconv/                           STATE_DIR: identity, journals, the zarr view (streamconv's own)
    <out>/.streamconv.lock                       LOCK_FILE (while a run writes)
"""

import re

ITER_DIR_FORMAT = "iter_{:07d}"
ITER_DIR = ITER_DIR_FORMAT.format(0)
TRACKER_FILE = "latest_checkpointed_iteration.txt"  # in <out>/, text str(step) or "release", no newline
LATEST_TRAIN_STATE_FILE = "latest_train_state.pt"  # in <out>/
METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"  # mcore 0.16-0.18 read the common state here
METADATA_JSON_FILE = "metadata.json"
COMMON_STATE_KEY = "common_state/shard_0_1"  # mcore 0.19+ read it as this object of .metadata
RUN_CONFIG_FILE = "run_config.yaml"
TRAIN_STATE_FILE = "train_state.pt"
TOKENIZER_DIR = "tokenizer"  # the HF tokenizer's files, as Bridge keeps them
HF_CONFIG_DIR = "hf_config"  # the source's config.json, kept beside the checkpoint (mcore2hf gives it back)

# Top-level key prefixes of a model's weights (others, e.g. optimizer state, are not read); ``mtp.``: the
# multi-token-prediction layers (megatron-core 0.17+).
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")

# A Hugging Face model folder
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
QUANT_CONFIG_FILE = "hf_quant_config.json"
# Files of the HF folder Bridge's import keeps beside the checkpoint (``iter_0000000/tokenizer/``).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json")

# Companions of quantized weights in a HF checkpoint (Model Optimizer FP8/NVFP4, fine-grained FP8, GPTQ/AWQ,
# compressed-tensors, bitsandbytes): a weight stored next to one is not the weight until it is scaled.
WEIGHT_SCALE = re.compile(r"^(?P<m>.+)\.(?P<kind>weight_scale|weight_scale_inv)$")  # FP8's, dequantized
SKIPPED_SCALES = re.compile(r"(^|\.)(input_scale|k_scale|v_scale|output_scale)$")  # activations', kv-cache's
OTHER_COMPANIONS = re.compile(r"(^|\.)(weight_scale_2|input_global_scale|weight_global_scale|weight_zero_point|"
                              r"weight_packed|weight_shape|qweight|qzeros|scales|g_idx|SCB|absmax|quant_map)$")


def is_quant_companion(name: str) -> bool:
    """A tensor of a quantized checkpoint that is not a weight: a scale, zero point, packing or index."""
    return bool(WEIGHT_SCALE.match(name) or SKIPPED_SCALES.search(name) or OTHER_COMPANIONS.search(name))


# streamconv's own, inside an output folder
STATE_DIR = ".streamconv"
IDENTITY_FILE = "identity.json"
JOURNAL_FILE = "journal.jsonl"
WORLD_FILE = "world"
ZARR_VIEW = "staging.zarr"  # the --keep-staging view (sinks/zarr_view.py), in STATE_DIR
LOCK_FILE = ".streamconv.lock"
JOB_TOKEN_FILE = ".streamconv/job"  # in an output: rank 0's token under torchrun, read back by every rank
EXPORT_JOB_TOKEN_FILE = ".streamconv-mcore2hf.job"  # the same in an export's folder (removed at its end)
EXPORT_MARKER = ".streamconv-mcore2hf.json"  # an unfinished mcore2hf output


def distcp_name(file: int) -> str:
    """A ``.distcp`` file's name, as torch DCP's writer names them (streamconv writes every file as rank 0's)."""
    return f"__0_{file}.distcp"


def is_extra_state(key: str) -> bool:
    """Transformer Engine's ``_extra_state`` saved as a tensor (older TE) rather than an object: not a weight."""
    return key.split("/")[0].endswith("._extra_state")
