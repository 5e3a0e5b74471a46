"""Eigenvalue spectral densities of chosen zoo checkpoints, drawn on one figure (the ESD plots
researchers put beside sharpness tables): ``sharpfast esd --zoo ZOO [--ids ...] --out DIR``."""
from __future__ import annotations

import os

import sharpfast

from ..zoo.checkpoints import Manifest, ManifestError, load_model


def chosen(manifest: Manifest, ids: list[str] | None, target: str = "test_error"):
    """The entries named by ``ids``, or by default the zoo's best and worst by ``target``."""
    by_id = {e.id: e for e in manifest.models}
    if ids:
        ids = list(dict.fromkeys(ids))   # each checkpoint once, in the order first named
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ManifestError(f"no checkpoint(s) {missing} in the zoo (known: {sorted(by_id)[:5]}, ...)")
        return [by_id[i] for i in ids]
    ranked = sorted(manifest.models, key=lambda e: e.metrics.get(target, float("inf")))
    return ranked[:1] + ranked[-1:] if len(ranked) > 1 else ranked


def plot_esd(zoo: str, out_dir: str, ids: list[str] | None = None, n_examples: int | None = None, m: int = 128,
             adaptive: bool = False, curvature: str = "hessian", n_vectors: int = 5, n_iter: int = 60) -> str:
    """One figure with the spectral density of ``C H C`` (m-batches of ``m`` of the zoo's
    sharpness examples) for each chosen checkpoint; returns the PNG's path. ``n_examples`` as a
    sweep takes it: by default 512, or the largest multiple of ``m`` a smaller zoo's data hold."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..definitions import Definition, check_data, fit_to_data

    manifest = Manifest.load(zoo)
    entries = chosen(manifest, ids)
    d = Definition("trace", m=m, n_examples=n_examples, curvature=curvature)
    if n_examples is None:
        (d,), message = fit_to_data(manifest, [d])
        if message:
            print(f"esd: {message}", flush=True)
    check_data(manifest, [d])
    n_examples = d.n_examples
    x, y = manifest.sharpness_data(n_examples)
    batches = [(x[i:i + m], y[i:i + m]) for i in range(0, n_examples, m)]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    peak = 0.0
    for entry in entries:
        spectrum = sharpfast.hessian_spectrum(load_model(manifest, entry), batches, adaptive=adaptive,
                                              curvature=curvature, n_vectors=n_vectors, n_iter=n_iter)
        grid, density = spectrum.density()
        label = entry.id + "".join(f", {k} {v:.3g}" for k, v in entry.metrics.items() if k == "test_error")
        ax.plot(grid.numpy(), density.clamp(min=1e-12).numpy(), label=label)
        peak = max(peak, float(density.max()))
    ax.set_yscale("log")
    ax.set_ylim(bottom=peak * 1e-6)   # six decades: the outliers show, the smoothing's tails do not
    ax.set_xlabel(f"eigenvalue of {'C H C' if adaptive else 'H'} ({curvature})")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "esd.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
