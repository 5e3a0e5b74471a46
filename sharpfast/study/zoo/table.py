"""A zoo manifest from a table of the user's own models (``sharpfast manifest --table``).

One row per model. Columns:

* ``id`` (required, unique);
* ``checkpoint``: a safetensors file (relative to the table's folder, or absolute), with
  ``factory`` (``package.module:function`` building the model) and optionally ``factory_kwargs``
  (a JSON object); or ``hf_folder``: a folder written by Hugging Face's ``save_pretrained``, with
  ``hf_class`` (default ``AutoModelForSequenceClassification``), built from its config and loaded
  from its ``model.safetensors``, never from a hub (:mod:`.hf`);
* ``init_checkpoint``: optionally, the weights the model started training from (safetensors);
* ``hp_<name>``: hyperparameter ``<name>`` (JSON values are parsed: ``0.1``, ``true``, ``"sgd"``;
  anything else is kept as a string);
* every other column: a metric, which must be a finite number where given (``test_error``,
  ``train_error``, ``ood_error*``, ...; an empty cell is a missing metric).

The data factory (``--data MODULE:FUNCTION``, kwargs ``--data-kwargs JSON``) is called as
``factory(n_examples=N, **kwargs)`` by the sweep and returns ``(x, y)``: ``x`` a tensor or a dict
of tensors (keyword inputs, as Hugging Face models take), ``y`` the labels. Every problem is
reported with its row and column; nothing is unpickled.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

from .checkpoints import (MANIFEST_NAME, Manifest, ManifestError, ModelEntry, SAFE_SUFFIXES, _FACTORY_RE,
                          file_sha256, import_factory)

STRUCTURE = ("id", "checkpoint", "factory", "factory_kwargs", "init_checkpoint", "hf_folder", "hf_class")


class TableError(ManifestError):
    """A table row or column that cannot become a manifest entry."""


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _safetensors(path: str, base: str, where: str) -> str:
    full = path if os.path.isabs(path) else os.path.join(base, path)
    if not path.endswith(SAFE_SUFFIXES):
        raise TableError(f"{where}: {path!r} is not a .safetensors file (checkpoints are never unpickled; convert "
                         "a torch.save file with safetensors.torch.save_file(model.state_dict(), path))")
    if not os.path.isfile(full):
        raise TableError(f"{where}: {path!r} does not exist (looked for {full})")
    return os.path.abspath(full)


def _checkpoint_row(row: dict, base: str, where: str) -> tuple[str, str, dict]:
    ckpt, factory = (row.get("checkpoint") or "").strip(), (row.get("factory") or "").strip()
    if not ckpt:
        raise TableError(f"{where}: column 'checkpoint' is empty (and there is no hf_folder)")
    if not _FACTORY_RE.match(factory):
        raise TableError(f"{where}: column 'factory' must be 'package.module:function', got {factory!r}")
    try:
        kwargs = json.loads(row.get("factory_kwargs") or "{}")
    except json.JSONDecodeError as e:
        raise TableError(f"{where}: column 'factory_kwargs' is not JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise TableError(f"{where}: column 'factory_kwargs' must be a JSON object")
    return _safetensors(ckpt, base, f"{where}, column 'checkpoint'"), factory, kwargs


def _hf_row(folder: str, hf_class: str, base: str, where: str) -> tuple[str, str, dict]:
    from . import hf

    full = os.path.abspath(folder if os.path.isabs(folder) else os.path.join(base, folder))
    if not os.path.isfile(os.path.join(full, "config.json")):
        raise TableError(f"{where}, column 'hf_folder': {folder!r} has no config.json (looked in {full}); give a "
                         "folder written by save_pretrained")
    try:
        path = hf.weights_path(full)
    except FileNotFoundError as e:
        raise TableError(f"{where}, column 'hf_folder': {e}") from None
    # the name manifests record (resolved through checkpoints.MOVED_MODULES)
    return path, "sharpfast.study.hf:from_folder", {"folder": full, "hf_class": hf_class or hf.DEFAULT_CLASS}


def manifest_from_table(table: str, data: str, data_kwargs: dict | None = None) -> Manifest:
    """The manifest the rows of the CSV file ``table`` describe, with the data factory ``data``."""
    if not _FACTORY_RE.match(data or ""):
        raise TableError(f"--data {data!r} is not of the form 'package.module:function'")
    if not callable(import_factory(data)):
        raise TableError(f"--data {data!r} is not callable")
    if data_kwargs is not None and not isinstance(data_kwargs, dict):
        raise TableError("--data-kwargs must be a JSON object")
    base = os.path.dirname(os.path.abspath(table))
    with open(table, newline="", encoding="utf-8-sig") as f:   # -sig: Excel's byte-order mark is not a column name
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        rows = list(reader)
    if "id" not in columns:
        raise TableError(f"{table}: the table needs an 'id' column (columns: {', '.join(columns)})")
    if "checkpoint" not in columns and "hf_folder" not in columns:
        raise TableError(f"{table}: the table needs a 'checkpoint' column (a safetensors file per model) or an "
                         "'hf_folder' column (a save_pretrained folder per model)")
    if not rows:
        raise TableError(f"{table}: the table has no rows")
    entries, seen = [], set()
    for n, row in enumerate(rows, start=2):   # line 1 is the header
        where = f"{table}, row {n}"
        mid = (row.get("id") or "").strip()
        if not mid:
            raise TableError(f"{where}: column 'id' is empty")
        if mid in seen:
            raise TableError(f"{where}: id {mid!r} appears twice")
        seen.add(mid)
        where = f"{where} (id {mid!r})"
        folder = (row.get("hf_folder") or "").strip()
        if folder:
            path, factory, kwargs = _hf_row(folder, (row.get("hf_class") or "").strip(), base, where)
        else:
            path, factory, kwargs = _checkpoint_row(row, base, where)
        init = (row.get("init_checkpoint") or "").strip()
        init_path = _safetensors(init, base, f"{where}, column 'init_checkpoint'") if init else None
        hparams, metrics = {}, {}
        for col in columns:
            cell = (row.get(col) or "").strip()
            if col in STRUCTURE or cell == "":
                continue
            if col.startswith("hp_"):
                hparams[col[3:]] = _value(cell)
                continue
            try:
                value = float(cell)
            except ValueError:
                raise TableError(f"{where}: column {col!r} is a metric (not id/checkpoint/factory/factory_kwargs/"
                                 f"init_checkpoint or hp_*) and must be a number, got {cell!r}") from None
            if not math.isfinite(value):
                raise TableError(f"{where}: metric {col!r} must be finite, got {cell!r}")
            metrics[col] = value
        if "gap" not in metrics and {"test_error", "train_error"} <= set(metrics):
            metrics["gap"] = metrics["test_error"] - metrics["train_error"]   # the report's generalization gap
        entries.append(ModelEntry(id=mid, factory=factory, checkpoint=path, kwargs=kwargs, sha256=file_sha256(path),
                                  hparams=hparams, metrics=metrics, init_checkpoint=init_path,
                                  init_sha256=file_sha256(init_path) if init_path else None))
    return Manifest(data={"factory": data, "kwargs": data_kwargs or {}}, models=entries, root=base)


def write_manifest(table: str, data: str, out_dir: str, data_kwargs: dict | None = None) -> str:
    """Write ``out_dir/manifest.json`` from the table; returns its path."""
    manifest = manifest_from_table(table, data, data_kwargs)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MANIFEST_NAME)
    manifest.root = out_dir
    manifest.save(path)
    return path
