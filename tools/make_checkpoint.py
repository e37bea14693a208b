#!/usr/bin/env python
"""Generate a synthetic Hugging Face checkpoint (seeded, sharded, written tensor by tensor).

Examples:
  python tools/make_checkpoint.py /tmp/tiny                              # tiny Llama, fp32, 3 shards
  python tools/make_checkpoint.py /tmp/m --hidden 2048 --layers 16 --ffn 5632 --vocab 32000 --dtype bf16
  python tools/make_checkpoint.py /tmp/s --config path/to/config.json   # any supported config.json
  python tools/make_checkpoint.py /tmp/u --like ultra-253b-v1 --hidden 128 --heads 32   # Ultra's 162-layer
                                                            # block pattern at small widths
  python tools/make_checkpoint.py /tmp/d --decilm-mixed       # DeciLM using every block variant
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from streamconv.reference.synth import REAL_CONFIGS, llama_config, make_checkpoint, mixed_decilm_config, real_config, scale_config  # noqa: E402,E501

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--config", help="a config.json to use instead of the Llama size flags")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--like", choices=sorted(REAL_CONFIGS),
                   help="a real model scaled down to --hidden/--heads/--vocab, keeping its per-layer block pattern "
                        "(all its layers unless --layers N keeps the first N)")
    p.add_argument("--decilm-mixed", action="store_true",
                   help="a DeciLM model mixing every block variant (--hidden/--heads/--vocab)")
    p.add_argument("--layers", type=int, default=None, help="layers (default 2; with --like: all)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2, help="equal to --heads for MHA")
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--tied", action="store_true", help="tie input and output embeddings")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-shuffle", action="store_true", help="store tensors in layer order")
    a = p.parse_args()
    if a.config:
        cfg = json.loads(Path(a.config).read_text())
    elif a.like:
        cfg = scale_config(real_config(a.like), hidden=a.hidden, heads=a.heads, layers=a.layers, vocab=a.vocab)
    elif a.decilm_mixed:
        cfg = mixed_decilm_config(hidden=a.hidden, heads=a.heads, vocab=a.vocab)
    else:
        cfg = llama_config(hidden=a.hidden, layers=a.layers or 2, heads=a.heads, kv_heads=a.kv_heads, ffn=a.ffn,
                           vocab=a.vocab, head_dim=a.head_dim, tied=a.tied)
    out = make_checkpoint(a.out, cfg, seed=a.seed, dtype=DTYPES[a.dtype], shards=a.shards, shuffle=not a.no_shuffle)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({size / 1e9:.3f} GB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
