"""The generalization measures of Jiang et al. (ICLR 2020, "Fantastic generalization measures and
where to find them", appendix C), named as in their table (the seeds' Table 5), computed from a
model's weights, its initial weights and training examples.

Layers are the weight matrices and kernels of ``nn.Linear`` and ``nn.Conv{1,2}d`` modules, in
module order (biases, normalization parameters and embeddings are not layers); ``d`` is their
number. ``||W||_2`` is a layer's operator norm: the largest singular value for a linear layer; for
a convolution the norm of the linear map it applies to its actual input shape (taken from a
forward pass on the data; zero padding and stride included), from the map's dense matrix up to
4096 inputs, else by Lanczos on the convolution followed by its transpose. The margin ``gamma`` is the 10th percentile over the examples of
``f(x)_y - max_{j != y} f(x)_j``; a measure divided by it needs ``gamma > 0``.

* norms: ``param-norm = sum ||W||_F^2``; ``frob-distance = sum ||W - W0||_F^2``;
  ``spec-dist = sum ||W - W0||_2^2``; ``fro/spec = sum ||W||_F^2 / ||W||_2^2``;
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
  ``1/sigma-pacbayes-mag``, ``1/alpha-sharpness-mag``. These use all parameters (``omega`` of
  them).

Departures, each deliberate: the searches' deviation is the training error's (Jiang et al.'s
"accuracy deviation"), measured on the sweep's examples; the margin is the 10th percentile
(Dziugaite et al.'s code takes its absolute value where it is negative; here a ``/margin`` measure
with ``gamma <= 0`` is an error, not a number); ``fisher-rao`` uses all parameters (biases too), as the gradient's
inner product is taken with everything that was trained; ``path-norm`` squares biases too (Jiang
et al. do not say) and is what the definition gives for non-homogeneous networks (the ViT's
attention and LayerNorm); the margin's data is the sweep's training examples, not the full set.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

MARGIN_PERCENTILE = 10
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


def operator_norm(layer: nn.Module, weight: torch.Tensor, shape: tuple[int, ...] | None) -> float:
    """``||W||_2`` of a layer's weight (or of a weight difference applied the same way)."""
    w = weight.detach().double()
    if isinstance(layer, nn.Linear):
        return float(torch.linalg.matrix_norm(w, ord=2))
    if shape is None:
        raise ValueError(f"the convolution {layer} was not reached by the forward pass: no input shape")
    conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
    kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    n_in = math.prod(shape[1:])
    if n_in <= DENSE_LIMIT:   # the map's matrix, from the unit inputs: exact
        basis = torch.eye(n_in, dtype=torch.float64).reshape((n_in,) + tuple(shape[1:]))
        return float(torch.linalg.matrix_norm(conv(basis, w, **kw).reshape(n_in, -1), ord=2))
    conv_t = F.conv_transpose1d if isinstance(layer, nn.Conv1d) else F.conv_transpose2d
    # above: Lanczos (scipy's eigsh) on the normal map W^T W, through the convolution and its
    # adjoint, the transposed convolution with the output padding that restores the input's shape
    from scipy.sparse.linalg import LinearOperator, eigsh

    out_shape = conv(torch.zeros(shape, dtype=torch.float64), w, **kw).shape
    plain = conv_t(torch.zeros(out_shape, dtype=torch.float64), w, **kw).shape
    kw_t = dict(kw, output_padding=tuple(a - b for a, b in zip(shape[2:], plain[2:])))

    def normal(v):
        t = torch.as_tensor(v, dtype=torch.float64).reshape(shape)
        return conv_t(conv(t, w, **kw), w, **kw_t).reshape(-1).numpy()

    v0 = torch.randn(n_in, generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()
    top = eigsh(LinearOperator((n_in, n_in), matvec=normal, dtype="float64"), k=1, which="LA", tol=1e-12, v0=v0,
                return_eigenvectors=False)
    return float(math.sqrt(max(float(top[0]), 0.0)))


def margin(model: nn.Module, x, y) -> float:
    """The 10th percentile of ``f(x)_y - max_{j != y} f(x)_j`` over the examples."""
    with torch.no_grad():
        out = model(x).double()
    true = out.gather(1, y[:, None]).squeeze(1)
    others = out.scatter(1, y[:, None], float("-inf")).max(dim=1).values
    return float(torch.quantile(true - others, MARGIN_PERCENTILE / 100))


def _positive_margin(model, x, y) -> float:
    gamma = margin(model, x, y)
    if not gamma > 0:
        raise ValueError(f"the margin (10th percentile of f(x)_y - max_j f(x)_j) is {gamma:.3g} <= 0: more than "
                         "10% of the examples are misclassified, and the /margin measures are undefined")
    return gamma


class Context:
    """What the measures of one model share, computed once: layers, norms, the margin."""

    def __init__(self, model: nn.Module, init: nn.Module | None, x, y, metrics: dict | None = None):
        if not isinstance(x, torch.Tensor):
            raise TypeError("the Jiang et al. measures take models with one tensor input (their layers, margins and "
                            f"path-norm are defined for classifiers f(x)); got inputs of type {type(x).__name__}")
        self.model, self.init, self.x, self.y, self.metrics = model.eval(), init, x, y, metrics or {}
        self.layers = layers(model)
        self.shapes = input_shapes(model, x)
        self._cache: dict = {}

    def cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def d(self) -> int:
        return len(self.layers)

    def spec(self) -> list[float]:
        return self.cached("spec", lambda: [operator_norm(m, m.weight, self.shapes.get(n)) for n, m in self.layers])

    def fro(self) -> list[float]:
        return self.cached("fro", lambda: [float(m.weight.detach().double().norm()) for _, m in self.layers])

    def init_layers(self) -> list[torch.Tensor]:
        if self.init is None:
            raise ValueError("this measure needs the initial weights (the zoo's init_checkpoint)")
        return self.cached("init", lambda: [dict(self.init.named_modules())[n].weight.detach() for n, _ in self.layers])

    def distances(self) -> list[torch.Tensor]:
        return [m.weight.detach() - w0 for (_, m), w0 in zip(self.layers, self.init_layers())]

    def gamma(self) -> float:
        return self.cached("gamma", lambda: _positive_margin(self.model, self.x, self.y))


def _log_prod_sq(norms: list[float]) -> float:
    return sum(2 * math.log(v) for v in norms)


def _path_norm(ctx: Context) -> float:
    model = ctx.model
    squared = {n: p.detach() ** 2 for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    ones = torch.ones((1,) + tuple(ctx.x.shape[1:]), dtype=ctx.x.dtype, device=ctx.x.device)
    with torch.no_grad():
        return float(functional_call(model, {**squared, **buffers}, (ones,)).double().sum())


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


def _spectral(ctx: Context, reference: str) -> float:
    spec = ctx.spec()
    terms = ([float(dw.double().norm()) ** 2 for dw in ctx.distances()] if reference == "init"
             else [f ** 2 for f in ctx.fro()])
    return _log_prod_sq(spec) - 2 * math.log(ctx.gamma()) + math.log(sum(t / s**2 for t, s in zip(terms, spec)))


MEASURES: dict[str, Callable[[Context], float]] = {
    "param-norm": lambda c: sum(f**2 for f in c.fro()),
    "frob-distance": lambda c: sum(float(dw.double().norm()) ** 2 for dw in c.distances()),
    "spec-dist": lambda c: sum(operator_norm(m, dw, c.shapes.get(n)) ** 2
                               for (n, m), dw in zip(c.layers, c.distances())),
    "fro/spec": lambda c: sum(f**2 / s**2 for f, s in zip(c.fro(), c.spec())),
    "prod-of-spec": lambda c: _log_prod_sq(c.spec()),
    "prod-of-spec/margin": lambda c: _log_prod_sq(c.spec()) - 2 * math.log(c.gamma()),
    "sum-of-spec": lambda c: math.log(c.d) + _log_prod_sq(c.spec()) / c.d,
    "sum-of-spec/margin": lambda c: math.log(c.d) + (_log_prod_sq(c.spec()) - 2 * math.log(c.gamma())) / c.d,
    "prod-of-fro": lambda c: _log_prod_sq(c.fro()),
    "prod-of-fro/margin": lambda c: _log_prod_sq(c.fro()) - 2 * math.log(c.gamma()),
    "sum-of-fro": lambda c: math.log(c.d) + _log_prod_sq(c.fro()) / c.d,
    "sum-of-fro/margin": lambda c: math.log(c.d) + (_log_prod_sq(c.fro()) - 2 * math.log(c.gamma())) / c.d,
    "spectral-init": lambda c: _spectral(c, "init"),
    "spectral-orig": lambda c: _spectral(c, "origin"),
    "path-norm": _path_norm,
    "path-norm/margin": lambda c: _path_norm(c) / c.gamma() ** 2,
    "1/margin": lambda c: 1.0 / c.gamma() ** 2,
    "cross-entropy": lambda c: float(F.cross_entropy(_outputs(c), c.y)),
    "neg-entropy": lambda c: float((F.softmax(_outputs(c), 1) * F.log_softmax(_outputs(c), 1)).sum(1).mean()),
    "fisher-rao": _fisher_rao,
    "num-step-to-0.1-loss": lambda c: _recorded(c, "steps_to_loss_0.1"),
}
NEEDS_INIT = ("frob-distance", "spec-dist", "spectral-init")


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


def _weights(ctx: Context, reference: str) -> torch.Tensor:
    """All parameters as one vector, or their distance to the initial ones."""
    w = torch.cat([p.detach().double().reshape(-1) for p in ctx.model.parameters()])
    if reference == "orig":
        return w
    if ctx.init is None:
        raise ValueError("this measure needs the initial weights (the zoo's init_checkpoint)")
    return w - torch.cat([p.detach().double().reshape(-1) for p in ctx.init.parameters()])


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
    omega = sum(p.numel() for p in ctx.model.parameters())
    return alpha / math.sqrt(2 * math.log(2 * omega))


def _sharpness(ctx: Context, reference: str) -> float:
    """``||w_ref||^2 log(2 omega) / (4 alpha^2) + log(m / sigma) + 10`` (eq. 50-51)."""
    alpha = _radius(ctx, worst=True, magnitude=False)
    omega = sum(p.numel() for p in ctx.model.parameters())
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


def measure(name: str, model: nn.Module, x, y, init: nn.Module | None = None, metrics: dict | None = None) -> float:
    """The measure ``name`` (a key of :data:`MEASURES`) of ``model`` on the examples ``(x, y)``."""
    if name not in MEASURES:
        raise ValueError(f"unknown measure {name!r}; known: {', '.join(MEASURES)}")
    return float(MEASURES[name](Context(model, init, x, y, metrics)))
