"""The ``n2n`` command line: a thin layer over ``n2n_cli.api``.

Exit codes: 0 ok, 2 bad input, 3 verification failed, 1 anything unexpected. Errors are
turned into exit codes and messages in exactly one place, ``_Group.invoke``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typing_extensions import Annotated

from . import __version__
from .errors import EXIT_UNEXPECTED, N2NError, OutputError, UserError, VerificationFailed
from .fsutil import atomic_write_text, dir_writable

from .limits import MAX_FACTOR, MAX_PROBES, MAX_WIDTH

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _api():
    """The library, imported on first use, so that `n2n --help` does not wait for torch."""
    from . import api

    return api


class _Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so that it cleans up as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):  # one is enough: let the clean-up finish
        signal.signal(s, signal.SIG_IGN)
    raise _Signalled(signum)


class _NoteHandler(logging.Handler):
    """The library's notes (e.g. stale temporary files it removed), on stderr."""

    def emit(self, record):
        err.print(f"note: {record.getMessage()}", markup=False)


class _Group(typer.core.TyperGroup):
    """The one place that turns exceptions (and SIGTERM / SIGHUP) into exit codes and messages."""

    def parse_args(self, ctx, args):
        ctx.meta["n2n_json"] = "--json" in args  # usage errors happen before the command sees its flags
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        log = logging.getLogger("n2n_cli")
        if not any(isinstance(h, _NoteHandler) for h in log.handlers):
            log.addHandler(_NoteHandler(logging.WARNING))
        previous = {}
        try:
            previous[signal.SIGINT] = signal.getsignal(signal.SIGINT)  # _on_signal ignores it during clean-up
            for s in (signal.SIGTERM, signal.SIGHUP):
                previous[s] = signal.signal(s, _on_signal)
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        try:
            return self._invoke(ctx)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except N2NError as e:
            if ctx.invoked_subcommand in ("widen", "deepen", "upcycle") and hasattr(e, "for_cli"):
                e.for_cli()  # the step came from flags: name --allow-approximate, not allow_approximate: true
            _write_failure_report(ctx, e)
            err.print(f"error: {e.render()}", markup=False)
            if isinstance(e, VerificationFailed) and e.report and not ctx.obj.get("quiet"):
                _print_verification(e.report.get("verification") or {"exact": e.report}, err)
            raise typer.Exit(e.exit_code) from None
        except _Signalled as e:
            err.print(f"interrupted by {signal.Signals(e.signum).name}: nothing was written (temporary files "
                      "removed)", markup=False)
            raise typer.Exit(128 + e.signum) from None
        except KeyboardInterrupt:
            err.print("interrupted: nothing was written", markup=False)
            raise typer.Exit(130) from None
        except BrokenPipeError:  # `n2n inspect ... | head`: the reader left; stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except Exception as e:
            if type(e).__module__.split(".")[0] in ("typer", "click"):
                # usage errors and exits: typer's (vendored) click reports them (exit 2 for usage);
                # under --json, stdout carries one JSON object whatever happened
                if ctx.meta.get("n2n_json") and any(c.__name__ == "UsageError" for c in type(e).__mro__):
                    out.print_json(json.dumps({"ok": False, "exit_code": e.exit_code, "error": e.format_message()}))
                raise
            _write_failure_report(ctx, e)
            if (ctx.obj or {}).get("debug"):
                err.print(traceback.format_exc(), markup=False)
            err.print(f"internal error: {type(e).__name__}: {e}", markup=False)
            err.print("This is a bug in n2n. Rerun with --debug (or N2N_DEBUG=1) for a traceback and please "
                      "report it.", markup=False)
            raise typer.Exit(EXIT_UNEXPECTED) from None


def _write_failure_report(ctx, e: Exception) -> None:
    path = (ctx.obj or {}).get("report")
    code = getattr(e, "exit_code", EXIT_UNEXPECTED)
    report = {"ok": False, "exit_code": code, "error": e.render() if isinstance(e, N2NError) else f"{type(e).__name__}: {e}",
              **(getattr(e, "report", None) or {})}
    if path:
        try:
            atomic_write_text(Path(path), json.dumps(report, indent=2) + "\n", where=f"--report {path}")
        except N2NError as e:  # never let the report hide the error being reported
            err.print(f"warning: could not write the report: {e.render()}", markup=False)
    if (ctx.obj or {}).get("json"):
        out.print_json(json.dumps(report))


app = typer.Typer(
    cls=_Group,
    name="n2n",
    help="Grow trained PyTorch checkpoints wider and deeper with function-preserving Net2Net transforms, "
         "prove on probe inputs that the grown network computes the same function, and write safetensors.\n\n"
         "Exit codes: 0 ok, 2 bad input, 3 verification failed (nothing written), 1 unexpected error.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        out.print(f"n2n {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show a traceback for unexpected errors.",
                                        envvar="N2N_DEBUG")] = False,
    version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
):
    ctx.obj = {"debug": debug}


# ----------------------------------------------------------------------------- shared options



ModelOpt = Annotated[Optional[Path], typer.Option("--model", "-m", help="Model description YAML. Not needed for "
                                                  "checkpoints written by n2n, which carry their own. Verification "
                                                  "runs this description, not your own nn.Module: if they differ "
                                                  "(e.g. tanh described as relu), a PASS says nothing about your "
                                                  "module; check it with your module (README).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="Where the transforms and the verification run: auto (a CUDA GPU if there is one), cpu, cuda, "
                                              "cuda:N or mps (MPS: verification only). The output's bytes do not depend on it.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed for the widening mapping, noise, baselines and "
                                                "probes (default: the spec's seed, else 0).")]
ProbesOpt = Annotated[Optional[int], typer.Option("--probes", min=1, max=MAX_PROBES,
                                                  help="Number of random probe inputs (default 64).")]
AtolOpt = Annotated[Optional[float], typer.Option("--atol", min=0, help="Absolute tolerance (default by dtype: "
                                                  "1e-5 for float32).")]
RtolOpt = Annotated[Optional[float], typer.Option("--rtol", min=0, help="Relative tolerance, times max|teacher| "
                                                  "(default by dtype: 1e-4 for float32).")]
ReportOpt = Annotated[Optional[Path], typer.Option("--report", help="Write a JSON report here (also on failure).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON report on stdout instead of text.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan (every tensor's old and new shape, "
                                         "parameters before and after) and write nothing.")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Replace OUT if it exists (OUT is never SRC).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")]
NoVerifyOpt = Annotated[bool, typer.Option("--no-verify", help="Skip verification (the output is marked unverified).")]
class VerifyMode(str, Enum):
    auto = "auto"
    streaming = "streaming"
    full = "full"


VerifyDtypeOpt = Annotated[Optional[str], typer.Option("--verify-dtype", help="Run verification in float32 (default; "
                                                       "float64 for float64 checkpoints), float64, bfloat16 or float16: "
                                                       "half precision halves the memory of verifying a big model, "
                                                       "with half-precision tolerances.")]
VerifyModeOpt = Annotated[VerifyMode, typer.Option("--verify-mode", help="Hugging Face models: streaming runs teacher "
                                                   "and student block by block (one block in memory; says where a "
                                                   "mismatch starts; llama, mistral, qwen2); full loads both whole "
                                                   "with transformers; auto: streaming where supported.")]
ShardOpt = Annotated[str, typer.Option("--max-shard-size", help="Hugging Face output: largest shard, in HF units "
                                       "(5GB = 5*10^9 bytes, 5GiB = 5*2^30).")]
ModelCodeOpt = Annotated[Optional[str], typer.Option(
    "--model-code", help="Your model's own code, FILE.py:NAME or package.module:NAME (a class or a factory returning "
    "an nn.Module): n2n builds it, loads SRC into it and traces it. IMPORTING IT RUNS THAT CODE, as python would; the "
    "checkpoint itself is still read without unpickling code. Not needed for checkpoints n2n grew this way.")]
ModelArgsOpt = Annotated[Optional[str], typer.Option("--model-args", help="With --model-code: keyword arguments as "
                                                     "JSON, e.g. '{\"width\": 64}'.")]
ExampleInputOpt = Annotated[Optional[str], typer.Option("--example-input", help="With --model-code: the input shape "
                                                        "to trace with, e.g. 1,3,224,224 (default: inferred).")]
OptStateOpt = Annotated[Optional[Path], typer.Option("--optimizer-state", help="The teacher's optimizer state "
                                                   "(torch.save(optimizer.state_dict())), Adam/AdamW and relatives: "
                                                   "grown along the same plan, moments following the gradients.")]
OptStateOutOpt = Annotated[Optional[Path], typer.Option("--optimizer-state-out", help="Where to write the grown "
                                                        "optimizer state (with --optimizer-state).")]


def _model_args(model_args: Optional[str]) -> Optional[dict]:
    if model_args is None:
        return None
    try:
        value = json.loads(model_args)
    except json.JSONDecodeError as e:
        raise UserError(f"--model-args: not valid JSON ({e})", hint='e.g. --model-args \'{"width": 64}\'') from None
    if not isinstance(value, dict):
        raise UserError("--model-args: expected a JSON object of keyword arguments")
    return value


SrcArg = Annotated[Path, typer.Argument(help="Teacher: a .safetensors file, a .pt/.pth/.bin state dict (loaded with "
                                        "weights_only=True), or a Hugging Face model directory.", show_default=False,
                                        metavar="SRC")]
OutArg = Annotated[Path, typer.Argument(help="Output .safetensors file, or directory for a Hugging Face SRC "
                                        "(written atomically).", show_default=False, metavar="OUT")]


def _setup(ctx, *, report=None, json_=False, quiet=False):
    ctx.obj.update(json=json_, quiet=quiet or json_)
    if report is not None:  # checked before any work, so a typo cannot cost a finished run its report
        parent = report.parent if str(report.parent) else Path(".")
        if report.is_dir() or not parent.is_dir() or not dir_writable(parent):
            raise UserError("cannot write the report here (a directory, or its directory is missing or not "
                            "writable)", where=f"--report {report}")
    from .outputs import check_report_path

    # side outputs may never land on (or inside) anything the command reads or writes; checked
    # before the report path is recorded, so that this very failure is not written over SRC
    for name, flag, what in (("report", "--report", "the report"),
                             ("optimizer_state_out", "--optimizer-state-out", "the grown optimizer state")):
        if isinstance(ctx.params.get(name), Path):
            check_report_path(ctx.params[name], [v for k, v in ctx.params.items() if k != name and isinstance(v, Path)],
                              flag, what)
    ctx.obj["report"] = report


@contextlib.contextmanager
def _shown_progress(ctx):
    """Yields the progress callback of :func:`_progress` (None with --quiet), its bar shown on
    stderr while the body runs."""
    bar, update = _progress(ctx)
    if bar is None:
        yield update
        return
    bar.start()
    try:
        yield update
    finally:
        bar.stop()


def _progress(ctx):
    """A rich progress bar on stderr for interactive terminals; otherwise one plain line per phase."""
    if ctx.obj.get("quiet"):
        return None, None
    if not err.is_terminal:
        from .phases import line_progress

        return None, line_progress()
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=err, transient=True)
    tasks: dict[str, int] = {}

    def update(phase: str, done: int, total: int):
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total)
        bar.update(tasks[phase], completed=done, total=total)

    return bar, update


def _finish(ctx, report: dict, human) -> None:
    report = {"ok": True, "exit_code": 0, **report}
    if ctx.obj.get("report"):
        try:
            atomic_write_text(Path(ctx.obj["report"]), json.dumps(report, indent=2) + "\n",
                              where=f"--report {ctx.obj['report']}")
        except OutputError as e:
            if report.get("written"):
                e.hint = f"The command itself succeeded: {report.get('output')} was written."
            raise
    if ctx.obj.get("json"):
        out.print_json(json.dumps(report))
    elif not ctx.obj.get("quiet"):
        human(report)


def _shape(shape: list[int]) -> str:
    return "x".join(map(str, shape))


def _fmt_err(c: dict) -> str:
    agree = f", argmax agreement {c['argmax_agreement']:.2%}" if c.get("argmax_agreement") is not None else ""
    return (f"max abs error {c['max_abs_error']:.3g}, max rel error {c['max_rel_error']:.3g}{agree} "
            f"on {c['probes']} probes ({c['device']}, {c['dtype']}; atol {c['atol']:g}, rtol {c['rtol']:g})")


def _st_line(se: dict) -> str:
    word = "skipped" if se.get("skipped") else {True: "PASS", False: "FAIL", None: "measured"}[se.get("passed")]
    return f"verification (sentence embeddings): {word}: " + (
        se["note"] if se.get("skipped") else
        f"{_fmt_err(se).replace('probes', 'texts')}, cosine similarity max error {se['cosine_max_abs_error']:.3g}")


def _print_verification(v: dict, console: Console) -> None:
    if v.get("skipped"):
        console.print("verification: skipped (--no-verify): the output is NOT verified", markup=False)
        return
    if v.get("exact"):
        word = "PASS" if v["exact"]["passed"] else "FAIL"
        what = "exact transform" if v.get("deviation") else "student"
        console.print(f"verification ({what}): {word}: {_fmt_err(v['exact'])}", markup=False)
    elif v.get("exact_counterpart"):  # an inexact student: only its exact counterpart is judged
        word = "PASS" if v["exact_counterpart"]["passed"] else "FAIL"
        console.print(f"verification (exact counterpart, not the written student): {word}: "
                      f"{_fmt_err(v['exact_counterpart'])}", markup=False)
    if v.get("note"):
        console.print(f"verification: {v['note']}", markup=False)
    se = v.get("sentence_embeddings") or (v.get("exact") or {}).get("sentence_embeddings")
    if se:  # a sentence-transformers directory: its embeddings, through every module
        console.print(_st_line(se), markup=False)
    if v.get("deviation"):
        judged = "" if v["deviation"].get("passed") is not None else ", NOT judged"
        console.print(f"measured deviation of the written student (noise / baseline method{judged}): "
                      f"{_fmt_err(v['deviation'])}", markup=False)
    if v.get("certificate"):
        console.print(f"certificate: {_api().certificate_summary(v['certificate'])}", markup=False)


def _print_plan(plan: dict) -> None:
    for s in plan["steps"]:
        table = Table(title=f"step {s['index']}: {s['summary']}", title_justify="left", show_edge=False)
        for col in ("tensor", "old shape", "new shape", "how"):
            table.add_column(col)
        for t in s["tensors"]:
            table.add_row(t["key"], "new" if t["old_shape"] is None else str(t["old_shape"]), str(t["new_shape"]),
                          t["how"])
        out.print(table)
        out.print(f"  parameters {s['params_before']:,} -> {s['params_after']:,}"
                  f"{'' if s['function_preserving'] else '  (NOT function-preserving: a baseline / inexact noise)'}",
                  markup=False)
    ratio = plan["params_after"] / plan["params_before"]
    out.print(f"parameters: {plan['params_before']:,} -> {plan['params_after']:,} (x{ratio:.2f})", markup=False)


def _print_grow(report: dict) -> None:
    plan = report["plan"]
    for w in report.get("warnings", []):
        err.print(f"warning: {w}", markup=False)
    if report["dry_run"]:
        _print_plan(plan)
        out.print("dry run: nothing written", markup=False)
        return
    for s in plan["steps"]:
        out.print(f"step {s['index']}: {s['summary']}", markup=False)
    ratio = plan["params_after"] / plan["params_before"]
    out.print(f"parameters: {plan['params_before']:,} -> {plan['params_after']:,} (x{ratio:.2f})", markup=False)
    _print_verification(report["verification"], out)
    if report.get("verified_against") and not report["verification"].get("skipped"):
        out.print(f"verified against: {report['verified_against']}", markup=False)
    path = Path(report["output"])
    size = sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size
    out.print(f"wrote {report['output']} ({size / 1e6:.1f} MB)", markup=False)
    if report.get("load"):  # a model built by --model-code: how the user's code loads the student
        out.print(report["load"]["line"], markup=False)


#: the command-line options every growing command passes to ``api.grow`` as they are (those a
#: command does not have keep the library's defaults)
_GROW_OPTIONS = ("model", "device", "seed", "probes", "atol", "rtol", "dry_run", "force", "max_shard_size",
                 "verify_dtype", "model_code", "example_input", "optimizer_state", "optimizer_state_out")


def _hash_ahead(ctx, src) -> None:
    """A real grow records the teacher's SHA-256: start hashing it now, in a thread, while torch
    is being imported (``digests.prefetch``). Not for a dry run, which writes nothing."""
    if not ctx.params.get("dry_run"):
        from . import digests

        digests.prefetch(digests.model_files(src))


def _run_grow(ctx, spec, src, out_path):
    """Run ``api.grow`` with the command's own options (``ctx.params``), a progress display, and
    the report printed or written."""
    params = ctx.params
    options = {k: params[k] for k in _GROW_OPTIONS if k in params}
    if "verify_mode" in params:
        options["verify_mode"] = params["verify_mode"].value
    if "model_args" in params:
        options["model_args"] = _model_args(params["model_args"])
    with _shown_progress(ctx) as update:
        report = _api().grow(spec, src, out_path, verify=False if params.get("no_verify") else None, progress=update,
                             **options)
    _finish(ctx, report, _print_grow)


def _run_step(ctx, kind: str, step: dict, src, out_path, seed) -> None:
    """One step given by flags (``n2n widen|deepen|upcycle``), run as a one-step spec (unset
    flags are left out, so the spec's defaults apply)."""
    _hash_ahead(ctx, src)
    spec = _api().spec_from_steps([{kind: {k: v for k, v in step.items() if v is not None}}], seed=seed or 0)
    _run_grow(ctx, spec, src, out_path)


# ----------------------------------------------------------------------------- commands


@app.command()
def grow(
    ctx: typer.Context,
    spec: Annotated[Path, typer.Argument(help="Growth spec YAML (see specs/ and the README).", show_default=False, metavar="SPEC")],
    src: SrcArg, out_path: OutArg,
    model: ModelOpt = None, device: DeviceOpt = "auto", seed: SeedOpt = None, probes: ProbesOpt = None,
    atol: AtolOpt = None, rtol: RtolOpt = None, report: ReportOpt = None, json_: JsonOpt = False,
    dry_run: DryRunOpt = False, force: ForceOpt = False, quiet: QuietOpt = False, no_verify: NoVerifyOpt = False,
    max_shard_size: ShardOpt = "5GB", verify_dtype: VerifyDtypeOpt = None,
    model_code: ModelCodeOpt = None, model_args: ModelArgsOpt = None, example_input: ExampleInputOpt = None,
    verify_mode: VerifyModeOpt = VerifyMode.auto,
    optimizer_state: OptStateOpt = None, optimizer_state_out: OptStateOutOpt = None,
):
    """Apply every step of a growth SPEC to SRC, verify, and write OUT.

    Steps run in order; a later step may use a layer an earlier one created or resized.
    Nothing is written if any check or the verification fails.
    """
    _setup(ctx, report=report, json_=json_, quiet=quiet)
    _hash_ahead(ctx, src)
    _run_grow(ctx, spec, src, out_path)


class WidenMethod(str, Enum):
    net2wider = "net2wider"
    random_pad = "random-pad"


class NoiseMode(str, Enum):
    zero_sum = "zero-sum"
    independent = "independent"


class HFDim(str, Enum):
    intermediate_size = "intermediate_size"
    hidden_size = "hidden_size"
    num_attention_heads = "num_attention_heads"
    num_key_value_heads = "num_key_value_heads"


@app.command()
def widen(
    ctx: typer.Context, src: SrcArg, out_path: OutArg,
    layer: Annotated[Optional[str], typer.Option("--layer", "-l", help="MLP/CNN: the linear/conv2d layer to widen "
                                                 "(it must have a downstream linear/conv2d consumer).")] = None,
    dim: Annotated[Optional[HFDim], typer.Option("--dim", help="Hugging Face: the dimension to widen in every "
                                                 "layer.")] = None,
    to: Annotated[Optional[int], typer.Option("--to", min=1, max=MAX_WIDTH, help="New width (units, channels or size).")] = None,
    factor: Annotated[Optional[float], typer.Option("--factor", max=MAX_FACTOR, help="Multiply the width (> 1) instead of --to.")] = None,
    method: Annotated[WidenMethod, typer.Option("--method", help="net2wider (function-preserving) or random-pad "
                                                "(the seed's baseline).")] = WidenMethod.net2wider,
    noise: Annotated[float, typer.Option("--noise", min=0, help="Symmetry-breaking noise std, relative to the "
                                         "consumer weights' std.")] = 0.0,
    noise_mode: Annotated[NoiseMode, typer.Option("--noise-mode", help="zero-sum keeps the function exact; "
                                                  "independent is the Keras example's (inexact).")] = NoiseMode.zero_sum,
    model: ModelOpt = None, device: DeviceOpt = "auto", seed: SeedOpt = None, probes: ProbesOpt = None,
    atol: AtolOpt = None, rtol: RtolOpt = None, report: ReportOpt = None, json_: JsonOpt = False,
    dry_run: DryRunOpt = False, force: ForceOpt = False, quiet: QuietOpt = False, no_verify: NoVerifyOpt = False,
    max_shard_size: ShardOpt = "5GB", verify_dtype: VerifyDtypeOpt = None,
    model_code: ModelCodeOpt = None, model_args: ModelArgsOpt = None, example_input: ExampleInputOpt = None,
    verify_mode: VerifyModeOpt = VerifyMode.auto,
    optimizer_state: OptStateOpt = None, optimizer_state_out: OptStateOutOpt = None,
    mapping: Annotated[Optional[str], typer.Option("--mapping", help="Hugging Face intermediate_size: tile (every "
                                                   "unit copied equally; default for a multiple: exact in bf16 for a "
                                                   "power-of-two factor) or random.")] = None,
):
    """Widen one layer of SRC (Net2WiderNet), or one dimension of a Hugging Face model, and write OUT.

    Examples: n2n widen teacher.safetensors wide.safetensors --model specs/models/mnist-cnn.yaml --layer fc1 --to 128;
    n2n widen model-dir out-dir --dim intermediate_size --to 2048
    """
    _setup(ctx, report=report, json_=json_, quiet=quiet)
    if (to is None) == (factor is None):
        raise UserError("give exactly one of --to (new width) or --factor (> 1)")
    if src.is_dir():
        if dim is None or layer is not None:
            raise UserError("SRC is a Hugging Face model directory: choose what to widen with --dim (not --layer)",
                            hint="--dim intermediate_size | hidden_size | num_attention_heads | num_key_value_heads")
        if method != WidenMethod.net2wider or noise_mode != NoiseMode.zero_sum:
            raise UserError("Hugging Face models are widened by net2wider with zero-sum noise only")
        if mapping not in (None, "tile", "random"):
            raise UserError(f"--mapping: '{mapping}' is not one of tile, random")
        step = {"dim": dim.value, "to": to, "factor": factor, "noise": noise or None, "mapping": mapping}
    else:
        if mapping is not None:
            raise UserError("--mapping is for Hugging Face model directories (--dim intermediate_size)")
        if layer is None or dim is not None:
            raise UserError("choose the layer to widen with --layer (--dim is for Hugging Face model directories)")
        step = {"layer": layer, "to": to, "factor": factor, "method": method.value, "noise": noise,
                "noise_mode": noise_mode.value}
    _run_step(ctx, "widen", step, src, out_path, seed)


class DeepenMethod(str, Enum):
    net2deeper = "net2deeper"
    random_init = "random-init"


class Placement(str, Enum):
    interleave = "interleave"
    end = "end"


@app.command()
def deepen(
    ctx: typer.Context, src: SrcArg, out_path: OutArg,
    after: Annotated[Optional[str], typer.Option("--after", "-a", help="MLP/CNN: insert the new layer after this "
                                                 "linear/conv2d layer (and its batchnorm and activation). Hugging Face: "
                                                 "comma-separated layer indices, a new block after each.")] = None,
    layers: Annotated[Optional[int], typer.Option("--layers", min=1, help="Hugging Face: the new total number of "
                                                  "layers (blocks added by --placement).")] = None,
    placement: Annotated[Placement, typer.Option("--placement", help="Hugging Face, with --layers: interleave new "
                                                 "blocks evenly (LLaMA Pro) or add them at the end.")] = Placement.interleave,
    allow_approximate: Annotated[bool, typer.Option("--allow-approximate", help="Hugging Face post-LN models (BERT): "
                                                    "deepen although it cannot be exact; the deviation is reported.")] = False,
    after_block: Annotated[Optional[str], typer.Option("--after-block", help="--model-code: insert a copy of this "
                                                       "residual block (x + f(x)) after it, its branch zeroed.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Name of the new layer (default <after>_deeper).")] = None,
    method: Annotated[DeepenMethod, typer.Option("--method", help="net2deeper (identity, function-preserving) or "
                                                 "random-init (baseline).")] = DeepenMethod.net2deeper,
    kernel_size: Annotated[Optional[int], typer.Option("--kernel-size", min=1, help="Kernel of a new conv (odd; "
                                                       "default: that of --after).")] = None,
    model: ModelOpt = None, device: DeviceOpt = "auto", seed: SeedOpt = None, probes: ProbesOpt = None,
    atol: AtolOpt = None, rtol: RtolOpt = None, report: ReportOpt = None, json_: JsonOpt = False,
    dry_run: DryRunOpt = False, force: ForceOpt = False, quiet: QuietOpt = False, no_verify: NoVerifyOpt = False,
    max_shard_size: ShardOpt = "5GB", verify_dtype: VerifyDtypeOpt = None,
    model_code: ModelCodeOpt = None, model_args: ModelArgsOpt = None, example_input: ExampleInputOpt = None,
    verify_mode: VerifyModeOpt = VerifyMode.auto,
    optimizer_state: OptStateOpt = None, optimizer_state_out: OptStateOutOpt = None,
):
    """Insert a layer into SRC (Net2DeeperNet), or blocks into a Hugging Face model, and write OUT.

    Examples: n2n deepen wide.safetensors deep.safetensors --after conv2;
    n2n deepen model-dir out-dir --layers 12
    """
    _setup(ctx, report=report, json_=json_, quiet=quiet)
    if src.is_dir():
        if after_block is not None:
            raise UserError("--after-block is for models built by --model-code; SRC is a Hugging Face model "
                            "directory: use --layers N (the new total) or --after I,J (layer indices)")
        if (layers is None) == (after is None):
            raise UserError("SRC is a Hugging Face model directory: give exactly one of --layers N (the new total) "
                            "or --after I,J (layer indices)")
        try:
            indices = [int(x) for x in after.split(",")] if after is not None else None
        except ValueError:
            raise UserError(f"--after: '{after}' is not a comma-separated list of layer indices") from None
        step = {"layers": layers, "after": indices, "placement": placement.value,
                "allow_approximate": allow_approximate or None}
    else:
        if (after is None) == (after_block is None) or layers is not None:
            raise UserError("choose where to deepen with --after LAYER (--layers is for Hugging Face model directories), "
                            "or --after-block BLOCK for a residual block of a --model-code model")
        step = {"after": after, "after_block": after_block, "name": name, "method": method.value,
                "kernel_size": kernel_size}
    _run_step(ctx, "deepen", step, src, out_path, seed)


class RouterInit(str, Enum):
    zero = "zero"
    small = "small"


class SharedExpert(str, Enum):
    split = "split"
    zero = "zero"


@app.command()
def upcycle(
    ctx: typer.Context, src: SrcArg, out_path: OutArg,
    experts: Annotated[int, typer.Option("--experts", min=2, max=1024, help="Experts per layer, each a copy of the "
                                         "dense MLP.", show_default=False)],
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=1024, help="Experts each token is routed to.",
                                       show_default=False)],
    router_init: Annotated[RouterInit, typer.Option("--router-init", help="zero (uniform softmax) or small "
                                                    "(N(0, --router-std^2), seeded by --seed); exact either way.")]
    = RouterInit.zero,
    router_std: Annotated[float, typer.Option("--router-std", min=0, max=10, help="Std of a small router.")] = 0.02,
    noise: Annotated[float, typer.Option("--noise", min=0, max=10, help="Zero-sum noise on the experts' down "
                                         "projections, relative to their std: exact only with --top-k equal to "
                                         "--experts and a zero router; otherwise needs --allow-approximate.")] = 0.0,
    norm_topk_prob: Annotated[Optional[bool], typer.Option("--norm-topk-prob/--no-norm-topk-prob", help="Qwen-MoE: "
                                                           "renormalise the top-k weights (default; exact).",
                                                           show_default=False)] = None,
    shared_expert: Annotated[Optional[SharedExpert], typer.Option("--shared-expert", help="Qwen2-MoE: split (the "
                                                                  "shared expert holds half of the MLP) or zero.",
                                                                  show_default=False)] = None,
    allow_approximate: Annotated[bool, typer.Option("--allow-approximate", help="Upcycle although it cannot be "
                                                    "exact; the deviation is measured and reported.")] = False,
    device: DeviceOpt = "auto", seed: SeedOpt = None, probes: ProbesOpt = None,
    atol: AtolOpt = None, rtol: RtolOpt = None, report: ReportOpt = None, json_: JsonOpt = False,
    dry_run: DryRunOpt = False, force: ForceOpt = False, quiet: QuietOpt = False, no_verify: NoVerifyOpt = False,
    max_shard_size: ShardOpt = "5GB", verify_dtype: VerifyDtypeOpt = None,
    verify_mode: VerifyModeOpt = VerifyMode.auto,
):
    """Turn a dense Hugging Face model into a mixture of experts and write OUT (verified exact).

    llama/mistral become mixtral, qwen2 becomes qwen2_moe (qwen3 becomes qwen3_moe): every
    expert is a copy of the dense MLP and the top-k weights are renormalised, so the result
    computes the dense model's function whatever the router picks; verification compares the
    dense model's logits with the MoE's. Example: n2n upcycle llama-dir moe-dir --experts 8 --top-k 2
    """
    _setup(ctx, report=report, json_=json_, quiet=quiet)
    if not src.is_dir():
        raise UserError("SRC must be a Hugging Face model directory (config.json and safetensors weights)",
                        where=str(src))
    step = {"experts": experts, "top_k": top_k, "router_init": router_init.value, "noise": noise or None,
            "router_std": router_std if router_init == RouterInit.small else None, "norm_topk_prob": norm_topk_prob,
            "shared_expert": shared_expert.value if shared_expert else None, "allow_approximate": allow_approximate or None}
    _run_step(ctx, "upcycle", step, src, out_path, seed)


@app.command()
def verify(
    ctx: typer.Context,
    teacher: Annotated[Path, typer.Argument(help="The original checkpoint.", show_default=False, metavar="TEACHER")],
    student: Annotated[Path, typer.Argument(help="The grown checkpoint.", show_default=False, metavar="STUDENT")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Teacher's model description (default: its "
                                                  "n2n metadata).")] = None,
    student_model: Annotated[Optional[Path], typer.Option("--student-model", help="Student's model description "
                                                          "(default: its n2n metadata).")] = None,
    device: DeviceOpt = "auto", seed: Annotated[int, typer.Option("--seed", help="Probe seed.")] = 0,
    probes: Annotated[Optional[int], typer.Option(
        "--probes", min=1, max=MAX_PROBES,
        help="Number of random probe inputs (default 64; a Hugging Face model over 1e8 parameters runs a documented "
             "budget of them unless you give --probes).")] = None,
    atol: AtolOpt = None, rtol: RtolOpt = None, report: ReportOpt = None, json_: JsonOpt = False,
    quiet: QuietOpt = False, verify_dtype: VerifyDtypeOpt = None,
    model_code: ModelCodeOpt = None, model_args: ModelArgsOpt = None, example_input: ExampleInputOpt = None,
    verify_mode: VerifyModeOpt = VerifyMode.auto,
):
    """Check that STUDENT computes TEACHER's function on seeded random probes (exit 3 if not)."""
    _setup(ctx, report=report, json_=json_, quiet=quiet)
    with _shown_progress(ctx) as update:
        result = _api().verify(teacher, student, model=model, student_model=student_model, device=device, seed=seed,
                               probes=probes, atol=atol, rtol=rtol, verify_dtype=verify_dtype, model_code=model_code,
                               model_args=_model_args(model_args), example_input=example_input,
                               verify_mode=verify_mode.value, progress=update)

    def human(r):
        out.print(f"PASS: {_fmt_err(r)}", markup=False)
        if r.get("sentence_embeddings"):  # sentence-transformers directories: through every module
            out.print(_st_line(r["sentence_embeddings"]), markup=False)
        out.print(f"certificate: {_api().certificate_summary(r['verification']['certificate'])}", markup=False)
        out.print(f"parameters: {r['params_teacher']:,} -> {r['params_student']:,}", markup=False)

    _finish(ctx, result, human)


@app.command()
def inspect(
    ctx: typer.Context, src: SrcArg, model: ModelOpt = None, json_: JsonOpt = False,
    report: ReportOpt = None, model_code: ModelCodeOpt = None, model_args: ModelArgsOpt = None,
    example_input: ExampleInputOpt = None,
):
    """Show a checkpoint's layers, shapes and parameters, and which layers can be widened or
    deepened after exactly (and why not)."""
    _setup(ctx, report=report, json_=json_)
    result = None
    if model is None and model_code is None and src.suffix.lower() == ".safetensors" and src.is_file():
        from .errors import CheckpointError
        from .headers import inspect_plain

        try:  # a plain checkpoint is header-only work: answer without importing torch
            result = inspect_plain(src)
        except CheckpointError:
            result = None  # the full reader says precisely what is wrong
    if result is None:
        result = _api().inspect(src, model=model, model_code=model_code, model_args=_model_args(model_args),
                                example_input=example_input)

    def human(r):
        if "spaces" in r:
            _print_graph_inspect(r)
            return
        if "family" in r:
            out.print(f"{r['checkpoint']}: {r['model_type']} ({r['family']} family), {r['params']:,} parameters, "
                      f"{r['tensors']} tensors ({', '.join(r['dtypes'])}) in {len(r['weight_files'])} file(s)",
                      markup=False)
            table = Table(show_edge=False)
            for col in ("dimension", "size", "can grow exactly"):
                table.add_column(col, overflow="fold")
            names = {"num_hidden_layers": "num_hidden_layers"}
            for k, v in r["sizes"].items():
                table.add_row(k, str(v), r["growth"].get(names.get(k, k), ""))
            out.print(table)
            if r.get("moe"):
                m = r["moe"]
                out.print(f"mixture of experts: {m['experts']} experts per layer, top-{m['top_k']} "
                          f"({'renormalised' if m['top_k_renormalised'] else 'not renormalised'})"
                          + (f", shared expert of {m['shared_expert_intermediate_size']}"
                             if m.get("shared_expert_intermediate_size") else ""), markup=False)
            elif r["growth"].get("upcycle"):
                out.print(f"upcycle to a mixture of experts (n2n upcycle): {r['growth']['upcycle']}", markup=False)
            return
        if r.get("model") is None:
            table = Table(title=f"{r['checkpoint']}: {len(r['tensors'])} tensors", title_justify="left")
            for col in ("tensor", "shape", "dtype"):
                table.add_column(col)
            for t in r["tensors"]:
                table.add_row(t["key"], str(t["shape"]), t["dtype"])
            out.print(table)
            out.print("no model description: pass --model FILE.yaml to see layers and what can be grown",
                      markup=False)
            return
        table = Table(title=f"{r['checkpoint']}: {r['params']:,} parameters", title_justify="left")
        for col in ("#", "layer", "type", "input", "output", "params", "widen", "deepen after"):
            table.add_column(col, overflow="fold")
        for layer in r["layers"]:
            table.add_row(str(layer["index"]), layer["name"] or "", layer["type"], _shape(layer["input_shape"]),
                          _shape(layer["output_shape"]), f"{layer['params']:,}" if layer["params"] else "",
                          layer.get("widen", ""), layer.get("deepen", ""))
        out.print(table)
        for entry in r.get("lineage") or []:
            steps = "; ".join(f"{k} {v.get('layer') or 'after ' + str(v.get('after', ''))}" if isinstance(v, dict)
                              else k for s in entry["steps"] for k, v in s.items())
            out.print(f"grown by n2n {entry.get('n2n_version')} (seed {entry['seed']}): {steps}", markup=False)

    _finish(ctx, result, human)


def _print_graph_inspect(r: dict) -> None:
    """A model built by --model-code: its conv/linear modules and the groups that widen together."""
    out.print(f"{r['checkpoint']}: {r['params']:,} parameters, model {r['model_code']['model_code']} "
              f"(input {_shape(r['model_code']['example_input']['shape'])})", markup=False)
    table = Table(show_edge=False)
    for col in ("module", "type", "widen"):
        table.add_column(col, overflow="fold")
    for m in r["modules"]:
        table.add_row(m["name"], m["type"], m["widen"])
    out.print(table)
    for sp in r["spaces"]:
        if len(sp["producers"]) > 1:
            out.print(f"coupled (widened together): {', '.join(sp['producers'])} ({sp['width']} channels)",
                      markup=False)
    out.print(r["load"], markup=False)


@app.command()
def validate(
    ctx: typer.Context,
    spec: Annotated[Path, typer.Argument(help="Growth spec YAML.", show_default=False, metavar="SPEC")],
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", help="Also check the steps against "
                                                       "this checkpoint.")] = None,
    model: ModelOpt = None, json_: JsonOpt = False, report: ReportOpt = None,
):
    """Check a growth spec and report all of its problems at once (exit 2 if any)."""
    _setup(ctx, report=report, json_=json_)
    from .validation import validate as validate_spec  # light: no torch unless --checkpoint needs it

    result = validate_spec(spec, checkpoint=checkpoint, model=model)

    def human(r):
        if "plan" in r:
            p = r["plan"]
            out.print(f"{r['spec']}: valid, {len(p['steps'])} steps, parameters {p['params_before']:,} -> "
                      f"{p['params_after']:,}", markup=False)
        else:
            out.print(f"{r['spec']}: valid ({r['checked']}); {r['note']}", markup=False)

    _finish(ctx, result, human)


def _on_broken_pipe(console) -> None:
    """`n2n ... | head`: the reader left. Rich would exit 1 (n2n's "internal error"); exit 141 like a
    command killed by SIGPIPE, quietly, with clean-up still running (no signal is delivered)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(141)


def main() -> None:
    import rich.console

    rich.console.Console.on_broken_pipe = _on_broken_pipe  # also typer's help console
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code
    _exit_now(code)


def _exit_now(code) -> None:
    """End the process with ``code`` (a ``SystemExit`` code) without the interpreter's own
    clean-up, which with torch and transformers loaded takes 0.3-1 s of freeing modules (measured
    on the 1B benchmark) and joins threads left behind after an error (a config check still
    importing transformers). n2n's clean-up has run by now: outputs synced and moved into place or
    their temporary files removed, in the commands' own ``with`` blocks; what is left is to flush
    stdout and stderr."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that left (`n2n ... | head`), a closed stream
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
