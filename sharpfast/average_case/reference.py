"""The pure-PyTorch reference of average-case sharpness, exactly as defined in DESIGN.md §1,
written to be read.

For weights ``w``, a batch ``S``, radius ``rho`` and per-coordinate scale ``c``:
``S_avg = E_S E_xi [L_S(w + rho * c * xi) - L_S(w)]``, ``xi ~ N(0, I)`` (l2) or ``U(-1, 1)`` (linf),
estimated with ``n_samples`` draws per batch (antithetic pairs where asked).

The noise comes from the counter-based sampler (``sharpfast.philox``), so the fused backend draws
the same numbers. The parameters are pointed at tensors of this module's own; the caller's
``ModelGuard`` points them back.
"""
from __future__ import annotations

from ..objective import batches_on_device, evaluate
from ..params import ParamSet, set_kept, set_weights
from ..philox import AVERAGE_SAMPLE_BASE, draw_noise
from ..result import SharpnessResult, check_finite_loss, mean, summarize
from ..settings import Settings


def solve(model, batches, params: ParamSet, s: Settings) -> SharpnessResult:
    w0 = [p.data for p in params.tensors]
    c = params.scales()
    per_batch, per_batch_err, init_losses, init_errs = [], [], [], []
    for b, x, y in batches_on_device(batches, params.device):
        set_kept(params, w0)
        L0, E0 = evaluate(model, s.objective, x, y)
        check_finite_loss(L0, f"at the unperturbed weights (batch {b})")
        losses, errs = [], []
        for k in range(s.n_samples):
            # Antithetic pairs share one draw: sample 2j uses +xi_j, sample 2j+1 uses -xi_j.
            sample, sign = (k // 2, (-1) ** k) if s.antithetic else (k, 1)
            xi = draw_noise(params, s, stream=b, sample=AVERAGE_SAMPLE_BASE + sample)
            set_weights(params, [w + (sign * s.rho) * ci * x_ for w, ci, x_ in zip(w0, c, xi)])
            L, E = evaluate(model, s.objective, x, y)
            check_finite_loss(L, f"at a perturbed point (batch {b}, sample {k})")
            losses.append(L)
            errs.append(E)
        per_batch.append(mean(losses) - L0)
        init_losses.append(L0)
        if E0 is not None:
            per_batch_err.append(mean(errs) - E0)
            init_errs.append(E0)
    set_kept(params, w0)
    return summarize(s, "reference", per_batch, per_batch_err, init_losses, init_errs, delta_norm=0.0)
