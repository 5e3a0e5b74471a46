"""The layers the measures are taken over, their norms (entrywise, Schatten, a convolution's
operator norm), BatchNorm folded into the layer before it, and the margins."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

DENSE_LIMIT = 4096   # a convolution's operator norm from its dense matrix up to this many inputs, Lanczos above

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    if not named:
        raise ValueError("the model has no nn.Linear or nn.Conv layers: the norm-based measures are undefined")
    return named


def input_shapes(model: nn.Module, x) -> dict[str, tuple[int, ...]]:
    """Each layer's input shape (batch of one) from one forward pass on ``x``."""
    shapes, hooks = {}, []

    def record(name):
        def hook(module, inputs, output):   # returns None: the output is left as it is
            shapes.setdefault(name, (1,) + tuple(inputs[0].shape[1:]))
        return hook

    for name, m in layers(model):
        hooks.append(m.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _linear_map(layer: nn.Module, weight: torch.Tensor):
    """The linear map a layer applies with ``weight`` in place of its own, bias left out: the
    convolution's own forward (``_conv_forward``), so its padding mode (zeros, circular, reflect,
    replicate), padding, stride, dilation and groups are the layer's."""
    if isinstance(layer, nn.Linear):
        return lambda t: F.linear(t, weight)
    return lambda t: layer._conv_forward(t, weight, None)


def operator_norm(layer: nn.Module, weight: torch.Tensor, shape: tuple[int, ...] | None) -> float:
    """``||W||_2`` of a layer's weight (or of a weight difference applied the same way)."""
    w = weight.detach().double()
    if isinstance(layer, nn.Linear):
        return float(torch.linalg.matrix_norm(w, ord=2))
    if shape is None:
        raise ValueError(f"the convolution {layer} was not reached by the forward pass: no input shape")
    apply = _linear_map(layer, w)
    n_in = math.prod(shape[1:])
    if n_in <= DENSE_LIMIT:   # the map's matrix, from the unit inputs: exact
        basis = torch.eye(n_in, dtype=torch.float64).reshape((n_in,) + tuple(shape[1:]))
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(apply(basis).reshape(n_in, -1), ord=2))
    # above: Lanczos (scipy's eigsh) on the normal map A^T A, the adjoint by autograd
    # (A^T A v is the gradient of ||A v||^2 / 2), which holds for every padding mode
    from scipy.sparse.linalg import LinearOperator, eigsh

    def normal(v):
        t = torch.as_tensor(v, dtype=torch.float64).reshape(shape).requires_grad_(True)
        with torch.enable_grad():
            out = apply(t)
            (g,) = torch.autograd.grad(out, t, grad_outputs=out.detach())
        return g.reshape(-1).numpy()

    v0 = torch.randn(n_in, generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()
    top = eigsh(LinearOperator((n_in, n_in), matvec=normal, dtype="float64"), k=1, which="LA", tol=1e-12, v0=v0,
                return_eigenvectors=False)
    return float(math.sqrt(max(float(top[0]), 0.0)))


def margins(model: nn.Module, x, y) -> torch.Tensor:
    """``f(x)_y - max_{j != y} f(x)_j`` of every example (float64)."""
    with torch.no_grad():
        out = model(x).double()
    true = out.gather(1, y[:, None]).squeeze(1)
    others = out.scatter(1, y[:, None], float("-inf")).max(dim=1).values
    return true - others


# How the margin gamma is read off the examples' margins, as each author's code does it:
# "kth": the (m // 10)-th smallest of m (Jiang et al.'s measures as Dziugaite et al.'s code computes
#        them, torch.kthvalue(m // 10); the smallest where m < 10);
# "percentile5": the 5th percentile, linearly interpolated (Neyshabur et al.'s generalization-bounds,
#        numpy.percentile(margins, 5)), which its norms and bounds divide by.
MARGIN_CONVENTIONS = ("kth", "percentile5")


def margin(model: nn.Module, x, y, convention: str = "kth") -> float:
    """The margin ``gamma`` of ``model`` on ``(x, y)`` under one of :data:`MARGIN_CONVENTIONS`."""
    values = margins(model, x, y)
    if convention == "kth":
        return float(values.kthvalue(max(1, len(values) // 10)).values)
    if convention == "percentile5":
        return float(torch.quantile(values, 0.05))
    raise ValueError(f"unknown margin convention {convention!r}; expected one of {MARGIN_CONVENTIONS}")


def _positive_margin(model, x, y, convention: str) -> float:
    gamma = margin(model, x, y, convention)
    if not gamma > 0:
        what = "(m // 10)-th smallest" if convention == "kth" else "5th percentile"
        raise ValueError(f"the margin (the {what} of f(x)_y - max_j f(x)_j) is {gamma:.3g} <= 0: too many examples "
                         "are misclassified, and the /margin measures are undefined")
    return gamma


# ----------------------------------------------------------------------------- BatchNorm folding

FOLDABLE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def batchnorm_folded(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy of ``model`` in eval mode in which every BatchNorm that normalizes a Linear or Conv
    layer's output is folded into that layer (``W <- s W``, ``b <- s (b - mu) + beta`` with ``s =
    gamma / sqrt(var + eps)`` per output channel) and replaced by the identity: the same function,
    with the norm's scale carried by the layer's weights, as both Neyshabur et al.'s and Dziugaite
    et al.'s code measure a BatchNorm network. A norm is folded where one forward pass on ``x``
    shows it consuming exactly the output tensor of a layer called once (Conv-BN or Linear-BN, in
    any module layout); a norm after an activation or a residual sum, or without running
    statistics, is left as it is. The folded copy is checked to compute what the model does."""
    model = copy.deepcopy(model).eval()
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []
    modules = dict(model.named_modules())

    def after_layer(name):
        def hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            produced[id(output)] = (name, output)   # the tensor is held, so its id stays unique
        return hook

    def before_norm(name):
        def hook(module, inputs):
            calls[name] = calls.get(name, 0) + 1
            source = produced.get(id(inputs[0]))
            if source is not None and source[1] is inputs[0]:
                pairs.append((source[0], name))
        return hook

    hooks = [m.register_forward_hook(after_layer(n)) for n, m in modules.items() if isinstance(m, LAYER_TYPES)]
    hooks += [m.register_forward_pre_hook(before_norm(n)) for n, m in modules.items()
              if isinstance(m, FOLDABLE_NORMS)]
    try:
        with torch.no_grad():
            reference = model(x[:8])
    finally:
        for h in hooks:
            h.remove()
    produced.clear()
    folded = [(layer, norm) for layer, norm in pairs if calls[layer] == 1 and calls[norm] == 1
              and modules[norm].running_var is not None]
    if not folded:
        return model
    with torch.no_grad():
        for layer_name, norm_name in folded:
            layer, norm = modules[layer_name], modules[norm_name]
            var, mean = norm.running_var.double(), norm.running_mean.double()
            gamma = norm.weight.double() if norm.affine else torch.ones_like(var)
            beta = norm.bias.double() if norm.affine else torch.zeros_like(var)
            scale = gamma / (var + norm.eps).sqrt()
            w = layer.weight.double()
            bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(var)
            layer.weight.copy_(w * scale.reshape((-1,) + (1,) * (w.dim() - 1)))
            new_bias = scale * (bias - mean) + beta
            if layer.bias is None:
                layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))
            else:
                layer.bias.copy_(new_bias)
            parent_name, _, child = norm_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
        out = model(x[:8])
    tol = 1e-9 if out.dtype == torch.float64 else 1e-3
    if not torch.allclose(out.double(), reference.double(), rtol=tol, atol=tol * float(reference.abs().max())):
        raise ValueError("folding BatchNorm into the layers before it changed what the model computes (a layer's "
                         "output feeds more than its norm?); measure the model unfolded with fold_batchnorm=False")
    return model


def _rows(w: torch.Tensor) -> torch.Tensor:
    """A layer's weight as the matrix Neyshabur et al.'s code measures: one row per output unit
    (a convolution's kernel reshaped to ``[out, in * kernel]``), in float64."""
    return w.detach().double().reshape(w.shape[0], -1)


def lpq_norm(w: torch.Tensor, p: float, q: float) -> float:
    """``||W||_{p,q}``: the l_q norm over the output units of the l_p norms of their incoming weights."""
    return float(torch.linalg.vector_norm(torch.linalg.vector_norm(_rows(w), p, dim=1), q))


def schatten_norm(w: torch.Tensor, p: float) -> float:
    """The l_p norm of the singular values (``p = inf``: the spectral norm; ``p = 1``: the trace norm)."""
    return float(torch.linalg.vector_norm(torch.linalg.svdvals(_rows(w)), p))
