"""SSAM, ESAM and the SAF / MESA losses: their reductions to SAM bit for bit, the masks' and the
selections' rules, and the KL terms against their formula."""
import copy
import math

import pytest
import torch
from torch import nn

from sharpfast.optim import ESAM, SAM, SSAM, EMATeacherKL, TrajectoryKL, fisher_scores
from tests.optim.test_sam import SGD_KW, Quadratic, TwoPass, data, mlp, train, weights


def test_ssam_with_sparsity_zero_is_sam():
    m = mlp()
    got = train(m, TwoPass(SSAM(m.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.0, **SGD_KW)))
    m = mlp()
    assert torch.equal(got, train(m, TwoPass(SAM(m.parameters(), torch.optim.SGD, rho=0.05, eps=1e-7, **SGD_KW))))


def test_ssam_perturbs_the_masked_entries_by_the_unmasked_norm():
    q, rho = Quadratic(torch.float64), 0.3
    opt = SSAM(q.parameters(), torch.optim.SGD, rho=rho, sparsity=0.5, lr=0.01)
    mask = opt.masks[q.w].double()
    assert int(mask.sum()) == 25 and opt.density() == 0.5   # N - ceil(N s) live entries
    w = q.w.detach().clone()
    q.loss().backward()
    g = q.w.grad.clone()
    opt.first_step(zero_grad=True)
    torch.testing.assert_close(q.w.detach(), w + mask * rho * g / (g.norm() + 1e-7), rtol=1e-12, atol=0)


def test_ssam_dynamic_mask_keeps_its_density_and_follows_the_gradient():
    m = mlp()
    opt = SSAM(m.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.2, T_end=10, lr=0.1)
    n = sum(p.numel() for p in m.parameters())
    x, y = data()
    nn.functional.cross_entropy(m(x), y).backward()
    opt.update_mask(epoch=0)   # death rate 0.5 at the start of the cosine
    live_before = n - math.ceil(n * 0.2)
    kept, grown = int((n - n * 0.2) * 0.5), int(min((n - n * 0.2) * 0.5, n * 0.2))   # the public counts
    assert live_before == 181 and opt.density() == (kept + grown) / n
    assert opt.death_rate(0) == pytest.approx(0.5) and opt.death_rate(10) == pytest.approx(0.0)
    live = torch.cat([opt.masks[p].flatten() for p in m.parameters()])
    grads = torch.cat([p.grad.abs().flatten() for p in m.parameters()])
    assert grads[live].mean() > grads[~live].mean()   # the drop kept the live entries of largest |g|


def test_ssam_fisher_mask_starts_empty_and_keeps_the_largest_scores():
    m = mlp()
    opt = SSAM(m.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.9, mask="fisher", lr=0.0)
    before = weights(m)
    x, y = data()
    nn.functional.cross_entropy(m(x), y).backward()
    opt.first_step(zero_grad=True)
    assert torch.equal(weights(m), before)   # no entry perturbed before the first update
    nn.functional.cross_entropy(m(x), y).backward()
    opt.second_step(zero_grad=True)
    scores = fisher_scores(m, list(zip(x[:16], y[:16])))
    opt.update_mask(fisher=scores)
    flat = torch.cat([scores[p].flatten() for p in m.parameters()])
    live = torch.cat([opt.masks[p].flatten() for p in m.parameters()])
    assert int(live.sum()) == int(len(flat) * 0.1) and flat[live].min() >= flat[~live].max()


def per_example(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def test_esam_with_beta_and_gamma_one_is_sam():
    x, y = data()
    m = mlp()
    opt = ESAM(m.parameters(), torch.optim.SGD, rho=0.05, **SGD_KW)
    for _ in range(20):
        opt.step(m, x, y, per_example)
    m2 = mlp()
    assert torch.equal(weights(m), train(m2, TwoPass(SAM(m2.parameters(), torch.optim.SGD, rho=0.05, eps=1e-7,
                                                         **SGD_KW)), steps=20))


def test_esam_selects_the_sharpest_examples_and_lets_tensors_sit_out():
    x, y = data()
    m = mlp()
    sizes = []

    def counting(outputs, targets):
        sizes.append(len(targets))
        return per_example(outputs, targets)

    opt = ESAM(m.parameters(), torch.optim.SGD, rho=0.05, beta=0.5, gamma=0.5, lr=0.1, seed=1)
    opt.step(m, x, y, counting)
    assert sizes == [64, 64, 31]   # the first pass, the loss at w + e, the examples above the 32nd largest
    draws = torch.rand(4, generator=torch.Generator().manual_seed(1))   # two of the four sit out
    assert [not p.requires_grad for p in m.parameters()] == (draws > 0.5).tolist()   # sitting out the next pass
    opt.first_step()
    assert all(p.requires_grad for p in m.parameters())   # back for the second pass


def test_trajectory_kl_compares_with_the_logits_epochs_back():
    torch.manual_seed(0)
    term = TrajectoryKL(n_examples=10, n_classes=3, lam=0.5, temperature=2.0, epochs_back=2, kl_start=1, kl_end=9)
    idx = torch.tensor([1, 4, 7])
    history = [torch.randn(3, 3) for _ in range(4)]
    for epoch, z in enumerate(history[:3]):
        out = term(z, idx, epoch)
        if epoch <= 1:
            assert out == 0
    z = history[3]
    want = 0.5 * 4.0 * (torch.softmax(history[1] / 2, -1) * (torch.log_softmax(history[1] / 2, -1)
                                                               - torch.log_softmax(z / 2, -1))).sum(-1).mean()
    torch.testing.assert_close(term(z, idx, 3), want, rtol=1e-5, atol=1e-7)


def test_ema_teacher_kl_follows_the_model():
    m = mlp()
    x, _ = data()
    term = EMATeacherKL(m, decay=0.0, kl_start=-1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1)
    assert float(term(m(x), x, epoch=0).detach()) > 1e-4     # the teacher is the model it was built from
    term.update(m)                           # decay 0: the teacher is the model now
    assert abs(float(term(m(x), x, epoch=0).detach())) < 1e-6
    frozen = EMATeacherKL(copy.deepcopy(m), decay=1.0)
    frozen.update(mlp(seed=9))
    assert all(torch.equal(a, b) for a, b in zip(frozen.teacher.module.parameters(), m.parameters()))
