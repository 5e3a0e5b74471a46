"""backend="fused" gives the reference's numbers (DESIGN.md §2-3), on every model kind.

Tolerances: in float64 the two backends differ only by summation order, so worst-case agrees
to 1e-5 relative and average-case (identical Philox draws) to 1e-6 relative. In float32 the
batched (vmapped) forward and the fused steps round differently from the per-tensor reference;
the loss differences are ~1e-7 relative, which sharpness (a difference of nearby losses)
amplifies, so float32 is compared with an absolute floor tied to the loss scale.
"""
import logging

import pytest
import torch
from torch import nn

import sharpfast
from sharpfast import _ops
from sharpfast.engine import problems
from sharpfast.engine import budget
from sharpfast.engine.budget import TOGETHER_DEVICES
from tests.memory_probe import peak_cpu_bytes
from tests.toy_models import MODEL_KINDS, model_and_data

pytestmark = pytest.mark.skipif(not _ops.available(torch.device("cpu")), reason="extension not built")

from tests.helpers import DEVICES


def on(device, model, data, dtype=torch.float64):
    model = model.to(device=device, dtype=dtype)

    def move(x):
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    return model, [(move(x), y.to(device)) for x, y in data]


WORST = [
    dict(norm="linf", adaptive=True, rho=0.05),
    dict(norm="linf", adaptive=False, rho=0.02),
    dict(norm="l2", adaptive=True, rho=0.1),
    dict(norm="l2", adaptive=False, rho=0.3),
    dict(norm="linf", adaptive=True, rho=0.05, normalize_logits=True),
    dict(norm="l2", adaptive=True, rho=0.1, normalize_logits="std", adaptive_eta=0.01),
    dict(norm="linf", adaptive=True, rho=0.05, rand_init=True, n_restarts=3),
    dict(norm="l2", adaptive=True, rho=0.1, rand_init=True, n_restarts=2, adaptive_weights_only=True),
    dict(norm="l2", adaptive=True, rho=0.1, step_size_mult=0.5, n_iters=13),
    dict(norm="l2", adaptive=True, rho=0.1, solver="scaled"),
    dict(norm="linf", adaptive=True, rho=0.05, solver="scaled", init="random", n_restarts=2),
    dict(norm="l2", adaptive=False, rho=0.3, solver="scaled", init="eigen", adaptive_weights_only=True),
    dict(norm="l2", adaptive=True, rho=0.1, init="eigen"),
]


def assert_same(fused, ref, rel, abs_=0.0, delta_rel=None):
    assert fused.backend == "fused" and ref.backend == "reference"
    assert fused.per_batch == pytest.approx(ref.per_batch, rel=rel, abs=abs_)
    assert fused.sharpness == pytest.approx(ref.sharpness, rel=rel, abs=abs_)
    if ref.err_sharpness is None:
        assert fused.err_sharpness is None
    else:
        assert fused.per_batch_err == pytest.approx(ref.per_batch_err, abs=1e-9)
    assert fused.delta_norm == pytest.approx(ref.delta_norm, rel=delta_rel or max(rel, 1e-5), abs=abs_)
    assert fused.init_loss == pytest.approx(ref.init_loss, rel=rel, abs=abs_)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("definition", WORST, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("together", [None, True])   # device default; all m-batches in one vmapped pass
def test_worst_case_fused_equals_reference(device, kind, definition, together):
    model, data = on(device, *model_and_data(kind, n_batches=2))
    kw = dict(n_iters=10, seed=4, solve_batches_together=together)
    kw.update(definition)
    ref = sharpfast.worst_case_sharpness(model, data, backend="reference", **kw)
    fused = sharpfast.worst_case_sharpness(model, data, backend="fused", **kw)
    # The vmapped forward rounds differently; where a gradient is zero in exact arithmetic (the
    # attention's key bias: softmax ignores a shift) linf's sign(g) follows the rounding noise, so
    # delta differs on those coordinates while every loss agrees. Only ||delta|| sees it.
    # (None means together on a GPU: TOGETHER_DEVICES)
    solved_together = together if together is not None else device in TOGETHER_DEVICES
    noise_signs = solved_together and kind == "transformer" and definition["norm"] == "linf"
    assert_same(fused, ref, rel=1e-5, abs_=1e-10, delta_rel=1e-2 if noise_signs else None)


AVERAGE = [
    dict(norm="l2", adaptive=True, rho=0.1),
    dict(norm="linf", adaptive=True, rho=0.1),
    dict(norm="l2", adaptive=False, rho=0.05, normalize_logits=True),
    dict(norm="l2", adaptive=True, rho=0.1, antithetic=True),
    dict(norm="linf", adaptive=True, rho=0.2, adaptive_weights_only=True, adaptive_eta=0.05),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("definition", AVERAGE, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("samples_per_pass", [None, 1, 4])   # device default, sequential, vmapped chunks
def test_average_case_fused_equals_reference_on_identical_draws(device, kind, definition, samples_per_pass):
    model, data = on(device, *model_and_data(kind, n_batches=2))
    kw = dict(n_samples=6, seed=9, samples_per_pass=samples_per_pass)
    kw.update(definition)
    ref = sharpfast.average_sharpness(model, data, backend="reference", **kw)
    fused = sharpfast.average_sharpness(model, data, backend="fused", **kw)
    assert_same(fused, ref, rel=1e-6, abs_=1e-12)


@pytest.mark.parametrize("definition", [dict(adaptive=True), dict(adaptive=False), dict(adaptive_weights_only=True)])
def test_channels_last_parameters(definition):
    """Non-contiguous parameters (channels_last convolution kernels) are read in logical order:
    one sample at a time, where w0 comes straight from the user's tensors, and in APGD."""
    model, data = on("cpu", *model_and_data("cnn", n_batches=2))
    model = model.to(memory_format=torch.channels_last)
    assert any(not p.is_contiguous() for p in model.parameters())
    for fn, kw in ((sharpfast.average_sharpness, dict(n_samples=4, samples_per_pass=1, rho=0.1)),
                   (sharpfast.worst_case_sharpness, dict(n_iters=5, rho=0.05, norm="l2"))):
        kw.update(definition)
        assert_same(fn(model, data, backend="fused", **kw), fn(model, data, backend="reference", **kw),
                    rel=1e-6, abs_=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
def test_float32_models_agree_within_float32_rounding(kind):
    model, data = model_and_data(kind, n_batches=2)
    for fn, kw in ((sharpfast.worst_case_sharpness, dict(n_iters=8, norm="linf", rho=0.05)),
                   (sharpfast.worst_case_sharpness, dict(n_iters=8, norm="l2", rho=0.1)),
                   (sharpfast.average_sharpness, dict(n_samples=8, rho=0.1)),
                   (sharpfast.average_sharpness, dict(n_samples=8, rho=0.1, samples_per_pass=8))):
        ref = fn(model, data, backend="reference", **kw)
        fused = fn(model, data, backend="fused", **kw)
        assert_same(fused, ref, rel=1e-4, abs_=1e-5 * max(1.0, abs(ref.init_loss)))


def test_custom_scale_with_frozen_coordinates():
    model, data = on("cpu", *model_and_data("mlp"))
    scale = {"0.weight": (torch.rand_like(model[0].weight) > 0.5).double(), "2.bias": torch.zeros_like(model[2].bias)}
    for norm in ("l2", "linf"):
        kw = dict(rho=0.1, norm=norm, adaptive=False, scale=scale, n_iters=8)
        assert_same(sharpfast.worst_case_sharpness(model, data, backend="fused", **kw),
                    sharpfast.worst_case_sharpness(model, data, backend="reference", **kw), rel=1e-5, abs_=1e-10)


def test_auto_picks_fused_on_cpu_and_reference_for_mixed_dtypes():
    model, data = model_and_data("mlp")
    assert sharpfast.average_sharpness(model, data, rho=0.1, n_samples=2).backend == "fused"
    model[0].double()
    mixed = [(x, y) for x, y in data]
    model[0].register_forward_pre_hook(lambda m, a: (a[0].double(),))
    model[2].register_forward_pre_hook(lambda m, a: (a[0].float(),))
    assert sharpfast.average_sharpness(model, mixed, rho=0.1, n_samples=2).backend == "reference"
    with pytest.raises(RuntimeError, match="several dtypes"):
        sharpfast.average_sharpness(model, mixed, rho=0.1, n_samples=2, backend="fused")


class NotVmappable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 3).double()

    def forward(self, x):
        out = self.lin(x)
        return out * 0 if float(out.sum()) > 1e9 else out   # data-dependent Python control flow: vmap cannot trace it


def test_sequential_fallback_when_the_model_cannot_be_vmapped(caplog):
    torch.manual_seed(0)
    model = NotVmappable()
    data = [(torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,)))]
    with caplog.at_level(logging.DEBUG, logger="sharpfast.fused"):
        fused = sharpfast.average_sharpness(model, data, rho=0.1, n_samples=5, backend="fused", samples_per_pass=5)
    assert any("vmap" in r.message for r in caplog.records)
    ref = sharpfast.average_sharpness(model, data, rho=0.1, n_samples=5, backend="reference")
    assert_same(fused, ref, rel=1e-6, abs_=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_evaluate_in_their_dtype(dtype):
    model, data = model_and_data("mlp")
    model = model.to(dtype)
    data = [(x.to(dtype), y) for x, y in data]
    for fn, kw in ((sharpfast.worst_case_sharpness, dict(n_iters=5, rho=0.05)),
                   (sharpfast.average_sharpness, dict(n_samples=4, rho=0.05))):
        ref = fn(model, data, backend="reference", **kw)
        fused = fn(model, data, backend="fused", **kw)
        assert all(p.dtype == dtype for p in model.parameters())
        assert abs(fused.sharpness - ref.sharpness) <= 2e-2 * max(1.0, abs(ref.init_loss))
        assert fused.init_loss == pytest.approx(ref.init_loss, rel=1e-6)   # same point, fp32 loss


def test_fused_reports_non_finite_losses():
    model, data = on("cpu", *model_and_data("mlp"))
    with pytest.raises(ValueError, match="perturbed|not finite"):
        sharpfast.worst_case_sharpness(model, data, rho=1e200, adaptive=False, n_iters=3, backend="fused",
                                       loss_fn=lambda out, y: (out ** 4).mean())


@pytest.mark.parametrize("definition", [dict(norm="linf", rho=0.05), dict(norm="l2", rho=0.1, rand_init=True, n_restarts=2)])
def test_batches_solved_together_by_default_where_enabled(monkeypatch, definition):
    monkeypatch.setattr(budget, "TOGETHER_DEVICES", ("cpu", "cuda"))
    vmapped = []
    evaluate = problems.AllBatches.evaluate
    monkeypatch.setattr(problems.AllBatches, "evaluate", lambda self, **kw: vmapped.append(1) or evaluate(self, **kw))
    for kind in ("mlp", "cnn", "dict"):
        model, data = on("cpu", *model_and_data(kind, n_batches=3))
        kw = dict(n_iters=7, seed=2, **definition)
        vmapped.clear()
        assert_same(sharpfast.worst_case_sharpness(model, data, backend="fused", **kw),
                    sharpfast.worst_case_sharpness(model, data, backend="reference", **kw), rel=1e-5, abs_=1e-10)
        # one vmapped evaluation per APGD step for all three batches (+ L0 with a random start)
        assert len(vmapped) == kw.get("n_restarts", 1) * (kw["n_iters"] + 1) + (1 if kw.get("rand_init") else 0)


def test_a_single_batch_asked_to_be_solved_together_is_solved_on_its_own():
    model, data = on("cpu", *model_and_data("mlp", n_batches=1))
    assert_same(sharpfast.worst_case_sharpness(model, data, rho=0.05, n_iters=5, backend="fused",
                                               solve_batches_together=True),
                sharpfast.worst_case_sharpness(model, data, rho=0.05, n_iters=5, backend="reference"),
                rel=1e-5, abs_=1e-10)


def test_batches_solved_one_by_one_when_the_model_cannot_be_vmapped(monkeypatch, caplog):
    monkeypatch.setattr(budget, "TOGETHER_DEVICES", ("cpu", "cuda"))
    torch.manual_seed(0)
    model = NotVmappable()
    data = [(torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))) for _ in range(3)]
    with caplog.at_level(logging.DEBUG, logger="sharpfast.fused"):
        fused_r = sharpfast.worst_case_sharpness(model, data, rho=0.05, n_iters=5, backend="fused")
    assert any("one by one" in r.message for r in caplog.records)
    assert_same(fused_r, sharpfast.worst_case_sharpness(model, data, rho=0.05, n_iters=5, backend="reference"),
                rel=1e-5, abs_=1e-10)
    with pytest.raises(RuntimeError):   # asked for explicitly: vmap's own error reaches the caller
        sharpfast.worst_case_sharpness(model, data, rho=0.05, n_iters=5, backend="fused", solve_batches_together=True)


def test_solving_batches_together_needs_one_shape_and_eval_mode():
    model, data = on("cpu", *model_and_data("mlp", n_batches=2))
    ragged = [data[0], (data[1][0][:5], data[1][1][:5])]
    with pytest.raises(ValueError, match="one shape"):
        sharpfast.worst_case_sharpness(model, ragged, rho=0.05, backend="fused", solve_batches_together=True)
    with pytest.raises(ValueError, match="eval_mode"):
        sharpfast.worst_case_sharpness(model, data, rho=0.05, backend="fused", solve_batches_together=True,
                                       eval_mode=False)
    with pytest.raises(TypeError, match="solve_batches_together"):
        sharpfast.worst_case_sharpness(model, data, rho=0.05, solve_batches_together="yes")
    with pytest.raises(ValueError, match="samples_per_pass"):
        sharpfast.average_sharpness(model, data, rho=0.05, samples_per_pass=0)
    with pytest.raises(TypeError, match="samples_per_pass"):
        sharpfast.average_sharpness(model, data, rho=0.05, samples_per_pass=True)
    # one batch of a different shape is fine one by one, and the default on a CPU
    r = sharpfast.worst_case_sharpness(model, ragged, rho=0.05, n_iters=3, backend="fused")
    assert len(r.per_batch) == 2


# ------------------------------------------------------------------------------ memory

@pytest.mark.parametrize("definition, buffers, slack", [
    (dict(norm="linf"), 6, 0.35), (dict(norm="l2"), 6, 0.35), (dict(norm="l2", adaptive=False), 6, 0.35),
    (dict(norm="l2", rand_init=True, adaptive_eta=0.1), 6, 0.35),
    (dict(norm="linf", adaptive_weights_only=True), 7, 0.35),   # a mixed scale is a buffer
    # two batches together: 5 [B, N] buffers, the vmapped gradient before its copy, and w0
    # (vmapped per-layer transients are twice as large)
    (dict(norm="linf", solve_batches_together=True), 13, 0.7),
    # the scaled solver keeps its best point: u, u_prev, u_best in place of delta, delta_prev
    (dict(norm="l2", solver="scaled"), 7, 0.35), (dict(norm="linf", solver="scaled", init="random"), 7, 0.35),
])
def test_worst_case_parameter_sized_buffers(definition, buffers, slack):
    """DESIGN.md §5: at most 4 parameter-sized buffers beyond the weights and gradient of a training
    step. The call holds w0, the perturbed weights, the gradient, delta, delta_prev and the
    gradient at the best point; the scale is derived from w0 in the kernels unless it is mixed.
    Many small layers keep the per-layer transients of autograd and the activations small."""
    torch.manual_seed(0)
    layers = [nn.Linear(32, 64), nn.ReLU()] + [m for _ in range(12) for m in (nn.Linear(64, 64), nn.ReLU())]
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    n = sum(p.numel() for p in model.parameters())
    data = [(torch.randn(8, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    peak = peak_cpu_bytes(lambda: sharpfast.worst_case_sharpness(model, data, rho=0.01, n_iters=6, backend="fused",
                                                                 **definition))
    assert buffers - 0.5 < peak / (4 * n) <= buffers + slack


@pytest.mark.parametrize("samples_per_pass, definition, buffers", [
    (1, dict(), 1), (1, dict(adaptive_weights_only=True), 2),   # a mixed scale is a buffer
    (4, dict(), 5),                                             # K rows and the flat w0 they are written from
])
def test_average_case_parameter_sized_buffers(samples_per_pass, definition, buffers):
    """DESIGN.md §5: at most 1 parameter-sized buffer (+ K when batching). One sample at a time the
    perturbed weights are written from the user's own tensors, the scale derived from them."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(64, 64), nn.ReLU())], nn.Linear(64, 10))
    n = sum(p.numel() for p in model.parameters())
    data = [(torch.randn(8, 64), torch.randint(0, 10, (8,)))]
    peak = peak_cpu_bytes(lambda: sharpfast.average_sharpness(model, data, rho=0.01, n_samples=4, backend="fused",
                                                              samples_per_pass=samples_per_pass, **definition))
    assert buffers - 0.5 < peak / (4 * n) <= buffers + 0.25


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("bucket_view", [False, True])
def test_a_ddp_wrapped_model_has_the_bare_models_values_from_the_first_call(one_process_group, bucket_view):
    """DDP with gradient_as_bucket_view=True points .grad at its buckets when it rebuilds them
    (in the second forward of the first call): each backward must accumulate into the call's own
    zeroed gradient, not into a bucket holding the last step's gradient."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)).double()
    torch.manual_seed(1)
    data = [(torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 4, (16,))) for _ in range(3)]
    for n_iters in (2, 5):
        settings = sharpfast.WorstCaseSettings(rho=0.05, norm="l2", n_iters=n_iters, backend="fused")
        bare = sharpfast.evaluate_sharpness(make(), data, settings).per_batch
        wrapped = nn.parallel.DistributedDataParallel(make(), gradient_as_bucket_view=bucket_view)
        for call in range(2):
            assert sharpfast.evaluate_sharpness(wrapped, data, settings).per_batch == bare, (n_iters, call)
