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
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import sharpfast
from benchmarks.bench_ops import device_name


def cnn() -> nn.Module:
    """A ~13K-parameter CNN for 8x8 digits (the size PyHessian's trace timing is quoted for)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 16), nn.ReLU(), nn.Linear(16, 10))


def trained_cnn(x, y, steps: int = 300) -> dict:
    """The CNN's weights after ``steps`` of full-batch Adam on ``(x, y)``: curvature is measured
    where people measure it, near a minimum (a trained network's Hessian has the few large
    outliers Hutch++ and Lanczos exploit; a fresh one's has not)."""
    model = cnn().to(x.device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fresh(state: dict, device) -> nn.Module:
    model = cnn().to(device).eval()
    model.load_state_dict(state)
    return model


def digits_batch(n: int, device):
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    x = torch.tensor(X[:n], dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    return x.to(device), torch.tensor(y[:n]).to(device)


def interleaved(fns: dict, rounds: int):
    """Each round runs every measure once, in turn, so that a slow spell of a shared machine falls on
    all of them alike: ``{name: (median seconds, min seconds, last result)}``."""
    times, out = {k: [] for k in fns}, {}
    for _ in range(rounds):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            out[name] = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return {k: (statistics.median(v), min(v), out[k]) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hvps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reference-probes", type=int, default=2000)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    x, y = digits_batch(args.batch, device)
    state = trained_cnn(x, y)
    model = fresh(state, device)
    n_params = sum(p.numel() for p in model.parameters())
    data, plain = [(x, y)], dict(adaptive=False)   # the plain Hessian, as the peers compute it
    fns, hvps = {}, {}

    def gradient():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
    fns["one gradient (forward + backward)"] = gradient
    for est in ("hutchinson", "hutch++"):
        name = f"sharpfast hessian_trace, {est}"
        fns[name] = lambda est=est: sharpfast.hessian_trace(model, data, n_probes=args.hvps, estimator=est, **plain)
        hvps[name] = args.hvps
    for k in (1, 5):
        fns[f"sharpfast hessian_eigenvalues, k={k}, tol 1e-4"] = \
            lambda k=k: sharpfast.hessian_eigenvalues(model, data, k=k, tol=1e-4, **plain)
    try:
        from pyhessian import hessian as PyHessian
        # a fresh object on a fresh model per call: on a model another PyHessian object has used,
        # trace() stops after two products
        hess = lambda: PyHessian(fresh(state, device), nn.CrossEntropyLoss(), data=(x, y), cuda=device.type == "cuda")
        fns["PyHessian trace"] = lambda: hess().trace(maxIter=args.hvps, tol=0.0)
        hvps["PyHessian trace"] = args.hvps
        for k in (1, 5):
            fns[f"PyHessian eigenvalues, top_n={k}, tol 1e-4"] = \
                lambda k=k: hess().eigenvalues(maxIter=100, tol=1e-4, top_n=k)[0]
    except ImportError:
        print("PyHessian not installed: left out", file=sys.stderr)
    try:
        from curvlinops import HessianLinearOperator, hutchinson_trace, hutchpp_trace
        params = [p for p in model.parameters() if p.requires_grad]
        H = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, data, check_deterministic=False)
        fns["curvlinops hutchinson_trace"] = lambda: float(hutchinson_trace(H, args.hvps))
        hvps["curvlinops hutchinson_trace"] = args.hvps
        thirds = 3 * (args.hvps // 3)   # curvlinops' Hutch++ takes a multiple of 3
        fns["curvlinops hutchpp_trace"] = lambda: float(hutchpp_trace(H, thirds))
        hvps["curvlinops hutchpp_trace"] = thirds
    except ImportError:
        print("curvlinops not installed: left out", file=sys.stderr)

    results = interleaved(fns, args.rounds)
    reference = sharpfast.hessian_trace(model, data, n_probes=args.reference_probes, estimator="hutchinson",
                                        seed=1, **plain)
    t_grad = results["one gradient (forward + backward)"][0]
    table = ["| measure | HVPs | median (s) | min (s) | value | per HVP / gradient |", "|---|---|---|---|---|---|"]
    for name, (med, best, out) in results.items():
        n = hvps.get(name)
        if isinstance(out, sharpfast.curvature.EigenResult):
            n, value = out.iterations[0], ", ".join(f"{v:.6g}" for v in out.values)
        elif isinstance(out, sharpfast.curvature.TraceResult):
            value = f"{out.value:.4g} ± {out.stderr:.2g}"
        elif isinstance(out, list) and name.startswith("PyHessian trace"):
            value = f"{sum(out) / len(out):.4g}"
        elif isinstance(out, list):
            value = ", ".join(f"{v:.6g}" for v in out)
        elif out is None:
            value = "-"
        else:
            value = f"{out:.4g}"
        ratio = f"{med / n / t_grad:.2f}" if n else "-"
        table.append(f"| {name} | {n or '-'} | {med:.3f} | {best:.3f} | {value} | {ratio} |")
    head = (f"Device: {device_name(device)}. Model: a CNN with {n_params} parameters after 300 full-batch Adam "
            f"steps on a batch of {args.batch} 8x8 digits, cross-entropy, eval mode; the plain Hessian "
            f"(`adaptive=False`). {args.rounds} interleaved rounds (each round runs every measure once, so a "
            f"slow spell of the machine falls on all alike). `per HVP / gradient` is a measure's median time "
            f"per Hessian-vector product over the median forward+backward. Reference trace: sharpfast "
            f"Hutchinson with {args.reference_probes} probes (another seed), {reference.value:.4g} ± "
            f"{reference.stderr:.2g}.\n\n"
            f"Command: `python -m benchmarks.bench_curvature {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    emit("# sharpfast curvature vs PyHessian and curvlinops\n\n" + head + "\n" + "\n".join(table) + "\n", args.out)
    return 0


def emit(text: str, out: str | None) -> None:
    """Print a results table and, with ``--out``, write it there."""
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
