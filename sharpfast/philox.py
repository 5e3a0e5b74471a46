"""Pure-PyTorch twin of the extension's counter-based sampler (Philox4x32-10).

Every random number sharpfast draws is a pure function of ``(seed, stream, sample, element)``:

* key     = (seed mod 2^32, seed >> 32)                      (seed: a 64-bit unsigned integer)
* counter = (block mod 2^32, block >> 32, sample, stream)    with block = element // 4
* the element takes word ``element % 4`` of ``philox4x32_10(counter, key)``.

``element`` is the position of a coordinate in the concatenation of the model's trainable
parameters (``named_parameters()`` order, tied parameters once), so the draws do not depend
on how parameters are grouped into buffers, on the device or on the launch shape. The C++/CUDA
kernels (``csrc/include/sharpfast/philox.h``) implement the same function; the tests compare
the two bit for bit (uniform, Rademacher) and to 1e-12 relative before the final cast (normal).

Transforms of a 32-bit word ``x`` (and its partner word for Box-Muller):

* uniform(-1, 1): ``((x >> 8) - 2^23) * 2^-23``, exact in float32 (24 significant bits);
* Rademacher:     ``+1`` if the top bit of ``x`` is 0, else ``-1``;
* normal:         Box-Muller in float64 on the word pairs (0, 1) and (2, 3) of a block:
                  ``u1 = (x_a + 1) * 2^-32`` in (0, 1], ``u2 = x_b * 2^-32``,
                  ``r = sqrt(-2 log u1)``; lane a gets ``r cos(2 pi u2)``, lane b ``r sin(2 pi u2)``.

All integer arithmetic here runs in int64 tensors masked to 32 bits, splitting the 32x32-bit
products into 16-bit halves so nothing overflows.
"""
from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10

DISTRIBUTIONS = ("normal", "uniform", "rademacher")


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of ``a * m`` for 32-bit ``a`` (int64 tensor) and constant ``m``."""
    p_lo = (a & 0xFFFF) * m          # < 2^48
    p_hi = (a >> 16) * m             # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (mid >> 32), mid & MASK32


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32 with 10 rounds on int64 tensors holding 32-bit words (Salmon et al., 2011)."""
    for r in range(PHILOX_ROUNDS):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _check_counter_args(seed: int, stream: int, sample: int, offset: int, numel: int) -> None:
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    for name, v in (("stream", stream), ("sample", sample)):
        if not 0 <= v < 2**32:
            raise ValueError(f"{name} must be in [0, 2^32), got {v}")
    if offset < 0 or numel < 0:
        raise ValueError(f"offset and numel must be >= 0, got {offset} and {numel}")


def _words_and_partners(seed, stream, sample, offset, numel, device):
    _check_counter_args(seed, stream, sample, offset, numel)
    first_block, last_block = offset // 4, (offset + numel + 3) // 4
    block = torch.arange(first_block, max(last_block, first_block), device=device, dtype=torch.int64)
    c0, c1 = block & MASK32, block >> 32
    c2 = torch.full_like(block, sample)
    c3 = torch.full_like(block, stream)
    x = torch.stack(philox4x32_10(c0, c1, c2, c3, seed & MASK32, seed >> 32), dim=1)  # [blocks, 4]
    partner = x[:, [1, 0, 3, 2]]
    start = offset - first_block * 4
    words = x.reshape(-1)[start:start + numel]
    partners = partner.reshape(-1)[start:start + numel]
    return words, partners


def draw(distribution: str, seed: int, stream: int, sample: int, numel: int, dtype, device) -> torch.Tensor:
    """:func:`philox_draw` of elements ``0 .. numel - 1``, by the fused op where the extension has
    kernels for the device (the same bits, no float64 temporaries), else by the twin below."""
    from . import _ops
    if _ops.available(device):
        return _ops.draw_(torch.empty(numel, dtype=dtype, device=device), seed, stream, sample, 0, distribution)
    return philox_draw(distribution, seed, stream, sample, 0, numel, dtype=dtype, device=device)


def philox_draw(distribution: str, seed: int, stream: int, sample: int, offset: int, numel: int,
                dtype=torch.float32, device=None) -> torch.Tensor:
    """Draws for elements ``offset .. offset + numel - 1`` of sample ``sample`` in ``stream``.

    ``distribution``: ``"normal"`` (N(0, 1)), ``"uniform"`` (U(-1, 1)) or ``"rademacher"`` (+-1).
    Returns a 1-D tensor of ``dtype`` on ``device``.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
    words, partners = _words_and_partners(seed, stream, sample, offset, numel, device)
    if distribution == "uniform":
        out = ((words >> 8) - (1 << 23)).to(torch.float32) * 2.0**-23
    elif distribution == "rademacher":
        out = 1.0 - 2.0 * (words >> 31).to(torch.float32)
    else:
        index = torch.arange(offset, offset + numel, device=device, dtype=torch.int64)
        is_first = (index % 2) == 0               # lanes 0 and 2 take the cosine
        x_a = torch.where(is_first, words, partners).to(torch.float64)
        x_b = torch.where(is_first, partners, words).to(torch.float64)
        u1 = (x_a + 1.0) * 2.0**-32
        theta = (2.0 * math.pi * 2.0**-32) * x_b
        r = torch.sqrt(-2.0 * torch.log(u1))
        out = torch.where(is_first, r * torch.cos(theta), r * torch.sin(theta))
    return out.to(dtype)


# Which counter streams the evaluators use: stream = index of the m-sharpness batch;
# the sample word distinguishes average-case draws from the random starts of APGD.
AVERAGE_SAMPLE_BASE = 0
RAND_INIT_SAMPLE_BASE = 1 << 31


def noise_distribution(norm: str) -> str:
    """Gaussian noise for the l2 definitions, uniform(-1, 1) for linf (DESIGN.md §1)."""
    return "normal" if norm == "l2" else "uniform"


def draw_noise(params, s, stream: int, sample: int) -> list[torch.Tensor]:
    """``xi`` for every parameter of ``params`` (a ``ParamSet``) under settings ``s`` (its norm picks
    the distribution, its seed the key): one draw over the concatenated parameter vector."""
    xi = philox_draw(noise_distribution(s.norm), s.seed, stream, sample, 0, params.numel,
                     dtype=torch.float64, device=params.device)
    return [x.to(p.dtype) for x, p in zip(params.split(xi), params.tensors)]
