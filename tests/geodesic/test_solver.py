"""Geodesic sharpness (DESIGN.md §2c.6): invariance where adaptive sharpness moves, the reduction to
the scaled adaptive solver, random starts, the diagonal linear network's closed forms, the rho -> 0
limit, restoration, half precision, the warnings, bad input and the fast path's memory."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sharpfast
from sharpfast import GLBlock
from sharpfast.geodesic import blocks as gl
from sharpfast.geodesic.batched import BatchedGeometry
from sharpfast.geodesic.reference import ReferenceGeometry
from sharpfast.params import ParamSet
from sharpfast.study.experiments.diagonal_networks import DiagonalNetwork as Diagonal   # y = X (u * v)
from tests.geodesic.models import METRICS, Attention, act, attention_data, bert_data, geometry, sse, tiny_bert


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_invariant_under_the_symmetry_where_adaptive_sharpness_moves(attention_model, metric, backend):
    """DESIGN.md §2c (checked): per-head A of scales 1e-2 .. 1e2 leave the function and the geodesic
    sharpness unchanged (float64, eps = 0); adaptive sharpness moves."""
    blocks = sharpfast.find_gl_blocks(attention_model)
    data = attention_data()
    for seed in (0, 1):
        moved = act(attention_model, blocks, seed=seed)
        x = data[0][0]
        torch.testing.assert_close(moved(x), attention_model(x), rtol=1e-9, atol=1e-11)
        a, b = (sharpfast.geodesic_sharpness(m, data, rho=0.1, metric=metric, eps=0.0, backend=backend)
                for m in (attention_model, moved))
        assert a.sharpness > 0
        assert b.sharpness == pytest.approx(a.sharpness, rel=1e-7)
        assert b.per_batch == pytest.approx(a.per_batch, rel=1e-7)
        adaptive = [sharpfast.worst_case_sharpness(m, data, rho=0.1, norm="l2", solver="scaled").sharpness
                    for m in (attention_model, moved)]
        assert not adaptive[1] == pytest.approx(adaptive[0], rel=0.05)


@pytest.mark.parametrize("metric", METRICS)
def test_invariant_on_a_hugging_face_bert(metric):
    model = tiny_bert()
    blocks = sharpfast.find_gl_blocks(model)
    assert len(blocks) == 4   # 2 layers x (query/key, value/output)
    data = bert_data()
    moved = act(model, blocks, seed=5)
    x = data[0][0]
    model.eval(), moved.eval()
    torch.testing.assert_close(moved(**x).logits, model(**x).logits, rtol=1e-9, atol=1e-11)
    a, b = (sharpfast.geodesic_sharpness(m, data, rho=0.05, metric=metric, eps=0.0, n_iters=10) for m in (model, moved))
    assert b.sharpness == pytest.approx(a.sharpness, rel=1e-6)
    adaptive = [sharpfast.worst_case_sharpness(m, data, rho=0.05, norm="l2", solver="scaled", n_iters=10).sharpness
                for m in (model, moved)]
    assert not adaptive[1] == pytest.approx(adaptive[0], rel=0.05)


@pytest.mark.parametrize("which", ["mlp", "cnn", "attention"])
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_reduction_to_the_scaled_solver(which, backend):
    """DESIGN.md §2c (checked): ``blocks=[], second_order=False`` equals ``worst_case_sharpness(norm="l2",
    adaptive=True, solver="scaled")``, float64 to 1e-9 (a BatchNorm CNN in eval mode included)."""
    from tests import toy_models
    torch.manual_seed(0)
    if which == "mlp":
        model = toy_models.mlp(d_in=6).double()
        data = [(torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))) for _ in range(3)]
    elif which == "cnn":
        model = toy_models.SmallCNN().double()
        data = [(torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))) for _ in range(2)]
    else:
        model, data = Attention().double(), attention_data(n_batches=3)
    for rho in (0.01, 0.5):
        geo = sharpfast.geodesic_sharpness(model, data, rho=rho, blocks=[], second_order=False, backend=backend)
        # the same backend: a loss equal to the last bit at two iterates decides which is the best point
        ref = sharpfast.worst_case_sharpness(model, data, rho=rho, norm="l2", adaptive=True, solver="scaled",
                                             backend=backend)
        assert geo.per_batch == pytest.approx(ref.per_batch, rel=1e-9)
        assert geo.err_sharpness == pytest.approx(ref.err_sharpness, abs=1e-12)
        assert geo.delta_norm == pytest.approx(ref.delta_norm, rel=1e-9)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_random_restarts_reduce_to_the_scaled_solvers(backend):
    """With random starts too (the same Philox draws, made isotropic in the metric: ``c z`` outside
    the blocks), ``blocks=[], second_order=False`` is the scaled solver, restart by restart."""
    torch.manual_seed(0)
    model, data = Attention().double(), attention_data(n_batches=2)
    geo = sharpfast.geodesic_sharpness(model, data, rho=0.3, blocks=[], second_order=False, init="random",
                                       n_restarts=3, backend=backend)
    ref = sharpfast.worst_case_sharpness(model, data, rho=0.3, norm="l2", solver="scaled", init="random",
                                         n_restarts=3, backend=backend)
    assert geo.per_batch == pytest.approx(ref.per_batch, rel=1e-9)
    assert geo.restarts_improved == ref.restarts_improved


@pytest.mark.parametrize("metric", METRICS)
def test_random_starts_lie_on_the_horizontal_sphere_and_restarts_only_add(attention_model, metric):
    from sharpfast.geodesic.solver import random_start
    s = sharpfast.GeodesicSettings(rho=0.2, metric=metric, init="random", n_restarts=2)
    geo, _ = geometry(BatchedGeometry, attention_model, sharpfast.find_gl_blocks(attention_model), metric)
    ref, _ = geometry(ReferenceGeometry, attention_model, sharpfast.find_gl_blocks(attention_model), metric)
    xi = random_start(geo, s, stream=0, start=1)
    torch.testing.assert_close(xi, random_start(ref, s, stream=0, start=1), rtol=1e-10, atol=1e-12)
    assert float(geo.norm(xi)) == pytest.approx(0.2, rel=1e-12)
    torch.testing.assert_close(geo.horizontal(xi), xi, rtol=1e-9, atol=1e-12)
    # M^-1/2 z has the metric norm ||z|| over the coordinates the metric counts (blocks, and c > 0)
    counted = geo.c_rest > 0
    for group in gl.resolve(sharpfast.find_gl_blocks(attention_model), ParamSet(attention_model)):
        counted[group.g.reshape(-1)] = counted[group.hh.reshape(-1)] = True
    z = torch.randn(xi.numel(), dtype=torch.float64)
    for g in (geo, ref):
        assert float(g.norm(g.whiten(z))) == pytest.approx(float(z[counted].norm()), rel=1e-10)
    data = attention_data()
    one = sharpfast.geodesic_sharpness(attention_model, data, rho=0.2, metric=metric, init="random")
    two = sharpfast.geodesic_sharpness(attention_model, data, rho=0.2, metric=metric, init="random", n_restarts=2)
    assert all(b >= a for a, b in zip(one.per_batch, two.per_batch))
    with pytest.raises(ValueError, match="needs init='random'"):
        sharpfast.geodesic_sharpness(attention_model, data, rho=0.2, n_restarts=2)
    with pytest.raises(ValueError, match="init='zero' or 'random'"):
        sharpfast.geodesic_sharpness(attention_model, data, rho=0.2, init="eigen")


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_diagonal_network_closed_forms(backend):
    """DESIGN.md §2c (checked), X^T X = I: mix ``S = 2 sqrt2 rho ||beta0 - beta*|| + 2 rho^2`` (to the
    second-order map's O(rho^3)); inv, the trust-region maximum of ``4 b^T r + 4 b^T D b`` over
    ``||b|| <= rho / sqrt2`` (to O(rho^3)), whose first order is ``2 sqrt2 rho ||beta0 (beta0 - beta*)||``."""
    from scipy.optimize import brentq
    g = torch.Generator().manual_seed(0)
    n, d = 12, 5
    X, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    beta_star = torch.randn(d, generator=g, dtype=torch.float64)
    model = Diagonal(torch.rand(d, generator=g, dtype=torch.float64) + 0.5,
                     torch.randn(d, generator=g, dtype=torch.float64))
    beta0 = (model.u * model.v).detach()
    r = beta0 * (beta0 - beta_star)
    D = beta0 * (2 * beta0 - beta_star)
    blocks = [GLBlock("u", "v", elementwise=True)]
    for rho in (1e-2, 1e-3):
        S = {metric: sharpfast.geodesic_sharpness(model, [(X, X @ beta_star)], rho=rho, metric=metric, blocks=blocks,
                                                  eps=0.0, loss_fn=sse, n_iters=100, backend=backend).sharpness
             for metric in METRICS}
        mix = 2 * math.sqrt(2) * rho * float((beta0 - beta_star).norm()) + 2 * rho**2
        assert S["mix"] == pytest.approx(mix, rel=2 * rho**2)
        t = rho / math.sqrt(2)   # the trust region's maximizer b(mu) = 2 r / (mu - 4 D), ||b|| = t
        b_of = lambda mu: 2 * r / (mu - 4 * D)
        mu = brentq(lambda mu: float(b_of(mu).norm()) - t, float(4 * D.max()) + 1e-12, 1e6)
        b = b_of(mu)
        inv = float(4 * b @ r + 4 * b @ (D * b))
        assert S["inv"] == pytest.approx(inv, rel=5 * rho**2)
        assert S["inv"] == pytest.approx(2 * math.sqrt(2) * rho * float(r.norm()), rel=2 * rho)


@pytest.mark.parametrize("metric", METRICS)
def test_small_rho_limit_is_the_horizontal_riemannian_gradient_norm(attention_model, metric):
    """``S / rho -> sqrt(g^T M^-1 g)`` on the horizontal space as rho -> 0 (one batch, float64)."""
    data = attention_data(n_batches=1)
    blocks = sharpfast.find_gl_blocks(attention_model)
    geo, params = geometry(BatchedGeometry, attention_model, blocks, metric)
    x, y = data[0]
    loss = nn.functional.cross_entropy(attention_model(x), y)
    grad = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params.tensors)])
    limit = float(geo.norm(geo.horizontal(geo.riemannian(grad))))
    ratios = [sharpfast.geodesic_sharpness(attention_model, data, rho=rho, metric=metric, eps=0.0).sharpness / rho
              for rho in (1e-3, 1e-4)]
    assert ratios[0] == pytest.approx(limit, rel=2e-2)
    assert ratios[1] == pytest.approx(limit, rel=2e-3)
    assert abs(ratios[1] / limit - 1) < abs(ratios[0] / limit - 1)


def test_model_is_restored_and_float32_backends_agree(attention_model):
    model = attention_model.float()
    data = [(x.float(), y) for x, y in attention_data()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    results = [sharpfast.geodesic_sharpness(model, data, rho=0.1, metric=m, backend=b, normalize_logits=True)
               for m in METRICS for b in ("reference", "fused")]
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for ref, fast in (results[:2], results[2:]):
        assert fast.sharpness == pytest.approx(ref.sharpness, rel=1e-3, abs=1e-6)
        assert fast.kind == "geodesic" and fast.settings["metric"] in METRICS
    assert results[0].err_sharpness is not None


def test_half_precision_is_measured_in_float32(attention_model):
    model = attention_model.to(torch.bfloat16)
    data = [(x.to(torch.bfloat16), y) for x, y in attention_data()]
    r = sharpfast.geodesic_sharpness(model, data, rho=0.1)
    assert math.isfinite(r.sharpness) and r.sharpness > 0
    with pytest.raises(ValueError, match="bfloat16|precision"):
        sharpfast.geodesic_sharpness(model, data, rho=0.1, low_precision="error")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(metric="euclid"), ValueError, "unknown metric"),
    (dict(norm="linf"), TypeError, "norm"),
    (dict(rho=0.0), ValueError, "rho"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(blocks="all"), ValueError, "blocks"),
    (dict(blocks=[("att.in_proj_weight", "att.out_proj.weight")]), TypeError, "GLBlock"),
    (dict(blocks=[GLBlock("att.nope", "head.weight")]), ValueError, "att.nope"),
    (dict(blocks=[GLBlock("head.weight", "head.weight")]), ValueError, "overlap"),
    (dict(blocks=[GLBlock("att.out_proj.weight", "head.weight", heads=3)]), ValueError, "multiple of heads"),
    (dict(blocks=[GLBlock("head.bias", "norm.weight", elementwise=True)]), ValueError, "shape"),
])
def test_bad_input_is_a_clear_error(attention_model, kwargs, error, match):
    kwargs = {"rho": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        sharpfast.geodesic_sharpness(attention_model, attention_data(), **kwargs)


def test_a_correction_larger_than_the_step_is_reported_and_warned(attention_model):
    """``geodesic_correction`` is ``||Gamma/2|| / ||xi||`` at the best point: 0 without the correction,
    O(rho) at small rho, and a warning once the second-order map leaves its domain (a diagonal
    network's near-zero factor under the mix metric)."""
    data = attention_data()
    assert sharpfast.geodesic_sharpness(attention_model, data, rho=0.1, second_order=False).geodesic_correction == 0
    small = sharpfast.geodesic_sharpness(attention_model, data, rho=1e-3).geodesic_correction
    assert 0 < small < 1e-2
    model = Diagonal(torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 1e-6], dtype=torch.float64))
    X, y = torch.eye(2, dtype=torch.float64), torch.tensor([2.0, 1.0], dtype=torch.float64)
    with pytest.warns(sharpfast.GeodesicCorrectionWarning, match="second-order term"):
        r = sharpfast.geodesic_sharpness(model, [(X, y)], rho=0.1, metric="mix", eps=0.0, loss_fn=sse,
                                         blocks=[GLBlock("u", "v", elementwise=True)])
    assert r.geodesic_correction > 1


def test_a_model_without_gl_blocks_is_said_and_counted(attention_model):
    """``blocks="auto"`` on a model without attention finds no block: the value is the adaptive
    worst case, a warning says so and ``gl_blocks`` is 0; ``blocks=[]`` asks for it without a word."""
    import warnings
    from tests import toy_models
    model, data = toy_models.model_and_data("mlp")
    model, data = model.double(), [(x.double(), y) for x, y in data]
    with pytest.warns(sharpfast.geodesic.NoGLBlockWarning, match="no GL block found in Sequential.*blocks=\\[\\]"):
        r = sharpfast.geodesic_sharpness(model, data, rho=0.1, n_iters=3)
    assert r.gl_blocks == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", sharpfast.geodesic.NoGLBlockWarning)
        assert sharpfast.geodesic_sharpness(model, data, rho=0.1, n_iters=3, blocks=[]).per_batch == r.per_batch
        assert sharpfast.geodesic_sharpness(attention_model, attention_data(), rho=0.1, n_iters=3).gl_blocks == 2


def test_evaluate_many_takes_geodesic_settings_one_model_at_a_time():
    torch.manual_seed(0)
    models = [Attention().double() for _ in range(3)]
    data = attention_data()
    s = sharpfast.GeodesicSettings(rho=0.1, metric="inv", n_iters=5)
    for stack in (None, 3):
        got = sharpfast.evaluate_many(models, data, s, stack=stack)
        for m, r in zip(models, got):
            assert r.per_batch == sharpfast.evaluate_sharpness(m, data, s).per_batch and r.kind == "geodesic"


class _AttentionStack(nn.Module):
    """Attention layers between small MLPs: half the parameters in GL blocks, the activations of a
    short sequence small next to the parameters."""

    def __init__(self, d=64, layers=4):
        super().__init__()
        self.att = nn.ModuleList(nn.MultiheadAttention(d, 4, batch_first=True) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.Tanh(), nn.Linear(2 * d, d))
                                 for _ in range(layers))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        for att, mlp in zip(self.att, self.mlp):
            x = x + att(x, x, x, need_weights=False)[0]
            x = x + mlp(x)
        return self.head(x.mean(1))


@pytest.mark.parametrize("kwargs, blocks_factor", [
    (dict(blocks=[]), 0), (dict(metric="mix"), 11), (dict(metric="inv"), 11),
    (dict(metric="mix", second_order=False), 8), (dict(metric="inv", init="random", n_restarts=2), 13),
])
def test_parameter_sized_buffers_of_the_fast_path(kwargs, blocks_factor):
    """DESIGN.md §5: 11 parameter-sized buffers (the weights and gradient the model views, w0, the
    scale outside the blocks and its inverse, xi, xi_prev, the best xi and its gradient, the
    gradient at the current point and the step's new vector), plus block-sized ones (the stacked
    factors and a product of them, the int32 indices, a step's temporaries): at most
    ``blocks_factor`` times the blocks' share of the parameters (b = 1/2 here)."""
    from tests.memory_probe import peak_cpu_bytes
    torch.manual_seed(0)
    model = _AttentionStack()
    n = sum(p.numel() for p in model.parameters())
    b = sum(p.numel() for att in model.att for p in att.parameters()) / n
    data = [(torch.randn(2, 4, 64), torch.randint(0, 10, (2,))) for _ in range(2)]
    peak = peak_cpu_bytes(lambda: sharpfast.geodesic_sharpness(model, data, rho=0.05, n_iters=6, **kwargs))
    assert 10.5 < peak / (4 * n) <= 11.35 + blocks_factor * b
