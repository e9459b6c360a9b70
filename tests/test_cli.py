"""The command line: exit codes and messages for every bad input, and the happy paths."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import CNN_YAML, MLP_YAML, ROOT, SPECS, load_student, make_hf_model, max_rel_error

GROW = SPECS / "mnist-cnn-grow.yaml"


def _files(d):
    return sorted(p.name for p in d.iterdir())


def write_spec(tmp_path, text: str, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------- happy paths


def test_the_issue_walkthrough(tmp_path, cli, cnn_teacher):
    """inspect, grow, widen, deepen (no --model: the checkpoint carries it), verify."""
    r = cli("inspect", cnn_teacher, "--model", CNN_YAML)
    assert r.exit_code == 0, r.output
    assert "fc2" in r.stdout and "output layer" in r.stdout
    student = tmp_path / "student.safetensors"
    r = cli("grow", SPECS / "mnist-cnn-wider.yaml", cnn_teacher, student)
    assert r.exit_code == 0, r.output
    assert "PASS" in r.stdout and "wrote" in r.stdout
    wide, deep = tmp_path / "wide.safetensors", tmp_path / "deep.safetensors"
    r = cli("widen", cnn_teacher, wide, "--model", CNN_YAML, "--layer", "fc1", "--to", "128")
    assert r.exit_code == 0, r.output
    r = cli("deepen", wide, deep, "--after", "conv2")
    assert r.exit_code == 0, r.output
    r = cli("verify", cnn_teacher, deep, "--model", CNN_YAML)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("PASS")
    desc, net = load_student(deep)
    assert [layer.name for layer in desc.layers if layer.parametric] == \
        ["conv1", "conv2", "bn2", "conv2_deeper", "conv2_deeper_bn", "fc1", "fc2"]
    assert net.fc1.weight.shape == (128, 64 * 7 * 7)
    # lineage accumulates across runs and names the teacher by hash
    with safe_open(str(deep), "pt") as f:
        meta = f.metadata()
    lineage = json.loads(meta["n2n_lineage"])
    assert [list(e["steps"][0]) for e in lineage] == [["widen"], ["deepen"]]
    import hashlib
    assert lineage[0]["teacher_sha256"] == hashlib.sha256(cnn_teacher.read_bytes()).hexdigest()
    assert meta["format"] == "pt" and json.loads(meta["n2n_verification"])["passed"] is True


def test_output_is_byte_identical_for_same_inputs_and_seed(tmp_path, cli, cnn_teacher):
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    for out in (a, b):
        assert cli("grow", GROW, cnn_teacher, out, "--device", "cpu").exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    assert cli("grow", GROW, cnn_teacher, c, "--device", "cpu", "--seed", "1").exit_code == 0
    assert a.read_bytes() != c.read_bytes()


def test_dry_run_prints_every_tensor_and_writes_nothing(tmp_path, cli, cnn_teacher):
    out = tmp_path / "out.safetensors"
    r = cli("grow", GROW, cnn_teacher, out, "--dry-run")
    assert r.exit_code == 0, r.output
    assert not out.exists()
    for key in ("conv1.weight", "conv2.weight", "fc1.weight", "conv2_deeper.weight", "conv2_deeper_bn.running_var",
                "fc1_deeper.bias"):
        assert key in r.stdout
    assert "239,114 -> 531,594" in r.stdout and "nothing written" in r.stdout
    r = cli("grow", GROW, cnn_teacher, out, "--dry-run", "--json")
    plan = json.loads(r.stdout)["plan"]
    fc1 = next(t for t in plan["steps"][1]["tensors"] if t["key"] == "fc1.weight")
    assert fc1["old_shape"] == [64, 3136] and fc1["new_shape"] == [128, 3136]


def test_json_and_report(tmp_path, cli, cnn_teacher):
    out, rep = tmp_path / "o.safetensors", tmp_path / "r.json"
    r = cli("grow", GROW, cnn_teacher, out, "--json", "--report", rep)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc == json.loads(rep.read_text())
    assert doc["ok"] is True and doc["written"] is True and doc["verification"]["passed"] is True
    assert doc["verification"]["exact"]["max_rel_error"] <= 1e-5
    assert doc["plan"]["params_after"] == 531594


def test_quiet_prints_nothing(tmp_path, cli, cnn_teacher):
    r = cli("grow", GROW, cnn_teacher, tmp_path / "o.safetensors", "-q")
    assert r.exit_code == 0 and r.stdout == ""


def test_pt_state_dict_input(tmp_path, cli, cnn_teacher):
    pt = tmp_path / "teacher.pt"
    torch.save(load_file(str(cnn_teacher)), pt)
    out = tmp_path / "o.safetensors"
    r = cli("grow", GROW, pt, out)
    assert r.exit_code == 0, r.output
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": load_file(str(cnn_teacher)), "epoch": 3}, wrapped)
    assert cli("grow", GROW, wrapped, tmp_path / "o2.safetensors").exit_code == 0


def test_force_replaces_existing_output(tmp_path, cli, cnn_teacher):
    out = tmp_path / "o.safetensors"
    out.write_bytes(cnn_teacher.read_bytes())  # an old checkpoint (--force replaces only checkpoints)
    r = cli("grow", GROW, cnn_teacher, out)
    assert r.exit_code == 2 and "already exists" in r.stderr and "--force" in r.stderr
    assert out.read_bytes() == cnn_teacher.read_bytes()
    assert cli("grow", GROW, cnn_teacher, out, "--force").exit_code == 0
    assert out.read_bytes() != cnn_teacher.read_bytes()


def test_validate(tmp_path, cli):
    r = cli("validate", GROW)
    assert r.exit_code == 0 and "valid" in r.stdout
    r = cli("validate", write_spec(tmp_path, "steps:\n  - widen: {layer: fc1, to: 128}\n"))
    assert r.exit_code == 0 and "--checkpoint" in r.stdout


def test_every_command_has_help_and_is_documented_in_readme(cli):
    readme = (ROOT / "README.md").read_text()
    for cmd in ("grow", "widen", "deepen", "verify", "inspect", "validate"):
        r = cli(cmd, "--help")
        assert r.exit_code == 0 and "Usage" in r.stdout
        assert f"n2n {cmd}" in readme, cmd


# ----------------------------------------------------------------------------- bad inputs (exit 2)


def _bad(r, *needles):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_malformed_yaml(tmp_path, cli, cnn_teacher):
    spec = write_spec(tmp_path, "model: x.yaml\nsteps:\n  - widen: {layer: fc1, to: 128\n")
    r = cli("grow", spec, cnn_teacher, tmp_path / "o.safetensors")
    _bad(r, f"{spec}:4:1: malformed YAML")


def test_unknown_keys_all_reported_at_once_with_lines(tmp_path, cli):
    spec = write_spec(tmp_path, f"model: {CNN_YAML}\nsed: 1\nsteps:\n  - widen: {{layer: fc1, too: 128}}\n"
                                "  - deepen: {after: conv2, methd: net2deeper}\n")
    r = cli("validate", spec)
    _bad(r, "invalid growth spec (3 problems)", "line 2: sed: unknown key 'sed' (allowed: model, model_code, model_args, example_input, seed, steps, verify)",
         "line 4: steps[0].widen.too: unknown key 'too' (allowed: layer, to, factor, method, noise, noise_mode)",
         "line 5: steps[1].deepen.methd: unknown key 'methd'")


def test_unknown_layer_and_not_larger_and_output_layer_all_at_once(tmp_path, cli, cnn_teacher):
    spec = write_spec(tmp_path, f"model: {CNN_YAML}\nsteps:\n  - widen: {{layer: fc3, to: 128}}\n"
                                "  - widen: {layer: fc1, to: 64}\n  - widen: {layer: fc2, to: 20}\n"
                                "  - widen: {layer: bn2, to: 20}\n")
    r = cli("validate", spec)
    _bad(r, "4 steps cannot be applied",
         "steps[0] (widen fc3): layer: unknown layer 'fc3'",
         "steps[1] (widen fc1): to: 64 is not larger than the current width 64 of 'fc1'",
         "steps[2] (widen fc2): 'fc2' is the output layer",
         "steps[3] (widen bn2): layer: 'bn2' is a batchnorm2d; only linear and conv2d layers can be widened")
    r = cli("grow", spec, cnn_teacher, tmp_path / "o.safetensors")
    _bad(r, "steps[0] (widen fc3): layer: unknown layer 'fc3'", "Linear and conv2d layers here: conv1, conv2, fc1, fc2.")
    assert _files(tmp_path) == ["spec.yaml", "teacher.safetensors"]


def test_widen_output_layer_cli(tmp_path, cli, cnn_teacher):
    r = cli("widen", cnn_teacher, tmp_path / "o.safetensors", "-m", CNN_YAML, "--layer", "fc2", "--to", "20")
    _bad(r, "'fc2' is the output layer: widening it would change what the network outputs (10 values)",
         "Widen a hidden layer instead: conv1, conv2, fc1.")


def test_widen_needs_exactly_one_of_to_and_factor(tmp_path, cli, cnn_teacher):
    r = cli("widen", cnn_teacher, tmp_path / "o.safetensors", "-m", CNN_YAML, "--layer", "fc1")
    _bad(r, "give exactly one of --to (new width) or --factor (> 1)")


def test_deepen_after_non_idempotent_activation_cli(tmp_path, cli, mlp_teacher):
    r = cli("deepen", mlp_teacher, tmp_path / "o.safetensors", "-m", MLP_YAML, "--after", "fc2")
    _bad(r, "'fc2' is followed by tanh, which is not idempotent (tanh(tanh(x)) != tanh(x))", "method: random-init")
    assert not (tmp_path / "o.safetensors").exists()


def test_invalid_model_description(tmp_path, cli, cnn_teacher):
    m = write_spec(tmp_path, "input_shape: [1, 28, 28]\nlayers:\n  - {type: conv3d, name: c}\n"
                             "  - {type: linear, name: fc, out_features: 0}\n", "m.yaml")
    r = cli("inspect", cnn_teacher, "--model", m)
    _bad(r, "invalid model description (2 problems)", "line 3: layers[0]: unknown layer type 'conv3d'",
         "line 4: layers[1].out_features: Input should be greater than 0")
    m = write_spec(tmp_path, "input_shape: [1, 28, 28]\nlayers:\n  - {type: linear, name: fc, out_features: 3}\n",
                   "m2.yaml")
    _bad(cli("inspect", cnn_teacher, "--model", m), "layers[0] (linear 'fc'): needs a flat input but gets [1, 28, 28]; "
                                                    "add {type: flatten} before it")


def test_truncated_and_corrupt_safetensors(tmp_path, cli, cnn_teacher):
    data = cnn_teacher.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    _bad(cli("grow", GROW, trunc, tmp_path / "o.safetensors"), f"{trunc}: not a readable safetensors file",
         "truncated or corrupt")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 100)
    _bad(cli("inspect", junk), f"{junk}: not a readable safetensors file")
    assert not (tmp_path / "o.safetensors").exists()


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_needing_code_is_refused(tmp_path, cli):
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Evil()}, p)
    _bad(cli("inspect", p), f"{p}: refusing to load: this pickle needs arbitrary code to unpickle",
         "torch.save(model.state_dict(), path)")
    plain = tmp_path / "plain.pkl.pt"
    plain.write_bytes(pickle.dumps({"a": 1}))
    r = cli("inspect", plain)
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_checkpoint_not_matching_description_reports_everything(tmp_path, cli, cnn_teacher):
    sd = load_file(str(cnn_teacher))
    sd["fc1.weight"] = sd["fc1.weight"][:, :100].contiguous()
    del sd["bn2.running_var"]
    sd["extra.weight"] = torch.zeros(3)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    r = cli("grow", GROW, bad, tmp_path / "o.safetensors")
    _bad(r, "the checkpoint does not match the model description (3 problems)",
         "missing tensor 'bn2.running_var' (expected shape [64])",
         "tensor 'fc1.weight' has shape [64, 100], the description implies [64, 3136]",
         "unexpected tensor 'extra.weight' (shape [3]) not in the description")


def test_nonfinite_weights_are_refused(tmp_path, cli, cnn_teacher):
    sd = load_file(str(cnn_teacher))
    sd["fc1.weight"][0, :3] = float("nan")
    sd["conv1.bias"][1] = float("inf")
    bad = tmp_path / "nan.safetensors"
    save_file(sd, str(bad))
    r = cli("grow", GROW, bad, tmp_path / "o.safetensors")
    _bad(r, "refusing: the checkpoint has non-finite weights", "'fc1.weight': 3 NaN, 0 Inf",
         "'conv1.bias': 0 NaN, 1 Inf")


def test_out_equal_to_src(tmp_path, cli, cnn_teacher):
    before = cnn_teacher.read_bytes()
    _bad(cli("grow", GROW, cnn_teacher, cnn_teacher, "--force"), "the output is the input checkpoint")
    link = tmp_path / "link.safetensors"
    link.symlink_to(cnn_teacher)
    _bad(cli("grow", GROW, cnn_teacher, link, "--force"), "the output is the input checkpoint")
    assert cnn_teacher.read_bytes() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_dir(tmp_path, cli, cnn_teacher):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _bad(cli("grow", GROW, cnn_teacher, ro / "o.safetensors"), "is not writable")
    finally:
        ro.chmod(0o700)


def test_unwritable_out_dir_as_seen_by_access(tmp_path, cli, cnn_teacher, monkeypatch):
    """The same check when the tests run as root (who may write anywhere)."""
    import n2n_cli.checkpoints as ck
    monkeypatch.setattr(ck.fsutil, "dir_writable", lambda path: False)
    _bad(cli("grow", GROW, cnn_teacher, tmp_path / "o.safetensors"), f"directory {tmp_path} is not writable")
    assert _files(tmp_path) == ["teacher.safetensors"]


def test_unwritable_out(tmp_path, cli, cnn_teacher):
    _bad(cli("grow", GROW, cnn_teacher, tmp_path / "missing" / "o.safetensors"), "does not exist")
    _bad(cli("grow", GROW, cnn_teacher, tmp_path / "o.pt"), "the output must be a .safetensors file")
    d = tmp_path / "d.safetensors"
    d.mkdir()
    _bad(cli("grow", GROW, cnn_teacher, d, "--force"), "is a directory")


@pytest.mark.parametrize("failure,code,message", [
    (OSError(28, "No space left on device"), 2, "cannot write (No space left on device)"),
    (KeyboardInterrupt(), 130, "interrupted: nothing was written"),
])
def test_write_failure_leaves_no_partial_file(tmp_path, cli, cnn_teacher, monkeypatch, failure, code, message):
    """A failure while writing (disk full, Ctrl-C) leaves neither OUT nor a temp file."""
    from n2n_cli.execute import Materializer

    real = Materializer.get

    def get(self, key):
        if key == "fc1.weight" and self.writing:
            raise failure
        return real(self, key)

    monkeypatch.setattr(Materializer, "get", get)
    monkeypatch.setattr(Materializer, "writing", False, raising=False)
    import n2n_cli.api as api_module
    real_write = api_module.write_safetensors

    def write(path, entries, produce, metadata, **kw):
        produce.__self__.writing = True
        return real_write(path, entries, produce, metadata, **kw)

    monkeypatch.setattr(api_module, "write_safetensors", write)
    out = tmp_path / "o.safetensors"
    r = cli("grow", GROW, cnn_teacher, out)
    assert r.exit_code == code and message in r.stderr, r.output
    if code == 2:
        assert f"{out}: cannot write" in r.stderr  # names OUT, not the temporary file
    assert _files(tmp_path) == ["teacher.safetensors"]


def test_unknown_device(tmp_path, cli, cnn_teacher):
    _bad(cli("grow", GROW, cnn_teacher, tmp_path / "o.safetensors", "--device", "tpu"), "--device: unknown device 'tpu'")
    if not torch.cuda.is_available():
        _bad(cli("grow", GROW, cnn_teacher, tmp_path / "o.safetensors", "--device", "cuda"), "CUDA is not available")
        # a dry run too: it stands for the real run, which would fail there (an HF directory as well)
        _bad(cli("grow", GROW, cnn_teacher, tmp_path / "o.safetensors", "--device", "cuda", "--dry-run"),
             "--device cuda: CUDA is not available")
        src = make_hf_model(tmp_path, "llama")
        _bad(cli("deepen", src, tmp_path / "o", "--layers", "3", "--device", "cuda:1", "--dry-run"),
             "--device cuda:1: CUDA is not available")
    _bad(cli("grow", GROW, cnn_teacher, tmp_path / "o.safetensors", "--device", "tpu", "--dry-run"),
         "--device: unknown device 'tpu'")


def test_missing_model_description(tmp_path, cli, cnn_teacher):
    spec = write_spec(tmp_path, "steps:\n  - widen: {layer: fc1, to: 128}\n")
    _bad(cli("grow", spec, cnn_teacher, tmp_path / "o.safetensors"), "no model description for this checkpoint",
         "--model")


def test_usage_error_is_exit_2(cli):
    r = cli("grow", "--bogus")
    assert r.exit_code == 2 and "No such option" in r.output


# ----------------------------------------------------------------------------- exit 3 and 1


def test_verification_failure_exit_3_writes_nothing(tmp_path, cli, cnn_teacher):
    out, rep = tmp_path / "o.safetensors", tmp_path / "r.json"
    r = cli("widen", cnn_teacher, out, "-m", CNN_YAML, "--layer", "conv1", "--to", "200", "--atol", "0", "--rtol", "0",
            "--report", rep)
    assert r.exit_code == 3, r.output
    assert "does not compute the teacher's function" in r.stderr and "nothing was written" in r.stderr
    assert not out.exists() and _files(tmp_path) == ["r.json", "teacher.safetensors"]
    doc = json.loads(rep.read_text())
    assert doc["ok"] is False and doc["exit_code"] == 3 and doc["verification"]["exact"]["max_abs_error"] > 0


def test_verify_command_fails_with_exit_3_on_different_function(tmp_path, cli, cnn_teacher):
    sd = load_file(str(cnn_teacher))
    sd["fc2.bias"] += 0.01
    other = tmp_path / "other.safetensors"
    save_file(sd, str(other))
    r = cli("verify", cnn_teacher, other, "-m", CNN_YAML, "--student-model", CNN_YAML)
    assert r.exit_code == 3 and "does not compute the teacher's function" in r.stderr


def test_unexpected_error_is_exit_1_with_hint(tmp_path, cli, cnn_teacher, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("kaboom")

    import n2n_cli.api
    monkeypatch.setattr(n2n_cli.api, "inspect", boom)
    r = cli("inspect", cnn_teacher, "--model", CNN_YAML)  # with a description: the full inspection runs
    assert r.exit_code == 1 and "internal error: RuntimeError: kaboom" in r.stderr and "--debug" in r.stderr
    assert "Traceback" not in r.output
    r = cli("--debug", "inspect", cnn_teacher, "--model", CNN_YAML)
    assert r.exit_code == 1 and "Traceback" in r.stderr


def test_grown_checkpoint_loads_in_plain_pytorch(tmp_path, cli, cnn_teacher, cnn_desc):
    out = tmp_path / "o.safetensors"
    assert cli("grow", GROW, cnn_teacher, out).exit_code == 0
    _, student = load_student(out)
    from helpers import make_teacher
    teacher = make_teacher(cnn_desc, tmp_path / "again.safetensors")
    assert max_rel_error(teacher, student, torch.randn(8, 1, 28, 28)) <= 1e-5


def test_output_piped_into_head_stops_quietly():
    import subprocess
    import sys
    res = subprocess.run(f"'{sys.executable}' -m n2n_cli deepen --help | head -1", shell=True, capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "100"})
    assert "internal error" not in res.stderr and "Traceback" not in res.stderr


def test_validate_reports_schema_and_step_problems_together_in_file_order(tmp_path, cli):
    spec = write_spec(tmp_path, f"model: {CNN_YAML}\nsede: 1\nsteps:\n  - widen: {{layer: fc1, to: 128, nois: 1}}\n"
                                "  - deepen: {after: fc9}\n  - widen: {layer: fc2, to: 20}\n")
    r = cli("validate", spec)
    _bad(r, "invalid growth spec (4 problems)")
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("  - ")]
    assert lines == [
        "  - line 2: sede: unknown key 'sede' (allowed: model, model_code, model_args, example_input, seed, steps, verify)",
        "  - line 4: steps[0].widen.nois: unknown key 'nois' (allowed: layer, to, factor, method, noise, noise_mode)",
        "  - line 5: steps[1] (deepen after fc9): after: unknown layer 'fc9' Linear and conv2d layers here: conv1, "
        "conv2, fc1, fc2.",
        "  - line 6: steps[2] (widen fc2): 'fc2' is the output layer: widening it would change what the network "
        "outputs (10 values) Widen a hidden layer instead: conv1, conv2, fc1.",
    ]


def test_report_path_is_checked_before_any_work(tmp_path, cli, cnn_teacher):
    out = tmp_path / "o.safetensors"
    r = cli("grow", GROW, cnn_teacher, out, "--report", tmp_path / "missing" / "r.json")
    _bad(r, "--report", "cannot write the report here")
    assert not out.exists()


@pytest.mark.parametrize("name", ["bad name", "a..b"])
def test_invalid_new_layer_name_is_a_spec_error(tmp_path, cli, cnn_teacher, name):
    r = cli("deepen", cnn_teacher, tmp_path / "o.safetensors", "-m", CNN_YAML, "--after", "fc1", "--name", name)
    _bad(r, "a layer name is dot-separated non-empty parts without spaces")


def test_kernel_size_messages(tmp_path, cli, cnn_teacher):
    r = cli("deepen", cnn_teacher, tmp_path / "o.safetensors", "-m", CNN_YAML, "--after", "conv1", "--kernel-size", "4")
    _bad(r, "kernel_size: 4x4 is even, and an even kernel cannot be a same-size identity")
    r = cli("deepen", cnn_teacher, tmp_path / "o.safetensors", "-m", CNN_YAML, "--after", "fc1", "--kernel-size", "3")
    _bad(r, "kernel_size: 'fc1' is a linear layer, so the new layer is linear too and has no kernel")


def test_zero_sum_noise_claims_exactness_so_it_is_judged(tmp_path, cli, cnn_teacher):
    r = cli("widen", cnn_teacher, tmp_path / "o.safetensors", "-m", CNN_YAML, "--layer", "fc1", "--to", "128",
            "--noise", "1e6", "--json")
    assert r.exit_code == 3, r.output  # cancellation of huge zero-sum noise is not exact in float32
    doc = json.loads(r.stdout)
    assert doc["verification"]["deviation"]["passed"] is False
    assert not (tmp_path / "o.safetensors").exists()


def test_help_does_not_load_torch():
    """`n2n --help` answers at once: the library (and torch) load on first use."""
    import subprocess
    import sys
    code = "import sys, n2n_cli.cli; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_verify_dtype_half_precision_uses_half_precision_tolerances(tmp_path, cli, cnn_teacher):
    out = tmp_path / "o.safetensors"
    r = cli("grow", SPECS / "mnist-cnn-wider.yaml", cnn_teacher, out, "--verify-dtype", "bfloat16", "--json")
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)["verification"]["exact"]
    assert (v["dtype"], v["atol"], v["rtol"]) == ("bfloat16", 1e-2, 5e-2)
    # the spec's own float32 tolerances with bfloat16 arithmetic: refused, and the hint says why
    r = cli("grow", GROW, cnn_teacher, tmp_path / "p.safetensors", "--verify-dtype", "bfloat16")
    assert r.exit_code == 3 and "Verification ran in bfloat16" in r.stderr
    r = cli("verify", cnn_teacher, out, "-m", CNN_YAML, "--verify-dtype", "int8")
    _bad(r, "--verify-dtype: unknown dtype 'int8'", "float64, float32, bfloat16, float16")


@pytest.mark.parametrize("args", [["grow", "--help"], ["inspect", "specs/teachers/mnist-cnn.safetensors"]])
def test_reader_leaving_the_pipe_is_exit_141_quietly(args):
    """`n2n grow --help | head -1`: the reader leaves before n2n writes; exit 141 (as for SIGPIPE),
    no traceback, not 1 (n2n's internal-error code)."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    p = subprocess.Popen([sys.executable, "-m", "n2n_cli", *args], cwd=root, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before anything is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "internal error" not in err


def test_the_process_ends_without_interpreter_teardown_but_flushes_everything(tmp_path):
    """main() leaves with os._exit (the interpreter's teardown with torch loaded costs 0.3-1 s):
    no atexit handler runs, yet stdout on a pipe carries the whole JSON report, a finished command
    exits 0 and a refused one keeps its exit code and its message."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    marker = tmp_path / "atexit-ran"
    code = (f"import atexit, sys; atexit.register(lambda: open({str(marker)!r}, 'w').close()); "
            "from n2n_cli.cli import main; sys.argv = ['n2n'] + sys.argv[1:]; main()")
    run = lambda *a: subprocess.run([sys.executable, "-c", code, *map(str, a)], cwd=root, capture_output=True,
                                    text=True, timeout=300)
    r = run("inspect", "specs/teachers/mnist-cnn.safetensors", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is True and len(report["tensors"]) > 3
    assert not marker.exists()
    r = run("inspect", tmp_path / "missing.safetensors")
    assert r.returncode == 2 and "missing.safetensors" in r.stderr, r.stderr
    assert not marker.exists()
