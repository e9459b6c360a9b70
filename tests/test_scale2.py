"""Growth at disk speed in bounded memory (issue 8, second part): the input is read once, with
explicit reads (nothing mapped), checked for NaN/Inf as it is read, transformers' config check off
the critical path, and every refusal still leaves nothing written."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from helpers import make_hf_model  # noqa: E402
from n2n_cli import hf_io  # noqa: E402


def edit_config(src: Path, **kw):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(kw)
    (src / "config.json").write_text(json.dumps(cfg))


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))


def test_pread_reader_gives_safetensors_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g).to(torch.bfloat16), "b": torch.randn(7, generator=g),
               "c": torch.tensor(2.5, dtype=torch.float64), "d": torch.zeros(0, 4, dtype=torch.float16),
               "e": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text("{}")
    save_file(tensors, str(src / "model.safetensors"))
    source = hf_io.open_hf_dir(src)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        for k in tensors:
            got, want = source.get(k), f.get_tensor(k)
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), k
            assert bytes(got.reshape(-1).view(torch.uint8).numpy()) == bytes(want.reshape(-1).view(torch.uint8).numpy())
    source.close()
    assert source.get("b").shape == (7,)  # reopened on demand after close
    source.close()


def test_truncated_shard_is_a_checkpoint_error(tmp_path, cli):
    src = make_hf_model(tmp_path, "llama")
    source = hf_io.open_hf_dir(src)
    f = src / "model.safetensors"
    os.truncate(f, os.path.getsize(f) - 16)  # truncated after opening (validated header)
    from n2n_cli.errors import CheckpointError
    last = max(source.keys(), key=lambda k: source._span[k][0])
    with pytest.raises(CheckpointError, match="cannot read tensor"):
        source.get(last)
    # read in place (the NaN/Inf check of a copied tensor, the verifier's reads): an error, not a
    # SIGBUS from a mapping past the end of the file
    with pytest.raises(CheckpointError, match="shorter than its header says"):
        source.raw(last).all_finite()
    with pytest.raises(CheckpointError, match="shorter than its header says"):
        with source.raw(last).mapped():
            pass
    source.close()


def _poison(src: Path, key_part: str, value: float) -> str:
    """Set one entry of the first tensor whose name contains ``key_part`` to ``value``, in place."""
    f = src / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    key = next(k for k in header if key_part in k)
    assert header[key]["dtype"] == "F32"
    off = 8 + n + header[key]["data_offsets"][0]
    f.write_bytes(raw[:off] + struct.pack("<f", value) + raw[off + 4:])
    return key


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("part,value", [("layers.1.mlp.down_proj", float("nan")), ("norm.weight", float("inf"))])
def test_non_finite_teacher_refused_with_nothing_written(tmp_path, cli, verify, part, value):
    src = make_hf_model(tmp_path, "llama")
    key = _poison(src, part, value)
    out = tmp_path / "out"
    r = cli("deepen", src, out, "--layers", "3", *([] if verify else ["--no-verify"]))
    assert r.exit_code == 2, r.output
    assert "non-finite weights" in r.stderr and f"'{key}'" in r.stderr, r.stderr
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("args,message", [
    (["widen", "--dim", "num_attention_heads", "--to", "6"], "rejects the grown config.json"),
    (["deepen", "--layers", "3"], "rejects its config.json"),
])
def test_config_transformers_rejects_is_refused_without_verification(tmp_path, cli, args, message):
    """--no-verify checks the configs in a background thread; the refusal still comes before the
    output exists."""
    src = make_hf_model(tmp_path, "llama")
    if "rejects its" in message:
        edit_config(src, rms_norm_eps=5)  # transformers wants a float; n2n itself does not read it
    out = tmp_path / "out"
    r = cli(args[0], src, out, *args[1:], "--no-verify")
    assert r.exit_code == 2, r.output
    assert message in r.stderr, r.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def _tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def test_raw_copies_without_kernel_copy_give_the_same_bytes(tmp_path, cli, monkeypatch):
    """Pass-through tensors are copied with copy_file_range; where the kernel refuses, through a
    buffer (here a tiny one, so the chunking runs): the same files either way. The lineage holds
    the teacher's real digest (written as a placeholder first, patched after the data)."""
    from n2n_cli import checkpoints

    src = make_hf_model(tmp_path, "llama", dtype=torch.bfloat16)
    assert cli("deepen", src, tmp_path / "a", "--layers", "3", "--no-verify").exit_code == 0

    def refuse(*a, **k):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(checkpoints, "CHUNK", 64)
    assert cli("deepen", src, tmp_path / "b", "--layers", "3", "--no-verify").exit_code == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as sf:
        lineage = json.loads(sf.metadata()["n2n_lineage"])
    assert lineage[-1]["teacher_sha256"] == hf_io.open_hf_dir(src).sha256()
    a, t = _tensors(tmp_path / "a"), _tensors(src)
    assert torch.equal(a["model.layers.0.mlp.up_proj.weight"], t["model.layers.0.mlp.up_proj.weight"])


def test_deepen_copies_pass_through_tensors_as_bytes(tmp_path, cli, monkeypatch):
    """Every tensor a deepen only passes through (the teacher's own, and the inserted blocks'
    copies of them) goes from the input file to the output as bytes (RawSpan.copy_to), never
    decoded and re-encoded; only the inserted blocks' zeroed output projections are computed."""
    from n2n_cli import checkpoints

    src = make_hf_model(tmp_path, "llama", dtype=torch.bfloat16)
    copied = []
    real = checkpoints.RawSpan.copy_to

    def counting(self, out, buf):
        copied.append((self.offset, self.nbytes))
        return real(self, out, buf)

    monkeypatch.setattr(checkpoints.RawSpan, "copy_to", counting)
    assert cli("deepen", src, tmp_path / "a", "--layers", "3", "--no-verify").exit_code == 0
    t, a = _tensors(src), _tensors(tmp_path / "a")
    zeroed = [k for k, v in a.items() if k.endswith(("o_proj.weight", "down_proj.weight")) and not v.any()]
    assert len(zeroed) == 2  # the one inserted block's
    assert len(copied) == len(a) - len(zeroed) > len(t)


def test_patch_headers_refuses_a_missing_placeholder(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "x.safetensors"), metadata={"k": "?" * 64})
    hf_io.patch_headers(tmp_path, "?" * 64, "a" * 64, tmp_path)
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as sf:
        assert sf.metadata()["k"] == "a" * 64
    with pytest.raises(ValueError, match="occurs 0 times"):
        hf_io.patch_headers(tmp_path, "?" * 64, "b" * 64, tmp_path)


def test_bf16_intermediate_widening_by_two_is_exact_with_the_tile_mapping(tmp_path, cli):
    """Tile (the default for a multiple): every unit copied twice, the down projection's columns
    halved, which bf16 holds exactly: the student's weights are the teacher's, tiled, bit for bit,
    and the function is the same up to the order of summation (float64: ~1e-16). The random
    mapping copies some units 3 times, and w/3 rounds in bf16."""
    src = make_hf_model(tmp_path, "llama", dtype=torch.bfloat16)
    r = cli("widen", src, tmp_path / "tile", "--dim", "intermediate_size", "--factor", "2", "--no-verify")
    assert r.exit_code == 0 and "tile mapping: every unit copied x2" in r.output, r.output
    t, s = _tensors(src), _tensors(tmp_path / "tile")
    for i in range(2):
        w = t[f"model.layers.{i}.mlp.down_proj.weight"]
        d = s[f"model.layers.{i}.mlp.down_proj.weight"]
        assert d.dtype == torch.bfloat16 and torch.equal(d * 2, torch.cat([w, w], dim=1))
        u = t[f"model.layers.{i}.mlp.up_proj.weight"]
        assert torch.equal(s[f"model.layers.{i}.mlp.up_proj.weight"], torch.cat([u, u]))
    errors = {}
    for mapping in ("tile", "random"):
        r = cli("widen", src, tmp_path / f"v-{mapping}", "--dim", "intermediate_size", "--factor", "2",
                "--mapping", mapping, "--verify-dtype", "float64", "--json")
        assert r.exit_code == 0, r.output
        errors[mapping] = json.loads(r.stdout)["verification"]["exact"]["max_rel_error"]
    assert errors["tile"] < 1e-12 < 1e-6 < errors["random"], errors


def test_an_exact_bf16_widening_is_verified_at_float32_tolerances(tmp_path, cli):
    """Tolerances follow the tensors whose computation rounds: halving a bf16 column (tile x2)
    does not round, so the tile-widened student is held to float32's (1e-5, 1e-4), not to
    bf16's; the random mapping divides some columns by 3 and gets bf16's."""
    from n2n_cli import certify
    from n2n_cli.planner import Mapping

    assert certify._divides_exactly(Mapping("tile", 4, 8)) and certify._divides_exactly(Mapping("tile", 3, 12))
    assert not certify._divides_exactly(Mapping("tile", 4, 12))  # x3
    assert certify._divides_exactly(Mapping("tile", 3, 5))  # counts 2, 2, 1: each a power of two
    src = make_hf_model(tmp_path, "llama", dtype=torch.bfloat16)
    tol = {}
    for mapping in ("tile", "random"):
        r = cli("widen", src, tmp_path / mapping, "--dim", "intermediate_size", "--factor", "2", "--mapping", mapping,
                "--json")
        assert r.exit_code == 0, r.output
        v = json.loads(r.stdout)["verification"]["exact"]
        tol[mapping] = (v["atol"], v["rtol"])
    assert tol["tile"] == (1e-5, 1e-4) and tol["random"][1] > 1e-3, tol


def test_mapping_is_refused_where_it_does_not_apply(tmp_path, cli):
    src = make_hf_model(tmp_path, "llama")
    r = cli("widen", src, tmp_path / "o", "--dim", "hidden_size", "--factor", "2", "--mapping", "random")
    assert r.exit_code == 2 and "'mapping' applies to intermediate_size only" in r.stderr, r.output
    r = cli("widen", src, tmp_path / "o", "--dim", "intermediate_size", "--factor", "2", "--mapping", "spread")
    assert r.exit_code == 2 and "--mapping: 'spread' is not one of tile, random" in r.stderr, r.output
    assert not (tmp_path / "o").exists()


def _rewrite_lineage(path: Path, edit) -> None:
    with safe_open(str(path), "pt") as sf:
        meta, tensors = dict(sf.metadata()), {k: sf.get_tensor(k) for k in sf.keys()}
    lineage = json.loads(meta["n2n_lineage"])
    edit(lineage)
    meta["n2n_lineage"] = json.dumps(lineage, sort_keys=True, separators=(",", ":"))
    save_file(tensors, str(path), metadata=meta)


def test_lineage_records_the_mapping_and_old_lineages_replay_random(tmp_path, cli):
    """The mapping used is recorded, so `n2n verify` replays the same growth; a lineage written
    before --mapping existed (no 'mapping') meant the random mapping and is replayed so."""
    src = make_hf_model(tmp_path, "llama")
    for mapping in ("tile", "random"):
        out = tmp_path / mapping
        r = cli("widen", src, out, "--dim", "intermediate_size", "--factor", "2", "--device", "cpu",
                *(["--mapping", "random"] if mapping == "random" else []))
        assert r.exit_code == 0, r.output
        with safe_open(str(out / "model.safetensors"), "pt") as sf:
            assert json.loads(sf.metadata()["n2n_lineage"])[-1]["steps"][0]["widen"]["mapping"] == mapping
        assert f"mapping: {mapping}" in (out / "n2n_spec.yaml").read_text()
        r = cli("verify", src, out, "--device", "cpu")
        assert r.exit_code == 0 and "certificate: PASS (" in r.stdout, r.output

    def drop(lineage):
        del lineage[-1]["steps"][0]["widen"]["mapping"]

    _rewrite_lineage(tmp_path / "random" / "model.safetensors", drop)
    r = cli("verify", src, tmp_path / "random", "--device", "cpu")
    assert r.exit_code == 0 and "certificate: PASS (" in r.stdout, r.output
    _rewrite_lineage(tmp_path / "tile" / "model.safetensors", drop)  # now claims random: the replay differs
    r = cli("verify", src, tmp_path / "tile", "--device", "cpu")
    assert r.exit_code == 3, r.output


def test_file_systems_that_cannot_map_files_are_read_instead(tmp_path, cli, monkeypatch):
    """Tensors are read in place through mappings; where the file system refuses to map (FUSE with
    direct_io: ENODEV), they are read with pread: the same output bytes, and verification passes."""
    import errno
    import mmap as mmap_module

    src = make_hf_model(tmp_path, "llama")
    mapped_out = tmp_path / "mapped"
    assert cli("widen", src, mapped_out, "--dim", "intermediate_size", "--factor", "2").exit_code == 0

    def refuse(*a, **kw):
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(mmap_module, "mmap", refuse)
    source = hf_io.open_hf_dir(src)
    try:
        for k in source.keys():
            with safe_open(str(src / "model.safetensors"), "pt") as f:
                assert torch.equal(source.get(k), f.get_tensor(k)), k
            assert source.raw(k).all_finite()
    finally:
        source.close()
    read_out = tmp_path / "read"
    r = cli("widen", src, read_out, "--dim", "intermediate_size", "--factor", "2")
    assert r.exit_code == 0, r.output
    assert (read_out / "model.safetensors").read_bytes() == (mapped_out / "model.safetensors").read_bytes()
