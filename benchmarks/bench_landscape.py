"""A loss-landscape grid: sharpfast against the public code's loop and the bare forwards, in one process.

    python -m benchmarks.bench_landscape [--device cpu|cuda] [--num 51] [--public PATH/TO/loss-landscape]

For the digits zoo's MLP (width 64), CNN and ViT (width 32) on 512 examples (4 batches of 128) and a ``num x num``
grid of filter-normalized random directions, it times:

  * bare      - the forwards the grid needs and nothing else: every batch through the unchanged
                model once per grid point (no weights formed);
  * sharpfast - ``sharpfast.landscape`` (its automatic points per pass, and ``--points K`` forced);
  * public    - tomgoldstein/loss-landscape's loop with the same directions: ``set_weights`` and
                ``eval_loss`` per point, imported from ``--public`` (a snapshot of its repository,
                outside this project; the column is left out without it).

Results go to benchmarks/LANDSCAPE_RESULTS.md, one section per device type.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import types

import numpy as np
import torch

import sharpfast
from benchmarks.bench_ops import device_name
from benchmarks.bench_sharpness import digits_batches
from benchmarks.results import write_section
from sharpfast.study import zoo

MODELS = {"mlp": lambda: zoo.mlp(width=64), "cnn": lambda: zoo.cnn(width=32), "vit": lambda: zoo.vit(width=32)}


def load_public(path: str):
    """loss-landscape's net_plotter and evaluation modules (its model_loader, which needs
    torchvision, is not used and is stubbed)."""
    sys.path.insert(0, path)
    sys.modules.setdefault("model_loader", types.ModuleType("model_loader"))
    import evaluation
    import net_plotter
    return net_plotter, evaluation


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def bare(model, batches, points):
    model.eval()
    with torch.no_grad():
        for _ in range(points):
            for x, _y in batches:
                model(x)


def public_loop(net_plotter, evaluation, model, batches, dirs, xs, ys):
    net = copy.deepcopy(model)
    w = net_plotter.get_weights(net)
    crit = torch.nn.CrossEntropyLoss()
    losses = np.zeros((len(ys), len(xs)))
    for i, cy in enumerate(ys):
        for j, cx in enumerate(xs):
            net_plotter.set_weights(net, w, dirs, [cx, cy])
            losses[i, j] = evaluation.eval_loss(net, crit, batches)[0]
    return losses


def run(device, num, names, points, public):
    rows = []
    batches = [(x.view(-1, 1, 8, 8), y) for x, y in digits_batches(4, 128, device)]
    xs = np.linspace(-1, 1, num)
    for name in names:
        torch.manual_seed(0)
        model = MODELS[name]().to(device).eval()
        n_points = num * num
        row = dict(model=name, params=sum(p.numel() for p in model.parameters()), points=n_points)
        # warm-up: every path once on a 2x2 grid (allocator, oneDNN primitives, the extension)
        bare(model, batches, 4)
        warm = sharpfast.landscape(model, batches, x=(-1, 1, 2), y=(-1, 1, 2), points_per_pass=points)
        if public:
            public_loop(*public, model, batches, [list(d.values()) for d in warm.directions], xs[:2], xs[:2])
        row["bare"], _ = timed(lambda: bare(model, batches, n_points), device)
        row["sharpfast"], r = timed(lambda: sharpfast.landscape(model, batches, x=(-1, 1, num), y=(-1, 1, num)), device)
        row["auto_k"] = r.meta["points_per_pass"]
        if points:
            row["forced"], _ = timed(lambda: sharpfast.landscape(model, batches, x=(-1, 1, num), y=(-1, 1, num),
                                                                  points_per_pass=points), device)
        if public:
            dirs = [list(d.values()) for d in r.directions]
            row["public"], losses = timed(lambda: public_loop(*public, model, batches, dirs, xs, xs), device)
            row["max_diff"] = float(np.abs(losses - r.loss).max())
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def table(rows, device, num, points, with_public):
    lines = [f"## {device.type.upper()}", "",
             f"Device: {device_name(device)}; torch {torch.__version__}; sharpfast {sharpfast.__version__}.",
             f"Command: `python -m benchmarks.bench_landscape {' '.join(sys.argv[1:])}`. A {num}x{num} grid of "
             "filter-normalized random directions over 512 digits examples (4 batches of 128), seconds for the "
             "whole grid, one run. bare = the grid's forwards through the unchanged model.", "",
             "| model | params | points | bare s | sharpfast s (K auto) | sharpfast / bare |"
             + (f" sharpfast s (K={points}) |" if points else "")
             + (" public s | public / sharpfast | max loss difference |" if with_public else ""),
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if points else "") + ("---:|---:|---:|" if with_public else "")]
    for r in rows:
        line = (f"| {r['model']} | {r['params']:,} | {r['points']} | {r['bare']:.2f} | {r['sharpfast']:.2f} "
                f"(K={r['auto_k']}) | {r['sharpfast'] / r['bare']:.2f} |")
        if points:
            line += f" {r['forced']:.2f} |"
        if with_public:
            line += f" {r['public']:.2f} | {r['public'] / r['sharpfast']:.2f} | {r['max_diff']:.1e} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


HEADER = """# sharpfast.landscape: a grid against the public loop and the bare forwards

Written by `python -m benchmarks.bench_landscape` (one section per device type; rerun it to refresh a
section). Targets on a CPU: at most 1.3x the bare forwards of the grid, never slower than the
public loop, at least 3x faster on the digits zoo's small models; on a GPU at least 10x.
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num", type=int, default=51, help="grid points per axis")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--points", type=int, default=None, help="also time this many grid points per pass")
    ap.add_argument("--public", help="a snapshot of tomgoldstein/loss-landscape, run side by side")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "LANDSCAPE_RESULTS.md"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    public = load_public(args.public) if args.public else None
    rows = run(device, args.num, args.models.split(","), args.points, public)
    write_section(args.out, device.type, table(rows, device, args.num, args.points, public is not None), HEADER)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
