"""Bad input gets a clear ValueError/TypeError naming the problem, never a NaN."""
import math

import pytest
import torch

import sharpfast
from tests.toy_models import mlp, model_and_data

FUNCS = {"worst": sharpfast.worst_case_sharpness, "average": sharpfast.average_sharpness}


@pytest.fixture
def setup():
    return model_and_data("mlp")


def call(kind, model, data, **kw):
    kw.setdefault("rho", 0.1)
    kw.setdefault("backend", "reference")
    return FUNCS[kind](model, data, **kw)


@pytest.mark.parametrize("kind", FUNCS)
@pytest.mark.parametrize("rho", [0.0, -0.1, math.nan, math.inf])
def test_bad_rho(kind, rho, setup):
    with pytest.raises(ValueError, match="rho"):
        call(kind, *setup, rho=rho)


@pytest.mark.parametrize("kind", FUNCS)
def test_unknown_norm(kind, setup):
    with pytest.raises(ValueError, match="norm"):
        call(kind, *setup, norm="l1")


@pytest.mark.parametrize("kind", FUNCS)
def test_empty_data(kind, setup):
    with pytest.raises(ValueError, match="empty"):
        call(kind, setup[0], [])


@pytest.mark.parametrize("kind", FUNCS)
def test_data_that_is_not_batches(kind, setup):
    with pytest.raises(TypeError, match="batch"):
        call(kind, setup[0], [torch.randn(4, 8)])
    with pytest.raises(TypeError, match="iterable"):
        call(kind, setup[0], torch.randn(4, 8))


@pytest.mark.parametrize("kind", FUNCS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weights(kind, bad, setup):
    model, data = setup
    with torch.no_grad():
        model[0].weight[0, 0] = bad
    with pytest.raises(ValueError, match="non-finite"):
        call(kind, model, data)


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("kind", FUNCS)
def test_non_finite_loss(kind, backend, setup):
    model, data = setup
    with pytest.raises(ValueError, match="loss is not finite"):
        call(kind, model, data, backend=backend, loss_fn=lambda out, y: out.sum() * math.inf)


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("kind", FUNCS)
def test_loss_that_overflows_at_perturbed_points(kind, backend, setup):
    model, data = setup
    with pytest.raises(ValueError, match="perturbed|iterate"):
        call(kind, model, data, rho=1e30, adaptive=False, backend=backend,
             loss_fn=lambda out, y: (out.double() ** 12).mean())


@pytest.mark.parametrize("kind", FUNCS)
def test_scale_with_wrong_shape_negative_entries_or_unknown_name(kind, setup):
    model, data = setup
    with pytest.raises(ValueError, match="shape"):
        call(kind, model, data, scale={"0.weight": torch.ones(3, 3)})
    with pytest.raises(ValueError, match="negative"):
        call(kind, model, data, scale={"0.weight": -torch.ones_like(model[0].weight)})
    with pytest.raises(ValueError, match="non-finite"):
        call(kind, model, data, scale={"0.weight": torch.full_like(model[0].weight, math.nan)})
    with pytest.raises(ValueError, match="not a trainable"):
        call(kind, model, data, scale={"nope.weight": torch.ones(1)})
    with pytest.raises(TypeError, match="tensor"):
        call(kind, model, data, scale={"0.weight": 1.0})
    with pytest.raises(TypeError, match="dict"):
        call(kind, model, data, scale=[torch.ones(1)])


@pytest.mark.parametrize("kind", FUNCS)
def test_model_without_trainable_float_parameters(kind, setup):
    model, data = setup
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable floating-point parameters"):
        call(kind, model, data)
    with pytest.raises(ValueError, match="no trainable"):
        call(kind, torch.nn.ReLU(), data)
    with pytest.raises(TypeError, match="nn.Module"):
        call(kind, lambda x: x, data)


@pytest.mark.parametrize("kind", FUNCS)
def test_bad_options(kind, setup):
    with pytest.raises(ValueError, match="backend"):
        call(kind, *setup, backend="cuda")
    with pytest.raises(ValueError, match="normalize_logits"):
        call(kind, *setup, normalize_logits="softmax")
    with pytest.raises(ValueError, match="seed"):
        call(kind, *setup, seed=-1)
    with pytest.raises(ValueError, match="adaptive_eta"):
        call(kind, *setup, adaptive_eta=-1.0)
    with pytest.raises(TypeError, match="loss_fn"):
        call(kind, *setup, loss_fn="mse")


def test_bad_worst_case_options(setup):
    with pytest.raises(ValueError, match="n_iters"):
        call("worst", *setup, n_iters=0)
    with pytest.raises(TypeError, match="n_iters"):
        call("worst", *setup, n_iters=2.5)
    with pytest.raises(ValueError, match="rand_init"):
        call("worst", *setup, n_restarts=3)
    with pytest.raises(ValueError, match="step_size_mult"):
        call("worst", *setup, step_size_mult=0.0)
    with pytest.raises(ValueError, match="projection_tol"):
        call("worst", *setup, projection_tol=-1.0)
    with pytest.raises(ValueError, match="unknown solver"):
        call("worst", *setup, solver="sam")
    with pytest.raises(ValueError, match="unknown init"):
        call("worst", *setup, init="ones")
    with pytest.raises(ValueError, match="contradicts init='eigen'"):
        call("worst", *setup, rand_init=True, init="eigen")
    with pytest.raises(ValueError, match="init='random' or 'eigen'"):
        call("worst", *setup, init="zero", n_restarts=2)
    with pytest.raises(ValueError, match="needs norm='l2'"):
        call("worst", *setup, norm="linf", quadratic_model=True)


def test_bad_average_case_options(setup):
    with pytest.raises(ValueError, match="n_samples"):
        call("average", *setup, n_samples=0)
    with pytest.raises(ValueError, match="even"):
        call("average", *setup, n_samples=3, antithetic=True)


def test_loss_fn_returning_a_vector(setup):
    with pytest.raises(TypeError, match="mean loss"):
        call("worst", *setup, loss_fn=lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none"))


def test_output_without_logits(setup):
    model = torch.nn.Sequential(mlp(), torch.nn.Flatten())

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return {"scores": self.m(x)}
    with pytest.raises(TypeError, match="logits"):
        call("average", Wrapper(), setup[1])


def test_fused_backend_request_says_why_when_unavailable(setup):
    from sharpfast.api import resolve_backend
    from sharpfast.params import ParamSet
    ok = resolve_backend("auto", ParamSet(setup[0]))
    assert ok in ("reference", "fused")
    if ok == "reference":
        with pytest.raises(RuntimeError, match="fused"):
            call("worst", *setup, backend="fused")


class _Checkpointed(torch.nn.Module):
    """Activation checkpointing around ``body``; with use_reentrant=True on inputs that do not
    require grad, autograd sees none of ``body``'s parameters."""

    def __init__(self, reentrant, first_hidden=True, unused_head=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.body = torch.nn.Linear(8, 16), torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.reentrant, self.first_hidden = reentrant, first_hidden
        if unused_head:
            self.head = torch.nn.Linear(4, 4)   # never called: no gradient, no effect on the loss

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        if self.reentrant is None:   # no checkpointing
            return self.body(self.embed(x))
        if self.first_hidden:
            return checkpoint(torch.nn.Sequential(self.embed, self.body), x, use_reentrant=self.reentrant)
        return checkpoint(self.body, self.embed(x), use_reentrant=self.reentrant)


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("kind", ["worst", "geodesic"])
def test_parameters_that_change_the_loss_but_get_no_gradient_are_an_error(kind, backend, setup):
    _, data = setup
    call_ = (lambda m, **kw: sharpfast.geodesic_sharpness(m, data, rho=0.05, n_iters=3, blocks=[], backend=backend, **kw)
             if kind == "geodesic" else sharpfast.worst_case_sharpness(m, data, rho=0.05, norm="l2", n_iters=3,
                                                                       backend=backend, **kw))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch's own warning that no input requires grad
        for first_hidden, hidden in ((True, "'embed.weight', 'embed.bias', 'body.1.weight'"),
                                     (False, None)):
            model = _Checkpointed(reentrant=True, first_hidden=first_hidden)
            if hidden:
                with pytest.raises(ValueError, match=f"parameter\\(s\\) {hidden}.* change the loss but receive no "
                                                     "gradient.*use_reentrant=False"):
                    call_(model)
            elif backend == "fused":   # seen by autograd's backward (the reference's .grad() refuses it)
                expected = call_(_Checkpointed(reentrant=None, first_hidden=False))
                assert call_(model).per_batch == expected.per_batch
    # a parameter the loss does not use gets no gradient and changes nothing: no error, the same value
    plain = call_(_Checkpointed(reentrant=None)).per_batch
    assert call_(_Checkpointed(reentrant=None, unused_head=True)).per_batch == pytest.approx(plain, rel=1e-12)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_an_unused_parameter_of_a_model_with_dropout_in_train_mode_is_no_error(backend, setup):
    """The check moves a parameter without a gradient and compares two losses: both are taken under
    one random state, so dropout's masks do not make an unused parameter look used."""
    _, data = setup

    class WithDropout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3))
            self.unused = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.body(x)
    r = sharpfast.worst_case_sharpness(WithDropout(), data, rho=0.05, norm="l2", n_iters=3, eval_mode=False,
                                       backend=backend)
    assert math.isfinite(r.sharpness)
