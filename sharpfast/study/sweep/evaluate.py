"""Evaluating a stack of checkpoints on every definition it lacks: the rows a worker returns (plain
dicts), in the driver (local executor) or in a worker process or Ray task; it touches no store."""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from sharpfast import map_tensors

from ..definitions import Definition
from ..measures import NEEDS_INIT
from ..zoo.checkpoints import Manifest, ModelEntry, load_model

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
