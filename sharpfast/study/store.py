"""The results store: one SQLite file in WAL mode.

Tables
------
``results``      one row per (checkpoint, definition): value, error-sharpness, per-batch values
                 (JSON), ``||delta||``, time, device, backend, versions, status (``ok``/``error``)
                 and the error message. Primary key ``(checkpoint_id, definition_key)``.
``checkpoints``  one row per checkpoint: its hyperparameters and metrics (from the manifest),
                 so a report needs only the store.
``definitions``  one row per definition key: its JSON and readable name.
``claims``       the (checkpoint, definition) rows a running sweep is computing (its host, pid and
                 start), so two sweeps on one store never compute the same row and each computes
                 the definitions the other does not; a claim whose process is gone is taken over.
``meta``         the schema version and the zoo the store belongs to (its data factory and root).

A file that is not a sharpfast store (another SQLite database, anything else) is refused before
anything is written to it; opening read-only writes nothing (no WAL switch, no tables).

Every write is an upsert inside a transaction, so a process killed at any point (even
``kill -9``) leaves whole rows; a rerun recomputes the missing ones and never duplicates a row. Only the driver process writes.
"""
from __future__ import annotations

import json
import os
import socket
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
    threads           INTEGER,     -- torch intra-op threads (they can change the last digits)
    geodesic_correction REAL,      -- geodesic sharpness: ||Gamma/2|| / ||xi|| at the best point
    gl_blocks         INTEGER,     -- geodesic sharpness: GL blocks treated (0: the adaptive worst case)
    PRIMARY KEY (checkpoint_id, definition_key)
);
CREATE TABLE IF NOT EXISTS claims (
    checkpoint_id  TEXT NOT NULL,
    definition_key TEXT NOT NULL,
    host           TEXT NOT NULL,
    pid            INTEGER NOT NULL,
    claimed_at     REAL NOT NULL,
    started        TEXT,            -- the claiming process's start (a PID is reused)
    PRIMARY KEY (checkpoint_id, definition_key)
);
"""
# columns added after a store's tables were first written: added in place when it is opened for writing
_ADDED_COLUMNS = {"results": [("threads", "INTEGER"), ("geodesic_correction", "REAL"), ("gl_blocks", "INTEGER")]}

RESULT_FIELDS = ("checkpoint_id", "definition_key", "status", "value", "err_value", "per_batch",
                 "delta_norm", "error", "time_s", "device", "backend", "sharpfast_version",
                 "torch_version", "checkpoint_sha256", "created_at", "threads", "geodesic_correction", "gl_blocks")


class StoreError(RuntimeError):
    pass


STALE_CLAIM_S = 24 * 3600   # a claim from another host is trusted this long
LOCK_TIMEOUT_S = 30.0       # how long a connection waits for another process's write lock


def process_start(pid: int) -> str | None:
    """What tells the process ``pid`` from a later one given the same number: its start time in
    clock ticks since boot (Linux's ``/proc/<pid>/stat``, field 22); None where the platform does
    not say (there a claim's PID alone is checked)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()   # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else None


def _alive(host: str, pid: int, claimed_at: float, now: float, started: str | None = None) -> bool:
    """Whether the sweep behind a claim may still be running: on another host, for STALE_CLAIM_S;
    on this one, while a process of that PID lives that started when the claimer did."""
    if host != socket.gethostname():
        return now - claimed_at < STALE_CLAIM_S
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's live process
        pass
    if started is not None:
        current = process_start(pid)
        if current is not None and current != started:   # the PID was reused by a later process
            return False
    return True


def _said(e: sqlite3.Error) -> str:
    """SQLite's message, with what to do where it is a disk or a filesystem that refuses writes."""
    text = str(e)
    if "full" in text:
        return f"{text}: the disk is full; free space and rerun (the store stays consistent and resumes)"
    if "readonly" in text or "read-only" in text:
        return f"{text}: the store or its folder is read-only; `sharpfast report` reads it as it is"
    return text


def _uri(path: str) -> str:
    from urllib.parse import quote

    return "file:" + quote(os.path.abspath(path))


TABLES = frozenset({"meta", "checkpoints", "definitions", "results", "claims"})


def writable(path: str) -> bool:
    """Whether ``path`` (an existing store) and its folder can be written (SQLite's journal lives there)."""
    folder = os.path.dirname(os.path.abspath(path))
    return os.access(path, os.W_OK) and os.access(folder, os.W_OK)


def _connect_readonly(path: str) -> sqlite3.Connection:
    """A read-only connection; on a read-only filesystem, where SQLite cannot create a WAL store's
    shared-memory file, an immutable one (nothing can write there while it is read)."""
    try:
        db = sqlite3.connect(f"{_uri(path)}?mode=ro", uri=True, timeout=LOCK_TIMEOUT_S, isolation_level=None)
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        return db
    except sqlite3.OperationalError:
        if writable(path):
            raise
        return sqlite3.connect(f"{_uri(path)}?mode=ro&immutable=1", uri=True, timeout=LOCK_TIMEOUT_S, isolation_level=None)


def _check_is_store(path: str, readonly: bool = False) -> None:
    """Refuse a file that is not a sharpfast store, reading it only. An SQLite database with only
    sharpfast's tables, some of them missing, is a store whose creation is under way in another
    process or was cut short (a full disk): a writer completes it, a reader is told so."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        if head != b"SQLite format 3\x00":
            raise StoreError(f"{path!r} is not a sharpfast results store: it is not an SQLite database")
        db = _connect_readonly(path)
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            has_version = "meta" in tables and db.execute(
                "SELECT 1 FROM meta WHERE key='schema_version'").fetchone() is not None
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path!r} is not a sharpfast results store: {e}") from e
    if has_version and {"results", "checkpoints", "definitions"} <= tables:
        return
    listed = ", ".join(sorted(tables)) or "none"
    if not tables <= TABLES:
        raise StoreError(f"{path!r} is an SQLite database but not a sharpfast results store (its tables: "
                         f"{listed}); nothing was written to it")
    if readonly:   # else: being created, or its creation was cut short; the writer's schema script completes it
        raise StoreError(f"store {path!r} is not complete (its tables: {listed}): its creation is under way or "
                         "was cut short; a sweep on it completes it")


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
    threads: int | None = None
    geodesic_correction: float | None = None
    gl_blocks: int | None = None


class Store:
    """A results store; open with ``Store(path)``, use as a context manager or call ``close()``."""

    def __init__(self, path: str, readonly: bool = False):
        self.path = path
        if readonly and not os.path.isfile(path):
            raise StoreError(f"store {path!r} does not exist (run `sharpfast sweep` first)")
        fresh = not os.path.isfile(path) or os.path.getsize(path) == 0
        if not fresh:
            _check_is_store(path, readonly)   # before anything writes to it
            if not readonly and not writable(path):
                raise StoreError(f"store {path!r} is read-only (the file or its folder cannot be written): a sweep "
                                 "writes its rows there; `sharpfast report` reads it as it is")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            if readonly:   # a read-only connection: no journal switch, no tables, nothing written
                self.db = _connect_readonly(path)
            else:
                self.db = sqlite3.connect(path, timeout=LOCK_TIMEOUT_S, isolation_level=None)  # autocommit; explicit BEGIN
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute(f"PRAGMA busy_timeout={int(LOCK_TIMEOUT_S * 1000)}")
            if not readonly:
                claims = {r[1] for r in self.db.execute("PRAGMA table_info(claims)")}
                if claims and "definition_key" not in claims:   # per checkpoint before: claims are a
                    self.db.execute("DROP TABLE claims")        # running sweep's, remade per definition
                self.db.executescript(_SCHEMA)  # idempotent (IF NOT EXISTS)
                for table, columns in _ADDED_COLUMNS.items():
                    have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
                    for name, sql_type in columns:
                        if name not in have:
                            self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            v = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            self._columns = {r[1] for r in self.db.execute("PRAGMA table_info(results)")}
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise StoreError(f"store {path!r} is locked: another process has been writing to it for 30 s "
                                 f"({e}); try again when it is done") from e
            raise StoreError(f"store {path!r} cannot be opened: {_said(e)}") from None
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
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:   # another writer held it past busy_timeout
                raise StoreError(f"the store is locked: another process has been writing to it for 30 s ({e}); "
                                 "rerun when it is done: what was not written is computed then") from e
            return self.db

        def __exit__(self, typ, value, traceback):
            try:
                self.db.execute("COMMIT" if typ is None else "ROLLBACK")
            except sqlite3.OperationalError as e:   # the commit itself failed: nothing of it was written
                if typ is None:
                    if self.db.in_transaction:
                        self.db.execute("ROLLBACK")
                    raise StoreError(f"the store could not be written: {_said(e)}") from None
            if isinstance(value, sqlite3.OperationalError):   # a write failed: the transaction is rolled back
                raise StoreError(f"the store could not be written: {_said(value)}") from None

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
        """Upsert one checkpoint's rows (and its metadata) atomically, releasing this process's
        claims on them; returns the row count."""
        n = 0
        with self.transaction() as db:
            if checkpoint is not None:
                self.put_checkpoint(db, **checkpoint)
            for r in rows:
                db.execute("DELETE FROM claims WHERE checkpoint_id=? AND definition_key=? AND host=? AND pid=?",
                           (r["checkpoint_id"], r["definition_key"], socket.gethostname(), os.getpid()))   # done
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

    def bind_zoo(self, data: dict[str, Any], root: str, checkpoint_ids: Iterable[str], mix: bool = False) -> None:
        """Bind the store to the zoo it is swept for, or refuse a zoo it was not written for.

        A zoo is its data factory (with its keyword arguments) and its checkpoints: a store that
        already holds checkpoints refuses a zoo with other data, or one none of whose checkpoints it
        holds (a moved or grown zoo keeps its store). ``mix`` allows it (one store, several zoos)."""
        spec = json.dumps(data, sort_keys=True)
        bound = self.db.execute("SELECT value FROM meta WHERE key='zoo_data'").fetchone()
        stored = {r[0] for r in self.db.execute("SELECT checkpoint_id FROM checkpoints")}
        if not mix and stored:
            if bound is not None and bound[0] != spec:
                raise StoreError(f"store {self.path!r} belongs to a zoo with other data ({bound[0]}), not this one "
                                 f"({spec}); use another --store, or --mix-zoos to keep both zoos in one store")
            if not stored & set(checkpoint_ids):
                raise StoreError(f"store {self.path!r} holds {len(stored)} checkpoints of another zoo and none of this "
                                 "one's; use another --store, or --mix-zoos to keep both zoos in one store")
        if mix and bound is not None:
            return   # the store stays bound to its first zoo: mixing is asked for each time
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('zoo_data', ?)", (spec,))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('zoo_root', ?)", (os.path.abspath(root),))

    def zoo(self) -> tuple[dict | None, str | None]:
        """The data spec and root of the zoo the store is bound to (``bind_zoo``), or Nones."""
        meta = dict(self.db.execute("SELECT key, value FROM meta WHERE key IN ('zoo_data', 'zoo_root')").fetchall())
        return (json.loads(meta["zoo_data"]) if "zoo_data" in meta else None), meta.get("zoo_root")

    def claim(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], tuple[str, int]]:
        """Claim the ``(checkpoint_id, definition_key)`` rows for this process; return those another
        live sweep holds (``{pair: (host, pid)}``), which this one must leave alone: two sweeps of
        other definitions on one store each compute their own. A claim is taken over when its
        process is gone (same host: no process of its PID, or one that started later) or it is older
        than ``STALE_CLAIM_S`` (another host)."""
        host, pid, now, started = socket.gethostname(), os.getpid(), time.time(), process_start(os.getpid())
        held: dict[tuple[str, str], tuple[str, int]] = {}
        with self.transaction() as db:
            for cid, key in pairs:
                row = db.execute("SELECT host, pid, claimed_at, started FROM claims WHERE checkpoint_id=? AND "
                                 "definition_key=?", (cid, key)).fetchone()
                if row is not None and (row[0], row[1]) != (host, pid) and _alive(*row[:3], now, row[3]):
                    held[(cid, key)] = (row[0], row[1])
                    continue
                db.execute("INSERT OR REPLACE INTO claims (checkpoint_id, definition_key, host, pid, claimed_at, "
                           "started) VALUES (?, ?, ?, ?, ?, ?)", (cid, key, host, pid, now, started))
        return held

    def release(self, checkpoint_ids: Iterable[str] | None = None) -> None:
        """Drop this process's claims (on ``checkpoint_ids``, or all of them)."""
        host, pid = socket.gethostname(), os.getpid()
        with self.transaction() as db:
            if checkpoint_ids is None:
                db.execute("DELETE FROM claims WHERE host=? AND pid=?", (host, pid))
            else:
                db.executemany("DELETE FROM claims WHERE checkpoint_id=? AND host=? AND pid=?",
                               [(c, host, pid) for c in checkpoint_ids])

    # -- reads ----------------------------------------------------------------------------
    def done_keys(self, include_errors: bool = False) -> dict[tuple[str, str], str | None]:
        """``{(checkpoint_id, definition_key): checkpoint_sha256}`` of the rows a rerun may skip."""
        q = "SELECT checkpoint_id, definition_key, checkpoint_sha256 FROM results"
        if not include_errors:
            q += " WHERE status = 'ok'"
        return {(a, b): c for a, b, c in self.db.execute(q)}

    def rows(self, status: str | None = None) -> Iterator[Row]:
        fields = [f for f in RESULT_FIELDS if f in self._columns]   # an old store read-only: no new columns
        q = f"SELECT {', '.join(fields)} FROM results"
        args: tuple = ()
        if status:
            q += " WHERE status = ?"
            args = (status,)
        q += " ORDER BY checkpoint_id, definition_key"
        for t in self.db.execute(q, args):
            d = dict(zip(fields, t))
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
