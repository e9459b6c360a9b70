"""Hugging Face model directories: reading (HFDirSource), writing (write_hf_dir), checks."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from n2n_cli import hf_io
from n2n_cli.errors import CheckpointError, OutputError, UserError
from n2n_cli.hf_io import (check_output_dir, copied_files, open_hf_dir, parse_size, plan_shards,
                           write_hf_dir)

CONFIG = {"model_type": "toy", "hidden_size": 4, "architectures": ["Toy"]}


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(10, 4, generator=g),
        "layers.0.weight": torch.randn(4, 4, generator=g).to(torch.float16),
        "layers.0.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        "layers.1.weight": torch.randn(4, 4, generator=g),
        "step": torch.tensor([7], dtype=torch.int64),
    }


def make_dir(path: Path, config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or CONFIG))
    return path


def make_sharded(path: Path, sd: dict[str, torch.Tensor], split: dict[str, list[str]],
                 weight_map: dict[str, str] | None = None) -> Path:
    """Shards by hand: ``split`` maps shard file -> keys; the index lists ``weight_map``."""
    make_dir(path)
    for shard, keys in split.items():
        save_file({k: sd[k] for k in keys}, str(path / shard), metadata={"format": "pt", "shard": shard})
    wm = weight_map or {k: shard for shard, keys in split.items() for k in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": wm}))
    return path


SPLIT = {"model-00001-of-00002.safetensors": ["embed.weight", "layers.0.weight"],
         "model-00002-of-00002.safetensors": ["layers.0.bias", "layers.1.weight", "step"]}


def assert_same(src, sd: dict[str, torch.Tensor]) -> None:
    assert sorted(src.keys()) == sorted(sd)
    for k, v in sd.items():
        assert src.shape(k) == tuple(v.shape) and src.dtype(k) == v.dtype
        assert torch.equal(src.get(k), v), k


def message(exc_info) -> str:
    return str(exc_info.value)


# --------------------------------------------------------------------------- reading


def test_single_safetensors(tmp_path):
    d = make_dir(tmp_path / "m")
    sd = tensors()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt", "x": "1"})
    with open_hf_dir(d) as src:
        assert src.path == d and src.config == CONFIG
        assert src.metadata == {"format": "pt", "x": "1"}
        assert src.weight_files() == ["model.safetensors"] and src.index_file is None
        assert_same(src, sd)
        manifest = "".join(f"{hashlib.sha256((d / n).read_bytes()).hexdigest()}  {n}\n"
                           for n in ["config.json", "model.safetensors"])
        assert src.sha256() == hashlib.sha256(manifest.encode()).hexdigest()
        digest = src.sha256()
    (d / "config.json").write_text(json.dumps({**CONFIG, "hidden_size": 5}))
    (d / "README.md").write_text("not part of the digest")
    assert open_hf_dir(d).sha256() != digest


def test_sharded_safetensors_reads_lazily(tmp_path):
    sd = tensors()
    d = make_sharded(tmp_path / "m", sd, SPLIT)
    src = open_hf_dir(d)
    assert src.keys() == [k for keys in SPLIT.values() for k in keys]  # index order
    assert src.weight_files() == sorted(SPLIT)
    assert src.index_file == "model.safetensors.index.json"
    assert src.metadata == {"format": "pt", "shard": "model-00001-of-00002.safetensors"}
    assert src._open == {}  # nothing opened until a tensor is read
    assert torch.equal(src.get("step"), sd["step"])
    assert list(src._open) == ["model-00002-of-00002.safetensors"]
    assert_same(src, sd)
    src.close()
    assert torch.equal(src.get("embed.weight"), sd["embed.weight"])  # reopens after close
    assert len(src.sha256()) == 64


def test_unlisted_tensors_in_a_shard_are_ignored(tmp_path):
    sd = tensors()
    wm = {"embed.weight": "model-00001-of-00002.safetensors", "step": "model-00002-of-00002.safetensors"}
    src = open_hf_dir(make_sharded(tmp_path / "m", sd, SPLIT, weight_map=wm))
    assert src.keys() == ["embed.weight", "step"]


def test_pytorch_bin_single_and_sharded(tmp_path):
    sd = tensors()
    d = make_dir(tmp_path / "bin")
    torch.save(sd, d / "pytorch_model.bin")
    src = open_hf_dir(d)
    assert src.metadata == {} and src.weight_files() == ["pytorch_model.bin"]
    assert_same(src, sd)

    d = make_dir(tmp_path / "binsharded")
    wm = {}
    for i, keys in enumerate(SPLIT.values()):
        torch.save({k: sd[k] for k in keys}, d / f"pytorch_model-{i}.bin")
        wm.update({k: f"pytorch_model-{i}.bin" for k in keys})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    src = open_hf_dir(d)
    assert src.weight_files() == ["pytorch_model-0.bin", "pytorch_model-1.bin"]
    assert_same(src, sd)


class Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_pytorch_bin_never_runs_code(tmp_path):
    d = make_dir(tmp_path / "m")
    torch.save({"w": torch.zeros(1), "evil": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        open_hf_dir(d)
    assert "refusing to load" in message(e) and "pytorch_model.bin" in message(e)


def test_safetensors_preferred_over_bin(tmp_path):
    d = make_dir(tmp_path / "m")
    save_file({"a": torch.ones(2)}, str(d / "model.safetensors"))
    torch.save({"b": torch.ones(2)}, d / "pytorch_model.bin")
    assert open_hf_dir(d).keys() == ["a"]


def test_unsupported_dtype(tmp_path):
    d = make_dir(tmp_path / "m")
    save_file({"a": torch.zeros(2, dtype=torch.float8_e4m3fn), "b": torch.ones(1)}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        open_hf_dir(d)
    assert f"{d / 'model.safetensors'}: tensors of a dtype n2n does not support" in message(e)
    assert "'a' has dtype F8_E4M3" in message(e)


def test_not_a_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        open_hf_dir(tmp_path / "f")


def test_no_config(tmp_path):
    (tmp_path / "m").mkdir()
    save_file({"a": torch.ones(1)}, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        open_hf_dir(tmp_path / "m")
    assert f"{tmp_path / 'm'}: no config.json" in message(e) and "save_pretrained" in message(e)


@pytest.mark.parametrize("text,expected", [("{not json", "config.json is not valid JSON"),
                                           ("[1, 2]", "config.json must be a JSON object, found list")])
def test_bad_config(tmp_path, text, expected):
    d = make_dir(tmp_path / "m")
    (d / "config.json").write_text(text)
    with pytest.raises(CheckpointError) as e:
        open_hf_dir(d)
    assert f"{d / 'config.json'}: {expected}" in message(e)


def test_no_weights_lists_what_was_looked_for(tmp_path):
    d = make_dir(tmp_path / "m")
    (d / "weights.safetensors").write_text("")
    with pytest.raises(CheckpointError) as e:
        open_hf_dir(d)
    assert f"{d}: no weights file" in message(e)
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        assert f"looked for {name}" in message(e)


def test_corrupt_shard(tmp_path):
    d = make_dir(tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x01\x02garbage")
    with pytest.raises(CheckpointError) as e:
        open_hf_dir(d)
    assert f"{d / 'model.safetensors'}: not a readable safetensors file" in message(e)


@pytest.mark.parametrize("text,expected", [
    ("{oops", "the index is not valid JSON"),
    ("[]", "the index must be a JSON object"),
    ('{"metadata": {}}', "the index has no 'weight_map'"),
    ('{"weight_map": ["a"]}', "the index has no 'weight_map'"),
    ('{"weight_map": {"a": 3}}', "the index has no 'weight_map'"),
    ('{"weight_map": {}}', "the index has no 'weight_map'"),
])
def test_bad_index(tmp_path, text, expected):
    d = make_dir(tmp_path / "m")
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError) as e:
        open_hf_dir(d)
    assert f"{d / 'model.safetensors.index.json'}: {expected}" in message(e)


def test_missing_shards_are_all_listed(tmp_path):
    sd = tensors()
    d = make_sharded(tmp_path / "m", sd, SPLIT)
    for shard in SPLIT:
        (d / shard).unlink()
    with pytest.raises(CheckpointError) as e:
        open_hf_dir(d)
    assert "2 shard file(s) listed in the index are missing" in message(e)
    for shard in SPLIT:
        assert f"missing {shard}" in message(e)
    assert "Download or copy every shard" in message(e)


@pytest.mark.parametrize("kind", ["absolute", "dotdot"])
def test_shard_escaping_the_directory(tmp_path, kind):
    outside = tmp_path / "outside.safetensors"
    save_file({"a": torch.ones(1)}, str(outside))
    d = make_dir(tmp_path / "m")
    name = {"absolute": str(outside), "dotdot": "../outside.safetensors"}[kind]
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": name}}))
    with pytest.raises(CheckpointError) as e:
        open_hf_dir(d)
    assert "names shard files outside the model directory; refusing to read them" in message(e)
    assert f"'{name}' -> {outside}" in message(e)


@pytest.mark.parametrize("target", ["inside", "cache-blobs-outside"])
def test_shard_that_is_a_symlink_is_followed(tmp_path, target):
    """Like the Hugging Face cache: snapshots/<rev>/model-1.safetensors -> ../../blobs/<hash>."""
    d = make_dir(tmp_path / "snapshots" / "rev")
    blobs = (d / "blobs") if target == "inside" else (tmp_path / "blobs")
    blobs.mkdir()
    save_file({"a": torch.ones(1)}, str(blobs / "x"))
    (d / "model-1.safetensors").symlink_to(blobs / "x")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    assert torch.equal(open_hf_dir(d).get("a"), torch.ones(1))


def test_index_key_not_in_its_shard(tmp_path):
    sd = tensors()
    wm = {k: shard for shard, keys in SPLIT.items() for k in keys}
    wm["step"] = "model-00001-of-00002.safetensors"
    wm["ghost"] = "model-00002-of-00002.safetensors"
    d = make_sharded(tmp_path / "m", sd, SPLIT, weight_map=wm)
    with pytest.raises(CheckpointError) as e:
        open_hf_dir(d)
    assert f"{d / 'model.safetensors.index.json'}: the index lists tensors that are not in their shard" in message(e)
    assert "'step' is not in model-00001-of-00002.safetensors" in message(e)
    assert "'ghost' is not in model-00002-of-00002.safetensors" in message(e)


# --------------------------------------------------------------------------- parse_size


@pytest.mark.parametrize("text,expected", [
    ("5GB", 5 * 10**9), ("5GiB", 5 * 2**30), ("500MB", 500 * 10**6), ("100KB", 100_000), ("1GiB", 2**30),
    ("2MiB", 2 * 2**20), ("3KiB", 3072), ("1TB", 10**12), ("1234", 1234), (1234, 1234), (" 5 gb ", 5 * 10**9 // 8),
    ("5gib", 5 * 2**30), ("8Mb", 10**6), ("5Gb", 5 * 10**9 // 8),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5XB", "1.5GB", "-5", "0", "5 G B", "5G", 0, -3])
def test_parse_size_rejects(text):
    with pytest.raises(UserError) as e:
        parse_size(text)
    assert "--max-shard-size" in message(e) and "5GB" in message(e)


# --------------------------------------------------------------------------- writing


def entries_of(sd: dict[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_plan_shards():
    e = [(k, torch.uint8, (n,)) for k, n in [("a", 4), ("b", 4), ("c", 20), ("d", 3), ("e", 6), ("f", 0)]]
    assert [[x[0] for x in s] for s in plan_shards(e, 10)] == [["a", "b"], ["c"], ["d", "e", "f"]]
    assert len(plan_shards(e, 37)) == 1 and len(plan_shards(e, 36)) == 2
    assert plan_shards([], 10) == [[]]


def make_src_dir(path: Path) -> Path:
    d = make_dir(path)
    save_file({"old": torch.ones(1)}, str(d / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md", "vocab.txt"):
        (d / name).write_text(f"contents of {name}\n")
    for name in ("pytorch_model.bin", "model.safetensors.index.json", "extra.pt", "tf_model.h5",
                 "flax_model.msgpack", "x.ckpt", "y.pth", ".gitattributes"):
        (d / name).write_text("weights")
    (d / "original").mkdir()
    (d / "original" / "consolidated.00.pth").write_text("weights")
    (tmp := path.parent / "blob").write_text("linked\n")
    (d / "merges.txt").symlink_to(tmp)  # like the HF cache, whose files are symlinks
    return d


def test_copied_files_rule(tmp_path):
    d = make_src_dir(tmp_path / "src")
    assert copied_files(d) == ["README.md", "generation_config.json", "merges.txt", "tokenizer.json",
                               "tokenizer_config.json", "vocab.txt"]


def test_round_trip_sharded(tmp_path):
    sd = tensors()
    src = make_src_dir(tmp_path / "src")
    out = tmp_path / "out"
    seen: list[str] = []
    names = write_hf_dir(out, entries_of(sd), sd.__getitem__, config={"b": 1, "a": [1, 2]},
                         metadata={"n2n": "yes"}, src_dir=src, max_shard_size=72,
                         extra_files={"n2n_growth.yaml": "steps: []\n", "README.md": "grown\n"},
                         on_tensor=seen.append)
    # sizes: embed 160, layers.0.weight 32, layers.0.bias 8, layers.1.weight 64, step 8
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert seen == list(sd)
    assert listing(out) == sorted(["config.json", "model.safetensors.index.json", "n2n_growth.yaml", *names,
                                   "README.md", "generation_config.json", "merges.txt", "tokenizer.json",
                                   "tokenizer_config.json", "vocab.txt"])
    assert (out / "config.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert (out / "README.md").read_text() == "grown\n"
    assert (out / "merges.txt").read_text() == "linked\n" and not (out / "merges.txt").is_symlink()
    assert (out / "tokenizer.json").read_text() == "contents of tokenizer.json\n"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": 272}, "weight_map": {
        "embed.weight": names[0], "layers.0.weight": names[1], "layers.0.bias": names[1],
        "layers.1.weight": names[2], "step": names[2]}}
    text = (out / "model.safetensors.index.json").read_text()
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    loaded: dict[str, torch.Tensor] = {}
    for name in names:
        shard = load_file(str(out / name))
        assert not set(shard) & set(loaded)
        loaded.update(shard)
        with safe_open(str(out / name), "pt") as f:
            assert f.metadata() == {"format": "pt", "n2n": "yes"}
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], v) for k, v in sd.items())
    with open_hf_dir(out) as back:
        assert back.config == {"a": [1, 2], "b": 1}
        assert back.keys() == sorted(sd)  # the index's (sorted) order
        assert_same(back, sd)
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~hf_io.current_umask())


def test_single_file_when_it_fits(tmp_path):
    sd = tensors()
    out = tmp_path / "out"
    names = write_hf_dir(out, entries_of(sd), sd.__getitem__, config=CONFIG, metadata={"format": "pt"},
                         src_dir=None, max_shard_size=272)
    assert names == ["model.safetensors"] and listing(out) == ["config.json", "model.safetensors"]
    assert_same(open_hf_dir(out), sd)
    assert len(write_hf_dir(tmp_path / "o2", entries_of(sd), sd.__getitem__, config=CONFIG, metadata={},
                            src_dir=None, max_shard_size=271)) == 2


def test_big_tensor_gets_its_own_shard(tmp_path):
    sd = tensors()
    names = write_hf_dir(tmp_path / "out", entries_of(sd), sd.__getitem__, config=CONFIG, metadata={},
                         src_dir=None, max_shard_size=112)
    assert [sorted(load_file(str(tmp_path / "out" / n))) for n in names] == [
        ["embed.weight"], ["layers.0.bias", "layers.0.weight", "layers.1.weight", "step"]]


def test_deterministic(tmp_path):
    sd = tensors()
    src = make_src_dir(tmp_path / "src")
    for out in ("a", "b"):
        write_hf_dir(tmp_path / out, entries_of(sd), lambda k: sd[k].clone(), config=CONFIG,
                     metadata={"z": "1", "a": "2"}, src_dir=src, max_shard_size=100, extra_files={"s.yaml": "x"})
    assert listing(tmp_path / "a") == listing(tmp_path / "b")
    for name in listing(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.parametrize("failure,raised", [(RuntimeError("boom"), RuntimeError), (KeyboardInterrupt(), KeyboardInterrupt),
                                            (OSError(28, "No space left on device"), OutputError)])
def test_failure_leaves_nothing(tmp_path, failure, raised):
    sd = tensors()
    src = make_src_dir(tmp_path / "src")
    before = listing(tmp_path)

    def produce(key):
        if key == "layers.1.weight":
            raise failure
        return sd[key]

    with pytest.raises(raised):
        write_hf_dir(tmp_path / "out", entries_of(sd), produce, config=CONFIG, metadata={}, src_dir=src,
                     max_shard_size=70)
    assert listing(tmp_path) == before


def test_failure_keeps_the_old_output(tmp_path):
    sd = tensors()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")

    def produce(key):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_hf_dir(out, entries_of(sd), produce, config=CONFIG, metadata={}, src_dir=None, max_shard_size=70)
    assert listing(tmp_path) == ["out"] and listing(out) == ["keep"]


def test_existing_output_is_replaced(tmp_path):
    sd = tensors()
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale-00001-of-00009.safetensors").write_text("old")
    write_hf_dir(out, entries_of(sd), sd.__getitem__, config=CONFIG, metadata={}, src_dir=None,
                 max_shard_size=10**6)
    assert listing(tmp_path) == ["out"] and listing(out) == ["config.json", "model.safetensors"]


def test_writer_rejects_misuse(tmp_path):
    sd = tensors()
    e = entries_of(sd)
    kw = dict(config=CONFIG, src_dir=None, max_shard_size=100)
    with pytest.raises(ValueError, match="format 'pt'"):
        write_hf_dir(tmp_path / "o", e, sd.__getitem__, metadata={"format": "np"}, **kw)
    with pytest.raises(ValueError, match="duplicate"):
        write_hf_dir(tmp_path / "o", e + e[:1], sd.__getitem__, metadata={}, **kw)
    for bad in ("config.json", "a/b.txt", "w.safetensors", ".hidden"):
        with pytest.raises(ValueError, match="extra file name"):
            write_hf_dir(tmp_path / "o", e, sd.__getitem__, metadata={}, extra_files={bad: ""}, **kw)
    with pytest.raises(OutputError, match="cannot create a directory beside it"):
        write_hf_dir(tmp_path / "missing" / "o", e, sd.__getitem__, metadata={}, **kw)
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------- check_output_dir


def test_check_output_dir(tmp_path):
    src = make_dir(tmp_path / "src")
    assert check_output_dir(tmp_path / "new", src, force=False) == tmp_path / "new"
    cases = [
        (src, "the output is the input directory"),
        (src / "sub", "the output is inside the input directory"),
        (tmp_path, "the output contains the input directory"),
        (tmp_path / "missing" / "o", f"directory {tmp_path / 'missing'} does not exist"),
    ]
    for out, expected in cases:
        with pytest.raises(OutputError) as e:
            check_output_dir(out, src, force=True)
        assert f"{out}: {expected}" in message(e)
    (tmp_path / "link").symlink_to(src)
    with pytest.raises(OutputError, match="the output is the input directory"):
        check_output_dir(tmp_path / "link", src, force=True)
    (tmp_path / "old").mkdir()
    with pytest.raises(OutputError) as e:
        check_output_dir(tmp_path / "old", src, force=False)
    assert f"{tmp_path / 'old'}: already exists" in message(e) and "--force" in message(e)
    assert check_output_dir(tmp_path / "old", src, force=True) == tmp_path / "old"
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        check_output_dir(tmp_path / "file", None, force=True)


def test_check_output_dir_unwritable(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_io.fsutil, "dir_writable", lambda path: False)
    with pytest.raises(OutputError) as e:
        check_output_dir(tmp_path / "o", None, force=False)
    assert f"directory {tmp_path} is not writable" in message(e)


# --------------------------------------------------------------------------- transformers


def test_gpt2_loads_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    sd = model.state_dict()
    assert config.tie_word_embeddings and sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    del sd["lm_head.weight"]  # tied, as save_pretrained drops it
    out = tmp_path / "gpt2"
    names = write_hf_dir(out, entries_of(sd), sd.__getitem__, config=config.to_dict(), metadata={"format": "pt"},
                         src_dir=None, max_shard_size=40_000)
    assert len(names) > 2
    grown, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(grown.eval()(ids).logits, model(ids).logits)


def test_early_writeback_changes_when_not_what(tmp_path, monkeypatch):
    """write_safetensors starts write-back every WRITEBACK_BYTES (sync_file_range): same bytes
    with it, without it (a C library lacking the call), and called with growing offsets."""
    import torch
    from n2n_cli import checkpoints, fsutil

    tensors = {f"t{i}": torch.randn(300, 100, generator=torch.Generator().manual_seed(i)) for i in range(5)}
    entries = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    monkeypatch.setattr(checkpoints, "WRITEBACK_BYTES", 100_000)  # every tensor (120 kB each)
    calls = []
    real = fsutil.start_writeback
    monkeypatch.setattr(fsutil, "start_writeback", lambda fd, off, n: (calls.append((off, n)), real(fd, off, n)))
    checkpoints.write_safetensors(tmp_path / "a.safetensors", entries, tensors.__getitem__, {"format": "pt"})
    assert len(calls) == 5 and all(a[0] + a[1] == b[0] for a, b in zip(calls, calls[1:]))
    monkeypatch.setattr(fsutil, "start_writeback", real)
    monkeypatch.setattr(fsutil, "_sync_file_range_fn", False)  # unavailable: a no-op
    checkpoints.write_safetensors(tmp_path / "b.safetensors", entries, tensors.__getitem__, {"format": "pt"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
