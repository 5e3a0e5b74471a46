"""sharpfast.compat: the published functions' signatures and tuples, and the published numbers."""
import pytest
import torch
import torch.nn.functional as F

import sharpfast
from sharpfast import compat
from sharpfast.params import ParamSet
from sharpfast.philox import noise_distribution, philox_draw
from tests.published_style import published_average_case_with_draws, published_worst_case
from tests.toy_models import mlp


def five_tuples(n_batches=3, bs=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 8, generator=g), None, torch.randint(0, 3, (bs,), generator=g), None, None)
            for _ in range(n_batches)]


def trained_mlp():
    model = mlp(depth=2, width=12)
    data = five_tuples(4, 32, seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        for x, _, y, _, _ in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for p in model.parameters():
        p.grad = None
    return model.eval()


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("adaptive", [True, False])
def test_compat_apgd_reproduces_the_published_algorithm(norm, adaptive):
    model = trained_mlp()
    batches = five_tuples()
    rho = 0.05 if adaptive else 0.5
    loss_f = lambda out, y: F.cross_entropy(out, y, reduction="mean")
    vals = compat.eval_APGD_sharpness(model, batches, loss_f, None, None, rho=rho, n_iters=20,
                                      rand_init=False, adaptive=adaptive, norm=norm, backend="reference")
    assert isinstance(vals, tuple) and len(vals) == 3
    expected = published_worst_case(model, [(x, y) for x, _, y, _, _ in batches], loss_f, rho, 20, adaptive, norm)
    assert vals[0] == pytest.approx(expected[0], rel=1e-5, abs=1e-7)
    assert vals[1] == pytest.approx(expected[1], abs=1e-9)
    assert vals[2] == pytest.approx(expected[2], rel=1e-4)
    assert vals[0] > 0


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_compat_defaults_are_the_published_runs(norm):
    """Every published run passed rand_init=False (the published signature's default True crashes):
    compat's defaults are those runs, with no rand_init argument."""
    model = trained_mlp()
    batches = five_tuples()
    loss_f = lambda out, y: F.cross_entropy(out, y)
    vals = compat.eval_APGD_sharpness(model, batches, loss_f, rho=0.05, n_iters=20, adaptive=True, norm=norm,
                                      backend="reference")
    expected = published_worst_case(model, [(x, y) for x, _, y, _, _ in batches], loss_f, 0.05, 20, True, norm)
    assert vals[0] == pytest.approx(expected[0], rel=1e-5, abs=1e-7)
    assert vals[2] == pytest.approx(expected[2], rel=1e-4)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_compat_average_reproduces_the_published_loop_on_the_same_draws(norm):
    model = trained_mlp()
    batches = five_tuples(2)
    loss_f = lambda out, y: F.cross_entropy(out, y)
    params = ParamSet(model)
    draws = [[params.split(philox_draw(noise_distribution(norm), 7, b, k, 0, params.numel, dtype=torch.float64).float())
              for k in range(5)] for b in range(2)]
    vals = compat.eval_average_sharpness(model, batches, loss_f, n_iters=5, rho=0.1, adaptive=True,
                                         norm=norm, seed=7, backend="reference")
    assert isinstance(vals, tuple) and len(vals) == 4 and isinstance(vals[3], str)
    expected = published_average_case_with_draws(model, [(x, y) for x, _, y, _, _ in batches], loss_f, 0.1, True, draws)
    assert vals[0] == pytest.approx(expected[0], rel=1e-5, abs=1e-7)
    assert vals[1] == pytest.approx(expected[1], abs=1e-9)
    assert vals[2] == 0.0
    no_output = compat.eval_average_sharpness(model, batches, loss_f, n_iters=5, rho=0.1, adaptive=True,
                                              norm=norm, seed=7, return_output=False, backend="reference")
    assert no_output == vals[:3]


def test_compat_random_init_works_and_returns_the_log():
    """The published rand_init path crashes (its init function is a tuple); here it works."""
    model = trained_mlp()
    loss_f = lambda out, y: F.cross_entropy(out, y)
    vals = compat.eval_APGD_sharpness(model, five_tuples(2), loss_f, 0.0, 0.0, rho=0.05, n_iters=10,
                                      n_restarts=2, rand_init=True, adaptive=True, return_output=True,
                                      backend="reference")
    assert len(vals) == 4 and "batch=2" in vals[3]
    api = sharpfast.worst_case_sharpness(model, [(x, y) for x, _, y, _, _ in five_tuples(2)], rho=0.05,
                                         n_iters=10, n_restarts=2, rand_init=True, loss_fn=loss_f,
                                         projection_tol=1e-5, eval_mode=False, backend="reference")
    assert vals[:3] == (api.sharpness, api.err_sharpness, api.delta_norm)


def test_compat_evaluates_in_the_mode_the_caller_set():
    """Like the published code, compat does not switch to eval mode: a BatchNorm model in train
    mode is evaluated with batch statistics (and its running statistics are left untouched)."""
    from tests.toy_models import SmallCNN
    model = SmallCNN().train()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 1, 6, 6, generator=g), None, torch.randint(0, 3, (16,), generator=g), None, None)]
    stats = [b.clone() for b in model.buffers()]
    vals = compat.eval_APGD_sharpness(model, batches, F.cross_entropy, rho=0.01, n_iters=3, rand_init=False,
                                      adaptive=True, backend="reference")
    xy = [(x, y) for x, _, y, _, _ in batches]
    train_mode = sharpfast.worst_case_sharpness(model, xy, rho=0.01, n_iters=3, eval_mode=False,
                                                projection_tol=1e-5, backend="reference")
    eval_mode = sharpfast.worst_case_sharpness(model, xy, rho=0.01, n_iters=3, backend="reference")
    assert vals[0] == train_mode.sharpness != eval_mode.sharpness
    assert model.training and all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
