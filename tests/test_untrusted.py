"""Issue 24: nothing a checkpoint says is trusted. Each test builds its crafted input itself and checks the
promised behaviour: one clear line, the documented exit code, nothing lost, never a checkpoint that looks
complete or is silently wrong."""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from streamconv.cli import main
from streamconv.reference.synth import llama_config, make_checkpoint

ITER = "iter_0000000"


def lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny Llama (vocab 1024) and its conversion, split into several chunks per tensor."""
    root = tmp_path_factory.mktemp("untrusted")
    src = make_checkpoint(root / "hf", llama_config(vocab=1024), seed=3, shards=2)
    out = root / "mcore"
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--quiet", "--max-memory",
                 "256KiB"]) == 0
    return src, out


def private_copy(converted, tmp_path) -> tuple[Path, Path]:
    src, out = converted
    return src, Path(shutil.copytree(out, tmp_path / "mcore", symlinks=True))


def load_metadata(ckpt: Path):
    """Our own test's ``.metadata`` (written by streamconv a moment ago): plain pickle is fine here."""
    with open(ckpt / ".metadata", "rb") as f:
        return pickle.load(f)


def save_metadata(ckpt: Path, meta) -> None:
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(meta, f)


class Planted:
    """An object whose unpickling calls ``open(path, "w")``: it creates a file when (and only when) run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(ckpt: Path, key: str, marker: Path) -> None:
    """Point object item ``key`` of ``.metadata`` at a new file holding ``torch.save([Planted])``."""
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    buf = io.BytesIO()
    torch.save([Planted(marker)], buf)
    data = buf.getvalue()
    (ckpt / "__9_0.distcp").write_bytes(data)
    meta = load_metadata(ckpt)
    meta.storage_data[MetadataIndex(key)] = _StorageInfo("__9_0.distcp", 0, len(data))
    save_metadata(ckpt, meta)


# --------------------------------------------------------------------- 1. code planted in an object item

def test_a_planted_pickle_is_refused_by_generate_verify_and_inspect_and_never_runs(converted, tmp_path, capsys):
    src, out = private_copy(converted, tmp_path)
    ckpt = out / ITER
    key = next(k for k in load_metadata(ckpt).state_dict_metadata if k.endswith("_extra_state/shard_0_2"))
    marker = tmp_path / "it-ran"
    plant(ckpt, key, marker)
    # the planted item is real: torch DCP's own loader (weights_only=False) would run it
    torch.load(io.BytesIO((ckpt / "__9_0.distcp").read_bytes()), weights_only=False)
    assert marker.exists()
    marker.unlink()

    capsys.readouterr()
    assert main(["generate", "--megatron-path", str(out), "--prompt", "hi", "--max-new-tokens", "1", "--quiet"]) == 3
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and key in err[0] and "safely" in err[0], err
    assert main(["verify", "--hf-model", str(src), "--megatron-path", str(out), "--quiet", "--json"]) == 5
    report = capsys.readouterr().out
    assert key in report and "not plain data" in report
    assert main(["inspect", str(out), "--json"]) == 3
    assert "refused" in capsys.readouterr().out
    assert not marker.exists()


# --------------------------------------------------------------------- 2. --overwrite and a HF cache's symlinks

def test_overwrite_never_deletes_the_blobs_a_cache_snapshot_links_to(converted, tmp_path, capsys):
    src, _ = converted
    cache = tmp_path / "models--o--m"
    blobs, snap = cache / "blobs", cache / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        blob = blobs / f"sha-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    before = {p.name: p.read_bytes() for p in blobs.iterdir()}
    capsys.readouterr()
    rc = main(["hf2mcore", "--hf-model", str(snap), "--megatron-path", str(blobs), "--overwrite", "--quiet"])
    assert rc == 2
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and "input" in err[0], err
    assert {p.name: p.read_bytes() for p in blobs.iterdir()} == before
    # the same snapshot converts fine into a folder of its own
    assert main(["hf2mcore", "--hf-model", str(snap), "--megatron-path", str(tmp_path / "out"), "--quiet"]) == 0


# --------------------------------------------------------------------- 10. demo --workdir

def test_demo_refuses_to_replace_what_is_in_its_workdir(tmp_path, capsys):
    pytest.importorskip("megatron.core")
    mine = tmp_path / "nano-8b-hf"
    mine.mkdir()
    (mine / "precious.txt").write_text("mine")
    capsys.readouterr()
    assert main(["demo", "--workdir", str(tmp_path), "--quiet"]) == 4
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and "--overwrite" in err[0], err
    assert (mine / "precious.txt").read_text() == "mine"


# --------------------------------------------------------------------- 11. the vocabulary is cut only by padding

def test_export_drops_megatron_padding_only(converted, tmp_path, capsys):
    src, out = converted
    cfg = llama_config(vocab=1000)  # 1024 = 1000 padded to a multiple of 128: those rows may go
    (tmp_path / "c1000").mkdir()
    (tmp_path / "c1000" / "config.json").write_text(__import__("json").dumps(cfg))
    assert main(["mcore2hf", "--megatron-path", str(out), "--hf-path", str(tmp_path / "hf1000"),
                 "--hf-config", str(tmp_path / "c1000"), "--quiet"]) == 0
    from safetensors import safe_open

    shards = sorted((tmp_path / "hf1000").glob("*.safetensors"))
    rows = {}
    for s in shards:
        with safe_open(s, "pt") as f:
            rows.update({k: f.get_slice(k).get_shape()[0] for k in f.keys() if "embed" in k or "lm_head" in k})
    assert set(rows.values()) == {1000}
    cfg = llama_config(vocab=300)  # 1024 rows for 300 tokens is not padding: refused, nothing written
    (tmp_path / "c300").mkdir()
    (tmp_path / "c300" / "config.json").write_text(__import__("json").dumps(cfg))
    capsys.readouterr()
    assert main(["mcore2hf", "--megatron-path", str(out), "--hf-path", str(tmp_path / "hf300"),
                 "--hf-config", str(tmp_path / "c300"), "--quiet"]) == 3
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and "padding" in err[0] and "1024" in err[0], err
    assert not (tmp_path / "hf300").exists() or not any((tmp_path / "hf300").glob("*.safetensors"))


# --------------------------------------------------------------------- 16. overlapping chunks, found by a sweep

def test_overlapping_chunks_are_refused(converted, tmp_path, capsys):
    _, out = private_copy(converted, tmp_path)
    ckpt = out / ITER
    meta = load_metadata(ckpt)
    key, md = next((k, m) for k, m in meta.state_dict_metadata.items()
                   if hasattr(m, "chunks") and len(m.chunks) >= 3 and m.chunks[0].sizes[0] > 1)
    first = md.chunks[0]
    grown = list(first.sizes)
    grown[0] += 1  # one row more: it now shares a row with the next chunk
    md.chunks[0] = type(first)(offsets=first.offsets, sizes=__import__("torch").Size(grown))
    save_metadata(ckpt, meta)
    capsys.readouterr()
    assert main(["mcore2hf", "--megatron-path", str(out), "--hf-path", str(tmp_path / "hf"), "--quiet"]) == 3
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and "overlap" in err[0] and key in err[0], err


def test_the_overlap_sweep_finds_overlaps_a_neighbour_check_would_miss(tmp_path):
    """A long chunk that overlaps a chunk two places after it in sorted order (its neighbour does not)."""
    from streamconv.errors import BadInputError
    from streamconv.sources.torch_dist import ItemRef, _refuse_chunk_overlaps

    def ref(o, s):
        return ItemRef(o, s, "f", 0, 1)

    ok = [ref((0, 0), (4, 2)), ref((0, 2), (4, 2)), ref((4, 0), (4, 4))]
    _refuse_chunk_overlaps(tmp_path, "t", ok)
    bad = [ref((0, 0), (8, 2)), ref((0, 2), (4, 2)), ref((4, 1), (4, 3))]  # 1st and 3rd share rows 4-7, col 1
    with pytest.raises(BadInputError, match="overlap"):
        _refuse_chunk_overlaps(tmp_path, "t", bad)


# --------------------------------------------------------------------- 9. FP8 scales are checked

@pytest.fixture(scope="module")
def fp8_sources(tmp_path_factory):
    from streamconv.reference.synth import quantize_checkpoint

    root = tmp_path_factory.mktemp("fp8")
    src = make_checkpoint(root / "hf", llama_config(hidden=64, heads=4, kv_heads=4, ffn=128), seed=4, shards=1)
    return {m: quantize_checkpoint(src, root / m, m, block=(16, 16), shards=1)
            for m in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN")}


def edit_tensors(folder: Path, edit) -> None:
    """Edit the (one) shard's tensors; the index names any tensor added."""
    import json

    from safetensors.torch import load_file, save_file

    (f,) = folder.glob("*.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {n: f.name for n in tensors}
        index.write_text(json.dumps(data))


SCALE = "model.layers.0.self_attn.o_proj.weight_scale"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0], ids=["nan", "inf", "zero"])
def test_a_non_finite_or_zero_scale_is_refused(fp8_sources, tmp_path, capsys, value):
    src = Path(shutil.copytree(fp8_sources["FP8"], tmp_path / "src"))
    edit_tensors(src, lambda t: t.__setitem__(SCALE, torch.tensor(value)))
    capsys.readouterr()
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(tmp_path / "out"), "--quiet"]) == 3
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and SCALE in err[0] and "NaN, infinite or zero" in err[0], err
    assert not (tmp_path / "out" / ITER / ".metadata").exists()


def test_a_negative_scale_converts_with_a_warning(fp8_sources, tmp_path, capsys):
    src = Path(shutil.copytree(fp8_sources["FP8"], tmp_path / "src"))
    edit_tensors(src, lambda t: t.__setitem__(SCALE, -t[SCALE]))
    capsys.readouterr()
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(tmp_path / "out"), "--quiet"]) == 0
    assert "negative" in capsys.readouterr().err


@pytest.mark.parametrize("shape", [(1, 64), (8, 8)], ids=["per-column", "square-blocks"])
def test_a_scale_that_is_not_one_per_row_is_refused(fp8_sources, tmp_path, capsys, shape):
    """A [1, cols] scale on a square o_proj, or a block grid with as many elements as rows, has the element
    count of a per-row scale: it must not be applied per row."""
    src = Path(shutil.copytree(fp8_sources["FP8_PER_CHANNEL_PER_TOKEN"], tmp_path / "src"))
    edit_tensors(src, lambda t: t.__setitem__(SCALE, t[SCALE].reshape(shape).contiguous()))
    capsys.readouterr()
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(tmp_path / "out"), "--quiet"]) == 3
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and SCALE in err[0] and "per row" in err[0], err


def test_a_weight_with_two_kinds_of_scale_is_refused(fp8_sources, tmp_path, capsys):
    src = Path(shutil.copytree(fp8_sources["FP8"], tmp_path / "src"))
    edit_tensors(src, lambda t: t.__setitem__(SCALE + "_inv", 1 / t[SCALE]))
    capsys.readouterr()
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(tmp_path / "out"), "--quiet"]) == 3
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and "weight_scale_inv" in err[0] and "ambiguous" in err[0], err


# --------------------------------------------------------------------- 18. names are printed escaped

def test_names_from_a_checkpoint_cannot_forge_lines_or_colour_the_terminal(converted, tmp_path, capsys):
    src, out = private_copy(converted, tmp_path)
    ckpt = out / ITER
    meta = load_metadata(ckpt)
    forged = "decoder.final_layernorm.weight\nverify: OK: \x1b[32mall good\x1b[0m [bold]x[/bold]"
    meta.state_dict_metadata[forged] = meta.state_dict_metadata["decoder.final_layernorm.weight"]
    for index in [i for i in meta.storage_data if i.fqn == "decoder.final_layernorm.weight"]:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        meta.storage_data[MetadataIndex(forged, index.offset)] = meta.storage_data[index]
    save_metadata(ckpt, meta)
    capsys.readouterr()
    main(["verify", "--hf-model", str(src), "--megatron-path", str(out)])
    err = capsys.readouterr().err
    assert "\x1b" not in err and not any(line.startswith("verify: OK") for line in err.splitlines())
    assert "\\x1b" in err and "\\n" in err
    main(["inspect", str(out)])
    shown = capsys.readouterr().out
    assert "\x1b[32m" not in shown and not any(line.lstrip().startswith("verify: OK") for line in shown.splitlines())


def test_an_error_line_is_bounded():
    from streamconv.errors import MAX_LINE, printable

    line = printable("x" * 100_000 + "\n")
    assert len(line) < MAX_LINE + 40 and "more characters" in line


# --------------------------------------------------------------------- 5. --recheck after another process count

def test_recheck_still_checks_after_the_journals_were_compacted(tmp_path):
    """The output was made by another number of processes (its journals are compacted on resume): the
    committed files' chunk CRCs survive, so --recheck still catches a source changed behind the file
    system's back."""
    import json
    import subprocess
    import sys

    model = make_checkpoint(tmp_path / "hf", llama_config(), seed=2, shards=2)
    out = tmp_path / "out"
    small = ["--max-memory", "64KiB", "--distcp-size", "40KiB", "--quiet"]

    def run(*args):
        return subprocess.run([sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(model),
                               "--megatron-path", str(out), *small, *args], capture_output=True, text=True)

    assert run().returncode == 0
    (out / ".streamconv" / "world").write_text("2")  # as a 2-process run leaves it
    records = [json.loads(x) for x in (out / ".streamconv" / "journal.jsonl").read_text().splitlines()]
    chunk = next(r for r in records if r["t"] == "chunk" and r["key"].endswith("linear_fc2.weight"))
    from streamconv.inputs import chunk_bytes_for, import_plan_for
    from streamconv.models.config import load_config, spec_from_config
    from streamconv.sources.safetensors import SafetensorsSource

    with_source = SafetensorsSource(model)
    plan = import_plan_for(with_source, spec_from_config(load_config(model)), None, chunk_bytes_for(64 * 1024),
                           file_bytes=40 * 1024)
    c = next(c for c in plan.chunks if (c.key, list(c.offsets)) == (chunk["key"], chunk["offsets"]))
    shard, at, n = with_source.extent(c.reads[0].name, c.reads[0].row0, c.reads[0].row1, c.reads[0].index)
    with_source.close()
    from crafting import flip_behind_the_file_systems_back

    flip_behind_the_file_systems_back(shard, at + n // 2, out)
    r = run("--recheck")
    assert r.returncode == 3 and shard.name in r.stderr and "changed since" in r.stderr, r.stderr


# --------------------------------------------------------------------- 6. a shard rewritten in place during a run

def test_a_shard_rewritten_in_place_during_the_run_is_not_committed(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from streamconv import crashpoints

    model = make_checkpoint(tmp_path / "hf", llama_config(), seed=2, shards=2)
    out = tmp_path / "out"
    marker = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(model),
                             "--megatron-path", str(out), "--quiet", "--max-memory", "64KiB", "--distcp-size", "40KiB"],
                            env={**os.environ, "STREAMCONV_TEST_PAUSE": "chunk:2", "STREAMCONV_TEST_PAUSE_FILE": str(marker),
                                 "STREAMCONV_TEST_PAUSE_CONTINUE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not marker.exists():  # the run's own progress decides when
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.005)
    crashpoints.wait_stopped(proc.pid)
    shard = sorted(model.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10  # dd conv=notrunc: same size, same header, another value
    with open(shard, "r+b") as f:
        f.write(data)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "changed during the conversion" in err and shard.name in err, err
    assert not (out / ITER / ".metadata").exists() and not (out / "latest_checkpointed_iteration.txt").exists()


# --------------------------------------------------------------------- 12-14, 17. what describes the model

def _edit_run_config(out: Path, edit) -> None:
    path = out / ITER / "run_config.yaml"
    text = path.read_text()
    path.write_text(edit(text))


@pytest.mark.parametrize("value, field", [
    ('"x"', "kv_channels"),  # a string: kv_channels * heads would make a gigabyte string
    ("!!python/name:os.system", None),  # not even loadable by safe_load: refused as unreadable
    ("1" * 5000, None),  # a 5,000-digit integer: not a YAML number Python reads
    ("0.5", "kv_channels"),
], ids=["string", "python-tag", "huge", "float"])
def test_a_crafted_size_in_run_config_is_one_line(converted, tmp_path, capsys, value, field):
    _, out = private_copy(converted, tmp_path)
    _edit_run_config(out, lambda t: t.replace("  kv_channels: 16\n", f"  kv_channels: {value}\n"))
    capsys.readouterr()
    rc = main(["mcore2hf", "--megatron-path", str(out), "--hf-path", str(tmp_path / "hf"), "--quiet"])
    err = lines(capsys.readouterr().err)
    assert rc == 3 and len(err) == 1 and "internal error" not in err[0], err
    if field:
        assert f"model.{field}" in err[0], err


def test_an_alias_bomb_in_run_config_is_refused_before_it_expands(converted, tmp_path, capsys):
    _, out = private_copy(converted, tmp_path)
    bomb = "".join(f"b{i}: &b{i + 1} [*b{i}, *b{i}, *b{i}, *b{i}]\n" for i in range(40))
    _edit_run_config(out, lambda t: "b0: &b0 [x]\n" + bomb.replace("b0: &b1 [*b0", "b0x: &b1 [*b0")
                     .replace("&b0 [x]", "&b0 [x]") + t.replace("  seq_length: 4096\n", "  seq_length: *b40\n"))
    capsys.readouterr()
    rc = main(["mcore2hf", "--megatron-path", str(out), "--hf-path", str(tmp_path / "hf"), "--quiet"])
    err = lines(capsys.readouterr().err)
    assert rc == 3 and len(err) == 1 and "model.seq_length" in err[0], err
    assert not (tmp_path / "hf" / "config.json").exists()


def test_a_common_state_naming_many_unknown_globals_is_refused(tmp_path):
    """Each unknown global becomes an inert stand-in, interned by name and bounded in number."""
    import pickletools  # noqa: F401  (the opcodes below are plain protocol-2 pickle)

    from streamconv.errors import BadInputError
    from streamconv.formats import megatron_args

    ops = [b"\x80\x02", b"]"]  # PROTO 2, EMPTY_LIST
    for i in range(megatron_args.MAX_FOREIGN + 10):
        ops.append(f"cmod{i}\nName\n".encode() + b")R" + b"a")  # GLOBAL, EMPTY_TUPLE, REDUCE, APPEND
    ops.append(b".")
    with pytest.raises(BadInputError, match="unknown globals"):
        megatron_args.unpickle(b"".join(ops), tmp_path / "common.pt")
    same = [b"\x80\x02", b"]"] + [b"cmod\nName\n)Ra"] * 5000 + [b"."]
    objs = megatron_args.unpickle(b"".join(same), tmp_path / "common.pt")
    assert len(objs) == 5000 and len({type(o) for o in objs}) == 1


# --------------------------------------------------------------------- 17. a float64 source is refused at planning

def test_a_float64_source_is_refused_before_anything_is_written(tmp_path, capsys):
    src = make_checkpoint(tmp_path / "hf", llama_config(), seed=2, shards=1, dtype=torch.float64)
    capsys.readouterr()
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(tmp_path / "out"), "--quiet"]) == 3
    err = lines(capsys.readouterr().err)
    assert len(err) == 1 and "float64" in err[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.distcp"))


# --------------------------------------------------------------------- 3. symlinked folders inside an output

def test_a_resume_never_writes_through_a_symlinked_folder(converted, tmp_path, capsys):
    src, out = private_copy(converted, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (out / ITER).rename(elsewhere)
    (elsewhere / "keep.partial").write_text("mine")
    (out / ITER).symlink_to(elsewhere)
    before = {p.name: p.stat().st_mtime_ns for p in elsewhere.iterdir()}
    capsys.readouterr()
    rc = main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(out), "--quiet", "--max-memory", "256KiB"])
    err = lines(capsys.readouterr().err)
    assert rc == 4 and len(err) == 1 and "symlinked folder" in err[0], err
    assert {p.name: p.stat().st_mtime_ns for p in elsewhere.iterdir()} == before
    assert (elsewhere / "keep.partial").read_text() == "mine"


# --------------------------------------------------------------------- 17. more inputs that were "internal error"

def test_an_output_path_that_is_a_symlink_loop_is_one_line(converted, tmp_path, capsys):
    src, out = converted
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    capsys.readouterr()
    assert main(["hf2mcore", "--hf-model", str(src), "--megatron-path", str(tmp_path / "a"), "--quiet"]) == 2
    assert main(["mcore2hf", "--megatron-path", str(out), "--hf-path", str(tmp_path / "a"), "--quiet"]) == 2
    err = lines(capsys.readouterr().err)
    assert len(err) == 2 and all("do not resolve" in e for e in err), err


def test_generate_with_an_hf_model_folder_without_a_tokenizer_is_one_line(converted, tmp_path, capsys):
    pytest.importorskip("transformers")
    _, out = private_copy(converted, tmp_path)
    shutil.rmtree(out / ITER / "tokenizer", ignore_errors=True)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((converted[0] / "config.json").read_text())
    capsys.readouterr()
    rc = main(["generate", "--megatron-path", str(out), "--hf-model", str(bare), "--prompt", "hi", "--quiet"])
    err = lines(capsys.readouterr().err)
    assert rc == 3 and len(err) == 1 and "no tokenizer files" in err[0], err


@pytest.mark.parametrize("craft", ["complex64", "layout", "huge-shape"])
def test_a_crafted_element_type_or_shape_in_metadata_is_one_line(converted, tmp_path, capsys, craft):
    src, out = private_copy(converted, tmp_path)
    ckpt = out / ITER
    meta = load_metadata(ckpt)
    md = meta.state_dict_metadata["decoder.final_layernorm.weight"]
    if craft == "complex64":
        md.properties.dtype = torch.complex64
    elif craft == "layout":
        md.properties.dtype = torch.strided
    else:
        md.size = torch.Size([2 ** 2000])
    save_metadata(ckpt, meta)
    for args in (["inspect", str(out)], ["verify", "--hf-model", str(src), "--megatron-path", str(out), "--quiet"],
                 ["mcore2hf", "--megatron-path", str(out), "--hf-path", str(tmp_path / "hf"), "--quiet"]):
        capsys.readouterr()
        assert main(args) == 3, args
        err = lines(capsys.readouterr().err)
        assert len(err) == 1 and "decoder.final_layernorm.weight" in err[0], (args, err)


# --------------------------------------------------------------------- 8. generate builds the model it checked

@pytest.mark.parametrize("vocab", [2_000_000, 600])
def test_generate_refuses_a_config_that_does_not_describe_the_stored_tensors(converted, tmp_path, capsys, vocab):
    """run_config.yaml says another vocabulary than the 1024 rows stored: megatron-core would size (2,000,000)
    or load (600, with allow_shape_mismatch) another model. Refused before anything is built."""
    pytest.importorskip("megatron.core")
    _, out = private_copy(converted, tmp_path)
    _edit_run_config(out, lambda t: t.replace("  vocab_size: 1024\n", f"  vocab_size: {vocab}\n"))
    capsys.readouterr()
    rc = main(["generate", "--megatron-path", str(out), "--prompt", "hi", "--max-new-tokens", "1", "--quiet",
               "--max-memory", "100MiB"])
    err = lines(capsys.readouterr().err)
    assert rc == 3 and len(err) == 1 and "embedding.word_embeddings.weight" in err[0], err


# --------------------------------------------------------------------- 7. --recheck reads the kept output back

def _killed_half_way(tmp_path):
    """A conversion SIGKILLed once several files are committed and a ``.partial`` holds journaled chunks;
    returns the model, the output, the plan's item slots and the journal's records."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from streamconv.inputs import chunk_bytes_for, import_plan_for
    from streamconv.models.config import load_config, spec_from_config
    from streamconv.sinks.torch_dist import item_slots
    from streamconv.sources.safetensors import SafetensorsSource

    model = make_checkpoint(tmp_path / "hf", llama_config(), seed=2, shards=2)
    out = tmp_path / "out"
    marker = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(model),
                             "--megatron-path", str(out), *RECHECK_SMALL, "--workers", "1"],
                            env={**os.environ, "STREAMCONV_TEST_PAUSE": "chunk:9",
                                 "STREAMCONV_TEST_PAUSE_FILE": str(marker)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not marker.exists():  # the run's own progress decides when
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    source = SafetensorsSource(model)
    plan = import_plan_for(source, spec_from_config(load_config(model)), None, chunk_bytes_for(64 * 1024),
                           file_bytes=40 * 1024)
    source.close()
    slots, _, _ = item_slots(plan)
    records = [json.loads(x) for x in (out / ".streamconv" / "journal.jsonl").read_text().splitlines() if x]
    return model, out, plan, slots, records


RECHECK_SMALL = ["--max-memory", "64KiB", "--distcp-size", "40KiB", "--quiet"]


def _resume(model, out, *args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "streamconv", "hf2mcore", "--hf-model", str(model),
                           "--megatron-path", str(out), *RECHECK_SMALL, *args], capture_output=True, text=True)


def _flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("damage", ["committed", "partial", "forged"])
def test_recheck_reads_the_kept_output_back_and_redoes_what_differs(tmp_path, damage, capsys):
    """A byte flipped in a committed ``.distcp``, one in a journaled chunk of a ``.partial``, a chunk record
    forged for a hole: a plain resume trusts them (exit 0, ``verify`` finds the damage: what docs/resume.md
    says it trusts); ``--recheck`` reads the kept output back, redoes what differs, and the output is right."""
    import json

    from streamconv.formats.names import distcp_name

    model, out, plan, slots, records = _killed_half_way(tmp_path)
    ckpt = out / ITER
    committed = [r for r in records if r["t"] == "file"]
    file_of = {c.id: c.file for c in plan.chunks}
    partial_files = {p.name for p in ckpt.glob("*.partial")}
    journaled = [(r["key"], tuple(r["offsets"])) for r in records if r["t"] == "chunk"]
    in_partial = [cid for cid in journaled if distcp_name(file_of[cid]) + ".partial" in partial_files]
    assert committed and in_partial, records  # the kill left both kinds of kept bytes
    if damage == "committed":
        key, offsets, *_ = committed[0]["items"][0]
        _flip(ckpt / distcp_name(committed[0]["file"]), slots[(key, tuple(offsets))][1] + 3)
    elif damage == "partial":
        cid = in_partial[0]
        _flip(ckpt / (distcp_name(file_of[cid]) + ".partial"), slots[cid][1] + 3)
    else:  # a record for a chunk whose place is a hole: its CRC is the one of zeros, so only the framing differs
        from streamconv.files.checksum import crc32

        f = file_of[in_partial[-1]]
        hole = next(c for c in reversed(plan.chunks) if c.file == f and c.id not in journaled)
        path = ckpt / (distcp_name(f) + ".partial")
        item_at, data_at = slots[hole.id]
        nbytes = hole.nbytes
        with open(path, "r+b") as fh:  # a hole, whatever an in-flight thread wrote there
            fh.seek(item_at)
            fh.write(bytes(data_at - item_at + nbytes + 512))
        with open(out / ".streamconv" / "journal.jsonl", "a") as fh:
            fh.write(json.dumps({"t": "chunk", "key": hole.key, "offsets": list(hole.offsets),
                                 "crc32": crc32(bytes(nbytes))}) + "\n")
    plain = Path(shutil.copytree(out, tmp_path / "plain", symlinks=True))
    assert _resume(model, plain).returncode == 0
    assert main(["verify", "--hf-model", str(model), "--megatron-path", str(plain), "--quiet"]) == 5
    r = _resume(model, out, "--recheck", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["output_chunks_redone"] >= 1 and summary["output_rechecked_chunks"] >= len(journaled) - 1
    assert summary["output_rechecked_bytes"] > 0
    assert main(["verify", "--hf-model", str(model), "--megatron-path", str(out), "--quiet"]) == 0
    r = _resume(model, out, "--recheck", "--json")  # a finished folder rechecks clean
    assert r.returncode == 0 and json.loads(r.stdout)["output_chunks_redone"] == 0, r.stderr


def test_a_committed_file_whose_record_lies_about_its_items_is_redone(tmp_path):
    """A ``file`` record whose items are not where the plan lays them (a forged or foreign record) is not
    trusted even by a plain resume: the file is written again, and ``.metadata`` records the plan's offsets."""
    import json

    model, out, plan, slots, records = _killed_half_way(tmp_path)
    journal = out / ".streamconv" / "journal.jsonl"
    forged = []
    for r in records:
        if r["t"] == "file" and not forged:
            r["items"][0][2] += 8
            forged.append(r["file"])
        journal_line = json.dumps(r)
        r.clear()
        r["line"] = journal_line
    assert forged
    journal.write_text("".join(r["line"] + "\n" for r in records))
    r = _resume(model, out, "--json")
    assert r.returncode == 0, r.stderr
    assert main(["verify", "--hf-model", str(model), "--megatron-path", str(out), "--quiet"]) == 0


# --------------------------------------------------------------------- 15. what .metadata may build is bounded

_MEASURED = ("import os, subprocess, sys\n"
             "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
             "err = p.stderr.read()\n"
             "_, status, usage = os.wait4(p.pid, 0)\n"
             "sys.stderr.buffer.write(err)\n"
             "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)\n")


def _peak_rss(*args) -> tuple[int, str, int]:
    """(exit code, stderr, peak resident bytes) of one streamconv process. Started by a small Python process:
    a child's peak counts its parent's memory before the ``exec`` (``vfork``), and pytest's is large."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _MEASURED, sys.executable, "-m", "streamconv", *map(str, args)],
                       capture_output=True, text=True)
    rc, kib = map(int, r.stdout.split())
    return rc, r.stderr, kib * 1024


@pytest.mark.parametrize("bomb", ["objects", "bytes"])
def test_what_metadata_builds_is_bounded_by_max_memory(converted, tmp_path, bomb):
    """A ``.metadata`` of 16 MiB of empty dicts builds ~1.1 GB of objects, one 80 MiB string 80 MiB: under
    --max-memory 64MiB every reader stops at about 64 MiB (one line, exit 3), whatever the file's size."""
    import struct

    src, out = private_copy(converted, tmp_path)
    legit = {}
    for command in ("inspect", "verify", "mcore2hf"):
        args = {"inspect": [out], "verify": ["--hf-model", src, "--megatron-path", out],
                "mcore2hf": ["--megatron-path", out, "--hf-path", tmp_path / "hf-ok"]}[command]
        rc, err, legit[command] = _peak_rss(command, *args, "--max-memory", "64MiB", "--quiet")
        assert rc == 0, err
    meta = out / ITER / ".metadata"
    with open(meta, "wb") as f:
        if bomb == "objects":
            f.write(b"\x80\x04](")
            for _ in range(16):
                f.write(b"}" * (1 << 20))
            f.write(b"e.")
        else:
            f.write(b"\x80\x04X" + struct.pack("<I", 80 << 20))
            for _ in range(80):
                f.write(b"a" * (1 << 20))
            f.write(b".")
    for command in ("inspect", "verify", "mcore2hf"):
        args = {"inspect": [out], "verify": ["--hf-model", src, "--megatron-path", out],
                "mcore2hf": ["--megatron-path", out, "--hf-path", tmp_path / "hf-bomb"]}[command]
        rc, err, peak = _peak_rss(command, *args, "--max-memory", "64MiB", "--quiet")
        assert rc == 3 and len(err.strip().splitlines()) == 1, err
        assert "reading it would take more than 64.0 MiB of memory" in err and "--max-memory" in err, err
        assert peak < legit[command] + (64 + 48 << 20), (command, peak, legit[command])


# --------------------------------------------------------------------- a file the user may not read

def _without_read_override() -> list[str]:
    """The command prefix that makes a process unable to read a file its mode denies: none for a plain user;
    for root, ``setpriv`` dropping the capabilities that bypass file modes (skips where there is none)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a file's mode cannot deny a read")
    drop = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}"]


def test_a_file_without_read_permission_is_one_line(converted, tmp_path):
    """A shard, a ``.distcp`` or ``.metadata`` this user may not read: one line naming it and why, exit 3,
    and no output left behind."""
    import subprocess
    import sys

    prefix = _without_read_override()
    src, out = private_copy(converted, tmp_path)
    model = Path(shutil.copytree(src, tmp_path / "hf"))

    def run(*args):
        return subprocess.run([*prefix, sys.executable, "-m", "streamconv", *map(str, args), "--quiet"],
                              capture_output=True, text=True)

    shard = sorted(model.glob("*.safetensors"))[-1]
    shard.chmod(0)
    for r in (run("hf2mcore", "--hf-model", model, "--megatron-path", tmp_path / "new"), run("inspect", model)):
        assert r.returncode == 3 and lines(r.stderr) == r.stderr.strip().splitlines(), r.stderr
        assert shard.name in r.stderr and "Permission denied" in r.stderr, r.stderr
    assert not (tmp_path / "new").exists()
    item = out / ITER / "__0_0.distcp"
    item.chmod(0)
    r = run("mcore2hf", "--megatron-path", out, "--hf-path", tmp_path / "back")
    assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert item.name in r.stderr and "permissions" in r.stderr and "incomplete" not in r.stderr, r.stderr
    assert not any((tmp_path / "back").glob("*.safetensors"))
    (out / ITER / ".metadata").chmod(0)
    r = run("inspect", out)
    assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1 and "Permission denied" in r.stderr, r.stderr
