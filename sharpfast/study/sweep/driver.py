"""The sweep's driver: plan, claim, hand the stacks to an executor, and store each row as it comes."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from ..definitions import Definition, check_data, fit_to_data
from ..store import Store
from ..zoo.checkpoints import Manifest, ModelEntry
from .executors import _run_local, _run_ray
from .plan import Task, hashed, plan, stacks

@dataclass
class SweepSummary:
    n_checkpoints: int = 0
    n_definitions: int = 0
    skipped: int = 0
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)  # "checkpoint / definition" -> message
    claimed_elsewhere: dict[str, str] = field(default_factory=dict)  # checkpoint -> the sweep computing it

    def text(self, store_path: str) -> str:
        total = self.n_checkpoints * self.n_definitions
        lines = [f"sweep: {self.n_checkpoints} checkpoint(s) x {self.n_definitions} definition(s) = {total} row(s); "
                 f"computed {self.ok + self.errors} ({self.ok} ok, {self.errors} error), "
                 f"{self.skipped} already done; {self.seconds:.1f}s -> {store_path}"]
        if self.claimed_elsewhere:
            owners = sorted(set(self.claimed_elsewhere.values()))
            lines.append(f"  rows of {len(self.claimed_elsewhere)} checkpoint(s) left to another sweep on this store, "
                         f"which is computing them ({', '.join(owners)}); rerun when it is done to see them all")
        by_message: dict[str, list[str]] = {}   # rows failing alike (a dead node's) on one line
        for k, v in self.failed.items():
            by_message.setdefault(v.splitlines()[0][:300], []).append(k)
        for message, rows in list(by_message.items())[:10]:
            which = rows[0] if len(rows) == 1 else f"{len(rows)} rows, the first {rows[0]}"
            lines.append(f"  error: {which}: {message}")
        if len(by_message) > 10:
            lines.append(f"  ... and {len(by_message) - 10} more errors (see the store's results.error)")
        return "\n".join(lines)


def _checkpoint_meta(e: ModelEntry) -> dict[str, Any]:
    return dict(checkpoint_id=e.id, sha256=e.sha256, factory=e.factory, hparams=e.hparams, metrics=e.metrics)


def run_sweep(manifest: Manifest, defs: list[Definition], store_path: str, executor: str = "local",
              device: str = "auto", threads: int | None = 1, backend: str = "auto", jobs: int = 1,
              retry_errors: bool = True, progress: bool = True, address: str | None = None,
              num_cpus: int | None = None, limit: int | None = None, cpus_per_task: float = 1.0,
              gpus_per_task: float | None = None, fit_examples: bool = False,
              mix_zoos: bool = False, stack: int | None = None) -> SweepSummary:
    """Evaluate every missing (checkpoint, definition) pair and store it; return a summary.

    ``threads``: torch intra-op threads per evaluation (default 1: the small models of a zoo
    run fastest one per core, and every executor then computes bit-identical values).
    ``jobs``: worker processes of the local executor. ``limit``: stop after that many
    checkpoints (smoke runs). Ray: ``address`` of a running cluster (default: start a local one
    with ``num_cpus``), ``cpus_per_task``, ``gpus_per_task`` (default 1 where the cluster has
    GPUs, 0 otherwise; fractions share a GPU between tasks). ``fit_examples``: lower the
    definitions' ``n_examples`` to what the zoo's data provide (:func:`fit_to_data`, said on one
    line) instead of refusing them. ``mix_zoos``: allow a store written for another zoo
    (:meth:`Store.bind_zoo`). Checkpoints another sweep on the same store is computing are left
    to it (``summary.claimed_elsewhere``). ``stack``: checkpoints of one factory and kwargs
    evaluated together (:func:`stacks`, ``sharpfast.evaluate_many``); ``None`` (auto) splits each
    such group over the workers and lets ``evaluate_many`` choose the models per pass; ``1``
    evaluates one checkpoint per pass. Store keys and values do not depend on it.
    """
    from tqdm import tqdm

    if executor not in ("local", "ray"):
        raise ValueError(f"unknown executor {executor!r}; expected 'local' or 'ray'")
    if stack is not None and (isinstance(stack, bool) or not isinstance(stack, int) or stack < 1):
        raise ValueError(f"stack must be a positive integer or None (auto), got {stack!r}")
    if not defs:
        raise ValueError("no sharpness definitions to sweep")
    t0 = time.perf_counter()
    if fit_examples:
        defs, message = fit_to_data(manifest, defs)
        if message:
            print(f"sweep: {message}", flush=True)
    check_data(manifest, defs)
    summary = SweepSummary(n_checkpoints=len(manifest.models), n_definitions=len(defs))
    entries = hashed(manifest)
    with Store(store_path) as store:
        store.bind_zoo(manifest.data, manifest.root, [e.id for e in entries], mix=mix_zoos)
        store.put_definitions(defs)
        # checkpoint metadata is refreshed even where nothing is left to compute
        with store.transaction() as db:
            for e in entries:
                store.put_checkpoint(db, **_checkpoint_meta(e))
        tasks, summary.skipped = plan(entries, defs, store, retry_errors)
        if limit is not None:
            tasks = tasks[:limit]
        # rows another sweep on this store computes are left to it (claims per checkpoint and definition)
        held = store.claim([(t.entry.id, d.key) for t in tasks for d in t.definitions])
        if held:
            summary.claimed_elsewhere = {cid: f"{host} pid {pid}" for (cid, _), (host, pid) in held.items()}
            tasks = [Task(t.entry, [d for d in t.definitions if (t.entry.id, d.key) not in held]) for t in tasks]
            tasks = [t for t in tasks if t.definitions]
        names = {d.key: d.name for d in defs}
        bar = tqdm(total=sum(len(t.definitions) for t in tasks), desc=f"sweep ({executor})", unit="row",
                   disable=not progress or not tasks)

        def on_result(task: Task, rows: list[dict]) -> None:
            store.put_results(_checkpoint_meta(task.entry), rows)
            for r in rows:
                if r["status"] == "ok":
                    summary.ok += 1
                else:
                    summary.errors += 1
                    summary.failed[f"{r['checkpoint_id']} / {names.get(r['definition_key'], r['definition_key'])}"] = r["error"]
            bar.update(len(rows))
            bar.set_postfix(ok=summary.ok, error=summary.errors, refresh=False)

        try:
            workers = jobs if executor == "local" else (num_cpus or os.cpu_count() or 1)
            work = stacks(tasks, stack, workers)
            if executor == "local":
                _run_local(manifest, work, device, threads, backend, on_result, jobs, stack)
            else:
                _run_ray(manifest, work, device, threads, backend, on_result, address, num_cpus,
                         cpus_per_task, gpus_per_task, stack, log_path=store_path + ".ray.log")
        finally:
            bar.close()
            store.release()
    summary.seconds = time.perf_counter() - t0
    return summary
