"""The worst-case solvers side by side: what each finds and what each costs.

    python -m benchmarks.bench_solvers [--device cpu|cuda] [--repeats 5] [--out benchmarks/SOLVER_RESULTS.md]

Three tables, all from one run:
  * the diagonal linear network at zero loss (closed-form maxima, ``tests/properties/test_closed_forms.py``):
    the fraction of the maximum each solver and start reaches;
  * trained digits networks (the models of ``bench_sharpness``), adaptive l2 and linf at the
    default preset's radii, 20 iterations: the distribution over m-batches of scaled / published,
    and the iterations each needs to reach 99% of its final value (median over batches);
  * cost: the fused backend's time for each solver over the bare ``n_iters`` forward+backward
    passes, best of interleaved rounds after a warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

import sharpfast
from benchmarks.bench_curvature import emit
from benchmarks.bench_ops import device_name
from benchmarks.bench_sharpness import DigitsCNN, bare_worst, clock, digits_batches, mlp25, small_model, trained
from sharpfast.worst_case import reference
from sharpfast.params import ModelGuard

RADII = {"l2": 0.5, "linf": 0.002}   # the default preset's adaptive radii
N_ITERS = 20
MODELS = {"mlp-small": (small_model, 8), "mlp-25x64": (lambda: mlp25(64), 4), "mlp-25x256": (mlp25, 4),
          "cnn-bn": (DigitsCNN, 4)}


def dln_rows():
    """(solver, start, norm, scale, fraction of the closed-form maximum)."""
    from tests.properties.test_closed_forms import diagonal_network, exact_worst_case, scale_kwargs, scales
    from tests.toy_models import half_squared_error
    model, X, y, u, v = diagonal_network()
    rows = []
    for norm in ("l2", "linf"):
        for c_kind in ("adaptive", "balanced") + (("standard",) if norm == "linf" else ()):
            a, b = scales(c_kind, u, v)
            exact = exact_worst_case(c_kind, norm, 0.2, u, v)
            for solver, init, restarts in (("published", "random", 8), ("scaled", "random", 8),
                                           ("published", "eigen", 1), ("scaled", "eigen", 1)):
                r = sharpfast.worst_case_sharpness(model, [(X, y)], rho=0.2, norm=norm, n_iters=30, solver=solver,
                                                   init=init, n_restarts=restarts, loss_fn=half_squared_error,
                                                   backend="reference", **scale_kwargs(c_kind, a, b))
                rows.append((solver, f"{init} x{restarts}", norm, c_kind, r.sharpness / exact))
    return rows


def trajectories(model, batches, s):
    """Per batch, the best loss increase after each iteration (the reference, with its iterate hook;
    each iterate's loss is evaluated again here, outside the timed paths)."""
    params = s.bind(model)
    deltas = []
    with ModelGuard(model):
        reference.solve(model, batches, params, s, on_iterate=lambda d, c: deltas.append(
            [t.detach().clone() for t in d]))
    out = []
    with ModelGuard(model), torch.no_grad():
        w0 = [p.detach().clone() for p in params.tensors]
        for b, (x, y) in enumerate(batches):
            L0 = float(torch.nn.functional.cross_entropy(model(x), y))
            best, curve = 0.0, []
            for delta in deltas[b * s.n_iters:(b + 1) * s.n_iters]:
                for p, w, d in zip(params.tensors, w0, delta):
                    p.data = w + d
                best = max(best, float(torch.nn.functional.cross_entropy(model(x), y)) - L0)
                curve.append(best)
            for p, w in zip(params.tensors, w0):
                p.data = w
            out.append(curve)
    return out


def iterations_to(curve, fraction=0.99):
    final = curve[-1]
    return next(i + 1 for i, v in enumerate(curve) if v >= fraction * final) if final > 0 else 0


def quality_and_cost(device, repeats):
    quality, cost = [], []
    for name, (make, n_batches) in MODELS.items():
        torch.manual_seed(0)
        model = trained(make(), device)
        batches = digits_batches(n_batches, 128, device)
        n_params = sum(p.numel() for p in model.parameters())
        for norm, rho in RADII.items():
            kw = dict(rho=rho, norm=norm, n_iters=N_ITERS)
            curves = {solver: trajectories(model, batches, sharpfast.WorstCaseSettings(solver=solver, **kw))
                      for solver in ("published", "scaled")}
            ratios = [n[-1] / p[-1] for n, p in zip(curves["scaled"], curves["published"]) if p[-1] > 0]
            iters = {solver: statistics.median(iterations_to(c) for c in curves[solver]) for solver in curves}
            quality.append((name, n_params, norm, rho, min(ratios), statistics.median(ratios), max(ratios),
                            iters["published"], iters["scaled"]))
            print(f"{name:11s} {norm:4s} scaled/published min {min(ratios):.3f} median {statistics.median(ratios):.3f}"
                  f" max {max(ratios):.3f}; iterations to 99%: {iters}", flush=True)
            fns = {"bare": lambda: bare_worst(model, batches, N_ITERS)}
            for solver in ("published", "scaled"):
                fns[solver] = lambda solver=solver: sharpfast.worst_case_sharpness(model, batches, backend="fused",
                                                                                   solver=solver, **kw)
            for fn in fns.values():
                fn()   # warm-up
            times = {k: [] for k in fns}
            for _ in range(repeats):
                for k, fn in fns.items():
                    times[k].append(clock(fn, device))
            best = {k: min(v) for k, v in times.items()}
            cost.append((name, n_params, norm, best["bare"], best["published"], best["scaled"]))
            print(f"{name:11s} {norm:4s} bare {best['bare']*1e3:.1f} ms  published {best['published']/best['bare']:.2f}x"
                  f"  scaled {best['scaled']/best['bare']:.2f}x", flush=True)
    return quality, cost


def markdown(device, dln, quality, cost, argv):
    lines = ["# Worst-case solvers: published APGD vs the scaled solver", "",
             f"Device: {device_name(device)}; torch {torch.__version__}; sharpfast {sharpfast.__version__}.",
             f"Command: `python -m benchmarks.bench_solvers {' '.join(argv)}`. All numbers from this one run.", "",
             "## The diagonal linear network: fraction of the closed-form maximum", "",
             "rho = 0.2, 30 iterations, reference backend; `random x8`: 8 random starts, `eigen x1`: the two",
             "starts +-rho v of the top eigenvector of C H C. At zero loss the gradient vanishes: a zero start",
             "cannot move. In the linf box each coordinate has two locally optimal corners whose values differ",
             "at order rho^3, so the maximum is a search over sign patterns that more starts widen.", "",
             "| norm | scale c | solver | starts | fraction of max |", "|---|---|---|---|---:|"]
    lines += [f"| {norm} | {c} | {solver} | {init} | {frac:.4f} |" for solver, init, norm, c, frac in
              sorted(dln, key=lambda r: (r[2], r[3], r[0], r[1]))]
    lines += ["", "## Trained digits networks: what each solver finds", "",
              f"Adaptive, {N_ITERS} iterations from delta = 0, m = 128; the ratio scaled / published of the",
              "per-batch values (min, median, max over the m-batches), and the median number of iterations",
              "each needs to reach 99% of its own final value.", "",
              "| model | params | norm | rho | min | median | max | iterations to 99%: published | scaled |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {m} | {n:,} | {norm} | {rho:g} | {lo:.3f} | {med:.3f} | {hi:.3f} | {ip:g} | {isc:g} |"
              for m, n, norm, rho, lo, med, hi, ip, isc in quality]
    lines += ["", "## Cost: the fused backend over the bare passes", "",
              f"bare = {N_ITERS} forward+backward passes per batch in plain PyTorch; best of interleaved rounds.", "",
              "| model | params | norm | bare ms | published / bare | scaled / bare |", "|---|---:|---|---:|---:|---:|"]
    lines += [f"| {m} | {n:,} | {norm} | {b*1e3:.1f} | {p/b:.2f} | {s/b:.2f} |" for m, n, norm, b, p, s in cost]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dln = dln_rows()
    quality, cost = quality_and_cost(device, args.repeats)
    emit(markdown(device, dln, quality, cost, sys.argv[1:] if argv is None else argv), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
