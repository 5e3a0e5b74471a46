"""GSAM, LookSAM and RSAM: their reductions to SAM bit for bit, closed forms on a quadratic, and
the public code's numbers within its rounding envelope."""
import math

import pytest
import torch

from sharpfast.optim import GSAM, RSAM, SAM, LookSAM, ProportionScheduler
from tests.optim.public_sam import JuntangGSAM
from tests.optim.test_sam import SGD_KW, Quadratic, TwoPass, mlp, nudged, train, weights


@pytest.mark.parametrize("adaptive", [False, True])
def test_gsam_with_alpha_zero_is_sam(adaptive):
    rho = 1.0 if adaptive else 0.05
    m = mlp()
    got = train(m, TwoPass(GSAM(m.parameters(), torch.optim.SGD, rho=rho, alpha=0.0, adaptive=adaptive, **SGD_KW)))
    m = mlp()
    assert torch.equal(got, train(m, TwoPass(SAM(m.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive,
                                                 **SGD_KW))))


def test_lookSAM_with_k_one_is_sam():
    m = mlp()
    got = train(m, TwoPass(LookSAM(m.parameters(), torch.optim.SGD, rho=0.1, k=1, **SGD_KW)))
    m = mlp()
    assert torch.equal(got, train(m, TwoPass(SAM(m.parameters(), torch.optim.SGD, rho=0.1, **SGD_KW))))


@pytest.mark.parametrize("adaptive", [False, True])
def test_gsam_is_the_public_code_within_its_rounding_envelope(adaptive):
    rho, steps = (1.0 if adaptive else 0.05), 20
    m = mlp()
    public = train(m, JuntangGSAM(m.parameters(), torch.optim.SGD, rho, 0.4, adaptive, **SGD_KW), steps=steps)
    m = nudged(mlp())
    envelope = float((train(m, JuntangGSAM(m.parameters(), torch.optim.SGD, rho, 0.4, adaptive, **SGD_KW),
                            steps=steps) - public).abs().max())
    m = mlp()
    ours = train(m, TwoPass(GSAM(m.parameters(), torch.optim.SGD, rho=rho, alpha=0.4, adaptive=adaptive, **SGD_KW)),
                 steps=steps)
    assert 0 < envelope < 1e-5 and float((ours - public).abs().max()) <= 3 * envelope


def quadratic_gradient(q, w):
    return q.a.double() * (w - q.target.double())


def test_gsam_one_step_on_a_quadratic_is_the_closed_form():
    """w+ = w - lr (g_p - alpha g_perp), g_perp the part of g orthogonal to g_p (float64)."""
    q, lr, rho, alpha = Quadratic(torch.float64), 0.01, 0.3, 0.4
    w = q.w.detach().clone()
    g = quadratic_gradient(q, w)
    g_p = quadratic_gradient(q, w + rho * g / g.norm())
    g_perp = g - (g @ g_p) / g_p.norm() ** 2 * g_p
    assert abs(float(g_perp @ g_p)) < 1e-12 * float(g_perp.norm() * g_p.norm())
    opt = GSAM(q.parameters(), torch.optim.SGD, rho=rho, alpha=alpha, lr=lr)
    q.loss().backward()
    opt.first_step(zero_grad=True)
    q.loss().backward()
    opt.second_step(zero_grad=True)
    torch.testing.assert_close(q.w.detach(), w - lr * (g_p - alpha * g_perp), rtol=1e-12, atol=0)


def test_lookSAM_reuses_the_orthogonal_part_between_full_steps():
    """Step 0 is SAM and keeps g_v = g_s - (<g, g_s> / ||g||^2) g; step 1 takes one pass and steps
    with g + alpha (||g|| / ||g_v||) g_v (float64 closed form)."""
    q, lr, rho, alpha = Quadratic(torch.float64), 0.01, 0.3, 0.7
    opt = LookSAM(q.parameters(), torch.optim.SGD, rho=rho, k=2, alpha=alpha, lr=lr)
    w = q.w.detach().clone()
    g = quadratic_gradient(q, w)
    g_s = quadratic_gradient(q, w + rho * g / g.norm())
    g_v = g_s - (g @ g_s) / (g @ g) * g
    q.loss().backward()
    opt.first_step(zero_grad=True)
    assert opt.needs_second_pass
    q.loss().backward()
    opt.second_step(zero_grad=True)
    w1 = w - lr * g_s
    torch.testing.assert_close(q.w.detach(), w1, rtol=1e-12, atol=0)
    g1 = quadratic_gradient(q, w1)
    q.loss().backward()
    opt.first_step(zero_grad=True)   # one pass: the whole step
    assert not opt.needs_second_pass
    torch.testing.assert_close(q.w.detach(), w1 - lr * (g1 + alpha * g1.norm() / g_v.norm() * g_v), rtol=1e-12, atol=0)
    q.loss().backward()
    opt.first_step(zero_grad=True)   # step 2: a full one again
    assert opt.needs_second_pass


def test_looksam_step_with_a_closure_takes_one_or_two_passes():
    m = mlp()
    opt = LookSAM(m.parameters(), torch.optim.SGD, k=3, lr=0.1)
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    calls = []

    def closure():
        calls.append(1)
        torch.nn.functional.cross_entropy(m(x), y).backward()

    for _ in range(6):
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step(closure)
        opt.zero_grad()
    assert len(calls) == 2   # steps 0 and 3


@pytest.mark.parametrize("alpha", [1.2, 0.5])
def test_rsam_one_step_on_a_quadratic_is_the_public_formula(alpha):
    """e = -rho_t g, rho_t = sign(1 - alpha) rho P / S^(alpha + 1), S = ||g||^2 + 1e-16,
    P = sum |g_i|^(2 alpha) + 1e-16 (float64)."""
    q, lr, rho = Quadratic(torch.float64), 0.01, 0.65
    w = q.w.detach().clone()
    g = quadratic_gradient(q, w)
    rho_t = math.copysign(1.0, 1 - alpha) * rho * (g.abs().pow(2 * alpha).sum() + 1e-16) / (g @ g + 1e-16) ** (alpha + 1)
    opt = RSAM(q.parameters(), torch.optim.SGD, rho=rho, alpha=alpha, lr=lr)
    q.loss().backward()
    opt.first_step(zero_grad=True)
    torch.testing.assert_close(q.w.detach(), w - rho_t * g, rtol=1e-12, atol=0)
    q.loss().backward()
    opt.second_step(zero_grad=True)
    torch.testing.assert_close(q.w.detach(), w - lr * quadratic_gradient(q, w - rho_t * g), rtol=1e-12, atol=0)


def test_amp_reaches_the_variants_unscaled():
    """RSAM's S and P scale as scale^2 and scale^(2 alpha): unscaled inside, the step is the
    unscaled one (to rounding: pow is not exact under a power-of-2 factor)."""
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)):
        m = mlp()
        opt = RSAM(m.parameters(), torch.optim.SGD, rho=0.05, alpha=1.2, lr=0.1)
        x, y = torch.randn(16, 10, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(m(x), y)
            (scaler.scale(loss) if scaler else loss).backward()
            opt.first_step(zero_grad=True, scaler=scaler)
            loss = torch.nn.functional.cross_entropy(m(x), y)
            (scaler.scale(loss) if scaler else loss).backward()
            opt.second_step(zero_grad=True, scaler=scaler)
        runs.append(weights(m))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-6, atol=1e-7)


def test_proportion_scheduler_ties_rho_to_the_learning_rate():
    m = mlp()
    opt = GSAM(m.parameters(), torch.optim.SGD, alpha=0.4, lr=0.1)
    lr_scheduler = torch.optim.lr_scheduler.LinearLR(opt.base_optimizer, start_factor=1.0, end_factor=0.1,
                                                     total_iters=10)
    opt.rho_scheduler = ProportionScheduler(lr_scheduler, max_lr=0.1, min_lr=0.01, max_value=2.0, min_value=0.2)
    assert opt.update_rho_t() == pytest.approx(2.0)
    for _ in range(10):
        opt.base_optimizer.step()
        lr_scheduler.step()
    assert opt.update_rho_t() == pytest.approx(0.2) and opt.param_groups[0]["rho"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="max_lr must exceed min_lr"):
        ProportionScheduler(lr_scheduler, max_lr=0.1, min_lr=0.1, max_value=2.0, min_value=0.2)


def test_variants_refuse_what_they_cannot_do():
    m = mlp()
    with pytest.raises(ValueError, match="accumulation_steps must be 1"):
        GSAM(m.parameters(), torch.optim.SGD, lr=0.1, accumulation_steps=2)
    with pytest.raises(ValueError, match="alpha must be a positive number other than 1"):
        RSAM(m.parameters(), torch.optim.SGD, alpha=1.0, lr=0.1)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        LookSAM(m.parameters(), torch.optim.SGD, k=0, lr=0.1)
