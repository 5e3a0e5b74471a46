"""The reference's definitions, options and invariants."""
import pytest
import torch
import torch.nn.functional as F

import sharpfast
from sharpfast.average_case import reference as average_reference
from sharpfast.worst_case import reference
from sharpfast.settings import AverageCaseSettings, WorstCaseSettings
from sharpfast.params import ModelGuard, ParamSet, ScaleSpec
from sharpfast.philox import RAND_INIT_SAMPLE_BASE, philox_draw
from tests.toy_models import MODEL_KINDS, SmallCNN, mlp, model_and_data


def run_reference(kind, model, data, on_iterate=None, **kw):
    defaults = dict(rho=0.1, norm="linf", backend="reference")
    defaults.update(kw)
    s = (WorstCaseSettings if kind == "worst" else AverageCaseSettings)(**defaults)
    params = s.bind(model)
    with ModelGuard(model):
        if kind == "worst":
            return reference.solve(model, data, params, s, on_iterate=on_iterate), params
        return average_reference.solve(model, data, params, s), params


def constraint_checker(rho, norm, tol=1e-5):
    seen = []

    def check(delta, c):
        if norm == "linf":
            for d, ci in zip(delta, c):
                assert torch.all(d.abs() <= rho * ci * (1 + tol) + 1e-30)
        else:
            assert reference.weighted_norm(delta, c) <= rho * (1 + tol)
        for d, ci in zip(delta, c):          # frozen coordinates never move
            assert torch.all(d[ci == 0] == 0)
        seen.append(1)
    return check, seen


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("scale_kind", ["adaptive", "standard", "custom", "weights_only", "eta"])
@pytest.mark.parametrize("rand_init", [False, True])
@pytest.mark.parametrize("rho", [5e-4, 2.0])
def test_every_apgd_iterate_is_feasible(norm, scale_kind, rand_init, rho):
    model, data = model_and_data("mlp")
    kw = {"adaptive": {}, "standard": dict(adaptive=False), "weights_only": dict(adaptive_weights_only=True),
          "eta": dict(adaptive_eta=0.01),
          "custom": dict(adaptive=False, scale={"0.weight": (torch.rand_like(model[0].weight) > 0.3).float() * 2.0})
          }[scale_kind]
    check, seen = constraint_checker(rho, norm)
    run_reference("worst", model, data, on_iterate=check, rho=rho, norm=norm, n_iters=8, rand_init=rand_init, **kw)
    assert len(seen) == 2 * 8


def test_exact_zero_weights_with_adaptive_l2_stay_finite_and_feasible():
    """The published projection computes 0/0 at exact-zero weights, gets a NaN norm and skips
    the projection; here those coordinates are frozen (c = |w| = 0)."""
    model, data = model_and_data("mlp")
    with torch.no_grad():
        model[0].weight[:, :3] = 0.0
        model[2].bias.zero_()
    check, seen = constraint_checker(0.05, "l2")
    r, _ = run_reference("worst", model, data, on_iterate=check, rho=0.05, norm="l2", n_iters=10)
    assert seen and torch.isfinite(torch.tensor(r.sharpness)) and r.sharpness > 0


def test_random_init_draws_the_documented_start():
    """linf random start: delta = rho * c * xi with xi ~ U(-1, 1) from (seed, stream=batch, sample=2^31+restart)."""
    model, data = model_and_data("mlp", n_batches=1)
    params = ParamSet(model)
    c = torch.cat([p.detach().abs().flatten() for p in params.tensors])
    xi = philox_draw("uniform", 5, 0, RAND_INIT_SAMPLE_BASE, 0, params.numel)
    first = []

    def record(delta, c_):
        if not first:
            first.append(torch.cat([d.flatten() for d in delta]))
    # After one step from delta0: delta1 = 0.75 * clamp(delta0 + step sign(g) c) + 0.25 * delta0.
    run_reference("worst", model, data, on_iterate=record, rho=0.1, rand_init=True, n_iters=1, seed=5)
    delta0 = 0.1 * c * xi
    z_minus = 0.75 * torch.clamp(delta0 - 0.2 * c, -0.1 * c, 0.1 * c) + 0.25 * delta0
    z_plus = 0.75 * torch.clamp(delta0 + 0.2 * c, -0.1 * c, 0.1 * c) + 0.25 * delta0
    d1 = first[0]
    assert torch.all(torch.isclose(d1, z_minus, atol=1e-7) | torch.isclose(d1, z_plus, atol=1e-7)
                     | torch.isclose(d1, 0.75 * delta0 + 0.25 * delta0, atol=1e-7))


@pytest.mark.parametrize("norm,dist", [("l2", "normal"), ("linf", "uniform")])
def test_average_case_uses_exact_counter_draws(norm, dist):
    model, data = model_and_data("mlp", n_batches=2)
    params = ParamSet(model)
    w0 = [p.detach().clone() for p in params.tensors]
    r = sharpfast.average_sharpness(model, data, rho=0.2, norm=norm, n_samples=2, seed=11, backend="reference")
    expected = []
    for b, (x, y) in enumerate(data):
        with torch.no_grad():
            l0 = F.cross_entropy(model.eval()(x), y)
        losses = []
        for k in range(2):
            xi = params.split(philox_draw(dist, 11, b, k, 0, params.numel, dtype=torch.float64))
            with torch.no_grad():
                for p, w, e in zip(params.tensors, w0, xi):
                    p.copy_(w + 0.2 * w.abs() * e.float())
                losses.append(F.cross_entropy(model(x), y))
                for p, w in zip(params.tensors, w0):
                    p.copy_(w)
        expected.append(float(sum(losses) / 2 - l0))
    assert r.per_batch == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert r.sharpness == pytest.approx(sum(expected) / 2, rel=1e-5, abs=1e-7)


def test_antithetic_pairs_share_their_draw():
    """Samples 2j and 2j+1 are w + rho c xi_j and w - rho c xi_j."""
    model, data = model_and_data("mlp", n_batches=1)
    (x, y), = data
    params = ParamSet(model)
    w0 = [p.detach().clone() for p in params.tensors]
    xi = params.split(philox_draw("normal", 0, 0, 0, 0, params.numel, dtype=torch.float64))
    losses = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, w, e in zip(params.tensors, w0, xi):
                p.copy_(w + sign * 0.3 * w.abs() * e.float())
            losses.append(float(F.cross_entropy(model(x), y)))
            for p, w in zip(params.tensors, w0):
                p.copy_(w)
    with torch.no_grad():
        l0 = float(F.cross_entropy(model(x), y))
    anti = sharpfast.average_sharpness(model, data, rho=0.3, n_samples=2, antithetic=True, backend="reference")
    assert anti.sharpness == pytest.approx(sum(losses) / 2 - l0, rel=1e-5)


def test_m_sharpness_batches_are_independent_problems():
    model, data = model_and_data("mlp", n_batches=3)
    both = sharpfast.worst_case_sharpness(model, data, rho=0.1, n_iters=6, backend="reference")
    first = sharpfast.worst_case_sharpness(model, data[:1], rho=0.1, n_iters=6, backend="reference")
    assert len(both.per_batch) == 3
    assert both.per_batch[0] == first.per_batch[0]
    assert both.sharpness == pytest.approx(sum(both.per_batch) / 3)
    assert both.err_sharpness == pytest.approx(sum(both.per_batch_err) / 3)


def test_published_five_tuples_equal_pairs():
    model, data = model_and_data("mlp")
    five = [(x, None, y, None, None) for x, y in data]
    a = sharpfast.worst_case_sharpness(model, data, rho=0.1, n_iters=5, backend="reference")
    b = sharpfast.worst_case_sharpness(model, five, rho=0.1, n_iters=5, backend="reference")
    assert a.per_batch == b.per_batch and a.delta_norm == b.delta_norm


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_every_model_kind_runs_and_is_deterministic(kind):
    model, data = model_and_data(kind)
    for fn, kw, n_evals in ((sharpfast.worst_case_sharpness, dict(n_iters=5, rand_init=True, n_restarts=2), 1),
                            (sharpfast.average_sharpness, dict(n_samples=4), 4)):
        r1 = fn(model, data, rho=0.05, seed=3, backend="reference", **kw)
        r2 = fn(model, data, rho=0.05, seed=3, backend="reference", **kw)
        assert r1.per_batch == r2.per_batch and r1.err_sharpness == r2.err_sharpness
        assert all(v == v for v in r1.per_batch)
        grid = 16 * n_evals  # error differences live on a grid of 1 / (batch size * evaluations)
        assert r1.err_sharpness is not None and all(abs(e * grid - round(e * grid)) < 1e-9 for e in r1.per_batch_err)


def test_different_seeds_draw_different_noise():
    model, data = model_and_data("mlp")
    a = sharpfast.average_sharpness(model, data, rho=0.3, n_samples=3, seed=1, backend="reference")
    b = sharpfast.average_sharpness(model, data, rho=0.3, n_samples=3, seed=2, backend="reference")
    assert a.sharpness != b.sharpness


def test_worst_case_beats_average_case_and_delta_norm_is_bounded():
    model, data = model_and_data("mlp")
    worst = sharpfast.worst_case_sharpness(model, data, rho=0.05, norm="linf", n_iters=20, backend="reference")
    avg = sharpfast.average_sharpness(model, data, rho=0.05, norm="linf", n_samples=10, backend="reference")
    assert worst.sharpness > avg.sharpness
    c = torch.cat([p.detach().abs().flatten() for p in model.parameters()])
    assert 0 < worst.delta_norm <= 0.05 * float(c.norm()) * (1 + 1e-6)
    assert avg.delta_norm == 0.0


def test_logit_normalization_forms():
    model, data = model_and_data("mlp")
    common = dict(rho=0.05, n_samples=3, backend="reference")
    plain = sharpfast.average_sharpness(model, data, **common)
    as_true = sharpfast.average_sharpness(model, data, normalize_logits=True, **common)
    as_norm = sharpfast.average_sharpness(model, data, normalize_logits="norm", **common)
    as_std = sharpfast.average_sharpness(model, data, normalize_logits="std", **common)
    assert as_true.per_batch == as_norm.per_batch
    assert len({plain.sharpness, as_norm.sharpness, as_std.sharpness}) == 3
    # Normalized logits have norm 1 ("norm") or sqrt(K) ("std"): the loss at w is bounded.
    assert as_norm.init_loss < plain.init_loss + 10


def test_scale_spec_rules():
    model = mlp()
    scales = lambda spec: ParamSet(model, spec).scales()
    w = ParamSet(model).tensors
    c = scales(ScaleSpec(adaptive=True))
    assert all(torch.equal(ci, wi.detach().abs()) for ci, wi in zip(c, w))
    c = scales(ScaleSpec(adaptive=True, eta=0.1))
    assert all(torch.equal(ci, wi.detach().abs() + 0.1) for ci, wi in zip(c, w))
    c = scales(ScaleSpec(adaptive=True, weights_only=True))
    for ci, wi in zip(c, w):
        assert torch.equal(ci, wi.detach().abs() if wi.dim() >= 2 else torch.ones_like(wi))
    c = scales(ScaleSpec(adaptive=False))
    assert all(torch.equal(ci, torch.ones_like(wi)) for ci, wi in zip(c, w))
    custom = {"0.bias": torch.zeros_like(model[0].bias)}
    c = scales(ScaleSpec(adaptive=True, custom=custom))
    assert torch.equal(c[1], torch.zeros_like(model[0].bias))


def test_zero_scale_freezes_coordinates_in_average_case():
    model, data = model_and_data("mlp")
    frozen = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    r = sharpfast.average_sharpness(model, data, rho=10.0, n_samples=2, scale=frozen, backend="reference")
    assert r.sharpness == 0.0 and r.err_sharpness == 0.0


def test_tied_parameters_are_counted_once_and_frozen_ones_never_move():
    model, _ = model_and_data("tied")
    params = ParamSet(model)
    assert sum(p is model.first.weight for p in params.tensors) == 1
    model, data = model_and_data("frozen")
    params = ParamSet(model)
    assert all(p is not model.backbone.weight for p in params.tensors)
    seen = []
    backbone_weight = model.backbone.weight.detach().clone()
    model.backbone.register_forward_pre_hook(lambda m, a: seen.append(torch.equal(m.weight, backbone_weight)))
    sharpfast.worst_case_sharpness(model, data, rho=0.5, n_iters=3, backend="reference")
    assert seen and all(seen)


def test_batchnorm_model_in_eval_mode_matches_manual_eval():
    model = SmallCNN()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    r = sharpfast.average_sharpness(model.train(), [(x, y)], rho=1e-9, n_samples=1, backend="reference")
    assert r.init_loss == pytest.approx(float(F.cross_entropy(model.eval()(x), y)))


def test_regression_targets_have_no_error_sharpness():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data = [(torch.randn(10, 4), torch.randn(10, 1))]
    r = sharpfast.worst_case_sharpness(model, data, rho=0.1, n_iters=3, loss_fn=F.mse_loss, backend="reference")
    assert r.err_sharpness is None and r.per_batch_err is None and r.init_err is None


def test_dict_outputs_with_logits_key_are_unwrapped():
    class DictOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = mlp()

        def forward(self, x):
            return {"logits": self.m(x)}
    wrapped = DictOut()
    model, data = model_and_data("mlp")
    wrapped.m.load_state_dict(model.state_dict())
    a = sharpfast.average_sharpness(wrapped, data, rho=0.1, n_samples=2, backend="reference")
    b = sharpfast.average_sharpness(model, data, rho=0.1, n_samples=2, backend="reference")
    assert a.per_batch == b.per_batch
