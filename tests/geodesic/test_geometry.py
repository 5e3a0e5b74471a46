"""The geometry (DESIGN.md §2c.3-5), both backends: the horizontal projection is the metric
projection, the perturbed product is invariant, the batched geometry equals the reference, the
second-order map follows the exact geodesics, and singular Gram matrices need eps."""
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
from sharpfast.study.experiments.diagonal_networks import DiagonalNetwork as Diagonal   # y = X (u * v)
from tests.geodesic.models import METRICS, GEOMETRIES, Attention, act, attention_data, geometry, random_group_element, vertical


@pytest.mark.parametrize("Geo", GEOMETRIES)
@pytest.mark.parametrize("metric", METRICS)
def test_horizontal_projection_is_the_metric_projection(attention_model, Geo, metric):
    """Idempotent, horizontal (DESIGN.md §2c.4's conditions), metric-orthogonal, and zero on vertical vectors."""
    blocks = sharpfast.find_gl_blocks(attention_model)
    geo, params = geometry(Geo, attention_model, blocks, metric)
    g = torch.Generator().manual_seed(1)
    xi = torch.randn(params.numel, generator=g, dtype=torch.float64)
    eta = torch.randn(params.numel, generator=g, dtype=torch.float64)
    h = geo.horizontal(xi)
    torch.testing.assert_close(geo.horizontal(h), h, rtol=1e-10, atol=1e-12)
    inner = lambda a, b: (geo.sq_norm(a + b) - geo.sq_norm(a - b)) / 4   # polarization
    assert abs(float(inner(xi - h, geo.horizontal(eta)))) < 1e-10 * float(geo.norm(xi) * geo.norm(eta))
    assert float(geo.norm(geo.horizontal(vertical(attention_model, blocks)))) < 1e-9
    w0 = geo.w0
    for group in gl.resolve(blocks, params):
        for ig, ih in zip(group.g, group.hh):
            G, H, xG, xH = w0[ig], w0[ih], h[ig], h[ih]
            P, Q = G.T @ G, H.T @ H
            lhs, rhs = ((G.T @ xG @ Q, P @ xH.T @ H) if metric == "mix" else (xG.T @ G @ Q, P @ H.T @ xH))
            torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("Geo", GEOMETRIES)
@pytest.mark.parametrize("metric", METRICS)
def test_perturbed_product_is_invariant_under_the_group(attention_model, Geo, metric):
    """With eps = 0, ``G' H'^T`` (second-order map included) is the same for ``(G A^-1, H A^T)`` and
    the transported velocity ``(xG A^-1, xH A^T)``; the metric norm is invariant too."""
    blocks = sharpfast.find_gl_blocks(attention_model)
    moved = act(attention_model, blocks, seed=3)
    geo, params = geometry(Geo, attention_model, blocks, metric)
    geo2, _ = geometry(Geo, moved, blocks, metric)
    xi = 0.1 * geo.horizontal(torch.randn(params.numel, generator=torch.Generator().manual_seed(2),
                                          dtype=torch.float64))
    xi2 = xi.clone()
    gen = torch.Generator().manual_seed(3)   # the same A's as act(seed=3)
    for group in gl.resolve(blocks, params):
        for ig, ih in zip(group.g, group.hh):
            A = random_group_element(ig.shape[-1], generator=gen)
            xi2[ig], xi2[ih] = xi[ig] @ torch.linalg.inv(A), xi[ih] @ A.T
    torch.testing.assert_close(geo2.norm(xi2), geo.norm(xi), rtol=1e-9, atol=0)
    torch.testing.assert_close(geo2.horizontal(xi2), xi2, rtol=1e-7, atol=1e-9)
    v, _ = geo.retract(xi)
    v2, _ = geo2.retract(xi2)
    for group in gl.resolve(blocks, params):
        for ig, ih in zip(group.g, group.hh):
            # A's singular values span 1e-2 .. 1e2, so cond(P) reaches ~1e8: float64 rounding ~1e-8
            torch.testing.assert_close(v2[ig] @ v2[ih].T, v[ig] @ v[ih].T, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("eps", [0.0, 1e-3])
@pytest.mark.parametrize("second_order", [True, False])
def test_batched_geometry_equals_the_reference(metric, eps, second_order):
    """Every operation of the batched geometry against the head-by-head one: several shapes of
    heads (an attention layer, an elementwise pair), float64."""
    torch.manual_seed(0)

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(12, 3, batch_first=True)
            self.u, self.v = nn.Parameter(torch.randn(5) + 2), nn.Parameter(torch.randn(5) - 2)
            self.head = nn.Linear(12, 5)

    model = Mixed().double()
    blocks = sharpfast.find_gl_blocks(model) + [GLBlock("u", "v", elementwise=True)]
    ref, params = geometry(ReferenceGeometry, model, blocks, metric, eps, second_order)
    fast, _ = geometry(BatchedGeometry, model, blocks, metric, eps, second_order)
    g = torch.Generator().manual_seed(0)
    xi, grad = (torch.randn(params.numel, generator=g, dtype=torch.float64) for _ in range(2))
    for op in ("sq_norm", "riemannian", "horizontal"):
        torch.testing.assert_close(getattr(fast, op)(xi), getattr(ref, op)(xi), rtol=1e-10, atol=1e-12)
    (v_ref, pull_ref), (v_fast, pull_fast) = ref.retract(xi), fast.retract(xi)
    torch.testing.assert_close(v_fast, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pull_fast(grad.clone()), pull_ref(grad), rtol=1e-10, atol=1e-12)   # (may overwrite)
    torch.testing.assert_close(fast.project(10 * xi, 0.3), ref.project(10 * xi, 0.3), rtol=1e-10, atol=1e-12)
    assert abs(float(fast.norm(fast.project(10 * xi, 0.3))) - 0.3) < 1e-12


def test_elementwise_geodesics_match_the_exact_ones_to_third_order():
    """Diagonal network: the second-order map against the exact geodesics of DESIGN.md §2c (checked),
    inv ``(u e^b, v e^b)`` and mix ``(u sqrt(1 + 2b), v sqrt(1 + 2b))``: the error is O(|b|^3)."""
    torch.manual_seed(0)
    model = Diagonal(torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)).double()
    blocks = [GLBlock("u", "v", elementwise=True)]
    u0, v0 = model.u.detach(), model.v.detach()
    b = torch.randn(6, dtype=torch.float64)
    for metric, exact in (("inv", lambda t: torch.exp(t)), ("mix", lambda t: torch.sqrt(1 + 2 * t))):
        geo, _ = geometry(BatchedGeometry, model, blocks, metric)
        errors = []
        for t in (1e-1, 1e-2):
            v, _ = geo.retract(torch.cat([u0 * b * t, v0 * b * t]))
            errors.append(float((v - torch.cat([u0 * exact(b * t), v0 * exact(b * t)])).abs().max()))
        assert 500 < errors[0] / errors[1] < 2000   # 1000 = 10^3: third order
        assert abs(float(geo.norm(torch.cat([u0 * b, v0 * b]))) -
                   math.sqrt(2) * float((b if metric == "inv" else u0 * v0 * b).norm())) < 1e-12


def test_singular_gram_matrix_needs_eps():
    torch.manual_seed(0)
    model = Attention().double()
    with torch.no_grad():
        model.att.in_proj_weight[:4] = 0   # head 0's queries
        model.att.in_proj_bias[:4] = 0
    with pytest.raises(ValueError, match="singular.*eps"):
        sharpfast.geodesic_sharpness(model, attention_data(), rho=0.1, eps=0.0)
    assert math.isfinite(sharpfast.geodesic_sharpness(model, attention_data(), rho=0.1, eps=1e-6).sharpness)
