"""What sharpfast does with float16 / bfloat16 models: evaluate a float32 copy, or refuse.

Sharpness perturbs weights by ``rho * c * xi``; with ``c = |w|`` that is a relative change of
``rho |xi|``, and bfloat16 keeps 8 significant bits (float16: 11). At the radii adaptive
sharpness is used with (rho = 5e-4 for BERT in the paper) ``w + rho |w| xi`` rounds back to
``w`` for almost every coordinate, and the "sharpness" of a bf16 model comes out hundreds of
times too small, silently. So sharpfast never evaluates perturbations in half precision:

* ``low_precision="float32"`` (default): for the duration of the call the half-precision
  parameters and floating-point buffers are replaced by float32 copies (the user's tensors are
  never written, and the guard points everything back afterwards), and half-precision inputs
  are cast to float32. The weights are the model's own, exactly (float32 holds every fp16 and
  bf16 value), so the value is the float32 sharpness of the model as stored. Cost: a float32
  copy of the weights (twice the memory of the half-precision weights), and every working
  buffer of the evaluation in float32.
* ``low_precision="error"``: raise a ``ValueError`` naming the precision instead.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .objective import map_tensors
from .params import ParamSet

LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)
POLICIES = ("float32", "error")


def check_policy(policy: Any) -> str:
    if policy not in POLICIES:
        raise ValueError(f"low_precision must be one of {POLICIES}, got {policy!r}")
    return policy


def low_precision_parameters(params: ParamSet) -> dict[str, torch.dtype]:
    """``{name: dtype}`` of the perturbed parameters stored in float16 or bfloat16."""
    return {n: p.dtype for n, p in zip(params.names, params.tensors) if p.dtype in LOW_PRECISION_DTYPES}


def apply_policy(model: nn.Module, params: ParamSet, batches: list, policy: str) -> list:
    """Under a :class:`~sharpfast.params.ModelGuard`: upcast a half-precision model to float32
    (``policy="float32"``) or refuse it (``"error"``); returns the batches to evaluate (half
    inputs cast to float32 where the model was upcast). Full-precision models pass untouched."""
    low = low_precision_parameters(params)
    if not low:
        return batches
    dtypes = sorted({str(d).replace("torch.", "") for d in low.values()})
    if policy == "error":
        names = ", ".join(list(low)[:4]) + (", ..." if len(low) > 4 else "")
        raise ValueError(
            f"the model's parameters are {' and '.join(dtypes)} ({names}): a perturbation rho * c * xi "
            f"rounds back to w in {' and '.join(dtypes)} at the radii sharpness is measured at, and the value "
            "would be meaningless; pass low_precision='float32' (the default) to evaluate a float32 copy "
            "of the same weights, or convert the model with model.float()")
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.dtype in LOW_PRECISION_DTYPES:
                p.grad = None
                p.data = p.data.float()   # the guard restores the user's tensor and grad
        for name, buf in module._buffers.items():
            if buf is not None and buf.dtype in LOW_PRECISION_DTYPES:
                module._buffers[name] = buf.float()   # (the guard's private copy; restored too)
    upcast = lambda t: t.float() if t.dtype in LOW_PRECISION_DTYPES else t
    return [map_tensors(upcast, batch) for batch in batches]
