"""Where a worst-case APGD run starts, in the problem's own coordinates ``u = delta / c``
(coordinates with ``c = 0`` are frozen at 0), and the local quadratic model the eigen start
comes with.

* ``"zero"``: ``u = 0``. At a critical point (the diagonal linear network at zero loss) the
  gradient vanishes there and no ascent step can move.
* ``"random"``: the published random start (DESIGN.md §2), Philox draw ``RAND_INIT_SAMPLE_BASE +
  restart`` of the batch's stream: l2 ``rho xi / ||xi||`` (a uniform direction on the sphere),
  linf ``rho xi`` with ``xi ~ U(-1, 1)`` (inside the box).
* ``"eigen"``: ``+-rho v`` (l2) or ``+-rho sign(v)`` (linf: the box's vertex with ``v``'s sign
  pattern), ``v`` the restart's eigenvector of ``C H C`` at ``w`` (Lanczos, ``sharpfast.curvature``):
  the directions of fastest ascent of the second-order model, both signs since the odd terms
  decide between them.

Every function here works on flat ``[N]`` tensors over the concatenated parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..curvature import estimators
from ..curvature.operator import CurvatureOperator
from ..objective import batches_on_device
from ..params import ParamSet
from ..settings import WorstCaseSettings

EIGEN_TOL = 1e-4        # Lanczos residual tolerance of the eigen start's vectors
EIGEN_MAX_ITER = 100


@dataclass
class LocalModel:
    """One batch's second-order model at ``w`` in ``u`` coordinates: the top eigenpairs of
    ``C H C`` and the scaled gradient's norm ``||c g||``."""

    vectors: torch.Tensor   # [N, k], unit columns, 0 on frozen coordinates
    eigenvalues: list[float]
    grad_norm: float

    def quadratic_model(self, rho: float) -> float:
        """``rho ||c g|| + rho^2/2 max(lambda_max, 0)``: no point of the ball gets the second-order
        model ``u^T c g + u^T C H C u / 2`` higher; equal to it at a critical point."""
        return rho * self.grad_norm + rho**2 / 2 * max(self.eigenvalues[0], 0.0)


def for_call(model, params: ParamSet, s: WorstCaseSettings, batches) -> list[LocalModel] | None:
    """The local models a worst-case call needs (eigen start: one eigenvector per restart; the
    quadratic model: the top one), or None. Called at ``w0`` before anything is perturbed."""
    if not (s.init == "eigen" or s.with_quadratic_model):
        return None
    return local_models(model, params, s, batches, s.n_restarts if s.init == "eigen" else 1)


def diagnostics(s: WorstCaseSettings, improved: list[int], local: list[LocalModel] | None) -> dict:
    """The worst-case diagnostics of a result (:class:`~sharpfast.result.SharpnessResult`'s fields):
    the solver, the restarts that improved each batch's best, and the quadratic model where asked."""
    out = dict(solver=s.solver, restarts_improved=improved)
    if s.with_quadratic_model:
        per_batch = [m.quadratic_model(s.rho) for m in local]
        out.update(per_batch_quadratic_model=per_batch, quadratic_model=sum(per_batch) / len(local))
    return out


def local_models(model, params: ParamSet, s: WorstCaseSettings, batches, k: int) -> list[LocalModel]:
    """Each batch's :class:`LocalModel` with ``k`` eigenvectors, at the model's current weights
    (``w0``: called before any perturbation). Same seed, same vectors on every backend."""
    if k > params.numel:
        raise ValueError(f"init='eigen' with n_restarts={k} needs {k} eigenvectors, but the model has only "
                         f"{params.numel} perturbed parameters")
    out = []
    for b, x, y in batches_on_device(batches, params.device):
        A = CurvatureOperator(model, params, s.objective, x, y, "hessian")
        ritz = estimators.lanczos(A, k, EIGEN_TOL, EIGEN_MAX_ITER, s.seed, b)
        # a Ritz vector keeps the Lanczos start's component on frozen coordinates (C H C is 0 there)
        vectors = ritz.vectors * (A.c != 0).to(ritz.vectors.dtype)[:, None]
        vectors = vectors / vectors.norm(dim=0).clamp(min=torch.finfo(vectors.dtype).tiny)
        out.append(LocalModel(vectors.detach(), [float(v) for v in ritz.values],
                              float(A.scaled_gradient().double().norm())))
    return out


def eigen_start(local: LocalModel, start: int, s: WorstCaseSettings, c: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``u`` of start ``start``, written into ``out``: eigenvector ``start // 2``, sign ``+`` for even
    starts, ``-`` for odd."""
    out.copy_(local.vectors[:, start // 2])
    if s.norm == "linf":
        out.sign_().masked_fill_(c == 0, 0)
    return out.mul_(s.rho if start % 2 == 0 else -s.rho)


def random_start(xi: torch.Tensor, s: WorstCaseSettings, c: torch.Tensor) -> torch.Tensor:
    """``u`` of the published random start from its draw ``xi`` (Gaussian for l2, uniform for linf),
    in place."""
    xi.masked_fill_(c == 0, 0)
    if s.norm == "l2":
        xi.div_(xi.double().norm().to(xi.dtype))
    return xi.mul_(s.rho)
