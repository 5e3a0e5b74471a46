"""SAF's and MESA's training losses (Du et al., NeurIPS 2022, AngusDujw/SAF): sharpness-aware
training without a second pass, by a KL term to past predictions added to the task loss.

Both add ``lam T^2 mean_i KL(softmax(z_ref,i / T) || softmax(z_i / T))`` (``F.kl_div`` summed over
classes, averaged over the batch) while ``kl_start < epoch < kl_end``:

- :class:`TrajectoryKL` (SAF): ``z_ref`` is the same example's logits ``epochs_back`` epochs earlier,
  kept in a ring of ``epochs_back + 1`` slots per example (the loader must yield example indices).
  SAF_train.py's defaults: ``lam=0.16``, ``T=5``, ``kl_start=5``, ``epochs_back=3``, ``kl_end=300``.
- :class:`EMATeacherKL` (MESA): ``z_ref`` is an exponential moving average of the model (decay
  0.9998, ``torch.optim.swa_utils.AveragedModel``), evaluated without gradients. MESA_train.py's
  defaults: ``lam=0.3``, ``T=5``, ``kl_start=5``, ``kl_end=360``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def kl_to_reference(logits: torch.Tensor, reference: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 mean_i KL(softmax(reference_i / T) || softmax(logits_i / T))``, as the public code writes it."""
    return F.kl_div(F.softmax(logits / temperature, dim=-1).log(), F.softmax(reference / temperature, dim=-1),
                    reduction="none").sum(-1).mean() * temperature**2


def _active(epoch: int, start: int, end: int) -> bool:
    return start < epoch < end


class TrajectoryKL(nn.Module):
    """SAF's term. ``n_examples`` x ``n_classes`` logits per slot are kept (float32, on ``device``)."""

    def __init__(self, n_examples: int, n_classes: int, lam: float = 0.16, temperature: float = 5.0,
                 epochs_back: int = 3, kl_start: int = 5, kl_end: int = 300, device=None):
        super().__init__()
        if epochs_back < 1:
            raise ValueError(f"epochs_back must be >= 1, got {epochs_back}")
        self.lam, self.temperature, self.epochs_back = lam, temperature, epochs_back
        self.kl_start, self.kl_end = kl_start, kl_end
        self.register_buffer("memory", torch.zeros(epochs_back + 1, n_examples, n_classes, device=device))

    def forward(self, logits: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """The term for this batch (``indices``: the examples' positions in the data set); records
        the logits for later epochs."""
        self.memory[epoch % (self.epochs_back + 1), indices] = logits.detach().float()
        if not _active(epoch, self.kl_start, self.kl_end):
            return logits.new_zeros(())
        past = self.memory[(epoch - self.epochs_back) % (self.epochs_back + 1), indices].to(logits.dtype)
        return self.lam * kl_to_reference(logits, past, self.temperature)


class EMATeacherKL(nn.Module):
    """MESA's term; call :meth:`update` after each optimizer step to move the teacher."""

    def __init__(self, model: nn.Module, lam: float = 0.3, temperature: float = 5.0, decay: float = 0.9998,
                 kl_start: int = 5, kl_end: int = 360):
        super().__init__()
        if not 0 <= decay <= 1:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.lam, self.temperature, self.kl_start, self.kl_end = lam, temperature, kl_start, kl_end
        self.teacher = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.teacher.requires_grad_(False)
        self.teacher.n_averaged.fill_(1)   # the copy is the average so far: the first update averages (timm's EMA)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.teacher.update_parameters(model)

    def forward(self, logits: torch.Tensor, inputs, epoch: int) -> torch.Tensor:
        if not _active(epoch, self.kl_start, self.kl_end):
            return logits.new_zeros(())
        with torch.no_grad():
            reference = self.teacher(inputs)
        return self.lam * kl_to_reference(logits, reference, self.temperature)
