"""Every extension op against a plain torch expression (CPU always; CUDA when built and a GPU
is present), masks with c = 0, errors on bad inputs, opcheck and torch.compile."""
import re
import sys

import pytest
import torch

from sharpfast import _ops
from sharpfast.philox import philox_draw

pytestmark = pytest.mark.skipif(not _ops.available("cpu"), reason=f"extension not built: {_ops.IMPORT_ERROR}")
OPS = torch.ops.sharpfast

from tests.helpers import DEVICES, DTYPES
SIZES = [0, 1, 7, 1001]


def tol(dtype, device="cpu"):
    """Tolerances against the torch expression computed in the same compute type.

    The torch expression is not the kernels' exact operation order (torch may fuse or vectorize
    differently), so float64 agrees to rounding, float32 to an ulp or two; half types: the result
    is one rounding of the float32 value, so one ulp of the storage type. (CPU and CUDA kernels
    agree bit for bit with each other: no FMA contraction or fast math on either,
    test_cpu_cuda_agree.)
    """
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12)
    if dtype == torch.float32:
        return dict(rtol=1e-6, atol=1e-6)
    eps = torch.finfo(dtype).eps
    return dict(rtol=eps, atol=eps)


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def scale_with_zeros(n, dtype, device, gen):
    c = torch.rand(n, generator=gen, dtype=torch.float64) + 0.05
    c[torch.rand(n, generator=gen) < 0.2] = 0.0
    return c.to(dtype).to(device)


def rand(n, dtype, device, gen, scale=1.0):
    return (scale * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype).to(device)


def scalar(v, device, dtype=torch.float64):
    return torch.tensor(v, dtype=dtype, device=device)


# ------------------------------------------------------------------------------ sampling ops

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dist", ["normal", "uniform", "rademacher"])
def test_perturb(device, dtype, n, dist):
    g = torch.Generator().manual_seed(n)
    w0, c = rand(n, dtype, device, g), scale_with_zeros(n, dtype, device, g)
    seed, stream, sample, offset, rho = 2**33 + 5, 3, 9, 6, 0.05
    out = torch.full((n,), float("nan"), dtype=dtype, device=device)
    _ops.perturb_(out, w0, c, rho, seed, stream, sample, offset, dist)
    ct = compute_dtype(dtype)
    xi = philox_draw(dist, seed, stream, sample, offset, n, dtype=ct, device=device)
    want = (w0.to(ct) + (rho * c.to(ct)) * xi).to(dtype)
    torch.testing.assert_close(out, want, **tol(dtype, device))
    frozen = c == 0
    assert torch.equal(out[frozen], w0[frozen])   # c = 0: never perturbed
    assert not out.isnan().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("antithetic", [False, True])
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_perturb_batched(device, dtype, antithetic, n):
    g = torch.Generator().manual_seed(1)
    w0, c = rand(n, dtype, device, g), scale_with_zeros(n, dtype, device, g)
    K, first, rho = 6, 4, 0.1
    out = torch.empty(K, n, dtype=dtype, device=device)
    _ops.perturb_batched_(out, w0, c, rho, 5, 1, first, 3, "normal", antithetic)
    for k in range(K):
        sample, sign = (first + k // 2, (-1) ** k) if antithetic else (first + k, 1)
        row = torch.empty(n, dtype=dtype, device=device)
        _ops.perturb_(row, w0, c, sign * rho, 5, 1, sample, 3, "normal")
        assert torch.equal(out[k], row), k


@pytest.mark.parametrize("device", DEVICES)
def test_perturb_large(device):
    n = 1_000_003
    g = torch.Generator().manual_seed(0)
    w0, c = rand(n, torch.float32, device, g), scale_with_zeros(n, torch.float32, device, g)
    out = torch.empty(n, device=device)
    _ops.perturb_(out, w0, c, 0.01, 42, 0, 1, 0, "uniform")
    xi = philox_draw("uniform", 42, 0, 1, 0, n, device=device)
    torch.testing.assert_close(out, w0 + (0.01 * c) * xi, **tol(torch.float32, device))


# ------------------------------------------------------------------------------ APGD steps

def step_inputs(n, dtype, device, seed=0, rho=0.1):
    g = torch.Generator().manual_seed(seed)
    c = scale_with_zeros(n, dtype, device, g)
    w0 = rand(n, dtype, device, g)
    delta = (rho * c.double().cpu() * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)).to(dtype).to(device)
    delta_prev = (rho * c.double().cpu() * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)).to(dtype).to(device)
    grad = rand(n, dtype, device, g)
    if n > 3:
        grad[::7] = 0.0   # sign(0) = 0
    return w0 + delta, delta, delta_prev, grad, w0, c


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES + [100_003])
@pytest.mark.parametrize("step_dtype", [torch.float64, torch.float32])
def test_apgd_step_linf(device, dtype, n, step_dtype):
    rho, mom, step = 0.1, 0.75, 0.37
    params, delta, delta_prev, grad, w0, c = step_inputs(n, dtype, device, rho=rho)
    ct = compute_dtype(dtype)
    d, dp, gr, w, cc = (t.to(ct) for t in (delta, delta_prev, grad, w0, c))
    z = d + step * gr.sign() * cc
    z = torch.maximum(torch.minimum(z, rho * cc), -rho * cc)
    new = mom * z + (1 - mom) * dp
    old_delta = delta.clone()
    _ops.apgd_step_linf_(params, delta, delta_prev, grad, w0, c, scalar(step, device, step_dtype), rho, mom)
    assert torch.equal(delta_prev, old_delta)
    torch.testing.assert_close(delta, new.to(dtype), **tol(dtype, device))
    torch.testing.assert_close(params, (w + new).to(dtype), **tol(dtype, device))
    frozen = c == 0
    assert not params.isnan().any() and not delta.isnan().any()
    assert torch.equal(params[frozen], w0[frozen] + delta[frozen])
    # the new point is inside the box up to the momentum mix of two points inside it
    assert (delta.to(ct).abs() <= rho * cc * (1 + 1e-2) + 1e-6).all()


def l2_expected(delta, delta_prev, grad, w0, c, gs, lam, mom, ct):
    d, dp, gr, w, cc = (t.to(ct) for t in (delta, delta_prev, grad, w0, c))
    z = d + gs * gr * cc
    if lam == 0:
        zp = torch.where(cc != 0, z, torch.zeros_like(z))
    else:
        zp = torch.where(cc != 0, z * cc**2 / (cc**2 + 2 * lam), torch.zeros_like(z))
    new = mom * zp + (1 - mom) * dp
    return z, new, w + new


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES + [100_003])
@pytest.mark.parametrize("lam", [0.0, 0.013, 3.5])
def test_apgd_step_l2(device, dtype, n, lam):
    mom, gs = 0.75, 0.02
    params, delta, delta_prev, grad, w0, c = step_inputs(n, dtype, device)
    _, new, p = l2_expected(delta, delta_prev, grad, w0, c, gs, lam, mom, compute_dtype(dtype))
    old_delta = delta.clone()
    _ops.apgd_step_l2_(params, delta, delta_prev, grad, w0, c, scalar(gs, device), scalar(lam, device), mom)
    assert torch.equal(delta_prev, old_delta)
    torch.testing.assert_close(delta, new.to(dtype), **tol(dtype, device))
    torch.testing.assert_close(params, p.to(dtype), **tol(dtype, device))
    assert not params.isnan().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES + [100_003])
@pytest.mark.parametrize("alpha", [1.0, 0.75])
def test_scaled_step_linf(device, dtype, n, alpha):
    """u in the box [-rho, rho]: the step clamps twice and writes w0 + c u; frozen (c = 0) stays."""
    rho, step = 0.1, 0.37
    params, u, u_prev, grad, w0, c = step_inputs(n, dtype, device, rho=rho)
    u[c == 0] = 0
    u_prev[c == 0] = 0
    ct = compute_dtype(dtype)
    x, xp, gr, w, cc = (t.to(ct) for t in (u, u_prev, grad, w0, c))
    z = (x + step * (cc * gr).sign()).clamp(-rho, rho)
    new = (x + alpha * (z - x) + (1 - alpha) * (x - xp)).clamp(-rho, rho)
    old_u = u.clone()
    _ops.scaled_step_linf_(params, u, u_prev, grad, w0, c, scalar(step, device), rho, alpha)
    assert torch.equal(u_prev, old_u)
    torch.testing.assert_close(u, new.to(dtype), **tol(dtype, device))
    torch.testing.assert_close(params, (w + cc * new).to(dtype), **tol(dtype, device))
    bound = torch.tensor(rho, dtype=ct).to(dtype).to(ct)   # rho as the storage dtype rounds it
    assert (u.to(ct).abs() <= bound).all() and not u[c == 0].any()
    assert torch.equal(params[c == 0], w0[c == 0])


def scaled_l2_expected(u, u_prev, cg, step, rho, alpha):
    """The scaled l2 step written with norms (float64): the reference's two rescalings."""
    d = cg / (cg.norm() + 1e-12)
    z = u + step * d
    z = z * min(1.0, rho / float(z.norm()))
    v = u + alpha * (z - u) + (1 - alpha) * (u - u_prev)
    return v * min(1.0, rho / float(v.norm()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES + [100_003])
def test_scaled_gram(device, dtype, n):
    params, u, u_prev, grad, w0, c = step_inputs(n, dtype, device)
    ct = compute_dtype(dtype)
    x, xp, gr, cc = (t.to(ct) for t in (u, u_prev, grad, c))
    gram = _ops.scaled_gram(u, u_prev, grad, w0, c)
    xd, pd, cg, cu = x.double(), xp.double(), (cc * gr).double(), (cc * x).double()
    want = torch.stack([xd @ xd, xd @ pd, pd @ pd, xd @ cg, pd @ cg, cg @ cg, cu @ cu]).cpu()
    torch.testing.assert_close(gram.cpu(), want, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [0.001, 0.03, 1.0])          # u inside the ball, near it, far out
@pytest.mark.parametrize("step, alpha", [(0.1, 1.0), (0.1, 0.75), (1e-4, 0.75)])
def test_scaled_step_l2_is_the_two_rescalings(device, dtype, scale, step, alpha):
    n, rho = 4003, 0.05
    g = torch.Generator().manual_seed(3)
    params, _, _, grad, w0, c = step_inputs(n, dtype, device)
    u, u_prev = ((scale * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype).to(device) for _ in range(2))
    u[c == 0] = 0
    u_prev[c == 0] = 0
    cg = (c * grad).double()
    want = scaled_l2_expected(u.double(), u_prev.double(), cg, step, rho, alpha)
    old_u = u.clone()
    gram = _ops.scaled_gram(u, u_prev, grad, w0, c)
    _ops.scaled_step_l2_(params, u, u_prev, grad, w0, c, gram, scalar(step, device), rho, alpha)
    assert torch.equal(u_prev, old_u)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(u.double(), want, rtol=rtol, atol=rtol * float(want.abs().max()))
    torch.testing.assert_close(params.double(), (w0.double() + c.double() * u.double()), rtol=rtol, atol=1e-7)
    assert float(u.double().norm()) <= rho * (1 + 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_apgd_step_l2_nonadaptive_rescale(device):
    """c = 1 and lam = (||z|| / rho - 1) / 2 rescales z to norm rho (the published l2 projection)."""
    n, rho = 5000, 0.05
    g = torch.Generator().manual_seed(3)
    delta, grad = rand(n, torch.float64, device, g, 0.001), rand(n, torch.float64, device, g)
    c, w0 = torch.ones(n, dtype=torch.float64, device=device), rand(n, torch.float64, device, g)
    gs = 2 * rho / grad.norm().item()
    z = delta + gs * grad
    lam = (z.norm().item() / rho - 1) / 2
    assert lam > 0
    params, dp = w0.clone(), torch.zeros_like(delta)
    _ops.apgd_step_l2_(params, delta, dp, grad, w0, c, scalar(gs, device), scalar(lam, device), 1.0)
    torch.testing.assert_close(delta, z * rho / z.norm(), rtol=1e-12, atol=1e-15)
    assert abs(delta.norm().item() - rho) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES + [100_003])
def test_ellipsoid_sq_norms(device, dtype, n):
    gs = 0.3
    _, delta, _, grad, w0, c = step_inputs(n, dtype, device)
    lambdas = torch.tensor([0.0, 1e-4, 0.01, 0.1, 1.0, 10.0, 1e3], dtype=torch.float64, device=device)
    got = _ops.ellipsoid_sq_norms(delta, grad, w0, c, scalar(gs, device), lambdas)
    assert got.dtype == torch.float64 and got.shape == (7,) and got.device.type == torch.device(device).type
    ct = compute_dtype(dtype)
    z = (delta.to(ct) + gs * grad.to(ct) * c.to(ct)).double()
    cc = c.double()
    want = torch.stack([torch.where(cc != 0, z * cc / (cc**2 + 2 * l), torch.zeros_like(z)).pow(2).sum()
                        for l in lambdas.tolist()])
    # z is formed in the compute type (float32 for fp32/half: one rounding of z may differ from
    # torch's, e.g. an FMA on CUDA, which moves the sum by ~1e-7 relative); the sum is float64.
    rtol = 1e-10 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-12)
    # lambda = 0 is ||z / c||^2 over c != 0
    mask = cc != 0
    torch.testing.assert_close(got[0], (z[mask] / cc[mask]).pow(2).sum(), rtol=rtol, atol=1e-12)
    assert not got.isnan().any()


@pytest.mark.parametrize("device", DEVICES)
def test_ellipsoid_sq_norms_many_lambdas(device):
    """More candidates than one CUDA pass holds (32): same values."""
    n = 3000
    _, delta, _, grad, w0, c = step_inputs(n, torch.float64, device)
    lambdas = torch.logspace(-6, 3, 70, dtype=torch.float64, device=device)
    got = _ops.ellipsoid_sq_norms(delta, grad, w0, c, scalar(0.1, device), lambdas)
    single = torch.stack([_ops.ellipsoid_sq_norms(delta, grad, w0, c, scalar(0.1, device), lambdas[j:j + 1])[0]
                          for j in range(70)])
    torch.testing.assert_close(got, single, rtol=1e-13, atol=0)
    assert (got[1:] <= got[:-1]).all()   # monotone in lambda


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES + [100_003])
def test_sum_squares(device, dtype, n):
    g = torch.Generator().manual_seed(n)
    x = rand(n, dtype, device, g)
    got = OPS.sum_squares(x)
    assert got.dtype == torch.float64 and got.dim() == 0
    torch.testing.assert_close(got, x.double().pow(2).sum(), rtol=1e-12, atol=1e-12)


def test_reductions_thread_count_independent():
    n = 1_000_003
    _, delta, _, grad, w0, c = step_inputs(n, torch.float32, "cpu")
    lambdas = torch.tensor([0.0, 0.1, 1.0], dtype=torch.float64)
    prev = torch.get_num_threads()
    res = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            res.append((OPS.sum_squares(grad), _ops.ellipsoid_sq_norms(delta, grad, w0, c, scalar(0.1, "cpu"), lambdas)))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 1001])
def test_copy_if(device, dtype, n):
    g = torch.Generator().manual_seed(0)
    src, dst = rand(n, dtype, device, g), rand(n, dtype, device, g)
    before = dst.clone()
    OPS.copy_if_(dst, src, torch.tensor(False, device=device))
    assert torch.equal(dst, before)
    OPS.copy_if_(dst, src, torch.tensor(True, device=device))
    assert torch.equal(dst, src)


@pytest.mark.parametrize("device", DEVICES)
def test_offset_views_of_one_buffer(device):
    """Perturbing slices of a flat buffer with their global offsets equals one call on the whole."""
    n = 1000
    g = torch.Generator().manual_seed(0)
    w0, c = rand(n, torch.float32, device, g), scale_with_zeros(n, torch.float32, device, g)
    whole = _ops.perturb_(torch.empty(n, device=device), w0, c, 0.2, 3, 0, 0, 0, "normal")
    parts = torch.empty(n, device=device)
    bounds = ((0, 3), (3, 130), (130, 131), (131, 1000))
    for a, b in bounds:
        _ops.perturb_(parts[a:b], w0[a:b], c[a:b], 0.2, 3, 0, 0, a, "normal")
    assert torch.equal(parts, whole)
    # one op over separately allocated pieces, explicit or derived scale
    pieces = torch.empty(n, device=device)
    _ops.perturb_tensors_([pieces[a:b] for a, b in bounds], [w0[a:b].clone() for a, b in bounds],
                          [c[a:b].clone() for a, b in bounds], 0.2, 3, 0, 0, [a for a, _ in bounds], "normal")
    assert torch.equal(pieces, whole)
    rule = _ops.DerivedScale(True, 0.01)
    _ops.perturb_tensors_([pieces[a:b] for a, b in bounds], [w0[a:b].clone() for a, b in bounds], rule, 0.2, 3, 0, 0,
                          [a for a, _ in bounds], "normal")
    assert torch.equal(pieces, _ops.perturb_(torch.empty(n, device=device), w0, rule, 0.2, 3, 0, 0, 0, "normal"))


# ------------------------------------------------------------------------------ derived scale

RULES = [_ops.DerivedScale(True, 0.0), _ops.DerivedScale(True, 0.01), _ops.DerivedScale(False)]


def scale_buffer(rule, w0):
    """The buffer a derived scale stands for, built as the reference builds c."""
    return w0.abs() + rule.eta if rule.adaptive else torch.ones_like(w0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", RULES, ids=["abs", "abs+eta", "one"])
def test_derived_scale_equals_its_buffer(device, dtype, rule):
    """Every op with c derived from w0 in the kernels gives the same bits as with the buffer
    |w0| + eta (or 1) passed explicitly, including at exact-zero weights (frozen when eta = 0)."""
    n = 10_007
    params, delta, delta_prev, grad, w0, _ = step_inputs(n, dtype, device, seed=4)
    w0[::5] = 0.0
    c = scale_buffer(rule, w0)
    s, lam = scalar(0.3, device), scalar(0.02, device)
    lambdas = torch.tensor([0.0, 0.01, 1.0], dtype=torch.float64, device=device)

    def run(scale):
        bufs = [t.clone() for t in (params, delta, delta_prev)]
        linf = [t.clone() for t in (params, delta, delta_prev)]
        _ops.apgd_step_l2_(*bufs, grad, w0, scale, s, lam, 0.75)
        _ops.apgd_step_linf_(*linf, grad, w0, scale, s, 0.1, 0.75)
        one = _ops.perturb_(torch.empty_like(w0), w0, scale, 0.05, 3, 1, 2, 5, "normal")
        rows = _ops.perturb_batched_(torch.empty(2, n, dtype=dtype, device=device), w0, scale, 0.05, 3, 1, 2, 5,
                                     "uniform", True)
        norms = _ops.ellipsoid_sq_norms(delta, grad, w0, scale, s, lambdas)
        return bufs + linf + [one, rows, norms]

    for got, want in zip(run(rule), run(c)):
        assert torch.equal(got, want)


def test_derived_scale_unaligned_views():
    """Derived scales on views at odd offsets (the per-batch rows of the APGD buffers)."""
    n = 1001
    params, delta, delta_prev, grad, w0, _ = step_inputs(n + 3, torch.float32, "cpu", seed=5)
    rule = _ops.DerivedScale(True, 0.0)
    views = [t[3:] for t in (params, delta, delta_prev, grad, w0)]
    c = scale_buffer(rule, views[4])
    a = [t.clone() for t in views[:3]]
    b = [t.clone() for t in views[:3]]
    _ops.apgd_step_linf_(*a, views[3], views[4], rule, scalar(0.2, "cpu"), 0.1, 0.75)
    _ops.apgd_step_linf_(*b, views[3], views[4], c, scalar(0.2, "cpu"), 0.1, 0.75)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------ errors

def test_errors():
    n = 10
    x = torch.zeros(n)
    s = torch.tensor(0.1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="'out' must be contiguous"):
        _ops.perturb_(torch.zeros(2 * n)[::2], x, x, 0.1, 0, 0, 0, 0, "normal")
    with pytest.raises(RuntimeError, match="'c' has dtype"):
        _ops.perturb_(torch.zeros(n), x, x.double(), 0.1, 0, 0, 0, 0, "normal")
    with pytest.raises(RuntimeError, match="'c' has 11 elements"):
        _ops.perturb_(torch.zeros(n), x, torch.zeros(n + 1), 0.1, 0, 0, 0, 0, "normal")
    with pytest.raises(RuntimeError, match="'w0' must be a 1-D"):
        _ops.perturb_(torch.zeros(2, 5), x.view(2, 5), x.view(2, 5), 0.1, 0, 0, 0, 0, "normal")
    with pytest.raises(RuntimeError, match="'eta' must be finite and >= 0"):
        _ops.perturb_(torch.zeros(n), x, _ops.DerivedScale(True, -0.1), 0.1, 0, 0, 0, 0, "normal")
    with pytest.raises(RuntimeError, match="'w0' has 11 elements"):
        _ops.ellipsoid_sq_norms(x, x, torch.zeros(n + 1), _ops.DerivedScale(), s, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="as many 'out' tensors"):
        _ops.perturb_tensors_([x], [x, x], _ops.DerivedScale(), 0.1, 0, 0, 0, [0, 10], "normal")
    with pytest.raises(RuntimeError, match="one tensor per piece"):
        _ops.perturb_tensors_([x, x.clone()], [x, x], [x], 0.1, 0, 0, 0, [0, 10], "normal")
    with pytest.raises(RuntimeError, match="one dtype and device"):
        _ops.perturb_tensors_([x, x.double()], [x, x.double()], _ops.DerivedScale(), 0.1, 0, 0, 0, [0, 10], "normal")
    with pytest.raises(TypeError, match="a tensor or a DerivedScale"):
        _ops.perturb_(torch.zeros(n), x, 1.0, 0.1, 0, 0, 0, 0, "normal")
    with pytest.raises(RuntimeError, match="unknown distribution"):
        OPS.draw_(x, 0, 0, 0, 0, "cauchy")
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        OPS.draw_(torch.zeros(n, dtype=torch.int32), 0, 0, 0, 0, "normal")
    with pytest.raises(RuntimeError, match="'rng_stream' must be in"):
        OPS.draw_(x, 0, -1, 0, 0, "normal")
    with pytest.raises(RuntimeError, match="'sample' must be in"):
        OPS.draw_(x, 0, 0, 2**32, 0, "normal")
    with pytest.raises(RuntimeError, match="'offset' must be >= 0"):
        OPS.draw_(x, 0, 0, 0, -1, "normal")
    with pytest.raises(RuntimeError, match="even number of rows"):
        _ops.perturb_batched_(torch.zeros(3, n), x, x, 0.1, 0, 0, 0, 0, "normal", True)
    with pytest.raises(RuntimeError, match="exceed 2\\^32 - 1"):
        _ops.perturb_batched_(torch.zeros(3, n), x, x, 0.1, 0, 0, 2**32 - 2, 0, "normal", False)
    with pytest.raises(RuntimeError, match="rows of length"):
        _ops.perturb_batched_(torch.zeros(2, n + 1), x, x, 0.1, 0, 0, 0, 0, "normal", False)
    args = [torch.zeros(n) for _ in range(6)]
    with pytest.raises(RuntimeError, match="'step_size' must be a 0-dim"):
        _ops.apgd_step_linf_(*args, torch.tensor([0.1]), 0.1, 0.75)
    with pytest.raises(RuntimeError, match="'step_size' must be a float64"):
        _ops.apgd_step_linf_(*args, torch.tensor(1, dtype=torch.int64), 0.1, 0.75)
    with pytest.raises(RuntimeError, match="'grad' has dtype"):
        _ops.apgd_step_linf_(*args[:3], args[3].double(), *args[4:], s, 0.1, 0.75)
    with pytest.raises(RuntimeError, match="'delta_prev' must be contiguous"):
        _ops.apgd_step_l2_(args[0], args[1], torch.zeros(2 * n)[::2], *args[3:], s, s, 0.75)
    with pytest.raises(RuntimeError, match="'lam' must be a float64"):
        _ops.apgd_step_l2_(*args, s, s.float(), 0.75)
    with pytest.raises(RuntimeError, match="'lambdas' must be float64"):
        _ops.ellipsoid_sq_norms(x, x, x, x, s, torch.zeros(3))
    with pytest.raises(RuntimeError, match="'cond' must be a 0-dim bool"):
        OPS.copy_if_(x, x.clone(), torch.tensor([True]))
    with pytest.raises(RuntimeError, match="'src' has shape"):
        OPS.copy_if_(x, torch.zeros(n + 1), torch.tensor(True))
    with pytest.raises(ValueError, match="seed must be in"):
        _ops.draw_(x, -1, 0, 0, 0, "normal")
    with pytest.raises(ValueError, match="unknown distribution"):
        _ops.perturb_(x, x, x, 0.1, 0, 0, 0, 0, "gauss")


def test_errors_overlapping_buffers():
    """The kernels take __restrict__ pointers: a written buffer sharing memory with any other
    argument is refused, naming both, instead of silently reading what was just written."""
    n = 10
    s = torch.tensor(0.1, dtype=torch.float64)
    buf = torch.zeros(3 * n)
    a, b, c = buf[:n], buf[n:2 * n], buf[2 * n:]
    with pytest.raises(RuntimeError, match="perturb_ writes 'out' but it shares memory with 'w0'"):
        _ops.perturb_(a, a, _ops.DerivedScale(), 0.1, 0, 0, 0, 0, "normal")
    with pytest.raises(RuntimeError, match="writes 'out' but it shares memory with 'c'"):
        _ops.perturb_(buf[1:n + 1], b, a, 0.1, 0, 0, 0, 0, "normal")   # partial overlap
    with pytest.raises(RuntimeError, match="perturb_batched_ writes 'out'"):
        _ops.perturb_batched_(buf[:2 * n].view(2, n), b, _ops.DerivedScale(), 0.1, 0, 0, 0, 0, "normal", False)
    with pytest.raises(RuntimeError, match=r"perturb_tensors_ writes 'out\[0\]' but it shares memory with 'out\[1\]'"):
        _ops.perturb_tensors_([a, buf[5:5 + n]], [c.clone(), c.clone()], _ops.DerivedScale(), 0.1, 0, 0, 0,
                              [0, n], "normal")
    with pytest.raises(RuntimeError, match=r"writes 'out\[0\]' but it shares memory with 'w0\[1\]'"):
        _ops.perturb_tensors_([a, torch.zeros(n)], [c, a], _ops.DerivedScale(), 0.1, 0, 0, 0, [0, n], "normal")
    bufs = lambda: [torch.zeros(n) for _ in range(5)]
    p, d, dp, g, w = bufs()
    with pytest.raises(RuntimeError, match="apgd_step_linf_ writes 'delta' but it shares memory with 'grad'"):
        _ops.apgd_step_linf_(p, d, dp, d, w, _ops.DerivedScale(), s, 0.1, 0.75)
    with pytest.raises(RuntimeError, match="apgd_step_l2_ writes 'params' but it shares memory with 'delta_prev'"):
        _ops.apgd_step_l2_(p, d, p, g, w, _ops.DerivedScale(), s, s, 0.75)
    with pytest.raises(RuntimeError, match="writes 'delta' but it shares memory with 'c'"):
        _ops.apgd_step_linf_(p, d, dp, g, w, d, s, 0.1, 0.75)
    with pytest.raises(RuntimeError, match="copy_if_ writes 'dst' but it shares memory with 'src'"):
        OPS.copy_if_(buf[:n], buf[2:n + 2], torch.tensor(True))
    # reading one buffer twice is fine (only writes must not alias), and so are adjacent views
    _ops.apgd_step_linf_(a, b, c, g, g, g.abs(), s, 0.1, 0.75)
    _ops.perturb_(a, g, g, 0.1, 0, 0, 0, 0, "normal")


@pytest.mark.skipif(not _ops.available("cuda"), reason="no CUDA build or GPU")
def test_errors_device_mismatch():
    x, y = torch.zeros(4, device="cuda"), torch.zeros(4)
    with pytest.raises(RuntimeError, match="'c' is on"):
        _ops.perturb_(x, x, y, 0.1, 0, 0, 0, 0, "normal")
    with pytest.raises(RuntimeError, match="'step_size' is on"):
        _ops.apgd_step_linf_(x, x.clone(), x.clone(), x, x, x, torch.tensor(0.1, dtype=torch.float64), 0.1, 0.75)


def test_seed_mapping():
    assert _ops.seed_to_int64(2**64 - 1) == -1
    assert _ops.seed_to_int64(2**63) == -(2**63)
    a = _ops.draw_(torch.empty(50), 2**64 - 1, 0, 0, 0, "uniform")
    assert torch.equal(a, philox_draw("uniform", 2**64 - 1, 0, 0, 0, 50))


def test_build_info_and_available():
    info = _ops.build_info()
    assert info["cuda"] in (True, False) and "float32" in info["dtypes"]
    assert _ops.available("cpu") and _ops.available(torch.device("cpu"))
    assert _ops.available("cuda") == (info["cuda"] and torch.cuda.is_available())
    assert not _ops.available("meta")


@pytest.mark.skipif(sys.platform == "darwin", reason="built without OpenMP on macOS")
def test_cpu_ops_are_built_parallel():
    # Without OpenMP in the extension's own compile, at::parallel_for silently runs on one thread.
    assert _ops.build_info()["openmp"] is True


# ------------------------------------------------------------------------------ SAM (sharpfast.optim)

def sam_pieces(sizes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = [rand(n, dtype, device, g) for n in sizes]
    grad = [rand(n, dtype, device, g) for n in sizes]
    for x in grad:
        x[::5] = 0.0
    return w, grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", [(True, 0.0), (True, 0.01), (False, 0.0)], ids=["abs", "abs+eta", "one"])
def test_sam_ops(device, dtype, rule):
    """The squared norm of T g over a list (float64) and the save-and-perturb pass, against torch
    expressions in the compute type, over pieces of odd sizes (empty ones and several blocks too)."""
    adaptive, eta = rule
    sizes = [5, 0, 1, 1000, 3, 9001, 2]
    w, grad = sam_pieces(sizes, dtype, device)
    ct = compute_dtype(dtype)
    T = [(x.to(ct).abs() + torch.tensor(eta, dtype=dtype).to(ct)) if adaptive else torch.ones_like(x, dtype=ct)
         for x in w]
    T = [t.to(dtype).to(ct) for t in T]   # the scale rounded to the storage dtype, as the derived rule
    norm = OPS.sam_sq_norm(grad, w, adaptive, eta)
    assert norm.dtype == torch.float64 and norm.dim() == 0 and norm.device.type == torch.device(device).type
    want = sum(((t * x.to(ct)).double().pow(2).sum() for t, x in zip(T, grad)))
    torch.testing.assert_close(norm, want.to(norm.device), rtol=1e-10, atol=1e-12)
    out, saved = [x.clone() for x in w], [torch.full_like(x, float("nan")) for x in w]
    OPS.sam_perturb_(out, saved, grad, adaptive, eta, scalar(0.037, device))
    for o, sv, x, t, gr in zip(out, saved, w, T, grad):
        assert torch.equal(sv, x)
        torch.testing.assert_close(o, (x.to(ct) + ((t * t) * gr.to(ct)) * 0.037).to(dtype), **tol(dtype, device))


def test_sam_sq_norm_thread_count_independent():
    w, grad = sam_pieces([700_001, 3, 40_000], torch.float32, "cpu", seed=1)
    prev = torch.get_num_threads()
    res = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            res.append(OPS.sam_sq_norm(grad, w, True, 0.01))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(res[0], res[1])


def test_sam_ops_refuse_bad_lists():
    w, grad = sam_pieces([4, 6], torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="as many 'grad' tensors"):
        OPS.sam_sq_norm(grad[:1], w, True, 0.0)
    with pytest.raises(RuntimeError, match="'grad' has 6 elements but 'w' has 4"):
        OPS.sam_sq_norm(grad[::-1], w, True, 0.0)
    with pytest.raises(RuntimeError, match="one dtype and device"):
        OPS.sam_sq_norm(grad, [w[0], w[1].double()], True, 0.0)
    with pytest.raises(RuntimeError, match="eta"):
        OPS.sam_sq_norm(grad, w, True, -1.0)
    with pytest.raises(RuntimeError, match="shares memory"):
        OPS.sam_perturb_(w, [w[0].clone(), grad[1]], grad, True, 0.0, scalar(0.1, "cpu"))
    with pytest.raises(RuntimeError, match="'s' must be a float64"):
        OPS.sam_perturb_(w, [x.clone() for x in w], grad, True, 0.0, torch.tensor(0.1))


# ------------------------------------------------------------------------------ opcheck / compile

def _opcheck_cases(device):
    n = 37
    g = torch.Generator().manual_seed(0)
    f = lambda: rand(n, torch.float32, device, g)
    c = scale_with_zeros(n, torch.float32, device, g)
    s = scalar(0.1, device)
    lam = torch.tensor([0.0, 0.5], dtype=torch.float64, device=device)
    return {
        "draw_": (OPS.draw_, (f(), 1, 2, 3, 4, "normal")),
        "perturb_": (OPS.perturb_, (f(), f(), c, False, 0.0, 0.1, 1, 2, 3, 4, "uniform")),
        "perturb_batched_": (OPS.perturb_batched_, (torch.zeros(4, n, device=device), f(), c, False, 0.0, 0.1, 1, 2,
                                                    3, 4, "normal", True)),
        "apgd_step_linf_": (OPS.apgd_step_linf_, (f(), f(), f(), f(), f(), c, False, 0.0, s, 0.1, 0.75)),
        "apgd_step_l2_": (OPS.apgd_step_l2_, (f(), f(), f(), f(), f(), c, False, 0.0, s, scalar(0.2, device), 0.75)),
        "ellipsoid_sq_norms": (OPS.ellipsoid_sq_norms, (f(), f(), f(), c, False, 0.0, s, lam)),
        "copy_if_": (OPS.copy_if_, (f(), f(), torch.tensor(True, device=device))),
        "sum_squares": (OPS.sum_squares, (f(),)),
        "perturb_tensors_": (OPS.perturb_tensors_, ([f()[:30], f()[:7]], [f()[:30], f()[:7]], [c[:30], c[:7]], False,
                                                    0.0, 0.1, 1, 2, 3, [0, 30], "normal")),
        # c derived from w0 in the kernels (no scale buffer)
        "perturb_/derived-scale": (OPS.perturb_, (f(), f(), None, True, 0.01, 0.1, 1, 2, 3, 4, "normal")),
        "perturb_batched_/derived-scale": (OPS.perturb_batched_, (torch.zeros(2, n, device=device), f(), None, False,
                                                                  0.0, 0.1, 1, 2, 3, 4, "normal", False)),
        "apgd_step_linf_/derived-scale": (OPS.apgd_step_linf_, (f(), f(), f(), f(), f(), None, True, 0.0, s, 0.1,
                                                                0.75)),
        "apgd_step_l2_/derived-scale": (OPS.apgd_step_l2_, (f(), f(), f(), f(), f(), None, True, 0.0, s,
                                                            scalar(0.2, device), 0.75)),
        "ellipsoid_sq_norms/unit-scale": (OPS.ellipsoid_sq_norms, (f(), f(), f(), None, False, 0.0, s, lam)),
        "perturb_tensors_/derived-scale": (OPS.perturb_tensors_, ([f()[:30], f()[:7]], [f()[:30], f()[:7]], [], True,
                                                                  0.0, 0.1, 1, 2, 3, [0, 30], "uniform")),
        # the scaled solver
        "scaled_step_linf_": (OPS.scaled_step_linf_, (f(), f(), f(), f(), f(), c, False, 0.0, s, 0.1, 0.75)),
        "scaled_step_l2_/derived-scale": (OPS.scaled_step_l2_, (
            f(), f(), f(), f(), f(), None, True, 0.0,
            torch.tensor([0.9, 0.1, 1.0, 0.2, -0.1, 2.0, 0.5], dtype=torch.float64, device=device), s, 0.1, 0.75)),
        "scaled_gram": (OPS.scaled_gram, (f(), f(), f(), f(), c, False, 0.0)),
        # SAM's op family over a parameter list
        "sam_sq_norm": (OPS.sam_sq_norm, ([f()[:30], f()[:7]], [f()[:30], f()[:7]], True, 0.01)),
        "sam_sq_norm/unit-scale": (OPS.sam_sq_norm, ([f()], [f()], False, 0.0)),
        "sam_perturb_": (OPS.sam_perturb_, ([f()[:30], f()[:7]], [f()[:30], f()[:7]], [f()[:30], f()[:7]], True, 0.0,
                                            s)),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(_opcheck_cases("cpu")))
def test_opcheck(device, case):
    op, args = _opcheck_cases(device)[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    n = 257
    _, delta, delta_prev, grad, w0, c = step_inputs(n, torch.float32, device)

    def step(params, delta, delta_prev, grad, w0, c, step_size, lambdas):
        OPS.apgd_step_linf_(params, delta, delta_prev, grad, w0, c, False, 0.0, step_size, 0.1, 0.75)
        OPS.apgd_step_l2_(params, delta, delta_prev, grad, w0, None, True, 0.0, step_size, lambdas[1], 0.75)
        norms = OPS.ellipsoid_sq_norms(delta, grad, w0, c, False, 0.0, step_size, lambdas)
        OPS.perturb_(w0, params, c, False, 0.0, 0.01, 7, 0, 1, 0, "normal")
        OPS.copy_if_(params, w0, norms[0] > 0)
        return norms * 2, OPS.sum_squares(params)

    def run(fn):
        bufs = [t.clone() for t in (w0, delta, delta_prev, grad, w0, c)]
        out = fn(*bufs, scalar(0.3, device), torch.tensor([0.0, 1.0], dtype=torch.float64, device=device))
        return bufs, out

    eager_bufs, eager_out = run(step)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    comp_bufs, comp_out = run(compiled)
    for a, b in zip(eager_bufs, comp_bufs):
        assert torch.equal(a, b)
    for a, b in zip(eager_out, comp_out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_the_other_ops(device):
    """The ops test_torch_compile_fullgraph leaves out (draws, the list and batched perturbations,
    the scaled solver's steps and Gram matrix, SAM's norm and ascent): every op traces into one graph and computes the
    eager bits."""
    n = 131
    _, u, u_prev, grad, w0, c = step_inputs(n, torch.float32, device)

    def step(params, u, u_prev, grad, w0, c, rows, step_size, gram):
        OPS.draw_(grad, 3, 1, 2, 0, "rademacher")
        OPS.perturb_tensors_([params[:100], params[100:]], [w0[:100], w0[100:]], [c[:100], c[100:]], False, 0.0,
                             0.05, 5, 0, 1, [0, 100], "uniform")
        OPS.perturb_batched_(rows, w0, c, False, 0.0, 0.05, 5, 0, 2, 0, "normal", True)
        OPS.scaled_step_linf_(params, u, u_prev, grad, w0, c, False, 0.0, step_size, 0.1, 0.75)
        OPS.scaled_step_l2_(params, u, u_prev, grad, w0, None, True, 0.0, gram, step_size, 0.1, 0.75)
        norm = OPS.sam_sq_norm([grad[:100], grad[100:]], [params[:100], params[100:]], True, 0.01)
        OPS.sam_perturb_([params[:100], params[100:]], [u_prev[:100], u_prev[100:]], [grad[:100], grad[100:]], True,
                         0.01, 0.05 / (norm.sqrt() + 1e-12))
        return OPS.scaled_gram(u, u_prev, grad, w0, c, False, 0.0), rows.sum(), norm

    def run(fn):
        bufs = [t.clone() for t in (w0, u, u_prev, grad, w0, c)] + [torch.zeros(4, n, device=device)]
        gram = torch.tensor([0.9, 0.1, 1.0, 0.2, -0.1, 2.0, 0.5], dtype=torch.float64, device=device)
        out = fn(*bufs, scalar(0.3, device), gram)
        return bufs, out

    eager_bufs, eager_out = run(step)
    torch._dynamo.reset()
    comp_bufs, comp_out = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager_bufs + list(eager_out), comp_bufs + list(comp_out)):
        assert torch.equal(a, b)


def test_the_compile_tests_cover_every_op():
    import inspect
    called = set()
    for test in (test_torch_compile_fullgraph, test_torch_compile_fullgraph_the_other_ops):
        called |= set(re.findall(r"OPS\.(\w+)\(", inspect.getsource(test)))
    assert called == {op for op, _ in _opcheck_cases("cpu").values() for op in [op._qualified_op_name.split("::")[1]]}


# ------------------------------------------------------------------------------ CPU vs CUDA

@pytest.mark.skipif(not _ops.available("cuda"), reason="no CUDA build or GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_cuda_agree(dtype):
    """Same inputs -> the same bits on both devices for every elementwise op (draws, perturbations,
    both APGD steps; derived and buffered scales; subnormal weights kept, no flush to zero): the
    extension is built without FMA contraction or fast math. The reductions sum in a different
    order on each device, so they agree to rounding."""
    n = 100_003
    for dist in ("uniform", "rademacher", "normal"):
        a = _ops.draw_(torch.empty(n, dtype=dtype), 9, 1, 2, 5, dist)
        b = _ops.draw_(torch.empty(n, dtype=dtype, device="cuda"), 9, 1, 2, 5, dist)
        assert torch.equal(a, b.cpu()), dist
    cpu = list(step_inputs(n, dtype, "cpu"))
    if dtype in (torch.float32, torch.float64):
        cpu[4][:5] = torch.finfo(dtype).tiny / 4   # subnormal weights: |w| stays > 0, not flushed
    gpu = [t.cuda() for t in cpu]
    for c_cpu, c_gpu in ((cpu[5], gpu[5]), (_ops.DerivedScale(True, 0.01), _ops.DerivedScale(True, 0.01))):
        for dist in ("normal", "uniform"):
            a = _ops.perturb_(torch.empty_like(cpu[4]), cpu[4], c_cpu, 0.05, 3, 1, 2, 7, dist)
            b = _ops.perturb_(torch.empty_like(gpu[4]), gpu[4], c_gpu, 0.05, 3, 1, 2, 7, dist)
            assert torch.equal(a, b.cpu()), dist
        rows_a = _ops.perturb_batched_(torch.empty(4, n, dtype=dtype), cpu[4], c_cpu, 0.05, 3, 1, 2, 7, "normal", True)
        rows_b = _ops.perturb_batched_(torch.empty(4, n, dtype=dtype, device="cuda"), gpu[4], c_gpu, 0.05, 3, 1, 2, 7,
                                       "normal", True)
        assert torch.equal(rows_a, rows_b.cpu())
        for step in ("linf", "l2", "scaled_linf", "scaled_l2"):
            bufs_a = [t.clone() for t in cpu[:5]]
            bufs_b = [t.clone() for t in gpu[:5]]
            for bufs, c, dev in ((bufs_a, c_cpu, "cpu"), (bufs_b, c_gpu, "cuda")):
                if step == "linf":
                    _ops.apgd_step_linf_(*bufs, c, scalar(0.2, dev), 0.1, 0.75)
                elif step == "l2":
                    _ops.apgd_step_l2_(*bufs, c, scalar(0.37, dev), scalar(0.3, dev), 0.75)
                elif step == "scaled_linf":
                    _ops.scaled_step_linf_(*bufs, c, scalar(0.2, dev), 0.1, 0.75)
                else:
                    gram = torch.tensor([0.9, 0.1, 1.0, 0.2, -0.1, 2.0, 0.5], dtype=torch.float64, device=dev)
                    _ops.scaled_step_l2_(*bufs, c, gram, scalar(0.2, dev), 0.1, 0.75)
            for x, y in zip(bufs_a, bufs_b):
                assert torch.equal(x, y.cpu()), step
    # the multi-tensor perturbation: many pieces of odd sizes (empty ones too), odd offsets, one launch on CUDA
    sizes = [5, 0, 1, 1000, 3, 77, 4096, 2]
    cuts = torch.tensor([0] + sizes).cumsum(0).tolist()
    for c_cpu, c_gpu in ((cpu[5], gpu[5]), (_ops.DerivedScale(True, 0.01), _ops.DerivedScale(True, 0.01))):
        outs = []
        for w, c, dev in ((cpu[4], c_cpu, "cpu"), (gpu[4], c_gpu, "cuda")):
            pieces = [w[a:b] for a, b in zip(cuts, cuts[1:])]
            cs = c if isinstance(c, _ops.DerivedScale) else [c[a:b] for a, b in zip(cuts, cuts[1:])]
            out = [torch.empty_like(piece) for piece in pieces]
            _ops.perturb_tensors_(out, pieces, cs, 0.05, 3, 1, 2, [7 + a for a in cuts[:-1]], "normal")
            outs.append(torch.cat(out).cpu())
        assert torch.equal(outs[0], outs[1])
    lam = torch.tensor([0.0, 0.3], dtype=torch.float64)
    na = _ops.ellipsoid_sq_norms(cpu[1], cpu[3], cpu[4], cpu[5], scalar(0.1, "cpu"), lam)
    nb = _ops.ellipsoid_sq_norms(gpu[1], gpu[3], gpu[4], gpu[5], scalar(0.1, "cuda"), lam.cuda())
    torch.testing.assert_close(nb.cpu(), na, rtol=1e-12, atol=0)
    torch.testing.assert_close(_ops.sum_squares(gpu[3]).cpu(), _ops.sum_squares(cpu[3]), rtol=1e-12, atol=0)
    ga = _ops.scaled_gram(cpu[1], cpu[2], cpu[3], cpu[4], cpu[5])
    gb = _ops.scaled_gram(gpu[1], gpu[2], gpu[3], gpu[4], gpu[5])
    torch.testing.assert_close(gb.cpu(), ga, rtol=1e-12, atol=1e-300)
    # SAM's ascent over many pieces (one launch on CUDA): the same bits; its norm to rounding
    for adaptive, eta in ((True, 0.01), (False, 0.0)):
        ws = [[cpu[4][a:b].clone() for a, b in zip(cuts, cuts[1:])], [gpu[4][a:b].clone() for a, b in zip(cuts, cuts[1:])]]
        gs = [[cpu[3][a:b] for a, b in zip(cuts, cuts[1:])], [gpu[3][a:b] for a, b in zip(cuts, cuts[1:])]]
        na, nb = (_ops.sam_sq_norm(g, w, adaptive, eta) for g, w in zip(gs, ws))
        torch.testing.assert_close(nb.cpu(), na, rtol=1e-12, atol=0)
        for w, g, dev in zip(ws, gs, ("cpu", "cuda")):
            _ops.sam_perturb_(w, [torch.empty_like(x) for x in w], g, adaptive, eta, scalar(0.05, dev))
        assert torch.equal(torch.cat(ws[0]), torch.cat(ws[1]).cpu())
