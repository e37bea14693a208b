#!/usr/bin/env python
"""List the torch_dist ``.metadata`` of what the installed megatron-core saves for a Nemotron-H config: the
ground truth ``tests/data/nemotron_h/*_metadata_keys.txt`` were written with (one line per entry: ``key (shape)
dtype chunks=N`` for a tensor, ``key/shard_i_n bytes`` for an object).

    python tools/nemotron_h_mcore_keys.py tests/data/nemotron_h/tiny_hf_config.json            # no MTP
    python3.12 tools/nemotron_h_mcore_keys.py tests/data/nemotron_h/tiny_hf_config.json --mtp  # 0.17+ HybridModel

The model is megatron-core's own (``streamconv.reference.mcore_hybrid``: the local layers with the TE spec's
checkpoint keys), saved by ``dist_checkpointing.save`` into a temporary folder.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a NemotronHForCausalLM config.json")
    p.add_argument("--mtp", action="store_true", help="with its multi-token-prediction layers (megatron-core 0.17+)")
    args = p.parse_args()

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from streamconv.reference import mcore, mcore_hybrid

    cfg = json.loads(Path(args.config).read_text())
    model = mcore_hybrid.build_mamba(cfg, mtp=args.mtp)
    with tempfile.TemporaryDirectory() as tmp, mcore_hybrid.cpu_stand_ins():
        mcore.save_reference_checkpoint(model, tmp)
        meta = FileSystemReader(tmp).read_metadata()
    for key, m in sorted(meta.state_dict_metadata.items()):
        if isinstance(m, TensorStorageMetadata):
            print(f"{key} {tuple(m.size)} {m.properties.dtype} chunks={len(m.chunks)}")
        else:
            print(f"{key} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
