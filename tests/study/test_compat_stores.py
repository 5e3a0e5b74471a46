"""Zoos and results stores written before the study moved to ``sharpfast.study`` keep working:
the manifest's ``sharpfast.digits:...`` / ``sharpfast.zoo:...`` factories load, and resuming the
store recomputes nothing (tests/data/zoo_v0_1 was written by sharpfast 0.1.0)."""
import json
import os
import shutil

from sharpfast.study import definitions as D
from sharpfast.study.zoo.checkpoints import Manifest, load_model
from sharpfast.study.store import Store
from sharpfast.study.sweep import run_sweep
from tests.helpers import DATA_DIR

OLD_ZOO = os.path.join(DATA_DIR, "zoo_v0_1")


def rows(store):
    with Store(store, readonly=True) as st:
        return sorted((r.checkpoint_id, r.definition_key, r.status, r.value, r.err_value) for r in st.rows())


def test_an_old_zoo_and_store_resume_without_recomputing(tmp_path):
    zoo = tmp_path / "zoo"
    shutil.copytree(OLD_ZOO, zoo)
    manifest = json.loads((zoo / "manifest.json").read_text())
    assert manifest["data"]["factory"] == "sharpfast.digits:sharpness_data"
    assert {m["factory"] for m in manifest["models"]} == {"sharpfast.zoo:mlp"}
    m = Manifest.load(str(zoo))
    for entry in m.models:
        load_model(m, entry)   # the old factory names resolve, the checkpoints verify and load
    x, y = m.sharpness_data(64)
    assert x.shape[0] == y.shape[0] == 64
    store = str(zoo / "results.db")
    before = rows(store)
    assert len(before) == 4 and all(status == "ok" for _, _, status, _, _ in before)
    summary = run_sweep(m, D.preset("quick"), store, progress=False)
    assert (summary.ok, summary.errors, summary.skipped) == (0, 0, 4)   # nothing recomputed
    assert rows(store) == before
