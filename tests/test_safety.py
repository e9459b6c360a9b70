"""Nothing lost: --report, --force, signals, stale temporaries, full disks, races, odd names and inputs.

Every test checks the exit code, the message, and what is left on disk afterwards.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import CNN_YAML, ROOT, SPECS, make_hf_model, make_teacher
from n2n_cli import api, checkpoints, fsutil, outputs
from n2n_cli.errors import OutputError
from n2n_cli.spec import load_model_description, spec_from_steps

GROW = SPECS / "mnist-cnn-grow.yaml"


def temps(path: Path) -> list[str]:
    return sorted(p.name for p in Path(path).iterdir() if ".n2n-" in p.name)


def snapshot(path: Path) -> dict[str, bytes | None]:
    """Every file under ``path`` (recursively) with its bytes: compare before and after."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(Path(path).rglob("*"))}


@pytest.fixture
def hf_src(tmp_path):
    pytest.importorskip("transformers")
    return make_hf_model(tmp_path, "llama")


# --------------------------------------------------------------------------- 1. --report


def test_report_never_overwrites_what_the_command_reads_or_writes(tmp_path, cli, cnn_teacher):
    out = tmp_path / "o.safetensors"
    spec = tmp_path / "grow.yaml"  # a copy: if this test ever fails, it must not destroy the repository's spec
    spec.write_text(GROW.read_text().replace("model: models/", f"model: {GROW.parent}/models/"))
    before = snapshot(tmp_path)
    for rep in (cnn_teacher, out, spec):
        r = cli("grow", spec, cnn_teacher, out, "--report", rep)
        assert r.exit_code == 2, r.output
        assert f"--report {rep}: the report would be written over {rep}" in r.stderr
    link = tmp_path / "link.json"
    link.symlink_to(cnn_teacher)
    r = cli("inspect", cnn_teacher, "--report", link)
    assert r.exit_code == 2 and "the report would be written over" in r.stderr
    link.unlink()
    assert snapshot(tmp_path) == before  # SRC byte-identical, no OUT, nothing else


def test_report_never_inside_hf_src_or_out(tmp_path, cli, hf_src):
    out = tmp_path / "out"
    assert cli("widen", hf_src, out, "--dim", "intermediate_size", "--to", "48", "--no-verify").exit_code == 0
    before = snapshot(tmp_path)
    for rep in (hf_src / "config.json", hf_src / "new.json", out / "report.json", out / "config.json"):
        r = cli("widen", hf_src, out, "--dim", "intermediate_size", "--to", "48", "--force", "--report", rep)
        assert r.exit_code == 2 and "--report" in r.stderr and "which this command reads or writes" in r.stderr
    assert snapshot(tmp_path) == before


def test_report_onto_a_full_disk_exits_2_and_leaves_no_partial_report(tmp_path, cli, cnn_teacher, monkeypatch):
    out, rep = tmp_path / "o.safetensors", tmp_path / "r.json"
    rep.write_text("old report\n")
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills up just as the report is written
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path / ".r.json.")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(fsutil.os, "fsync", fsync)
    r = cli("grow", GROW, cnn_teacher, out, "--report", rep)
    assert r.exit_code == 2, r.output
    assert f"--report {rep}: cannot write (No space left on device)" in r.stderr
    assert f"The command itself succeeded: {out} was written." in r.stderr
    assert rep.read_text() == "old report\n" and out.is_file() and temps(tmp_path) == []


# --------------------------------------------------------------------------- 2. --force replaces only n2n's kind of output


def test_force_refuses_a_directory_holding_other_things(tmp_path, cli, hf_src):
    out = tmp_path / "work"
    out.mkdir()
    (out / "run.sh").write_text("echo hi\n")
    (out / "in").mkdir()
    (out / "in" / "data.txt").write_text("precious\n")
    (out / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    r = cli("widen", hf_src, out, "--dim", "intermediate_size", "--to", "48", "--force")
    assert r.exit_code == 2
    assert f"{out}: --force replaces only a model directory, and this one also holds in/, run.sh" in r.stderr
    assert snapshot(tmp_path) == before


def test_force_replaces_a_plain_model_directory_and_an_n2n_output(tmp_path, cli, hf_src):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "model-00001-of-00002.safetensors"):
        (out / name).write_text("old")
    r = cli("widen", hf_src, out, "--dim", "intermediate_size", "--to", "48", "--force", "--no-verify")
    assert r.exit_code == 0, r.output
    assert "tokenizer.json" not in os.listdir(out) and (out / "n2n_spec.yaml").is_file()
    (out / "notes.txt").write_text("copied from a source, as n2n copies every top-level file\n")
    r = cli("widen", hf_src, out, "--dim", "intermediate_size", "--to", "56", "--force", "--no-verify")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 56
    assert temps(tmp_path) == []


def test_force_refuses_a_file_that_is_not_a_checkpoint(tmp_path, cli, cnn_teacher):
    out = tmp_path / "x.safetensors"
    out.write_text("my notes, not a checkpoint\n")
    r = cli("grow", GROW, cnn_teacher, out, "--force")
    assert r.exit_code == 2
    assert f"{out}: exists and is not a safetensors checkpoint; --force replaces only a checkpoint" in r.stderr
    assert out.read_text() == "my notes, not a checkpoint\n" and temps(tmp_path) == []


# --------------------------------------------------------------------------- 3. signals and stale temporaries


def _start(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "n2n_cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_stage(proc, parent: Path, out_name: str) -> Path:
    """Wait until the staged output is complete (verification starts, which takes seconds)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for p in parent.iterdir():
            if p.name.endswith(".n2n-stage") and (p / out_name / "model.safetensors").is_file():
                return p
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    raise AssertionError("no stage directory appeared")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(tmp_path, hf_src, sig, code):
    out = tmp_path / "out"
    before = snapshot(hf_src)
    proc = _start(["widen", hf_src, out, "--dim", "hidden_size", "--to", "64", "--device", "cpu"], tmp_path)
    _wait_for_stage(proc, tmp_path, "out")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert f"interrupted by {sig.name}: nothing was written" in stderr and "Traceback" not in stderr
    assert temps(tmp_path) == [] and not out.exists() and snapshot(hf_src) == before


def test_after_sigkill_the_next_run_removes_stale_temporaries(tmp_path, cli, hf_src):
    out = tmp_path / "out"
    proc = _start(["widen", hf_src, out, "--dim", "hidden_size", "--to", "64", "--device", "cpu"], tmp_path)
    stage = _wait_for_stage(proc, tmp_path, "out")
    proc.kill()
    proc.communicate(timeout=60)
    assert temps(tmp_path) == [stage.name]  # what SIGKILL leaves
    r = cli("widen", hf_src, out, "--dim", "intermediate_size", "--to", "48", "--no-verify")
    assert r.exit_code == 0, r.output
    assert f"note: removed {stage} (" in r.stderr and "left by an n2n run that was killed" in r.stderr
    assert temps(tmp_path) == [] and (out / "model.safetensors").is_file()


def test_a_live_runs_temporaries_are_not_removed(tmp_path):
    out = tmp_path / "o.safetensors"
    with fsutil.temp_beside(out, "tmp") as live, fsutil.temp_beside(out, "stage", directory=True) as stage:
        (stage / "x").write_text("partial")
        assert fsutil.remove_stale_temps(tmp_path) == []
        assert live.exists() and (stage / "x").exists()
    assert temps(tmp_path) == []
    # a stale file and directory (no lock) are removed; look-alikes that are not n2n's are not
    stale_file, stale_dir = tmp_path / ".o.safetensors.abcd1234.n2n-tmp", tmp_path / ".out.k2_x9zqa.n2n-stage"
    stale_file.write_text("x")
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_text("x")
    (tmp_path / "notes.n2n-tmp").write_text("mine")
    (tmp_path / ".link.abcd1234.n2n-tmp").symlink_to(tmp_path / "notes.n2n-tmp")
    assert fsutil.remove_stale_temps(tmp_path) == [stale_file, stale_dir]
    assert sorted(os.listdir(tmp_path)) == [".link.abcd1234.n2n-tmp", "notes.n2n-tmp"]


# --------------------------------------------------------------------------- 4. full disk, free space


class _FullDisk(io.FileIO):
    """A file on a disk that fills up after ``limit`` bytes."""
    limit = 20_000

    def write(self, b):
        if self.tell() + len(b) > self.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)


def test_full_disk_ends_cleanly_and_keeps_the_old_output(tmp_path, cli, cnn_teacher, monkeypatch):
    out = tmp_path / "o.safetensors"
    assert cli("grow", GROW, cnn_teacher, out).exit_code == 0
    before = snapshot(tmp_path)
    monkeypatch.setattr(checkpoints, "open", lambda path, mode, *a, **k: _FullDisk(path, mode.replace("b", "")), raising=False)
    r = cli("grow", GROW, cnn_teacher, out, "--force", "--seed", "1")
    assert r.exit_code == 2
    assert f"error: {out}: cannot write (No space left on device)" in r.stderr
    assert snapshot(tmp_path) == before


def test_full_disk_hf_names_out_not_the_stage(tmp_path, hf_src, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(checkpoints, "open", lambda path, mode, *a, **k: _FullDisk(path, mode.replace("b", "")), raising=False)
    with pytest.raises(OutputError) as e:
        api.grow(spec_from_steps([{"widen": {"dim": "hidden_size", "to": 64}}]), hf_src, out, verify=False)
    assert e.value.render().startswith(f"{out}/model.safetensors: cannot write (No space left on device)")
    assert ".n2n-" not in e.value.render() and temps(tmp_path) == [] and not out.exists()


def test_full_disk_in_a_real_subprocess_with_a_file_size_limit(tmp_path, cnn_teacher):
    import resource

    out = tmp_path / "o.safetensors"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "n2n_cli", "grow", str(GROW), str(cnn_teacher), str(out),
                        "--device", "cpu"], env=env, capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"{out}: cannot write (File too large)" in r.stderr
    assert not out.exists() and temps(tmp_path) == []


def test_free_space_is_checked_before_any_work(tmp_path, cli, cnn_teacher, monkeypatch):
    monkeypatch.setattr(fsutil, "free_bytes", lambda d: 1000)
    out = tmp_path / "o.safetensors"
    r = cli("grow", GROW, cnn_teacher, out)
    assert r.exit_code == 2
    assert f"{out}: not enough free space: the output needs " in r.stderr and f"{tmp_path} has 1.0 KB free" in r.stderr
    assert not out.exists() and temps(tmp_path) == []
    t = time.perf_counter()
    for _ in range(1000):
        fsutil.check_free_space(out, 1)
    assert time.perf_counter() - t < 1.0  # a statvfs: microseconds


def test_free_space_hf(tmp_path, cli, hf_src, monkeypatch):
    monkeypatch.setattr(fsutil, "free_bytes", lambda d: 10**5)
    r = cli("widen", hf_src, tmp_path / "out", "--dim", "hidden_size", "--to", "64")
    assert r.exit_code == 2 and "not enough free space" in r.stderr and "100.0 KB free" in r.stderr
    assert temps(tmp_path) == [] and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 5. an OUT that appears meanwhile


def _appear(make):
    done = []

    def progress(phase, n, total):
        if phase == "writing" and not done:
            done.append(make())
    return progress


@pytest.mark.parametrize("renameat2", [True, False])
def test_a_file_out_that_appears_during_the_run_is_not_replaced(tmp_path, cnn_teacher, monkeypatch, renameat2):
    if not renameat2:  # the link-then-unlink fallback
        monkeypatch.setattr(fsutil, "_renameat2", lambda a, b, flags: False)
    out = tmp_path / "o.safetensors"
    with pytest.raises(OutputError) as e:
        api.grow(GROW, cnn_teacher, out, device="cpu", progress=_appear(lambda: out.write_text("theirs")))
    assert "appeared while n2n was running" in e.value.render() and "not replaced" in e.value.render()
    assert out.read_text() == "theirs" and temps(tmp_path) == []


def test_an_hf_out_that_appears_during_the_run_is_not_replaced(tmp_path, hf_src):
    out = tmp_path / "out"

    def make():
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")

    with pytest.raises(OutputError, match="appeared while n2n was running"):
        api.grow(spec_from_steps([{"widen": {"dim": "intermediate_size", "to": 48}}]), hf_src, out, verify=False,
                 progress=_appear(make))
    assert os.listdir(out) == ["theirs.txt"] and temps(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False])
def test_force_on_an_hf_out_swaps_it_whole(tmp_path, hf_src, monkeypatch, exchange):
    out = tmp_path / "out"
    spec = spec_from_steps([{"widen": {"dim": "intermediate_size", "to": 48}}])
    api.grow(spec, hf_src, out, verify=False)
    calls = []
    real = fsutil.exchange
    monkeypatch.setattr(fsutil, "exchange", lambda a, b: calls.append(b) or (real(a, b) if exchange else False))
    api.grow(spec_from_steps([{"widen": {"dim": "intermediate_size", "to": 56}}]), hf_src, out, verify=False, force=True)
    assert calls == [out] and json.loads((out / "config.json").read_text())["intermediate_size"] == 56
    assert temps(tmp_path) == []


# --------------------------------------------------------------------------- 6. '.', '..' and long names


def test_out_dot_and_dotdot_are_refused(tmp_path, cli, hf_src, monkeypatch):
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", ".."):
        r = cli("widen", hf_src, out, "--dim", "intermediate_size", "--to", "48", "--force")
        assert r.exit_code == 2 and f"{out}: OUT must name a new file or directory, not '.', '..' or '/'" in r.stderr
    assert os.listdir(work) == [] and temps(tmp_path) == []


def test_long_output_names_within_name_max(tmp_path, cli, cnn_teacher, hf_src):
    out = tmp_path / ("a" * (255 - len(".safetensors")) + ".safetensors")
    r = cli("grow", GROW, cnn_teacher, out)
    assert r.exit_code == 0, r.output
    hf_out = tmp_path / ("d" * 250)
    r = cli("widen", hf_src, hf_out, "--dim", "intermediate_size", "--to", "48", "--no-verify")
    assert r.exit_code == 0, r.output
    assert out.is_file() and (hf_out / "model.safetensors").is_file() and temps(tmp_path) == []
    assert all(len(fsutil.temp_name("é" * 200, k).encode()) <= 255 and fsutil.is_temp_name(fsutil.temp_name("é" * 200, k))
               for k in fsutil.TEMP_KINDS)


# --------------------------------------------------------------------------- non-regular inputs


def test_non_regular_inputs_are_refused(tmp_path, cli, cnn_teacher, hf_src):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    r = cli("grow", GROW, fifo, tmp_path / "o.safetensors")
    assert r.exit_code == 2 and f"{fifo}: not a regular file (a FIFO (named pipe))" in r.stderr
    zero = tmp_path / "zero.pt"
    zero.symlink_to("/dev/zero")
    r = cli("inspect", zero)
    assert r.exit_code == 2 and "not a regular file (a character device)" in r.stderr
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    r = cli("grow", GROW, loop, tmp_path / "o.safetensors")
    assert r.exit_code == 2 and f"{loop}: cannot be opened: a symlink loop" in r.stderr
    spec_fifo = tmp_path / "spec.yaml"
    os.mkfifo(spec_fifo)
    r = cli("grow", spec_fifo, cnn_teacher, tmp_path / "o.safetensors")
    assert r.exit_code == 2 and "not a regular file" in r.stderr
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s.safetensors"))
    r = cli("inspect", tmp_path / "s.safetensors")
    sock.close()
    assert r.exit_code == 2 and "not a regular file (a socket)" in r.stderr
    (hf_src / "config.json").rename(tmp_path / "c.json")
    os.mkfifo(hf_src / "config.json")
    r = cli("inspect", hf_src)
    assert r.exit_code == 2 and f"{hf_src / 'config.json'}: not a regular file" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_check_output_helpers(tmp_path, cnn_teacher):
    assert outputs.safetensors_header(cnn_teacher) is not None
    bad = tmp_path / "t.safetensors"
    bad.write_bytes(cnn_teacher.read_bytes()[:-1])  # truncated
    assert outputs.safetensors_header(bad) is None
    with pytest.raises(OutputError, match="not a safetensors checkpoint"):
        checkpoints.check_output_path(bad, [cnn_teacher], force=True)
    # the teacher's description loads: the helpers import nothing heavy
    assert load_model_description(CNN_YAML) is not None and make_teacher is not None


def test_an_old_output_left_aside_by_a_kill_is_restored_not_deleted(tmp_path):
    holder = tmp_path / ".out.0123abcd.n2n-old"  # a kill between the two renames of a non-atomic replace
    (holder / "old").mkdir(parents=True)
    (holder / "old" / "config.json").write_text("{}")
    assert fsutil.remove_stale_temps(tmp_path) == []
    assert os.listdir(tmp_path) == ["out"] and (tmp_path / "out" / "config.json").read_text() == "{}"


def test_signal_handlers_are_restored_after_a_command(cli, cnn_teacher):
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]
    assert cli("inspect", cnn_teacher).exit_code == 0
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)] == before
