"""Sentence-transformers directories: the module tree named by ``modules.json``, grown with the model.

A sentence-transformers directory is a Hugging Face model directory (the ``Transformer`` module at
path ``""``) plus ``modules.json`` naming further modules, each in its own subdirectory:
``Pooling`` (its ``config.json`` holds the token-embedding width), ``Dense`` (a linear layer with
its own weights), ``Normalize``. ``hf_io`` copies the top-level files (``modules.json``,
``sentence_bert_config.json``, ``config_sentence_transformers.json``); this module plans and writes
the module subdirectories, rewriting what a wider hidden size changes:

- Pooling's ``embedding_dimension`` (``word_embedding_dimension`` in older saves) becomes the new
  hidden size. Every pooling mode (mean, max, cls, last token, weighted mean, mean/sqrt(len)) works
  feature by feature, so the pooled vector of a tiled stream is the teacher's pooled vector tiled
  (and, for several modes, each mode's block tiled).
- The first ``Dense`` after Pooling reads that vector: its weight's input axis is widened as a
  reader of the stream, with the same mappings as every reader inside the model (tiled, divided by
  the copy count, zero columns for LEMON padding, the same zero-sum noise), so its output is the
  teacher's. Its ``in_features`` is rewritten. Later Dense modules read an unchanged width: their
  weights are re-written as they are. Dense weights are never copied as files.
- ``Normalize`` and ``Dropout`` have nothing that depends on the width.

Anything else (a Dense reading token embeddings or with a residual, a module after Normalize that
reads a stream-sized vector, LayerNorm, LSTM, CNN, Router/Asym, custom code) is refused (exit 2)
before anything is written, as is a ``modules.json`` naming a directory that is missing or outside
the model directory.

Verification (:func:`compare_embeddings`, only when sentence-transformers is installed): both
directories are loaded with sentence-transformers' own ``SentenceTransformer`` and encode the same
texts in one padded batch; the student's embeddings must equal the teacher's *de-tiled*: when the
final embedding is the stream (no Dense), the student's is the teacher's tiled r times plus zeros
where the stream was padded, divided by sqrt(r) when a Normalize follows. The cosine similarities
between the texts (what a user ranks by) are compared too and reported.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import torch

from . import fsutil
from .checkpoints import SafetensorsSource, StateDictSource, write_safetensors
from .errors import CheckpointError, OutputError, StepError
from .layers import Axis
from .planner import Load, Widen

MODULES = "modules.json"
CONFIG = "config.json"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
POOL_DIM_KEYS = ("embedding_dimension", "word_embedding_dimension")
NO_WIDTH = ("Normalize", "Dropout")  # modules with nothing that depends on the width
KNOWN = ("Transformer", "Pooling", "Dense", *NO_WIDTH)
# texts of several lengths (the batch is padded), in a few languages
TEXTS = ("The cat sits on the mat.", "A dog is playing in the park.",
         "Function-preserving transforms let a bigger network start where a smaller one ended.",
         "Il pleut des cordes ce matin.", "Das ist ein Test.", "42",
         ("Sentence embeddings are compared after pooling and normalisation, not only the hidden states, "
          "because the modules after the transformer read the widened stream too."),
         "¿Dónde está la biblioteca?")


@dataclass
class STModule:
    idx: int
    name: str
    path: str  # relative to the model directory; "" for the Transformer
    kind: str  # the class name: Transformer, Pooling, Dense, Normalize, Dropout
    config: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # non-weight files to copy (config.json rewritten)
    weights: str | None = None  # Dense: its weight file
    segments: int = 1  # Dense reading the pooled stream: how many pooled blocks (pooling modes)
    reads_stream: bool = False


@dataclass
class STPlan:
    """What to write for the module tree of a sentence-transformers directory."""

    src: Path
    modules: list[STModule]
    old_hidden: int
    new_hidden: int
    recipes: dict[str, list]  # "<dir>/<tensor>" -> ops (Dense weights)
    dtypes: dict[str, torch.dtype]
    shapes: dict[str, tuple[int, ...]]
    seed: int
    tiled_output: bool  # the sentence embedding is the (pooled) stream itself: the student's is tiled
    normalized: bool  # a Normalize is applied to the tiled output

    def to_dict(self) -> dict:
        return {"modules": [f"{m.path or '.'}: {m.kind}" for m in self.modules],
                "rewritten": [f"{m.path}/{CONFIG}" for m in self.modules if m.kind in ("Pooling", "Dense")
                              and self.old_hidden != self.new_hidden and (m.kind == "Pooling" or m.reads_stream)],
                "grown_weights": sorted(k for k in self.recipes if any(isinstance(o, Widen) for o in self.recipes[k]))}

    def written_bytes(self) -> int:
        return sum(math.prod(self.shapes[k]) * self.dtypes[k].itemsize for k in self.recipes) + \
            sum(os.path.getsize(self.src / m.path / f) for m in self.modules for f in m.files)


def _refuse(msg: str, where: Path, hint: str | None = None):
    return StepError(f"sentence-transformers module tree: {msg}", where=str(where), hint=hint,
                     short="sentence-transformers module not growable")


def read_modules(src: Path) -> list[STModule] | None:
    """The modules ``src/modules.json`` names (None when there is none), checked: known types, a
    Transformer at the root, every other directory present inside ``src``."""
    file = src / MODULES
    if not os.path.lexists(file):
        return None
    fsutil.require_regular_file(file, MODULES, CheckpointError)
    try:
        entries = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{MODULES} is not valid JSON ({e})", where=str(file)) from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("type"), str)
                                                and isinstance(e.get("path", ""), str) for e in entries):
        raise CheckpointError(f"{MODULES} must be a list of objects with 'type' and 'path'", where=str(file),
                              hint="Re-save the model with SentenceTransformer.save().")
    modules = []
    for i, e in enumerate(sorted(entries, key=lambda e: e.get("idx", 0) if isinstance(e.get("idx"), int) else 0)):
        typ, path = e["type"], e.get("path", "")
        kind = typ.rsplit(".", 1)[-1]
        if not typ.startswith("sentence_transformers.") or kind not in KNOWN:
            raise _refuse(f"module {e.get('name', i)!r} has type {typ!r}, which n2n does not know how to grow "
                          f"(it knows {', '.join(KNOWN)})", file,
                          hint="Grow the bare transformer (a copy of the directory without modules.json) and add "
                               "the other modules yourself.")
        p = PurePosixPath(path)
        if p.is_absolute() or ".." in p.parts or "\\" in path:
            raise _refuse(f"module {e.get('name', i)!r} has path {path!r}, outside the model directory", file)
        if kind == "Transformer":
            if path not in ("", "."):
                raise _refuse(f"the Transformer module lives in {path!r}, not in the model directory itself; n2n "
                              "grows the checkpoint at the top of the directory", file,
                              hint=f"Pass {src / path} (the transformer's own directory) instead.")
            modules.append(STModule(i, str(e.get("name", i)), "", kind))
            continue
        d = src / path
        if path in ("", "."):
            raise _refuse(f"module {e.get('name', i)!r} ({kind}) has no directory of its own", file)
        if not d.is_dir():
            if kind in NO_WIDTH and not os.path.lexists(d):  # sentence-transformers builds these without files
                modules.append(STModule(i, str(e.get("name", i)), path, kind))
                continue
            raise _refuse(f"module {e.get('name', i)!r} ({kind}) names the directory {path!r}, which is missing",
                          file, hint="Copy the module's directory into the model directory (or fix modules.json).")
        files, weights = [], []
        for f in sorted(os.listdir(d)):
            if f.startswith("."):
                continue
            if not (d / f).is_file():
                raise _refuse(f"{path}/{f} is not a regular file; n2n copies only flat module directories", file)
            (weights if f in WEIGHTS or f.lower().endswith((".safetensors", ".bin", ".pt", ".pth", ".onnx"))
             else files).append(f)
        m = STModule(i, str(e.get("name", i)), path, kind, files=files)
        if CONFIG in files:
            try:
                m.config = json.loads((d / CONFIG).read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError, RecursionError) as err:
                raise CheckpointError(f"{path}/{CONFIG} is not valid JSON ({err})", where=str(d / CONFIG)) from None
            if not isinstance(m.config, dict):
                raise CheckpointError(f"{path}/{CONFIG} must be a JSON object", where=str(d / CONFIG))
        if kind == "Dense":
            found = [w for w in WEIGHTS if w in weights]
            if not found or set(weights) - set(WEIGHTS):
                raise _refuse(f"the Dense module in {path!r} holds weight files {weights or 'none'}; n2n expects "
                              f"exactly one of {', '.join(WEIGHTS)}", file)
            m.weights = found[0]
        elif weights:
            raise _refuse(f"the {kind} module in {path!r} holds weight files ({', '.join(weights)}) that n2n does "
                          "not know how to grow; it never copies stale weights", file)
        if kind == "Pooling" and CONFIG not in files:
            raise _refuse(f"the Pooling module in {path!r} has no {CONFIG}", file)
        modules.append(m)
    if not modules or modules[0].kind != "Transformer" or sum(m.kind == "Transformer" for m in modules) != 1:
        raise _refuse("the first module must be the one Transformer (at the model directory)", file)
    return modules


def _pool_modes(cfg: dict) -> int:
    mode = cfg.get("pooling_mode")
    if isinstance(mode, str):
        return 1
    if isinstance(mode, list) and mode:
        return len(mode)
    n = sum(1 for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True)
    return max(n, 1)


def plan_modules(src: Path, plan) -> STPlan | None:
    """Plan the module tree of ``src`` for the grown model ``plan`` (an ``hf_plan.HFPlan``); None when
    ``src`` is not a sentence-transformers directory. Raises StepError for what cannot stay exact."""
    modules = read_modules(src)
    if modules is None:
        return None
    old, new = plan.arch_before.hidden, plan.arch_after.hidden
    # the widen ops of the residual stream, step by step: every reader of the stream gets these
    stream: dict[int, Widen] = {}
    for ops in plan.recipes.values():
        for op in ops:
            if isinstance(op, Widen):
                for ax, axis, mapping in op.axes:
                    if axis.space == "hidden" and op.step not in stream:
                        stream[op.step] = Widen(op.step, ((1, Axis("hidden", "in"), mapping),), op.method, op.noise,
                                                op.noise_mode)
    recipes, dtypes, shapes = {}, {}, {}
    width = None  # the width of the sentence embedding after each module; None: the token embeddings
    tiled, normalized = False, False  # is the current embedding the (pooled) stream? normalised since?
    segments = 1
    for m in modules:
        where = f"module {m.name!r} ({m.kind}, {m.path or '.'})"
        if m.kind == "Transformer":
            continue
        if m.kind == "Pooling":
            if width is not None:
                raise _refuse(f"{where} pools an already pooled embedding", src / MODULES)
            key = next((k for k in POOL_DIM_KEYS if k in m.config), None)
            if key is None or m.config[key] != old:
                raise _refuse(f"{where}: its {CONFIG} says {key or POOL_DIM_KEYS[0]} = {m.config.get(key)}, but the "
                              f"model's hidden_size is {old}", src / m.path / CONFIG)
            segments = _pool_modes(m.config)
            width, tiled = segments * old, True
            continue
        if m.kind in NO_WIDTH:
            if m.kind == "Normalize" and tiled:
                normalized = True
            continue
        # Dense
        c = m.config
        if c.get("module_input_name", "sentence_embedding") != "sentence_embedding" or width is None:
            raise _refuse(f"{where} reads the token embeddings (module_input_name "
                          f"{c.get('module_input_name', 'sentence_embedding')!r}); n2n grows Dense modules only "
                          "after pooling", src / m.path / CONFIG)
        if c.get("use_residual"):
            raise _refuse(f"{where} adds its input back (use_residual), which n2n does not grow", src / m.path / CONFIG)
        if c.get("in_features") != width:
            raise _refuse(f"{where}: in_features {c.get('in_features')} is not the width {width} of what it reads",
                          src / m.path / CONFIG)
        if tiled and normalized and new != old:
            raise _refuse(f"{where} reads the normalised embedding, whose tiled copies are each divided by "
                          f"sqrt(r): a wider hidden size cannot stay exact", src / m.path / CONFIG)
        m.reads_stream = tiled and new != old
        m.segments = segments
        src_w = _open_weights(src / m.path / m.weights)
        try:
            for k in src_w.keys():
                full = f"{m.path}/{k}"
                ops = [Load(full)]
                if k == "linear.weight" and m.reads_stream:
                    ops += [Widen(w.step, ((1, Axis("hidden", "in", segments=segments), w.axes[0][2]),), w.method,
                                  w.noise, w.noise_mode) for _, w in sorted(stream.items())]
                    shape = (src_w.shape(k)[0], segments * new)
                elif k.startswith("residual.") or (k != "linear.bias" and m.reads_stream):
                    raise _refuse(f"{where} holds the tensor {k!r}, which n2n does not know how to grow",
                                  src / m.path / m.weights)
                else:
                    shape = tuple(src_w.shape(k))
                recipes[full], dtypes[full], shapes[full] = ops, src_w.dtype(k), shape
            if "linear.weight" not in src_w.keys():
                raise _refuse(f"{where} has no 'linear.weight' in {m.weights}", src / m.path / m.weights)
        finally:
            if hasattr(src_w, "close"):
                src_w.close()
        width, tiled, normalized = c.get("out_features"), False, False
    return STPlan(src, modules, old, new, recipes, dtypes, shapes, plan.seed, tiled and new != old, normalized)


def _open_weights(path: Path):
    fsutil.require_regular_file(path, "weights file", CheckpointError)
    return SafetensorsSource(path) if path.suffix == ".safetensors" else StateDictSource(path)


class _Files:
    """A TensorSource over the Dense weight files of a module tree, keyed ``<dir>/<tensor>``."""

    def __init__(self, st: STPlan):
        self.st, self._open = st, {}

    def get(self, key: str) -> torch.Tensor:
        d, k = key.rsplit("/", 1)
        if d not in self._open:
            m = next(m for m in self.st.modules if m.path == d)
            self._open[d] = _open_weights(self.st.src / d / m.weights)
        return self._open[d].get(k)


def _config_text(st: STPlan, m: STModule) -> str | None:
    """The rewritten config.json of a module, or None to copy it as it is."""
    if st.old_hidden == st.new_hidden:
        return None
    cfg = dict(m.config)
    if m.kind == "Pooling":
        for k in POOL_DIM_KEYS:
            if k in cfg:
                cfg[k] = st.new_hidden
    elif m.kind == "Dense" and m.reads_stream:
        cfg["in_features"] = m.segments * st.new_hidden
    else:
        return None
    return json.dumps(cfg, indent=4) + "\n"


def write_modules(st: STPlan, staged: Path, out: Path) -> list[str]:
    """Write the module directories into ``staged`` (the output being built); return the files written."""
    from . import hf_io
    from .execute import Materializer

    written = []
    produce = Materializer(SimpleNamespace(recipes=st.recipes, dtypes=st.dtypes, seed=st.seed), _Files(st)).get
    for m in st.modules:
        if not m.path or (not m.files and m.weights is None and not (st.src / m.path).is_dir()):
            continue
        d = staged / m.path
        d.mkdir(parents=True, exist_ok=True)
        for f in m.files:
            text = _config_text(st, m) if f == CONFIG else None
            if text is None:
                try:
                    shutil.copyfile(st.src / m.path / f, d / f)
                except OSError as e:
                    raise OutputError(f"cannot copy {m.path}/{f} ({e.strerror})", where=str(out)) from None
            else:
                hf_io.write_text(d / f, text, out)
            written.append(f"{m.path}/{f}")
        if m.weights is not None:
            keys = [k for k in st.recipes if k.rsplit("/", 1)[0] == m.path]
            write_safetensors(d / "model.safetensors", [(k.rsplit("/", 1)[1], st.dtypes[k], st.shapes[k]) for k in keys],
                              lambda k, p=m.path: produce(f"{p}/{k}"), {"format": "pt"},
                              name=str(out / m.path / "model.safetensors"))
            written.append(f"{m.path}/model.safetensors")
    return written


# ----------------------------------------------------------------------------- verification


def installed() -> bool:
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        return False
    return True


def encode(path: Path, texts, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device=str(device), local_files_only=True,
                                model_kwargs={"dtype": dtype, "attn_implementation": "eager"})
    model.eval()
    with torch.no_grad():
        emb = model.encode(list(texts), batch_size=len(texts), convert_to_tensor=True, show_progress_bar=False)
    return emb.to("cpu", torch.float64)


def detile(student: torch.Tensor, teacher_dim: int, normalized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the teacher-width embedding the student's copies stand for, the student's zero-padded tail):
    a tiled student is [e, .., e, 0..] (times 1/sqrt(r) when normalised after tiling)."""
    r = student.shape[1] // teacher_dim
    copies = student[:, :r * teacher_dim].unflatten(1, (r, teacher_dim))
    return copies * (math.sqrt(r) if normalized else 1.0), student[:, r * teacher_dim:]


def compare_embeddings(teacher: Path, student: Path, *, atol: float, rtol: float, device: torch.device,
                       dtype: torch.dtype, seed: int, texts=TEXTS, normalized: bool | None = None) -> dict:
    """Sentence embeddings of ``texts`` by both directories (SentenceTransformer): the student's,
    de-tiled, must equal the teacher's; also the max error of the cosine similarities between texts."""
    from .verify import compare_outputs

    t = encode(teacher, texts, device, dtype)
    s = encode(student, texts, device, dtype)
    if s.shape[1] != t.shape[1]:
        if normalized is None:  # a unit-norm student: normalised after tiling
            normalized = bool(torch.allclose(s.norm(dim=1), torch.ones(len(s), dtype=s.dtype), atol=1e-4))
        copies, tail = detile(s, t.shape[1], normalized)
        expected = torch.cat([t.unsqueeze(1).expand_as(copies).flatten(1), torch.zeros_like(tail)], dim=1)
        got = torch.cat([copies.flatten(1), tail], dim=1)
    else:
        expected, got = t, s
    c = compare_outputs(expected, got, atol=atol, rtol=rtol, probes=len(texts), seed=seed, device=device,
                        dtype=dtype).to_dict()
    c["argmax_agreement"] = None
    cos = torch.nn.functional.cosine_similarity
    c["cosine_max_abs_error"] = float((cos(t[:, None], t[None], dim=-1) - cos(s[:, None], s[None], dim=-1)).abs().max())
    c["texts"] = len(texts)
    c["dimension"] = [t.shape[1], s.shape[1]]
    c["compared"] = "sentence embeddings (SentenceTransformer.encode), de-tiled" if s.shape[1] != t.shape[1] else \
        "sentence embeddings (SentenceTransformer.encode)"
    c["passed"] = bool(c["passed"] and c["cosine_max_abs_error"] <= atol + rtol)
    return c
