"""Matrix-free estimators on a symmetric operator ``A`` (``matvec`` on ``[N, k]`` blocks):
Hutchinson and Hutch++ traces, the exact and the estimated diagonal, and Lanczos with full
reorthogonalization for the extreme eigenvalues.

Probes come from the Philox stream (``sharpfast.philox``): the same seed draws the same probes on
every device and thread count. Rademacher probes for traces and diagonals (the minimum-variance
choice for Hutchinson), a Gaussian start for Lanczos.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..philox import draw

CURVATURE_SAMPLE_BASE = 1 << 30   # probe k of a batch is sample CURVATURE_SAMPLE_BASE + k of its stream
PROBES_PER_PASS = 16              # probe vectors per vmapped product


def probes(dist: str, seed: int, stream: int, first: int, k: int, n: int, dtype, device) -> torch.Tensor:
    """``[n, k]``: column j is draw ``first + j`` (of ``CURVATURE_SAMPLE_BASE``) of the stream, by the
    fused op where the extension has kernels for the device, else by its pure-PyTorch twin."""
    cols = []
    for j in range(k):
        cols.append(draw(dist, seed, stream, CURVATURE_SAMPLE_BASE + first + j, n, dtype, device))
    return torch.stack(cols, dim=1)


def _in_blocks(A, V: torch.Tensor) -> torch.Tensor:
    return torch.cat([A.matvec(V[:, j:j + PROBES_PER_PASS]) for j in range(0, V.shape[1], PROBES_PER_PASS)], dim=1)


@dataclass
class Estimate:
    value: float
    stderr: float


def hutchinson(A, n_probes: int, seed: int, stream: int) -> Estimate:
    """``tr A ~ mean_j z_j^T A z_j`` over Rademacher ``z_j``; stderr from the samples' spread."""
    Z = probes("rademacher", seed, stream, 0, n_probes, A.n, A.w.dtype, A.w.device)
    samples = (Z * _in_blocks(A, Z)).sum(0).double()
    return Estimate(float(samples.mean()), _stderr(samples))


def hutch_plus_plus(A, n_probes: int, seed: int, stream: int) -> Estimate:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021): a third of the products find the dominant
    range ``Q`` (traced exactly), the rest run Hutchinson on ``(I - QQ^T) A (I - QQ^T)``. The stderr
    is that of the Hutchinson part (the exact part has none)."""
    if n_probes < 3:
        return hutchinson(A, n_probes, seed, stream)
    k = n_probes // 3
    S = probes("rademacher", seed, stream, 0, k, A.n, A.w.dtype, A.w.device)
    Q, _ = torch.linalg.qr(_in_blocks(A, S))
    exact = float((Q * _in_blocks(A, Q)).sum().double())
    G = probes("rademacher", seed, stream, k, n_probes - 2 * k, A.n, A.w.dtype, A.w.device)
    G = G - Q @ (Q.T @ G)
    AG = _in_blocks(A, G)
    samples = (G * (AG - Q @ (Q.T @ AG))).sum(0).double()
    return Estimate(exact + float(samples.mean()), _stderr(samples))


def exact_diagonal(A, block: int = PROBES_PER_PASS) -> torch.Tensor:
    """``diag A`` from products with blocks of unit vectors (N products in all)."""
    out = torch.empty(A.n, dtype=A.w.dtype, device=A.w.device)
    for i in range(0, A.n, block):
        j = min(A.n, i + block)
        E = torch.zeros(A.n, j - i, dtype=A.w.dtype, device=A.w.device)
        E[torch.arange(i, j, device=E.device), torch.arange(j - i, device=E.device)] = 1
        out[i:j] = torch.diagonal(A.matvec(E)[i:j])
    return out


def estimated_diagonal(A, n_probes: int, seed: int, stream: int) -> torch.Tensor:
    """``diag A ~ mean_j z_j * (A z_j)`` over Rademacher ``z_j`` (Bekas, Kokiopoulou & Saad 2007)."""
    Z = probes("rademacher", seed, stream, 0, n_probes, A.n, A.w.dtype, A.w.device)
    return (Z * _in_blocks(A, Z)).mean(1)


@dataclass
class Ritz:
    values: torch.Tensor     # [k], largest algebraic first
    vectors: torch.Tensor    # [N, k]
    iterations: int
    converged: bool


def lanczos(A, k: int, tol: float, max_iter: int, seed: int, stream: int) -> Ritz:
    """The ``k`` largest algebraic eigenvalues of ``A`` by Lanczos with full reorthogonalization,
    stopped when every one of them has a Ritz residual ``|beta_m s_mi| <= tol * max(1, |theta_i|)``
    (or at ``max_iter`` steps, or when the whole space is spanned: exact then). A Krylov space
    exhausted before that (an invariant subspace, e.g. of a Hessian with repeated eigenvalues: one
    start vector sees each eigenvalue once) is continued from a new probe orthogonal to it, so the
    tridiagonal matrix gets a zero off-diagonal there and every eigenvalue's copies are found."""
    n = A.n
    max_iter = min(max_iter, n)
    dtype, device = A.w.dtype, A.w.device
    q = probes("normal", seed, stream, 0, 1, n, dtype, device)[:, 0]
    Q = [q / q.norm()]
    alphas, betas = [], []
    theta = S = None
    converged = False
    for m in range(1, max_iter + 1):
        w = A.matvec(Q[-1])
        alpha = torch.dot(w, Q[-1])
        basis = torch.stack(Q, dim=1)
        w = w - basis @ (basis.T @ w)          # full reorthogonalization, twice is enough
        w = w - basis @ (basis.T @ w)
        beta = w.norm()
        alphas.append(float(alpha))
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        theta, S = theta.flip(0), S.flip(1)    # largest first
        top = min(k, m)
        residuals = float(beta) * S[-1, :top].abs()
        exhausted = float(beta) <= 1e-12 * max(1.0, float(theta.abs().max()))
        if exhausted and m < max_iter and m < k:   # restart in the orthogonal complement
            w = probes("normal", seed, stream, m, 1, n, dtype, device)[:, 0]
            w = w - basis @ (basis.T @ w)
            w = w - basis @ (basis.T @ w)
            beta = torch.zeros((), dtype=dtype, device=device)
            betas.append(0.0)
            Q.append(w / w.norm())
            continue
        if (m >= k and bool((residuals <= tol * theta[:top].abs().clamp(min=1.0)).all())) or exhausted:
            converged = True
            break
        if m < max_iter:
            betas.append(float(beta))
            Q.append(w / beta)
    basis = torch.stack(Q[:len(alphas)], dim=1)
    top = min(k, len(alphas))
    vectors = basis @ S[:, :top].to(dtype=dtype, device=device)
    return Ritz(theta[:top].clone(), vectors, len(alphas), converged)


def _stderr(samples: torch.Tensor) -> float:
    n = samples.numel()
    return float(samples.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.inf


@dataclass
class Quadrature:
    """Stochastic Lanczos quadrature of one probe: ``tr f(A) ~ N sum_j weights_j f(nodes_j)``."""
    nodes: torch.Tensor     # [m] Ritz values
    weights: torch.Tensor   # [m], summing to 1


def slq(A, n_vectors: int, n_iter: int, seed: int, stream: int) -> list[Quadrature]:
    """Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; the spectral density of Ghorbani,
    Krishnan & Xiao 2019): ``n_iter`` Lanczos steps (fully reorthogonalized) from each of
    ``n_vectors`` Gaussian probes; nodes are the Ritz values, weights the squared first components
    of their eigenvectors."""
    out = []
    for j in range(n_vectors):
        T = _tridiagonal(A, min(n_iter, A.n), seed, stream, first=1 + j)
        theta, S = torch.linalg.eigh(T)
        out.append(Quadrature(theta, S[0] ** 2))
    return out


def _tridiagonal(A, m: int, seed: int, stream: int, first: int) -> torch.Tensor:
    """The Lanczos tridiagonal matrix of ``m`` steps from probe ``first`` (float64)."""
    q = probes("normal", seed, stream, first, 1, A.n, A.w.dtype, A.w.device)[:, 0]
    Q, alphas, betas = [q / q.norm()], [], []
    for i in range(m):
        w = A.matvec(Q[-1])
        alphas.append(float(torch.dot(w, Q[-1])))
        basis = torch.stack(Q, dim=1)
        w = w - basis @ (basis.T @ w)
        w = w - basis @ (basis.T @ w)
        beta = float(w.norm())
        if i == m - 1 or beta <= 1e-12 * max(1.0, max(abs(a) for a in alphas)):
            break   # the Krylov space is exhausted: the quadrature is exact for this probe
        betas.append(beta)
        Q.append(w / beta)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T
