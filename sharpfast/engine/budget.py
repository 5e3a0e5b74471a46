"""How much memory the engine's buffers may take, in one place: the m-batches of a worst-case call
solved together, the perturbed copies of an average-case pass, and the models of a stack.

Each budget only chooses how work is grouped; where the grouping can change float32 rounding
(the m-batches together), it is decided once per call by these rules, the same on every run.
"""
from __future__ import annotations

# [B, N] buffers of one worst-case row by solver: current, grad, the vmapped gradient, best_grad,
# and delta, delta_prev (published) or u, u_prev, u_best (scaled)
WORST_CASE_ROW_BUFFERS = {"published": 6, "scaled": 7}

TOGETHER_DEVICES = ("cuda",)    # where a call's m-batches are solved together by default ...
TOGETHER_BUFFER_BYTES = 2**30   # ... when their [B, N] buffers fit in this much memory

MAX_SAMPLES_PER_PASS = 32           # perturbed copies evaluated in one forward (average case) ...
SAMPLE_BUFFER_BYTES = 256 * 2**20   # ... within this much memory for the [K, N] buffer

MAX_POINTS_PER_PASS = 256   # loss-landscape grid points in one vmapped forward at most ...
POINT_BUFFER_BYTES = 256 * 2**20   # ... within this much memory for their weights and activations

MAX_STACK = 64   # models per pass at most (sharpfast.evaluate_many, auto)
# the memory a stack's [rows, N] buffers may take (auto): per model, its solver's buffers per
# m-batch and the flat w0 (worst case) or the perturbed copy and w0 (average case)
STACK_BUFFER_BYTES = {"cuda": 2**30, "cpu": 2**28}


def worst_case_bytes(solver: str, rows: int, numel: int, element_size: int) -> int:
    """The worst case's [rows, N] buffers for ``rows`` problems of ``numel`` parameters."""
    return WORST_CASE_ROW_BUFFERS[solver] * rows * numel * element_size


def together(device_type: str, solver: str, n_batches: int, numel: int, element_size: int) -> bool:
    """Whether a call's ``n_batches`` m-batches fit the together budget on this device."""
    return (device_type in TOGETHER_DEVICES and n_batches > 1
            and worst_case_bytes(solver, n_batches, numel, element_size) <= TOGETHER_BUFFER_BYTES)


def samples_per_pass(numel: int, element_size: int) -> int:
    """Perturbed copies of ``numel`` parameters that fit one average-case pass."""
    return min(MAX_SAMPLES_PER_PASS, max(1, SAMPLE_BUFFER_BYTES // max(1, numel * element_size)))


def models_per_pass(device_type: str, kind: str, solver: str, n_batches: int, numel: int, element_size: int) -> int:
    """Models of ``numel`` parameters that fit a stack's budget on this device (at most MAX_STACK)."""
    if kind == "worst":
        per_model = worst_case_bytes(solver, n_batches, numel, element_size) + numel * element_size
    else:
        per_model = 2 * numel * element_size
    budget = STACK_BUFFER_BYTES.get(device_type, STACK_BUFFER_BYTES["cuda"])
    return max(1, min(MAX_STACK, budget // per_model))


def points_per_pass(numel: int, element_size: int, activations: int) -> int:
    """Loss-landscape grid points per vmapped forward: each holds its weights (``numel`` values)
    and a batch's ``activations`` values."""
    per_point = (numel + activations) * element_size
    return min(MAX_POINTS_PER_PASS, max(1, POINT_BUFFER_BYTES // max(1, per_point)))
