#!/usr/bin/env python
"""The naive in-memory converter streamconv is measured against (what whole-model tools do).

    python bench/naive_convert.py --hf-model DIR --megatron-path OUT

Loads every tensor with ``safetensors.torch.load_file``, builds the megatron state dict with the same
mapping table and transforms as streamconv (QKV interleaved per query group, ``[gate; up]``, layers stacked
for Llama), and saves it with ``torch.distributed.checkpoint.save(no_dist=True)``, plus the ``common.pt`` /
``metadata.json`` megatron-core reads. Its peak memory is about the model size (plus the largest stacked
tensor while it is built); the output holds the same tensors as ``streamconv hf2mcore`` writes (checked by
``bench/vs_cp.py``). Prints a JSON line: seconds, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from streamconv.formats.names import COMMON_STATE_KEY  # noqa: E402
from streamconv.formats.torch_dist import COMMON_STATE, write_common_files  # noqa: E402
from streamconv.models import rules  # noqa: E402
from streamconv.models.config import load_config, spec_from_config  # noqa: E402
from streamconv.engine.transforms import fuse  # noqa: E402


def build_state_dict(folder: Path) -> dict:
    spec = spec_from_config(load_config(folder))
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(shard))
    state: dict = {}
    stacked: dict[str, list] = {}
    for b in rules.bindings(spec):
        t = fuse(b.layout, [weights.pop(h.name) for h in b.hf], b.heads_per_group, b.head_dim)
        if b.stacked_layers:
            stacked.setdefault(b.key, []).append(t)
            if len(stacked[b.key]) == b.stacked_layers:
                state[b.key] = torch.stack(stacked.pop(b.key))
        else:
            state[b.key] = t
    for key in rules.extra_state_keys(spec):
        state[key] = None
    state[COMMON_STATE_KEY] = dict(COMMON_STATE)
    return state


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-model", required=True)
    ap.add_argument("--megatron-path", required=True, help="output folder (gets iter_0000000/)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    out = Path(args.megatron_path)
    shutil.rmtree(out, ignore_errors=True)
    ckpt = out / "iter_0000000"
    ckpt.mkdir(parents=True)
    state = build_state_dict(Path(args.hf_model))
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(ckpt)), no_dist=True)
    write_common_files(ckpt)
    (out / "latest_checkpointed_iteration.txt").write_text("0")
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 3),
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
