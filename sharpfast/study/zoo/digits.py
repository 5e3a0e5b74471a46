"""scikit-learn's bundled 8x8 digits (no download) and "digits-C", its corrupted test sets.

The 1797 images are split once, deterministically (a seeded permutation), into a training
pool and a test set. Pixel values are scaled to ``[0, 1]``; images are ``[N, 1, 8, 8]``
float32 tensors and labels int64.

digits-C applies four corruptions to the test set, each seeded and at one fixed severity:

* ``noise``    additive Gaussian noise (std 0.25), clipped to ``[0, 1]``;
* ``blur``     a 3x3 Gaussian blur (sigma 0.8, zero padding);
* ``rotation`` rotation by a random angle of +-(15..30) degrees (bilinear);
* ``shift``    translation by one pixel towards one of the 8 neighbours (zero fill).

The out-of-distribution error of a model is its mean error over the four.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

N_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
CORRUPTIONS = ("noise", "blur", "rotation", "shift")
DEFAULT_SPLIT_SEED = 0
DEFAULT_N_TEST = 597  # 1797 - 597 = 1200 in the training pool


@functools.lru_cache(maxsize=None)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    return x, d.target.astype(np.int64)


def split(n_train: int | None = None, n_test: int = DEFAULT_N_TEST, seed: int = DEFAULT_SPLIT_SEED):
    """``(x_train, y_train, x_test, y_test)``: a seeded split; ``n_train`` defaults to all the rest."""
    x, y = _raw()
    n = len(y)
    if not 0 < n_test < n:
        raise ValueError(f"n_test must be in 1..{n - 1}, got {n_test}")
    pool = n - n_test
    if n_train is None:
        n_train = pool
    if not 0 < n_train <= pool:
        raise ValueError(f"n_train must be in 1..{pool} (with n_test={n_test}), got {n_train}")
    perm = np.random.default_rng(seed).permutation(n)
    test_idx, train_idx = perm[:n_test], perm[n_test:n_test + n_train]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return t(x[train_idx]), t(y[train_idx]), t(x[test_idx]), t(y[test_idx])


# ----------------------------------------------------------------------------- corruptions

def _gaussian_kernel(sigma: float) -> torch.Tensor:
    r = torch.arange(-1, 2, dtype=torch.float32)
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = torch.outer(k, k)
    return (k / k.sum())[None, None]


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def corrupt(x: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """One corruption of a batch of images ``[N, 1, 8, 8]`` in ``[0, 1]``; deterministic given ``seed``."""
    g = torch.Generator().manual_seed(seed * 1000 + CORRUPTIONS.index(kind) if kind in CORRUPTIONS else seed)
    n = x.shape[0]
    if kind == "noise":
        return (x + 0.25 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    if kind == "blur":
        return F.conv2d(x, _gaussian_kernel(0.8), padding=1)
    if kind == "rotation":
        mag = 15 + 15 * torch.rand(n, generator=g)
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        a = (mag * sign) * math.pi / 180
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), -torch.sin(a)
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
        return _affine(x, theta).clamp(0, 1)
    if kind == "shift":
        moves = torch.tensor([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)])
        shifts = moves[torch.randint(0, len(moves), (n,), generator=g)]
        out = torch.zeros_like(x)
        for i in range(n):  # integer shifts, zero fill
            dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
            src = x[i, :, max(0, -dy):8 - max(0, dy), max(0, -dx):8 - max(0, dx)]
            out[i, :, max(0, dy):max(0, dy) + src.shape[1], max(0, dx):max(0, dx) + src.shape[2]] = src
        return out
    raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")


def corrupted_test_sets(x_test: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """digits-C: ``{corruption: corrupted copy of x_test}`` (labels unchanged)."""
    return {kind: corrupt(x_test, kind, seed) for kind in CORRUPTIONS}


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training-time augmentation: random +-1 pixel shift and a small random rotation (+-6 deg)."""
    n = x.shape[0]
    a = (torch.rand(n, generator=generator) * 2 - 1) * (6 * math.pi / 180)
    t = (torch.randint(-1, 2, (n, 2), generator=generator).float()) * (2 / 8)  # 1 px in [-1, 1] coords
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = torch.cos(a), -torch.sin(a), t[:, 0]
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = torch.sin(a), torch.cos(a), t[:, 1]
    return _affine(x, theta)


def sharpness_data(n_examples: int = 512, n_train: int | None = None, n_test: int = DEFAULT_N_TEST,
                   split_seed: int = DEFAULT_SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples sharpness is measured on: the first ``n_examples`` of the training set
    (as in the paper, sharpness is a training-set quantity)."""
    x, y, _, _ = split(n_train, n_test, split_seed)
    if not 0 < n_examples <= len(y):
        raise ValueError(f"n_examples must be in 1..{len(y)}, got {n_examples}")
    return x[:n_examples], y[:n_examples]
