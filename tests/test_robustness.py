"""Bad specs and rough edges found by fuzzing and by new users: each is exit 2 with one clear
message (never a traceback, exit 1 or a hang), and the CLI conveniences users expect."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import CNN_YAML, SPECS

TEACHER = SPECS / "teachers" / "mnist-cnn.safetensors"


def write(tmp_path, text: str, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


MODEL = f"model: {CNN_YAML}\n"
STEP = "steps:\n  - widen: {layer: fc1, factor: 2}\n"


@pytest.mark.parametrize("text, message", [
    ("steps: 5\n", "line 1: steps: Input should be a valid list (got 5)"),
    ("steps: 1.5\n", "line 1: steps: Input should be a valid list (got 1.5)"),
    ("steps: true\n", "line 1: steps: Input should be a valid list (got True)"),
    ("str_x: 1\n" + MODEL + STEP, "line 1: str_x: unknown key 'str_x' (allowed: model, model_code, model_args, example_input, seed, steps, verify)"),
    ("str: 1\n" + MODEL + STEP, "line 1: str: unknown key 'str' (allowed: model, model_code, model_args, example_input, seed, steps, verify)"),
    (MODEL + "steps:\n  - widen: {layer: fc1, factor: .inf}\n",
     "line 3: steps[0].widen.factor: Input should be a finite number (got inf)"),
    (MODEL + "steps:\n  - widen: {layer: fc1, factor: .nan}\n",
     "line 3: steps[0].widen.factor: Input should be a finite number (got nan)"),
    (MODEL + "steps:\n  - widen: {layer: fc1, factor: 1e300}\n",
     "line 3: steps[0].widen.factor: Input should be less than or equal to 1024"),
    (MODEL + "steps:\n  - widen: {layer: fc1, to: 1000000000000000}\n",
     "line 3: steps[0].widen.to: Input should be less than or equal to 16777216"),
    (MODEL + STEP + "verify: {probes: 100000000}\n",
     "line 4: verify.probes: Input should be less than or equal to 65536"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "malformed YAML: nested too deeply"),
    ("model: " + "x" * 5000 + "\n" + STEP, "model: cannot use this path (File name too long)"),
])
def test_malformed_specs_are_exit_2(tmp_path, cli, text, message):
    spec = write(tmp_path, text)
    for args in (("grow", spec, TEACHER, tmp_path / "out.safetensors"), ("validate", spec)):
        r = cli(*args)
        assert r.exit_code == 2, (args[0], r.output)
        assert message in r.stderr, (args[0], r.stderr)
        assert "internal error" not in r.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_duplicate_keys_are_errors_with_both_lines(tmp_path, cli):
    spec = write(tmp_path, MODEL + STEP + "seed: 1\nsteps:\n  - widen: {layer: fc1, factor: 3, factor: 4}\n")
    for args in (("grow", spec, TEACHER, tmp_path / "o.safetensors"), ("validate", spec)):
        r = cli(*args)
        assert r.exit_code == 2, r.output
        assert "duplicate keys (YAML would silently keep the last)" in r.stderr
        assert "line 5: duplicate key 'steps' (first at line 2)" in r.stderr
        assert "line 6: duplicate key 'factor' (first at line 6)" in r.stderr
    desc = write(tmp_path, "input_shape: [4]\ninput_shape: [5]\nlayers:\n  - {type: linear, name: a, out_features: 2}\n",
                 "m.yaml")
    r = cli("inspect", TEACHER, "--model", desc)
    assert r.exit_code == 2 and "line 2: duplicate key 'input_shape' (first at line 1)" in r.stderr


def test_arguments_in_the_wrong_order(tmp_path, cli):
    spec = SPECS / "mnist-cnn-grow.yaml"
    r = cli("grow", TEACHER, spec, tmp_path / "out.safetensors")
    assert r.exit_code == 2
    assert "expected a YAML spec here, but this is a checkpoint (.safetensors)" in r.stderr
    assert "The order is: n2n grow SPEC SRC OUT" in r.stderr
    r = cli("grow", spec, spec, tmp_path / "out.safetensors")
    assert r.exit_code == 2
    assert "SRC is a YAML file; it should be the teacher checkpoint" in r.stderr
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(TEACHER.read_bytes()[:4096])
    r = cli("grow", binary, TEACHER, tmp_path / "out.safetensors")
    assert r.exit_code == 2 and "is a binary file, not a YAML spec" in r.stderr


def test_probes_bounds(tmp_path, cli):
    r = cli("verify", TEACHER, TEACHER, "--probes", "100000000")
    assert r.exit_code == 2 and "Invalid value for '--probes'" in r.stderr
    big = write(tmp_path, "input_shape: [3, 512, 512]\nlayers:\n  - {type: conv2d, name: c, out_channels: 2, "
                          "kernel_size: 1}\n", "big.yaml")
    save_file({"c.weight": torch.randn(2, 3, 1, 1), "c.bias": torch.zeros(2)}, str(tmp_path / "big.safetensors"))
    r = cli("verify", tmp_path / "big.safetensors", tmp_path / "big.safetensors", "--model", big,
            "--student-model", big, "--probes", "60000")
    assert r.exit_code == 2, r.output
    assert "--probes 60000: the probe inputs alone would take 351.6 GiB" in r.stderr
    assert "Use at most 170 probes." in r.stderr


def test_json_on_usage_errors(cli):
    r = cli("grow", "--json", "spec.yaml")
    assert r.exit_code == 2
    assert json.loads(r.stdout) == {"ok": False, "exit_code": 2, "error": "Missing argument 'SRC'."}
    r = cli("verify", "a", "b", "--json", "--probes", "0")
    assert r.exit_code == 2 and json.loads(r.stdout)["error"].startswith("Invalid value for '--probes'")


def test_version_flag_and_completion(cli):
    for flag in ("-V", "--version"):
        r = cli(flag)
        assert r.exit_code == 0 and r.stdout.startswith("n2n ")
    r = cli("--help")
    assert "--install-completion" in r.stdout and "--show-completion" in r.stdout


# ----------------------------------------------------------------------------- nn.Sequential names


SEQ_YAML = """input_shape: [1, 8, 8]
layers:
  - {type: conv2d, name: 0, out_channels: 4, kernel_size: 3, padding: 1}
  - {type: batchnorm2d, name: 1}
  - {type: relu}
  - {type: conv2d, name: 3, out_channels: 6, kernel_size: 3, padding: 1}
  - {type: relu}
  - {type: flatten}
  - {type: linear, name: 6, out_features: 5}
"""


def _seq(*, deep_after_0=False, deep_after_3=False, wide=4):
    from torch import nn
    mods = [nn.Conv2d(1, wide, 3, padding=1), nn.BatchNorm2d(wide), nn.ReLU()]
    if deep_after_0:
        mods += [nn.Conv2d(wide, wide, 3, padding=1), nn.BatchNorm2d(wide), nn.ReLU()]
    mods += [nn.Conv2d(wide, 6, 3, padding=1), nn.ReLU()]
    if deep_after_3:
        mods += [nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()]
    mods += [nn.Flatten(), nn.Linear(6 * 64, 5)]
    return nn.Sequential(*mods)


def test_user_sequential_numeric_names_grow_and_load_back(tmp_path, cli):
    """``name: 0`` is accepted, and deepened layers take nn.Sequential numbers (later ones
    renumbered), so the student loads into the user's own grown nn.Sequential."""
    torch.manual_seed(0)
    teacher = _seq()
    with torch.no_grad():
        bn = teacher[1]
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    save_file(teacher.state_dict(), str(tmp_path / "t.safetensors"))
    desc = write(tmp_path, SEQ_YAML, "seq.yaml")
    wide, d1, d2 = (tmp_path / n for n in ("w.safetensors", "d1.safetensors", "d2.safetensors"))
    r = cli("widen", tmp_path / "t.safetensors", wide, "--model", desc, "--layer", "0", "--to", "7")
    assert r.exit_code == 0, r.output
    r = cli("deepen", wide, d1, "--after", "0")
    assert r.exit_code == 0, r.output
    r = cli("deepen", d1, d2, "--after", "6", "--dry-run", "--json")
    changes = {t["key"]: t["how"] for t in json.loads(r.stdout)["plan"]["steps"][0]["tensors"]}
    assert changes["8.weight"] == "identity"
    assert changes["11.weight"] == "renamed from 9.weight (nn.Sequential numbering)"
    r = cli("deepen", d1, d2, "--after", "6")
    assert r.exit_code == 0, r.output
    student = _seq(deep_after_0=True, deep_after_3=True, wide=7).eval()
    student.load_state_dict(load_file(str(d2)), strict=True)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        t, s = teacher.eval()(x), student(x)
    assert float((t - s).abs().max() / t.abs().max()) <= 1e-5
    # an explicit --name keeps its name and renumbers nothing
    r = cli("deepen", d1, tmp_path / "n.safetensors", "--after", "6", "--name", "extra")
    assert r.exit_code == 0, r.output
    assert {k.split(".")[0] for k in load_file(str(tmp_path / "n.safetensors"))} == \
        {"0", "1", "3", "4", "6", "extra", "9"}


def test_ddp_prefix_is_detected(tmp_path, cli):
    sd = load_file(str(TEACHER))
    ddp = tmp_path / "ddp.safetensors"
    save_file({"module." + k: v for k, v in sd.items()}, str(ddp))
    r = cli("widen", ddp, tmp_path / "o.safetensors", "--model", CNN_YAML, "--layer", "fc1", "--to", "200")
    assert r.exit_code == 2
    assert ("every tensor name in the checkpoint starts with 'module.' (the model was saved wrapped in "
            "DistributedDataParallel/DataParallel)") in r.stderr
    assert "k.removeprefix('module.')" in r.stderr
    assert "unexpected tensor" not in r.stderr  # one line, not one per tensor
    pt = tmp_path / "ddp.pt"
    torch.save({"module." + k: v for k, v in sd.items()}, pt)
    r = cli("inspect", pt, "--model", CNN_YAML)
    assert r.exit_code == 2 and "torch.load('" in r.stderr


def test_grow_says_what_was_verified(tmp_path, cli):
    """A hand-written description is what n2n verifies: the output and the report say so."""
    out = tmp_path / "s.safetensors"
    r = cli("grow", SPECS / "mnist-cnn-wider.yaml", TEACHER, out)
    assert r.exit_code == 0, r.output
    assert "verified against: the network the model description describes, run by n2n, not your own nn.Module" \
        in r.stdout
    r = cli("grow", SPECS / "mnist-cnn-wider.yaml", TEACHER, out, "--force", "--json")
    assert json.loads(r.stdout)["verified_against"].startswith("the network the model description describes")
    r = cli("grow", "--help")
    assert "not your own nn.Module" in " ".join(r.stdout.replace("│", " ").split())


def test_a_shard_name_longer_than_the_file_system_allows(tmp_path, cli):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m", max_shard_size="20KB")
    index = tmp_path / "m" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = "x" * 300 + ".safetensors"
    index.write_text(json.dumps(data))
    for args in (("inspect", tmp_path / "m"), ("deepen", tmp_path / "m", tmp_path / "o", "--layers", "3")):
        r = cli(*args)
        assert r.exit_code == 2, r.output
        assert "1 shard file(s) listed in the index are missing" in r.stderr


def _adam_state(tmp_path):
    from n2n_cli.model import to_torch_module
    from n2n_cli.spec import load_model_description
    from helpers import MLP_YAML, make_teacher

    desc = load_model_description(MLP_YAML)
    make_teacher(desc, tmp_path / "t.safetensors", seed=3)
    net = to_torch_module(desc)
    net.load_state_dict(load_file(str(tmp_path / "t.safetensors")))
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(4, *desc.input_shape)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    return tmp_path / "t.safetensors", tmp_path / "opt.pt"


def test_optimizer_state_out_never_overwrites_inputs_or_foreign_files(tmp_path, cli):
    from helpers import MLP_YAML

    src, opt = _adam_state(tmp_path)
    out = tmp_path / "s.safetensors"
    before = src.read_bytes(), opt.read_bytes()
    base = ("widen", src, out, "--model", MLP_YAML, "--layer", "fc1", "--factor", "2", "--optimizer-state", opt)
    for target, word in ((src, "over"), (opt, "over"), (out, "over")):
        r = cli(*base, "--optimizer-state-out", target, "--force")
        assert r.exit_code == 2, r.output
        assert f"--optimizer-state-out {target}: the grown optimizer state would be written {word}" in r.stderr
    assert (src.read_bytes(), opt.read_bytes()) == before and not out.exists()
    notes = tmp_path / "notes.pt"
    notes.write_text("my notes")
    r = cli(*base, "--optimizer-state-out", notes, "--force")
    assert r.exit_code == 2, r.output
    assert "exists and is not a saved optimizer state (torch.save); --force replaces only one" in r.stderr
    assert notes.read_text() == "my notes"
    r = cli(*base, "--optimizer-state-out", tmp_path / "grown-opt.pt")
    assert r.exit_code == 0, r.output
    assert torch.load(tmp_path / "grown-opt.pt", weights_only=True)["state"]
    r = cli(*base, "--optimizer-state-out", tmp_path / "grown-opt.pt", "--force")  # its own earlier output: fine
    assert r.exit_code == 0, r.output


def test_header_only_work_does_not_import_torch(tmp_path):
    """`inspect` of a plain checkpoint and `validate` of a spec on its own answer from the header
    and the YAML: torch (over a second to import) stays unloaded."""
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from n2n_cli.cli import app; "
            "r = CliRunner().invoke(app, sys.argv[1:]); "
            "print(r.exit_code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    for args in (["inspect", str(TEACHER)], ["validate", str(SPECS / "llama-grow.yaml")]):
        res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        assert res.stdout.split() == ["0", "False", "False"], (args, res.stdout, res.stderr)


def test_header_only_inspect_reports_what_the_full_reader_reports(tmp_path):
    from n2n_cli import api
    from n2n_cli.headers import inspect_plain

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3, 4), "b": torch.zeros(3, dtype=torch.bfloat16), "n": torch.zeros(2, dtype=torch.int64)},
              str(path))
    assert inspect_plain(path) == api.inspect(path)
    assert inspect_plain(TEACHER) == api.inspect(TEACHER)
    grown = tmp_path / "grown.safetensors"
    api.grow(SPECS / "mnist-cnn-wider.yaml", TEACHER, grown)
    assert inspect_plain(grown) is None  # n2n metadata: the full inspection shows the description
