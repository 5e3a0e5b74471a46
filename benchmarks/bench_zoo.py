"""Stacked zoo evaluation: rows per second one checkpoint at a time against ``sharpfast.evaluate_many``.

    python -m benchmarks.bench_zoo [--device cpu|cuda] [--stacks 1,4,16,64] [--models mlp,cnn,vit,mlp-25x64]

For each model (the digits zoo's MLP, CNN and ViT at their widest, and the 25-layer MLPs of
bench_sharpness) it builds K models of the architecture (different seeds) and measures, in one
run: the K models one at a time through ``evaluate_sharpness`` and as
one stack through ``evaluate_many(stack=K)``, for worst-case linf, worst-case l2 (adaptive, the
published solver) and average-case l2, and the floor: the bare stacked forward+backward passes
those evaluations need (one vmapped pass over the K models per APGD step). A row is one
(checkpoint, definition) value; ``rows/s`` is K over the time of all K. Results are written to
benchmarks/ZOO_RESULTS.md (one section per device type). The evaluation is shortened (2 batches
of 128, 5 APGD iterations, 5 noise draws): the per-step costs compared are those of the full one.
"""
from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, stack_module_state, vmap

import sharpfast
import sharpfast.many as many
from benchmarks.bench_sharpness import clock, digits_batches, mlp25
from benchmarks.results import write_section
from sharpfast.study import zoo

N_BATCHES, BATCH, N_ITERS, N_SAMPLES = 2, 128, 5, 5
MODELS = {   # name -> factory (the zoo's take 8x8 images, the 25-layer MLPs flat vectors)
    "mlp": lambda: zoo.mlp(width=64),
    "cnn": lambda: zoo.cnn(width=32),
    "vit": lambda: zoo.vit(width=32),
    "mlp-25x64": lambda: mlp25(64),
    "mlp-25x256": lambda: mlp25(256),
}
GPU_ONLY_BY_DEFAULT = ("mlp-25x256",)
DEFINITIONS = {
    "worst linf": sharpfast.WorstCaseSettings(rho=0.002, norm="linf", n_iters=N_ITERS),
    "worst l2": sharpfast.WorstCaseSettings(rho=0.5, norm="l2", n_iters=N_ITERS),
    "average l2": sharpfast.AverageCaseSettings(rho=0.1, norm="l2", n_samples=N_SAMPLES),
}


def build(name: str, k: int, device) -> list[torch.nn.Module]:
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(MODELS[name]().to(device).eval())
    return models


def timed(fn, device) -> float:
    fn()   # warm-up: the first vmapped call of an architecture traces it
    return clock(fn, device)


def bare_stacked(models, batches, settings):
    """The stacked passes the evaluation needs: per batch, n_iters + 1 vmapped forward+backward
    passes (worst case) or n_samples + 1 vmapped forwards (average case), and nothing else."""
    params, buffers = stack_module_state(models)
    shape = models[0]
    loss = lambda p, b, x, y: F.cross_entropy(functional_call(shape, (p, b), (x,)), y)
    worst = settings.kind == "worst"
    step = vmap(grad(loss) if worst else loss, in_dims=(0, 0, None, None))
    passes = (settings.n_iters if worst else settings.n_samples) + 1

    def run():
        for x, y in batches:
            for _ in range(passes):
                out = step(params, buffers, x, y)
        return out
    return run


def measure(name: str, k: int, device) -> list[dict]:
    # stacked also where evaluate_many's default does not stack on a CPU (the measurement behind that default)
    many.CPU_STACK_MAX_ACTIVATIONS = math.inf
    models = build(name, k, device)
    batches = digits_batches(N_BATCHES, BATCH, device)
    if not name.startswith("mlp-25"):
        batches = [(x.view(-1, 1, 8, 8), y) for x, y in batches]
    rows = []
    for label, settings in DEFINITIONS.items():
        one = timed(lambda: [sharpfast.evaluate_sharpness(m, batches, settings) for m in models], device)
        stacked = timed(lambda: sharpfast.evaluate_many(models, batches, settings, stack=k), device)
        floor = timed(bare_stacked(models, batches, settings), device)
        rows.append(dict(model=name, params=sum(p.numel() for p in models[0].parameters()), k=k, definition=label,
                         one=k / one, stacked=k / stacked, floor=k / floor))
        print(f"{name:10s} K={k:3d} {label:11s} one {k / one:8.1f} rows/s  stacked {k / stacked:8.1f} rows/s "
              f"(x{one / stacked:.2f})  floor {k / floor:8.1f}", flush=True)
    return rows


def table(rows: list[dict], device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    lines = [f"Device: {name}; torch {torch.__version__}; {N_BATCHES} batches of {BATCH}, {N_ITERS} APGD iterations, "
             f"{N_SAMPLES} noise draws.", "",
             "| model | params | K | definition | one at a time (rows/s) | stacked (rows/s) | stacked / one | "
             "bare stacked passes (rows/s) | stacked / bare |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']} | {r['k']} | {r['definition']} | {r['one']:.1f} | "
                     f"{r['stacked']:.1f} | {r['stacked'] / r['one']:.2f}x | {r['floor']:.1f} | "
                     f"{r['stacked'] / r['floor']:.2f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--stacks", default="1,4,16,64", help="comma-separated K")
    ap.add_argument("--models", help=f"comma-separated subset of {', '.join(MODELS)} "
                                     f"(default: all; {', '.join(GPU_ONLY_BY_DEFAULT)} on a GPU only)")
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch threads (default 1, as the sweep)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "ZOO_RESULTS.md"))
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    names = args.models.split(",") if args.models else [
        n for n in MODELS if device.type == "cuda" or n not in GPU_ONLY_BY_DEFAULT]
    unknown = set(names) - set(MODELS)
    if unknown:
        ap.error(f"unknown model(s) {sorted(unknown)}; known: {', '.join(MODELS)}")
    rows = [r for name in names for k in map(int, args.stacks.split(",")) for r in measure(name, k, device)]
    text = table(rows, device) + "\n"
    print(text)
    write_section(args.out, device.type, text, RESULTS_HEADER)


RESULTS_HEADER = """# sharpfast stacked zoo evaluation

Written by `python -m benchmarks.bench_zoo` (one section per device type; rerun it to refresh a
section): rows per second one checkpoint at a time (`evaluate_sharpness`) against
`sharpfast.evaluate_many` on stacks of K models, and the bare stacked forward+backward passes.
"""


if __name__ == "__main__":
    main()
