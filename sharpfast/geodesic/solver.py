"""Geodesic sharpness (DESIGN.md §2c.1, §2c.6): per m-batch, the maximum of ``L(w0 + xi - Gamma(xi, xi)/2)``
over horizontal ``xi`` with ``||xi||_w0 <= rho``, found by APGD in the tangent space at ``w0``.

The solver is the scaled solver's APGD (``worst_case.reference.scaled_apgd_restart``: Croce & Hein's step,
momentum 0.75, checkpoints and halving rule, best point kept), with the geometry's parts in the
places of the plain ball's: the ascent direction is the horizontal Riemannian gradient normalized in
the metric, and the projection is the metric projection onto ``{horizontal, ||xi|| <= rho}``. The
gradient in ``xi`` is the gradient at the perturbed point pulled back through the second-order map.
Without blocks and without ``Gamma`` every step is the scaled solver's in ``xi = c u``, so the two
solvers give the same numbers.

Two backends: ``"reference"`` (head-by-head geometry, the model's parameters pointed at fresh tensors
at every point, as ``worst_case.reference``) and the fast path (batched geometry, the model viewing
one flat buffer that every point is written into; one forward+backward per step).
"""
from __future__ import annotations

import warnings

import torch

from .. import objective
from ..objective import batches_on_device
from ..philox import RAND_INIT_SAMPLE_BASE, draw
from ..params import ParamSet, set_kept
from ..result import SharpnessResult, check_finite_loss, delta_l2_norm, summarize
from ..worst_case import apgd
from ..settings import MOMENTUM
from .batched import BatchedGeometry
from .blocks import find_gl_blocks, resolve
from .metric import flat_scale
from .reference import ReferenceGeometry
from .settings import GeodesicSettings

CORRECTION_WARNING = 1.0   # ||Gamma/2|| / ||xi|| above which the second-order map is out of its depth
WARNING_TEXT = "sharpfast: at the best point the geodesic's second-order term"


class GeodesicCorrectionWarning(RuntimeWarning):
    """At the best point the second-order term outgrew the step (``result.geodesic_correction`` >
    ``CORRECTION_WARNING``): the second-order map no longer follows the geodesic there."""


class NoGLBlockWarning(RuntimeWarning):
    """``blocks="auto"`` found no GL block: the geodesic value is the adaptive worst case there."""


def solve(model, batches, params: ParamSet, s: GeodesicSettings, backend: str) -> SharpnessResult:
    blocks = find_gl_blocks(model) if s.blocks == "auto" else list(s.blocks)
    if s.blocks == "auto" and not blocks:
        warnings.warn(NoGLBlockWarning(
            f"sharpfast: no GL block found in {type(model).__name__} (blocks='auto' finds nn.MultiheadAttention, the "
            "zoo's ViT and Hugging Face BERT/ViT/CLIP/GPT-2 attention): without blocks, geodesic sharpness is the "
            "adaptive l2 worst case (worst_case_sharpness with solver='scaled'). Give the model's blocks as "
            "sharpfast.GLBlock, or blocks=[] to ask for that value on purpose"), stacklevel=4)
    heads = resolve(blocks, params)
    w0 = torch.cat([p.detach().reshape(-1) for p in params.tensors])
    Geo = ReferenceGeometry if backend == "reference" else BatchedGeometry
    geo = Geo(w0, flat_scale(params), heads, s.metric, s.eps, s.second_order)
    point = _ReferencePoint(model, params, s) if backend == "reference" else _FlatPoint(model, params, s)
    per_batch, per_batch_err, init_losses, init_errs, delta_norm, correction = [], [], [], [], 0.0, 0.0
    improved = []
    for b, x, y in batches_on_device(batches, params.device):
        L0, E0, best_loss, best_err, best_xi, n_improved = _solve_batch(point.at(x, y), geo, s, b, point.weights)
        improved.append(n_improved)
        per_batch.append(best_loss - L0)
        init_losses.append(L0)
        if E0 is not None:
            per_batch_err.append(best_err - E0)
            init_errs.append(E0)
        if best_xi is None:   # the unperturbed point was the best
            continue
        delta = geo.retract(best_xi)[0].sub_(w0)   # the best point, taken again rather than kept
        delta_norm = max(delta_norm, delta_l2_norm([delta]))
        step = float(geo.norm(best_xi))
        if s.second_order and step > 0:   # (without it the correction is 0: w0 + xi - w0 only rounds)
            correction = max(correction, float(geo.norm(delta.sub_(best_xi))) / step)
        del delta
    result = summarize(s, backend, per_batch, per_batch_err, init_losses, init_errs, delta_norm, solver="geodesic",
                       geodesic_correction=correction, restarts_improved=improved, gl_blocks=len(blocks))
    if correction > CORRECTION_WARNING:
        warnings.warn(GeodesicCorrectionWarning(
            f"{WARNING_TEXT} is {correction:.3g} times the step (in the metric): the second-order map no longer "
            f"approximates the geodesic. rho={s.rho:g} is too large for it, or a factor is near zero where the metric "
            "degenerates (raise eps)"), stacklevel=4)
    return result


def _solve_batch(evaluate, geo, s: GeodesicSettings, stream: int, out=None):
    """One m-batch's runs, one per restart; the unperturbed point is the first candidate (as in
    ``worst_case.reference.solve``). ``out``: where the points are written (the fast path's
    flat weights), or None. Returns ``(L0, E0, best loss, its error, best xi (None: the unperturbed
    point), starts after the first that beat all before them)``."""
    L0 = E0 = None
    if s.init != "zero":   # the runs start elsewhere: the loss at w0 needs a forward of its own
        L0, E0, _ = evaluate(geo.w0, False)
        check_finite_loss(L0, f"at the unperturbed weights (batch {stream})")
    best = None
    n_improved = 0
    for start in range(s.n_restarts):
        # the start is passed, not kept: the run holds it only while it is its xi_prev or best point
        L_start, E_start, run = _apgd(evaluate, geo, s, stream, torch.zeros_like(geo.w0) if s.init == "zero"
                                      else random_start(geo, s, stream, start), out)
        if L0 is None:   # xi = 0: the start was w0
            L0, E0 = L_start, E_start
        if best is None:   # the unperturbed point, the first candidate
            best = (L0, E0, None)
        if run[0] > best[0]:
            n_improved += start > 0
            best = run
    return (L0, E0) + tuple(best) + (n_improved,)


def random_start(geo, s: GeodesicSettings, stream: int, start: int) -> torch.Tensor:
    """Restart ``start``'s point: Philox draw ``RAND_INIT_SAMPLE_BASE + start`` of the batch's stream,
    a Gaussian ``z`` made isotropic in the metric (``M^-1/2 z``: ``c z`` outside the blocks), projected
    horizontally and put on the sphere of radius rho (outside the blocks the scaled solver's random
    start, ``c rho z / ||z||``)."""
    z = draw("normal", s.seed, stream, RAND_INIT_SAMPLE_BASE + start, geo.w0.numel(), geo.w0.dtype, geo.w0.device)
    xi = geo.horizontal_(geo.whiten(z))
    return xi * (s.rho / geo.norm(xi))


def _apgd(evaluate, geo, s: GeodesicSettings, stream: int, xi: torch.Tensor, out=None):
    """One APGD run from ``xi``: ``(its loss, its error, (best loss, its error, best xi))``.

    Parameter-sized vectors held: ``xi``, ``xi_prev``, the best ``xi`` and the gradients at the
    current and the best point (the point ``v`` itself is written into ``out``, or made and dropped
    by the evaluation); a step's new vectors are formed in place, each in a fresh buffer of its own
    (``xi``, ``xi_prev`` and the best point can be one tensor, so none of them is written)."""
    def at(xi, i, with_grad):
        v, pullback = geo.retract(xi, out)
        L, E, g_v = evaluate(v, with_grad)
        del v
        check_finite_loss(L, f"at an APGD iterate (batch {stream}, iteration {i})")
        return L, E, (pullback(g_v) if with_grad else None)

    L_start, E_start, g = at(xi, "start", True)
    best_loss, best_err, best_xi, best_g = L_start, E_start, xi, g
    prev_loss, xi_prev = L_start, xi
    schedule = apgd.StepSchedule(s, best_loss)
    for i in range(s.n_iters):
        alpha = 1.0 if i == 0 else MOMENTUM
        with torch.no_grad():
            # every iterate is a combination of horizontal directions, so of the metric projection
            # only the radial rescale remains to be done after the direction's projection
            d = geo.horizontal_(geo.riemannian(g))
            g = None   # (the best point's gradient stays as best_g)
            d.div_(geo.norm(d) + 1e-12)
            z = geo.shrink_(d.mul_(schedule.step).add_(xi), s.rho)            # xi + step d, projected
            momentum = torch.sub(xi, xi_prev).mul_(1 - alpha)                  # (1 - alpha)(xi - xi_prev)
            z = z.sub_(xi).mul_(alpha).add_(xi).add_(momentum)               # xi + alpha (z - xi) + that
            del d, momentum
            xi, xi_prev = geo.shrink_(z, s.rho), xi
        final = i == s.n_iters - 1
        L, E, g = at(xi, i, not final)
        schedule.count(L > prev_loss)   # the steps that raised the loss over the previous iterate
        prev_loss = L
        if L > best_loss:
            best_loss, best_err, best_xi, best_g = L, E, xi, g
        if schedule.halves_at(i, best_loss):
            xi, g = best_xi, best_g   # back to the best point (xi_prev stays: the momentum continues)
    return L_start, E_start, (best_loss, best_err, best_xi)


class _ReferencePoint:
    """The model's parameters pointed at a copy of each point (``worst_case.reference``'s way)."""

    weights = None   # each point is a fresh tensor

    def __init__(self, model, params: ParamSet, s: GeodesicSettings):
        self.model, self.params, self.s = model, params, s

    def at(self, x, y):
        def evaluate(v, with_grad):
            set_kept(self.params, self.params.split(v))
            L, E = objective.evaluate(self.model, self.s.objective, x, y)
            g = (torch.cat([t.reshape(-1) for t in objective.gradient(self.model, self.s.objective, self.params, x, y)])
                 if with_grad else None)
            return L, E, g
        return evaluate


class _FlatPoint:
    """The model's parameters (and gradients) view one flat buffer; a point is written into it and
    one forward+backward gives its loss, error and gradient."""

    def __init__(self, model, params: ParamSet, s: GeodesicSettings):
        from ..engine.flat import FlatState   # the flat buffers only: no kernel is needed
        self.model, self.s = model, s
        self.flat = FlatState(params, s)
        self.flat.attach(with_grad=True)
        self.weights = self.flat.current   # the geometry writes each point here

    def at(self, x, y):
        def evaluate(v, with_grad):
            flat = self.flat
            if v is not flat.current:
                flat.current.copy_(v)
            with torch.set_grad_enabled(with_grad):
                loss, err = self.s.objective.loss_and_error(self.model, x, y)
            if with_grad:
                flat.backward(loss, lambda: self.s.objective.loss_and_error(self.model, x, y)[0])
            return (float(loss.detach()), None if err is None else float(err), flat.grad.clone() if with_grad else None)
        return evaluate
