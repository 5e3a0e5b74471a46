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

from torch import nn

from . import jiang, neyshabur, pacbayes
from .context import BOUND_PARAMETERS, Context
from .layers import (DENSE_LIMIT, FOLDABLE_NORMS, LAYER_TYPES, MARGIN_CONVENTIONS, batchnorm_folded, input_shapes,
                     layers, lpq_norm, margin, margins, operator_norm, schatten_norm)
from .neyshabur import NEYSHABUR

# The conventions' revision, part of every measure definition's key: 2 folds BatchNorm, takes the
# margin as the authors' code does and a convolution's padding mode; 3 takes a convolution's
# spectral norm as the authors' code does (its reshaped kernel's; the operator norm is the -exact
# measures') and the PAC-Bayes bounds over the layers' weights (values of earlier revisions are kept
# in old stores but not reused)
MEASURES_REVISION = 3

# the registry, one paper per module, in the order the presets list them
MEASURES = {**jiang.MEASURES, **neyshabur.MEASURES, **pacbayes.MEASURES}
NEEDS_INIT = jiang.NEEDS_INIT + neyshabur.NEEDS_INIT + pacbayes.NEEDS_INIT


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


__all__ = ["MEASURES", "MEASURES_REVISION", "NEEDS_INIT", "NEYSHABUR", "BOUND_PARAMETERS", "Context", "DENSE_LIMIT",
           "FOLDABLE_NORMS", "LAYER_TYPES", "MARGIN_CONVENTIONS", "batchnorm_folded", "input_shapes", "layers",
           "lpq_norm", "margin", "margins", "operator_norm", "schatten_norm", "measure"]
