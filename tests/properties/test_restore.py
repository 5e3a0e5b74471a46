"""The model is exactly as before after every call: success, exception, KeyboardInterrupt.

Exactly means: the same parameter objects pointing at the same storage with bit-identical
values, the same ``.grad`` objects and values, the same ``requires_grad`` flags, the same buffer
objects with bit-identical values, and the same train/eval flag on every module.
"""
import math

import pytest
import torch

import sharpfast
from tests.toy_models import MODEL_KINDS, model_and_data

BACKENDS = ["reference", "fused", "fused-together"]   # fused-together: all m-batches in one vmapped pass


def snapshot(model):
    params = [(p, p.data_ptr(), p.detach().clone(), p.requires_grad, p.grad,
               None if p.grad is None else p.grad.clone()) for p in model.parameters()]
    buffers = [(m, name, b, None if b is None else b.clone()) for m in model.modules() for name, b in m._buffers.items()]
    flags = [(m, m.training) for m in model.modules()]
    return params, buffers, flags


def assert_unchanged(model, snap):
    params, buffers, flags = snap
    now = list(model.parameters())
    assert len(now) == len(params)
    for q, (p, ptr, values, requires_grad, grad, grad_values) in zip(now, params):
        assert q is p and p.data_ptr() == ptr
        assert torch.equal(p.detach().view(-1).view(torch.uint8), values.view(-1).view(torch.uint8))
        assert p.requires_grad == requires_grad
        assert p.grad is grad
        if grad is not None:
            assert torch.equal(grad, grad_values)
    for m, name, b, values in buffers:
        assert m._buffers[name] is b
        if b is not None:
            assert torch.equal(b, values)
    for m, training in flags:
        assert m.training == training


def prepared(kind):
    model, data = model_and_data(kind)
    model.train()                                   # the call must switch to eval and back
    first = next(p for p in model.parameters() if p.requires_grad)
    first.grad = torch.full_like(first, 0.5)        # a stale gradient the call must not touch
    return model, data


def calls(backend):
    together = dict(solve_batches_together=True) if backend == "fused-together" else {}
    average = dict(samples_per_pass=3) if backend == "fused-together" else {}
    backend = backend.split("-")[0]
    return [
        lambda m, d, **kw: sharpfast.worst_case_sharpness(m, d, rho=0.05, norm="linf", n_iters=4, backend=backend,
                                                          **together, **kw),
        lambda m, d, **kw: sharpfast.worst_case_sharpness(m, d, rho=0.05, norm="l2", n_iters=4, rand_init=True,
                                                          backend=backend, **together, **kw),
        lambda m, d, **kw: sharpfast.average_sharpness(m, d, rho=0.05, n_samples=3, backend=backend, **average, **kw),
        lambda m, d, **kw: sharpfast.worst_case_sharpness(m, d, rho=0.05, norm="l2", n_iters=4, solver="scaled",
                                                          init="eigen", backend=backend, **together, **kw),
        lambda m, d, **kw: sharpfast.worst_case_sharpness(m, d, rho=0.05, norm="linf", n_iters=4, solver="scaled",
                                                          init="random", n_restarts=2, backend=backend, **together,
                                                          **kw),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_model_restored_after_success(kind, backend):
    model, data = prepared(kind)
    snap = snapshot(model)
    for call in calls(backend):
        r = call(model, data)
        assert r.sharpness == r.sharpness  # not NaN
        assert_unchanged(model, snap)


class Boom(Exception):
    pass


def failing_loss(after, exc):
    count = {"n": 0}

    def loss_fn(out, y):
        count["n"] += 1
        if count["n"] > after:
            raise exc
        return torch.nn.functional.cross_entropy(out, y)
    return loss_fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exc", [Boom("mid-run"), KeyboardInterrupt()])
@pytest.mark.parametrize("after", [0, 1, 3])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "tied"])
def test_model_restored_after_a_raise_mid_run(kind, after, exc, backend):
    model, data = prepared(kind)
    snap = snapshot(model)
    for call in calls(backend):
        with pytest.raises(type(exc)):
            call(model, data, loss_fn=failing_loss(after, exc))
        assert_unchanged(model, snap)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_batchnorm_statistics_untouched_in_train_mode_evaluation(backend):
    model, data = prepared("cnn")
    snap = snapshot(model)
    r = sharpfast.worst_case_sharpness(model, data, rho=0.05, n_iters=3, eval_mode=False, backend=backend)
    assert r.sharpness == r.sharpness
    assert_unchanged(model, snap)


def test_evaluation_uses_running_statistics_by_default():
    model, data = prepared("cnn")
    in_eval = sharpfast.average_sharpness(model.eval(), data, rho=0.05, n_samples=2, backend="reference")
    in_train = sharpfast.average_sharpness(model.train(), data, rho=0.05, n_samples=2, backend="reference")
    batch_stats = sharpfast.average_sharpness(model, data, rho=0.05, n_samples=2, eval_mode=False,
                                              backend="reference")
    assert in_eval.sharpness == in_train.sharpness
    assert in_eval.init_loss != batch_stats.init_loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_that_require_grad_come_back_without_a_grad(backend):
    """The caller's inputs are as untouchable as the model: no .grad appears on them."""
    model, data = model_and_data("mlp")
    data = [(x.clone().requires_grad_(True), y) for x, y in data]
    for call in calls(backend):
        call(model, data)
        assert all(x.grad is None for x, _ in data)
    sharpfast.hessian_trace(model, data, n_probes=2)
    assert all(x.grad is None for x, _ in data)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_the_api_under_no_grad_and_inference_mode(backend):
    model, data = model_and_data("mlp")
    want = sharpfast.worst_case_sharpness(model, data, rho=0.05, norm="linf", n_iters=3, backend=backend).sharpness
    with torch.no_grad():
        assert sharpfast.worst_case_sharpness(model, data, rho=0.05, norm="linf", n_iters=3,
                                              backend=backend).sharpness == want
    with torch.inference_mode():
        made_here = [(x.clone(), y.clone()) for x, y in data]   # inference tensors
        assert sharpfast.worst_case_sharpness(model, made_here, rho=0.05, norm="linf", n_iters=3,
                                              backend=backend).sharpness == want
        assert math.isfinite(sharpfast.average_sharpness(model, made_here, rho=0.05, n_samples=2,
                                                         backend=backend).sharpness)
        assert math.isfinite(sharpfast.hessian_trace(model, made_here, n_probes=2).value)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    with torch.inference_mode():
        frozen = torch.nn.Linear(8, 3)
    with pytest.raises(ValueError, match="created under torch.inference_mode"):
        sharpfast.average_sharpness(frozen, [(torch.randn(4, 8), torch.randint(0, 3, (4,)))], rho=0.1)


class ClampsItsWeights(torch.nn.Module):
    """A forward that writes into its own weights (an in-place clamp, as weight constraints do)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 3)

    def forward(self, x):
        with torch.no_grad():
            self.lin.weight.clamp_(-0.2, 0.2)
        return self.lin(x)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_a_forward_that_writes_its_weights_leaves_the_callers_model_as_it_was(backend):
    model = ClampsItsWeights()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [(torch.randn(16, 8), torch.randint(0, 3, (16,)))]
    sharpfast.worst_case_sharpness(model, data, rho=0.05, norm="l2", n_iters=3, backend=backend)
    sharpfast.average_sharpness(model, data, rho=0.05, n_samples=2, backend=backend)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
