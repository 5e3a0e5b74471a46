"""The generalization measures of Jiang et al. (ICLR 2020, "Fantastic generalization measures and
where to find them", appendix C), named as in their table (the seeds' Table 5), and the norms and
bounds of Neyshabur et al.'s generalization-bounds code, computed from a model's weights, its
initial weights and training examples. Each default follows the authors' code: Jiang et al.'s
measures as Dziugaite et al.'s robust-generalization-measures computes them, the others as
Neyshabur et al.'s measures.py does.

Every measure is taken on a copy of the model with its BatchNorm folded into the layer before it
(:func:`batchnorm_folded`; both codes do so; ``fold_batchnorm=False`` measures the layers as they
are). Layers are the weight matrices and kernels of ``nn.Linear`` and ``nn.Conv{1,2}d`` modules, in
module order (biases, normalization parameters and embeddings are not layers); ``d`` is their
number. ``||W||_2`` is the largest singular value of the layer's weight reshaped to ``[out, in *
kernel]``, as both authors' code takes it (a linear layer's operator norm, a convolution's
approximation); each spectral measure's ``-exact`` twin takes a convolution's operator norm, that
of the linear map it applies to its actual input shape (taken from a forward pass on the data; its
padding mode, padding, stride, dilation and groups included), from the map's dense matrix up to
4096 inputs, else by Lanczos on ``A^T A``. The margin ``gamma`` is the
``(m // 10)``-th smallest over the ``m`` examples of ``f(x)_y - max_{j != y} f(x)_j`` (as
Dziugaite et al.'s code takes it, ``kthvalue(m // 10)``); a measure divided by it needs ``gamma > 0``.

* norms: ``param-norm = sum ||W||_F^2``; ``frob-distance = sum ||W - W0||_F^2``;
  ``spec-dist = sum ||W - W0||_2^2``; ``fro/spec = sum ||W||_F^2 / ||W||_2^2`` (and the ``-exact`` forms);
  ``num-params``, the layers' weights (biases not counted, as in Dziugaite et al.'s code);
* products and sums (logs of): ``prod-of-spec = log prod ||W||_2^2``, ``sum-of-spec =
  log(d (prod ||W||_2^2)^(1/d))``, the same ``-of-fro`` with ``||W||_F``, and each ``/margin``
  form dividing the product by ``gamma^2``;
* ``spectral-init = log(prod ||W||_2^2 / gamma^2 * sum ||W - W0||_F^2 / ||W||_2^2)`` and
  ``spectral-orig`` the same with ``||W||_F^2`` in place of ``||W - W0||_F^2`` (Bartlett et al.'s
  bound as Jiang et al. write it, the reference matrix being the initialization or the origin);
* ``path-norm = sum_i f_{w^2}(1)_i``: the network with every parameter squared, on an all-ones
  input (the sum over input-output paths of the squared weights, for ReLU networks);
  ``path-norm/margin`` divides by ``gamma^2``;
* on the data: ``1/margin = 1 / gamma^2``; ``cross-entropy``, the mean loss; ``neg-entropy``, the
  mean of ``sum_j p_j log p_j`` of the softmax outputs; ``fisher-rao = (d + 1)^2 / m sum_i
  <w, grad_w loss(x_i)>^2`` over all parameters;
* the trajectory: ``num-step-to-0.1-loss``, recorded by the zoo while training;
* PAC-Bayes and sharpness, with the searches for their radius: ``sigma``, the largest Gaussian
  scale whose perturbations ``w + sigma xi`` move the training error by 0.1 on average (10 draws),
  and ``alpha``, the largest box ``|u_i| <= alpha`` in which APGD (20 steps) finds a point that
  moves it by 0.1; bisection over ``(0, 2]``, 15 steps, stopping within 1e-2 of the target, both by
  the sharpness functions themselves. ``pacbayes-init/-orig = ||w_ref||^2 / (4 sigma^2) +
  log(m / sigma) + 10`` (``w_ref`` the distance to initialization, or ``w``), ``sharpness-init/-orig
  = ||w_ref||^2 log(2 omega) / (4 alpha^2) + log(m / sigma_alpha) + 10`` with ``sigma_alpha = alpha /
  sqrt(2 log(2 omega))`` (``omega`` parameters), ``1/sigma-pacbayes = 1 / sigma^2``,
  ``1/alpha-sharpness = 1 / alpha^2``; the magnitude-aware forms perturb ``N(0, sigma^2 w_i^2 +
  eps^2)`` and search the box ``|u_i| <= alpha |w_i| + eps`` (``eps = 1e-3``), with
  ``pacbayes-mag-* = 1/4 sum_i log((eps^2 + (sigma^2 + 1) ||w_ref||^2 / omega) / (eps^2 + sigma^2
  (w - w0)_i^2)) + log(m / sigma) + 10``, ``pac-sharpness-mag-*`` the same at ``sigma_alpha``, and
  ``1/sigma-pacbayes-mag``, ``1/alpha-sharpness-mag``. The searches perturb every parameter; the
  bounds count the layers' weights (``w``, ``w0`` and ``omega``, biases left out, as Dziugaite et
  al.'s code does; ``bound_parameters="all"``: every parameter).

Neyshabur et al.'s (``NEYSHABUR``, preset ``neyshabur``; their values, not logs), with each layer's
weight as the matrix ``[out, in * kernel]`` and ``gamma_5`` the 5th percentile of the margins (their
``validate``): the products over the layers divided by ``gamma_5`` of ``||W||_{1,inf}``,
``||W||_{3,1.5}``, ``||W||_F`` and of the Schatten norms (spectral, 1.5, trace: the l_p norms of the
singular values), named ``l1,inf-norm/margin`` etc.; the l_p path-norms ``(sum_i f_{|w|^p}(1)_i)^(1/p)
/ gamma_5`` for p = 1, 1.5, 2; and the bounds without constants and log factors, with ``alpha =
sqrt(d + log(input size))`` (Golowich et al.'s depth dependence): ``bound-l1,inf-bartlett-mendelson-
2002 = alpha l1,inf / sqrt(m)``, ``bound-fro-neyshabur-2015 = alpha fro / sqrt(m)``,
``bound-l3,1.5-neyshabur-2015 = alpha l3,1.5 / m^(1/3)``, ``bound-spec-l2,1-bartlett-2017 = log(m)
log(#params) spec (sum_l (||W - W0||_{2,1} / ||W||_2)^(2/3))^(3/2) / sqrt(m)`` (``#params`` with
biases) and ``bound-spec-fro-neyshabur-2018 = d spec (sum_l h_l ||W - W0||_F^2 / ||W||_2^2)^(1/2) /
sqrt(m)`` (``h_l`` the layer's output units; spec etc. the products over the margin above).

Departures, each deliberate: the searches' deviation is the training error's (Jiang et al.'s
"accuracy deviation"), measured on the sweep's examples; Dziugaite et al.'s code takes the
margin's absolute value where it is negative, here a ``/margin`` measure with ``gamma <= 0`` is an
error, not a number; their PAC-Bayes search draws noise of standard deviation ``sigma^2``, here
``sigma`` (Jiang et al.'s definition; the bounds agree at the same radius); the folded network is exactly the model's
function, where both codes keep each folded norm as a division by ``sqrt(1 + eps)``, so path-norms
of a BatchNorm network differ from theirs by that factor per norm (1e-5 relative with eps = 1e-5,
the same for every model of one architecture); ``fisher-rao`` uses all parameters (biases too), as
the gradient's inner product is taken with everything that was trained; ``path-norm`` squares
biases too (Jiang et al. do not say) and is what the definition gives for non-homogeneous networks
(the ViT's attention and LayerNorm); the margin's data is the sweep's training examples, not the
full set.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

# The conventions' revision, part of every measure definition's key: 2 folds BatchNorm, takes the
# margin as the authors' code does and a convolution's padding mode; 3 takes a convolution's
# spectral norm as the authors' code does (its reshaped kernel's; the operator norm is the -exact
# measures') and the PAC-Bayes bounds over the layers' weights (values of earlier revisions are kept
# in old stores but not reused)
MEASURES_REVISION = 3
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


class Context:
    """What the measures of one model share, computed once: layers, norms, the margin."""

    def __init__(self, model: nn.Module, init: nn.Module | None, x, y, metrics: dict | None = None,
                 fold_batchnorm: bool = True, bound_parameters: str = "weights"):
        if bound_parameters not in BOUND_PARAMETERS:
            raise ValueError(f"bound_parameters must be one of {BOUND_PARAMETERS}, got {bound_parameters!r}")
        self.bound_parameters = bound_parameters
        if not isinstance(x, torch.Tensor):
            raise TypeError("the Jiang et al. measures take models with one tensor input (their layers, margins and "
                            f"path-norm are defined for classifiers f(x)); got inputs of type {type(x).__name__}")
        # measured on copies (the caller's models keep their mode and weights), BatchNorm folded
        prepare = (lambda m: batchnorm_folded(m, x)) if fold_batchnorm else (lambda m: copy.deepcopy(m).eval())
        self.model = prepare(model)
        self.init = None if init is None else prepare(init)
        self.x, self.y, self.metrics = x, y, metrics or {}
        self.layers = layers(self.model)
        self.shapes = input_shapes(self.model, x)
        self._cache: dict = {}

    def cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def d(self) -> int:
        return len(self.layers)

    def spec(self, exact: bool = False) -> list[float]:
        """Each layer's ``||W||_2``: its reshaped ``[out, in * kernel]`` matrix's largest singular value
        (the authors' code), or ``exact``, the operator norm of the map the layer applies."""
        if exact:
            return self.cached("spec-exact", lambda: [operator_norm(m, m.weight, self.shapes.get(n))
                                                      for n, m in self.layers])
        return self.cached("spec", lambda: [schatten_norm(m.weight, math.inf) for _, m in self.layers])

    def dist_spec(self, exact: bool = False) -> list[float]:
        """``||W - W0||_2`` of each layer, taken as :meth:`spec` takes ``||W||_2``."""
        if exact:
            return [operator_norm(m, dw, self.shapes.get(n)) for (n, m), dw in zip(self.layers, self.distances())]
        return [schatten_norm(dw, math.inf) for dw in self.distances()]

    def fro(self) -> list[float]:
        return self.cached("fro", lambda: [float(m.weight.detach().double().norm()) for _, m in self.layers])

    def init_layers(self) -> list[torch.Tensor]:
        if self.init is None:
            raise ValueError("this measure needs the initial weights (the zoo's init_checkpoint)")
        return self.cached("init", lambda: [dict(self.init.named_modules())[n].weight.detach() for n, _ in self.layers])

    def distances(self) -> list[torch.Tensor]:
        return [m.weight.detach() - w0 for (_, m), w0 in zip(self.layers, self.init_layers())]

    def gamma(self, convention: str = "kth") -> float:
        return self.cached(("gamma", convention), lambda: _positive_margin(self.model, self.x, self.y, convention))


def _log_prod_sq(norms: list[float]) -> float:
    return sum(2 * math.log(v) for v in norms)


def _powered_network(ctx: Context, p: float) -> float:
    """``sum_i f_{|w|^p}(1)_i``: the network with every parameter's magnitude raised to the p-th
    power, on an all-ones input (for ReLU networks, the sum over input-output paths of the
    products of the weights' p-th powers)."""
    powered = {n: w.detach().abs() ** p for n, w in ctx.model.named_parameters()}
    ones = torch.ones((1,) + tuple(ctx.x.shape[1:]), dtype=ctx.x.dtype, device=ctx.x.device)
    with torch.no_grad():
        return float(functional_call(ctx.model, {**powered, **dict(ctx.model.named_buffers())}, (ones,)).double().sum())


def _path_norm(ctx: Context) -> float:
    return _powered_network(ctx, 2)


def _fisher_rao(ctx: Context) -> float:
    model, params = ctx.model, [p for p in ctx.model.parameters() if p.requires_grad]
    total = 0.0
    for i in range(len(ctx.y)):
        loss = F.cross_entropy(model(ctx.x[i:i + 1]), ctx.y[i:i + 1])
        grads = torch.autograd.grad(loss, params)
        total += float(sum((p.detach().double() * g.double()).sum() for p, g in zip(params, grads))) ** 2
    return (ctx.d + 1) ** 2 / len(ctx.y) * total


def _outputs(ctx: Context) -> torch.Tensor:
    return ctx.cached("out", lambda: ctx.model(ctx.x).detach().double())


def _spectral(ctx: Context, reference: str, exact: bool) -> float:
    spec = ctx.spec(exact)
    terms = ([float(dw.double().norm()) ** 2 for dw in ctx.distances()] if reference == "init"
             else [f ** 2 for f in ctx.fro()])
    return _log_prod_sq(spec) - 2 * math.log(ctx.gamma()) + math.log(sum(t / s**2 for t, s in zip(terms, spec)))


def _spectral_measures(exact: bool) -> dict[str, Callable[[Context], float]]:
    """The measures built on ``||W||_2``: the reshaped kernel's, or (``exact``, named ``-exact``) the
    convolution's operator norm."""
    x = "-exact" if exact else ""
    return {
        f"spec-dist{x}": lambda c: sum(s**2 for s in c.dist_spec(exact)),
        f"fro/spec{x}": lambda c: sum(f**2 / s**2 for f, s in zip(c.fro(), c.spec(exact))),
        f"prod-of-spec{x}": lambda c: _log_prod_sq(c.spec(exact)),
        f"prod-of-spec{x}/margin": lambda c: _log_prod_sq(c.spec(exact)) - 2 * math.log(c.gamma()),
        f"sum-of-spec{x}": lambda c: math.log(c.d) + _log_prod_sq(c.spec(exact)) / c.d,
        f"sum-of-spec{x}/margin": lambda c: math.log(c.d) + (_log_prod_sq(c.spec(exact)) - 2 * math.log(c.gamma()))
        / c.d,
        f"spectral-init{x}": lambda c: _spectral(c, "init", exact),
        f"spectral-orig{x}": lambda c: _spectral(c, "origin", exact),
    }


MEASURES: dict[str, Callable[[Context], float]] = {
    "param-norm": lambda c: sum(f**2 for f in c.fro()),
    "frob-distance": lambda c: sum(float(dw.double().norm()) ** 2 for dw in c.distances()),
    **_spectral_measures(exact=False),
    "prod-of-fro": lambda c: _log_prod_sq(c.fro()),
    "prod-of-fro/margin": lambda c: _log_prod_sq(c.fro()) - 2 * math.log(c.gamma()),
    "sum-of-fro": lambda c: math.log(c.d) + _log_prod_sq(c.fro()) / c.d,
    "sum-of-fro/margin": lambda c: math.log(c.d) + (_log_prod_sq(c.fro()) - 2 * math.log(c.gamma())) / c.d,
    "path-norm": _path_norm,
    "path-norm/margin": lambda c: _path_norm(c) / c.gamma() ** 2,
    "1/margin": lambda c: 1.0 / c.gamma() ** 2,
    "cross-entropy": lambda c: float(F.cross_entropy(_outputs(c), c.y)),
    "neg-entropy": lambda c: float((F.softmax(_outputs(c), 1) * F.log_softmax(_outputs(c), 1)).sum(1).mean()),
    "fisher-rao": _fisher_rao,
    "num-step-to-0.1-loss": lambda c: _recorded(c, "steps_to_loss_0.1"),
    **_spectral_measures(exact=True),
}
NEEDS_INIT = ("frob-distance", "spec-dist", "spectral-init", "spec-dist-exact", "spectral-init-exact")


# ----------------------------------------------------------------------------- Neyshabur et al.'s norms and bounds

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


def _log_prod(ctx: Context, norm: Callable[[torch.Tensor], float]) -> float:
    return sum(math.log(norm(m.weight)) for _, m in ctx.layers)


def _exp(log_value: float) -> float:
    if log_value > 709:   # exp overflows float64 beyond e^709
        raise ValueError(f"the measure is e^{log_value:.0f}, beyond float64 (its log would rank the models alike)")
    return math.exp(log_value)


def _over_margin(ctx: Context, norm: Callable[[torch.Tensor], float]) -> float:
    """``prod_l norm(W_l) / gamma`` (Neyshabur et al.'s ``calc_measure(..., 'product') / margin``)."""
    return _exp(_log_prod(ctx, norm) - math.log(ctx.gamma("percentile5")))


def _lp_path_norm(ctx: Context, p: float) -> float:
    """Neyshabur et al. (2015)'s l_p path-norm ``(sum_i f_{|w|^p}(1)_i)^(1/p)``."""
    return _powered_network(ctx, p) ** (1 / p)


def _layer_params(ctx: Context) -> int:
    """Weights and biases of the layers (Neyshabur et al.'s ``n_param``, BatchNorm folded away)."""
    return sum(m.weight.numel() + (0 if m.bias is None else m.bias.numel()) for _, m in ctx.layers)


def _input_size(ctx: Context) -> int:
    return math.prod(ctx.x.shape[1:])


def _capacity_alpha(ctx: Context) -> float:
    """``sqrt(d + log(input size))``: the depth dependence of Golowich et al. (2018) that Neyshabur
    et al.'s code puts in the norm-based bounds."""
    return math.sqrt(ctx.d + math.log(_input_size(ctx)))


def _spectral_ratio(ctx: Context, q: int, power: float) -> float:
    """``(sum_l (h_l^(1 - 1/q) ||W_l - W0_l||_{2,q} / ||W_l||_2)^power)^(1/power)``, ``h_l`` the layer's
    output units (Neyshabur et al.'s ``h_dist_op_norm`` summed under ``calc_measure(..., 'norm')``)."""
    terms = [(m.weight.shape[0] ** (1 - 1 / q) * lpq_norm(dw, 2, q) / spec) ** power
             for (_, m), dw, spec in zip(ctx.layers, ctx.distances(), ctx.spec())]
    return sum(terms) ** (1 / power)


def _spectral_bound(ctx: Context, factor: float, q: int, power: float) -> float:
    """``factor * prod_l ||W_l||_2 / gamma * ratio / sqrt(m)`` (Bartlett 2017, Neyshabur 2018)."""
    log_value = (math.log(factor) + sum(math.log(v) for v in ctx.spec())
                 - math.log(ctx.gamma("percentile5")) + math.log(_spectral_ratio(ctx, q, power))
                 - 0.5 * math.log(len(ctx.y)))
    return _exp(log_value)


MEASURES.update({
    "num-params": lambda c: float(sum(m.weight.numel() for _, m in c.layers)),
    "l1,inf-norm/margin": lambda c: _over_margin(c, lambda w: lpq_norm(w, 1, math.inf)),
    "l3,1.5-norm/margin": lambda c: _over_margin(c, lambda w: lpq_norm(w, 3, 1.5)),
    "fro-norm/margin": lambda c: _over_margin(c, lambda w: lpq_norm(w, 2, 2)),
    "spec-norm/margin": lambda c: _exp(sum(math.log(v) for v in c.spec()) - math.log(c.gamma("percentile5"))),
    "schatten-1.5-norm/margin": lambda c: _over_margin(c, lambda w: schatten_norm(w, 1.5)),
    "trace-norm/margin": lambda c: _over_margin(c, lambda w: schatten_norm(w, 1)),
    "l1-path-norm/margin": lambda c: _lp_path_norm(c, 1) / c.gamma("percentile5"),
    "l1.5-path-norm/margin": lambda c: _lp_path_norm(c, 1.5) / c.gamma("percentile5"),
    "l2-path-norm/margin": lambda c: _lp_path_norm(c, 2) / c.gamma("percentile5"),
    # the bounds, without their constants and additive log factors (as the code reports them)
    "bound-l1,inf-bartlett-mendelson-2002": lambda c: _capacity_alpha(c) * MEASURES["l1,inf-norm/margin"](c)
    / math.sqrt(len(c.y)),
    "bound-fro-neyshabur-2015": lambda c: _capacity_alpha(c) * MEASURES["fro-norm/margin"](c) / math.sqrt(len(c.y)),
    "bound-l3,1.5-neyshabur-2015": lambda c: _capacity_alpha(c) * MEASURES["l3,1.5-norm/margin"](c)
    / len(c.y) ** (1 / 3),
    "bound-spec-l2,1-bartlett-2017": lambda c: _spectral_bound(
        c, math.log(len(c.y)) * math.log(_layer_params(c)), q=1, power=2 / 3),
    "bound-spec-fro-neyshabur-2018": lambda c: _spectral_bound(c, c.d, q=2, power=2),
})
NEEDS_INIT = NEEDS_INIT + ("bound-spec-l2,1-bartlett-2017", "bound-spec-fro-neyshabur-2018")
NEYSHABUR = ("l1,inf-norm/margin", "fro-norm/margin", "l3,1.5-norm/margin", "spec-norm/margin",
             "schatten-1.5-norm/margin", "trace-norm/margin", "l1-path-norm/margin", "l1.5-path-norm/margin",
             "l2-path-norm/margin", "bound-l1,inf-bartlett-mendelson-2002", "bound-fro-neyshabur-2015",
             "bound-l3,1.5-neyshabur-2015", "bound-spec-l2,1-bartlett-2017", "bound-spec-fro-neyshabur-2018")


# ----------------------------------------------------------------------------- PAC-Bayes and sharpness

ACCURACY_DEVIATION = 0.1     # the searches' target: the perturbation that moves the training error by this much
DEVIATION_TOLERANCE = 1e-2
SEARCH_STEPS = 15            # bisection steps over (0, SEARCH_MAX]
SEARCH_MAX = 2.0
MC_SAMPLES = 10              # Gaussian draws per PAC-Bayes search step
ASCENT_STEPS = 20            # APGD iterations per sharpness search step
MAG_EPS = 1e-3               # the magnitude-aware perturbation's floor


def _search(deviation: Callable[[float], float]) -> float:
    """The largest radius in ``(0, SEARCH_MAX]`` whose training-error deviation is ``0.1`` (within
    ``1e-2``), by bisection (Jiang et al.'s search; ``SEARCH_MAX`` where even that moves it less)."""
    lo, hi = 0.0, SEARCH_MAX
    if deviation(hi) <= ACCURACY_DEVIATION:
        return hi
    r = hi
    for _ in range(SEARCH_STEPS):
        r = (lo + hi) / 2
        d = deviation(r)
        if abs(d - ACCURACY_DEVIATION) < DEVIATION_TOLERANCE:
            break
        lo, hi = (lo, r) if d > ACCURACY_DEVIATION else (r, hi)
    return r


def _magnitude_scale(model: nn.Module, radius: float) -> dict:
    """``c`` with ``radius * c_i = sqrt(radius^2 w_i^2 + eps^2)`` (Gaussian) or ``radius |w_i| + eps`` (box)."""
    return {n: (p.detach().abs() ** 2 + (MAG_EPS / radius) ** 2).sqrt() for n, p in model.named_parameters()}


def _deviation(ctx: Context, radius: float, worst: bool, magnitude: bool) -> float:
    """The training-error increase at ``radius``: the mean over Gaussian draws ``w + radius c xi``
    (PAC-Bayes), or the largest APGD finds in the box ``|u_i| <= radius c_i`` (sharpness), by the
    sharpness functions themselves; ``c = 1``, or magnitude-aware."""
    import sharpfast

    kw = dict(adaptive=magnitude, adaptive_eta=MAG_EPS / radius) if (magnitude and worst) else (
        dict(adaptive=False, scale=_magnitude_scale(ctx.model, radius)) if magnitude else dict(adaptive=False))
    data = [(ctx.x, ctx.y)]
    if worst:
        r = sharpfast.worst_case_sharpness(ctx.model, data, rho=radius, norm="linf", n_iters=ASCENT_STEPS, **kw)
    else:
        r = sharpfast.average_sharpness(ctx.model, data, rho=radius, norm="l2", n_samples=MC_SAMPLES, **kw)
    if r.err_sharpness is None:
        raise ValueError("the PAC-Bayes and sharpness searches need class labels (a training error)")
    return abs(r.err_sharpness)


def _radius(ctx: Context, worst: bool, magnitude: bool) -> float:
    return ctx.cached(("radius", worst, magnitude),
                      lambda: _search(lambda r: _deviation(ctx, r, worst, magnitude)))


# Which parameters the PAC-Bayes and sharpness bounds count (their ||w||, ||w - w0|| and omega):
# "weights": the layers' weights, biases left out, as Dziugaite et al.'s code does (omega is then
#            num-params); "all": every parameter (Jiang et al.'s omega read as "parameters").
BOUND_PARAMETERS = ("weights", "all")


def _bound_tensors(ctx: Context, model: nn.Module) -> list[torch.Tensor]:
    if ctx.bound_parameters == "all":
        return list(model.parameters())
    modules = dict(model.named_modules())
    return [modules[n].weight for n, _ in ctx.layers]


def _bound_vector(ctx: Context, model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in _bound_tensors(ctx, model)])


def _omega(ctx: Context) -> int:
    """The number of parameters the bounds count (``ctx.bound_parameters``)."""
    return sum(p.numel() for p in _bound_tensors(ctx, ctx.model))


def _weights(ctx: Context, reference: str) -> torch.Tensor:
    """The bounds' parameters (``ctx.bound_parameters``) as one vector, or their distance to the initial ones."""
    w = _bound_vector(ctx, ctx.model)
    if reference == "orig":
        return w
    if ctx.init is None:
        raise ValueError("this measure needs the initial weights (the zoo's init_checkpoint)")
    return w - _bound_vector(ctx, ctx.init)


def _pacbayes(ctx: Context, reference: str, sigma: float) -> float:
    """``||w_ref||^2 / (4 sigma^2) + log(m / sigma) + 10`` (Jiang et al. eq. 48-49)."""
    return float(_weights(ctx, reference).pow(2).sum()) / (4 * sigma**2) + math.log(len(ctx.y) / sigma) + 10


def _pacbayes_mag(ctx: Context, reference: str, sigma: float) -> float:
    """``1/4 sum_i log((eps^2 + (sigma^2 + 1) ||w_ref||^2 / omega) / (eps^2 + sigma^2 (w - w0)_i^2))
    + log(m / sigma) + 10`` (eq. 56-57; the denominator is the distance to initialization for both
    references, as Jiang et al. write it, so both need the initial weights)."""
    ref = _weights(ctx, reference)
    dist = _weights(ctx, "init")
    num = MAG_EPS**2 + (sigma**2 + 1) * float(ref.pow(2).sum()) / ref.numel()
    return float(0.25 * torch.log(num / (MAG_EPS**2 + sigma**2 * dist**2)).sum()) + math.log(len(ctx.y) / sigma) + 10


def _sharpness_sigma(ctx: Context, alpha: float) -> float:
    """The Gaussian scale whose bound a box of half-width ``alpha`` gives: ``alpha / sqrt(2 log(2 omega))``."""
    omega = _omega(ctx)
    return alpha / math.sqrt(2 * math.log(2 * omega))


def _sharpness(ctx: Context, reference: str) -> float:
    """``||w_ref||^2 log(2 omega) / (4 alpha^2) + log(m / sigma) + 10`` (eq. 50-51)."""
    alpha = _radius(ctx, worst=True, magnitude=False)
    omega = _omega(ctx)
    sigma = _sharpness_sigma(ctx, alpha)
    return (float(_weights(ctx, reference).pow(2).sum()) * math.log(2 * omega) / (4 * alpha**2)
            + math.log(len(ctx.y) / sigma) + 10)


MEASURES.update({
    "pacbayes-init": lambda c: _pacbayes(c, "init", _radius(c, worst=False, magnitude=False)),
    "pacbayes-orig": lambda c: _pacbayes(c, "orig", _radius(c, worst=False, magnitude=False)),
    "1/sigma-pacbayes": lambda c: 1 / _radius(c, worst=False, magnitude=False) ** 2,
    "sharpness-init": lambda c: _sharpness(c, "init"),
    "sharpness-orig": lambda c: _sharpness(c, "orig"),
    "1/alpha-sharpness": lambda c: 1 / _radius(c, worst=True, magnitude=False) ** 2,
    "pacbayes-mag-init": lambda c: _pacbayes_mag(c, "init", _radius(c, worst=False, magnitude=True)),
    "pacbayes-mag-orig": lambda c: _pacbayes_mag(c, "orig", _radius(c, worst=False, magnitude=True)),
    "1/sigma-pacbayes-mag": lambda c: 1 / _radius(c, worst=False, magnitude=True) ** 2,
    "pac-sharpness-mag-init": lambda c: _pacbayes_mag(c, "init", _sharpness_sigma(c, _radius(c, True, True))),
    "pac-sharpness-mag-orig": lambda c: _pacbayes_mag(c, "orig", _sharpness_sigma(c, _radius(c, True, True))),
    "1/alpha-sharpness-mag": lambda c: 1 / _radius(c, worst=True, magnitude=True) ** 2,
})
NEEDS_INIT = NEEDS_INIT + ("pacbayes-init", "sharpness-init", "pacbayes-mag-init", "pac-sharpness-mag-init",
                           "pacbayes-mag-orig", "pac-sharpness-mag-orig")


def _recorded(ctx: Context, metric: str) -> float:
    if metric not in ctx.metrics:
        raise ValueError(f"the zoo did not record {metric!r} for this model (never reached, or trained before "
                         "trajectory facts were recorded)")
    return float(ctx.metrics[metric])


def measure(name: str, model: nn.Module, x, y, init: nn.Module | None = None, metrics: dict | None = None,
            fold_batchnorm: bool = True, bound_parameters: str = "weights") -> float:
    """The measure ``name`` (a key of :data:`MEASURES`) of ``model`` on the examples ``(x, y)``.

    ``fold_batchnorm`` (the default, as the authors' code does) measures the model with every
    foldable BatchNorm folded into the layer before it (:func:`batchnorm_folded`); ``False``
    measures the layers' own weights, the norms' scale parameters left out. ``bound_parameters``
    (:data:`BOUND_PARAMETERS`): what the PAC-Bayes and sharpness bounds count, the layers' weights
    (Dziugaite et al.'s code) or every parameter. Neither model is changed."""
    if name not in MEASURES:
        raise ValueError(f"unknown measure {name!r}; known: {', '.join(MEASURES)}")
    return float(MEASURES[name](Context(model, init, x, y, metrics, fold_batchnorm, bound_parameters)))
