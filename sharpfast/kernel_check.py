"""``sharpfast.selftest(device)``: every fused op on small random inputs on that device, against
the pure-PyTorch math (and the Philox twin, :mod:`sharpfast.philox`, for the draws).

It is what stands between a user and a kernel that is wrong on their device (a compiler, an
architecture or a driver the test suite never ran on): the fused backend runs it once per device
per process, the first time it is used there (a few milliseconds), and ``backend="auto"`` falls
back to the reference with a warning naming the op when it fails, while ``backend="fused"``
raises. ``sharpfast doctor`` prints it.

The inputs are float32 and float64 buffers of an odd length (vector loads and scalar tails),
read through an unaligned view (the kernels' unvectorized path), with exact-zero scales (frozen
coordinates) and zero gradients (``sign(0) = 0``), for buffered and derived scales. The
reference expressions use the kernels' operation order, so agreement is to an ulp or two;
the tolerances are a few ulps of the compute type (reductions: float64 rounding of sums taken in
another order).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import _ops
from .philox import DISTRIBUTIONS, philox_draw

N = 1003           # odd: vectorized body and scalar tail
OFFSET = 5         # global element index of the first element: a block's draws start mid-block
DTYPES = (torch.float32, torch.float64)
RHO, ETA, STEP, MOMENTUM, GRAD_SCALE = 0.05, 0.01, 0.37, 0.75, 0.02
LAMBDAS = (0.0, 0.013, 3.5)


@dataclass
class OpCheck:
    """One op's result: the largest ``|op - reference|`` over its cases and whether every case was
    within tolerance (``message`` says which was not, or what the op raised)."""

    op: str
    max_error: float = 0.0
    ok: bool = True
    message: str = ""


@dataclass
class SelfTestReport:
    device: str
    checks: list[OpCheck]
    seconds: float
    build: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def errors(self) -> dict[str, float]:
        """``{op: max |op - reference|}``."""
        return {c.op: c.max_error for c in self.checks}

    @property
    def failed(self) -> list[str]:
        return [c.op for c in self.checks if not c.ok]

    def __str__(self) -> str:
        lines = [f"self-test on {self.device}: {'ok' if self.ok else 'FAILED: ' + ', '.join(self.failed)} "
                 f"({len(self.checks)} ops, {1e3 * self.seconds:.1f} ms)"]
        for c in self.checks:
            lines.append(f"  {c.op:<18} {'ok  ' if c.ok else 'FAIL'}  max error {c.max_error:.3g}"
                         + (f"  {c.message}" if c.message else ""))
        return "\n".join(lines)


def _tolerance(dtype: torch.dtype, reduction: bool = False) -> tuple[float, float]:
    if reduction:
        return 1e-10, 1e-12
    return (1e-12, 1e-12) if dtype == torch.float64 else (1e-6, 1e-6)


class _Checker:
    """Collects per-op agreement, case by case."""

    def __init__(self):
        self.checks: dict[str, OpCheck] = {}

    def compare(self, op: str, case: str, got: torch.Tensor, want: torch.Tensor, reduction: bool = False) -> None:
        check = self.checks.setdefault(op, OpCheck(op))
        rtol, atol = _tolerance(want.dtype, reduction)
        got, want = got.detach().double().cpu(), want.detach().double().cpu()
        if got.shape != want.shape:
            check.ok, check.message = False, f"{case}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
            return
        if got.numel() == 0:
            return
        diff = (got - want).abs()
        bad = ~(diff <= atol + rtol * want.abs())   # NaN counts as bad
        err = float(diff.nan_to_num(float("inf")).max())
        check.max_error = max(check.max_error, err)
        if bool(bad.any()) and check.ok:
            check.ok, check.message = False, f"{case}: {int(bad.sum())} of {got.numel()} elements off"

    def run(self, op: str, case: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a raising op is a failed op, reported by name
            check = self.checks.setdefault(op, OpCheck(op))
            check.ok, check.message = False, f"{case}: raised {type(e).__name__}: {e}"


def _inputs(dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    """Buffers read through views one element into their storage (unaligned), so both the
    vectorized and the scalar paths of the kernels run."""
    def unaligned(values: torch.Tensor) -> torch.Tensor:
        storage = torch.empty(N + 1, dtype=dtype, device=device)
        storage[1:] = values.to(dtype).to(device)
        return storage[1:]

    w0 = unaligned(torch.randn(N, generator=gen, dtype=torch.float64))
    c = torch.rand(N, generator=gen, dtype=torch.float64) + 0.05
    c[torch.rand(N, generator=gen) < 0.2] = 0.0
    c = unaligned(c)
    grad = torch.randn(N, generator=gen, dtype=torch.float64)
    grad[::7] = 0.0
    grad = unaligned(grad)
    box = lambda: unaligned(RHO * c.double().cpu() * (2 * torch.rand(N, generator=gen, dtype=torch.float64) - 1))
    return w0, c, grad, box(), box()


SEED, RNG_STREAM, SAMPLE = 2**40 + 3, 2, 7


class _Inputs:
    """One dtype's buffers on the device (see :func:`_inputs`) and the draws the sampling ops make."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.w0, self.c, self.grad, self.delta, self.delta_prev = _inputs(dtype, device, torch.Generator().manual_seed(0))
        self.name = str(dtype).replace("torch.", "")

    def xi(self, dist: str, sample: int = SAMPLE) -> torch.Tensor:
        return philox_draw(dist, SEED, RNG_STREAM, sample, OFFSET, N, dtype=self.dtype, device=self.device)

    def scalar(self, v: float) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.float64, device=self.device)

    def scales(self):
        """``(label, c as the op takes it, c as a tensor)`` for a buffer, ``|w| + eta`` and 1."""
        return [("buffer c", self.c, self.c), ("c = |w| + eta", _ops.DerivedScale(True, ETA), self.w0.abs() + ETA),
                ("c = 1", _ops.DerivedScale(False, 0.0), torch.ones_like(self.w0))]


def _check_sampling(chk: _Checker, t: _Inputs) -> None:
    for dist in DISTRIBUTIONS:
        case = f"{t.name} {dist}"
        chk.run("draw_", case, lambda: chk.compare(
            "draw_", case, _ops.draw_(torch.empty_like(t.w0), SEED, RNG_STREAM, SAMPLE, OFFSET, dist), t.xi(dist)))
    for label, c_op, c in t.scales():
        case, w0 = f"{t.name} {label}", t.w0
        want = w0 + (RHO * c) * t.xi("normal")
        chk.run("perturb_", case, lambda: chk.compare(
            "perturb_", case, _ops.perturb_(torch.empty_like(w0), w0, c_op, RHO, SEED, RNG_STREAM, SAMPLE, OFFSET), want))

        def batched():   # antithetic pairs: rows 2j, 2j + 1 = sample first + j with signs +, -
            rows = _ops.perturb_batched_(torch.empty(4, N, dtype=t.dtype, device=t.device), w0, c_op, RHO, SEED,
                                         RNG_STREAM, SAMPLE, OFFSET, "uniform", antithetic=True)
            for r in range(4):
                expected = w0 + ((-RHO if r % 2 else RHO) * c) * t.xi("uniform", SAMPLE + r // 2)
                chk.compare("perturb_batched_", f"{case} row {r}", rows[r], expected)
        chk.run("perturb_batched_", case, batched)

        def pieces():   # two pieces of one coordinate space: the same draws as the concatenation
            cut = 400
            out = [torch.empty_like(w0[:cut]), torch.empty_like(w0[cut:])]
            cs = c_op if isinstance(c_op, _ops.DerivedScale) else [c_op[:cut], c_op[cut:]]
            _ops.perturb_tensors_(out, [w0[:cut], w0[cut:]], cs, RHO, SEED, RNG_STREAM, SAMPLE, [OFFSET, OFFSET + cut])
            chk.compare("perturb_tensors_", case, torch.cat(out), want)
        chk.run("perturb_tensors_", case, pieces)


def _check_steps(chk: _Checker, t: _Inputs) -> None:
    w0, grad, delta, delta_prev = t.w0, t.grad, t.delta, t.delta_prev
    for label, c_op, c in t.scales():
        case = f"{t.name} {label}"

        def linf():
            bufs = [w0 + delta, delta.clone(), delta_prev.clone()]
            _ops.apgd_step_linf_(*bufs, grad, w0, c_op, t.scalar(STEP), RHO, MOMENTUM)
            z = torch.maximum(torch.minimum(delta + STEP * grad.sign() * c, RHO * c), -RHO * c)
            new = MOMENTUM * z + (1 - MOMENTUM) * delta_prev
            for got, exp in zip(bufs, (w0 + new, new, delta)):
                chk.compare("apgd_step_linf_", case, got, exp)
        chk.run("apgd_step_linf_", case, linf)

        for lam in LAMBDAS:
            def l2(lam=lam):
                bufs = [w0 + delta, delta.clone(), delta_prev.clone()]
                _ops.apgd_step_l2_(*bufs, grad, w0, c_op, t.scalar(GRAD_SCALE), t.scalar(lam), MOMENTUM)
                z = delta + GRAD_SCALE * grad * c
                shrunk = z if lam == 0 else z * c**2 / (c**2 + 2 * lam)
                new = MOMENTUM * torch.where(c != 0, shrunk, torch.zeros_like(z)) + (1 - MOMENTUM) * delta_prev
                for got, exp in zip(bufs, (w0 + new, new, delta)):
                    chk.compare("apgd_step_l2_", f"{case} lambda={lam}", got, exp)
            chk.run("apgd_step_l2_", f"{case} lambda={lam}", l2)

        def scaled_linf():   # u, u_prev: the delta buffers (the math is checked whatever they hold)
            bufs = [w0 + delta, delta.clone(), delta_prev.clone()]
            _ops.scaled_step_linf_(*bufs, grad, w0, c_op, t.scalar(STEP), RHO, MOMENTUM)
            z = (delta + STEP * (c * grad).sign()).clamp(-RHO, RHO)
            new = (delta + MOMENTUM * (z - delta) + (1 - MOMENTUM) * (delta - delta_prev)).clamp(-RHO, RHO)
            for got, exp in zip(bufs, (w0 + c * new, new, delta)):
                chk.compare("scaled_step_linf_", case, got, exp)
        chk.run("scaled_step_linf_", case, scaled_linf)

        def scaled_l2():   # the two rescalings, written with norms; u just outside the ball
            u, u_prev = 3 * delta, delta_prev
            bufs = [w0 + u, u.clone(), u_prev.clone()]
            gram = _ops.scaled_gram(u, u_prev, grad, w0, c_op)
            _ops.scaled_step_l2_(*bufs, grad, w0, c_op, gram, t.scalar(STEP), RHO, MOMENTUM)
            x, p, cg = u.double(), u_prev.double(), (c * grad).double()
            z = x + STEP * cg / (cg.norm() + 1e-12)
            z = z * min(1.0, RHO / float(z.norm()))
            v = x + MOMENTUM * (z - x) + (1 - MOMENTUM) * (x - p)
            new = v * min(1.0, RHO / float(v.norm()))
            for got, exp in zip(bufs, (w0.double() + c.double() * new, new, u)):
                chk.compare("scaled_step_l2_", case, got, exp.to(t.dtype))
        chk.run("scaled_step_l2_", case, scaled_l2)

    def copy_if():
        for cond in (True, False):
            dst = delta.clone()
            _ops.copy_if_(dst, grad, torch.tensor(cond, device=t.device))
            chk.compare("copy_if_", f"{t.name} cond={cond}", dst, grad if cond else delta)
    chk.run("copy_if_", t.name, copy_if)


def _check_reductions(chk: _Checker, t: _Inputs) -> None:
    for label, c_op, c in t.scales():
        case = f"{t.name} {label}"

        def norms():
            lams = torch.tensor(LAMBDAS, dtype=torch.float64, device=t.device)
            got = _ops.ellipsoid_sq_norms(t.delta, t.grad, t.w0, c_op, t.scalar(GRAD_SCALE), lams)
            z, cd = (t.delta + GRAD_SCALE * t.grad * c).double(), c.double()
            want = torch.stack([torch.where(cd != 0, z * cd / (cd**2 + 2 * lam), torch.zeros_like(z)).pow(2).sum()
                                for lam in LAMBDAS])
            chk.compare("ellipsoid_sq_norms", case, got, want, reduction=True)
        chk.run("ellipsoid_sq_norms", case, norms)
        def gram():
            u, p, cg, cu = (v.double() for v in (t.delta, t.delta_prev, c * t.grad, c * t.delta))
            want = torch.stack([u @ u, u @ p, p @ p, u @ cg, p @ cg, cg @ cg, cu @ cu])
            chk.compare("scaled_gram", case, _ops.scaled_gram(t.delta, t.delta_prev, t.grad, t.w0, c_op), want,
                        reduction=True)
        chk.run("scaled_gram", case, gram)
    chk.run("sum_squares", t.name, lambda: chk.compare("sum_squares", t.name, _ops.sum_squares(t.grad),
                                                       t.grad.double().pow(2).sum(), reduction=True))


def _check_sam(chk: _Checker, t: _Inputs) -> None:
    """SAM's ops over two pieces (one read through an unaligned view), for |w| + eta and 1."""
    cut = 400
    w = [t.w0[:cut], t.w0[cut:]]
    g = [t.grad[:cut], t.grad[cut:]]
    for adaptive, eta in ((True, ETA), (False, 0.0)):
        case = f"{t.name} {'T = |w| + eta' if adaptive else 'T = 1'}"
        T = [x.abs() + eta if adaptive else torch.ones_like(x) for x in w]

        def norm(T=T, adaptive=adaptive, eta=eta):
            want = sum((ti * gi).double().pow(2).sum() for ti, gi in zip(T, g))
            chk.compare("sam_sq_norm", case, _ops.sam_sq_norm(g, w, adaptive, eta), want, reduction=True)
        chk.run("sam_sq_norm", case, norm)

        def perturb(T=T, adaptive=adaptive, eta=eta):
            out, saved = [x.clone() for x in w], [torch.empty_like(x) for x in w]
            _ops.sam_perturb_(out, saved, g, adaptive, eta, t.scalar(RHO))
            for o, sv, x, ti, gi in zip(out, saved, w, T, g):
                chk.compare("sam_perturb_", case, sv, x)
                chk.compare("sam_perturb_", case, o, x + ((ti * ti) * gi) * RHO)
        chk.run("sam_perturb_", case, perturb)


def selftest(device=None) -> SelfTestReport:
    """Run every fused op on ``device`` (default: the current CUDA device where there is one,
    else the CPU) against the pure-PyTorch math; returns a report with ``.ok``, ``.errors``
    (``{op: max |op - reference|}``) and ``.failed``. Raises ``RuntimeError`` when the extension
    has no kernels for that device."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() and _ops.available("cuda") else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if not _ops.available(device):
        raise RuntimeError(f"sharpfast's extension has no kernels for {device}: "
                           + (_ops.IMPORT_ERROR or f"it was built without {device.type} support"))
    start = time.perf_counter()
    chk = _Checker()
    with torch.no_grad():
        for dtype in DTYPES:
            inputs = _Inputs(dtype, device)
            for check in (_check_sampling, _check_steps, _check_reductions, _check_sam):
                check(chk, inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return SelfTestReport(str(device), list(chk.checks.values()), time.perf_counter() - start, _ops.build_info())


# Reports of the automatic check, per device, for this process.
_VERIFIED: dict[str, SelfTestReport] = {}


def verified(device) -> SelfTestReport:
    """The self-test of ``device``, run the first time it is asked for in this process."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    if key not in _VERIFIED:
        _VERIFIED[key] = selftest(device)
    return _VERIFIED[key]


__all__ = ["selftest", "verified", "SelfTestReport", "OpCheck"]
