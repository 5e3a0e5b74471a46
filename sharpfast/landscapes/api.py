"""``sharpfast.landscape``: the loss along one or two directions of weight space (Li et al. 2018's
filter-normalized plots, Goodfellow et al.'s interpolation, PyHessian's eigenvector plots, the
plane of a training trajectory)."""
from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..engine import budget
from ..many import CPU_STACK_MAX_ACTIVATIONS, activations_per_example
from ..objective import Objective, batches_on_device, call_model, unwrap_logits
from . import directions as D
from .evaluate import surface, surface_reference
from .result import LandscapeResult

KINDS = ("random", "interpolate", "hessian", "pca", "custom")
BACKENDS = ("auto", "fused", "reference")


def grid(spec, name: str) -> np.ndarray:
    """``(min, max, num)`` -> ``linspace`` in float64, or the coordinates themselves."""
    if isinstance(spec, tuple) and len(spec) == 3 and not any(isinstance(v, (list, tuple)) for v in spec):
        lo, hi, num = spec
        if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
            raise ValueError(f"{name}=(min, max, num) needs a positive integer num, got {num!r}")
        if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
            raise ValueError(f"{name}=(min, max, num) needs finite min <= max, got ({lo}, {hi})")
        return np.linspace(float(lo), float(hi), int(num))
    coords = np.asarray(spec, dtype=np.float64).reshape(-1)
    if coords.size == 0:
        raise ValueError(f"{name} is an empty grid")
    if not np.isfinite(coords).all():
        raise ValueError(f"{name} has non-finite coordinates")
    return coords


def landscape(model: nn.Module, data: Iterable, x=(-1.0, 1.0, 51), y=None, kind: str = "random",
              norm: str | None = "auto", ignore: str | None = "biasbn", dir_type: str = "weights", seed: int = 0,
              directions: Sequence[dict] | None = None, model2: nn.Module | None = None,
              checkpoints: Sequence[dict] | None = None, loss_fn: Callable | None = None,
              points_per_pass: int | None = None, backend: str = "auto") -> LandscapeResult:
    """The loss and error at ``w + x d1`` (1-D) or ``w + x d1 + y d2`` (2-D, ``y`` given).

    Args:
        model: the model at ``w`` (left bit for bit as it was; evaluated in eval mode).
        data: ``(input, target)`` batches; the loss is their example-weighted mean.
        x, y: ``(min, max, num)`` (a float64 ``linspace``, the public code's ``-1:1:51``) or coordinates.
        kind: ``"random"`` (Philox draws keyed by ``(seed, axis, name)``), ``"interpolate"`` (``d1 =
            model2 - model``, unnormalized: ``x = 0`` is ``model``, ``x = 1`` is ``model2``), ``"hessian"``
            (the top eigenvectors of the Hessian on the first batch, unit norm, as PyHessian's),
            ``"pca"`` (the top principal components of ``checkpoints - w``, a training trajectory as
            state dicts, its last point ``w``) or ``"custom"`` (``directions``).
        norm: ``"filter"``, ``"layer"``, ``"weight"``, ``"dfilter"``, ``"dlayer"`` or None (see
            :mod:`sharpfast.landscapes.directions`); ``"auto"``: ``"filter"`` for random and custom
            directions, None (as computed) for interpolation, eigenvectors and components.
        ignore: ``"biasbn"``: 0 on tensors of 0 or 1 dimensions; None: a copy of ``w`` there (the
            public code's rule).
        dir_type: ``"weights"`` (the parameters) or ``"states"`` (the floating-point state_dict,
            BatchNorm statistics included: the public code's advice for interpolation).
        directions: ``"custom"``: one ``{name: tensor}`` per axis, normalized with ``norm`` and ``ignore``
            (``norm=None``: used exactly as given).
        points_per_pass: grid points per vmapped forward (None: a memory budget; on a CPU, one for
            models whose forward is arithmetic-bound).
        backend: ``"fused"`` (K points per vmapped forward; one point per pass written into the
            model's tensors, without a host sync per batch) or ``"reference"`` (the public code's
            loop). The model is put back bit for bit either way, also after an exception.

    Returns:
        A :class:`LandscapeResult`.
    """
    start_time = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, v, allowed in (("kind", kind, KINDS), ("ignore", ignore, D.IGNORES), ("dir_type", dir_type, D.DIR_TYPES),
                             ("backend", backend, BACKENDS), ("norm", norm, D.NORMS + ("auto",))):
        if v not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {v!r}")
    xs, ys = grid(x, "x"), (None if y is None else grid(y, "y"))
    n_axes = 1 if ys is None else 2
    w = D.space(model, dir_type)
    if not w:
        raise ValueError(f"the model has no {'parameters' if dir_type == 'weights' else 'floating-point state'}")
    device = next(iter(w.values())).device
    batches = [(bx, by) for _, bx, by in batches_on_device(list(data), device)]
    if not batches:
        raise ValueError("data holds no batches")
    norm_of = lambda default: default if norm == "auto" else norm
    dirs, keys, extra = _directions(kind, model, w, n_axes, seed, norm_of, ignore, dir_type, directions, model2,
                                    checkpoints, batches, loss_fn)
    coords = torch.tensor(np.array([[a] for a in xs]) if ys is None else
                          np.array([[a, b] for b in ys for a in xs]), dtype=torch.float64)
    objective = Objective(loss_fn=loss_fn)
    if backend == "auto":
        backend = "fused"
    k = points_per_pass or _points_per_pass(model, w, batches)
    with torch.no_grad():   # the model's tensors are put back bit for bit, also after an exception
        modes = [m.training for m in model.modules()]
        model.eval()
        try:
            if backend == "fused":
                loss, err = surface(model, batches, w, dirs, coords, objective, k)
            else:
                loss, err = surface_reference(model, batches, w, dirs, coords, objective)
            origin = np.flatnonzero((coords == 0).all(dim=1).numpy())
            base = ((loss[origin[0]:origin[0] + 1], None if err is None else err[origin[0]:origin[0] + 1])
                    if len(origin) else
                    surface(model, batches, w, dirs, torch.zeros(1, n_axes, dtype=torch.float64), objective, 1))
        finally:
            for m, mode in zip(model.modules(), modes):
                m.training = mode
    bad = int((~torch.isfinite(loss)).sum())
    if bad:   # said, not hidden: the grid keeps them as NaN / inf
        cause = (" (dir_type='states' with ignore=None moves BatchNorm's running_var along a copy of itself: it "
                 "reaches 0 at x = -1, as in the public code)" if dir_type == "states" and ignore is None else "")
        warnings.warn(f"{bad} of {len(coords)} grid points have a non-finite loss{cause}", RuntimeWarning,
                      stacklevel=2)
    shape = (len(xs),) if ys is None else (len(ys), len(xs))
    n_examples = sum(len(t) for _, t in batches)
    return LandscapeResult(
        x=xs, y=ys, loss=loss.numpy().reshape(shape), error=None if err is None else err.numpy().reshape(shape),
        base_loss=float(base[0][0]), base_error=None if base[1] is None else float(base[1][0]),
        directions=dirs, keys=keys, kind=kind, norm=extra.pop("norm"), ignore=ignore, dir_type=dir_type,
        cosine=D.cosine(dirs[0], dirs[1]) if n_axes == 2 else None, **extra,
        meta=dict(n_examples=n_examples, n_batches=len(batches), points=len(coords),
                  forwards=len(coords) * len(batches), points_per_pass=k if backend == "fused" else 1, backend=backend,
                  seconds=time.perf_counter() - start_time, device=str(device),
                  dtype=str(next(iter(w.values())).dtype).replace("torch.", ""), torch=torch.__version__))


def _points_per_pass(model: nn.Module, w: dict, batches: list) -> int:
    """The memory budget for K points (their weights and a batch's activations); one on a CPU where
    the forward is arithmetic-bound (a vmapped forward measured slower there, as for stacked models)."""
    first = next(iter(w.values()))
    values = activations_per_example(model, batches[0])
    if first.device.type == "cpu" and values > CPU_STACK_MAX_ACTIVATIONS:
        return 1
    return budget.points_per_pass(sum(t.numel() for t in w.values()), first.element_size(),
                                  values * max(len(y) for _, y in batches))


def _directions(kind, model, w, n_axes, seed, norm_of, ignore, dir_type, given, model2, checkpoints, batches,
                loss_fn):
    """The normalized directions, their Philox keys per axis (None where not drawn) and the
    result's extra fields (the norm applied; eigenvalues and residuals; explained variance)."""
    extra: dict = {}
    if kind != "interpolate" and model2 is not None:
        raise ValueError(f"model2 is for kind='interpolate', not {kind!r}")
    if kind != "custom" and given is not None:
        raise ValueError(f"directions= are for kind='custom', not {kind!r}")
    if kind != "pca" and checkpoints is not None:
        raise ValueError(f"checkpoints= are for kind='pca', not {kind!r}")

    def random_axis(axis: int, norm):
        raw, keys = D.draw(seed, axis, w)
        return D.normalized(raw, w, norm, ignore), keys

    if kind == "random":
        norm = norm_of("filter")
        pairs = [random_axis(a, norm) for a in range(n_axes)]
        dirs, keys = [p[0] for p in pairs], [p[1] for p in pairs]
    elif kind == "custom":
        norm = norm_of("filter")
        if given is None or len(given) != n_axes:
            raise ValueError(f"kind='custom' needs directions=, one {{name: tensor}} per axis ({n_axes} here)")
        dirs = [D.check(d, w, f"directions[{i}]") for i, d in enumerate(given)]
        if norm is not None:   # None: exactly as given (e.g. another code's normalized directions)
            dirs = [D.normalized(d, w, norm, ignore) for d in dirs]
        keys = [None] * n_axes
    elif kind == "interpolate":
        if model2 is None:
            raise ValueError("kind='interpolate' needs model2, the model at x = 1")
        w2 = D.space(model2, dir_type) if isinstance(model2, nn.Module) else None
        if w2 is None:
            raise TypeError(f"model2 must be a torch.nn.Module, got {type(model2).__name__}")
        if list(w2) != list(w) or any(w2[n].shape != w[n].shape for n in w):
            raise ValueError("model2 is not of model's architecture: their tensors differ in names or shapes")
        norm = norm_of(None)
        dirs, keys = [D.target(w, {n: t.to(w[n].device) for n, t in w2.items()})], [None]
        if norm is not None:
            dirs = [D.normalized(dirs[0], w, norm, ignore)]
        if n_axes == 2:
            d2, k2 = random_axis(1, norm_of("filter"))
            dirs.append(d2)
            keys.append(k2)
    elif kind == "hessian":
        norm = norm_of(None)
        dirs, extra = _eigen_directions(model, w, n_axes, batches[:1], loss_fn, dir_type)
        if norm is not None:
            dirs = [D.normalized(d, w, norm, ignore) for d in dirs]
        keys = [None] * n_axes
    else:
        norm = norm_of(None)
        dirs, extra = _pca_directions(w, checkpoints, n_axes, ignore)
        if norm is not None:
            dirs = [D.normalized(d, w, norm, ignore) for d in dirs]
        keys = [None] * n_axes
    extra["norm"] = norm
    return dirs, keys, extra


def _eigen_directions(model, w, k, batches, loss_fn, dir_type):
    """The top ``k`` eigenvectors of the Hessian of the first batch's loss (sharpfast's Lanczos),
    unit norm, each signed so that its largest entry is positive; their eigenvalues and residuals."""
    if dir_type != "weights":
        raise ValueError("kind='hessian' perturbs the parameters: dir_type must be 'weights'")
    from ..curvature import hessian_eigenvalues
    r = hessian_eigenvalues(model, batches, adaptive=False, k=k, loss_fn=loss_fn, return_vectors=True)
    vecs = r.vectors[0]
    dirs = []
    for i in range(k):
        d = {n: vecs[n][i].to(device=w[n].device, dtype=w[n].dtype) for n in w}
        flat = torch.cat([t.flatten() for t in d.values()])
        if flat[flat.abs().argmax()] < 0:
            d = {n: -t for n, t in d.items()}
        dirs.append(d)
    values = r.per_batch[0][:k]
    residuals = [_residual(model, batches[0], loss_fn, d, lam) for d, lam in zip(dirs, values)]
    return dirs, dict(eigenvalues=[float(v) for v in values], residuals=residuals)


def _residual(model, batch, loss_fn, d: dict, lam: float) -> float:
    """``||H v - lambda v||`` by one Hessian-vector product (autograd's double backward)."""
    objective = Objective(loss_fn=loss_fn)
    names = list(d)
    params = dict(model.named_parameters())
    with torch.enable_grad():
        loss = objective.loss(unwrap_logits(call_model(model, batch[0])), batch[1])
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        dot = sum((g * d[n]).sum() for g, n in zip(grads, names))
        hv = torch.autograd.grad(dot, [params[n] for n in names])
    return float(torch.sqrt(sum(((h - lam * d[n]).double() ** 2).sum() for h, n in zip(hv, names))))


def _pca_directions(w, checkpoints, k, ignore):
    """The top ``k`` principal components (scikit-learn's PCA, centred, unit norm) of the rows
    ``theta_e - w`` of a trajectory (the public code's projection.py; 1-D entries zeroed with
    ``ignore="biasbn"``), and their explained-variance ratios."""
    from sklearn.decomposition import PCA
    if checkpoints is None or len(checkpoints) < k + 1:
        raise ValueError(f"kind='pca' needs checkpoints=, at least {k + 1} state dicts of the trajectory")
    names = list(w)
    rows = []
    for i, sd in enumerate(checkpoints):
        checked = D.check({n: sd[n] for n in names if n in sd} if isinstance(sd, dict) else sd, w,
                          f"checkpoints[{i}]")
        rows.append(torch.cat([(checked[n] - w[n]).flatten() if not (ignore == "biasbn" and w[n].dim() <= 1)
                               else torch.zeros(w[n].numel(), dtype=w[n].dtype, device=w[n].device)
                               for n in names]).double().cpu().numpy())
    pca = PCA(n_components=k).fit(np.stack(rows))
    dirs = []
    for comp in pca.components_:
        d, off = {}, 0
        for n in names:
            d[n] = torch.tensor(comp[off:off + w[n].numel()], dtype=w[n].dtype, device=w[n].device).view(w[n].shape)
            off += w[n].numel()
        dirs.append(d)
    return dirs, dict(explained_variance=[float(v) for v in pca.explained_variance_ratio_])
