"""Grow a LLaMA-shaped checkpoint at real sizes: n2n against the copy floor, a naive script and
mergekit, each run in a fresh process, all in one interleaved loop (issue 8).

    python scripts/bench_llm.py --size 1b --dtype bf16 --repeat 3 [--mergekit-python PATH]
    python scripts/bench_llm.py --quick          # tiny size, one round: a smoke test
    python scripts/bench_llm.py --device cuda    # n2n transforms and verifies on the GPU

The checkpoint (random weights, norms perturbed around 1) is written tensor by tensor with
safetensors' own format, sharded like ``save_pretrained`` (5 GB shards plus an index when it
is bigger), without ever instantiating the model. Then, for deepen (layers x 1.5, LLaMA Pro
interleaving) and widen (intermediate_size x 2), every tool runs in a fresh process:

- ``cp``: ``cp -r`` + ``sync`` of the output files (the floor: read + write at disk speed);
- ``naive``: ``load_file`` every shard, build the new state dict, ``save_file`` (no check);
- ``n2n-noverify``: ``n2n deepen|widen ... --no-verify``;
- ``n2n``: the same, verified;
- ``mergekit`` (deepen only: it cannot widen): passthrough with zeroed output projections, run
  from ``--mergekit-python`` when that interpreter can import mergekit, else skipped with a note.

Before each run the disk is synced (untimed), so that what one tool leaves to write back is not
billed to the next. Every tool is timed until its output is on disk, as ``cp`` + ``sync`` is: n2n
fsyncs its files before it exits; the naive script and mergekit do not, so after they exit their
output files are fsynced too and that time added ("exit" is what the process alone took, "time"
the total). Reported per tool: median time (durable) and exit time, peak RSS of the child
(``os.wait4``'s rusage), bytes written, the ratio to the floor (the ``cp`` time scaled by (bytes
read + written) / (2 x input bytes)) and to ``n2n-noverify``, both on durable times. Temporary
files live under ``--workdir`` (default /tmp/n2n-bench) and are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SIZES = {  # hidden, intermediate, layers, heads, kv_heads, vocab
    "tiny": (64, 176, 4, 4, 2, 512),
    "1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B
    "3b": (3200, 8640, 26, 32, 32, 32000),  # open_llama_3b
    "7b": (4096, 11008, 32, 32, 32, 32000),  # Llama-2-7B
}
MISTRAL_SIZES = {**SIZES, "7b": (4096, 14336, 32, 32, 8, 32000)}  # --window: Mistral-7B-v0.1's own shape at 7b
ST_DTYPE = {"bf16": "BF16", "fp32": "F32"}
SHARD_BYTES = 5 * 10**9  # save_pretrained's max_shard_size before transformers 5 (50GB since), as most hubs' 7B are

NAIVE = r'''
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
src, out, op = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
cfg = json.loads((src / "config.json").read_text())
idx = src / "model.safetensors.index.json"
files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.exists() else ["model.safetensors"]
sd = {}
for f in files:
    sd.update(load_file(src / f))
L = cfg["num_hidden_layers"]
if op == "deepen":
    new, n, m = {}, 0, L // 2
    blocks = {i: {k.split(".", 3)[3]: v for k, v in sd.items() if k.startswith(f"model.layers.{i}.")} for i in range(L)}
    for k, v in sd.items():
        if not k.startswith("model.layers."):
            new[k] = v
    for i in range(L):
        for name, v in blocks[i].items():
            new[f"model.layers.{n}.{name}"] = v
        n += 1
        for _ in range((i + 1) * m // L - i * m // L):
            for name, v in blocks[i].items():
                new[f"model.layers.{n}.{name}"] = torch.zeros_like(v) if name.endswith(("o_proj.weight", "down_proj.weight")) else v.clone()
            n += 1
    cfg["num_hidden_layers"] = n
else:
    I = cfg["intermediate_size"]
    g = torch.cat([torch.arange(I), torch.randint(0, I, (I,), generator=torch.Generator().manual_seed(0))])
    c = torch.bincount(g, minlength=I).float()[g]
    new = dict(sd)
    for i in range(L):
        p = f"model.layers.{i}.mlp."
        new[p + "gate_proj.weight"] = sd[p + "gate_proj.weight"][g]
        new[p + "up_proj.weight"] = sd[p + "up_proj.weight"][g]
        w = sd[p + "down_proj.weight"]
        new[p + "down_proj.weight"] = (w.float()[:, g] / c).to(w.dtype)
    cfg["intermediate_size"] = 2 * I
out.mkdir()
save_file(new, out / "model.safetensors", metadata={"format": "pt"})
(out / "config.json").write_text(json.dumps(cfg, indent=2))
'''

MERGEKIT_YAML = """merge_method: passthrough
dtype: {dtype}
slices:
{slices}
"""


def config_for(size: str, dtype: str, window: int | None = None) -> dict:
    """LLaMA's config of that size; with ``window``, Mistral's with that sliding window, whose
    verification runs a probe past the window (``window`` + 16 tokens): at 7b Mistral-7B-v0.1's
    shape (intermediate 14336, 8 key/value heads), else LLaMA's tensors."""
    hidden, inter, layers, heads, kv, vocab = (SIZES if window is None else MISTRAL_SIZES)[size]
    kind = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"} if window is None else \
        {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": window}
    return {**kind, "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab,
            "max_position_embeddings": 2048 if window is None else max(2048, 2 * window),
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": {"bf16": "bfloat16", "fp32": "float32"}[dtype]}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def build_checkpoint(out: Path, size: str, dtype: str, seed: int = 0, window: int | None = None) -> int:
    """Write config.json and the shards; returns the weight bytes. One tensor in memory at a time."""
    import torch

    cfg = config_for(size, dtype, window)
    tdtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    entries = tensor_shapes(cfg)
    item = 2 if dtype == "bf16" else 4
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for key, shape in entries:
        n = math.prod(shape) * item
        if shards[-1] and used + n > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((key, shape))
        used += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)])
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    total = 0
    for name, shard in zip(names, shards):
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for key, shape in shard:
            n = math.prod(shape) * item
            header[key] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for key, shape in shard:
                if len(shape) == 1:
                    t = 1 + 0.1 * torch.randn(shape, generator=g)
                else:
                    t = torch.randn(shape, generator=g).mul_(0.02)
                f.write(t.to(tdtype).contiguous().view(torch.uint8).numpy().tobytes())
        total += off
    if len(shards) > 1:
        wm = {key: name for name, shard in zip(names, shards) for key, _ in shard}
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2, sort_keys=True))
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def sync_files(path: Path) -> float:
    """fsync every file under ``path`` (what ``sync FILE...`` does); the seconds it took."""
    t0 = time.perf_counter()
    for p in sorted(path.rglob("*")) if path.exists() else []:
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return time.perf_counter() - t0


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, int, str]:
    """(seconds, peak RSS MB, exit code, stderr tail) of one fresh child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    err = p.stderr.read().decode(errors="replace")
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, ru.ru_maxrss / 1024, p.returncode, err[-2000:]


def mergekit_slices(layers: int) -> str:
    m = layers // 2
    out = []
    for i in range(layers):
        out.append(f"  - sources:\n      - model: SRC\n        layer_range: [{i}, {i + 1}]")
        for _ in range((i + 1) * m // layers - i * m // layers):
            out.append(f"  - sources:\n      - model: SRC\n        layer_range: [{i}, {i + 1}]\n"
                       "        parameters:\n          scale:\n            - filter: o_proj\n              value: 0.0\n"
                       "            - filter: down_proj\n              value: 0.0\n            - value: 1.0")
    return "\n".join(out)


def commands(tool: str, op: str, src: Path, out: Path, cfg: dict, dtype: str, work: Path,
             mergekit_python: str | None, device: str = "cpu") -> list[str] | None:
    n2n = [sys.executable, "-m", "n2n_cli"]
    L = cfg["num_hidden_layers"]
    grow = (["deepen", str(src), str(out), "--layers", str(L + L // 2)] if op == "deepen" else
            ["widen", str(src), str(out), "--dim", "intermediate_size", "--factor", "2"])
    if tool == "cp":
        return ["sh", "-c", f'cp -r "{src}" "{out}" && sync "{out}"/*']
    if tool == "naive":
        return [sys.executable, "-c", NAIVE, str(src), str(out), op]
    if tool == "n2n-noverify":
        return n2n + grow + ["--no-verify", "--device", device, "--quiet"]
    if tool == "n2n":
        return n2n + grow + ["--device", device, "--quiet"]
    if tool == "mergekit":
        if op != "deepen" or not mergekit_python:
            return None
        yml = work / "mergekit.yml"
        yml.write_text(MERGEKIT_YAML.format(dtype={"bf16": "bfloat16", "fp32": "float32"}[dtype],
                                            slices=mergekit_slices(L).replace("SRC", str(src))))
        exe = Path(mergekit_python).parent / "mergekit-yaml"
        return [str(exe), str(yml), str(out), "--lazy-unpickle", "--out-shard-size", "5B"]
    raise ValueError(tool)


def has_mergekit(python: str | None) -> str | None:
    if not python:
        return "mergekit: skipped (pass --mergekit-python PATH, an interpreter of a side venv with mergekit)"
    r = subprocess.run([python, "-c", "import mergekit"], capture_output=True)
    if r.returncode != 0 or not (Path(python).parent / "mergekit-yaml").exists():
        return f"mergekit: skipped ({python} cannot import mergekit or has no mergekit-yaml beside it)"
    return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="1b")
    ap.add_argument("--dtype", choices=list(ST_DTYPE), default="bf16")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ops", default="deepen,widen", help="comma-separated: deepen, widen")
    ap.add_argument("--tools", default="cp,naive,mergekit,n2n-noverify,n2n")
    ap.add_argument("--mergekit-python", default=None)
    ap.add_argument("--device", default="cpu", help="n2n's --device (cpu, cuda, ...): where it transforms and verifies")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/n2n-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    ap.add_argument("--quick", action="store_true", help="tiny size, one round, deepen only (smoke test)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--window", type=int, default=None,
                    help="a Mistral-shaped checkpoint with this sliding window (verification probes past it)")
    ap.add_argument("--build-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build_only:  # in a child, so that this process never imports torch: a forked child's peak
        print(build_checkpoint(args.build_only, args.size, args.dtype, window=args.window))  # RSS starts from its parent's
        return {}
    if args.quick:
        args.size, args.repeat, args.ops = "tiny", 1, "deepen"
    tools = args.tools.split(",")
    ops = args.ops.split(",")
    note = has_mergekit(args.mergekit_python) if "mergekit" in tools else None
    if note:
        print(note, file=sys.stderr)
        tools = [t for t in tools if t != "mergekit"]
    work = args.workdir / f"{'llama' if args.window is None else 'mistral'}-{args.size}-{args.dtype}-{os.getpid()}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    src = work / "teacher"
    results: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    try:
        t0 = time.perf_counter()
        in_bytes = int(subprocess.run([sys.executable, __file__, "--build-only", str(src), "--size", args.size,
                                       "--dtype", args.dtype, *(["--window", str(args.window)] if args.window else [])],
                                      check=True, capture_output=True, text=True).stdout)
        os.sync()  # the build's own write-back would slow the first round's tools (cp 4.9 s instead of 1.5 s)
        cfg = json.loads((src / "config.json").read_text())
        print(f"built {src}: {in_bytes / 1e9:.2f} GB of weights in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for rnd in range(args.repeat):
            for op in ops:
                for tool in tools:
                    out = work / f"out-{op}-{tool}"
                    shutil.rmtree(out, ignore_errors=True)
                    cmd = commands(tool, op, src, out, cfg, args.dtype, work, args.mergekit_python, args.device)
                    if cmd is None:
                        continue
                    # each tool starts on a quiet disk: what the previous one left to write back
                    # (the naive script and mergekit do not fsync) or to discard (its deleted
                    # output) is not billed to the next one
                    os.sync()
                    secs, rss, rc, err = timed(cmd, env)
                    if rc != 0:
                        raise SystemExit(f"{tool} {op} failed (exit {rc}):\n{err}")
                    flush = sync_files(out)  # ~0 for cp and n2n, which synced already
                    results.setdefault((op, tool), []).append((secs + flush, rss, dir_bytes(out), secs))
                    print(f"round {rnd + 1}/{args.repeat} {op:6} {tool:13} {secs + flush:7.2f} s "
                          f"(exit {secs:.2f} s)  {rss:8.0f} MB", file=sys.stderr)
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    table = report(results, in_bytes, args)
    if note:
        print(f"\n{note}")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    return table


def report(results, in_bytes: int, args) -> dict:
    load = os.getloadavg()
    shape = "LLaMA" if args.window is None else f"Mistral (sliding window {args.window})"
    print(f"\n{shape} {args.size} {args.dtype}: {in_bytes / 1e9:.2f} GB in; median of {args.repeat}; "
          f"{os.cpu_count()} CPUs; n2n --device {args.device}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| op | tool | time (s) | exit (s) | peak RSS (MB) | written (GB) | x floor | x n2n --no-verify |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for op in dict.fromkeys(op for op, _ in results):
        floor = results.get((op, "cp"))
        base = results.get((op, "n2n-noverify"))
        for (o, tool), runs in results.items():
            if o != op:
                continue
            secs = statistics.median(r[0] for r in runs)
            exit_secs = statistics.median(r[3] for r in runs)
            rss = max(r[1] for r in runs)
            written = runs[-1][2]
            x_floor = x_n2n = None
            if floor:
                scaled = statistics.median(r[0] for r in floor) * (in_bytes + written) / (2 * in_bytes)
                x_floor = secs / scaled
            if base:
                x_n2n = secs / statistics.median(r[0] for r in base)
            rows.append({"op": op, "tool": tool, "seconds": secs, "exit_seconds": exit_secs, "peak_rss_mb": rss,
                         "written_bytes": written,
                         "x_floor": x_floor, "x_n2n_noverify": x_n2n, "runs": [r[0] for r in runs]})
            fmt = (lambda v: "-" if v is None else f"{v:.2f}")
            print(f"| {op} | {tool} | {secs:.2f} | {exit_secs:.2f} | {rss:.0f} | {written / 1e9:.3f} | {fmt(x_floor)} | {fmt(x_n2n)} |")
    return {"size": args.size, "dtype": args.dtype, "window": args.window, "device": args.device, "input_bytes": in_bytes,
            "repeat": args.repeat,
            "loadavg": load, "rows": rows}


if __name__ == "__main__":
    main()
