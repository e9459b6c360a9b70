"""The certificate (issue 11, items 7 and 8) and the verification edges around it: a student's
every tensor is recomputed from the teacher by its recorded growth and compared bitwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import CNN_YAML, MLP_YAML, ROOT, SPECS, make_hf_model, make_teacher
from n2n_cli.spec import load_model_description


def _meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def _mutate(path: Path, key: str, index: tuple, delta: float = 1e-3, out: Path | None = None) -> Path:
    """Add ``delta`` to one element of one tensor, keeping the file's metadata (a tampered student)."""
    meta, sd = _meta(path), load_file(str(path))
    t = sd[key].clone()
    t[index] += delta
    sd[key] = t
    save_file(sd, str(out or path), metadata=meta)
    return out or path


def _set_meta(path: Path, **changes) -> None:
    meta, sd = _meta(path), load_file(str(path))
    meta.update(changes)
    save_file(sd, str(path), metadata=meta)


@pytest.fixture
def cnn_student(tmp_path, cli, cnn_teacher):
    out = tmp_path / "student.safetensors"
    r = cli("grow", SPECS / "mnist-cnn-grow.yaml", cnn_teacher, out, "-m", CNN_YAML, "--device", "cpu")
    assert r.exit_code == 0, r.output
    return out


def test_unmodified_student_passes_with_the_certificate(cli, cnn_teacher, cnn_student):
    r = cli("verify", cnn_teacher, cnn_student, "-m", CNN_YAML, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("PASS") and "certificate: PASS (22 tensors bitwise identical" in r.stdout
    r = cli("verify", cnn_teacher, cnn_student, "-m", CNN_YAML, "--device", "cpu", "--json")
    v = json.loads(r.stdout)["verification"]
    assert v["passed"] is True and v["exact_student"] is True and v["certificate"]["status"] == "pass"
    assert v["certificate"]["bitwise"] == v["certificate"]["tensors"] == 22


@pytest.mark.parametrize("key,index", [("fc1.weight", (3, 17)), ("conv1.bias", (5,)), ("conv2_deeper.weight", (0, 1, 1, 1)),
                                       ("fc1_deeper.bias", (0,))])
def test_one_weight_plus_1e_3_fails_naming_tensor_and_element(cli, cnn_teacher, cnn_student, key, index):
    before = load_file(str(cnn_student))[key][index].item()
    _mutate(cnn_student, key, index)
    r = cli("verify", cnn_teacher, cnn_student, "-m", CNN_YAML, "--device", "cpu")
    assert r.exit_code == 3, r.output
    assert "certificate FAIL" in r.stderr and f"tensor '{key}' element {list(index)}" in r.stderr
    assert f"recomputed from the teacher {before!r}" in r.stderr
    r = cli("verify", cnn_teacher, cnn_student, "-m", CNN_YAML, "--device", "cpu", "--json")
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 3 and doc["verification"]["passed"] is False
    assert doc["verification"]["certificate"]["difference"]["tensor"] == key


def test_mlp_mutation_is_caught(tmp_path, cli, mlp_teacher):
    out = tmp_path / "s.safetensors"
    assert cli("grow", SPECS / "mlp-grow.yaml", mlp_teacher, out, "-m", MLP_YAML, "--device", "cpu").exit_code == 0
    key = next(k for k in load_file(str(out)) if k.endswith("weight"))
    _mutate(out, key, (0, 0))
    r = cli("verify", mlp_teacher, out, "-m", MLP_YAML, "--device", "cpu")
    assert r.exit_code == 3 and f"tensor '{key}' element [0, 0]" in r.stderr, r.output


def test_one_bfloat16_tensor_does_not_loosen_the_check(tmp_path, cli, cnn_desc):
    """A float32 CNN with one small bfloat16 tensor: the certificate catches +1e-3 in a float32
    weight, and the probe tolerance stays float32's (the bf16 bias is only copied)."""
    teacher = tmp_path / "t.safetensors"
    make_teacher(cnn_desc, teacher)
    sd = load_file(str(teacher))
    sd["fc2.bias"] = sd["fc2.bias"].to(torch.bfloat16)
    save_file(sd, str(teacher))
    out = tmp_path / "s.safetensors"
    r = cli("grow", SPECS / "mnist-cnn-wider.yaml", teacher, out, "-m", CNN_YAML, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["verification"]["exact"]["rtol"] == 1e-4  # not bfloat16's 5e-2
    r = cli("verify", teacher, out, "-m", CNN_YAML, "--device", "cpu", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["verification"]["exact"]["rtol"] == 1e-4, r.output
    _mutate(out, "fc1.weight", (1, 2))
    r = cli("verify", teacher, out, "-m", CNN_YAML, "--device", "cpu")
    assert r.exit_code == 3 and "tensor 'fc1.weight' element [1, 2]" in r.stderr, r.output
    # without lineage (probe check only) the tolerance follows the tensors that differ: float32 here
    plain = tmp_path / "plain.safetensors"
    _mutate(teacher, "fc1.weight", (1, 2), out=plain)
    r = cli("verify", teacher, plain, "-m", CNN_YAML, "--student-model", CNN_YAML, "--device", "cpu", "--json")
    v = json.loads(r.stdout)["verification"]
    assert v["exact"]["rtol"] == 1e-4 and v["certificate"]["status"] == "none"


def test_teacher_changed_is_exit_2(tmp_path, cli, cnn_teacher, cnn_student):
    _mutate(cnn_teacher, "fc2.bias", (0,), 1e-6)
    r = cli("verify", cnn_teacher, cnn_student, "-m", CNN_YAML, "--device", "cpu")
    assert r.exit_code == 2, r.output
    assert "TEACHER is not the checkpoint this student was grown from" in r.stderr


def test_student_grown_twice_is_certified_from_either_teacher(tmp_path, cli, cnn_teacher):
    mid, final = tmp_path / "mid.safetensors", tmp_path / "final.safetensors"
    assert cli("widen", cnn_teacher, mid, "-m", CNN_YAML, "--layer", "fc1", "--to", "96", "--device", "cpu",
               "--noise", "0.1").exit_code == 0
    assert cli("deepen", mid, final, "--after", "conv1", "--device", "cpu", "--seed", "4").exit_code == 0
    r = cli("verify", mid, final, "--device", "cpu")
    assert r.exit_code == 0 and "lineage entry 2 of 2 replayed" in r.stdout, r.output
    r = cli("verify", cnn_teacher, final, "-m", CNN_YAML, "--device", "cpu")
    assert r.exit_code == 0 and "lineage entries 1-2 of 2 replayed" in r.stdout, r.output
    _mutate(final, "fc1.weight", (90, 3))  # a noisy copy: still caught beyond one ulp
    r = cli("verify", cnn_teacher, final, "-m", CNN_YAML, "--device", "cpu")
    assert r.exit_code == 3 and "tensor 'fc1.weight' element [90, 3]" in r.stderr, r.output


def test_student_without_lineage_says_probe_check_only(tmp_path, cli, cnn_teacher):
    r = cli("verify", cnn_teacher, cnn_teacher, "-m", CNN_YAML, "--student-model", CNN_YAML, "--device", "cpu")
    assert r.exit_code == 0 and "certificate: none (the student records no growth" in r.stdout, r.output
    assert "probe check only" in r.stdout


# ----------------------------------------------------------------------------- inexact students (item 8)


@pytest.mark.parametrize("args,method", [
    (["widen", "--layer", "fc1", "--to", "96", "--method", "random-pad"], "random-pad"),
    (["deepen", "--after", "fc1", "--method", "random-init"], "random-init"),
    (["widen", "--layer", "fc1", "--to", "96", "--noise", "0.5", "--noise-mode", "independent"], "independent noise"),
])
def test_inexact_student_is_not_called_exact(tmp_path, cli, cnn_teacher, args, method):
    out = tmp_path / "s.safetensors"
    r = cli(args[0], cnn_teacher, out, "-m", CNN_YAML, "--device", "cpu", "--json", *args[1:])
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)["verification"]
    assert v["passed"] is None and v["exact_student"] is False and v["exact"] is None
    assert v["exact_counterpart"]["passed"] is True and v["deviation"]["passed"] is None
    assert "NOT function-preserving" in v["note"]
    meta = json.loads(_meta(out)["n2n_verification"])
    assert meta["passed"] is None and meta["exact_student"] is False and meta["exact_counterpart"]["passed"] is True
    r = cli(args[0], cnn_teacher, tmp_path / "t.safetensors", "-m", CNN_YAML, "--device", "cpu", *args[1:])
    assert "verification (exact counterpart, not the written student): PASS" in r.stdout
    assert "NOT judged" in r.stdout
    # verify: reproduced bitwise by the recorded (seeded) growth, and said not to be function-preserving
    r = cli("verify", cnn_teacher, out, "-m", CNN_YAML, "--device", "cpu")
    assert r.exit_code == 3 and "PASS" not in r.stdout, r.output
    assert f"reproduced bitwise by its recorded growth, which is NOT function-preserving (method {method})" in r.stderr
    assert "certificate: reproduced bitwise" in r.stderr


# ----------------------------------------------------------------------------- Hugging Face


def test_hf_llama_student_certificate(tmp_path, cli):
    pytest.importorskip("transformers")
    src = make_hf_model(tmp_path, "llama")
    out = tmp_path / "out"
    r = cli("widen", src, out, "--dim", "intermediate_size", "--to", "56", "--device", "cpu")
    assert r.exit_code == 0, r.output
    r = cli("verify", src, out, "--device", "cpu")
    assert r.exit_code == 0 and "certificate: PASS (" in r.stdout, r.output
    key = "model.layers.1.mlp.down_proj.weight"
    _mutate(out / "model.safetensors", key, (4, 50))
    r = cli("verify", src, out, "--device", "cpu")
    assert r.exit_code == 3 and f"tensor '{key}' element [4, 50]" in r.stderr, r.output
    # a changed teacher: exit 2
    _mutate(out / "model.safetensors", key, (4, 50), -1e-3)
    _mutate(src / "model.safetensors", "model.norm.weight", (0,), 1e-6)
    r = cli("verify", src, out, "--device", "cpu")
    assert r.exit_code == 2 and "TEACHER is not the checkpoint this student was grown from" in r.stderr


# ----------------------------------------------------------------------------- determinism


def _grow_subprocess(args: list, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT)}
    code = f"import torch, sys; torch.set_num_threads({threads}); from n2n_cli.cli import main; sys.argv = ['n2n'] + sys.argv[1:]; main()"
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_output_bytes_do_not_depend_on_thread_count(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for out, n in ((a, 1), (b, 2)):
        _grow_subprocess(["grow", SPECS / "mnist-cnn-grow.yaml", SPECS / "teachers" / "mnist-cnn.safetensors", out,
                          "--device", "cpu", "--probes", "256"], n)
    assert a.read_bytes() == b.read_bytes()
    meta = json.loads(_meta(a)["n2n_verification"])
    assert "max_abs_error" not in json.dumps(meta) and meta["exact"]["atol"] == 1e-5  # facts, not measurements


def test_hf_output_bytes_do_not_depend_on_thread_count(tmp_path):
    pytest.importorskip("transformers")
    src = make_hf_model(tmp_path, "llama")
    for name, n in (("a", 1), ("b", 2)):
        _grow_subprocess(["widen", src, tmp_path / name, "--dim", "hidden_size", "--to", "48", "--noise", "0.1",
                          "--device", "cpu"], n)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    written = (tmp_path / "a" / "n2n_verification.json").read_text()
    assert "max_abs_error" not in written and "stream_max_rel_error" not in written


def test_verification_facts_keep_no_measurement():
    """What is written (metadata, n2n_verification.json) holds no float measured on the probes,
    however deep it sits: the blockwise stream error, and the numbers inside a divergence message
    (their last digits depend on the thread count; a tiny model can hide that)."""
    from n2n_cli.verify import verification_facts

    v = {"passed": True, "exact": {"passed": True, "max_abs_error": 1e-6, "stream_max_rel_error": 6.87e-7,
                                   "first_divergence": "the residual stream differs after teacher block 2 "
                                                       "(student block 5): max abs error 0.3 > atol 0.01 + rtol 0.05 * 1.2",
                                   "atol": 0.01, "blocks_compared": 9}}
    facts = verification_facts(v)
    assert facts == {"passed": True, "exact": {"passed": True, "atol": 0.01, "blocks_compared": 9,
                                               "first_divergence": "the residual stream differs after teacher "
                                                                   "block 2 (student block 5)"}}


# ----------------------------------------------------------------------------- messages and exits


def test_different_architectures_are_exit_2(tmp_path, cli, cnn_teacher):
    other_yaml = tmp_path / "other.yaml"
    other_yaml.write_text("input_shape: [1, 28, 28]\nlayers:\n  - {type: flatten}\n"
                          "  - {type: linear, name: a, out_features: 32}\n  - {type: relu}\n"
                          "  - {type: linear, name: b, out_features: 7}\n")
    other = tmp_path / "other.safetensors"
    make_teacher(load_model_description(other_yaml), other)
    r = cli("verify", cnn_teacher, other, "-m", CNN_YAML, "--student-model", other_yaml, "--device", "cpu")
    assert r.exit_code == 2, r.output
    assert "the architectures differ" in r.stderr and "output shape [7], the teacher's is [10]" in r.stderr
    assert "no layer 'conv1'" in r.stderr


def test_user_tolerance_failure_is_not_called_a_bug(tmp_path, cli, cnn_teacher):
    r = cli("widen", cnn_teacher, tmp_path / "o.safetensors", "-m", CNN_YAML, "--layer", "conv1", "--to", "100",
            "--atol", "0", "--rtol", "0", "--device", "cpu")
    assert r.exit_code == 3, r.output
    assert "The tolerance is yours (--atol 0 --rtol 0)" in r.stderr and "This is a bug" not in r.stderr


def test_verify_without_student_metadata_names_student_model(tmp_path, cli, cnn_teacher):
    r = cli("verify", cnn_teacher, cnn_teacher, "-m", CNN_YAML, "--device", "cpu")
    assert r.exit_code == 2 and "Pass --student-model FILE.yaml" in r.stderr, r.output


def test_grow_and_verify_share_the_json_shape(tmp_path, cli, cnn_teacher, cnn_student):
    g = json.loads(cli("widen", cnn_teacher, tmp_path / "w.safetensors", "-m", CNN_YAML, "--layer", "fc1",
                       "--to", "96", "--device", "cpu", "--json").stdout)
    v = json.loads(cli("verify", cnn_teacher, cnn_student, "-m", CNN_YAML, "--device", "cpu", "--json").stdout)
    for doc in (g, v):
        assert doc["verification"]["passed"] is True
        assert {"passed", "exact_student", "checked", "exact", "deviation"} <= set(doc["verification"])
    assert v["passed"] is True and "max_abs_error" in v  # the old top-level fields are kept


@pytest.mark.parametrize("raw", ["null", "5", "[1]", "{}", "[]", "[{\"steps\": 3, \"seed\": 0}]", "[" * 5000])
def test_malformed_lineage_is_exit_2_everywhere(tmp_path, cli, cnn_teacher, cnn_student, raw):
    _set_meta(cnn_student, n2n_lineage=raw)
    for args in (["inspect", cnn_student], ["verify", cnn_teacher, cnn_student, "-m", CNN_YAML, "--device", "cpu"],
                 ["widen", cnn_student, tmp_path / "o.safetensors", "--layer", "fc1", "--to", "200"]):
        r = cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert "'n2n_lineage' metadata" in r.stderr


def test_deeply_nested_model_metadata_is_exit_2(tmp_path, cli, cnn_teacher, cnn_student):
    _set_meta(cnn_student, n2n_model='{"a":' * 100000 + "1" + "}" * 100000)
    for args in (["inspect", cnn_student], ["verify", cnn_teacher, cnn_student, "-m", CNN_YAML, "--device", "cpu"],
                 ["widen", cnn_student, tmp_path / "o.safetensors", "--layer", "fc1", "--to", "200"]):
        r = cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert "'n2n_model' metadata" in r.stderr


def test_verify_needs_no_model_when_the_lineage_records_it(cli, cnn_teacher, cnn_student):
    """The lineage records the teacher's description (model_before): `n2n verify TEACHER STUDENT`
    of a plain teacher file needs no --model, for the teacher whose sha256 the lineage names."""
    assert "model_before" in json.loads(_meta(cnn_student)["n2n_lineage"])[-1]
    r = cli("verify", cnn_teacher, cnn_student, "--device", "cpu")
    assert r.exit_code == 0 and "certificate: PASS" in r.stdout, r.output
