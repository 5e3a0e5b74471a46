"""Sweeps: checkpoints x definitions -> results store, resumable and idempotent.

The driver plans the work (every (checkpoint, definition) pair without an ``ok`` row for the
checkpoint's current sha256), groups the checkpoints of one factory and kwargs that lack one definition into stacks evaluated
together (``sharpfast.evaluate_many``; ``stack=1``: one checkpoint per pass), hands one task per
stack to an executor, definition after definition, and writes the rows as each stack returns
(each row in its own transaction), so a stopped sweep keeps every definition it finished.
Executors:

* ``local``: tasks run in this process (``jobs=1``) or in ``jobs`` spawned worker processes;
* ``ray``:   one Ray task per stack (a local cluster by default, or ``address``), with a
  GPU requested per task when the cluster has GPUs. Workers only compute and return rows;
  the driver alone writes the store.

A checkpoint that fails to load, or a definition that fails to evaluate (or gives a value that
is not finite), becomes a row with status ``error`` and the message; the sweep goes on. Errors
are retried on a rerun. The store is bound to its zoo (:meth:`Store.bind_zoo`), and a sweep
claims the checkpoints it computes, so sweeps sharing a store split them (:meth:`Store.claim`).

The package: ``plan`` (missing rows, stacks), ``evaluate`` (a stack's rows, in a worker),
``executors`` (local and Ray), ``driver`` (:func:`run_sweep`).
"""
from .driver import SweepSummary, run_sweep
from .evaluate import evaluate_checkpoint, evaluate_checkpoints, resolve_device, rows_of
from .executors import RAY_CONNECT_TIMEOUT_S, RAY_POLL_S, RayChatter, check_reachable
from .plan import Stack, Task, hashed, plan, stacks

__all__ = ["run_sweep", "SweepSummary", "evaluate_checkpoint", "evaluate_checkpoints", "resolve_device", "rows_of",
           "RayChatter", "check_reachable", "RAY_POLL_S", "RAY_CONNECT_TIMEOUT_S", "Stack", "Task", "hashed", "plan",
           "stacks"]
