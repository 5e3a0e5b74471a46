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
