"""The Ray executor on a local cluster gives the same rows as the local executor."""
import shutil

import pytest

ray = pytest.importorskip("ray")

from sharpfast.study import definitions as D  # noqa: E402
from sharpfast.study import zoo  # noqa: E402
from sharpfast.study.checkpoints import Manifest  # noqa: E402
from sharpfast.study.store import Store  # noqa: E402
from sharpfast.study.sweep import run_sweep  # noqa: E402

TINY = zoo.ZooSpec({"lr": [0.5, 2.0], "width": [8, 16]}, {"arch": "mlp", "epochs": 2, "n_train": 256})


def _rows(path):
    with Store(path, readonly=True) as st:
        return {(r.checkpoint_id, r.definition_key): r for r in st.rows()}


def test_ray_matches_local(tmp_path):
    zdir = tmp_path / "zoo"
    zoo.build_zoo(str(zdir), TINY, progress=False, log=lambda s: None)
    m = Manifest.load(str(zdir))
    # one broken checkpoint: its error must travel back from the worker to the driver's store
    broken = m.models[2]
    shutil.copy(m.checkpoint_path(broken), tmp_path / "backup")
    with open(m.checkpoint_path(broken), "wb") as f:
        f.write(b"not a checkpoint")
    defs = D.preset("quick")
    local, remote = str(tmp_path / "local.db"), str(tmp_path / "ray.db")
    s_local = run_sweep(m, defs, local, progress=False)
    s_ray = run_sweep(m, defs, remote, executor="ray", num_cpus=2, progress=False)
    assert not ray.is_initialized()                # the cluster it started is shut down
    assert (s_ray.ok, s_ray.errors) == (s_local.ok, s_local.errors) == (6, 2)
    a, b = _rows(local), _rows(remote)
    assert set(a) == set(b) and len(a) == 8
    for k, ra in a.items():
        rb = b[k]
        assert (ra.status, ra.value, ra.err_value, ra.per_batch, ra.delta_norm) == \
               (rb.status, rb.value, rb.err_value, rb.per_batch, rb.delta_norm), k
        assert ra.device == rb.device == "cpu"
        if ra.status == "error":
            assert ra.checkpoint_id == broken.id and "sha256" in rb.error
    # resuming with Ray after the repair computes only the failed checkpoint
    shutil.copy(tmp_path / "backup", m.checkpoint_path(broken))
    s2 = run_sweep(m, defs, remote, executor="ray", num_cpus=2, progress=False)
    assert (s2.ok, s2.errors, s2.skipped) == (2, 0, 6)
    run_sweep(m, defs, local, progress=False)
    a, b = _rows(local), _rows(remote)
    assert {k: r.value for k, r in a.items()} == {k: r.value for k, r in b.items()}
