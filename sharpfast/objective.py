"""The quantity whose sharpness is measured: batches in, mean loss and 0-1 error out.

A batch is ``(x, y)`` or the published code's ``(x, _, y, _, _)``; ``x`` is a tensor, a tuple
of positional inputs or a dict of keyword inputs (as Hugging Face models take). Model outputs
that are not tensors (an object with ``.logits``, a dict with ``"logits"``) are unwrapped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

LOGIT_NORMALIZATIONS = ("norm", "std")


def unpack_batch(batch: Any, index: int) -> tuple[Any, Any]:
    """``(x, y)`` from a batch of the forms above."""
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 5):
        return (batch[0], batch[1]) if len(batch) == 2 else (batch[0], batch[2])
    raise TypeError(f"batch {index} must be (x, y) or (x, _, y, _, _), got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))


def map_tensors(fn: Callable, x: Any) -> Any:
    """``fn`` applied to every tensor in ``x`` (a tensor, or dicts, tuples and lists of them)."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: map_tensors(fn, v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(map_tensors(fn, v) for v in x)
    return x


def to_device(x: Any, device: torch.device) -> Any:
    """``x``'s tensors on ``device``, detached: no measurement differentiates the inputs, and a
    caller's input that requires grad must come back without a ``.grad``."""
    # an inference tensor (made under torch.inference_mode) cannot enter autograd's graph: a copy can
    return map_tensors(lambda t: (t.clone() if t.is_inference() else t.detach()).to(device), x)


def batches_on_device(batches, device: torch.device):
    """``(index, x, y)`` for each batch, moved to ``device`` when its turn comes."""
    for index, batch in enumerate(batches):
        x, y = unpack_batch(batch, index)
        yield index, to_device(x, device), to_device(y, device)


def call_model(model: Callable, x: Any) -> Any:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def unwrap_logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}; "
                    "return a tensor, a dict with 'logits' or an object with .logits")


def normalize_logits(f: torch.Tensor, form: str) -> torch.Tensor:
    """Scale-invariant logits: ``(f - mean f) / max(||f - mean f||, 1e-10)`` over the last dim.

    ``form="norm"`` divides by the plain l2 norm, as the published code does (and as produced the
    published numbers); ``form="std"`` by the standard deviation over the K logits,
    ``||f - mean f|| / sqrt(K)``, as the paper's slides write it.
    """
    centered = f - f.mean(dim=-1, keepdim=True)
    norms = centered.norm(dim=-1, keepdim=True)
    if form == "std":
        norms = norms / math.sqrt(f.shape[-1])
    return centered / torch.clamp(norms, min=1e-10)


def default_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if logits.dim() > 2:  # sequence outputs [B, T, K] with labels [B, T]
        return F.cross_entropy(logits.flatten(0, -2), y.flatten())
    return F.cross_entropy(logits, y)


def classification_error(f: torch.Tensor, y: Any) -> torch.Tensor | None:
    """Mean 0-1 error ``argmax f != y``, or None where ``y`` are not class labels for ``f``
    (integer labels shaped like ``f`` without its last, class, dimension)."""
    if (isinstance(y, torch.Tensor) and not y.is_floating_point() and not y.is_complex()
            and y.dtype != torch.bool and f.dim() >= 1 and tuple(f.shape[:-1]) == tuple(y.shape)):
        return (f.argmax(dim=-1) != y).to(torch.float32).mean()
    return None


def _one_element(value: Any, what: str, quantity: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise TypeError(f"{what}(output, y) must return the mean {quantity} of the batch as a one-element tensor, got "
                        f"{type(value).__name__}" + (f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                                                     else ""))
    return value.reshape(())


@dataclass
class Objective:
    """``loss_fn(normalized logits, y)`` and the 0-1 error, for one batch at the current weights.

    The error is ``error_fn(logits, y)`` where one is given. Otherwise it is the classification
    error ``argmax != y`` where that means what the loss means: for ``[B, K]`` logits with ``[B]``
    integer labels whatever the loss, and for sequence logits ``[B, T, K]`` with ``[B, T]`` labels
    only under the default token cross-entropy (a custom loss may shift or mask the tokens, as a
    language model's does, and ``argmax != y`` would then compare the wrong positions). Anything
    else has no error (``err_sharpness`` is None).
    """

    loss_fn: Callable | None = None
    logit_normalization: str | None = None  # None, "norm" or "std"
    error_fn: Callable | None = None

    def logits(self, model: Callable, x: Any) -> torch.Tensor:
        f = unwrap_logits(call_model(model, x))
        if f.dtype in (torch.float16, torch.bfloat16):  # half-precision models: the loss in fp32
            f = f.float()
        if self.logit_normalization is not None:
            f = normalize_logits(f, self.logit_normalization)
        return f

    def loss(self, f: torch.Tensor, y: Any) -> torch.Tensor:
        return _one_element((self.loss_fn or default_loss)(f, y), "loss_fn", "loss")

    def error(self, f: torch.Tensor, y: Any) -> torch.Tensor | None:
        """The batch's mean error (see the class docstring), or None where it has none."""
        if self.error_fn is not None:
            return _one_element(self.error_fn(f, y), "error_fn", "error").to(torch.float32)
        if self.loss_fn is None or f.dim() == 2:
            return classification_error(f, y)
        return None

    def loss_and_error(self, model: Callable, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = self.logits(model, x)
        return self.loss(f, y), self.error(f.detach(), y)


def resolve_logit_normalization(normalize_logits_arg: bool | str | None) -> str | None:
    if normalize_logits_arg is None or normalize_logits_arg is False:
        return None
    if normalize_logits_arg is True:
        return "norm"
    if isinstance(normalize_logits_arg, str) and normalize_logits_arg in LOGIT_NORMALIZATIONS:
        return normalize_logits_arg
    raise ValueError(f"normalize_logits must be False, True, 'norm' or 'std', got {normalize_logits_arg!r}")


def evaluate(model, objective: Objective, x, y) -> tuple[float, float | None]:
    """The loss (and error) of ``model`` on one batch, as Python floats."""
    loss, err = objective.loss_and_error(model, x, y)
    return float(loss), (None if err is None else float(err))


def gradient(model, objective: Objective, params, x, y) -> list[torch.Tensor]:
    """The loss's gradient for each parameter of ``params`` (a ``ParamSet``); zeros for parameters
    the loss does not use (``params.check_gradients`` refuses those it uses without a gradient)."""
    loss = objective.loss(objective.logits(model, x), y)
    grads = (torch.autograd.grad(loss, params.tensors, allow_unused=True) if loss.requires_grad
             else [None] * len(params))   # no parameter is seen: check_gradients says which matter
    params.check_gradients([g is not None for g in grads], lambda: objective.loss(objective.logits(model, x), y))
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.tensors)]
