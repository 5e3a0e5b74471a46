"""Sharpness-aware training: the SAM family as optimizers around a base optimizer, on sharpfast's
fused ops, equal to the public code (``compat=``) where it has one.

    optimizer = sharpfast.optim.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    loss_fn(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    loss_fn(model(x), y).backward()
    optimizer.second_step(zero_grad=True)
"""
from .esam import ESAM
from .gsam import GSAM, ProportionScheduler
from .looksam import LookSAM
from .losses import EMATeacherKL, TrajectoryKL
from .rsam import RSAM
from .sam import ASAM, SAM
from .ssam import SSAM, fisher_scores

__all__ = ["SAM", "ASAM", "GSAM", "ProportionScheduler", "LookSAM", "SSAM", "fisher_scores", "RSAM", "ESAM",
           "TrajectoryKL", "EMATeacherKL"]
