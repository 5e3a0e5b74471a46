"""Many checkpoints in one pass: :func:`evaluate_many` evaluates models of one architecture as
a stack, every (model, m-batch) problem one row of the fused ``[rows, N]`` buffers, one vmapped
forward (+ backward) for all of them per step (DESIGN.md §4, "Stacked models").

Each model's result equals :func:`sharpfast.evaluate_sharpness` on it alone: the same draws, the
same solver decisions, its own ``w0``, scale and buffers; only the forward's arithmetic is
batched (float32 agrees to the tolerance of ``solve_batches_together``).
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterable, Sequence

import torch
from torch import nn

from . import precision
from .engine import budget
from .engine.budget import MAX_STACK, STACK_BUFFER_BYTES
from .api import evaluate_sharpness, resolve_backend
from .objective import map_tensors, to_device, unpack_batch
from .params import ModelGuard
from .result import SharpnessResult, check_batches
from .settings import Settings

log = logging.getLogger("sharpfast.many")

CPU_STACK_MAX_ACTIVATIONS = 2048   # on a CPU, models computing more values per example are not stacked (auto)
ERRORS = ("raise", "return")
_said_unstackable: set = set()   # architectures the log already said cannot be stacked


def evaluate_many(models: Sequence[nn.Module], data: Iterable, settings: Settings, stack: int | None = None,
                  errors: str = "raise") -> list[SharpnessResult]:
    """The sharpness ``settings`` define of each of ``models`` on ``data``: one result per model,
    each equal to ``evaluate_sharpness(model, data, settings)``, computed ``stack`` models at a time.

    Args:
        models: models of one architecture: the same module classes, the same parameter and
            buffer names, shapes, dtypes, ``requires_grad`` and device, and the same module
            settings (non-tensor attributes, tensors outside parameters and buffers, forward hooks),
            since a stack runs ``models[0]``'s modules on every model's weights (else ``ValueError``
            naming the first difference; :func:`check_same_architecture`). Buffers (BatchNorm
            statistics) stay each model's own.
            Every model is left exactly as it was, also after an exception or an interrupt.
        data, settings: as :func:`sharpfast.evaluate_sharpness`.
        stack: models per pass; ``None``: :func:`auto_stack` (as many as :data:`MAX_STACK` and the
            buffers' memory budget :data:`STACK_BUFFER_BYTES` allow). It sets only how many models
            share a pass, never the values: whether models are stacked is decided by their
            architecture, settings and device (:func:`not_stacked_because`), and a stackable
            architecture is evaluated vmapped in every pass, one model per pass included (float32
            stacked and one-at-a-time arithmetic round differently). Models that are not stacked
            (the reference backend, train mode, batches of several shapes, on a CPU a forward
            bound by arithmetic, a model vmap cannot trace: said once in the log) are evaluated
            one at a time, each exactly as ``evaluate_sharpness``.
        errors: ``"raise"`` the first model's error, or ``"return"`` it in that model's place
            (a model with non-finite weights or loss then fails alone).
    """
    if not isinstance(settings, Settings):
        raise TypeError(f"settings must be WorstCaseSettings, AverageCaseSettings or GeodesicSettings, got "
                        f"{type(settings).__name__}")
    if errors not in ERRORS:
        raise ValueError(f"errors must be one of {ERRORS}, got {errors!r}")
    models = list(models)
    if not models:
        raise ValueError("models is empty: pass at least one model")
    check_same_architecture(models)
    if stack is not None and (isinstance(stack, bool) or not isinstance(stack, int) or stack < 1):
        raise ValueError(f"stack must be a positive integer or None, got {stack!r}")
    batches = check_batches(data)
    K = auto_stack(models[0], settings, batches) if stack is None else stack
    out = []
    for i in range(0, len(models), K):   # every pass stacked, a stack of one included: values do not depend on K
        out += _evaluate_stack(models[i:i + K], batches, settings)
    if errors == "raise":
        for i, r in enumerate(out):
            if isinstance(r, BaseException):
                try:
                    named = type(r)(f"model {i}: {r}")
                except Exception:  # noqa: BLE001 - an exception type with other arguments
                    named = RuntimeError(f"model {i}: {type(r).__name__}: {r}")
                raise named from r
    return out


def auto_stack(model: nn.Module, settings: Settings, batches: list) -> int:
    """Models per pass: as many as fit the device's buffer budget :data:`STACK_BUFFER_BYTES`, at
    most :data:`MAX_STACK` (:func:`sharpfast.engine.budget.models_per_pass`)."""
    params = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
    if not params or settings.kind == "geodesic":   # geodesic: no stacked solver
        return 1
    n, element = sum(p.numel() for p in params), max(4, params[0].element_size())   # half: a float32 copy
    return budget.models_per_pass(params[0].device.type, settings.kind, getattr(settings, "solver", None),
                                  len(batches), n, element)


def activations_per_example(model: nn.Module, batch) -> int:
    """The values the leaf modules of ``model`` output for one example of ``batch`` (one forward
    on it, in eval mode, the model restored after)."""
    x, _ = unpack_batch(batch, 0)
    one = map_tensors(lambda t: t[:1], x)
    counted = [0]

    def count(module, inputs, output):
        counted[0] += sum(t.numel() for t in _tensors(output))
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with ModelGuard(model, eval_mode=True), torch.no_grad():
            if isinstance(one, dict):
                model(**one)
            elif isinstance(one, (tuple, list)):
                model(*one)
            else:
                model(one)
    finally:
        for h in hooks:
            h.remove()
    return counted[0]


def _tensors(v):
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)):
        return [t for u in v for t in _tensors(u)]
    if isinstance(v, dict):
        return [t for u in v.values() for t in _tensors(u)]
    return []


def check_same_architecture(models: Sequence[nn.Module]) -> None:
    """Raise ``ValueError`` naming the first difference between ``models[0]`` and another model:
    a module's class, a parameter's or buffer's name, shape, dtype, ``requires_grad`` or device,
    or a module's setting. A stack runs ``models[0]``'s modules on every model's tensors, so
    everything else a forward reads must be alike too: each module's non-tensor attributes
    (``LeakyReLU``'s slope, ``Dropout``'s ``p``, a config object), tensors held outside parameters
    and buffers, and its forward hooks."""
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{i}] is a {type(m).__name__}, not a torch.nn.Module")
    first = _architecture(models[0])
    for i, m in enumerate(models[1:], start=1):
        other = _architecture(m)
        for what in first:
            a, b = first[what], other[what]
            if a == b:
                continue
            names = list(dict.fromkeys([*a, *b]))
            name = next(k for k in names if a.get(k) != b.get(k))
            if isinstance(a.get(name), _Setting) and isinstance(b.get(name), _Setting):
                where, mine, theirs = _difference(a[name].value, b[name].value)
                raise ValueError(f"models[{i}] is not of models[0]'s architecture: setting {name + where!r} is "
                                 f"{_short(theirs)} in models[{i}] but {_short(mine)} in models[0] (a stack "
                                 "runs models[0]'s modules on every model's weights)")
            mine, theirs = a.get(name), b.get(name)
            raise ValueError(f"models[{i}] is not of models[0]'s architecture: {what} {name!r} is "
                             f"{_said(theirs, mine)} in models[{i}] but {_said(mine, theirs)} in models[0]")


# nn.Module's own bookkeeping; of it only the hooks that run in a forward or backward are compared
_MODULE_BOOKKEEPING = frozenset(vars(nn.Module()))
# where a Hugging Face model or config was loaded from: the same architecture from two folders
_PROVENANCE = frozenset({"name_or_path", "_name_or_path", "_commit_hash"})
_FORWARD_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _architecture(model: nn.Module) -> dict[str, dict]:
    tensor = lambda t: None if t is None else (tuple(t.shape), str(t.dtype).replace("torch.", ""), str(t.device))
    settings = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        own = {} if _compiled_wrapper(m) else vars(m)
        for attr, value in own.items():
            if attr not in _MODULE_BOOKKEEPING and attr not in _PROVENANCE:
                settings[prefix + attr] = _Setting(value)
        for attr in _FORWARD_HOOKS:
            hooks = list(getattr(m, attr, {}).values())
            if hooks:
                settings[prefix + attr] = _Setting(hooks)
    return {
        "module": {name: _ModuleClass(m) for name, m in model.named_modules()},
        "parameter": {name: (*tensor(p), p.requires_grad) for name, p in model.named_parameters()},
        "buffer": {name: tensor(b) for name, b in model.named_buffers()},
        "setting": settings,
    }


class _ModuleClass:
    """A module's class, equal only to the same class (two classes of one name may compute
    different forwards); a class made by ``torch.nn.utils.parametrize`` counts as the class it
    wraps, since each parametrized module gets a class of its own."""

    def __init__(self, module: nn.Module):
        from torch.nn.utils import parametrize
        self.cls = type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)

    def __eq__(self, other):
        return isinstance(other, _ModuleClass) and self.cls is other.cls

    def __str__(self):
        return self.cls.__qualname__

    def describe(self, other: "_ModuleClass | None") -> str:
        if other is not None and other.cls.__qualname__ == self.cls.__qualname__:
            return f"{self.cls.__module__}.{self.cls.__qualname__} (id {id(self.cls):#x})"
        return str(self)


class _Setting:
    """A module's non-tensor attribute as its forward sees it: tensors compared by value,
    containers item by item, anything else by ``==`` (objects without ``__eq__``: by identity)."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, _Setting) and _difference(self.value, other.value) is None

    def __str__(self):
        return _short(self.value)


def _difference(a, b, path: str = "") -> tuple[str, object, object] | None:
    """``(where, a's part, b's part)`` of the first difference between ``a`` and ``b``, or None."""
    if a is b:
        return None
    if type(a) is not type(b):
        return path, a, b
    if isinstance(a, torch.Tensor):
        alike = a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        return None if alike else (path, a, b)
    if _is_hf_config(a):   # its own __eq__ also compares the folder it was loaded from
        a, b = ({k: v for k, v in c.to_dict().items() if k not in _PROVENANCE} for c in (a, b))
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return path, a, b
        return next((d for i, (u, v) in enumerate(zip(a, b)) if (d := _difference(u, v, f"{path}[{i}]"))), None)
    if isinstance(a, dict):
        if list(a) != list(b):
            return path, a, b
        return next((d for k in a if (d := _difference(a[k], b[k], f"{path}[{k!r}]"))), None)
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return None
    try:
        return None if bool(a == b) else (path, a, b)
    except Exception:  # noqa: BLE001 - a comparison that is not a truth value: not known to be alike
        return path, a, b


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _compiled_wrapper(module: nn.Module) -> bool:
    """``torch.compile``'s wrapper: its own attributes are the compiler's (the model is its ``_orig_mod``,
    compared as a submodule), different objects for every compiled model."""
    optimized = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    return optimized is not None and isinstance(module, getattr(optimized, "OptimizedModule", ()))


def _is_hf_config(value) -> bool:
    return any(c.__name__.lower() == "pretrainedconfig" and c.__module__.startswith("transformers.")
               for c in type(value).__mro__)


def _said(v, other=None) -> str:
    if v is None:
        return "absent"
    if isinstance(v, (str, _Setting)):
        return str(v)
    if isinstance(v, _ModuleClass):
        return v.describe(other)
    shape, dtype, device, *grad = v
    return (f"shape {list(shape)}, {dtype} on {device}" + (f", requires_grad={grad[0]}" if grad else ""))


def _evaluate_stack(models: list[nn.Module], batches: list, settings: Settings) -> list:
    """A result (or the exception) per model of one stack."""
    stacked = _stacked(models, batches, settings)
    return stacked if stacked is not None else [_one(m, batches, settings) for m in models]


def _one(model: nn.Module, batches: list, settings: Settings):
    try:
        return evaluate_sharpness(model, batches, settings)
    except Exception as e:  # noqa: BLE001 - each model's own error, in its place
        return e


def _stacked(models: list[nn.Module], batches: list, settings: Settings) -> list | None:
    """The stack evaluated in one pass, or None where it cannot be (then one at a time). Models
    whose parameters fail the checks get their error; the others are stacked."""
    out: list = [None] * len(models)
    bound, why = [], None
    for i, m in enumerate(models):
        try:
            params = settings.bind(m)
            if settings.low_precision == "error":   # refuses a half-precision model, touching nothing
                precision.apply_policy(m, params, batches, "error")
        except Exception as e:  # noqa: BLE001 - non-finite weights, a bad scale, half precision: its error
            out[i] = e
            continue
        if not bound:   # the architecture's answer, before the others are bound for nothing
            why = not_stacked_because(m, settings, params, batches)
            if why is not None:
                break
        bound.append((i, m, params))
    if not bound and why is None:
        return out
    if why is None:
        try:
            with contextlib.ExitStack() as guards:
                for i, m, params in bound:
                    guards.enter_context(ModelGuard(m, eval_mode=settings.eval_mode))
                    # the batches as evaluated (half inputs cast where half models are upcast): alike for all
                    evaluated = precision.apply_policy(m, params, batches, settings.low_precision)
                for (i, _, _), r in zip(bound, _fused_stack([m for _, m, _ in bound], evaluated,
                                                            [p for _, _, p in bound], settings)):
                    out[i] = r
            return out
        except Exception as e:  # noqa: BLE001 - any vmap limitation: one at a time
            why = f"{type(e).__name__}: {e}"
    name = type(models[0]).__qualname__
    if name not in _said_unstackable:
        _said_unstackable.add(name)
        log.info("sharpfast: %s models are evaluated one at a time, not stacked (%s)", name, why)
    return None


def not_stacked_because(model: nn.Module, settings: Settings, params, batches: list) -> str | None:
    """Why models of ``model``'s architecture are evaluated one at a time under ``settings`` on
    their device, or None where they are stacked. On a CPU, models whose forward computes more
    than :data:`CPU_STACK_MAX_ACTIVATIONS` values per example are not: there the forward is bound
    by arithmetic, not by the per-operation overhead stacking removes, and the stacked forward
    (even of one model) measured slower (benchmarks/ZOO_RESULTS.md)."""
    from .engine.problems import stackable
    if settings.kind == "geodesic":
        return "geodesic sharpness has no stacked solver"
    if resolve_backend(settings.backend, params) != "fused":
        return "the fused backend is not used for them"
    if not settings.eval_mode:
        return "eval_mode=False: layers such as BatchNorm update their buffers batch after batch"
    if settings.kind == "worst" and settings.solve_batches_together is False:
        return "solve_batches_together=False"
    unpacked = [unpack_batch(b, i) for i, b in enumerate(batches)]
    if not (stackable([x for x, _ in unpacked]) and stackable([y for _, y in unpacked])):
        return "the batches differ in shape"
    if params.device.type == "cpu":
        values = activations_per_example(model, batches[0])
        if values > CPU_STACK_MAX_ACTIVATIONS:
            return (f"on a CPU its forward computes {values} values per example, more than "
                    f"CPU_STACK_MAX_ACTIVATIONS = {CPU_STACK_MAX_ACTIVATIONS}: there stacking is slower")
    return None


def _fused_stack(models, batches, params_list, settings: Settings) -> list:
    if settings.kind != "worst":
        from .average_case import fused as average
        return average.solve_many(models, batches, params_list, settings)
    device = params_list[0].device
    unpacked = [unpack_batch(b, i) for i, b in enumerate(batches)]
    xs = [to_device(x, device) for x, _ in unpacked]
    ys = [to_device(y, device) for _, y in unpacked]
    from .worst_case import fused as worst
    return worst.solve_many(models, batches, params_list, settings, xs, ys)


__all__ = ["evaluate_many", "auto_stack", "check_same_architecture", "MAX_STACK", "STACK_BUFFER_BYTES"]
