"""SAM and ASAM: the public code's weights bit for bit (compat), the fused path within the public
code's own rounding envelope, closed forms on a quadratic, and what the public code gets wrong
(checkpoints, BatchNorm, a parameter without a gradient in the second pass, an exception)."""
import copy
import io

import pytest
import torch
from torch import nn

from sharpfast.optim import ASAM, SAM
from tests.optim.public_sam import Davda54, Samsung

SGD_KW = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
STEPS = 50


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 10, generator=g), torch.randint(0, 3, (64,), generator=g)


def mlp(seed=1, dtype=torch.float32):
    """(A) of the test plan: 10 -> 16 -> 3, tanh, no BatchNorm or dropout."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def train(model, opt, steps=STEPS, x=None, y=None):
    """The two-pass loop of davda54/sam's README."""
    x, y = data() if x is None else (x, y)
    loss = nn.CrossEntropyLoss()
    for _ in range(steps):
        loss(model(x.to(weights(model).dtype)), y).backward()
        opt.first_step()
        loss(model(x.to(weights(model).dtype)), y).backward()
        opt.second_step()
    return weights(model)


class TwoPass:
    """sharpfast's optimizers driven like the public ones (zero_grad after each step)."""

    def __init__(self, opt):
        self.opt = opt

    def first_step(self):
        self.opt.first_step(zero_grad=True)

    def second_step(self):
        self.opt.second_step(zero_grad=True)


def plain(model, base_cls, steps=STEPS, **kw):
    """The base optimizer alone, two forward/backward passes per step as SAM does."""
    opt = base_cls(model.parameters(), **kw)
    x, y = data()
    loss = nn.CrossEntropyLoss()
    for _ in range(steps):
        loss(model(x), y).backward()
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return weights(model)


# ----------------------------------------------------------------------------- the public code's numbers

@pytest.mark.parametrize("compat", [None, "davda54"])
@pytest.mark.parametrize("base_cls, kw", [(torch.optim.SGD, SGD_KW), (torch.optim.AdamW, dict(lr=1e-2))],
                         ids=["sgd", "adamw"])
def test_rho_zero_is_the_base_optimizer(compat, base_cls, kw):
    m = mlp()
    got = train(m, TwoPass(SAM(m.parameters(), base_cls, rho=0.0, compat=compat, **kw)))
    assert torch.equal(got, plain(mlp(), base_cls, **kw))


@pytest.mark.parametrize("adaptive", [False, True])
def test_davda54_compat_is_its_weights_bit_for_bit(adaptive):
    rho = 2.0 if adaptive else 0.05
    m = mlp()
    got = train(m, TwoPass(SAM(m.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, compat="davda54",
                               **SGD_KW)))
    m = mlp()
    assert torch.equal(got, train(m, Davda54(m.parameters(), torch.optim.SGD, rho, adaptive, **SGD_KW)))


@pytest.mark.parametrize("eta", [0.0, 0.01])
def test_samsung_compat_is_its_weights_bit_for_bit(eta):
    m = mlp()
    got = train(m, TwoPass(ASAM(m.named_parameters(), torch.optim.SGD, rho=0.5, eta=eta, compat="samsung", **SGD_KW)))
    m = mlp()
    assert torch.equal(got, train(m, Samsung(m.named_parameters(), torch.optim.SGD, 0.5, eta, **SGD_KW)))
    m = mlp()   # its SAM class: no |w| + eta, the same norm and restore
    got = train(m, TwoPass(SAM(m.named_parameters(), torch.optim.SGD, rho=0.05, compat="samsung", **SGD_KW)))
    m = mlp()
    assert torch.equal(got, train(m, Samsung(m.named_parameters(), torch.optim.SGD, 0.05, 0.0, adaptive=False,
                                             **SGD_KW)))


def nudged(model):
    """The model with every weight one ulp up."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
    return model


@pytest.mark.parametrize("make, compat", [
    (lambda m, **kw: SAM(m.parameters(), torch.optim.SGD, rho=0.05, **kw, **SGD_KW), "davda54"),
    (lambda m, **kw: SAM(m.parameters(), torch.optim.SGD, rho=2.0, adaptive=True, **kw, **SGD_KW), "davda54"),
    (lambda m, **kw: ASAM(m.named_parameters(), torch.optim.SGD, rho=0.5, eta=0.01, **kw, **SGD_KW), "samsung"),
], ids=["sam", "adaptive", "asam"])
def test_the_fused_path_is_within_the_public_codes_rounding_envelope(make, compat):
    """Per step the fused path rounds differently (its norm is summed in float64 in another
    order), and 50 steps amplify any difference: the test plan's criterion is 3x the distance
    between two runs of the public arithmetic whose initial weights differ by one ulp."""
    m = mlp()
    public = train(m, TwoPass(make(m, compat=compat)))
    m = nudged(mlp())
    envelope = float((train(m, TwoPass(make(m, compat=compat))) - public).abs().max())
    m = mlp()
    fused = train(m, TwoPass(make(m)))
    assert 0 < envelope < 1e-5
    assert float((fused - public).abs().max()) <= 3 * envelope


# ----------------------------------------------------------------------------- closed forms

class Quadratic(nn.Module):
    """L = 1/2 (w - w*)^T diag(a) (w - w*), a log-spaced in [1e-2, 1e2], 50 dimensions."""

    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a = torch.logspace(-2, 2, 50, dtype=dtype)
        self.target = torch.randn(50, generator=g, dtype=torch.float64).to(dtype)
        self.w = nn.Parameter(torch.randn(50, generator=g, dtype=torch.float64).to(dtype))

    def loss(self):
        d = self.w - self.target
        return 0.5 * (self.a * d * d).sum()


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("adaptive", [False, True])
def test_one_step_on_a_quadratic_is_the_closed_form(dtype, rtol, adaptive):
    q, lr, rho = Quadratic(dtype), 0.01, 0.3
    w = q.w.detach().double().clone()
    a, target = q.a.double(), q.target.double()
    g = a * (w - target)
    e = rho * w**2 * g / (w * g).norm() if adaptive else rho * g / g.norm()
    want = w - lr * a * (w - target + e)
    opt = SAM(q.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr)
    q.loss().backward()
    opt.first_step(zero_grad=True)
    torch.testing.assert_close(q.w.detach().double(), w + e, rtol=rtol, atol=0)   # the ascent
    q.loss().backward()
    opt.second_step(zero_grad=True)
    torch.testing.assert_close(q.w.detach().double(), want, rtol=rtol, atol=0)


@pytest.mark.parametrize("compat", [None, "davda54"])
def test_a_learning_rate_of_zero_leaves_the_weights_unchanged(compat):
    m = mlp()
    before = weights(m)
    train(m, TwoPass(SAM(m.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, compat=compat, lr=0.0)), steps=3)
    assert torch.equal(weights(m), before)   # restored by copy (the Samsung code's subtraction is off by ~1e-8)
    m = mlp()
    train(m, TwoPass(ASAM(m.named_parameters(), torch.optim.SGD, lr=0.0)), steps=3)
    assert torch.equal(weights(m), before)


# ----------------------------------------------------------------------------- where the public code breaks

@pytest.mark.parametrize("base_cls, kw", [(torch.optim.SGD, SGD_KW), (torch.optim.AdamW, dict(lr=1e-2))],
                         ids=["sgd", "adamw"])
def test_a_checkpoint_round_trip_continues_bit_for_bit(base_cls, kw):
    """state_dict() is the base optimizer's (momentum, Adam's moments); davda54/sam saves only its
    copy of the weights, and a resumed run starts with fresh moments."""
    m = mlp()
    uninterrupted = train(m, TwoPass(SAM(m.parameters(), base_cls, rho=0.05, **kw)), steps=20)
    m = mlp()
    opt = SAM(m.parameters(), base_cls, rho=0.05, **kw)
    train(m, TwoPass(opt), steps=10)
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert "momentum_buffer" in str(saved["opt"]) or "exp_avg" in str(saved["opt"])
    m2 = mlp(seed=5)
    m2.load_state_dict(saved["model"])
    opt2 = SAM(m2.parameters(), base_cls, rho=0.05, **kw)
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert torch.equal(train(m2, TwoPass(opt2), steps=10), uninterrupted)


def test_batchnorm_statistics_come_from_the_first_pass_with_model():
    """(B) of the test plan: conv-BN-linear; with model= the running statistics after a step are
    those of one train-mode forward at w (the original JAX code's); without it the second pass,
    at w + e, moves them again (davda54/sam)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 3, (32,))
    reference, without = copy.deepcopy(net), copy.deepcopy(net)
    reference(x)   # one train-mode forward at w
    for model, keep in ((net, net), (without, None)):
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=keep)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    for a, b in zip(net[1].buffers(), reference[1].buffers()):
        assert torch.equal(a, b)
    assert without[1].num_batches_tracked == 2 and not torch.equal(without[1].running_mean, net[1].running_mean)


def test_a_parameter_without_a_gradient_in_the_second_pass_is_restored():
    m = mlp()
    before = [p.detach().clone() for p in m.parameters()]
    opt = SAM(m.parameters(), torch.optim.SGD, rho=0.5, lr=0.0)
    x, y = data()
    nn.functional.cross_entropy(m(x), y).backward()
    opt.first_step(zero_grad=True)
    nn.functional.cross_entropy(m(x), y).backward()
    m[2].bias.grad = None   # e.g. zeroed with set_to_none and unused in the second pass
    opt.second_step(zero_grad=True)
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p, b)


def test_an_exception_in_the_closure_puts_the_weights_back():
    m = mlp()
    before = weights(m)
    opt = SAM(m.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    x, y = data()
    nn.functional.cross_entropy(m(x), y).backward()

    def closure():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert torch.equal(weights(m), before)
    nn.functional.cross_entropy(m(x), y).backward()   # and the optimizer goes on
    opt.step(lambda: nn.functional.cross_entropy(m(x), y).backward())
    assert not torch.equal(weights(m), before)


def test_step_with_a_closure_equals_the_two_steps():
    x, y = data()
    m = mlp()
    opt = SAM(m.parameters(), torch.optim.SGD, rho=0.05, **SGD_KW)
    for _ in range(5):
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step(lambda: nn.functional.cross_entropy(m(x), y).backward())
        opt.zero_grad()
    m2 = mlp()
    assert torch.equal(weights(m), train(m2, TwoPass(SAM(m2.parameters(), torch.optim.SGD, rho=0.05, **SGD_KW)),
                                         steps=5))


def test_parameters_in_other_layouts_take_the_same_step():
    """A channels-last convolution (dense, not contiguous) and a transposed view (neither): the
    fused ops read the first through its storage, the second takes the PyTorch expression."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    lin = nn.Linear(6, 4)
    lin.weight = nn.Parameter(torch.randn(6, 4).t())   # not dense in row-major order
    assert not conv.weight.is_contiguous() and not lin.weight.is_contiguous()
    params = [conv.weight, conv.bias, lin.weight, lin.bias]
    x = torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)

    def loss():
        return conv(x).square().mean() + lin(torch.randn(3, 6, generator=torch.Generator().manual_seed(1))).sum()

    copies = [p.detach().clone() for p in params]
    opt = SAM(params, torch.optim.SGD, rho=0.1, adaptive=True, lr=0.1)
    loss().backward()
    grads = [p.grad.clone() for p in params]
    opt.first_step()
    norm = torch.stack([(w.abs() * g).double().norm() for w, g in zip(copies, grads)]).norm()
    for p, w, g in zip(params, copies, grads):
        torch.testing.assert_close(p.detach(), w + w * w * g * float(0.1 / (norm + 1e-12)), rtol=1e-6, atol=1e-7)
    opt.second_step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- bad input

def test_bad_arguments_are_refused():
    m = mlp()
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        SAM(m.parameters(), torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="compat must be one of"):
        SAM(m.parameters(), torch.optim.SGD, compat="sam", lr=0.1)
    with pytest.raises(ValueError, match="eta must be 0"):
        SAM(m.parameters(), torch.optim.SGD, compat="davda54", eta=0.01, lr=0.1)
    with pytest.raises(TypeError, match="torch.optim.Optimizer class"):
        SAM(m.parameters(), torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="pass model.named_parameters"):
        opt = ASAM(m.parameters(), torch.optim.SGD, lr=0.1)
        nn.functional.cross_entropy(m(data()[0]), data()[1]).backward()
        opt.first_step()
    opt = SAM(m.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="second_step\\(\\) without first_step"):
        opt.second_step()
    nn.functional.cross_entropy(m(data()[0]), data()[1]).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="first_step\\(\\) called twice"):
        opt.first_step()


# ----------------------------------------------------------------------------- AMP and accumulation

def amp_run(scaler, steps=20, inf_at=None):
    m = mlp()
    opt = SAM(m.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, **SGD_KW)
    x, y = data()
    history = []
    for i in range(steps):
        loss = nn.functional.cross_entropy(m(x), y) * (float("inf") if i == inf_at else 1.0)
        (scaler.scale(loss) if scaler else loss).backward()
        opt.first_step(zero_grad=True, scaler=scaler)
        loss = nn.functional.cross_entropy(m(x), y)
        (scaler.scale(loss) if scaler else loss).backward()
        opt.second_step(zero_grad=True, scaler=scaler)
        history.append(weights(m))
    return history, scaler


def test_amp_a_scaled_loss_gives_the_unscaled_step_bit_for_bit():
    """The GradScaler protocol: the first pass's gradients are unscaled inside the norm, the
    second pass's by scaler.step; with a power-of-2 scale both are exact."""
    unscaled, _ = amp_run(None)
    scaled, scaler = amp_run(torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000))
    assert all(torch.equal(a, b) for a, b in zip(unscaled, scaled))
    assert scaler.get_scale() == 2.0**12


def test_amp_an_overflow_in_the_first_pass_skips_the_whole_step():
    history, scaler = amp_run(torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000), steps=6,
                              inf_at=3)
    assert torch.equal(history[3], history[2])   # step 3 skipped: the weights did not move ...
    assert not torch.equal(history[4], history[3])   # ... and training goes on
    assert scaler.get_scale() == 2.0**11             # with the scale backed off once
    assert all(torch.isfinite(h).all() for h in history)


def test_accumulation_per_microbatch_is_understanding_sams_m_sam():
    """Four micro-batches of 16, each with its own perturbation, one base step with the sum of
    their second-pass gradients: tml-epfl/understanding-sam's loop (its delta subtracted, ours
    copied back; its norm in float32, ours in float64) to 1e-6."""
    from tests.optim.public_sam import understanding_sam_step
    x, y = data()
    micro = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    loss = nn.CrossEntropyLoss()
    m = mlp()
    opt = SAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, accumulation_steps=4)
    for _ in range(5):
        for xb, yb in micro:
            (loss(m(xb), yb) / 4).backward()
            opt.first_step(zero_grad=True)
            (loss(m(xb), yb) / 4).backward()
            opt.second_step(zero_grad=True)
    ref = mlp()
    base = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        understanding_sam_step(ref, list(ref.parameters()), base, micro, loss, 0.1)
    torch.testing.assert_close(weights(m), weights(ref), rtol=1e-6, atol=1e-7)


def test_accumulation_global_is_full_batch_sam():
    """One perturbation for all micro-batches: both passes accumulated as usual around one pair
    of steps equal SAM on the whole batch."""
    x, y = data()
    loss = nn.CrossEntropyLoss()
    m = mlp()
    opt = SAM(m.parameters(), torch.optim.SGD, rho=0.1, **SGD_KW)
    for _ in range(5):
        for i in range(0, 64, 16):
            (loss(m(x[i:i + 16]), y[i:i + 16]) / 4).backward()
        opt.first_step(zero_grad=True)
        for i in range(0, 64, 16):
            (loss(m(x[i:i + 16]), y[i:i + 16]) / 4).backward()
        opt.second_step(zero_grad=True)
    full = mlp()
    torch.testing.assert_close(weights(m), train(full, TwoPass(SAM(full.parameters(), torch.optim.SGD, rho=0.1,
                                                                   **SGD_KW)), steps=5), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- DDP

def _ddp_worker(rank, world, init_file, perturbation, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(mlp())
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=model,
                  perturbation=perturbation)
        x, y = data()
        xs, ys = x[rank * 32:(rank + 1) * 32], y[rank * 32:(rank + 1) * 32]
        for _ in range(5):
            with opt.first_pass():
                nn.functional.cross_entropy(model(xs), ys).backward()
            opt.first_step(zero_grad=True)
            nn.functional.cross_entropy(model(xs), ys).backward()
            opt.second_step(zero_grad=True)
        if rank == 0:
            torch.save(weights(model.module), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("perturbation", ["replica", "global"])
def test_ddp_two_processes(tmp_path, perturbation):
    """Two gloo processes of 32 examples each. "replica": each perturbs with its own gradient and
    the second passes are averaged, which is m-SAM over the two halves in one process;
    "global": one perturbation from the averaged gradient, which is SAM on the whole batch."""
    import torch.multiprocessing as mp
    out = tmp_path / "w.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), perturbation, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    x, y = data()
    m = mlp()
    loss = nn.CrossEntropyLoss()
    if perturbation == "replica":
        opt = SAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, accumulation_steps=2)
        for _ in range(5):
            for i in (0, 32):
                (loss(m(x[i:i + 32]), y[i:i + 32]) / 2).backward()
                opt.first_step(zero_grad=True)
                (loss(m(x[i:i + 32]), y[i:i + 32]) / 2).backward()
                opt.second_step(zero_grad=True)
        want = weights(m)
    else:
        want = train(m, TwoPass(SAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)), steps=5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_parameters_whose_storage_changes_between_steps_are_read_again():
    """The fused calls are sorted once per set of parameters; a parameter whose .data is rebound
    (or a model moved to another dtype) between steps is read where it now lies."""
    m = mlp()
    opt = SAM(m.parameters(), torch.optim.SGD, rho=0.5, lr=0.0)
    x, y = data()
    for rebind in (False, True):
        if rebind:
            with torch.no_grad():
                m[0].weight.data = m[0].weight.data.clone() * 2   # new storage
        before = weights(m)
        nn.functional.cross_entropy(m(x), y).backward()
        g = torch.cat([p.grad.flatten() for p in m.parameters()])
        opt.first_step(zero_grad=True)
        torch.testing.assert_close(weights(m), before + 0.5 * g / g.norm(), rtol=1e-6, atol=1e-7)
        nn.functional.cross_entropy(m(x), y).backward()
        opt.second_step(zero_grad=True)
        assert torch.equal(weights(m), before)
    m.double()
    before = weights(m)
    nn.functional.cross_entropy(m(x.double()), y).backward()
    opt.first_step(zero_grad=True)
    assert weights(m).dtype == torch.float64 and not torch.equal(weights(m), before)
    nn.functional.cross_entropy(m(x.double()), y).backward()
    opt.second_step(zero_grad=True)
    assert torch.equal(weights(m), before)


def test_a_parameter_converted_to_channels_last_between_steps_is_saved_in_its_new_layout():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    opt = SAM(conv.parameters(), torch.optim.SGD, rho=0.1, lr=0.0)
    x = torch.randn(2, 3, 6, 6)
    for layout in (torch.contiguous_format, torch.channels_last):
        conv.to(memory_format=layout)
        before = conv.weight.detach().clone()
        conv(x.contiguous(memory_format=layout)).square().mean().backward()
        opt.first_step(zero_grad=True)
        conv(x.contiguous(memory_format=layout)).square().mean().backward()
        opt.second_step(zero_grad=True)
        assert torch.equal(conv.weight, before)
