"""What the curvature measures return: a result per measure, with its per-batch values."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class TraceResult:
    """``value``: the mean over batches of ``tr(C H C)``; ``stderr``: its standard error (from the
    probes' spread); ``per_batch`` / ``per_batch_stderr``: one per batch."""

    value: float
    stderr: float
    per_batch: list[float]
    per_batch_stderr: list[float]
    n_probes: int
    estimator: str


@dataclass
class EigenResult:
    """``values``: the ``k`` largest eigenvalues of ``C H C``, largest first, averaged over batches;
    ``per_batch``: each batch's; ``vectors``: each batch's eigenvectors ``{name: [k, *shape]}``
    (with ``return_vectors=True``); ``iterations`` and ``converged`` per batch."""

    values: list[float]
    per_batch: list[list[float]]
    iterations: list[int]
    converged: list[bool]
    vectors: list[dict[str, torch.Tensor]] | None = field(default=None, repr=False)


@dataclass
class SpectrumResult:
    """The quadratures of every probe of every batch (``nodes[b][j]``, ``weights[b][j]``) of the
    ``n``-dimensional ``C H C``; ``density`` smooths them into the spectral density, ``trace_of``
    estimates ``tr f(C H C)``, ``plot`` draws the density."""

    nodes: list[list[torch.Tensor]]
    weights: list[list[torch.Tensor]]
    n: int

    def trace_of(self, f) -> float:
        """``tr f(A)``, averaged over batches: ``n * mean_j sum_k weights_jk f(nodes_jk)``."""
        per_batch = [self.n * sum(float((w * f(x)).sum()) for x, w in zip(xs, ws)) / len(xs)
                     for xs, ws in zip(self.nodes, self.weights)]
        return sum(per_batch) / len(per_batch)

    def density(self, grid: torch.Tensor | None = None, sigma: float | None = None, n_grid: int = 512):
        """``(grid, density)``: the mean over probes and batches of Gaussians of width ``sigma``
        (default 1% of the spectrum's span) at the nodes, weighted; integrates to 1."""
        nodes = torch.cat([x for xs in self.nodes for x in xs])
        weights = torch.cat([w for ws in self.weights for w in ws]) / sum(len(xs) for xs in self.nodes)
        lo, hi = float(nodes.min()), float(nodes.max())
        span = max(hi - lo, 1e-12 * max(1.0, abs(hi)))
        sigma = 0.01 * span if sigma is None else float(sigma)
        if grid is None:
            grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, n_grid, dtype=torch.float64)
        z = (grid[:, None] - nodes[None, :]) / sigma
        return grid, (weights[None, :] * torch.exp(-0.5 * z ** 2)).sum(1) / (sigma * math.sqrt(2 * math.pi))

    def plot(self, ax=None, log: bool = True, **density_kwargs):
        """The density on a matplotlib axis (created if not given); returns the axis."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.2))
        grid, dens = self.density(**density_kwargs)
        ax.plot(grid.numpy(), dens.clamp(min=1e-12 if log else 0).numpy())
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("eigenvalue of C H C")
        ax.set_ylabel("density")
        return ax


@dataclass
class AdamResult:
    """``value``: the mean over batches of ``sum_i sqrt(max(d_i, 0))``, ``d = diag(C H C)``;
    ``negative``: per batch, the fraction of coordinates whose ``d_i < 0`` (counted as 0);
    ``exact``: the diagonal was computed, not estimated."""

    value: float
    per_batch: list[float]
    negative: list[float]
    exact: bool


@dataclass
class RenyiResult:
    """``value``: the mean over batches of ``log tr(P^alpha) / (alpha - 1)``, ``P = A_+ / tr A_+``;
    ``negative_mass``: per batch, the share of the spectrum's absolute mass on negative eigenvalues,
    which ``A_+`` (the positive part) leaves out (0 for the GGN)."""

    value: float
    per_batch: list[float]
    negative_mass: list[float]
    alpha: float
