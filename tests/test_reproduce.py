"""scripts/reproduce_net2net.py: the quick run's epoch-0 properties, and the MNIST IDX reader."""

from __future__ import annotations

import gzip
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import load_module

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "reproduce_net2net.py"
RUNS = ("teacher", "wider_random_pad", "wider_net2wider", "deeper_random_init", "deeper_net2deeper")


@pytest.fixture(scope="module")
def repro():
    yield load_module(SCRIPT, "reproduce_net2net")
    sys.modules.pop("reproduce_net2net", None)


@pytest.fixture(scope="module")
def quick(repro, tmp_path_factory):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("repro-quick")
    repro.main(["--quick", "--out", str(out)])
    return out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_quick_run_writes_results_and_plot(quick):
    results = json.loads((quick / "results.json").read_text())
    assert set(results["runs"]) == set(RUNS)
    epochs = results["config"]["epochs"]
    for name in RUNS:
        run = results["runs"][name]
        n = (results["config"]["teacher_epochs"] if name == "teacher" else epochs) + 1
        assert len(run["val_loss"]) == len(run["val_acc"]) == n
        assert all(np.isfinite(run["val_loss"]))
    assert (quick / "val_loss.png").stat().st_size > 0
    assert (quick / "teacher.safetensors").exists()
    for arm in RUNS[1:]:
        assert (quick / "students" / f"{arm}.safetensors").exists()


def test_quick_run_epoch0_properties(quick):
    results = json.loads((quick / "results.json").read_text())
    runs = results["runs"]
    final = runs["teacher"]["val_loss"][-1]
    # function-preserving students start exactly where the teacher ended
    for arm in ("wider_net2wider", "deeper_net2deeper"):
        assert _rel(runs[arm]["val_loss"][0], final) <= 1e-4, arm
        assert runs[arm]["val_acc"][0] == pytest.approx(runs["teacher"]["val_acc"][-1])
        assert results["growth"][arm]["function_preserving"] is True
        assert results["growth"][arm]["verification_passed"] is True
    # random baselines start clearly worse
    for arm in ("wider_random_pad", "deeper_random_init"):
        assert runs[arm]["val_loss"][0] > 1.5 * final, arm
        assert results["growth"][arm]["function_preserving"] is False
    checks = results["checks"]
    assert checks["function_preserving_start_at_teacher"] is True
    assert checks["baselines_start_worse"] is True


def test_quick_run_students_are_grown_models(quick):
    from n2n_cli.api import model_from_metadata
    from n2n_cli.checkpoints import open_checkpoint

    with open_checkpoint(quick / "students" / "wider_net2wider.safetensors") as src:
        desc = model_from_metadata(src)
    widths = [(layer.name, layer.out_channels if layer.type == "conv2d" else layer.out_features)
              for layer in desc.layers if layer.type in ("conv2d", "linear")]
    assert widths == [("conv1", 128), ("conv2", 64), ("fc1", 128), ("fc2", 10)]
    with open_checkpoint(quick / "students" / "deeper_net2deeper.safetensors") as src:
        desc = model_from_metadata(src)
    names = [layer.name for layer in desc.layers if layer.type in ("conv2d", "linear")]
    assert names == ["conv1", "conv2", "conv2_deeper", "fc1", "fc1_deeper", "fc2"]
    assert desc.input_shape == [1, 8, 8]


# ----------------------------------------------------------------------------- MNIST IDX files


def _idx_bytes(array: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_read_idx_roundtrip(repro, tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    ints = rng.integers(-1000, 1000, size=(7,)).astype(">i4")
    for name, array in (("images-idx3-ubyte", images), ("ints-idx1-int", ints)):
        path = tmp_path / (name + (".gz" if gz else ""))
        data = _idx_bytes(array)
        path.write_bytes(gzip.compress(data) if gz else data)
        back = repro.read_idx(path)
        assert back.shape == array.shape
        np.testing.assert_array_equal(back, array)


def test_read_idx_rejects_bad_files(repro, tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        repro.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(_idx_bytes(np.zeros((2, 3), np.uint8))[:-1])
    with pytest.raises(ValueError, match="expected 6 bytes"):
        repro.read_idx(short)


def _write_fake_mnist(directory: Path, n_train: int, n_val: int, *, gz: bool) -> None:
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("t10k", n_val)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        for name, array in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
            data = _idx_bytes(array)
            (directory / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_load_mnist_dataset(repro, tmp_path, gz):
    _write_fake_mnist(tmp_path, 30, 20, gz=gz)
    data = repro.load_mnist_dataset(tmp_path)
    assert data.summary() == {"name": "mnist", "input_shape": [1, 28, 28], "train": 30, "val": 20, "classes": 10}
    assert abs(float(data.x_train.mean())) < 1e-4  # standardised with the training split's statistics


def test_missing_mnist_file_is_reported(repro, tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        repro.load_mnist_dataset(tmp_path)


def test_mnist_end_to_end_tiny(repro, tmp_path):
    """The --mnist path runs (on a tiny fake set) and grows a 28x28 model function-preservingly."""
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    _write_fake_mnist(data_dir, 40, 20, gz=True)
    results = repro.main(["--mnist", str(data_dir), "--epochs", "1", "--out", str(tmp_path / "out")])
    assert results["data"]["input_shape"] == [1, 28, 28]
    final = results["runs"]["teacher"]["val_loss"][-1]
    for arm in ("wider_net2wider", "deeper_net2deeper"):
        assert _rel(results["runs"][arm]["val_loss"][0], final) <= 1e-4
