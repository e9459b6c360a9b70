"""The teacher's SHA-256, hashed ahead by the command line while torch is imported (digests)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from helpers import make_hf_model
from n2n_cli import digests
from n2n_cli.hf_io import open_hf_dir

ROOT = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_digest_computed_ahead_is_used_while_the_file_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "BLOCK", 4096)
    f, empty = tmp_path / "w.bin", tmp_path / "empty.bin"
    f.write_bytes(os.urandom(3 * digests.BLOCK + 5))  # several blocks and a partial one
    empty.write_bytes(b"")
    digests.prefetch([f, empty]).join()
    calls = []
    real = digests._sha256
    monkeypatch.setattr(digests, "_sha256", lambda p: calls.append(p) or real(p))
    assert digests.file_sha256(f) == _sha(f) and digests.file_sha256(empty) == _sha(empty) and calls == []
    # a second prefetch of the same file does not hash it again
    assert digests.prefetch([f]) is None


def test_a_file_changed_after_it_was_hashed_ahead_is_hashed_again(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    digests.prefetch([f]).join()
    f.write_bytes(b"b" * 1000)  # same size; new contents, new mtime/ctime
    os.utime(f, ns=(1, 1))  # even a modification time set back: the change time still moves
    assert digests.file_sha256(f) == _sha(f) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_a_file_that_cannot_be_read_ahead_is_reported_when_asked(tmp_path):
    f = tmp_path / "gone.bin"
    f.write_bytes(b"x")
    thread = digests.prefetch([f, tmp_path / "never-there.bin"])
    thread.join()
    f.unlink()
    try:
        digests.file_sha256(f)
    except FileNotFoundError:
        pass
    else:
        raise AssertionError("a file deleted after hashing ahead must not keep its digest")


def test_model_files_are_the_ones_the_manifest_hashes(tmp_path):
    src = make_hf_model(tmp_path, "llama")
    names = sorted(p.name for p in digests.model_files(src))
    assert names == ["config.json", "model.safetensors"]
    # sharded: config, index, and the shards the index names (nothing outside the directory)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((src / "config.json").read_text())
    with safe_open(str(src / "model.safetensors"), "pt") as sf:
        keys = list(sf.keys())
    (sharded / "a.safetensors").write_bytes(b"1")
    (sharded / "b.safetensors").write_bytes(b"2")
    (tmp_path / "outside.safetensors").write_bytes(b"3")
    weight_map = {k: ("a.safetensors" if i % 2 else "b.safetensors") for i, k in enumerate(keys)}
    weight_map["x"] = "../outside.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert sorted(p.name for p in digests.model_files(sharded)) == [
        "a.safetensors", "b.safetensors", "config.json", "model.safetensors.index.json"]
    (sharded / "model.safetensors.index.json").write_text("{not json")
    assert [p.name for p in digests.model_files(sharded)] == ["config.json"]
    assert digests.model_files(tmp_path / "nothing") == []
    one = tmp_path / "one.safetensors"
    one.write_bytes(b"0")
    assert digests.model_files(one) == [one]


def test_the_lineage_holds_the_real_digest_when_the_cli_hashed_ahead(tmp_path):
    """End to end in a fresh process (where the hashing really starts before torch is imported):
    the recorded teacher digest is the sha256sum-style manifest of the teacher's files."""
    src = make_hf_model(tmp_path, "llama")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "n2n_cli", "deepen", str(src), str(out), "--layers", "3",
                        "--no-verify", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    manifest = "".join(f"{_sha(src / n)}  {n}\n" for n in ["config.json", "model.safetensors"])
    with safe_open(str(out / "model.safetensors"), "pt") as sf:
        lineage = json.loads(sf.metadata()["n2n_lineage"])
    assert lineage[-1]["teacher_sha256"] == hashlib.sha256(manifest.encode()).hexdigest() \
        == open_hf_dir(src).sha256()


def test_model_files_never_raise(tmp_path):
    """Whatever is wrong with the input is the library's to report, with its own message and exit
    code: the hashing ahead only skips it."""
    assert digests.model_files(tmp_path / ("x" * 300)) == []
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "y" * 300 + ".safetensors", "b": "nul\0.safetensors", "c": 5}}))
    assert sorted(p.name for p in digests.model_files(d)) == ["config.json", "model.safetensors.index.json"]
