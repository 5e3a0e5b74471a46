"""Curvature measures against dense float64 Hessians (torch.func.hessian) and closed forms."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import sharpfast
from sharpfast import curvature
from tests.toy_models import DiagonalLinearNetwork, SmallCNN, TinyTransformer, half_squared_error, mlp


class AttentionBlock(torch.nn.Module):
    """A pre-norm transformer block written out (input projection, single-head attention, GELU
    MLP, LayerNorms) on continuous sequences."""

    def __init__(self, d_in=4, d=6, n_cls=3):
        super().__init__()
        torch.manual_seed(0)
        nn = torch.nn
        self.embed, self.qkv, self.proj = nn.Linear(d_in, d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm1, self.norm2, self.head = nn.LayerNorm(d), nn.LayerNorm(d), nn.Linear(d, n_cls)
        self.mlp = nn.Sequential(nn.Linear(d, 8), nn.GELU(), nn.Linear(8, d))

    def forward(self, tokens):
        h = self.embed(tokens)
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        h = h + self.proj(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v)
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(1))


def small(kind):
    """A float64 model (eval mode) and one batch."""
    g = torch.Generator().manual_seed(3)
    if kind == "smooth":   # no kinks: the rho -> 0 limits hold
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
        return model.eval(), [(torch.randn(16, 4, generator=g, dtype=torch.float64),
                               torch.randint(0, 3, (16,), generator=g))]
    if kind == "mlp":
        return mlp(d_in=4, width=5, n_cls=3).double().eval(), [(torch.randn(16, 4, generator=g, dtype=torch.float64),
                                                                 torch.randint(0, 3, (16,), generator=g))]
    if kind == "cnn":   # BatchNorm in eval mode: running statistics
        model = SmallCNN().double()
        model.train()
        with torch.no_grad():
            model(torch.randn(32, 1, 6, 6, dtype=torch.float64))   # non-trivial running statistics
        return model.eval(), [(torch.randn(8, 1, 6, 6, generator=g, dtype=torch.float64),
                               torch.randint(0, 3, (8,), generator=g))]
    if kind == "transformer":
        return AttentionBlock().double().eval(), [(torch.randn(6, 5, 4, generator=g, dtype=torch.float64),
                                                   torch.randint(0, 3, (6,), generator=g))]
    raise ValueError(kind)


def dense(model, batch, curvature_kind="hessian", adaptive=True):
    """The dense ``C M C`` of the batch loss, float64."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    shapes, numels = [p.shape for p in params], [p.numel() for p in params]
    w0 = torch.cat([p.detach().reshape(-1) for p in params])
    x, y = batch

    def logits(w):
        return functional_call(model, {n: t.view(s) for n, t, s in zip(names, w.split(numels), shapes)}, (x,))

    # torch.autograd.functional, not torch.func: on torch 2.13 torch.func.hessian of these flat-vector
    # losses is not even symmetric for the attention block (4% off; the operator and classic
    # autograd agree with finite differences to 5e-9), so the reference takes the other machinery.
    with sdpa_kernel([SDPBackend.MATH]):   # the fused attention kernels have no double backward
        if curvature_kind == "hessian":
            M = torch.autograd.functional.hessian(lambda w: F.cross_entropy(logits(w), y), w0)
        else:
            out = logits(w0).detach()
            J = torch.autograd.functional.jacobian(logits, w0).reshape(-1, w0.numel())
            H_out = torch.autograd.functional.hessian(lambda o: F.cross_entropy(o.view_as(out), y), out.reshape(-1))
            M = J.T @ H_out @ J
    c = w0.abs() if adaptive else torch.ones_like(w0)
    return c[:, None] * M * c[None, :]


@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_eigenvalues_and_diagonal_match_the_dense_hessian(kind, adaptive):
    model, data = small(kind)
    A = dense(model, data[0], adaptive=adaptive)
    want = torch.linalg.eigvalsh(A).flip(0)
    r = curvature.hessian_eigenvalues(model, data, adaptive=adaptive, k=3, tol=1e-10)
    assert all(r.converged)
    assert r.values == pytest.approx(want[:3].tolist(), rel=1e-6, abs=1e-10)
    d = curvature.hessian_diagonal(model, data, adaptive=adaptive)
    got = torch.cat([v.reshape(-1) for v in d.values()])
    torch.testing.assert_close(got, torch.diagonal(A), rtol=0, atol=1e-10)


def test_the_gauss_newton_matrix_matches_its_dense_form():
    model, data = small("mlp")
    G = dense(model, data[0], "ggn", adaptive=False)
    assert torch.linalg.eigvalsh(G).min() > -1e-10   # PSD for cross-entropy
    r = curvature.hessian_eigenvalues(model, data, adaptive=False, curvature="ggn", k=2, tol=1e-10)
    assert r.values == pytest.approx(torch.linalg.eigvalsh(G).flip(0)[:2].tolist(), rel=1e-6)
    d = curvature.hessian_diagonal(model, data, adaptive=False, curvature="ggn")
    torch.testing.assert_close(torch.cat([v.reshape(-1) for v in d.values()]), torch.diagonal(G), rtol=0, atol=1e-10)


class _Attention(torch.nn.Module):
    """``nn.MultiheadAttention`` on continuous sequences: in eval mode, where nothing requires grad,
    PyTorch runs it on a fused kernel forward AD cannot push through."""

    def __init__(self, d=6, n_cls=3):
        super().__init__()
        torch.manual_seed(0)
        self.att, self.head = torch.nn.MultiheadAttention(d, 2, batch_first=True), torch.nn.Linear(d, n_cls)

    def forward(self, x):
        return self.head(self.att(x, x, x)[0].mean(1))


@pytest.mark.parametrize("which", ["multihead_attention", "transformer_encoder"])
def test_the_gauss_newton_matrix_of_pytorch_attention_modules_in_eval_mode(which):
    """``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` leave their inference fast path
    inside the products: every curvature function takes ``curvature="ggn"`` on them, and the
    matrix is the dense one."""
    g = torch.Generator().manual_seed(3)
    if which == "multihead_attention":
        model = _Attention().double().eval()
        data = [(torch.randn(4, 5, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))]
    else:
        model = TinyTransformer().double().eval()
        data = [(torch.randint(0, 11, (4, 5), generator=g), torch.randint(0, 3, (4,), generator=g))]
    G = dense(model, data[0], "ggn", adaptive=True)
    r = curvature.hessian_eigenvalues(model, data, curvature="ggn", k=2, tol=1e-10)
    assert r.values == pytest.approx(torch.linalg.eigvalsh(G).flip(0)[:2].tolist(), rel=1e-6)
    d = curvature.hessian_diagonal(model, data, curvature="ggn")
    torch.testing.assert_close(torch.cat([v.reshape(-1) for v in d.values()]), torch.diagonal(G), rtol=0, atol=1e-10)
    trace = curvature.hessian_trace(model, data, curvature="ggn", n_probes=200)
    assert abs(trace.value - float(torch.trace(G))) <= 5 * trace.stderr
    assert math.isfinite(curvature.adam_sharpness(model, data, curvature="ggn", n_probes=2).value)
    assert math.isfinite(curvature.renyi_sharpness(model, data, curvature="ggn", n_vectors=1, n_iter=4).value)
    assert torch.backends.mha.get_fastpath_enabled()   # the fast path is the user's again


@pytest.mark.parametrize("estimator", ["hutchinson", "hutch++"])
def test_trace_estimates_within_their_stderr_and_converge(estimator):
    model, data = small("mlp")
    exact = float(dense(model, data[0]).trace())
    errors = []
    for n_probes in (30, 120, 480):
        r = curvature.hessian_trace(model, data, n_probes=n_probes, estimator=estimator, seed=1)
        assert abs(r.value - exact) <= 4 * r.stderr + 1e-12
        errors.append(abs(r.value - exact))
        assert r.per_batch == [r.value] and r.n_probes == n_probes
    assert errors[-1] < errors[0]


def test_hutch_plus_plus_is_exact_once_its_sketch_spans_the_space():
    model, data = small("mlp")
    n = sum(p.numel() for p in model.parameters())
    r = curvature.hessian_trace(model, data, n_probes=3 * n + 3, estimator="hutch++")
    assert r.value == pytest.approx(float(dense(model, data[0]).trace()), rel=1e-9)


def test_estimated_diagonal_converges_to_the_exact_one():
    model, data = small("mlp")
    exact = torch.diagonal(dense(model, data[0]))
    errs = [float((torch.cat([v.reshape(-1) for v in curvature.hessian_diagonal(model, data, n_probes=k).values()])
                   - exact).norm()) for k in (8, 512)]
    assert errs[1] < 0.25 * errs[0]


def test_quadratic_loss_closed_form():
    """L(w) = 1/2 ||X w - y||^2 / B: H = X^T X / B exactly, whatever the point."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(5, 1, bias=False).double()
    x = torch.randn(20, 5, generator=g, dtype=torch.float64)
    y = torch.randn(20, 1, generator=g, dtype=torch.float64)
    loss = lambda out, t: 0.5 * ((out - t) ** 2).sum(1).mean()
    H = x.T @ x / 20
    kw = dict(adaptive=False, loss_fn=loss)
    assert curvature.hessian_eigenvalues(model, [(x, y)], k=5, **kw).values == \
        pytest.approx(torch.linalg.eigvalsh(H).flip(0).tolist(), rel=1e-9)
    assert curvature.hessian_trace(model, [(x, y)], n_probes=18, **kw).value == pytest.approx(float(H.trace()), rel=1e-9)
    # the GGN of a squared loss on a linear model is the Hessian
    assert curvature.hessian_eigenvalues(model, [(x, y)], k=1, curvature="ggn", **kw).values[0] == \
        pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-9)


def test_diagonal_linear_network_at_zero_loss():
    """beta = u * v, L = 1/2 ||X beta - y||^2 with X^T X = I at a zero-loss point: the Hessian is
    block-diagonal with 2x2 blocks [[v^2, uv], [uv, u^2]] (eigenvalues u^2 + v^2 and 0)."""
    g = torch.Generator().manual_seed(0)
    d = 4
    u, v = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    model = DiagonalLinearNetwork(u, v)
    X = torch.eye(d, dtype=torch.float64)
    y = X @ (u * v)
    data = [(X, y)]
    kw = dict(adaptive=False, loss_fn=half_squared_error)
    top = (u ** 2 + v ** 2).sort(descending=True).values
    r = curvature.hessian_eigenvalues(model, data, k=d, tol=1e-12, **kw)
    assert r.values == pytest.approx(top.tolist(), rel=1e-9)
    diag = curvature.hessian_diagonal(model, data, **kw)
    torch.testing.assert_close(diag["u"], v ** 2, rtol=0, atol=1e-12)
    torch.testing.assert_close(diag["v"], u ** 2, rtol=0, atol=1e-12)
    # with c = |w|: C H C has blocks [[u^2 v^2, |u v| u v], ...]: trace 2 sum u^2 v^2
    assert curvature.hessian_trace(model, data, n_probes=30, adaptive=True, loss_fn=half_squared_error).value == \
        pytest.approx(float(2 * (u ** 2 * v ** 2).sum()), rel=1e-9)


def test_average_sharpness_tends_to_half_the_trace():
    """S_avg(rho) / rho^2 -> tr(C H C) / 2 as rho -> 0 (antithetic pairs cancel the gradient term)
    for a smooth network (a ReLU network's kinks add a term linear in rho)."""
    model, data = small("smooth")
    A = dense(model, data[0])
    exact = curvature.hessian_trace(model, data, n_probes=3 * sum(p.numel() for p in model.parameters()) + 3).value
    assert exact == pytest.approx(float(A.trace()), rel=1e-9)
    n_pairs = 1000   # the Monte Carlo error of (1/n) sum xi^T A xi / 2 over Gaussian xi: sqrt(2) ||A||_F / 2 sqrt(n)
    stderr = math.sqrt(2) * float(torch.linalg.norm(A)) / 2 / math.sqrt(n_pairs)
    for rho in (1e-2, 1e-3):
        ratio = sharpfast.average_sharpness(model, data, rho=rho, n_samples=2 * n_pairs, antithetic=True, seed=2,
                                            backend="reference").sharpness / rho ** 2
        assert abs(ratio - exact / 2) <= 4 * stderr


def test_the_operator_through_nn_transformer_encoder_layer_matches_finite_differences():
    """nn.TransformerEncoderLayer (fused attention, fast paths): the products against central
    differences of the gradient, and symmetric."""
    from sharpfast.curvature.operator import CurvatureOperator
    from sharpfast.objective import Objective
    from sharpfast.params import ModelGuard, ParamSet, ScaleSpec
    model = TinyTransformer().double().eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 11, (6, 5), generator=g), torch.randint(0, 3, (6,), generator=g)
    params = ParamSet(model, ScaleSpec(adaptive=False))
    with ModelGuard(model):
        A = CurvatureOperator(model, params, Objective(), x, y)
        u, v = (torch.randn(A.n, generator=g, dtype=torch.float64) for _ in range(2))
        Av = A.matvec(v)
        assert float(u @ Av) == pytest.approx(float(v @ A.matvec(u)), rel=1e-9)
        names, numels, shapes = params.names, params.numels, [p.shape for p in params.tensors]
        loss = lambda w: F.cross_entropy(functional_call(
            model, {n: t.view(s) for n, t, s in zip(names, w.split(numels), shapes)}, (x,)), y)
        eps = 1e-5
        fd = (torch.func.grad(loss)(A.w + eps * v) - torch.func.grad(loss)(A.w - eps * v)) / (2 * eps)
        assert float((fd - Av).norm() / fd.norm()) < 1e-7
        torch.testing.assert_close(A.matvec(torch.stack([u, v], 1))[:, 1], Av, rtol=1e-10, atol=1e-12)


def test_m_batches_are_measured_one_by_one_and_averaged():
    model, data = small("mlp")
    g = torch.Generator().manual_seed(9)
    data = data + [(torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))]
    per = [curvature.hessian_eigenvalues(model, [b], tol=1e-10).values[0] for b in data]
    both = curvature.hessian_eigenvalues(model, data, tol=1e-10)
    assert [b[0] for b in both.per_batch] == pytest.approx(per, rel=1e-9)
    assert both.values[0] == pytest.approx(sum(per) / 2, rel=1e-9)
    exact = [float(dense(model, b).trace()) for b in data]
    n = sum(p.numel() for p in model.parameters())
    assert curvature.hessian_trace(model, data, n_probes=3 * n + 3).value == pytest.approx(sum(exact) / 2, rel=1e-9)


def test_model_restored_and_probes_reproducible():
    model, data = small("cnn")
    model.train()
    snapshot = copy.deepcopy(model.state_dict())
    a = curvature.hessian_trace(model, data, n_probes=12, seed=5, estimator="hutchinson")
    b = curvature.hessian_trace(model, data, n_probes=12, seed=5, estimator="hutchinson")
    assert a.value == b.value and a.value != curvature.hessian_trace(model, data, n_probes=12, seed=6,
                                                                     estimator="hutchinson").value
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())


def test_eigenvectors_have_the_parameters_shapes():
    model, data = small("mlp")
    r = curvature.hessian_eigenvalues(model, data, k=2, tol=1e-10, return_vectors=True)
    vecs = r.vectors[0]
    assert [tuple(v.shape[1:]) for v in vecs.values()] == [tuple(p.shape) for p in model.parameters()]
    flat = torch.cat([v.reshape(2, -1) for v in vecs.values()], dim=1)
    A = dense(model, data[0])
    torch.testing.assert_close(flat @ A @ flat.T, torch.diag(torch.tensor(r.values, dtype=torch.float64)),
                               rtol=1e-6, atol=1e-9)


def test_bad_input_is_refused_by_name():
    model, data = small("mlp")
    with pytest.raises(ValueError, match="unknown curvature"):
        curvature.hessian_trace(model, data, curvature="fisher")
    with pytest.raises(ValueError, match="unknown estimator"):
        curvature.hessian_trace(model, data, estimator="slq")
    with pytest.raises(ValueError, match="n_probes must be a positive integer"):
        curvature.hessian_trace(model, data, n_probes=0)
    with pytest.raises(ValueError, match="tol must be a positive number"):
        curvature.hessian_eigenvalues(model, data, tol=0)
    with pytest.raises(ValueError, match="data is empty"):
        curvature.hessian_trace(model, [])
    big = torch.nn.Linear(300, 200)
    with pytest.raises(ValueError, match="pass n_probes= for an estimate"):
        curvature.hessian_diagonal(big, [(torch.randn(2, 300), torch.randint(0, 200, (2,)))])
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_iters'"):
        curvature.hessian_trace(model, data, n_iters=3)


class NaNForward(torch.nn.Module):
    """A model whose forward returns NaN (a diverged network)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3).double()

    def forward(self, x):
        return self.lin(x) * float("nan")


def test_nan_outputs_empty_batches_and_too_many_eigenvalues_are_refused():
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    for fn in (curvature.hessian_trace, curvature.adam_sharpness, curvature.hessian_diagonal,
               curvature.hessian_eigenvalues, curvature.hessian_spectrum, curvature.renyi_sharpness):
        with pytest.raises(ValueError, match=r"the loss is not finite \(nan\) at the weights \(batch 0\)"):
            fn(NaNForward(), [(x, y)])
    model, data = small("mlp")
    empty = [(data[0][0][:0], data[0][1][:0])]
    for fn in (curvature.hessian_trace, curvature.hessian_eigenvalues):
        with pytest.raises(ValueError, match="batch 0 has no examples"):
            fn(model, empty)
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=f"k={n + 5} eigenvalues asked of a {n}-dimensional C H C"):
        curvature.hessian_eigenvalues(model, data, k=n + 5)
    # all of them: the ReLU network's Hessian has a 13-fold zero eigenvalue, which one Krylov space
    # sees once; Lanczos continues in its orthogonal complement and finds every copy
    every = curvature.hessian_eigenvalues(model, data, k=n, tol=1e-10)
    want = torch.linalg.eigvalsh(dense(model, data[0])).flip(0)
    assert every.values == pytest.approx(want.tolist(), abs=1e-9)


def linear_quadratic(eigenvalues):
    """A bias-free linear model under 1/2 ||X w - y||^2 / B whose Hessian X^T X / B has the given
    eigenvalues (X = sqrt(B) Q diag(sqrt(lambda)) with Q orthogonal)."""
    n = len(eigenvalues)
    g = torch.Generator().manual_seed(4)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    B = n
    x = math.sqrt(B) * Q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64).sqrt())
    y = torch.randn(B, 1, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(n, 1, bias=False).double()
    loss = lambda out, t: 0.5 * ((out - t) ** 2).sum(1).mean()
    return model, [(x, y)], dict(adaptive=False, loss_fn=loss)


def test_spectrum_quadrature_is_exact_for_polynomials_and_integrates_to_one():
    lam = [0.5, 1.0, 2.0, 4.0, 7.0]
    model, data, kw = linear_quadratic(lam)
    spec = curvature.hessian_spectrum(model, data, n_vectors=3, n_iter=10, **kw)
    nodes = torch.cat(spec.nodes[0])
    for x in lam:   # each probe's Krylov space is the whole space: the nodes are the eigenvalues
        assert float((nodes - x).abs().min()) < 1e-9
    # (1/n) tr f(A) per probe is q^T f(A) q / |q|^2; averaged over probes it estimates the mean of f(lambda)
    assert all(float(w.sum()) == pytest.approx(1.0, abs=1e-12) for w in spec.weights[0])
    grid, dens = spec.density(sigma=0.05)
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, rel=1e-3)
    many = curvature.hessian_spectrum(model, data, n_vectors=400, n_iter=10, **kw)
    assert many.trace_of(lambda x: x) == pytest.approx(sum(lam), rel=0.05)
    assert many.trace_of(lambda x: x ** 2) == pytest.approx(sum(v * v for v in lam), rel=0.08)


def test_spectrum_plot(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    model, data, kw = linear_quadratic([1.0, 2.0, 3.0])
    ax = curvature.hessian_spectrum(model, data, n_vectors=2, n_iter=5, **kw).plot()
    ax.figure.savefig(tmp_path / "esd.png")
    assert (tmp_path / "esd.png").stat().st_size > 1000


def test_renyi_sharpness_closed_forms():
    # a flat spectrum: P is uniform, log tr(P^alpha) / (alpha - 1) = -log n for every probe and alpha
    model, data, kw = linear_quadratic([2.0] * 6)
    for alpha in (2.0, 0.5, 3.0):
        r = curvature.renyi_sharpness(model, data, alpha=alpha, n_vectors=2, n_iter=10, **kw)
        assert r.value == pytest.approx(-math.log(6), rel=1e-9) and r.negative_mass == [0.0]
    # a spread spectrum, alpha = 2: log sum p_i^2, estimated from the quadrature
    lam = [0.5, 1.0, 2.0, 4.0, 8.0]
    p = torch.tensor(lam) / sum(lam)
    model, data, kw = linear_quadratic(lam)
    r = curvature.renyi_sharpness(model, data, alpha=2.0, n_vectors=400, n_iter=10, **kw)
    assert r.value == pytest.approx(float(torch.log((p ** 2).sum())), abs=0.1)
    with pytest.raises(ValueError, match="alpha must be a positive number other than 1"):
        curvature.renyi_sharpness(model, data, alpha=1.0, **kw)


def test_renyi_reports_the_negative_part_of_an_indefinite_hessian():
    model, data = small("mlp")
    A = dense(model, data[0], adaptive=False)
    assert torch.linalg.eigvalsh(A).min() < 0   # a random point: indefinite
    r = curvature.renyi_sharpness(model, data, adaptive=False, n_vectors=4, n_iter=40)
    assert 0 < r.negative_mass[0] < 1 and math.isfinite(r.value)
    g = curvature.renyi_sharpness(model, data, adaptive=False, curvature="ggn", n_vectors=4, n_iter=40)
    assert g.negative_mass[0] < 1e-9


def test_adam_sharpness_closed_forms():
    """The DLN at zero loss: diag H = (v^2, u^2), so tr(diag(H)^{1/2}) = sum |u| + |v|; with c = |w|
    it is sum 2 |u v|."""
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    model = DiagonalLinearNetwork(u, v)
    data = [(torch.eye(5, dtype=torch.float64), u * v)]
    r = curvature.adam_sharpness(model, data, adaptive=False, loss_fn=half_squared_error)
    assert r.exact and r.value == pytest.approx(float(u.abs().sum() + v.abs().sum()), rel=1e-12)
    assert r.negative == [0.0]
    r = curvature.adam_sharpness(model, data, adaptive=True, loss_fn=half_squared_error)
    assert r.value == pytest.approx(float(2 * (u * v).abs().sum()), rel=1e-12)
    # estimated: converges to the exact value from below-ish as probes grow (the square root is biased)
    est = curvature.adam_sharpness(model, data, adaptive=False, loss_fn=half_squared_error, n_probes=2000)
    assert not est.exact and est.value == pytest.approx(float(u.abs().sum() + v.abs().sum()), rel=0.05)


def test_adam_sharpness_counts_negative_diagonal_entries():
    model, data = small("mlp")
    d = torch.diagonal(dense(model, data[0], adaptive=False))
    r = curvature.adam_sharpness(model, data, adaptive=False)
    assert r.value == pytest.approx(float(d.clamp(min=0).sqrt().sum()), rel=1e-9)
    assert r.negative[0] == pytest.approx(float((d < 0).double().mean()))


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_the_graph_products_and_forward_over_reverse_agree(kind):
    """The default Hessian product (a batched backward through the gradient's graph) and the
    fallback (forward-over-reverse, for models without a double backward) give the same vectors."""
    from sharpfast.curvature.operator import CurvatureOperator
    from sharpfast.objective import Objective
    from sharpfast.params import ModelGuard, ParamSet, ScaleSpec
    model, data = small(kind)
    params = ParamSet(model, ScaleSpec(adaptive=True))
    with ModelGuard(model):
        A = CurvatureOperator(model, params, Objective(), *data[0])
        V = torch.randn(A.n, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        through_graph = A.matvec(V)
        assert A._graph not in (None, False)
        A._graph = False
        torch.testing.assert_close(A.matvec(V), through_graph, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(A.matvec(V[:, 2]), through_graph[:, 2], rtol=1e-10, atol=1e-12)


def test_half_precision_models_are_measured_on_a_float32_copy():
    """The precision policy holds here too: a bf16 model's curvature is its float32 copy's, and
    the model is left in bf16, untouched."""
    torch.manual_seed(0)
    model = mlp(d_in=4, width=5, n_cls=3).to(torch.bfloat16)
    data = [(torch.randn(16, 4).to(torch.bfloat16), torch.randint(0, 3, (16,)))]
    before = [p.detach().clone() for p in model.parameters()]
    r = curvature.hessian_eigenvalues(model, data, k=2, tol=1e-6)
    as_float = copy.deepcopy(model).float()
    want = curvature.hessian_eigenvalues(as_float, [(x.float(), y) for x, y in data], k=2, tol=1e-6)
    assert r.values == pytest.approx(want.values, rel=1e-6)
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="bfloat16"):
        curvature.hessian_trace(model, data, low_precision="error")


class InfiniteCurvature(torch.nn.Module):
    """Finite outputs whose Hessian is not: sqrt|x w| at w = 0."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))

    def forward(self, x):
        return (x @ self.w).abs().sqrt()


def test_curvature_products_that_are_not_finite_are_refused_by_name():
    """A finite loss with a divergent curvature: a ValueError naming it, not torch's _LinAlgError
    from the Lanczos matrix, nor a NaN."""
    data = [(torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))]
    for fn in (curvature.hessian_eigenvalues, curvature.renyi_sharpness, curvature.hessian_spectrum,
               curvature.hessian_trace, curvature.adam_sharpness):
        with pytest.raises(ValueError, match="the curvature's products are not finite at the weights"):
            fn(InfiniteCurvature(), data, adaptive=False)
