"""Planning a sweep: which (checkpoint, definition) rows are missing, and the stacks they are
evaluated in, definition after definition."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

from ..definitions import Definition
from ..store import Store
from ..zoo.checkpoints import Manifest, ModelEntry, file_sha256
from .evaluate import _short_error

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
