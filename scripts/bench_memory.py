"""Peak memory of growing a large checkpoint: n2n (streaming) against a naive baseline
(load the whole state dict, transform, save_file), both measured in this run.

    python scripts/bench_memory.py [--layers 12] [--width 4096]

Each measurement runs in a fresh subprocess (Linux /proc) and reports two peaks: anonymous
memory (heap: what the process really allocates; sampled every 2 ms) and the whole resident
set (VmHWM), which also counts the pages of the memory-mapped input file: those are the
kernel's page cache, shared and dropped under memory pressure. The checkpoint is an MLP of ``--layers`` square float32 linears.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r'''
import json, sys, threading, time
from pathlib import Path
import torch

def status():
    return {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(("RssAnon", "VmHWM"))}

peak, done = [status()["RssAnon"]], False
def sample():  # the kernel keeps no high-water mark of anonymous memory alone: sample it
    while not done:
        peak[0] = max(peak[0], status()["RssAnon"])
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
mode, src, out, model = sys.argv[1:5]
t0 = time.perf_counter()
if mode == "n2n":
    from n2n_cli import api
    from n2n_cli.spec import spec_from_steps
    spec = spec_from_steps([{"widen": {"layer": "fc1", "factor": 2}}], seed=0)
    api.grow(spec, src, out, model=model, device="cpu", force=True, verify=sys.argv[5] == "verify")
elif mode == "naive":
    from safetensors.torch import load_file, save_file
    sd = load_file(src)
    w1, b1, w2 = sd["fc1.weight"], sd["fc1.bias"], sd["fc2.weight"]
    n = w1.shape[0]
    g = torch.cat([torch.arange(n), torch.randint(0, n, (n,))])
    c = torch.bincount(g, minlength=n).float()
    sd["fc1.weight"], sd["fc1.bias"] = w1[g], b1[g]
    sd["fc2.weight"] = w2[:, g] / c[g]
    save_file(sd, out)
else:
    pass  # "import": the interpreter + torch alone
seconds = time.perf_counter() - t0
done = True
st = status()
print(json.dumps({"seconds": seconds, "peak_mb": st["VmHWM"] / 1024, "anon_mb": max(peak[0], st["RssAnon"]) / 1024}))
'''


def measure(*args: str) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=4096)
    args = ap.parse_args()
    import torch
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        layers = []
        sd = {}
        g = torch.Generator().manual_seed(0)
        for i in range(1, args.layers + 1):
            layers.append({"type": "linear", "name": f"fc{i}", "out_features": args.width})
            layers.append({"type": "relu"})
            sd[f"fc{i}.weight"] = torch.randn(args.width, args.width, generator=g) / args.width ** 0.5
            sd[f"fc{i}.bias"] = torch.zeros(args.width)
        layers.pop()
        model = d / "model.yaml"
        model.write_text(json.dumps({"input_shape": [args.width], "layers": layers}))  # JSON is YAML
        src = d / "teacher.safetensors"
        save_file(sd, str(src))
        del sd
        size_mb = src.stat().st_size / 2**20
        touched_mb = 3 * args.width * args.width * 4 / 2**20  # fc1.weight, fc2.weight and their growth
        print(f"checkpoint: {args.layers} x {args.width}^2 float32 = {size_mb:.0f} MiB; "
              f"one widen step touches fc1/fc2: {touched_mb:.0f} MiB in, {2 * touched_mb:.0f} MiB out")
        base = measure("import", str(src), str(d / "x.safetensors"), str(model))
        rows = [("naive (load_file + save_file)", measure("naive", str(src), str(d / "a.safetensors"), str(model))),
                ("n2n grow --no-verify", measure("n2n", str(src), str(d / "b.safetensors"), str(model), "noverify")),
                ("n2n grow (verified)", measure("n2n", str(src), str(d / "c.safetensors"), str(model), "verify"))]
        print(f"{'run':32} {'heap peak':>10} {'heap / ckpt':>12} {'heap vs naive':>14} {'RSS peak':>9} {'time':>7}")
        naive_extra = rows[0][1]["anon_mb"] - base["anon_mb"]
        for name, r in rows:
            extra = r["anon_mb"] - base["anon_mb"]
            print(f"{name:32} {extra:7.0f} MB {extra / size_mb:11.2f}x {extra / naive_extra:13.2f}x "
                  f"{r['peak_mb'] - base['peak_mb']:6.0f} MB {r['seconds']:6.1f}s")
        print(f"(peaks above the interpreter + torch alone: {base['anon_mb']:.0f} MB heap, {base['peak_mb']:.0f} MB RSS)")


if __name__ == "__main__":
    main()
