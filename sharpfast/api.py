"""The public entry points: settings in, the model guarded, the precision policy applied, a
backend chosen, a :class:`~sharpfast.result.SharpnessResult` out."""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from . import precision
from .params import ModelGuard, ParamSet
from .result import SharpnessResult, check_batches
from .settings import AverageCaseSettings as A
from .settings import Settings
from .geodesic.settings import GeodesicSettings as G
from .settings import WorstCaseSettings as W


def worst_case_sharpness(
    model: nn.Module, data: Iterable, rho: float, norm: str = W.norm, adaptive: bool = W.adaptive,
    scale: Mapping[str, torch.Tensor] | None = None, loss_fn: Callable | None = None,
    normalize_logits: bool | str = W.normalize_logits, n_iters: int = W.n_iters, n_restarts: int = W.n_restarts,
    rand_init: bool = W.rand_init, step_size_mult: float = W.step_size_mult, seed: int = W.seed,
    backend: str = W.backend, adaptive_eta: float = W.adaptive_eta,
    adaptive_weights_only: bool = W.adaptive_weights_only, eval_mode: bool = W.eval_mode,
    min_update_ratio: float = W.min_update_ratio, projection_tol: float | None = None,
    solve_batches_together: bool | None = None, error_fn: Callable | None = None,
    low_precision: str = W.low_precision, solver: str = W.solver, init: str | None = None,
    quadratic_model: bool = W.quadratic_model,
) -> SharpnessResult:
    """Worst-case sharpness ``E_S max_{||delta / c||_p <= rho} L_S(w + delta) - L_S(w)``, the inner
    maximum found by APGD in weight space: the published variant by default, whose numbers are
    the literature's, or ``solver="scaled"``, which finds the maximum (DESIGN.md §1).

    Args:
        model: the network; left exactly as it was after the call, also after an exception or
            an interrupt (parameters, buffers, ``.grad``, ``requires_grad``, train/eval mode).
        data: an iterable of batches ``(x, y)`` or ``(x, _, y, _, _)``, one per m-sharpness batch;
            ``x`` a tensor, a tuple of positional inputs or a dict of keyword inputs.
        rho: the radius, > 0.
        norm: ``"linf"`` or ``"l2"``, the norm of ``delta / c``.
        adaptive: ``c = |w|`` (+ ``adaptive_eta``) where True, else ``c = 1``.
        scale: ``{parameter name: tensor}``, ``c`` for those parameters (>= 0; 0 freezes a
            coordinate); the others follow ``adaptive``.
        loss_fn: ``loss_fn(output, y)`` -> the batch's mean loss; default cross-entropy
            (sequence outputs ``[B, T, K]`` with ``[B, T]`` labels flattened).
        normalize_logits: ``True``/``"norm"`` divides the centred logits by their l2 norm (the
            published code), ``"std"`` by their standard deviation (the paper's slides).
        n_iters: APGD iterations per batch and restart.
        n_restarts: restarts from independent random starts (needs ``rand_init``).
        rand_init: start from a random point of the constraint set instead of ``delta = 0``
            (the same as ``init="random"``).
        step_size_mult: the initial step is ``2 * rho * step_size_mult``.
        seed: the counter-based noise seed (random starts), in ``[0, 2^64)``.
        backend: ``"auto"`` (the extension where it is built for the device and passes its
            self-test, else the reference), ``"fused"`` or ``"reference"``.
        adaptive_eta: ASAM's ``eta``: ``c = |w| + eta``.
        adaptive_weights_only: only weight matrices and kernels get ``|w|``; biases and
            normalization parameters ``c = 1``.
        eval_mode: evaluate in eval mode (BatchNorm running statistics, no dropout).
        min_update_ratio: halve the step at a checkpoint where fewer than this fraction of the
            steps since the last one improved.
        projection_tol: absolute tolerance of the l2 ellipsoid bisection; default
            ``1e-5 * min(1, rho)`` (the published 1e-5 is absolute; see ``apgd.bisection_tolerance``).
        solve_batches_together: solve every m-batch's problem in one vmapped forward/backward per
            step (same results; batches of one shape, eval mode); default: on a GPU where the
            ``[batches, parameters]`` buffers fit, else one batch at a time.
        error_fn: ``error_fn(output, y)`` -> the batch's mean error for ``err_sharpness``; by
            default the classification error where outputs and labels are a classification
            pair (``objective.Objective``), else ``err_sharpness`` is None.
        low_precision: for float16/bfloat16 parameters, ``"float32"`` measures a float32 copy of
            the same weights (a half-precision perturbation rounds away), ``"error"`` raises.
        solver: ``"published"`` (DESIGN.md §2: steps along ``c g / ||g||``, projection onto the
            ellipsoid by bisection, its momentum and step-size rule) or ``"scaled"``: the APGD of
            Croce & Hein in ``u = delta / c``, where the constraint is a plain ball or box, the l2
            ascent direction is ``c g / ||c g||`` and projection a rescale or a clamp (no bisection).
            On the diagonal linear network adaptive l2 reaches 89-95% of the closed-form maximum with
            the first (random or eigen starts), the maximum with the second
            (benchmarks/SOLVER_RESULTS.md).
        init: where each run starts: ``"zero"``, ``"random"`` (``rand_init``), or ``"eigen"``:
            ``+-rho`` times the top eigenvectors of ``C H C`` (one per restart, both signs: two runs
            per restart), the start that can move at a critical point, where the gradient is 0.
            Default: ``"random"`` if ``rand_init`` else ``"zero"``.
        quadratic_model: l2 only: also compute the second-order bound
            ``rho ||c g|| + rho^2/2 lambda_max(C H C)`` at ``w`` (one Lanczos run per batch; free
            with ``init="eigen"``, where it is always reported).

    Returns:
        A :class:`~sharpfast.result.SharpnessResult`: ``sharpness`` (mean over batches),
        ``err_sharpness``, ``per_batch``, ``delta_norm`` (the largest ``||delta||_2`` at a best point),
        and the diagnostics ``solver``, ``restarts_improved`` and (l2) ``quadratic_model``.

    Example:
        >>> import torch, sharpfast
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
        >>> r = sharpfast.worst_case_sharpness(model, batches, rho=0.05, norm="linf", n_iters=10)
        >>> r.sharpness > 0 and len(r.per_batch) == 2
        True
    """
    return evaluate_sharpness(model, data, W(
        rho=rho, norm=norm, adaptive=adaptive, scale=scale, loss_fn=loss_fn, error_fn=error_fn,
        normalize_logits=normalize_logits, seed=seed, backend=backend, adaptive_eta=adaptive_eta,
        adaptive_weights_only=adaptive_weights_only, eval_mode=eval_mode, low_precision=low_precision,
        n_iters=n_iters, n_restarts=n_restarts, rand_init=rand_init, step_size_mult=step_size_mult,
        min_update_ratio=min_update_ratio, projection_tol=projection_tol,
        solve_batches_together=solve_batches_together, solver=solver, init=init, quadratic_model=quadratic_model))


def average_sharpness(
    model: nn.Module, data: Iterable, rho: float, norm: str = A.norm, adaptive: bool = A.adaptive,
    scale: Mapping[str, torch.Tensor] | None = None, loss_fn: Callable | None = None,
    normalize_logits: bool | str = A.normalize_logits, n_samples: int = A.n_samples, seed: int = A.seed,
    backend: str = A.backend, adaptive_eta: float = A.adaptive_eta,
    adaptive_weights_only: bool = A.adaptive_weights_only, eval_mode: bool = A.eval_mode,
    antithetic: bool = A.antithetic, samples_per_pass: int | None = None, error_fn: Callable | None = None,
    low_precision: str = A.low_precision,
) -> SharpnessResult:
    """Average-case sharpness ``E_S E_xi [L_S(w + rho * c * xi) - L_S(w)]``.

    Args:
        norm: ``"l2"`` (``xi ~ N(0, I)``) or ``"linf"`` (``xi ~ U(-1, 1)``).
        n_samples: noise draws per batch.
        antithetic: pair each draw ``+xi`` with ``-xi`` (cancels the odd terms of the estimate;
            ``n_samples`` even).
        samples_per_pass: perturbed copies evaluated in one vmapped forward by the fused
            backend (same draws, same values); default: up to a memory budget on a GPU, one at a
            time on a CPU (a forward already keeps its cores busy there).
        model, data, rho, adaptive, scale, loss_fn, normalize_logits, seed, backend, adaptive_eta,
        adaptive_weights_only, eval_mode, error_fn, low_precision: as
            :func:`worst_case_sharpness`.

    Returns:
        A :class:`~sharpfast.result.SharpnessResult` (``delta_norm`` is 0.0).
    """
    return evaluate_sharpness(model, data, A(
        rho=rho, norm=norm, adaptive=adaptive, scale=scale, loss_fn=loss_fn, error_fn=error_fn,
        normalize_logits=normalize_logits, seed=seed, backend=backend, adaptive_eta=adaptive_eta,
        adaptive_weights_only=adaptive_weights_only, eval_mode=eval_mode, low_precision=low_precision,
        n_samples=n_samples, antithetic=antithetic, samples_per_pass=samples_per_pass))


def geodesic_sharpness(
    model: nn.Module, data: Iterable, rho: float, metric: str = G.metric, blocks=G.blocks, eps: float = G.eps,
    second_order: bool = G.second_order, n_iters: int = G.n_iters, n_restarts: int = G.n_restarts,
    init: str = G.init, adaptive: bool = G.adaptive,
    scale: Mapping[str, torch.Tensor] | None = None, loss_fn: Callable | None = None,
    normalize_logits: bool | str = G.normalize_logits, step_size_mult: float = G.step_size_mult,
    seed: int = G.seed, backend: str = G.backend, adaptive_eta: float = G.adaptive_eta,
    adaptive_weights_only: bool = G.adaptive_weights_only, eval_mode: bool = G.eval_mode,
    min_update_ratio: float = G.min_update_ratio, error_fn: Callable | None = None,
    low_precision: str = G.low_precision,
) -> SharpnessResult:
    """Geodesic sharpness (da Silva, Dangel, Oore, ICML 2025; DESIGN.md §2c): per m-batch,
    ``max L(gamma_xi(1)) - L(w)`` over horizontal ``xi`` with ``||xi||_w <= rho``, ``gamma_xi(1) ~=
    w + xi - Gamma(xi, xi)/2`` the geodesic to second order, in a metric invariant under attention's
    GL(h) symmetry, so that weights that compute the same function have the same sharpness.

    Args:
        metric: ``"mix"`` (``tr(Q xG^T xG) + tr(P xH^T xH)``, no Sylvester solve) or ``"inv"``
            (``tr(P^-1 xG^T xG) + tr(Q^-1 xH^T xH)``), ``P = G^T G + eps I``, ``Q = H^T H + eps I``.
        blocks: ``"auto"`` (:func:`sharpfast.find_gl_blocks`: ``nn.MultiheadAttention``, the zoo's
            ViT, Hugging Face BERT / ViT / CLIP / GPT-2 attention) or a list of
            :class:`sharpfast.GLBlock`; ``[]`` treats every parameter adaptively (``"auto"`` finding no
            block does too, with a :class:`sharpfast.NoGLBlockWarning`).
        eps: the Gram matrices' relaxation (0: exact invariance; needs full-rank factors).
        second_order: include the geodesic correction ``-Gamma(xi, xi)/2`` (False: the paper's
            first-order ablation).
        n_iters: APGD iterations per batch and run (the scaled solver's).
        n_restarts, init: ``init="zero"`` starts at ``xi = 0`` (the paper's); ``"random"`` runs
            ``n_restarts`` times from Philox draws made isotropic in the metric, projected horizontally
            and put on the sphere of radius rho (outside the blocks, the scaled solver's random start).
        adaptive, scale, adaptive_eta, adaptive_weights_only: the metric ``||xi / c||_2`` of the
            parameters outside every block; model, data, rho, loss_fn, normalize_logits,
            step_size_mult, seed, eval_mode, min_update_ratio, error_fn, low_precision: as
            :func:`worst_case_sharpness`.
        backend: ``"reference"`` (head by head) or ``"auto"``/``"fused"`` (heads batched, the model on
            one flat buffer; plain PyTorch, no kernel needed).

    Returns:
        A :class:`~sharpfast.result.SharpnessResult` (``kind="geodesic"``; ``delta_norm`` is the
        largest ``||gamma_xi(1) - w||_2`` at a best point; ``geodesic_correction``; ``gl_blocks``, the
        blocks treated; ``restarts_improved`` as for the worst case). With ``blocks=[]`` and
        ``second_order=False`` it equals ``worst_case_sharpness(norm="l2", adaptive=True,
        solver="scaled")``.
    """
    return evaluate_sharpness(model, data, G(
        rho=rho, metric=metric, blocks=blocks, eps=eps, second_order=second_order, n_iters=n_iters,
        n_restarts=n_restarts, init=init,
        adaptive=adaptive, scale=scale, loss_fn=loss_fn, error_fn=error_fn, normalize_logits=normalize_logits,
        step_size_mult=step_size_mult, seed=seed, backend=backend, adaptive_eta=adaptive_eta,
        adaptive_weights_only=adaptive_weights_only, eval_mode=eval_mode, min_update_ratio=min_update_ratio,
        low_precision=low_precision))


def evaluate_sharpness(model: nn.Module, data: Iterable, settings: Settings) -> SharpnessResult:
    """The sharpness ``settings`` define (:class:`~sharpfast.settings.WorstCaseSettings`,
    :class:`~sharpfast.settings.AverageCaseSettings` or :class:`~sharpfast.geodesic.settings.GeodesicSettings`)
    of ``model`` on ``data``."""
    if not isinstance(settings, Settings):
        raise TypeError(f"settings must be WorstCaseSettings, AverageCaseSettings or GeodesicSettings, got "
                        f"{type(settings).__name__}")
    params = settings.bind(model)
    batches = check_batches(data)
    with ModelGuard(model, eval_mode=settings.eval_mode):
        batches = precision.apply_policy(model, params, batches, settings.low_precision)
        if settings.kind == "geodesic":
            from .geodesic import solver
            return solver.solve(model, batches, params, settings,
                            "reference" if settings.backend == "reference" else "fused")
        backend = resolve_backend(settings.backend, params)   # the fused paths load the extension
        if settings.kind == "worst":
            from .worst_case import fused, reference
        else:
            from .average_case import fused, reference
        return (fused if backend == "fused" else reference).solve(model, batches, params, settings)


def resolve_backend(backend: str, params: ParamSet) -> str:
    """``"auto"`` picks the fused backend where the extension supports the parameters and passes
    its self-test on their device (:mod:`sharpfast.kernel_check`, once per device per process), else
    the reference (with a warning when the self-test failed). ``"fused"`` raises instead."""
    if backend == "reference":
        return "reference"
    from . import engine, kernel_check  # imported lazily: the reference needs no extension
    available, why = engine.available(params)
    if available:
        report = kernel_check.verified(params.device)
        if not report.ok:
            available = False
            why = (f"the extension's self-test failed on {report.device} for {', '.join(report.failed)} "
                   f"({'; '.join(c.message for c in report.checks if not c.ok)}); run `sharpfast doctor`")
            if backend == "auto":
                warnings.warn(f"sharpfast: using the pure-PyTorch reference: {why}", RuntimeWarning, stacklevel=4)
    if backend == "fused" and not available:
        raise RuntimeError(f"backend='fused' is not available for these parameters on {params.device}: {why}")
    return "fused" if available else "reference"


__all__ = ["worst_case_sharpness", "average_sharpness", "geodesic_sharpness", "evaluate_sharpness", "resolve_backend"]
