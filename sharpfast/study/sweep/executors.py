"""The executors a sweep hands its stacks to: this process or spawned worker processes
(``local``), or one Ray task per stack (``ray``). Each hands every stack's rows back to the
driver as they come; only the driver writes the store."""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import threading
from typing import Any, Callable

import torch

from ..definitions import ConfigError
from ..workers import exit_with_parent
from ..zoo.checkpoints import Manifest
from .evaluate import evaluate_checkpoints
from .plan import Stack, Task

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
