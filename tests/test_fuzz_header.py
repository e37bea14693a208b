"""Property-based fuzzing of what streamconv parses from files a user hands in: the safetensors header,
the shard index and config.json. Whatever the bytes, the only exception is our one-line BadInputError;
and whatever a header that passes claims, every tensor lies inside the file, holds exactly the bytes
its dtype and shape need, and overlaps no other."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamconv.errors import BadInputError
from streamconv.formats.safetensors import DTYPES, itemsize, read_header
from streamconv.sinks.safetensors import ShardWriter
from streamconv.sources.safetensors import SafetensorsSource
from streamconv.models import rules
from streamconv.models.config import load_config, spec_from_config
from streamconv.reference.synth import llama_config

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid_shard(work) -> bytes:
    """A real little shard written by our writer: the seed of the mutation fuzzing."""
    path = work / "seed.safetensors"
    entries = [("a.weight", torch.float32, (3, 4)), ("b", torch.bfloat16, (5,)), ("c.norm", torch.int8, (2, 2, 2)),
               ("empty", torch.float16, (0, 7))]
    w = ShardWriter(path, entries, metadata={"format": "pt"})
    for name, dtype, shape in entries:
        w.write(name, torch.arange(math.prod(shape)).reshape(shape).to(dtype))
    w.close()
    assert set(read_header(path)) == {n for n, _, _ in entries}
    return path.read_bytes()


def parse(work: Path, data: bytes):
    """``read_header`` on ``data``; BadInputError is the only acceptable failure (pytest reports any other)."""
    path = work / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        infos = read_header(path)
    except BadInputError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return None
    check_invariants(infos, data)
    return infos


def check_invariants(infos: dict, data: bytes) -> None:
    (n,) = struct.unpack("<Q", data[:8])
    spans = []
    for name, info in infos.items():
        assert info.dtype in DTYPES.values()
        assert all(isinstance(s, int) and s >= 0 for s in info.shape)
        assert info.nbytes == math.prod(info.shape) * itemsize(info.dtype)
        assert 8 + n <= info.start and info.start + info.nbytes <= len(data), name
        if info.nbytes:
            spans.append((info.start, info.start + info.nbytes))
    spans.sort()
    assert all(e0 <= b1 for (_, e0), (b1, _) in zip(spans, spans[1:]))


def with_prefix(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


# JSON values of any shape, and JSON that looks like a safetensors header
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
dims = st.one_of(st.integers(-3, 9), st.integers(-2**64, 2**64), st.floats(), st.booleans(), st.text(max_size=3))
entry_fields = {
    "dtype": st.sampled_from([*DTYPES, "F7", "f32", "", "BF16 "]) | json_values,
    "shape": st.lists(dims, max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(-8, 600) | dims, min_size=0, max_size=3) | json_values,
}
entries = st.fixed_dictionaries(entry_fields) | st.fixed_dictionaries({}, optional=entry_fields)
headers = st.dictionaries(st.text(max_size=10), entries | json_values, max_size=6)


@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes(work, data):
    parse(work, data)


@FUZZ
@given(body=st.binary(max_size=300), tail=st.binary(max_size=200), slack=st.integers(-4, 4))
def test_random_bytes_behind_a_plausible_length(work, body, tail, slack):
    parse(work, struct.pack("<Q", max(0, len(body) + slack)) + body + tail)


@FUZZ
@given(value=json_values, tail=st.binary(max_size=64))
def test_random_json_header(work, value, tail):
    parse(work, with_prefix(json.dumps(value).encode(), tail))


@FUZZ
@given(header=headers, data_len=st.integers(0, 512))
def test_header_shaped_json(work, header, data_len):
    parse(work, with_prefix(json.dumps(header).encode(), bytes(data_len)))


@FUZZ
@given(header=st.dictionaries(
    st.text(min_size=1, max_size=4),
    st.fixed_dictionaries({"dtype": st.sampled_from(sorted(DTYPES)),
                           "shape": st.lists(st.integers(0, 6), max_size=3),
                           "data_offsets": st.lists(st.integers(0, 400), min_size=2, max_size=2)}),
    max_size=6), data_len=st.integers(0, 400))
def test_well_formed_entries_with_random_ranges(work, header, data_len):
    """Mostly valid-looking headers: what passes must satisfy every invariant (checked in ``parse``)."""
    parse(work, with_prefix(json.dumps(header).encode(), bytes(data_len)))


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete"]), st.integers(0, 10**6),
                                st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.none() | st.integers(0, 10**6))
def test_mutated_valid_shard(work, valid_shard, edits, cut):
    data = bytearray(valid_shard)
    for op, pos, value in edits:
        pos %= len(data) + (op == "insert")
        if op == "flip" and data:
            data[pos % len(data)] ^= 1 << (value % 8)
        elif op == "set" and data:
            data[pos % len(data)] = value
        elif op == "insert":
            data[pos:pos] = bytes([value])
        elif op == "delete" and data:
            del data[pos % len(data)]
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    parse(work, bytes(data))


def test_mutated_header_text_keeps_the_seed_readable(work, valid_shard):
    """The fuzz seed itself parses (so the mutations above start from a valid file)."""
    infos = parse(work, valid_shard)
    assert infos is not None and infos["a.weight"].shape == (3, 4)


@FUZZ
@given(index=json_values | st.fixed_dictionaries({"weight_map": json_values}))
def test_random_index(work, valid_shard, index):
    folder = work / "indexed"
    folder.mkdir(exist_ok=True)
    (folder / "model-00001-of-00001.safetensors").write_bytes(valid_shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        SafetensorsSource(folder).close()
    except BadInputError as e:
        assert "\n" not in str(e)


CONFIG_KEYS = ["architectures", "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
               "intermediate_size", "vocab_size", "head_dim", "tie_word_embeddings", "rope_scaling", "hidden_act",
               "attention_bias", "block_configs", "rms_norm_eps", "torch_dtype"]


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS),
                               json_values | st.integers(-5, 300) | st.sampled_from(
                                   [["DeciLMForCausalLM"], ["LlamaForCausalLM"], 2**62, 0.5, []]), max_size=4))
def test_random_config_values(work, changes):
    """A config.json with random values where the model shape lives: a spec or an UnsupportedModelError."""
    path = work / "config.json"
    path.write_text(json.dumps({**llama_config(), **changes}))
    try:
        spec = spec_from_config(load_config(path))
    except BadInputError as e:  # UnsupportedModelError is one
        assert "\n" not in str(e)
        return
    assert spec.num_layers > 0 and spec.hidden_size > 0 and rules.param_count(spec) > 0
