"""Reproduce the Net2Net experiment end to end with n2n, on real handwritten digits.

A teacher CNN (``specs/models/digits-cnn.yaml``: conv 64 -> pool -> conv 64 -> pool ->
fc 64 relu -> fc 10, the Keras ``mnist_net2net`` example's network) is trained with SGD
(momentum 0.9, lr 0.01) and saved as safetensors with its model description. n2n's Python
API (``n2n_cli.api.grow``, the code path behind ``n2n grow``) then grows it into four students:

    wider_random_pad     conv1 64 -> 128, fc1 64 -> 128, new units random (baseline)
    wider_net2wider      the same widths by Net2WiderNet (function-preserving)
    deeper_random_init   a conv after conv2 and a linear after fc1, PyTorch default init (baseline)
    deeper_net2deeper    the same layers identity-initialised by Net2DeeperNet (function-preserving)

Each student trains with lr / 10 for the same number of epochs. Validation loss and accuracy
are recorded at epoch 0 (before any training of that run) and after every epoch, for all
five runs, in eval mode (batchnorm running statistics, dropout off), by one function. The
script prints a table of validation losses, writes ``results.json`` and ``val_loss.png``
(the five curves; needs matplotlib) into ``--out`` together with the teacher and the
grown students, and says whether the function-preserving students start at the teacher's
final validation loss and whether they end at least as well as their random baselines.

Data: scikit-learn's bundled handwritten digits by default (1797 real 8x8 scans, split
75/25 stratified with the seed); ``--mnist DIR`` reads the standard MNIST IDX files
(``train-images-idx3-ubyte`` etc., gzipped or not; t10k is the validation set) and adapts
the model's ``input_shape`` to 28x28. Nothing is downloaded. The full digits are easy: after
10 student epochs every arm is within seed noise of the others, and the function-preserving
students' advantage shows during training (epochs 1-3). ``--train-fraction`` trains teacher
and students on a stratified fraction of the training split, where the arms stay apart.

    pip install -e '.[repro]'                                   # scikit-learn, matplotlib
    python scripts/reproduce_net2net.py                          # default run (digits)
    python scripts/reproduce_net2net.py --quick                  # the CI smoke run
    python scripts/reproduce_net2net.py --train-fraction 0.1     # harder: 136 training images
    python scripts/reproduce_net2net.py --mnist ~/data/mnist --epochs 3

Everything is seeded (``--seed``): the split, the teacher's initialisation, the batch order and
dropout masks (one torch.Generator per run, the same for every student), and n2n's growth.
Torch runs on one thread by default (``--threads``), so the figures are the same on any machine
with the same torch build; ``results.json`` records the git revision of the n2n that made them.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from n2n_cli import __version__ as n2n_version
from n2n_cli import api
from n2n_cli.checkpoints import open_checkpoint, write_safetensors
from n2n_cli.model import ModelDescription, to_torch_module
from n2n_cli.spec import load_model_description, spec_from_steps

ROOT = Path(__file__).resolve().parent.parent
MODEL_YAML = ROOT / "specs" / "models" / "digits-cnn.yaml"

TEACHER = "teacher"
ARMS = ("wider_random_pad", "wider_net2wider", "deeper_random_init", "deeper_net2deeper")
RUNS = (TEACHER, *ARMS)
FUNCTION_PRESERVING = {"wider_net2wider": "wider_random_pad", "deeper_net2deeper": "deeper_random_init"}
BASELINES = tuple(FUNCTION_PRESERVING.values())

#: the default run and --quick (CI): epochs, and the fraction of the training split used
DEFAULT_EPOCHS = 10
QUICK_EPOCHS = 3
MOMENTUM = 0.9
EVAL_BATCH = 1024
#: "measurably worse": a baseline's epoch-0 validation loss is this much (relative) above the teacher's final one
BASELINE_MARGIN = 0.10
#: "has the teacher's final validation loss": within this relative difference
PRESERVED_RTOL = 1e-4


def growth_steps(arm: str, noise: float) -> list[dict]:
    """The n2n growth steps of one student (the seed experiment's widths and layers)."""
    if arm == "wider_random_pad":
        return [{"widen": {"layer": "conv1", "to": 128, "method": "random-pad"}},
                {"widen": {"layer": "fc1", "to": 128, "method": "random-pad"}}]
    if arm == "wider_net2wider":
        return [{"widen": {"layer": "conv1", "to": 128, "method": "net2wider", "noise": noise}},
                {"widen": {"layer": "fc1", "to": 128, "method": "net2wider", "noise": noise}}]
    if arm == "deeper_random_init":
        return [{"deepen": {"after": "conv2", "method": "random-init"}},
                {"deepen": {"after": "fc1", "method": "random-init"}}]
    if arm == "deeper_net2deeper":
        return [{"deepen": {"after": "conv2", "method": "net2deeper"}},
                {"deepen": {"after": "fc1", "method": "net2deeper"}}]
    raise ValueError(f"unknown arm {arm!r}")


# ----------------------------------------------------------------------------- data


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # [N, C, H, W] float32, standardised with the training split's statistics
    y_train: torch.Tensor  # [N] int64
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def input_shape(self) -> list[int]:
        return list(self.x_train.shape[1:])

    def summary(self) -> dict:
        return {"name": self.name, "input_shape": self.input_shape, "train": len(self.y_train),
                "val": len(self.y_val), "classes": int(self.y_train.max()) + 1}


def stratified_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (chosen, rest), taking ``fraction`` of every class (at least one), seeded."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        chosen.append(idx[:max(1, int(round(fraction * len(idx))))])
    picked = np.sort(np.concatenate(chosen))
    return picked, np.setdiff1d(np.arange(len(labels)), picked)


def _make_dataset(name: str, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                  y_val: np.ndarray) -> Dataset:
    mean, std = float(x_train.mean()), float(x_train.std())

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((x.astype(np.float32) - mean) / std)[:, None, :, :]).contiguous()

    return Dataset(name, tensor(x_train), torch.from_numpy(y_train.astype(np.int64)),
                   tensor(x_val), torch.from_numpy(y_val.astype(np.int64)))


def load_digits_dataset(seed: int, val_fraction: float = 0.25) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (no download), split stratified with ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("scikit-learn is needed for the bundled digits: pip install -e '.[repro]' "
                 "(or pass --mnist DIR with the MNIST IDX files)")
    digits = load_digits()
    images, labels = np.asarray(digits.images, dtype=np.float32), np.asarray(digits.target)
    val, train = stratified_indices(labels, val_fraction, seed)
    return _make_dataset("sklearn-digits-8x8", images[train], labels[train], images[val], labels[val])


_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped (by its magic bytes) or raw."""
    path = Path(path)
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    count = math.prod(dims)
    body = data[4 + 4 * ndim:]
    if len(body) != count * dtype.itemsize:
        raise ValueError(f"{path}: expected {count * dtype.itemsize} bytes of data for shape {list(dims)}, "
                         f"found {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def find_idx(directory: Path, stem: str) -> Path:
    """``train-images-idx3-ubyte`` or its ``.gz`` (or the ``train-images.idx3-ubyte`` spelling)."""
    names = [stem, stem.replace("-idx", ".idx")]
    for name in names:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"--mnist {directory}: no {stem} or {stem}.gz there")


def load_mnist_dataset(directory: str | os.PathLike) -> Dataset:
    """The standard MNIST files: the 60k training images train, the 10k t10k images validate."""
    d = Path(directory)
    arrays = {stem: read_idx(find_idx(d, stem)) for stem in
              ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    for split in ("train", "t10k"):
        images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"--mnist {d}: {split} images {list(images.shape)} and labels {list(labels.shape)} "
                             "do not match")
    return _make_dataset("mnist", arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"],
                         arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"])


def subsample_train(data: Dataset, fraction: float, seed: int) -> Dataset:
    if fraction >= 1:
        return data
    keep, _ = stratified_indices(data.y_train.numpy(), fraction, seed + 1)
    idx = torch.from_numpy(keep)
    return Dataset(f"{data.name}, train fraction {fraction:g}", data.x_train[idx], data.y_train[idx],
                   data.x_val, data.y_val)


# ----------------------------------------------------------------------------- training


@dataclass
class History:
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    train_loss: list[float | None] = field(default_factory=list)  # None at epoch 0
    seconds: float = 0.0


def evaluate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode (the same for every run and epoch)."""
    net.eval()
    total, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(y), EVAL_BATCH):
            logits = net(x[i:i + EVAL_BATCH])
            total += float(F.cross_entropy(logits, y[i:i + EVAL_BATCH], reduction="sum").double())
            correct += int((logits.argmax(1) == y[i:i + EVAL_BATCH]).sum())
    return total / len(y), correct / len(y)


def train(net: torch.nn.Module, data: Dataset, *, lr: float, epochs: int, batch_size: int, seed: int,
          log: Callable[[str], None], label: str) -> History:
    """SGD with momentum; evaluates before training (epoch 0) and after every epoch."""
    torch.manual_seed(seed)  # dropout masks
    order = torch.Generator().manual_seed(seed)  # batch order
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=MOMENTUM)
    hist = History()
    start = time.perf_counter()

    def record(epoch: int, train_loss: float | None) -> None:
        loss, acc = evaluate(net, data.x_val, data.y_val)
        hist.val_loss.append(loss)
        hist.val_acc.append(acc)
        hist.train_loss.append(train_loss)
        log(f"  {label:<19} epoch {epoch:>2}  val loss {loss:.4f}  val acc {acc:.4f}"
            + (f"  train loss {train_loss:.4f}" if train_loss is not None else ""))

    record(0, None)
    n = len(data.y_train)
    for epoch in range(1, epochs + 1):
        net.train()
        perm = torch.randperm(n, generator=order)
        running = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(net(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach()) * len(idx)
        record(epoch, running / n)
    hist.seconds = time.perf_counter() - start
    return hist


def save_checkpoint(net: torch.nn.Module, desc: ModelDescription, path: Path) -> None:
    """safetensors with the model description in the metadata, so n2n needs no --model. Written
    with n2n's deterministic writer (safetensors' save_file orders metadata keys at random, which
    would change the teacher's sha256 in the students' lineage from run to run)."""
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    write_safetensors(path, [(k, v.dtype, tuple(v.shape)) for k, v in state.items()], state.__getitem__,
                      {"format": "pt", api.META_MODEL: desc.to_json()})


def grow_student(arm: str, teacher_path: Path, out: Path, *, seed: int, noise: float) -> tuple[torch.nn.Module, dict]:
    """Grow the teacher with n2n's API (what ``n2n grow`` runs) and load the result into a module."""
    spec = spec_from_steps(growth_steps(arm, noise), seed=seed)
    report = api.grow(spec, teacher_path, out, force=True, device="cpu")
    with open_checkpoint(out) as source:
        desc = api.model_from_metadata(source)
    assert desc is not None, "n2n writes the grown model description into the checkpoint"
    net = to_torch_module(desc)
    net.load_state_dict(load_file(str(out)))
    return net, report


def growth_summary(arm: str, noise: float, report: dict) -> dict:
    """What n2n did and verified: exactness of the function-preserving counterpart on random probes,
    and (for noise or a baseline method) how far the written student moved from the teacher."""
    v = report["verification"]
    deviation = v.get("deviation") or {}
    return {"steps": growth_steps(arm, noise), "summary": [s["summary"] for s in report["plan"]["steps"]],
            "function_preserving": report["plan"]["function_preserving"], "verification_passed": v["passed"],
            "exact_counterpart_passed": (v.get("exact_counterpart") or {}).get("passed"),
            "checked": v.get("checked"), "student_max_abs_deviation": deviation.get("max_abs_error")}


def git_revision() -> str | None:
    """The repository's commit (``+dirty`` with local changes), to tie figures to the n2n that made them."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def num_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ----------------------------------------------------------------------------- reporting


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def checks(runs: dict[str, History], *, margin: float = BASELINE_MARGIN) -> dict:
    """What the experiment must show, measured. ``margin``: how much worse (relative) a baseline's
    epoch-0 loss must be than the teacher's final one to count as "measurably worse"."""
    final = runs[TEACHER].val_loss[-1]
    start = {arm: runs[arm].val_loss[0] for arm in ARMS}
    end = {arm: runs[arm].val_loss[-1] for arm in ARMS}
    return {
        "teacher_final_val_loss": final,
        "epoch0_val_loss": start,
        "epoch0_rel_diff_to_teacher": {arm: rel_diff(start[arm], final) for arm in ARMS},
        "function_preserving_start_at_teacher": all(rel_diff(start[a], final) <= PRESERVED_RTOL for a in FUNCTION_PRESERVING),
        "baselines_start_worse": all(start[b] > final * (1 + margin) for b in BASELINES),
        "final_val_loss": end,
        "final_val_acc": {arm: runs[arm].val_acc[-1] for arm in ARMS},
        "best_val_loss": {arm: min(runs[arm].val_loss[1:]) for arm in ARMS},
        # the area under the curve after growth: how fast each student learns, not only where it ends
        "mean_val_loss_after_epoch0": {arm: sum(runs[arm].val_loss[1:]) / (len(runs[arm].val_loss) - 1)
                                       for arm in ARMS},
        "function_preserving_end_at_least_as_good": {
            fp: end[fp] <= end[base] for fp, base in FUNCTION_PRESERVING.items()},
        "final_gap_baseline_minus_function_preserving": {
            fp: end[base] - end[fp] for fp, base in FUNCTION_PRESERVING.items()},
    }


def format_table(runs: dict[str, History], metric: str = "val_loss", digits: int = 4) -> str:
    width = max(len(getattr(h, metric)) for h in runs.values())
    head = f"{'run':<20}" + "".join(f"{f'epoch {e}':>{digits + 6}}" for e in range(width))
    lines = [head, "-" * len(head)]
    for name in RUNS:
        values = getattr(runs[name], metric)
        lines.append(f"{name:<20}" + "".join(f"{v:>{digits + 6}.{digits}f}" for v in values))
    return "\n".join(lines)


def plot(runs: dict[str, History], path: Path, title: str) -> bool:
    """The five validation-loss curves; students continue from the teacher's last epoch."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    t_epochs = len(runs[TEACHER].val_loss) - 1
    styles = {TEACHER: ("black", "-"), "wider_random_pad": ("tab:orange", "--"),
              "wider_net2wider": ("tab:orange", "-"), "deeper_random_init": ("tab:blue", "--"),
              "deeper_net2deeper": ("tab:blue", "-")}
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for name in RUNS:
        losses = runs[name].val_loss
        x = np.arange(len(losses)) + (0 if name == TEACHER else t_epochs)
        color, ls = styles[name]
        ax.plot(x, losses, color=color, linestyle=ls, marker="o", markersize=3, label=name)
    ax.axvline(t_epochs, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("epoch (teacher, then students grown from its last epoch)")
    ax.set_ylabel("validation loss (cross-entropy)")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=None,
                   help=f"teacher and student epochs (default {DEFAULT_EPOCHS}, --quick {QUICK_EPOCHS})")
    p.add_argument("--teacher-epochs", type=int, default=None, help="override the teacher's epochs")
    p.add_argument("--quick", action="store_true", help="the CI smoke run: fewer epochs, well under 2 minutes")
    p.add_argument("--mnist", metavar="DIR", default=None,
                   help="read MNIST IDX files from DIR instead of scikit-learn's 8x8 digits")
    p.add_argument("--train-fraction", type=float, default=1.0,
                   help="use this fraction of the training split (stratified), for a harder setting")
    p.add_argument("--out", metavar="DIR", default="results", help="output directory (default results/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.01, help="the teacher's learning rate; students use lr / 10")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--noise", type=float, default=0.05,
                   help="net2wider symmetry-breaking noise (zero-sum: still exact); 0 for none")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: this network is too small to gain from more, the "
                        "figures do not depend on the machine's core count, and a busy 2-core CI machine does "
                        "not stall on spinning threads)")
    p.add_argument("--model", metavar="YAML", default=str(MODEL_YAML),
                   help="teacher model description (its input_shape is replaced by the data's)")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS
    if args.teacher_epochs is None:
        args.teacher_epochs = args.epochs
    if args.epochs < 1 or args.teacher_epochs < 1:
        p.error("--epochs and --teacher-epochs must be at least 1")
    if not 0 < args.train_fraction <= 1:
        p.error("--train-fraction must be in (0, 1]")
    return args


@contextlib.contextmanager
def torch_settings(threads: int) -> Iterator[None]:
    """Thread count and deterministic algorithms for the run, restored afterwards (for callers
    that import ``main``, such as the tests)."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the experiment; returns what it writes to ``results.json``."""
    args = parse_args(argv)
    with torch_settings(args.threads):
        return run_experiment(args)


def run_experiment(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    out = Path(args.out)
    (out / "students").mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    data = load_mnist_dataset(args.mnist) if args.mnist else load_digits_dataset(args.seed)
    data = subsample_train(data, args.train_fraction, args.seed)
    base = load_model_description(args.model)
    desc = ModelDescription(kind=base.kind, input_shape=data.input_shape, layers=base.layers)
    student_lr = args.lr / 10
    log(f"data: {data.name}: {len(data.y_train)} train / {len(data.y_val)} validation samples, "
        f"input {data.input_shape}; teacher {args.teacher_epochs} epochs at lr {args.lr:g}, "
        f"students {args.epochs} epochs at lr {student_lr:g}, batch {args.batch_size}, seed {args.seed}")

    # 1. the teacher
    torch.manual_seed(args.seed)
    teacher = to_torch_module(desc)
    runs: dict[str, History] = {}
    params: dict[str, int] = {TEACHER: num_parameters(teacher)}
    runs[TEACHER] = train(teacher, data, lr=args.lr, epochs=args.teacher_epochs, batch_size=args.batch_size,
                          seed=args.seed, log=log, label=TEACHER)
    teacher_path = out / "teacher.safetensors"
    save_checkpoint(teacher, desc, teacher_path)

    # 2-3. grow with n2n, train each student from the same batch order and dropout seed
    growth: dict[str, dict] = {}
    for arm in ARMS:
        student, report = grow_student(arm, teacher_path, out / "students" / f"{arm}.safetensors",
                                       seed=args.seed, noise=args.noise)
        params[arm] = num_parameters(student)
        growth[arm] = growth_summary(arm, args.noise, report)
        runs[arm] = train(student, data, lr=student_lr, epochs=args.epochs, batch_size=args.batch_size,
                          seed=args.seed + 1, log=log, label=arm)

    # 4. report
    result_checks = checks(runs)
    results = {
        "experiment": "net2net reproduction (scripts/reproduce_net2net.py)",
        "n2n_version": n2n_version, "git_revision": git_revision(), "torch_version": torch.__version__,
        "config": {"epochs": args.epochs, "teacher_epochs": args.teacher_epochs, "quick": args.quick,
                   "lr_teacher": args.lr, "lr_student": student_lr, "momentum": MOMENTUM,
                   "batch_size": args.batch_size, "seed": args.seed, "train_fraction": args.train_fraction,
                   "net2wider_noise": args.noise, "net2wider_noise_mode": "zero-sum", "threads": args.threads,
                   "model": json.loads(desc.to_json())},
        "data": data.summary(),
        "runs": {name: {**asdict(runs[name]), "params": params[name],
                        "lr": args.lr if name == TEACHER else student_lr} for name in RUNS},
        "growth": growth,
        "checks": result_checks,
    }
    log("\nvalidation loss (epoch 0 = before that run's training; students start from the teacher's last epoch)")
    log(format_table(runs))
    log("\nvalidation accuracy")
    log(format_table(runs, "val_acc"))
    c = result_checks
    log(f"\nteacher's final validation loss {c['teacher_final_val_loss']:.6f}")
    for arm in ARMS:
        log(f"  {arm:<19} epoch 0: {c['epoch0_val_loss'][arm]:.6f} (relative difference "
            f"{c['epoch0_rel_diff_to_teacher'][arm]:.2e}); epoch {args.epochs}: {c['final_val_loss'][arm]:.4f}, "
            f"best {c['best_val_loss'][arm]:.4f}, mean over epochs 1-{args.epochs}: "
            f"{c['mean_val_loss_after_epoch0'][arm]:.4f}")
    log(f"function-preserving students start at the teacher's loss (<= {PRESERVED_RTOL:g} relative): "
        f"{c['function_preserving_start_at_teacher']}")
    log(f"random baselines start measurably worse (> {BASELINE_MARGIN:.0%} above): {c['baselines_start_worse']}")
    for fp, base in FUNCTION_PRESERVING.items():
        log(f"{fp} ends at least as good as {base}: {c['function_preserving_end_at_least_as_good'][fp]} "
            f"({c['final_val_loss'][fp]:.4f} vs {c['final_val_loss'][base]:.4f})")
    png = out / "val_loss.png"
    title = (f"Net2Net with n2n on {data.name} ({len(data.y_train)} training samples)\n"
             f"teacher {args.teacher_epochs} epochs at lr {args.lr:g}, students {args.epochs} epochs at lr "
             f"{student_lr:g}, seed {args.seed}")
    results["plot"] = png.name if plot(runs, png, title) else None
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"\nwrote {out / 'results.json'}" + (f" and {png}" if results["plot"] else " (no plot: matplotlib is not "
                                                                                       "installed)")
        + f" in {results['seconds']:.1f}s")
    return results


if __name__ == "__main__":
    main()
