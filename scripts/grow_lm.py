"""Does growth pay off for a language model? A measured time-to-loss speed-up with n2n.

A small LLaMA-family teacher (transformers' LlamaForCausalLM: 2 layers, hidden 128) is trained
on CPU for a fixed budget on an offline corpus, grown by n2n (``n2n_cli.api.grow``, the code path
of ``n2n grow``) to twice the depth and twice the width (hidden, MLP and heads x2, blocks
interleaved with zeroed output projections: exact), and training continues. At equal total
training compute (the teacher's included; FLOPs and wall time both recorded) five arms of the
same student architecture are compared:

    n2n_opt        n2n growth, training continued with the teacher's AdamW state grown by n2n
                   (``--optimizer-state``: moments follow the gradients; inserted tensors fresh)
    n2n            n2n growth, a fresh optimizer
    scratch        the student architecture trained from scratch for the whole budget
    random_new     the teacher's weights in the student's top-left slices, everything new at
                   the default init (random init of the new parts; not function-preserving)
    stack          n2n's width growth, then SOLAR / G_stack-style layer duplication: the inserted
                   blocks are full copies (output projections not zeroed; not function-preserving)

Corpus: the Python standard library's own source files (``sysconfig.get_paths()['stdlib']``, on
every machine with Python), byte-level tokens (vocabulary 256), split into train and validation
by file with the seed. Validation loss is measured on a fixed set of windows of the validation
files. The speed-up of an arm is the compute the scratch arm needs to reach its own final
validation loss divided by the compute the arm needs to reach that loss (teacher included).

    python scripts/grow_lm.py                 # the default run (3 seeds)
    python scripts/grow_lm.py --quick         # the CI smoke run (one seed, tiny, under a minute)

Writes ``results.json`` and ``val_loss.png`` (matplotlib) into ``--out``. Everything is seeded
(split, initialisation, batch order, n2n's growth); torch runs on one thread by default
(``--threads``), so the figures are the same on any machine with the same torch build.
What it does not show: a 2-core CPU and a few minutes of training are far from the regimes of the
published claims (HyperCloning, G_stack, bert2BERT, LEMON); the figures are for this setting.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from n2n_cli import __version__ as n2n_version
from n2n_cli import api

ARMS = ("n2n_opt", "n2n", "scratch", "random_new", "stack")
FUNCTION_PRESERVING = ("n2n_opt", "n2n")


@dataclass
class Setting:
    hidden: int = 128
    layers: int = 2
    intermediate: int = 256
    heads: int = 4
    seq: int = 128
    batch: int = 8
    teacher_steps: int = 200
    student_steps: int = 100
    eval_every: int = 10
    val_windows: int = 32
    lr: float = 2e-3
    warmup: int = 20
    corpus_mb: float = 8.0


DEFAULT = Setting()
QUICK = Setting(hidden=32, layers=2, intermediate=64, heads=2, seq=32, batch=4, teacher_steps=30, student_steps=16,
                eval_every=4, val_windows=8, lr=3e-3, warmup=4, corpus_mb=0.5)


# ----------------------------------------------------------------------------- data


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "dist-packages")
    return sorted(p for p in root.rglob("*.py") if not any(s in p.parts for s in skip) and p.is_file())


def load_corpus(seed: int, corpus_mb: float, val_fraction: float = 0.1) -> dict:
    """Byte tokens of the stdlib's source files, split by file (seeded): (train, val) uint8 tensors."""
    files = stdlib_files()
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    budget = int(corpus_mb * 2 ** 20)
    n_val = max(1, int(len(files) * val_fraction))
    parts = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    names = {"train": 0, "val": 0}
    for rank, i in enumerate(order):
        split = "val" if rank < n_val else "train"
        cap = budget * (val_fraction if split == "val" else 1)
        if sizes[split] >= cap:
            continue
        try:
            data = files[i].read_bytes()
        except OSError:
            continue
        parts[split].append(data)
        sizes[split] += len(data)
        names[split] += 1
    out = {k: torch.frombuffer(bytearray(b"\n".join(v)), dtype=torch.uint8).clone() for k, v in parts.items()}
    return {**out, "files": names, "bytes": {k: int(v.numel()) for k, v in out.items()},
            "root": sysconfig.get_paths()["stdlib"]}


def windows(data: torch.Tensor, n: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - seq - 1, (n,), generator=gen)
    return torch.stack([data[s:s + seq] for s in starts.tolist()]).long()


# ----------------------------------------------------------------------------- models and compute


def llama_config(s: Setting, *, scale: int = 1):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=256, hidden_size=s.hidden * scale, intermediate_size=s.intermediate * scale,
        num_hidden_layers=s.layers * scale, num_attention_heads=s.heads * scale,
        num_key_value_heads=s.heads * scale, head_dim=s.hidden // s.heads, max_position_embeddings=max(s.seq, 64),
        rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager")


def new_model(config, seed: int):
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def flops_per_step(config, s: Setting) -> float:
    """Training FLOPs of one step: 6 N per token (N: parameters outside the embedding lookup) plus
    attention's 6 L T d_attn per token (Kaplan et al. 2020)."""
    n = (config.num_hidden_layers * (2 * config.hidden_size * config.num_attention_heads * config.head_dim
                                     + 2 * config.hidden_size * config.num_key_value_heads * config.head_dim
                                     + 3 * config.hidden_size * config.intermediate_size)
         + config.hidden_size * config.vocab_size)
    attn = config.num_hidden_layers * s.seq * config.num_attention_heads * config.head_dim
    return 6.0 * (n + attn) * s.seq * s.batch


@torch.no_grad()
def val_loss(model, val: torch.Tensor) -> float:
    model.eval()
    total = 0.0
    for i in range(0, val.shape[0], 8):
        ids = val[i:i + 8]
        total += float(model(input_ids=ids, labels=ids).loss) * ids.shape[0]
    model.train()
    return total / val.shape[0]


def make_optimizer(model, lr: float):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def train(model, opt, *, steps: int, data: torch.Tensor, val: torch.Tensor, s: Setting, gen: torch.Generator,
          step_flops: float, flops0: float = 0.0, wall0: float = 0.0, warmup: bool = True,
          history: list | None = None) -> list[dict]:
    """Train ``steps`` AdamW steps (linear warm-up when ``warmup``, then constant lr), evaluating every
    ``s.eval_every`` steps. History points: step, cumulative FLOPs and training wall time, val loss."""
    history = [] if history is None else history
    history.append({"step": 0, "flops": flops0, "wall_s": wall0, "val_loss": val_loss(model, val)})
    wall = wall0
    model.train()
    for step in range(1, steps + 1):
        lr = s.lr * min(1.0, step / s.warmup) if warmup else s.lr
        for g in opt.param_groups:
            g["lr"] = lr
        ids = windows(data, s.batch, s.seq, gen)
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        wall += time.perf_counter() - t
        if step % s.eval_every == 0 or step == steps:
            history.append({"step": step, "flops": flops0 + step * step_flops, "wall_s": wall,
                            "val_loss": val_loss(model, val)})
    return history


# ----------------------------------------------------------------------------- growth


def growth_spec(s: Setting, seed: int) -> dict:
    return {"seed": seed, "steps": [
        {"widen": {"dim": "intermediate_size", "factor": 2}},
        {"widen": {"dim": "hidden_size", "factor": 2}},
        {"widen": {"dim": "num_attention_heads", "factor": 2}},
        {"deepen": {"layers": 2 * s.layers, "placement": "interleave"}},
    ]}


def grow_with_n2n(teacher, opt, work: Path, s: Setting, seed: int) -> tuple[Path, Path, dict]:
    """Save the teacher and its AdamW state, grow both with n2n's API (verified), return paths."""
    import yaml

    tdir, sdir = work / "teacher", work / "student"
    teacher.save_pretrained(tdir)
    torch.save(opt.state_dict(), work / "opt.pt")
    spec = work / "spec.yaml"
    spec.write_text(yaml.safe_dump(growth_spec(s, seed), sort_keys=False))
    report = api.grow(spec, tdir, sdir, optimizer_state=work / "opt.pt", optimizer_state_out=work / "opt-grown.pt",
                      force=True)
    return sdir, work / "opt-grown.pt", report


def load_student(sdir: Path):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(sdir, attn_implementation="eager")


def random_new_parts(teacher, config, seed: int):
    """The student at the default init, the teacher's tensors copied into its leading slices
    (teacher layer i -> student layer 2i, where n2n puts it): new units and blocks random."""
    student = new_model(config, seed + 1000)
    sd = student.state_dict()
    with torch.no_grad():
        for k, t in teacher.state_dict().items():
            parts = k.split(".")
            if len(parts) > 2 and parts[1] == "layers":
                parts[2] = str(2 * int(parts[2]))
            sd[".".join(parts)][tuple(slice(0, d) for d in t.shape)] = t
    student.load_state_dict(sd)
    return student


def stacked(sdir: Path, layers: int):
    """n2n's grown student with the inserted blocks' output projections copied from the block
    they duplicate instead of zeroed (SOLAR / G_stack-style depth growth)."""
    student = load_student(sdir)
    with torch.no_grad():
        for i in range(1, 2 * layers, 2):
            src, dst = student.model.layers[i - 1], student.model.layers[i]
            dst.self_attn.o_proj.weight.copy_(src.self_attn.o_proj.weight)
            dst.mlp.down_proj.weight.copy_(src.mlp.down_proj.weight)
    return student


# ----------------------------------------------------------------------------- analysis


def to_target(history: list[dict], target: float) -> tuple[float | None, float | None]:
    """FLOPs and wall time at which the validation loss first reaches ``target`` (linear
    interpolation between evaluations), or (None, None)."""
    prev = None
    for h in history:
        if h["val_loss"] <= target:
            if prev is None or prev["val_loss"] == h["val_loss"]:
                return h["flops"], h["wall_s"]
            f = (prev["val_loss"] - target) / (prev["val_loss"] - h["val_loss"])
            return (prev["flops"] + f * (h["flops"] - prev["flops"]),
                    prev["wall_s"] + f * (h["wall_s"] - prev["wall_s"]))
        prev = h
    return None, None


def speedups(runs: dict) -> dict:
    """Compute to reach the scratch arm's final loss; a grown arm's trajectory starts with its teacher's."""
    target = runs["scratch"]["history"][-1]["val_loss"]
    f_s, w_s = to_target(runs["scratch"]["history"], target)
    out = {"target_val_loss": target}
    for arm in ARMS:
        path = runs[arm]["history"] if arm == "scratch" else runs["teacher"]["history"] + runs[arm]["history"][1:]
        f, w = to_target(path, target)
        out[arm] = {"flops_to_target": f, "wall_s_to_target": w,
                    "speedup_flops": f_s / f if f else None, "speedup_wall": w_s / w if w else None}
    # when the teacher alone reaches the scratch arm's final loss, that figure cannot tell the grown
    # arms apart: also the compute each grown arm needs to reach the loss every grown arm reaches
    grown = [a for a in ARMS if a != "scratch"]
    common = max(runs[a]["history"][-1]["val_loss"] for a in grown)
    out["common_target_val_loss"] = common
    out["teacher_reaches_target"] = to_target(runs["teacher"]["history"], target)[0] is not None
    for arm in grown:
        f, w = to_target(runs[arm]["history"], common)
        out[arm]["flops_to_common_target"] = f
        out[arm]["wall_s_to_common_target"] = w
    return out


def spread(values: list) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    return {"mean": mean, "min": min(vals), "max": max(vals), "n": len(vals), "of": len(values)}


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = {"teacher": "black", "n2n_opt": "tab:green", "n2n": "tab:olive", "scratch": "tab:blue",
              "random_new": "tab:red", "stack": "tab:purple"}
    for i, seed_runs in enumerate(results["seeds"].values()):
        for name in ("teacher", *ARMS):
            h = seed_runs["runs"][name]["history"]
            ax.plot([p["flops"] / 1e12 for p in h], [p["val_loss"] for p in h], color=colors[name],
                    alpha=1.0 if i == 0 else 0.35, lw=1.4, label=name if i == 0 else None)
    ax.set_xlabel("total training compute (TFLOPs, teacher included)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("Growing a LLaMA-family LM with n2n (x2 depth, x2 width)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ----------------------------------------------------------------------------- the experiment


def run_seed(s: Setting, seed: int, corpus: dict, work: Path, log) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    gen_val = torch.Generator().manual_seed(seed + 1)
    val = windows(corpus["val"], s.val_windows, s.seq, gen_val)
    t_cfg, s_cfg = llama_config(s), llama_config(s, scale=2)
    t_flops, s_flops = flops_per_step(t_cfg, s), flops_per_step(s_cfg, s)
    runs: dict = {}

    teacher = new_model(t_cfg, seed)
    t_opt = make_optimizer(teacher, s.lr)
    runs["teacher"] = {"history": train(teacher, t_opt, steps=s.teacher_steps, data=corpus["train"], val=val, s=s,
                                        gen=torch.Generator().manual_seed(seed + 2), step_flops=t_flops)}
    t_end = runs["teacher"]["history"][-1]
    log(f"seed {seed}: teacher {s.teacher_steps} steps, val loss {t_end['val_loss']:.4f}, {t_end['wall_s']:.1f} s")

    clock = time.perf_counter()
    sdir, opt_path, report = grow_with_n2n(teacher, t_opt, work / f"seed{seed}", s, seed)
    grow_s = time.perf_counter() - clock
    growth = {"verification_passed": report["verification"]["passed"], "seconds": grow_s,
              "params_before": report["plan"]["params_before"], "params_after": report["plan"]["params_after"],
              "optimizer_state": {k: v for k, v in report["optimizer_state"].items() if k != "written"}}
    students = {
        "n2n_opt": lambda: load_student(sdir),
        "n2n": lambda: load_student(sdir),
        "scratch": lambda: new_model(s_cfg, seed + 1000),
        "random_new": lambda: random_new_parts(teacher, s_cfg, seed),
        "stack": lambda: stacked(sdir, s.layers),
    }
    # equal total compute: the scratch arm gets the teacher's FLOPs as extra student steps
    scratch_steps = s.student_steps + round(s.teacher_steps * t_flops / s_flops)
    for arm in ARMS:
        model = students[arm]()
        opt = make_optimizer(model, s.lr)
        if arm == "n2n_opt":
            opt.load_state_dict(torch.load(opt_path, weights_only=True))
        grown = arm != "scratch"
        h = train(model, opt, steps=scratch_steps if arm == "scratch" else s.student_steps, data=corpus["train"],
                  val=val, s=s, gen=torch.Generator().manual_seed(seed + 3), step_flops=s_flops,
                  flops0=t_end["flops"] if grown else 0.0, wall0=t_end["wall_s"] if grown else 0.0,
                  warmup=arm != "n2n_opt")
        runs[arm] = {"history": h, "steps": scratch_steps if arm == "scratch" else s.student_steps}
        if grown:
            runs[arm]["loss_after_growth"] = h[0]["val_loss"]
            runs[arm]["after_growth_minus_teacher"] = h[0]["val_loss"] - t_end["val_loss"]
        log(f"seed {seed}: {arm:10s} start {h[0]['val_loss']:.4f} end {h[-1]['val_loss']:.4f} "
            f"({h[-1]['wall_s']:.1f} s total)")
    return {"runs": runs, "growth": growth, "speedup": speedups(runs),
            "flops_per_step": {"teacher": t_flops, "student": s_flops}, "scratch_steps": scratch_steps}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the CI smoke run: tiny model and budget, under a minute")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; --quick: 0)")
    p.add_argument("--teacher-steps", type=int, default=None)
    p.add_argument("--student-steps", type=int, default=None)
    p.add_argument("--out", metavar="DIR", default="results-lm", help="output directory (default results-lm/)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: reproducible figures)")
    return p.parse_args(argv)


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    s = QUICK if args.quick else DEFAULT
    if args.teacher_steps is not None or args.student_steps is not None:
        from dataclasses import replace

        s = replace(s, teacher_steps=args.teacher_steps or s.teacher_steps,
                    student_steps=args.student_steps or s.student_steps)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    start = time.perf_counter()
    with torch_threads(args.threads), tempfile.TemporaryDirectory(prefix="grow-lm-") as tmp:
        results: dict = {"n2n_version": n2n_version, "git_revision": git_revision(), "torch": torch.__version__,
                         "threads": args.threads, "quick": args.quick, "setting": s.__dict__, "seeds": {}}
        for seed in seeds:
            corpus = load_corpus(seed, s.corpus_mb)
            results.setdefault("corpus", {"root": corpus["root"], "files": corpus["files"], "bytes": corpus["bytes"],
                                          "tokens": "bytes (vocabulary 256)"})
            results["seeds"][str(seed)] = run_seed(s, seed, corpus, Path(tmp), log)
    per_seed = list(results["seeds"].values())
    results["summary"] = {
        "loss_after_growth_max_abs_diff": max(abs(r["runs"][a]["after_growth_minus_teacher"])
                                              for r in per_seed for a in FUNCTION_PRESERVING),
        **{arm: {"speedup_flops": spread([r["speedup"][arm]["speedup_flops"] for r in per_seed]),
                 "speedup_wall": spread([r["speedup"][arm]["speedup_wall"] for r in per_seed]),
                 "final_val_loss": spread([r["runs"][arm]["history"][-1]["val_loss"] for r in per_seed]),
                 **({"flops_to_common_target": spread([r["speedup"][arm]["flops_to_common_target"]
                                                       for r in per_seed])} if arm != "scratch" else {}),
                 **({"loss_after_growth_minus_teacher": spread([r["runs"][arm]["after_growth_minus_teacher"]
                                                                 for r in per_seed])} if arm != "scratch" else {})}
           for arm in ARMS}}
    results["wall_s"] = time.perf_counter() - start
    results["plot"] = "val_loss.png" if plot(results, out / "val_loss.png") else None
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(format_table(results))
    return results


def format_table(results: dict) -> str:
    rows = [f"{'arm':<11}{'final val loss':>26}{'after growth - teacher':>24}{'speed-up (FLOPs)':>24}"
            f"{'speed-up (wall)':>24}{'TFLOPs to common loss':>30}"]

    def fmt(sp, digits=3):
        if sp is None:
            return "not reached"
        return f"{sp['mean']:.{digits}f} [{sp['min']:.{digits}f}, {sp['max']:.{digits}f}]" + \
            ("" if sp["n"] == sp["of"] else f" ({sp['n']}/{sp['of']})")

    for arm in ARMS:
        a = results["summary"][arm]
        after = a.get("loss_after_growth_minus_teacher")
        shift = f"{after['mean']:+.2e}" if after else "-"
        common = a.get("flops_to_common_target")
        common = "-" if common is None else fmt({k: v / 1e12 if k in ("mean", "min", "max") else v
                                                 for k, v in common.items()})
        rows.append(f"{arm:<11}{fmt(a['final_val_loss']):>26}{shift:>24}"
                    f"{fmt(a['speedup_flops'], 2):>24}{fmt(a['speedup_wall'], 2):>24}{common:>30}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
