"""Thin, typed wrappers over the extension's ops (``torch.ops.sharpfast.*``).

The ops work on *flat buffers*: 1-D contiguous tensors of one dtype (float32, float64,
float16 or bfloat16; half types compute in float32) on one device, all of the same length
``N``. Element ``i`` of a buffer has the global element index ``offset + i`` for the counter
RNG (:mod:`sharpfast.philox` is the pure-PyTorch twin of every draw). ``c`` is the
per-coordinate scale: a buffer, where ``c = 0`` freezes a coordinate (never perturbed, never
divided by), or a :class:`DerivedScale`, which the kernels compute from ``w0`` (no buffer).

Scalars that the evaluators update on the device (the APGD step size, the l2 gradient scale,
the ellipsoid multiplier, the copy condition) are 0-dim tensors read inside the kernels, so no
op synchronizes with the host.

``available(device)`` says whether the extension is importable and built for that device
type; ``build_info()`` reports how it was built (``{}`` plus ``"error"`` when it is missing).
Importing this module never fails: when ``sharpfast._C`` cannot be loaded the reason is kept
in :data:`IMPORT_ERROR` and the wrappers raise ``RuntimeError`` naming it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch  # must precede sharpfast._C (it links against libtorch)

from .settings import MOMENTUM
from .philox import DISTRIBUTIONS

IMPORT_ERROR: Optional[str] = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.sharpfast.*)
except Exception as exc:  # pragma: no cover - depends on the build
    _C = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["available", "build_info", "cpu_isa", "IMPORT_ERROR", "DerivedScale", "draw_", "perturb_", "perturb_batched_",
           "perturb_tensors_", "apgd_step_linf_", "apgd_step_l2_", "ellipsoid_sq_norms", "scaled_step_linf_",
           "scaled_step_l2_", "scaled_gram", "GRAM_ENTRIES", "copy_if_", "sum_squares", "seed_to_int64"]

_U64 = 1 << 64
_I63 = 1 << 63


def build_info() -> dict:
    """How ``sharpfast._C`` was built: ``cuda`` (bool), ``cuda_version``, ``torch``, ``dtypes``, ``ops``."""
    if _C is None:
        return {"cuda": False, "error": IMPORT_ERROR}
    return dict(_C.build_info())


def cpu_isa(name: str | None = None) -> str:
    """The instruction set of the CPU sampling loops (``"scalar"``, ``"avx2"`` or ``"avx512"``: the
    widest the CPU has, or ``SHARPFAST_CPU_ISA``); ``name`` sets it first (tests force each; every
    one draws the same bits). ``build_info()["cpu_isas"]`` lists those this CPU has."""
    from . import _C
    if name is not None:
        _C.set_cpu_isa(name)
    return _C.cpu_isa()


def available(device) -> bool:
    """True when the extension is importable and built for ``device``'s type (CPU always when
    built; CUDA only when compiled with CUDA and a GPU is present)."""
    if _C is None:
        return False
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        return bool(_C.build_info().get("cuda", False)) and torch.cuda.is_available()
    return False


def _ops():
    if _C is None:
        raise RuntimeError(f"sharpfast extension is not available ({IMPORT_ERROR}); "
                           "use backend='reference' or rebuild with `pip install --no-build-isolation -e .`")
    return torch.ops.sharpfast


def seed_to_int64(seed: int) -> int:
    """A 64-bit unsigned seed as the int64 the op schema carries (same bits)."""
    seed = int(seed)
    if not 0 <= seed < _U64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    return seed - _U64 if seed >= _I63 else seed


def _check_distribution(distribution: str) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
    return distribution


class DerivedScale(NamedTuple):
    """A scale ``c`` the kernels derive from ``w0``, with no parameter-sized buffer: ``|w0| + eta``
    rounded to the buffers' dtype (exactly the reference's ``w.abs() + eta``) where ``adaptive``,
    else 1."""

    adaptive: bool = True
    eta: float = 0.0


Scale = Union[torch.Tensor, DerivedScale]


def _scale_args(c: Scale) -> tuple:
    """The schema's ``(Tensor? c, bool adaptive, float eta)`` for a scale."""
    if isinstance(c, torch.Tensor):
        return c, False, 0.0
    if isinstance(c, DerivedScale):
        return None, bool(c.adaptive), float(c.eta)
    raise TypeError(f"the scale c must be a tensor or a DerivedScale, got {type(c).__name__}")


# ----------------------------------------------------------------------------- wrappers

def draw_(out: torch.Tensor, seed: int, rng_stream: int, sample: int, offset: int = 0,
          distribution: str = "normal") -> torch.Tensor:
    """``out[i] = xi(seed, rng_stream, sample, offset + i)``; returns ``out``."""
    _ops().draw_(out, seed_to_int64(seed), int(rng_stream), int(sample), int(offset), _check_distribution(distribution))
    return out


def perturb_(out: torch.Tensor, w0: torch.Tensor, c: Scale, rho: float, seed: int, rng_stream: int,
             sample: int, offset: int = 0, distribution: str = "normal") -> torch.Tensor:
    """``out = w0 + rho * c * xi`` with ``xi`` drawn in place (no noise tensor); returns ``out``."""
    _ops().perturb_(out, w0, *_scale_args(c), float(rho), seed_to_int64(seed), int(rng_stream), int(sample), int(offset),
                    _check_distribution(distribution))
    return out


def perturb_tensors_(out: list, w0: list, c, rho: float, seed: int, rng_stream: int, sample: int, offsets: list,
                     distribution: str = "normal") -> None:
    """:func:`perturb_` over pieces of one coordinate space, read where they lie (e.g. a model's
    parameter tensors): ``out[p] = w0[p] + rho * c[p] * xi`` with global element indices from
    ``offsets[p]``, in one op. ``c``: a list of one flat tensor per piece, or a
    :class:`DerivedScale`. Same draws as one :func:`perturb_` over the concatenation."""
    if isinstance(c, DerivedScale):   # (a NamedTuple: test it before lists and tuples)
        scales, adaptive, eta = [], bool(c.adaptive), float(c.eta)
    elif isinstance(c, (list, tuple)):
        scales, adaptive, eta = list(c), False, 0.0
    else:
        raise TypeError(f"the scales c must be a list of tensors or a DerivedScale, got {type(c).__name__}")
    _ops().perturb_tensors_(out, w0, scales, adaptive, eta, float(rho), seed_to_int64(seed),
                            int(rng_stream), int(sample), [int(o) for o in offsets], _check_distribution(distribution))


def perturb_batched_(out: torch.Tensor, w0: torch.Tensor, c: Scale, rho: float, seed: int, rng_stream: int,
                     first_sample: int, offset: int = 0, distribution: str = "normal",
                     antithetic: bool = False) -> torch.Tensor:
    """``out[k] = w0 + rho * c * xi(sample = first_sample + k)`` for a ``[K, N]`` ``out``.

    With ``antithetic`` rows ``2j`` and ``2j + 1`` use sample ``first_sample + j`` with signs
    ``+1`` and ``-1`` (``K`` must be even). Returns ``out``.
    """
    _ops().perturb_batched_(out, w0, *_scale_args(c), float(rho), seed_to_int64(seed), int(rng_stream), int(first_sample),
                            int(offset), _check_distribution(distribution), bool(antithetic))
    return out


def apgd_step_linf_(params: torch.Tensor, delta: torch.Tensor, delta_prev: torch.Tensor, grad: torch.Tensor,
                    w0: torch.Tensor, c: Scale, step_size: torch.Tensor, rho: float,
                    momentum: float = MOMENTUM) -> None:
    """One fused linf APGD step (one pass over memory):

    ``z = clamp(delta + step * sign(grad) * c, -rho c, rho c)``,
    ``new = momentum * z + (1 - momentum) * delta_prev``, ``delta_prev = delta`` (old value),
    ``delta = new``, ``params = w0 + new``. ``step_size``: 0-dim float64/float32 tensor on the
    buffers' device (read in the kernel, no host sync).
    """
    _ops().apgd_step_linf_(params, delta, delta_prev, grad, w0, *_scale_args(c), step_size, float(rho),
                           float(momentum))


def ellipsoid_sq_norms(delta: torch.Tensor, grad: torch.Tensor, w0: torch.Tensor, c: Scale, grad_scale: torch.Tensor,
                    lambdas: torch.Tensor) -> torch.Tensor:
    """``||shrink(z, lambda_j) / c||^2`` for every candidate ``lambda_j``, in one pass over memory.

    ``z = delta + grad_scale * grad * c``; the result (float64, shape ``[L]``) is
    ``sum_i (z_i c_i / (c_i^2 + 2 lambda_j))^2`` (terms with ``c_i = 0`` are 0). ``grad_scale``:
    0-dim tensor; ``lambdas``: 1-D float64 on the same device; ``w0`` is read only where ``c`` is
    derived from it. Deterministic.
    """
    return _ops().ellipsoid_sq_norms(delta, grad, w0, *_scale_args(c), grad_scale, lambdas)


def apgd_step_l2_(params: torch.Tensor, delta: torch.Tensor, delta_prev: torch.Tensor, grad: torch.Tensor,
                  w0: torch.Tensor, c: Scale, grad_scale: torch.Tensor, lam: torch.Tensor,
                  momentum: float = MOMENTUM) -> None:
    """One fused l2 APGD step: ``z = delta + grad_scale * grad * c``,
    ``zp = z c^2 / (c^2 + 2 lam)`` (0 where ``c = 0``; ``z`` where ``lam = 0``), then momentum,
    history shift and parameter write as in :func:`apgd_step_linf_`. ``lam``: 0-dim float64.

    Non-adaptive l2 (``c = 1``) rescaling to norm ``rho`` is ``lam = (||z|| / rho - 1) / 2`` when
    ``||z|| > rho``, else 0.
    """
    _ops().apgd_step_l2_(params, delta, delta_prev, grad, w0, *_scale_args(c), grad_scale, lam, float(momentum))


def scaled_step_linf_(params: torch.Tensor, u: torch.Tensor, u_prev: torch.Tensor, grad: torch.Tensor,
                      w0: torch.Tensor, c: Scale, step_size: torch.Tensor, rho: float, momentum: float) -> None:
    """One linf step of the scaled solver in ``u = delta / c`` (one pass over memory):
    ``z = clamp(u + step * sign(c grad), -rho, rho)``,
    ``new = clamp(u + momentum (z - u) + (1 - momentum)(u - u_prev), -rho, rho)``, ``u_prev = u`` (old
    value), ``u = new``, ``params = w0 + c new``. ``step_size``: 0-dim float64/float32 device tensor."""
    _ops().scaled_step_linf_(params, u, u_prev, grad, w0, *_scale_args(c), step_size, float(rho), float(momentum))


def scaled_step_l2_(params: torch.Tensor, u: torch.Tensor, u_prev: torch.Tensor, grad: torch.Tensor,
                    w0: torch.Tensor, c: Scale, gram: torch.Tensor, step_size: torch.Tensor, rho: float,
                    momentum: float) -> None:
    """One l2 step of the scaled solver in ``u = delta / c``: with ``d = c grad / (||c grad|| + 1e-12)``,
    ``z = P(u + step d)``, ``new = P(u + momentum (z - u) + (1 - momentum)(u - u_prev))``, ``P`` the
    rescaling onto the ball ``||u|| <= rho``; ``u_prev = u`` (old value), ``u = new``,
    ``params = w0 + c new``. Both rescalings are computed from ``gram`` (:func:`scaled_gram` of
    ``u, u_prev, grad``), so the step is one pass; ``step_size``: 0-dim device tensor."""
    _ops().scaled_step_l2_(params, u, u_prev, grad, w0, *_scale_args(c), gram, step_size, float(rho), float(momentum))


GRAM_ENTRIES = ("uu", "up", "pp", "ug", "pg", "gg", "dd")


def scaled_gram(u: torch.Tensor, u_prev: torch.Tensor, grad: torch.Tensor, w0: torch.Tensor, c: Scale) -> torch.Tensor:
    """The scaled solver's inner products in one pass, float64 ``[7]`` in :data:`GRAM_ENTRIES` order:
    ``u.u, u.u_prev, u_prev.u_prev, u.cg, u_prev.cg, cg.cg`` for ``cg = c grad``, and
    ``||c u||^2 = ||delta||^2``. Deterministic."""
    return _ops().scaled_gram(u, u_prev, grad, w0, *_scale_args(c))


def copy_if_(dst: torch.Tensor, src: torch.Tensor, cond: torch.Tensor) -> None:
    """``dst = src`` iff the 0-dim bool tensor ``cond`` is true (read on the device, no host sync)."""
    _ops().copy_if_(dst, src, cond)


def sum_squares(x: torch.Tensor) -> torch.Tensor:
    """``sum(x^2)`` accumulated in float64 (0-dim float64 tensor), deterministic."""
    return _ops().sum_squares(x)


def sam_sq_norm(grad: list, w: list, adaptive: bool, eta: float = 0.0) -> torch.Tensor:
    """``sum_p ||T g_p||^2`` over a list of flat tensors of one dtype and device, ``T = |w_p| + eta``
    where ``adaptive``, else 1, accumulated in float64 (0-dim float64 tensor on their device), deterministic."""
    return _ops().sam_sq_norm(grad, w, bool(adaptive), float(eta))


def sam_perturb_(w: list, saved: list, grad: list, adaptive: bool, eta: float, s: torch.Tensor) -> None:
    """``saved[p] = w[p]`` and ``w[p] += T^2 g[p] s`` in one pass over each flat tensor (``T`` as in
    :func:`sam_sq_norm`; ``s``: a 0-dim float64 tensor on their device, read there)."""
    _ops().sam_perturb_(w, saved, grad, bool(adaptive), float(eta), s)


# ----------------------------------------------------------------------------- fake impls

def _fake_check_flat(t, name):
    torch._check(t.dim() == 1, lambda: f"sharpfast: argument '{name}' must be a 1-D flat buffer")


def _fake_check_like(t, name, ref, ref_name):
    _fake_check_flat(t, name)
    torch._check(t.dtype == ref.dtype, lambda: f"sharpfast: argument '{name}' has dtype {t.dtype} but "
                 f"'{ref_name}' has dtype {ref.dtype}")
    torch._check(t.device == ref.device, lambda: f"sharpfast: argument '{name}' is on {t.device} but "
                 f"'{ref_name}' is on {ref.device}")
    torch._check(t.numel() == ref.numel(), lambda: f"sharpfast: argument '{name}' has a different length than "
                 f"'{ref_name}'")


def _fake_check_scale(c, ref, ref_name):
    if c is not None:
        _fake_check_like(c, "c", ref, ref_name)


def _fake_check_step(params, delta, delta_prev, grad, w0, c):
    _fake_check_flat(params, "params")
    for t, name in ((delta, "delta"), (delta_prev, "delta_prev"), (grad, "grad"), (w0, "w0")):
        _fake_check_like(t, name, params, "params")
    _fake_check_scale(c, params, "params")


if _C is not None:
    @torch.library.register_fake("sharpfast::draw_")
    def _draw_fake(out, seed, rng_stream, sample, offset, distribution):
        _fake_check_flat(out, "out")
        return None

    @torch.library.register_fake("sharpfast::perturb_")
    def _perturb_fake(out, w0, c, adaptive, eta, rho, seed, rng_stream, sample, offset, distribution):
        _fake_check_flat(w0, "w0")
        _fake_check_like(out, "out", w0, "w0")
        _fake_check_scale(c, w0, "w0")
        return None

    @torch.library.register_fake("sharpfast::perturb_batched_")
    def _perturb_batched_fake(out, w0, c, adaptive, eta, rho, seed, rng_stream, first_sample, offset, distribution,
                              antithetic):
        _fake_check_flat(w0, "w0")
        _fake_check_scale(c, w0, "w0")
        torch._check(out.dim() == 2 and out.shape[1] == w0.numel(),
                     lambda: "sharpfast: argument 'out' must be a [K, N] tensor with N = w0.numel()")
        torch._check(out.dtype == w0.dtype, lambda: "sharpfast: argument 'out' must have w0's dtype")
        return None

    @torch.library.register_fake("sharpfast::perturb_tensors_")
    def _perturb_tensors_fake(out, w0, c, adaptive, eta, rho, seed, rng_stream, sample, offsets, distribution):
        torch._check(len(out) == len(w0) == len(offsets) and len(c) in (0, len(w0)),
                     lambda: "sharpfast: perturb_tensors_ needs one out, offset (and c, if any) per w0 piece")
        for p, w in enumerate(w0):
            _fake_check_flat(w, "w0")
            _fake_check_like(out[p], "out", w, "w0")
            if c:
                _fake_check_like(c[p], "c", w, "w0")
        return None

    def _linf_fake(params, delta, delta_prev, grad, w0, c, adaptive, eta, step_size, rho, momentum):
        _fake_check_step(params, delta, delta_prev, grad, w0, c)
        torch._check(step_size.dim() == 0, lambda: "sharpfast: argument 'step_size' must be a 0-dim tensor")
        return None

    for _name in ("apgd_step_linf_", "scaled_step_linf_"):   # one schema, published and scaled
        torch.library.register_fake(f"sharpfast::{_name}")(_linf_fake)

    @torch.library.register_fake("sharpfast::apgd_step_l2_")
    def _l2_fake(params, delta, delta_prev, grad, w0, c, adaptive, eta, grad_scale, lam, momentum):
        _fake_check_step(params, delta, delta_prev, grad, w0, c)
        torch._check(grad_scale.dim() == 0, lambda: "sharpfast: argument 'grad_scale' must be a 0-dim tensor")
        torch._check(lam.dim() == 0, lambda: "sharpfast: argument 'lam' must be a 0-dim tensor")
        return None

    @torch.library.register_fake("sharpfast::scaled_step_l2_")
    def _scaled_l2_fake(params, u, u_prev, grad, w0, c, adaptive, eta, gram, step_size, rho, momentum):
        _fake_check_step(params, u, u_prev, grad, w0, c)
        torch._check(gram.shape == (len(GRAM_ENTRIES),), lambda: "sharpfast: argument 'gram' must be a [7] tensor")
        torch._check(step_size.dim() == 0, lambda: "sharpfast: argument 'step_size' must be a 0-dim tensor")
        return None

    @torch.library.register_fake("sharpfast::scaled_gram")
    def _gram_fake(u, u_prev, grad, w0, c, adaptive, eta):
        _fake_check_flat(u, "u")
        for t, name in ((u_prev, "u_prev"), (grad, "grad"), (w0, "w0")):
            _fake_check_like(t, name, u, "u")
        _fake_check_scale(c, u, "u")
        return u.new_empty((len(GRAM_ENTRIES),), dtype=torch.float64)

    @torch.library.register_fake("sharpfast::ellipsoid_sq_norms")
    def _norms_fake(delta, grad, w0, c, adaptive, eta, grad_scale, lambdas):
        _fake_check_flat(delta, "delta")
        _fake_check_like(grad, "grad", delta, "delta")
        _fake_check_like(w0, "w0", delta, "delta")
        _fake_check_scale(c, delta, "delta")
        torch._check(lambdas.dim() == 1, lambda: "sharpfast: argument 'lambdas' must be 1-D")
        return lambdas.new_empty(lambdas.shape, dtype=torch.float64)

    @torch.library.register_fake("sharpfast::copy_if_")
    def _copy_if_fake(dst, src, cond):
        torch._check(dst.shape == src.shape, lambda: "sharpfast: copy_if_ needs 'dst' and 'src' of one shape")
        torch._check(cond.dim() == 0, lambda: "sharpfast: argument 'cond' must be a 0-dim bool tensor")
        return None

    @torch.library.register_fake("sharpfast::sum_squares")
    def _sum_squares_fake(x):
        _fake_check_flat(x, "x")
        return x.new_empty((), dtype=torch.float64)

    def _fake_check_sam(w, grad, saved=None):
        torch._check(len(grad) == len(w) and (saved is None or len(saved) == len(w)),
                     lambda: "sharpfast: the SAM ops need one grad (and saved) tensor per w tensor")
        for p, t in enumerate(w):
            _fake_check_flat(t, "w")
            _fake_check_like(grad[p], "grad", t, "w")
            if saved is not None:
                _fake_check_like(saved[p], "saved", t, "w")

    @torch.library.register_fake("sharpfast::sam_sq_norm")
    def _sam_sq_norm_fake(grad, w, adaptive, eta):
        _fake_check_sam(w, grad)
        return w[0].new_empty((), dtype=torch.float64)

    @torch.library.register_fake("sharpfast::sam_perturb_")
    def _sam_perturb_fake(w, saved, grad, adaptive, eta, s):
        _fake_check_sam(w, grad, saved)
        torch._check(s.dim() == 0, lambda: "sharpfast: argument 's' must be a 0-dim tensor")
        return None
