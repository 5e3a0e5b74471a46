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
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from sharpfast import map_tensors

from .zoo.checkpoints import Manifest, ModelEntry, file_sha256, load_model
from .measures import NEEDS_INIT
from .definitions import ConfigError, Definition, check_data, fit_to_data
from .workers import exit_with_parent
from .store import Store

_DATA_CACHE: dict[tuple, tuple[Any, torch.Tensor]] = {}


def rows_of(x: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of inputs that are a tensor, or a dict / tuple of them (the keyword
    inputs a Hugging Face model takes: ``{"input_ids": ..., "attention_mask": ...}``)."""
    return map_tensors(lambda t: t[start:stop], x)


def _versions() -> tuple[str, str]:
    import sharpfast

    return getattr(sharpfast, "__version__", "unknown"), torch.__version__


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return device


def _short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}"
    return msg if len(msg) < 2000 else msg[:2000] + " ..."


def evaluate_checkpoint(data_spec: dict[str, Any], root: str, entry: dict[str, Any],
                        definitions: list[dict[str, Any]], device: str = "auto",
                        threads: int | None = None, backend: str = "auto") -> list[dict[str, Any]]:
    """Evaluate every definition on one checkpoint; return the store rows (plain dicts)."""
    return evaluate_checkpoints(data_spec, root, [entry], definitions, device, threads, backend, stack=1)[0]


def evaluate_checkpoints(data_spec: dict[str, Any], root: str, entries: list[dict[str, Any]],
                         definitions: list[dict[str, Any]], device: str = "auto", threads: int | None = None,
                         backend: str = "auto", stack: int | None = None) -> list[list[dict[str, Any]]]:
    """Evaluate every definition on each checkpoint of a stack (checkpoints of one factory and
    kwargs); return each checkpoint's store rows (plain dicts), in ``entries``' order.

    Sharpness definitions evaluate the loaded checkpoints together (``sharpfast.evaluate_many``,
    ``stack`` models per pass, ``None``: its own choice), every other definition one checkpoint at a
    time. Runs in the driver (local executor) or in a worker (Ray): it touches no store and never
    raises for a bad checkpoint or a failing definition; those become that checkpoint's ``error``
    rows, and the other checkpoints of the stack are computed as if alone.
    """
    import sharpfast

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    sf_version, torch_version = _versions()
    defs = [Definition.from_dict(d) for d in definitions]
    dev_name = dev
    if dev.startswith("cuda"):
        dev_name = f"{dev} ({torch.cuda.get_device_name(torch.device(dev))})"
    manifest = Manifest(data=data_spec, models=[], root=root)
    bases, models, rows = [], [], [[] for _ in entries]
    for entry in entries:
        bases.append(dict(checkpoint_id=entry["id"], device=dev_name, sharpfast_version=sf_version,
                          torch_version=torch_version, checkpoint_sha256=entry.get("sha256"),
                          threads=torch.get_num_threads()))
        try:
            models.append(load_model(manifest, ModelEntry.from_dict(entry)).to(dev))
        except Exception as e:  # CheckpointError, ManifestError, anything a factory raises
            models.append(_short_error(e))
    loaded = [i for i, m in enumerate(models) if not isinstance(m, str)]
    for i, m in enumerate(models):
        if isinstance(m, str):
            rows[i] = [dict(bases[i], definition_key=d.key, status="error", error=m, time_s=0.0) for d in defs]
    for d in defs:
        t0 = time.perf_counter()
        try:
            batches = _batches(manifest, d, dev)
        except Exception as e:  # noqa: BLE001 - the data cannot serve this definition: every checkpoint's error
            for i in loaded:
                rows[i].append(dict(bases[i], definition_key=d.key, status="error", error=_short_error(e), time_s=0.0))
            continue
        outcomes = None
        if d.stackable and loaded:   # evaluate_many also for a stack of one: the values do not
            # depend on how the checkpoints were split into stacks (its arithmetic is the architecture's)
            many = lambda ms, k: sharpfast.evaluate_many(ms, batches, d.settings(backend), stack=k, errors="return")
            try:
                outcomes = many([models[i] for i in loaded], stack)
            except Exception:  # noqa: BLE001 - not one architecture (e.g. checkpoints that load into other
                # dtypes): each alone, as a stack of one, where each gets its own row
                outcomes = []
                for i in loaded:
                    try:
                        outcomes += many([models[i]], 1)
                    except Exception as e:  # noqa: BLE001 - its error row
                        outcomes.append(e)
        if outcomes is not None:
            _synchronize(dev)
            seconds = (time.perf_counter() - t0) / len(loaded)   # the stack's time, shared
            for i, r in zip(loaded, outcomes):
                rows[i].append(_row(bases[i], d, lambda r=r: d.measured(r), seconds))
            continue
        for i in loaded:
            t0 = time.perf_counter()
            rows[i].append(_row(bases[i], d, lambda i=i: _evaluate_one(d, models[i], batches, backend, manifest,
                                                                       entries[i], dev), None, t0))
    return rows


def _batches(manifest: Manifest, d: Definition, dev: str) -> list:
    """The m-batches ``d`` is measured on, on the device (the data factory called once per size)."""
    ck = (manifest.data["factory"], repr(sorted(manifest.data.get("kwargs", {}).items())), d.n_examples)
    if ck not in _DATA_CACHE:
        _DATA_CACHE[ck] = manifest.sharpness_data(d.n_examples)
    x, y = _DATA_CACHE[ck]
    if len(y) < d.n_examples:
        raise ValueError(f"the definition needs {d.n_examples} examples, the data has {len(y)}")
    x, y = map_tensors(lambda t: t[:d.n_examples].to(dev), x), y[:d.n_examples].to(dev)
    return [(rows_of(x, i, i + d.m), y[i:i + d.m]) for i in range(0, d.n_examples, d.m)]


def _evaluate_one(d: Definition, model, batches, backend: str, manifest: Manifest, entry: dict, dev: str) -> dict:
    init = None
    if d.is_measure and d.measure in NEEDS_INIT:   # loaded when a definition asks for it
        init = load_model(manifest, ModelEntry.from_dict(entry), initial=True).to(dev)
    measured = d.evaluate(model, batches, backend, init=init,
                          metrics=entry.get("metrics"))
    _synchronize(dev)
    return measured


def _row(base: dict, d: Definition, measure: Callable[[], dict], seconds: float | None, t0: float = 0.0) -> dict:
    """The store row of one (checkpoint, definition): ``measure()``'s columns, or the error it raised
    (also for a value that is not finite: never an ok row without a number)."""
    try:
        measured = measure()
        if not math.isfinite(measured["value"]):
            raise ValueError(f"the value is not finite ({measured['value']}): {d.name} is undefined on this "
                             "model (its curvature or its loss diverges)")
        status = dict(status="ok", **measured)
    except Exception as e:  # noqa: BLE001 - this checkpoint's error row
        status = dict(status="error", error=_short_error(e))
    return dict(base, definition_key=d.key, time_s=time.perf_counter() - t0 if seconds is None else seconds, **status)


def _synchronize(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- planning

@dataclass
class Task:
    entry: ModelEntry
    definitions: list[Definition]


@dataclass
class Stack:
    """Tasks of checkpoints of one factory and kwargs that lack one definition: evaluated together
    (:func:`evaluate_checkpoints`), their rows stored as soon as the stack returns. One definition
    per stack, so that a worker's rows reach the store definition by definition."""
    tasks: list[Task]

    @property
    def definitions(self) -> list[Definition]:
        return self.tasks[0].definitions

    def arguments(self, manifest: Manifest, device: str, threads: int | None, backend: str, size: int | None):
        """:func:`evaluate_checkpoints`' arguments (plain data: they travel to workers)."""
        return (manifest.data, manifest.root, [t.entry.to_dict() for t in self.tasks],
                [d.canonical() for d in self.definitions], device, threads, backend, size)

    def failed(self, e: BaseException) -> list[list[dict]]:
        """Every checkpoint's error rows, where the stack's worker died (e.g. out of memory)."""
        return [[dict(checkpoint_id=t.entry.id, definition_key=d.key, status="error", error=_short_error(e),
                      checkpoint_sha256=t.entry.sha256) for d in t.definitions] for t in self.tasks]


def stacks(tasks: list[Task], size: int | None = None, jobs: int = 1) -> list[Stack]:
    """The tasks grouped into stacks of ``size`` checkpoints of one factory and kwargs lacking one
    definition, definition after definition (a sweep stopped early has whole definitions), each in
    the tasks' order; ``size=None``: each such group split evenly over the ``jobs`` workers, at most
    ``sharpfast.many.MAX_STACK`` checkpoints per stack."""
    from sharpfast.many import MAX_STACK

    groups: dict[tuple, list[Task]] = {}
    for t in tasks:
        for d in t.definitions:
            key = (d.key, t.entry.factory, json.dumps(t.entry.kwargs, sort_keys=True))
            groups.setdefault(key, []).append(Task(t.entry, [d]))
    first = {}   # each definition's place: where it first appears
    for key in groups:
        first.setdefault(key[0], len(first))
    out = []
    for _, group in sorted(groups.items(), key=lambda kv: first[kv[0][0]]):
        k = size or max(1, min(MAX_STACK, -(-len(group) // max(1, jobs))))
        out += [Stack(group[i:i + k]) for i in range(0, len(group), k)]
    return out


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


def hashed(manifest: Manifest) -> list[ModelEntry]:
    """The manifest's entries, each with the sha256 of its checkpoint file: the manifest's, or the
    file's own where the manifest has none (a user's table), so that a stored row is reused only for
    the very weights it was computed from (a missing file is left to fail as the checkpoint's error)."""
    out = []
    for e in manifest.models:
        path = manifest.checkpoint_path(e)
        out.append(e if e.sha256 is not None or not os.path.isfile(path) else replace(e, sha256=file_sha256(path)))
    return out


def plan(entries: list[ModelEntry], defs: list[Definition], store: Store,
         retry_errors: bool = True) -> tuple[list[Task], int]:
    """One task per checkpoint with the definitions it lacks a reusable row for (one computed from
    the same checkpoint file: ``entries`` carry their sha256, see :func:`hashed`)."""
    done = store.done_keys(include_errors=not retry_errors)
    tasks, skipped = [], 0
    for e in entries:
        todo = []
        for d in defs:
            k = (e.id, d.key)
            if k in done and e.sha256 is not None and done[k] == e.sha256:
                skipped += 1
            else:
                todo.append(d)
        if todo:
            tasks.append(Task(e, todo))
    return tasks, skipped


# ----------------------------------------------------------------------------- executors

def _checkpoint_meta(e: ModelEntry) -> dict[str, Any]:
    return dict(checkpoint_id=e.id, sha256=e.sha256, factory=e.factory, hparams=e.hparams, metrics=e.metrics)


def _run_local(manifest: Manifest, work: list[Stack], device: str, threads: int | None, backend: str,
               on_result: Callable[[Task, list[dict]], None], jobs: int = 1, size: int | None = None) -> None:
    """In this process (``jobs=1``) or in ``jobs`` spawned worker processes, a stack per call;
    results come back here in completion order and only this process writes the store."""
    done_stack = lambda stack, rows: [on_result(t, r) for t, r in zip(stack.tasks, rows)]
    if jobs <= 1 or len(work) <= 1:
        before = torch.get_num_threads()
        try:
            for stack in work:
                done_stack(stack, evaluate_checkpoints(*stack.arguments(manifest, device, threads, backend, size)))
        finally:
            torch.set_num_threads(before)  # the caller's process keeps its own setting
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, wait, FIRST_COMPLETED

    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                               initializer=exit_with_parent, initargs=(os.getpid(),))
    pending = {pool.submit(evaluate_checkpoints, *stack.arguments(manifest, device, threads, backend, size)): stack
               for stack in work}
    try:
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for f in done:
                stack = pending.pop(f)
                try:
                    rows = f.result()
                except Exception as e:  # a worker died (e.g. out of memory)
                    rows = stack.failed(e)
                done_stack(stack, rows)
    except BaseException:   # Ctrl-C, or the store failing: keep what finished, stop the rest now
        for f, stack in list(pending.items()):
            if f.done() and not f.cancelled() and f.exception() is None:
                done_stack(stack, f.result())
        for process in list(getattr(pool, "_processes", {}).values()):   # running tasks are not waited for
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _run_ray(manifest: Manifest, work: list[Stack], device: str, threads: int | None, backend: str,
             on_result: Callable[[Task, list[dict]], None], address: str | None = None,
             num_cpus: int | None = None, cpus_per_task: float = 1.0,
             gpus_per_task: float | None = None, size: int | None = None, log_path: str | None = None) -> None:
    """One Ray task per stack; what Ray itself prints goes to ``log_path`` (:class:`RayChatter`).
    Where the cluster can no longer run the tasks left (their nodes died), those rows are errors."""
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("the Ray executor needs ray: pip install 'ray' (or sharpfast[ray])") from e
    chatter = RayChatter(sys.stdout, log_path)
    sys.stdout, started = chatter, False
    try:
        if not ray.is_initialized():
            kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            if address:
                check_reachable(address)   # Ray itself retries a wrong address for minutes
                ray.init(address=address, **kw)
            else:
                ray.init(num_cpus=num_cpus or os.cpu_count(), **kw)
            started = True
        gpus = ray.cluster_resources().get("GPU", 0) if device != "cpu" else 0
        num_gpus = (1.0 if gpus_per_task is None else gpus_per_task) if gpus > 0 else 0
        task_device = ("cuda" if num_gpus else "cpu") if device == "auto" else device
        remote = ray.remote(num_cpus=cpus_per_task, num_gpus=num_gpus, max_retries=0)(evaluate_checkpoints)
        pending = {}
        for stack in work:   # one Ray task per stack
            args = stack.arguments(manifest, task_device, threads or max(1, int(cpus_per_task)), backend, size)
            pending[remote.remote(*args)] = stack
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=RAY_POLL_S)
            if not ready:   # nothing finished: can the cluster still run what is left?
                missing = _missing_resources(ray.cluster_resources(), cpus_per_task, num_gpus)
                if missing:
                    for ref, stack in pending.items():
                        ray.cancel(ref, force=True)
                        for t, r in zip(stack.tasks, stack.failed(RuntimeError(missing))):
                            on_result(t, r)
                    break
                continue
            stack = pending.pop(ready[0])
            try:
                rows = ray.get(ready[0])
            except Exception as e:  # the worker died or the task could not run
                rows = stack.failed(e)
            for t, r in zip(stack.tasks, rows):
                on_result(t, r)
    finally:
        try:
            if started:
                with chatter.everything():   # shutdown prints the messages Ray held back as repeats
                    ray.shutdown()
        finally:
            sys.stdout = chatter.out
            chatter.close()


RAY_POLL_S = 10.0   # how often a sweep waiting on Ray checks that the cluster can still run its tasks


def _missing_resources(cluster: dict, cpus: float, gpus: float) -> str | None:
    """Why no node of a cluster with ``cluster`` resources can run a task asking for ``cpus`` and
    ``gpus`` any more (its nodes died), or None where one can."""
    have_cpu, have_gpu = cluster.get("CPU", 0), cluster.get("GPU", 0)
    if have_cpu >= cpus and have_gpu >= gpus:
        return None
    return (f"no node of the Ray cluster can run this task any more: it asks for {cpus:g} CPU"
            + (f" and {gpus:g} GPU" if gpus else "") + f", the live nodes have {have_cpu:g} CPU"
            + (f" and {have_gpu:g} GPU" if gpus else "") + " (a node died?); rerun when the cluster is back")


class RayChatter(io.TextIOBase):
    """``sys.stdout`` while a sweep runs on Ray: Ray's driver threads print what the cluster reports
    (a dead node's message comes with some 35 lines of its state dump) to ``sys.stdout``. Those
    writes go to ``log_path``, and one line of each message to the sweep's output; every other
    thread's writes pass through unchanged."""

    def __init__(self, out, log_path: str | None):
        self.out, self.log_path, self._log = out, log_path, None
        self._said: set[str] = set()   # Ray reports a dead node's end more than once
        self._everything = False

    @contextlib.contextmanager
    def everything(self):
        """Every thread's writes count as Ray's meanwhile (a call into Ray that prints)."""
        self._everything = True
        try:
            yield
        finally:
            self._everything = False

    def write(self, text: str) -> int:
        if not (self._everything or threading.current_thread().name.startswith("ray_")):
            return self.out.write(text)
        if self._log is None and self.log_path:
            self._log = open(self.log_path, "a", encoding="utf-8")
        if self._log is not None:
            self._log.write(text)
            self._log.flush()
        for line in _ANSI.sub("", text).splitlines():
            if line.startswith("(") and line not in self._said:   # a message's first line (the rest is indented)
                self._said.add(line)
                where = f"; all of it in {self.log_path}" if self.log_path else ""
                self.out.write(f"sweep: Ray says: {line[:200]}{' ...' if len(line) > 200 else ''}{where}\n")
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
        super().close()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


RAY_CONNECT_TIMEOUT_S = 5.0


def check_reachable(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Refuse a Ray ``address`` (``host:port`` or ``ray://host:port``; ``auto`` is Ray's own lookup)
    where nothing accepts a connection within ``timeout`` seconds."""
    import socket

    if address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"no Ray cluster answers at {address!r} ({e}): start one there with `ray start --head`, "
                          "or give the address it printed") from None


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
