"""sharpfast.evaluate_many: a stack of models in one pass gives each model's own result.

Tolerances: float64 stacked and one-at-a-time differ only in how the vmapped forward sums
(1e-9 relative, with an absolute floor of 1e-12 for values that are differences of nearby
losses); float32 as the m-batches-together mode of tests/engine/test_fused.py (1e-4 relative, 1e-5 of
the loss scale absolute).
"""
import logging
import math

import pytest
import torch
from torch import nn

import sharpfast
import sharpfast.many as many
from tests.helpers import requires_extension
from tests.engine.test_fused import AVERAGE, WORST
from tests.toy_models import MODEL_KINDS, mlp, model_and_data

pytestmark = requires_extension


def models_and_data(kind, k=3, dtype=torch.float64, n_batches=2):
    models = [model_and_data(kind, n_batches=n_batches, seed=seed)[0].to(dtype) for seed in range(k)]
    _, data = model_and_data(kind, n_batches=n_batches)
    cast = lambda x: x.to(dtype) if x.is_floating_point() else x
    return models, [(sharpfast.map_tensors(cast, x), y) for x, y in data]


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail where a stack is evaluated one model at a time instead of stacked."""
    def refuse(*a, **kw):
        raise AssertionError("the stack was evaluated one model at a time")
    monkeypatch.setattr(many, "evaluate_sharpness", refuse)


def assert_close(stacked, one, rel, abs_, delta_rel=None):
    assert stacked.backend == one.backend == "fused"
    assert stacked.per_batch == pytest.approx(one.per_batch, rel=rel, abs=abs_)
    assert stacked.sharpness == pytest.approx(one.sharpness, rel=rel, abs=abs_)
    assert stacked.init_loss == pytest.approx(one.init_loss, rel=rel, abs=abs_)
    assert stacked.delta_norm == pytest.approx(one.delta_norm, rel=delta_rel or max(rel, 1e-6), abs=abs_)
    if one.err_sharpness is None:
        assert stacked.err_sharpness is None
    else:
        assert stacked.per_batch_err == pytest.approx(one.per_batch_err, abs=1e-9)
    assert stacked.restarts_improved == one.restarts_improved
    if one.quadratic_model is None:
        assert stacked.quadratic_model is None
    else:
        assert stacked.quadratic_model == pytest.approx(one.quadratic_model, rel=1e-9)


def one_at_a_time(models, data, settings):   # the public function (the fixture patches only many's)
    return [sharpfast.evaluate_sharpness(m, data, settings) for m in models]


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("definition", WORST, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_worst_case_stacked_equals_one_at_a_time(kind, definition, no_fallback):
    models, data = models_and_data(kind)
    settings = sharpfast.WorstCaseSettings(**{"n_iters": 10, "seed": 4, "backend": "fused", **definition})
    # as in test_fused: where a gradient is 0 in exact arithmetic (the attention's key bias), linf's
    # sign(g) follows the rounding of the vmapped forward; every loss agrees, ||delta|| sees it
    noise_signs = kind == "transformer" and definition["norm"] == "linf"
    for g, e in zip(sharpfast.evaluate_many(models, data, settings), one_at_a_time(models, data, settings)):
        assert_close(g, e, rel=1e-9, abs_=1e-12, delta_rel=1e-2 if noise_signs else None)


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("definition", AVERAGE, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_average_case_stacked_equals_one_at_a_time(kind, definition, no_fallback):
    models, data = models_and_data(kind)
    settings = sharpfast.AverageCaseSettings(**{"n_samples": 6, "seed": 9, "backend": "fused", **definition})
    for g, e in zip(sharpfast.evaluate_many(models, data, settings), one_at_a_time(models, data, settings)):
        assert_close(g, e, rel=1e-9, abs_=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
def test_float32_stacks_agree_within_float32_rounding(kind, no_fallback):
    models, data = models_and_data(kind, k=4, dtype=torch.float32)
    for settings in (sharpfast.WorstCaseSettings(rho=0.05, norm="linf", n_iters=8, backend="fused"),
                     sharpfast.WorstCaseSettings(rho=0.1, norm="l2", n_iters=8, backend="fused"),
                     sharpfast.WorstCaseSettings(rho=0.1, norm="l2", n_iters=8, solver="scaled", backend="fused"),
                     sharpfast.AverageCaseSettings(rho=0.1, n_samples=8, backend="fused")):
        got = sharpfast.evaluate_many(models, data, settings, stack=2)
        for g, m in zip(got, models):
            e = sharpfast.evaluate_sharpness(m, data, settings)
            # the best point is the iterate of the highest loss: where two iterates' losses are equal
            # to float32 rounding, either may be it, and only ||delta|| tells them apart
            assert_close(g, e, rel=1e-4, abs_=1e-5 * max(1.0, abs(e.init_loss)), delta_rel=1e-2)


def test_every_stack_size_gives_the_same_results():
    models, data = models_and_data("cnn", k=5)
    settings = sharpfast.WorstCaseSettings(rho=0.05, norm="linf", n_iters=6, rand_init=True, n_restarts=2)
    results = {k: sharpfast.evaluate_many(models, data, settings, stack=k) for k in (1, 2, 5, None)}
    for k, got in results.items():
        for g, e in zip(got, results[1]):
            assert g.per_batch == pytest.approx(e.per_batch, rel=1e-9, abs=1e-12), k


# ----------------------------------------------------------------------------- architecture


def test_models_of_another_architecture_are_refused_naming_the_difference():
    data = model_and_data("mlp")[1]
    s = sharpfast.AverageCaseSettings(rho=0.1, n_samples=2)
    with pytest.raises(ValueError, match=r"models\[1\].*parameter '0.weight' is shape \[32, 8\].*shape \[16, 8\]"):
        sharpfast.evaluate_many([mlp(), mlp(width=32)], data, s)
    with pytest.raises(ValueError, match=r"models\[2\].*module '1' is Tanh.*ReLU"):
        odd = mlp()
        odd[1] = nn.Tanh()   # the same parameters, another function
        sharpfast.evaluate_many([mlp(), mlp(), odd], data, s)
    with pytest.raises(ValueError, match=r"parameter '0.weight'.*float32.*float64"):
        sharpfast.evaluate_many([mlp().double(), mlp()], data, s)
    frozen = mlp()
    frozen[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"requires_grad=False.*requires_grad=True"):
        sharpfast.evaluate_many([mlp(), frozen], data, s)
    bn = lambda: nn.Sequential(nn.Linear(8, 3), nn.BatchNorm1d(3))
    other = bn()
    other[1].register_buffer("extra", torch.zeros(1))
    with pytest.raises(ValueError, match=r"buffer '1.extra' is shape \[1\].*absent in models\[0\]"):
        sharpfast.evaluate_many([bn(), other], data, s)
    with pytest.raises(ValueError, match="models is empty"):
        sharpfast.evaluate_many([], data, s)
    with pytest.raises(TypeError, match=r"models\[1\] is a str"):
        sharpfast.evaluate_many([mlp(), "mlp"], data, s)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="stack must be a positive integer"):
            sharpfast.evaluate_many([mlp()], data, s, stack=bad)
    with pytest.raises(ValueError, match="errors must be one of"):
        sharpfast.evaluate_many([mlp()], data, s, errors="ignore")


def _net_class(scale):
    class Net(nn.Module):   # one name, two forwards
        def __init__(self):
            super().__init__()
            self.body = mlp().double()

        def forward(self, x):
            return self.body(x) * getattr(self, "scale", scale)
    return Net


def _leaky(slope):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(slope), nn.Linear(16, 3)).double()


@pytest.mark.parametrize("settings", [sharpfast.WorstCaseSettings(rho=0.05, n_iters=5, norm="l2"),
                                      sharpfast.AverageCaseSettings(rho=0.1, n_samples=2)], ids=["worst", "average"])
def test_models_whose_modules_compute_differently_are_refused_not_evaluated_with_the_first(settings):
    """A stack runs models[0]'s modules: models whose modules hold other settings (a slope, a
    class of the same name, a tensor attribute, a forward hook) would get models[0]'s values."""
    _, data = models_and_data("mlp")
    pairs = {"setting '1.negative_slope' is 0.5 in models\\[1\\] but 0.01": (_leaky(0.01), _leaky(0.5)),
             r"module '' is .*Net \(id .*\) in models\[1\]": (_net_class(1.0)(), _net_class(3.0)())}
    hooked = _leaky(0.01)
    hooked[1].register_forward_hook(lambda m, i, o: 2 * o)
    pairs["setting '1._forward_hooks' is \\[<function"] = (_leaky(0.01), hooked)
    held = [_net_class(1.0)(), _net_class(1.0)()]
    held[1] = type(held[0])()
    for m, t in zip(held, (1.0, 2.0)):
        m.scale = torch.tensor(t, dtype=torch.float64)   # a tensor outside parameters and buffers
    pairs[r"setting 'scale' is tensor\(2\.,"] = tuple(held)
    for message, (a, b) in pairs.items():
        alone = [sharpfast.evaluate_sharpness(m, data, settings).sharpness for m in (a, b)]
        assert alone[0] != alone[1]
        with pytest.raises(ValueError, match=r"models\[1\] is not of models\[0\]'s architecture: " + message):
            sharpfast.evaluate_many([a, b], data, settings)
    # models whose modules are alike by value stack: a factory's models, also Hugging Face ones
    # loaded from two folders (where each was loaded from is not part of the architecture)
    same = [_leaky(0.01), _leaky(0.01)]
    assert [r.sharpness for r in sharpfast.evaluate_many(same, data, settings)] == pytest.approx(
        [sharpfast.evaluate_sharpness(m, data, settings).sharpness for m in same], rel=1e-9)


def test_compiled_models_are_compared_by_the_models_they_wrap():
    """torch.compile's wrapper holds compiler objects of its own: the models it wraps decide."""
    many.check_same_architecture([torch.compile(_leaky(0.01)), torch.compile(_leaky(0.01))])
    with pytest.raises(ValueError, match="setting '_orig_mod.1.negative_slope' is 0.5"):
        many.check_same_architecture([torch.compile(_leaky(0.01)), torch.compile(_leaky(0.5))])


def test_hugging_face_models_of_one_config_are_one_architecture_from_any_folder(tmp_path):
    pytest.importorskip("transformers")
    from sharpfast.study.zoo import hf
    from sharpfast.study.experiments import bert_example
    for seed in (0, 1):
        bert_example.tiny_bert(seed).save_pretrained(tmp_path / str(seed))
    many.check_same_architecture([hf.from_folder(str(tmp_path / "0")), hf.from_folder(str(tmp_path / "1"))])
    other = bert_example.tiny_bert(0)
    config = type(other.config)(**{**other.config.to_dict(), "hidden_dropout_prob": 0.3})
    with pytest.raises(ValueError, match=r"setting \"config\['hidden_dropout_prob'\]\" is 0.3 in models\[1\]"):
        many.check_same_architecture([bert_example.tiny_bert(0), type(other)(config)])


# ----------------------------------------------------------------------------- restore and errors


def snapshot(model):
    return ([(p.data.data_ptr(), p.detach().clone(), p.grad, p.requires_grad) for p in model.parameters()],
            [(b.data_ptr(), b.clone()) for b in model.buffers()], [m.training for m in model.modules()])


def assert_restored(model, before):
    params, buffers, training = snapshot(model)
    for (ptr, value, grad, req), (ptr2, value2, grad2, req2) in zip(before[0], params):
        assert ptr == ptr2 and torch.equal(value, value2) and grad is grad2 and req == req2
    for (ptr, value), (ptr2, value2) in zip(before[1], buffers):
        assert ptr == ptr2 and torch.equal(value, value2)
    assert training == before[2]


@pytest.mark.parametrize("raised", [RuntimeError, KeyboardInterrupt])
def test_every_model_is_restored_after_an_exception_or_an_interrupt(raised):
    models, data = models_and_data("cnn", k=3)
    for m in models:
        m.train()
    before = [snapshot(m) for m in models]
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        if len(calls) >= 4:   # in the stack's fourth forward, and in every one after it
            raise raised("stop")
        return nn.functional.cross_entropy(out, y)
    settings = sharpfast.WorstCaseSettings(rho=0.05, n_iters=5, loss_fn=loss_fn, backend="fused")
    with pytest.raises(raised):
        sharpfast.evaluate_many(models, data, settings, stack=3)
    for m, b in zip(models, before):
        assert_restored(m, b)
    ok = sharpfast.evaluate_many(models, data, sharpfast.WorstCaseSettings(rho=0.05, n_iters=5))
    for m, b in zip(models, before):
        assert_restored(m, b)
    assert len(ok) == 3


class Scaled(nn.Module):
    """An MLP whose logits are multiplied by a buffer: a non-finite buffer makes only this model's
    loss non-finite."""

    def __init__(self, seed, scale=1.0):
        super().__init__()
        self.net = mlp(seed=seed).double()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float64))

    def forward(self, x):
        return self.net(x) * self.scale


@pytest.mark.parametrize("settings", [sharpfast.WorstCaseSettings(rho=0.05, n_iters=5, backend="fused"),
                                      sharpfast.AverageCaseSettings(rho=0.1, n_samples=4, backend="fused")],
                         ids=["worst", "average"])
def test_a_failing_model_fails_alone(settings, no_fallback):
    _, data = models_and_data("mlp")
    models = [Scaled(0), Scaled(1, scale=math.nan), Scaled(2), Scaled(3)]
    with torch.no_grad():
        models[3].net[0].weight[0, 0] = math.inf   # refused by the parameter check
    got = sharpfast.evaluate_many(models, data, settings, errors="return")
    assert isinstance(got[1], ValueError) and "not finite" in str(got[1])
    assert isinstance(got[3], ValueError) and "0.weight" in str(got[3])
    for i in (0, 2):
        assert_close(got[i], sharpfast.evaluate_sharpness(models[i], data, settings), rel=1e-9, abs_=1e-12)
    with pytest.raises(ValueError, match="model 1: .*not finite"):
        sharpfast.evaluate_many(models, data, settings)


class Untraceable(nn.Module):
    """A forward that reads a value on the host: vmap cannot trace it."""

    def __init__(self, seed):
        super().__init__()
        self.net = mlp(seed=seed).double()

    def forward(self, x):
        h = self.net(x)
        return h * (2.0 if float(h.sum()) > 1e9 else 1.0)


def test_models_vmap_cannot_trace_are_evaluated_one_at_a_time_and_said_once(caplog):
    _, data = models_and_data("mlp")
    models = [Untraceable(s) for s in range(3)]
    settings = sharpfast.WorstCaseSettings(rho=0.05, n_iters=4, backend="fused")
    many._said_unstackable.discard("Untraceable")
    with caplog.at_level(logging.INFO, logger="sharpfast.many"):
        got = sharpfast.evaluate_many(models, data, settings)
        sharpfast.evaluate_many(models, data, settings)
    said = [r for r in caplog.records if "Untraceable models are evaluated one at a time" in r.getMessage()]
    assert len(said) == 1
    for g, m in zip(got, models):
        assert g.per_batch == sharpfast.evaluate_sharpness(m, data, settings).per_batch


def test_stacks_that_cannot_be_formed_are_evaluated_one_at_a_time():
    models, data = models_and_data("mlp")
    ragged = data + [(data[0][0][:5], data[0][1][:5])]
    for settings, batches in ((sharpfast.WorstCaseSettings(rho=0.05, n_iters=4), ragged),
                              (sharpfast.WorstCaseSettings(rho=0.05, n_iters=4, eval_mode=False), data),
                              (sharpfast.WorstCaseSettings(rho=0.05, n_iters=4, backend="reference"), data)):
        got = sharpfast.evaluate_many(models, batches, settings)
        assert [g.per_batch for g in got] == [sharpfast.evaluate_sharpness(m, batches, settings).per_batch
                                              for m in models]


def test_auto_stack_follows_the_memory_budget(monkeypatch):
    model, data = model_and_data("mlp", n_batches=4)
    n = sum(p.numel() for p in model.parameters())
    s = sharpfast.WorstCaseSettings(rho=0.05)
    per_model = (7 * 4 + 1) * n * 4   # the scaled solver's 7 [B, N] buffers for 4 batches, and w0, float32
    monkeypatch.setitem(many.STACK_BUFFER_BYTES, "cpu", 3 * per_model)
    assert many.auto_stack(model, sharpfast.WorstCaseSettings(rho=0.05, solver="scaled"), data) == 3
    monkeypatch.setitem(many.STACK_BUFFER_BYTES, "cpu", per_model // 2)
    assert many.auto_stack(model, s, data) == 1
    monkeypatch.setitem(many.STACK_BUFFER_BYTES, "cpu", 2**40)
    assert many.auto_stack(model, s, data) == many.MAX_STACK


def test_on_a_cpu_only_small_forwards_are_stacked(monkeypatch):
    models, data = models_and_data("cnn", dtype=torch.float32)
    assert many.activations_per_example(models[0], data[0]) == 4 * 36 * 6 + 4 * 4 + 3   # 2 convs, BNs, ReLUs; pool; head
    s = sharpfast.WorstCaseSettings(rho=0.05, n_iters=4)
    params = s.bind(models[0])
    assert many.not_stacked_because(models[0], s, params, data) is None
    monkeypatch.setattr(many, "CPU_STACK_MAX_ACTIVATIONS", 100)
    assert "883 values per example" in many.not_stacked_because(models[0], s, params, data)
    # not stacked, whatever the stack asks for: each model exactly as alone
    alone = [r.per_batch for r in one_at_a_time(models, data, s)]
    for k in (None, 1, 3):
        assert [r.per_batch for r in sharpfast.evaluate_many(models, data, s, stack=k)] == alone


def test_values_do_not_depend_on_how_models_are_split_into_stacks(no_fallback):
    models, data = models_and_data("mlp", k=5, dtype=torch.float32)
    s = sharpfast.WorstCaseSettings(rho=0.05, n_iters=5)
    by_stack = {k: [r.per_batch for r in sharpfast.evaluate_many(models, data, s, stack=k)] for k in (None, 1, 2, 3, 5)}
    # bit for bit, also one model per pass and the last stack of one model
    assert by_stack[None] == by_stack[1] == by_stack[2] == by_stack[3] == by_stack[5]


def test_half_precision_models_are_stacked_as_float32_copies(no_fallback):
    models, data = models_and_data("mlp", k=3, dtype=torch.bfloat16)
    before = [snapshot(m) for m in models]
    settings = sharpfast.WorstCaseSettings(rho=0.05, n_iters=5)
    for g, m, b in zip(sharpfast.evaluate_many(models, data, settings), models, before):
        e = sharpfast.evaluate_sharpness(m, data, settings)
        assert_close(g, e, rel=1e-4, abs_=1e-5 * max(1.0, abs(e.init_loss)), delta_rel=1e-2)
        assert_restored(m, b)
        assert m[0].weight.dtype == torch.bfloat16


def test_half_precision_models_are_refused_where_asked(no_fallback):   # each its own error, not a fallback
    models, data = models_and_data("mlp", k=2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="model 0: .*bfloat16"):
        sharpfast.evaluate_many(models, data, sharpfast.WorstCaseSettings(rho=0.05, low_precision="error"))
