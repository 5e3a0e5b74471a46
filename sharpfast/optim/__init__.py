"""Sharpness-aware training: the SAM family as optimizers around a base optimizer, on sharpfast's
fused ops, equal to the public code (``compat=``) where it has one.

    optimizer = sharpfast.optim.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    loss_fn(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    loss_fn(model(x), y).backward()
    optimizer.second_step(zero_grad=True)
"""
from .gsam import GSAM, ProportionScheduler
from .looksam import LookSAM
from .rsam import RSAM
from .sam import ASAM, SAM

__all__ = ["SAM", "ASAM", "GSAM", "ProportionScheduler", "LookSAM", "RSAM"]
