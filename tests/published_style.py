"""An independent oracle: DESIGN.md §2's worst-case algorithm written in the published code's style.

Per-parameter dictionaries keyed by the parameter, full ``state_dict`` copies of the best
point, the loss at every new point from a separate no-grad forward, the norms in the
parameter dtype, the bisection inline. It shares nothing with ``sharpfast.worst_case.reference`` but the
checkpoint schedule (which has its own test vectors), so agreement checks the reference.
Deterministic paths only (no random init); CPU or any device.
"""
import copy

import torch

from sharpfast.worst_case.apgd import checkpoint_schedule


def _loss_err(model, loss_f, x, y):
    with torch.no_grad():
        out = model(x)
        return loss_f(out, y).item(), (out.max(1)[1] != y).float().mean().item()


def _ascent_project(model, orig, delta, step, rho, adaptive, norm):
    params = [p for p in model.parameters() if p.requires_grad]
    if norm == "l2":
        grad_norm = sum(p.grad.norm() ** 2 for p in params) ** 0.5
        for p in params:
            delta[p] += step / (grad_norm + 1e-12) * p.grad * (orig[p].abs() if adaptive else 1)
    else:
        for p in params:
            delta[p] += step * p.grad.sign() * (orig[p].abs() if adaptive else 1)
    if norm == "linf":
        for p in params:
            c = orig[p].abs() if adaptive else torch.ones_like(orig[p])
            delta[p] = torch.max(torch.min(delta[p], c * rho), -c * rho)
        return delta

    def weighted_norm(d):
        return sum(((d[p] / (orig[p].abs() if adaptive else 1)) ** 2).sum() for p in d) ** 0.5

    if not adaptive:
        n = weighted_norm(delta)
        if n > rho:
            for p in delta:
                delta[p] *= rho / n
        return delta
    lam, lo, hi, limit = 0.1, 0.0, 10.0, 10.0
    tmp = {p: delta[p].clone() for p in delta}
    new = weighted_norm(tmp)
    if new > rho:
        while (new - rho).abs() > 1e-5:
            for p in delta:
                tmp[p] = delta[p] / (1 + 2 * lam / orig[p].abs() ** 2)
            new = weighted_norm(tmp)
            if new > rho:
                lam, lo = (lam + hi) / 2, lam
            else:
                lam, hi = (lo + lam) / 2, lam
            if limit - hi < 1e-2:
                limit, hi = limit * 2, hi * 2
    return {p: tmp[p].clone() for p in tmp}


def published_worst_case(model, batches, loss_f, rho, n_iters, adaptive, norm, step_size_mult=1.0):
    orig_state = copy.deepcopy(model.state_dict())
    params = [p for p in model.parameters() if p.requires_grad]
    orig = {p: p.detach().clone() for p in params}
    checkpoints = checkpoint_schedule(n_iters)
    total, total_err, total_init, total_init_err, max_norm = 0.0, 0.0, 0.0, 0.0, 0.0
    for x, y in batches:
        init_loss, init_err = _loss_err(model, loss_f, x, y)
        total_init += init_loss
        total_init_err += init_err
        delta = {p: torch.zeros_like(p) for p in params}
        prev_delta = {p: delta[p].clone() for p in params}
        worst_state = copy.deepcopy(model.state_dict())
        worst_loss, worst_err, worst_norm = init_loss, init_err, 0.0
        prev_worst, step = init_loss, 2 * rho * step_size_mult
        prev_step, prev_cp, updates = step, 0, 0
        for i in range(n_iters):
            backup = {p: delta[p].clone() for p in params}
            for p in params:
                p.grad = None
            loss_f(model(x), y).backward()
            with torch.no_grad():
                delta = _ascent_project(model, orig, delta, step, rho, adaptive, norm)
                for p in params:
                    delta[p] = 0.75 * delta[p] + 0.25 * prev_delta[p]
                    p.data = orig[p] + delta[p]
                    prev_delta[p] = backup[p]
            for p in params:
                p.grad = None
            loss, err = _loss_err(model, loss_f, x, y)
            if loss > worst_loss:
                worst_loss, worst_err = loss, err
                worst_state = copy.deepcopy(model.state_dict())
                worst_norm = torch.cat([d.flatten() for d in delta.values()]).norm().item()
                updates += 1
            if i in checkpoints:
                cond1 = updates < 0.75 * (i - prev_cp)
                cond2 = prev_step == step and prev_worst == worst_loss
                prev_step, prev_worst, prev_cp, updates = step, worst_loss, i, 0
                if cond1 or cond2:
                    step *= 0.5
                    model.load_state_dict(worst_state)
        model.load_state_dict(orig_state)
        total += worst_loss
        total_err += worst_err
        max_norm = max(max_norm, worst_norm)
    n = len(batches)
    return (total - total_init) / n, (total_err - total_init_err) / n, max_norm


def published_average_case_with_draws(model, batches, loss_f, rho, adaptive, draws):
    """``draws[b][k]``: a list of per-parameter xi tensors for batch b, sample k."""
    params = [p for p in model.parameters() if p.requires_grad]
    orig = {p: p.detach().clone() for p in params}
    noisy = copy.deepcopy(model)
    noisy_params = [p for p in noisy.parameters() if p.requires_grad]
    total = total_init = total_err = total_init_err = 0.0
    for b, (x, y) in enumerate(batches):
        l0, e0 = _loss_err(model, loss_f, x, y)
        acc = acc_err = 0.0
        for xi in draws[b]:
            for p, q, d in zip(params, noisy_params, xi):
                q.data = orig[p] + rho * (orig[p].abs() if adaptive else 1) * d
            loss, err = _loss_err(noisy, loss_f, x, y)
            acc += loss
            acc_err += err
        total += acc / len(draws[b])
        total_err += acc_err / len(draws[b])
        total_init += l0
        total_init_err += e0
    n = len(batches)
    return (total - total_init) / n, (total_err - total_init_err) / n, 0.0



def published_average_case(model, batches, loss_f, rho, n_samples, adaptive, norm="l2"):
    """The published average-case loop: a deep-copied noisy model, fresh ``randn_like`` /
    ``rand_like`` noise per parameter per sample, one forward and two host reads per sample."""
    params = dict(model.named_parameters())
    orig = {name: p.detach().clone() for name, p in params.items()}
    noisy = copy.deepcopy(model)
    total = total_init = total_err = total_init_err = 0.0
    for x, y in batches:
        l0, e0 = _loss_err(model, loss_f, x, y)
        acc = acc_err = 0.0
        for _ in range(n_samples):
            with torch.no_grad():
                for name, q in noisy.named_parameters():
                    xi = torch.randn_like(q) if norm == "l2" else 2 * torch.rand_like(q) - 1
                    q.data = orig[name] + xi * rho * (orig[name].abs() if adaptive else 1)
            loss, err = _loss_err(noisy, loss_f, x, y)
            acc += loss
            acc_err += err
        total += acc / n_samples
        total_err += acc_err / n_samples
        total_init += l0
        total_init_err += e0
    n = len(batches)
    return (total - total_init) / n, (total_err - total_init_err) / n, 0.0
