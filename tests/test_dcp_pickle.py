""".metadata written without torch.distributed.checkpoint (formats/dcp_pickle.py) is the Metadata that
torch.distributed.checkpoint itself would pickle: loaded with the real classes, it equals one built from
them, field by field, for stacked and per-layer keys, objects, and big offsets."""

from __future__ import annotations

import pickle

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex,
                                                   StorageMeta, TensorProperties, TensorStorageMetadata)

from streamconv.formats import dcp_pickle
from streamconv.formats.torch_dist import build_metadata
from streamconv.sources.torch_dist import load_metadata


def real_metadata(targets, chunks_by_key, objects, storage) -> Metadata:
    sd = {}
    for key, (shape, dtype) in targets.items():
        sd[key] = TensorStorageMetadata(
            properties=TensorProperties(dtype=dtype), size=torch.Size(shape),
            chunks=[ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in chunks_by_key[key]])
    for key in objects:
        sd[key] = BytesStorageMetadata()
    data = {MetadataIndex(k, torch.Size(o) if o is not None else None): _StorageInfo(rel, off, n)
            for k, o, rel, off, n in storage}
    return Metadata(state_dict_metadata=sd, planner_data=None, storage_data=data,
                    storage_meta=StorageMeta(checkpoint_id=None, save_id=None, load_id=None), version="1.0.0")


ARGS = (
    {"decoder.layers.mlp.linear_fc1.weight": ((4, 512, 64), torch.bfloat16),
     "decoder.layers.3.self_attention.weight": ((64, 64), torch.float32),
     "embedding.word_embeddings.weight": ((70000, 8), torch.float16)},
    {"decoder.layers.mlp.linear_fc1.weight": [((i, r, 0), (1, 256, 64)) for i in range(4) for r in (0, 256)],
     "decoder.layers.3.self_attention.weight": [((0, 0), (64, 64))],
     "embedding.word_embeddings.weight": [((0, 0), (40000, 8)), ((40000, 0), (30000, 8))]},
    ["decoder.layers.self_attention.linear_qkv._extra_state/shard_0_4", "common_state/shard_0_1"],
    [("decoder.layers.mlp.linear_fc1.weight", (i, r, 0), f"__0_{i}.distcp", 70000 * r + 3 * 2**32, 65536 + 1513)
     for i in range(4) for r in (0, 256)]
    + [("decoder.layers.3.self_attention.weight", (0, 0), "__0_9.distcp", 0, 16384 + 1500),
       ("embedding.word_embeddings.weight", (0, 0), "__0_9.distcp", 17884, 640000),
       ("embedding.word_embeddings.weight", (40000, 0), "__0_9.distcp", 657884, 480000),
       ("decoder.layers.self_attention.linear_qkv._extra_state/shard_0_4", None, "__0_10.distcp", 0, 900),
       ("common_state/shard_0_1", None, "__0_10.distcp", 900, 1200)],
)


def test_the_pickle_is_the_metadata_dcp_would_write(tmp_path):
    ours = pickle.loads(dcp_pickle.dumps(build_metadata(*ARGS)))
    real = real_metadata(*ARGS)
    assert type(ours) is Metadata
    assert ours.state_dict_metadata == real.state_dict_metadata
    assert ours.storage_data == real.storage_data
    assert list(ours.storage_data) == list(real.storage_data)
    assert ours.storage_meta == real.storage_meta and ours.planner_data is None and ours.version == "1.0.0"
    # the same objects pickled by pickle itself load to the same thing, and our allow-list reader takes ours
    assert pickle.loads(pickle.dumps(real)) == ours
    (tmp_path / ".metadata").write_bytes(dcp_pickle.dumps(build_metadata(*ARGS)))
    # streamconv's reader (stand-ins, no torch) sees the same fields
    read = load_metadata(tmp_path / ".metadata")
    assert view(read.state_dict_metadata) == view(real.state_dict_metadata)
    assert {(i.fqn, tuple(i.offset) if i.offset is not None else None): (d.relative_path, d.offset, d.length)
            for i, d in read.storage_data.items()} == \
        {(i.fqn, tuple(i.offset) if i.offset is not None else None): (d.relative_path, d.offset, d.length)
         for i, d in real.storage_data.items()}


def view(sd: dict) -> dict:
    """What the fields of a ``state_dict_metadata`` say, whichever classes hold them."""
    return {k: (type(m).__name__, tuple(getattr(m, "size", ())), str(getattr(getattr(m, "properties", None), "dtype",
                                                                             None)),
                [(tuple(c.offsets), tuple(c.sizes)) for c in getattr(m, "chunks", [])]) for k, m in sd.items()}
