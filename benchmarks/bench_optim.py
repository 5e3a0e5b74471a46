"""A SAM step against its floor and against davda54/sam, in one process.

    python -m benchmarks.bench_optim [--device cpu|cuda] [--rounds 5] [--davda54 PATH/TO/sam.py]

For each model (the digits zoo's MLP, CNN and ViT, the 25-layer MLP of bench_sharpness) and
``adaptive`` off and on, it times ``--steps`` training steps of SGD (lr 0.1, momentum 0.9,
weight decay 5e-4) on one batch of 128, best of ``--rounds`` interleaved rounds after a warm-up:

  * floor     - what SAM cannot avoid: two forward+backward passes and the base optimizer's step;
  * sharpfast - ``sharpfast.optim.SAM`` (the fused path);
  * davda54   - davda54/sam's ``SAM``, loaded from ``--davda54`` (a copy of its sam.py; the column
                is left out without it).

Memory, in units of the parameters' bytes: what the optimizer holds beyond the base optimizer's
state between steps, and the peak a step allocates beyond what was allocated before it (CUDA
allocator statistics, or the torch profiler's allocation events on a CPU). Results go to
benchmarks/OPTIM_RESULTS.md, one section per device type.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys

import torch
import torch.nn.functional as F

import sharpfast
from benchmarks.bench_ops import device_name
from benchmarks.bench_sharpness import clock, digits_batches, mlp25, peak_bytes
from benchmarks.results import write_section
from sharpfast.optim import SAM
from sharpfast.study import zoo

SGD_KW = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
MODELS = {"mlp": lambda: zoo.mlp(width=64), "cnn": lambda: zoo.cnn(width=32), "vit": lambda: zoo.vit(width=32),
          "mlp-25x256": lambda: mlp25(256)}
RHO = {False: 0.05, True: 2.0}   # davda54/sam's README: rho 0.05, and 2.0 with adaptive


def load_davda54(path: str):
    spec = importlib.util.spec_from_file_location("davda54_sam", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SAM


def sam_steps(model, opt, x, y, steps):
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)


def floor_steps(model, opt, x, y, steps):
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def contenders(name, adaptive, device, davda54_cls):
    """name -> (model, optimizer, the steps function), each on its own copy of the model."""
    torch.manual_seed(0)
    base = MODELS[name]().to(device)
    out = {}
    for who in ("floor", "sharpfast") + (("davda54",) if davda54_cls else ()):
        model = copy.deepcopy(base)
        params = model.parameters()
        if who == "floor":
            out[who] = (model, torch.optim.SGD(params, **SGD_KW), floor_steps)
        elif who == "sharpfast":
            out[who] = (model, SAM(params, torch.optim.SGD, rho=RHO[adaptive], adaptive=adaptive, **SGD_KW), sam_steps)
        else:
            out[who] = (model, davda54_cls(params, torch.optim.SGD, rho=RHO[adaptive], adaptive=adaptive, **SGD_KW),
                        sam_steps)
    return out


def held_bytes(who, opt) -> int:
    """What a SAM optimizer holds beyond its base optimizer's state between steps."""
    if who == "sharpfast":
        return sum(t.numel() * t.element_size() for t in opt._saved.values())
    if who == "davda54":
        return sum(s["old_p"].numel() * s["old_p"].element_size() for s in opt.state.values() if "old_p" in s)
    return 0


def run(device, rounds, steps, names, davda54_cls):
    rows = []
    x, y = digits_batches(1, 128, device)[0]   # flat: the 25-layer MLP's input; 8x8 images for the zoo's
    for name in names:
        xs = x if name.startswith("mlp-25") else x.view(-1, 1, 8, 8)
        for adaptive in (False, True):
            runs = contenders(name, adaptive, device, davda54_cls)
            for model, opt, fn in runs.values():   # warm-up: buffers allocated, kernels loaded
                fn(model, opt, xs, y, 2)
            best = {who: float("inf") for who in runs}
            for _ in range(rounds):
                for who, (model, opt, fn) in runs.items():
                    best[who] = min(best[who], clock(lambda: fn(model, opt, xs, y, steps), device) / steps)
            model0 = runs["floor"][0]
            param_bytes = sum(p.numel() * p.element_size() for p in model0.parameters())
            peaks = {who: peak_bytes(lambda: fn(model, opt, xs, y, 1), device) / param_bytes
                     for who, (model, opt, fn) in runs.items()}
            held = {who: held_bytes(who, opt) / param_bytes for who, (_, opt, _) in runs.items()}
            rows.append(dict(model=name, params=sum(p.numel() for p in model0.parameters()), adaptive=adaptive,
                             seconds=best, peaks=peaks, held=held))
            davda = f"davda54 {best['davda54'] * 1e3:8.2f} ms " if "davda54" in best else ""
            print(f"{name:11s} adaptive={adaptive!s:5s} floor {best['floor'] * 1e3:8.2f} ms  sharpfast "
                  f"{best['sharpfast'] * 1e3:8.2f} ms ({best['sharpfast'] / best['floor']:.3f}x floor)  {davda}",
                  flush=True)
    return rows


def table(rows, device, steps, rounds, with_davda54):
    lines = [f"## {device.type.upper()}", "",
             f"Device: {device_name(device)}; torch {torch.__version__}; sharpfast {sharpfast.__version__}.",
             f"Command: `python -m benchmarks.bench_optim {' '.join(sys.argv[1:])}`. Milliseconds per step, best of "
             f"{rounds} interleaved rounds of {steps} steps after a warm-up; SGD (lr 0.1, momentum 0.9, weight decay "
             "5e-4), one batch of 128 digits, rho 0.05 (2.0 adaptive). floor = two forward+backward passes and the "
             "SGD step. Memory in units of the parameters' bytes: held = what the SAM optimizer keeps beyond SGD's "
             "momentum between steps; peak = what one step allocates at most, activations included.", "",
             "| model | params | adaptive | floor ms | sharpfast ms | sharpfast / floor |"
             + (" davda54 ms | davda54 / sharpfast |" if with_davda54 else "")
             + " held (sharpfast" + (", davda54" if with_davda54 else "") + ") | peak (floor, sharpfast"
             + (", davda54" if with_davda54 else "") + ") |",
             "|---|---:|---|---:|---:|---:|" + ("---:|---:|" if with_davda54 else "") + "---:|---:|"]
    for r in rows:
        s, pk, hd = r["seconds"], r["peaks"], r["held"]
        line = (f"| {r['model']} | {r['params']:,} | {'yes' if r['adaptive'] else 'no'} | {s['floor'] * 1e3:.2f} | "
                f"{s['sharpfast'] * 1e3:.2f} | {s['sharpfast'] / s['floor']:.3f} |")
        if with_davda54:
            line += f" {s['davda54'] * 1e3:.2f} | {s['davda54'] / s['sharpfast']:.2f} |"
        line += " " + ", ".join(f"{hd[w]:.1f}" for w in ("sharpfast", "davda54") if w in hd) + " | "
        line += ", ".join(f"{pk[w]:.1f}" for w in ("floor", "sharpfast", "davda54") if w in pk) + " |"
        lines.append(line)
    return "\n".join(lines) + "\n"


HEADER = """# sharpfast.optim: a SAM step against its floor and davda54/sam

Written by `python -m benchmarks.bench_optim` (one section per device type; rerun it to refresh a
section). Targets: within 1.05x of the floor (two forward+backward passes and the base optimizer's
step) on a CPU, and faster than davda54/sam on every row.
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    ap.add_argument("--davda54", help="path to a copy of davda54/sam's sam.py, run side by side")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "OPTIM_RESULTS.md"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = args.models.split(",")
    unknown = set(names) - set(MODELS)
    if unknown:
        ap.error(f"unknown model(s) {sorted(unknown)}; known: {', '.join(MODELS)}")
    davda54_cls = load_davda54(args.davda54) if args.davda54 else None
    rows = run(device, args.rounds, args.steps, names, davda54_cls)
    write_section(args.out, device.type, table(rows, device, args.steps, args.rounds, davda54_cls is not None), HEADER)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
