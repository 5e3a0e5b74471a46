"""Curvature side by side: sharpfast against PyHessian and curvlinops on the same model, batch and
number of Hessian-vector products; values, time per measure, time per HVP against one gradient.

    python -m benchmarks.bench_curvature [--device cpu|cuda] [--out benchmarks/CURVATURE_RESULTS.md]

The peers are optional (a measure whose library is missing is left out). They pull torchvision and
a newer torch through backpack when installed plainly; install them beside the README's torch in a
throwaway environment with ``pip install --no-deps pyhessian curvlinops-for-pytorch
backpack-for-pytorch einops einconv linear_operator jaxtyping wadler_lindig``.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import sharpfast
from benchmarks.bench_ops import device_name


def cnn() -> nn.Module:
    """A ~12.7K-parameter CNN for 8x8 digits (the size PyHessian's trace timing is quoted for)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 16), nn.ReLU(), nn.Linear(16, 10))


def digits_batch(n: int, device):
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    x = torch.tensor(X[:n], dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    return x.to(device), torch.tensor(y[:n]).to(device)


def timed(fn, repeats: int = 3):
    """(best wall time of ``repeats`` runs, the last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hvps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    model = cnn().to(device).eval()
    x, y = digits_batch(args.batch, device)
    n_params = sum(p.numel() for p in model.parameters())
    rows = []

    def gradient():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
    t_grad, _ = timed(gradient, args.repeats)
    model.zero_grad(set_to_none=True)
    rows.append(("one gradient (forward + backward)", t_grad, None, "-"))

    # sharpfast: the plain Hessian (adaptive=False), as the peers compute it
    kw = dict(adaptive=False)
    t, r = timed(lambda: sharpfast.hessian_trace(model, [(x, y)], n_probes=args.hvps, estimator="hutchinson", **kw),
                 args.repeats)
    rows.append((f"sharpfast hessian_trace, Hutchinson, {args.hvps} HVPs", t, f"{r.value:.5g} +- {r.stderr:.2g}",
                 f"{t / args.hvps / t_grad:.2f}"))
    t, r = timed(lambda: sharpfast.hessian_trace(model, [(x, y)], n_probes=args.hvps, estimator="hutch++", **kw),
                 args.repeats)
    rows.append((f"sharpfast hessian_trace, Hutch++, {args.hvps} HVPs", t, f"{r.value:.5g} +- {r.stderr:.2g}",
                 f"{t / args.hvps / t_grad:.2f}"))
    t, e = timed(lambda: sharpfast.hessian_eigenvalues(model, [(x, y)], k=1, tol=1e-4, **kw), args.repeats)
    rows.append((f"sharpfast hessian_eigenvalues, k=1, tol 1e-4 ({e.iterations[0]} HVPs)", t, f"{e.values[0]:.6g}",
                 f"{t / e.iterations[0] / t_grad:.2f}"))

    try:
        from pyhessian import hessian as PyHessian
        # a fresh object on a freshly built model (same weights) per run: on a model another
        # PyHessian object has used, trace() stops after two products
        hess = lambda: PyHessian(cnn().to(device).eval(), nn.CrossEntropyLoss(), data=(x, y),
                                 cuda=device.type == "cuda")
        t, tr = timed(lambda: hess().trace(maxIter=args.hvps, tol=0.0), args.repeats)
        assert len(tr) == args.hvps, f"PyHessian's trace stopped after {len(tr)} products"
        rows.append((f"PyHessian trace, {args.hvps} HVPs", t, f"{sum(tr) / len(tr):.5g}", f"{t / args.hvps / t_grad:.2f}"))
        t, (vals, _) = timed(lambda: hess().eigenvalues(maxIter=100, tol=1e-4, top_n=1), args.repeats)
        rows.append(("PyHessian eigenvalues, top_n=1, tol 1e-4", t, f"{vals[0]:.6g}", "-"))
        model.zero_grad(set_to_none=True)
    except ImportError:
        print("PyHessian not installed: left out", file=sys.stderr)
    try:
        from curvlinops import HessianLinearOperator, hutchinson_trace
        params = [p for p in model.parameters() if p.requires_grad]
        H = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
        t, tr = timed(lambda: float(hutchinson_trace(H, args.hvps)), args.repeats)
        rows.append((f"curvlinops hutchinson_trace, {args.hvps} HVPs", t, f"{tr:.5g}", f"{t / args.hvps / t_grad:.2f}"))
    except ImportError:
        print("curvlinops not installed: left out", file=sys.stderr)

    head = (f"Device: {device_name(device)}. Model: a CNN with {n_params} parameters on a batch of {args.batch} "
            f"8x8 digits, cross-entropy, eval mode. Best of {args.repeats} runs each; `HVP / grad` is the time "
            f"of one Hessian-vector product over one forward+backward.\n\n"
            f"Command: `python -m benchmarks.bench_curvature {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    table = ["| measure | time (s) | value | HVP / grad |", "|---|---|---|---|"]
    table += [f"| {name} | {t:.3f} | {v if v is not None else '-'} | {ratio} |" for name, t, v, ratio in rows]
    text = "# sharpfast curvature vs PyHessian and curvlinops\n\n" + head + "\n" + "\n".join(table) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
