"""The results store: one SQLite file in WAL mode.

Tables
------
``results``      one row per (checkpoint, definition): value, error-sharpness, per-batch values
                 (JSON), ``||delta||``, time, device, backend, versions, status (``ok``/``error``)
                 and the error message. Primary key ``(checkpoint_id, definition_key)``.
``checkpoints``  one row per checkpoint: its hyperparameters and metrics (from the manifest),
                 so a report needs only the store.
``definitions``  one row per definition key: its JSON and readable name.

Every write is an upsert inside one transaction per checkpoint, so a process killed at any
point (even ``kill -9``) leaves either all of a checkpoint's new rows or none of them; a rerun
recomputes the missing ones and never duplicates a row. Only the driver process writes.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    checkpoint_id TEXT PRIMARY KEY,
    sha256        TEXT,
    factory       TEXT,
    hparams       TEXT NOT NULL,   -- JSON object
    metrics       TEXT NOT NULL    -- JSON object
);
CREATE TABLE IF NOT EXISTS definitions (
    definition_key TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    family         TEXT NOT NULL,
    rho            REAL NOT NULL,
    spec           TEXT NOT NULL   -- JSON object
);
CREATE TABLE IF NOT EXISTS results (
    checkpoint_id     TEXT NOT NULL,
    definition_key    TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('ok', 'error')),
    value             REAL,
    err_value         REAL,
    per_batch         TEXT,        -- JSON list
    delta_norm        REAL,
    error             TEXT,
    time_s            REAL,
    device            TEXT,
    backend           TEXT,
    sharpfast_version TEXT,
    torch_version     TEXT,
    checkpoint_sha256 TEXT,
    created_at        REAL NOT NULL,
    PRIMARY KEY (checkpoint_id, definition_key)
);
"""

RESULT_FIELDS = ("checkpoint_id", "definition_key", "status", "value", "err_value", "per_batch",
                 "delta_norm", "error", "time_s", "device", "backend", "sharpfast_version",
                 "torch_version", "checkpoint_sha256", "created_at")


class StoreError(RuntimeError):
    pass


@dataclass
class Row:
    checkpoint_id: str
    definition_key: str
    status: str
    value: float | None
    err_value: float | None
    per_batch: list[float] | None
    delta_norm: float | None
    error: str | None
    time_s: float | None
    device: str | None
    backend: str | None
    sharpfast_version: str | None
    torch_version: str | None
    checkpoint_sha256: str | None
    created_at: float


class Store:
    """A results store; open with ``Store(path)``, use as a context manager or call ``close()``."""

    def __init__(self, path: str, readonly: bool = False):
        self.path = path
        if readonly and not os.path.isfile(path):
            raise StoreError(f"store {path!r} does not exist (run `sharpfast sweep` first)")
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        try:
            self.db = sqlite3.connect(path, timeout=30.0, isolation_level=None)  # autocommit; explicit BEGIN
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA busy_timeout=30000")
            if not readonly:
                self.db.executescript(_SCHEMA)  # idempotent (IF NOT EXISTS)
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            v = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{path!r} is not a sharpfast results store: {e}") from e
        if v is None or int(v[0]) != SCHEMA_VERSION:
            raise StoreError(f"store {path!r} has schema version {v and v[0]}, expected {SCHEMA_VERSION}")

    # -- plumbing -------------------------------------------------------------------------
    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    class _Tx:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, typ, *_):
            self.db.execute("COMMIT" if typ is None else "ROLLBACK")

    def transaction(self) -> "_Tx":
        return Store._Tx(self.db)

    # -- writes ---------------------------------------------------------------------------
    def put_checkpoint(self, db: sqlite3.Connection, checkpoint_id: str, sha256: str | None,
                       factory: str | None, hparams: dict, metrics: dict) -> None:
        db.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?) ON CONFLICT(checkpoint_id) DO UPDATE SET "
                   "sha256=excluded.sha256, factory=excluded.factory, hparams=excluded.hparams, "
                   "metrics=excluded.metrics",
                   (checkpoint_id, sha256, factory, json.dumps(hparams, sort_keys=True),
                    json.dumps(metrics, sort_keys=True)))

    def put_definitions(self, defs: Iterable[Any]) -> None:
        with self.transaction() as db:
            for d in defs:   # curvature measures are the rho -> 0 limits: stored with rho 0
                db.execute("INSERT OR IGNORE INTO definitions VALUES (?, ?, ?, ?, ?)",
                           (d.key, d.name, d.family, 0.0 if d.rho is None else d.rho, d.to_json()))

    def put_results(self, checkpoint: dict[str, Any] | None, rows: Iterable[dict[str, Any]]) -> int:
        """Upsert one checkpoint's rows (and its metadata) atomically; returns the row count."""
        n = 0
        with self.transaction() as db:
            if checkpoint is not None:
                self.put_checkpoint(db, **checkpoint)
            for r in rows:
                r = dict(r)
                r.setdefault("created_at", time.time())
                if r.get("per_batch") is not None and not isinstance(r["per_batch"], str):
                    r["per_batch"] = json.dumps(list(r["per_batch"]))
                missing = set(RESULT_FIELDS) - set(r)
                for k in missing:
                    r[k] = None
                cols = ", ".join(RESULT_FIELDS)
                marks = ", ".join("?" for _ in RESULT_FIELDS)
                update = ", ".join(f"{c}=excluded.{c}" for c in RESULT_FIELDS[2:])
                db.execute(f"INSERT INTO results ({cols}) VALUES ({marks}) "
                           f"ON CONFLICT(checkpoint_id, definition_key) DO UPDATE SET {update}",
                           tuple(r[c] for c in RESULT_FIELDS))
                n += 1
        return n

    # -- reads ----------------------------------------------------------------------------
    def done_keys(self, include_errors: bool = False) -> dict[tuple[str, str], str | None]:
        """``{(checkpoint_id, definition_key): checkpoint_sha256}`` of the rows a rerun may skip."""
        q = "SELECT checkpoint_id, definition_key, checkpoint_sha256 FROM results"
        if not include_errors:
            q += " WHERE status = 'ok'"
        return {(a, b): c for a, b, c in self.db.execute(q)}

    def rows(self, status: str | None = None) -> Iterator[Row]:
        q = f"SELECT {', '.join(RESULT_FIELDS)} FROM results"
        args: tuple = ()
        if status:
            q += " WHERE status = ?"
            args = (status,)
        q += " ORDER BY checkpoint_id, definition_key"
        for t in self.db.execute(q, args):
            d = dict(zip(RESULT_FIELDS, t))
            d["per_batch"] = json.loads(d["per_batch"]) if d["per_batch"] else None
            yield Row(**d)

    def checkpoints(self) -> dict[str, dict[str, Any]]:
        return {cid: {"sha256": sha, "factory": fac, "hparams": json.loads(h), "metrics": json.loads(m)}
                for cid, sha, fac, h, m in self.db.execute("SELECT * FROM checkpoints ORDER BY checkpoint_id")}

    def definitions(self) -> dict[str, dict[str, Any]]:
        return {k: {"name": n, "family": f, "rho": r, "spec": json.loads(s)}
                for k, n, f, r, s in self.db.execute("SELECT * FROM definitions ORDER BY family, rho")}

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT status, COUNT(*) FROM results GROUP BY status").fetchall())
