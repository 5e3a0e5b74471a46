"""The SQLite results store: WAL, one row per (checkpoint, definition), upserts, errors."""
import sqlite3

import pytest

from sharpfast.study.definitions import Definition
from sharpfast.study.store import Store, StoreError


def _row(cid, key, value=1.0, status="ok", **kw):
    return dict(checkpoint_id=cid, definition_key=key, status=status, value=value, err_value=0.0,
                per_batch=[value, value], delta_norm=0.5, time_s=0.1, device="cpu", backend="reference",
                sharpfast_version="0.1.0", torch_version="2.13.0", checkpoint_sha256="ab", **kw)


def test_wal_schema_and_round_trip(tmp_path):
    path = str(tmp_path / "r.db")
    d = Definition("max", "linf", 0.002)
    with Store(path) as st:
        assert st.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        st.put_definitions([d, d])
        st.put_results(dict(checkpoint_id="c1", sha256="ab", factory="x.y:z", hparams={"lr": 0.1},
                            metrics={"test_error": 0.2}), [_row("c1", d.key, 0.25)])
        rows = list(st.rows())
        assert len(rows) == 1
        r = rows[0]
        assert (r.checkpoint_id, r.definition_key, r.status, r.value) == ("c1", d.key, "ok", 0.25)
        assert r.per_batch == [0.25, 0.25] and r.device == "cpu" and r.torch_version == "2.13.0"
        assert st.definitions()[d.key]["name"] == d.name
        assert st.checkpoints()["c1"]["metrics"] == {"test_error": 0.2}
    # reopen: data persisted, schema creation is idempotent
    with Store(path) as st:
        assert st.counts() == {"ok": 1}


def test_upsert_never_duplicates(tmp_path):
    with Store(str(tmp_path / "r.db")) as st:
        st.put_results(None, [_row("c1", "k1", status="error", value=None, error="boom")])
        assert st.done_keys() == {}
        assert st.done_keys(include_errors=True) == {("c1", "k1"): "ab"}
        for v in (1.0, 2.0, 3.0):
            st.put_results(None, [_row("c1", "k1", v), _row("c2", "k1", v)])
        rows = list(st.rows())
        assert len(rows) == 2 and all(r.value == 3.0 and r.status == "ok" and r.error is None for r in rows)
        # the primary key is enforced by SQLite itself
        with pytest.raises(sqlite3.IntegrityError):
            st.db.execute("INSERT INTO results (checkpoint_id, definition_key, status, created_at) "
                          "VALUES ('c1', 'k1', 'ok', 0)")


def test_transaction_is_all_or_nothing(tmp_path):
    with Store(str(tmp_path / "r.db")) as st:
        bad = _row("c1", "k2")
        bad["status"] = "weird"      # violates the CHECK constraint after a valid row
        with pytest.raises(sqlite3.IntegrityError):
            st.put_results(None, [_row("c1", "k1"), bad])
        assert list(st.rows()) == []


def test_not_a_store(tmp_path):
    p = tmp_path / "junk.db"
    p.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a sharpfast results store"):
        Store(str(p))
    with pytest.raises(StoreError, match="does not exist"):
        Store(str(tmp_path / "missing.db"), readonly=True)


def test_a_store_whose_creation_is_under_way_or_was_cut_short_is_completed(tmp_path):
    """The states another creator (or a full disk) leaves a new store in: an SQLite file with no
    tables, or with only some of sharpfast's. A writer completes it; a reader says what it is; a
    database with other tables is still refused."""
    for i, tables in enumerate(([], ["meta"], ["meta", "checkpoints"])):
        path = str(tmp_path / f"r{i}.db")
        db = sqlite3.connect(path)
        db.execute("PRAGMA user_version = 1")   # an SQLite header on disk, whatever the tables
        for t in tables:
            db.execute(f"CREATE TABLE {t} (x)" if t != "meta" else "CREATE TABLE meta (key TEXT PRIMARY KEY, value)")
        db.commit()
        db.close()
        with pytest.raises(StoreError, match="is not complete.*a sweep on it completes it"):
            Store(path, readonly=True)
        if "checkpoints" in tables:   # a table of ours with other columns is not ours to complete
            continue
        with Store(path) as st:
            st.put_results(None, [_row("c1", "k")])
        with Store(path, readonly=True) as st:
            assert [r.value for r in st.rows()] == [1.0]
    path = str(tmp_path / "other.db")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE meta (key, value)")
    db.execute("CREATE TABLE people (name)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="not a sharpfast results store \\(its tables: meta, people\\)"):
        Store(path)


def test_concurrent_creators_of_one_new_store_all_open_it(tmp_path):
    import subprocess
    import sys
    path = str(tmp_path / "r.db")
    code = f"from sharpfast.study.store import Store; Store({path!r}).close()"
    starts = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(8)]
    for p in starts:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err


def test_a_full_disk_is_a_clear_error_and_the_store_stays_consistent(tmp_path):
    """SQLite's "database or disk is full" (here a page limit), mid-write: a StoreError that says the
    disk is full; the transaction is rolled back, what was written before is intact, and the store
    takes writes again once there is room."""
    path = str(tmp_path / "r.db")
    with Store(path) as st:
        st.put_results(None, [_row("c1", "k")])
        pages = st.db.execute("PRAGMA page_count").fetchone()[0]
        st.db.execute(f"PRAGMA max_page_count = {pages}")
        big = [_row(f"c{i}", "k", error="x" * 4000) for i in range(2, 40)]
        with pytest.raises(StoreError, match="disk is full; free space and rerun"):
            st.put_results(None, big)
        assert [r.checkpoint_id for r in st.rows()] == ["c1"]
        st.db.execute("PRAGMA max_page_count = 1073741823")
        st.put_results(None, big[:2])
        assert len(list(st.rows())) == 3


def test_a_read_only_store_is_read_and_a_writer_told_it_is_read_only(tmp_path, monkeypatch):
    """On a read-only filesystem SQLite cannot make a WAL store's shared-memory file: the reader
    falls back to an immutable connection; a writer is told the store is read-only."""
    import sharpfast.study.store as store_mod
    path = str(tmp_path / "r.db")
    with Store(path) as st:
        st.put_results(None, [_row("c1", "k")])
    monkeypatch.setattr(store_mod, "writable", lambda p: False)
    connect = sqlite3.connect

    def no_shm(target, *a, **kw):   # what a read-only filesystem does to mode=ro on a WAL database
        if isinstance(target, str) and "mode=ro" in target and "immutable=1" not in target:
            raise sqlite3.OperationalError("unable to open database file")
        return connect(target, *a, **kw)
    monkeypatch.setattr(sqlite3, "connect", no_shm)
    with Store(path, readonly=True) as st:
        assert [r.checkpoint_id for r in st.rows()] == ["c1"]
    with pytest.raises(StoreError, match="is read-only .*`sharpfast report` reads it as it is"):
        Store(path)
