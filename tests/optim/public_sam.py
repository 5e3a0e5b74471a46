"""The public code's SAM steps in our words, operation for operation, for the bit-for-bit tests of
``compat=`` (the code itself was run side by side on the same inputs; its results agree bit for bit).

davda54/sam (sam.py): ``first_step`` takes the two-level norm of ``T g`` (``T = |w|`` where adaptive,
the scalar 1.0 otherwise), ``scale = rho / (norm + 1e-12)``, keeps ``w`` and adds
``(w^2 or 1.0) * g * scale``; ``second_step`` rebinds ``w`` to the kept tensor and steps the base.
SamsungLabs/ASAM (asam.py): ``ascent_step`` multiplies ``g`` in place by ``|w| + eta`` (names holding
"weight"), takes the two-level norm plus 1e-16, multiplies ``g`` again, ``e = g * (rho / norm)``,
adds it; ``descent_step`` subtracts ``e`` and steps the base. Its ``SAM`` skips the ``|w| + eta``.
"""
import torch


class Davda54:
    def __init__(self, params, base_cls, rho, adaptive, **kw):
        self.params = list(params)
        self.rho, self.adaptive = rho, adaptive
        self.base = base_cls(self.params, **kw)
        self.old = {}

    @torch.no_grad()
    def first_step(self):
        ps = [p for p in self.params if p.grad is not None]
        norm = torch.norm(torch.stack([((torch.abs(p) if self.adaptive else 1.0) * p.grad).norm(p=2) for p in ps]), p=2)
        scale = self.rho / (norm + 1e-12)
        for p in ps:
            self.old[p] = p.data.clone()
            p.add_((torch.pow(p, 2) if self.adaptive else 1.0) * p.grad * scale.to(p))
        self.base.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for p in self.params:
            if p.grad is not None:
                p.data = self.old[p]
        self.base.step()
        self.base.zero_grad()


class Samsung:
    def __init__(self, named_params, base_cls, rho, eta, adaptive=True, **kw):
        self.named = list(named_params)
        self.rho, self.eta, self.adaptive = rho, eta, adaptive
        self.base = base_cls([p for _, p in self.named], **kw)
        self.eps = {}

    @torch.no_grad()
    def first_step(self):
        norms, scales = [], {}
        for n, p in self.named:
            if p.grad is None:
                continue
            if self.adaptive and "weight" in n:
                scales[p] = p.abs().add_(self.eta)
                p.grad.mul_(scales[p])
            norms.append(torch.norm(p.grad, p=2))
        norm = torch.norm(torch.stack(norms), p=2) + 1e-16
        for n, p in self.named:
            if p.grad is None:
                continue
            if p in scales:
                p.grad.mul_(scales[p])
            e = p.grad.clone()
            e.mul_(self.rho / norm)
            self.eps[p] = e
            p.add_(e)
        self.base.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for _, p in self.named:
            if p.grad is not None:
                p.sub_(self.eps[p])
        self.base.step()
        self.base.zero_grad()


def understanding_sam_step(model, params, base, batches, loss_fn, rho):
    """One step of tml-epfl/understanding-sam's m-SAM (deep_nets/train.py): per sub-batch, the
    gradient of loss / K at w, delta = rho g / (||g|| + 1e-12) over the flattened gradient, the
    gradient of loss / K at w + delta (delta subtracted afterwards) added to the step's sum; then
    one step of the base optimizer with the sum."""
    total = [torch.zeros_like(p) for p in params]
    k = len(batches)
    for x, y in batches:
        base.zero_grad()
        (loss_fn(model(x), y) / k).backward()
        with torch.no_grad():
            g = torch.cat([p.grad.flatten() for p in params])
            scale = rho / (g.norm() + 1e-12)
            deltas = [scale * p.grad for p in params]
            for p, d in zip(params, deltas):
                p.add_(d)
        base.zero_grad()
        (loss_fn(model(x), y) / k).backward()
        with torch.no_grad():
            for p, d, t in zip(params, deltas, total):
                p.sub_(d)
                t.add_(p.grad)
    for p, t in zip(params, total):
        p.grad = t
    base.step()
    base.zero_grad()


class JuntangGSAM:
    """juntang-zhuang/GSAM's gsam.py step: e = g * rho / (||T g|| + 1e-12) (times w^2 where adaptive),
    g_p's decomposition against g (norms without T), e subtracted, base step."""

    def __init__(self, params, base_cls, rho, alpha, adaptive=False, **kw):
        self.params = list(params)
        self.rho, self.alpha, self.adaptive = rho, alpha, adaptive
        self.base = base_cls(self.params, **kw)
        self.old_g, self.e_w = {}, {}

    def _norm(self, grads, adaptive=False):
        return torch.norm(torch.stack([((torch.abs(p.data) if adaptive else 1.0) * g).norm(p=2)
                                       for p, g in zip(self.params, grads)]), p=2)

    @torch.no_grad()
    def first_step(self):
        norm = self._norm([p.grad for p in self.params], self.adaptive)
        scale = self.rho / (norm + 1e-12)
        for p in self.params:
            self.old_g[p] = p.grad.data.clone()
            e_w = p.grad * scale.to(p)
            if self.adaptive:
                e_w *= torch.pow(p, 2)
            p.add_(e_w)
            self.e_w[p] = e_w
        self.base.zero_grad()

    @torch.no_grad()
    def second_step(self):
        inner = 0.0
        for p in self.params:
            inner += torch.sum(self.old_g[p] * p.grad.data)
        new_norm = self._norm([p.grad for p in self.params])
        old_norm = self._norm([self.old_g[p] for p in self.params])
        cosine = inner / (new_norm * old_norm + 1e-12)
        for p in self.params:
            vertical = self.old_g[p] - cosine * old_norm * p.grad.data / (new_norm + 1e-12)
            p.grad.data.add_(vertical, alpha=-self.alpha)
        for p in self.params:
            p.data.sub_(self.e_w[p])
        self.base.step()
        self.base.zero_grad()
