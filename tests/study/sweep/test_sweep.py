"""Sweeps: agreement with the API, resumability (also after SIGKILL), failures recorded, configs."""
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

import sharpfast
from sharpfast.study import definitions as D
from sharpfast.study import sweep as sweep_mod
from sharpfast.study.zoo.checkpoints import Manifest, load_model
from sharpfast.study.definitions import ConfigError, Definition
from sharpfast.study.measures import MEASURES_REVISION
from sharpfast.study.store import Store
from sharpfast.study.sweep import run_sweep

def _copy(zoo_dir, tmp_path):
    dst = tmp_path / "zoo"
    shutil.copytree(zoo_dir, dst)
    return str(dst)


QUICK = D.preset("quick")


def _values(store_path):
    with Store(store_path, readonly=True) as st:
        return {(r.checkpoint_id, r.definition_key): (r.status, r.value, r.err_value, tuple(r.per_batch or ()))
                for r in st.rows()}


def test_sweep_rows_match_the_api_and_rerun_is_idempotent(tiny_zoo, tmp_path):
    store = str(tmp_path / "r.db")
    m = Manifest.load(tiny_zoo)
    s = run_sweep(m, QUICK, store, progress=False)
    assert (s.ok, s.errors, s.skipped) == (16, 0, 0)
    rows = _values(store)
    assert len(rows) == 16
    # one row recomputed by hand through the public API
    entry, d = m.models[3], QUICK[0]
    model = load_model(m, entry)
    x, y = m.sharpness_data(d.n_examples)
    batches = [(x[i:i + d.m], y[i:i + d.m]) for i in range(0, d.n_examples, d.m)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)            # as the sweep evaluates (threads=1)
    try:
        r = sharpfast.worst_case_sharpness(model, batches, rho=d.rho, norm=d.norm, adaptive=d.adaptive,
                                           normalize_logits=d.normalize_logits, n_iters=d.n_iters, seed=d.seed)
    finally:
        torch.set_num_threads(before)
    status, value, err_value, per_batch = rows[(entry.id, d.key)]
    # the sweep stacks the MLPs (sharpfast.evaluate_many): float32 rounds as in tests/engine/test_many.py
    assert status == "ok" and value == pytest.approx(r.sharpness, rel=1e-4, abs=1e-5 * r.init_loss)
    assert list(per_batch) == pytest.approx(r.per_batch, rel=1e-4, abs=1e-5 * r.init_loss)
    assert len(per_batch) == d.n_examples // d.m
    # rerun: nothing computed, nothing changed
    s2 = run_sweep(m, QUICK, store, progress=False)
    assert (s2.ok, s2.errors, s2.skipped) == (0, 0, 16)
    assert _values(store) == rows
    # a new definition only computes the new column
    extra = [Definition("avg", "linf", 0.05, m=64, n_examples=128, n_samples=3)]
    s3 = run_sweep(m, QUICK + extra, store, progress=False)
    assert (s3.ok, s3.skipped) == (8, 16)
    with Store(store, readonly=True) as st:
        assert st.counts() == {"ok": 24}
        assert set(st.checkpoints()) == {e.id for e in m.models}


def test_parallel_local_executor_gives_identical_rows(tiny_zoo, tmp_path):
    m = Manifest.load(tiny_zoo)
    run_sweep(m, QUICK[:1], str(tmp_path / "a.db"), progress=False)
    run_sweep(m, QUICK[:1], str(tmp_path / "b.db"), progress=False, jobs=2)
    assert _values(str(tmp_path / "a.db")) == _values(str(tmp_path / "b.db"))


def test_failures_are_recorded_and_the_sweep_goes_on(tiny_zoo, tmp_path):
    zdir = _copy(tiny_zoo, tmp_path)
    m = Manifest.load(zdir)
    bad, worse = m.models[1], m.models[5]
    bad_path, worse_path = m.checkpoint_path(bad), m.checkpoint_path(worse)
    original = open(bad_path, "rb").read()
    with open(bad_path, "wb") as f:               # corrupt: sha256 no longer matches
        f.write(original[:50])
    worse.sha256 = None                           # no checksum: the safetensors parser must catch it
    with open(worse_path, "wb") as f:
        f.write(b"\x00" * 64)
    # a definition the API refuses at evaluation time (the perturbed loss is not finite)
    nan_def = Definition("max", "linf", 1e300, m=64, n_examples=128, n_iters=2)   # overflows -> non-finite
    store = str(tmp_path / "r.db")
    s = run_sweep(m, QUICK + [nan_def], store, progress=False)
    with Store(store, readonly=True) as st:
        errs = {(r.checkpoint_id, r.definition_key): r.error for r in st.rows(status="error")}
        oks = {(r.checkpoint_id, r.definition_key) for r in st.rows(status="ok")}
    assert "sha256" in errs[(bad.id, QUICK[0].key)]
    assert "not a valid safetensors file" in errs[(worse.id, QUICK[1].key)]
    assert {(e.id, d.key) for e in m.models if e.id not in (bad.id, worse.id) for d in QUICK} <= oks
    assert (m.models[0].id, nan_def.key) in errs                  # the API's clear error, recorded
    assert s.ok + s.errors == 8 * 3 and s.ok >= 12
    assert "error:" in s.text(store)
    # repair one checkpoint: a rerun retries only the failed rows
    with open(bad_path, "wb") as f:
        f.write(original)
    s2 = run_sweep(m, QUICK, store, progress=False)
    assert (s2.ok, s2.errors, s2.skipped) == (2, 2, 12)
    # too few examples for a definition: a config error before any work, not 8 error rows
    too_big = Definition("avg", "l2", 0.1, m=128, n_examples=1024, n_samples=2)   # > 256 examples
    with pytest.raises(ConfigError, match="cannot provide 1024 examples.*--n-examples"):
        run_sweep(m, [too_big], store, progress=False)
    s3 = run_sweep(m, QUICK, store, progress=False, retry_errors=False)
    assert (s3.ok, s3.errors, s3.skipped) == (0, 0, 16)


def test_changed_checkpoint_is_recomputed(tiny_zoo, tmp_path):
    m = Manifest.load(tiny_zoo)
    store = str(tmp_path / "r.db")
    run_sweep(m, QUICK[:1], store, progress=False)
    m.models[0].sha256 = "f" * 64          # the manifest now points at different weights
    s = run_sweep(m, QUICK[:1], store, progress=False)
    assert s.skipped == 7 and s.ok + s.errors == 1


def _children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_kill_9_mid_sweep_then_resume(tiny_zoo, tmp_path):
    """SIGKILL the sweep driver (2 worker processes) while it writes; its workers exit, a rerun
    (in-process) completes without loss or duplicates, and the values equal those of an
    uninterrupted sweep."""
    store = str(tmp_path / "killed.db")
    cmd = [sys.executable, "-m", "sharpfast", "sweep", "--zoo", tiny_zoo, "--store", store, "--quiet", "--jobs", "1",
           "--kind", "max", "avg", "--norm", "linf", "l2", "--rho", "0.001", "0.01", "--m", "64",
           "--n-examples", "128", "--n-iters", "20", "--n-samples", "10"]
    n_defs, n_ckpt = 2 * 2 * 2, 8
    total = n_defs * n_ckpt
    proc = subprocess.Popen(cmd + ["--jobs", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n_before = 0
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(store):
                try:
                    with sqlite3.connect(store, timeout=1) as db:
                        n_before = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
                except sqlite3.OperationalError:
                    n_before = 0
                if n_before >= 1:       # a row committed
                    break
            time.sleep(0.005)
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    assert workers, "the driver had no worker processes"
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "worker processes outlived the killed driver"
    with sqlite3.connect(store) as db:
        n_killed = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    assert 0 < n_killed < total
    with sqlite3.connect(store) as db:   # each row whole (rows are written as each definition finishes)
        assert db.execute("SELECT COUNT(*) FROM results WHERE status != 'ok' OR value IS NULL "
                          "OR per_batch IS NULL").fetchone()[0] == 0

    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"{n_killed} already done" in out.stdout
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT COUNT(*) FROM results WHERE status='ok'").fetchone()[0] == total
        dup = db.execute("SELECT checkpoint_id, definition_key, COUNT(*) c FROM results "
                         "GROUP BY 1, 2 HAVING c > 1").fetchall()
        assert dup == []
    clean = str(tmp_path / "clean.db")
    out = subprocess.run(cmd[:cmd.index("--store") + 1] + [clean] + cmd[cmd.index("--store") + 2:],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert _values(store) == _values(clean)   # bit for bit: values depend on neither jobs nor stacks


# ----------------------------------------------------------------------------- definitions in sweeps

def test_curvature_definitions_sweep_and_report(tiny_zoo, tmp_path):
    """The curvature kinds are definitions like the others: stable keys, rows equal to the public
    API, a resumable store, rows in the report."""
    defs = [Definition.from_dict(dict(kind="trace", n_probes=6, m=64, n_examples=128)),
            Definition.from_dict(dict(kind="lambda_max", adaptive=False, m=64, n_examples=128)),
            Definition.from_dict(dict(kind="adam", n_probes=6, m=64, n_examples=128)),
            Definition.from_dict(dict(kind="renyi", curvature="ggn", n_vectors=2, n_lanczos=8, m=64, n_examples=128))]
    assert len({d.key for d in defs}) == 4 and all(d.rho is None for d in defs)
    assert Definition("trace", n_probes=6, m=64, n_examples=128, n_samples=99, rho=3.0).key == defs[0].key
    assert defs[0].name == "trace-hessian-adaptive m=64 n_examples=128 n_probes=6"
    store = str(tmp_path / "r.db")
    m = Manifest.load(tiny_zoo)
    s = run_sweep(m, defs, store, progress=False)
    assert (s.ok, s.errors) == (32, 0)
    rows = _values(store)
    entry = m.models[0]
    model = load_model(m, entry)
    x, y = m.sharpness_data(128)
    batches = [(x[:64], y[:64]), (x[64:], y[64:])]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = sharpfast.hessian_trace(model, batches, n_probes=6).value
    finally:
        torch.set_num_threads(before)
    status, value, err, per_batch = rows[(entry.id, defs[0].key)]
    assert status == "ok" and err is None and value == pytest.approx(want, rel=1e-6) and len(per_batch) == 2
    assert run_sweep(m, defs, store, progress=False).skipped == 32
    from sharpfast.study.analysis.report import build_report
    text = build_report(store, None, plots=False).markdown()
    assert "trace-hessian-adaptive" in text and "renyi-ggn-adaptive" in text and "lambda_max-hessian-standard" in text


def test_esd_figure_for_chosen_checkpoints(tiny_zoo, tmp_path, capsys):
    from sharpfast.study.cli import main
    from sharpfast.study.analysis.esd import chosen
    m = Manifest.load(tiny_zoo)
    best, worst = chosen(m, None)
    assert best.metrics["test_error"] <= worst.metrics["test_error"]
    assert main(["esd", "--zoo", tiny_zoo, "--out", str(tmp_path), "--n-examples", "128", "--m", "64"]) == 0
    assert (tmp_path / "esd.png").stat().st_size > 1000 and "esd: wrote" in capsys.readouterr().out
    assert main(["esd", "--zoo", tiny_zoo, "--out", str(tmp_path), "--ids", "nope", "--n-examples", "128"]) == 2
    assert [e.id for e in chosen(m, [worst.id, best.id, worst.id])] == [worst.id, best.id]   # each once


def test_both_solvers_sweep_side_by_side(tiny_zoo, tmp_path):
    """Definitions name the solver: published definitions keep the keys they had before solvers
    existed, the scaled ones are new definitions with their own rows and report lines."""
    assert Definition("max", "l2", 0.5).key == Definition("max", "l2", 0.5, solver="published", init="zero").key
    assert Definition("max", "l2", 0.5, rand_init=True).key == Definition("max", "l2", 0.5, init="random").key
    pub = Definition.from_dict(dict(kind="max", norm="l2", rho=0.5, n_iters=6, m=64, n_examples=128))
    new = Definition.from_dict(dict(kind="max", norm="l2", rho=0.5, n_iters=6, m=64, n_examples=128,
                                    solver="scaled"))
    eig = Definition.from_dict(dict(kind="max", norm="l2", rho=0.5, n_iters=6, m=64, n_examples=128,
                                    solver="scaled", init="eigen"))
    assert len({pub.key, new.key, eig.key}) == 3
    assert "solver=scaled" in new.name and "init=eigen" in eig.name and "solver" not in pub.name
    assert eig.settings().solver == "scaled" and eig.settings().init == "eigen"
    with pytest.raises(ConfigError, match="solver must be one of"):
        Definition("max", "l2", 0.5, solver="sam")
    with pytest.raises(ConfigError, match="contradicts"):
        Definition("max", "l2", 0.5, rand_init=True, init="eigen")
    store = str(tmp_path / "r.db")
    m = Manifest.load(tiny_zoo)
    s = run_sweep(m, [pub, new, eig], store, progress=False)
    assert (s.ok, s.errors) == (24, 0)
    rows = _values(store)
    for entry in m.models:
        assert rows[(entry.id, new.key)][1] >= rows[(entry.id, pub.key)][1] * (1 - 1e-6)
    from sharpfast.study.analysis.report import build_report
    text = build_report(store, None, plots=False).markdown()
    assert "max-l2-adaptive m=64 n_examples=128 n_iters=6 solver=scaled" in text
    assert "solver=scaled init=eigen" in text
    from sharpfast.study.cli import _definitions, build_parser
    flags = build_parser().parse_args(["sweep", "--zoo", "z", "--kind", "max", "avg", "--norm", "l2", "--rho", "0.5",
                                       "--solver", "published", "scaled"])
    assert [d.name for d in _definitions(flags)] == [
        "max-l2-adaptive m=128 rho=0.5", "max-l2-adaptive m=128 solver=scaled rho=0.5", "avg-l2-adaptive m=128 rho=0.5"]


def test_jiang_measures_sweep_and_report(tiny_zoo, tmp_path):
    """Measures are definitions: rows equal to the function on the same examples, the initial
    weights loaded for distance-to-initialization, the recorded trajectory used, report rows."""
    from sharpfast.study import measures
    names = ("param-norm", "frob-distance", "path-norm", "cross-entropy", "num-step-to-0.1-loss")
    defs = [Definition.from_dict(dict(kind="measure", measure=n, n_examples=128)) for n in names]
    store = str(tmp_path / "r.db")
    m = Manifest.load(tiny_zoo)
    s = run_sweep(m, defs, store, progress=False)
    rows = _values(store)
    entry = m.models[0]
    x, y = m.sharpness_data(128)
    model, init = load_model(m, entry), load_model(m, entry, initial=True)
    assert rows[(entry.id, defs[1].key)][1] == pytest.approx(measures.measure("frob-distance", model, x, y, init=init),
                                                           rel=1e-6)
    steps = [rows[(e.id, defs[4].key)] for e in m.models]
    # 3 epochs of the tiny zoo rarely reach loss 0.1: an error row naming why, or the recorded count
    assert all(r[0] == "ok" and r[1] == e.metrics["steps_to_loss_0.1"] if "steps_to_loss_0.1" in e.metrics
               else r[0] == "error" for r, e in zip(steps, m.models))
    assert s.ok >= 4 * len(m.models)
    from sharpfast.study.analysis.report import build_report
    text = build_report(store, None, plots=False).markdown()
    assert "| param-norm n_examples=128 |" in text and "| frob-distance n_examples=128 |" in text


def test_measures_of_an_earlier_revision_are_not_reused(tiny_zoo, tmp_path):
    """A store whose measure rows were computed under the conventions before revision 2 (their keys
    hash {kind, measure, n_examples}): a sweep recomputes them under the current key, and the report
    keeps the old rows apart, marked."""
    import hashlib
    import json as json_
    from sharpfast.study.analysis.report import build_report
    from sharpfast.study.store import Store
    d = Definition.from_dict(dict(kind="measure", measure="1/margin", n_examples=128))
    old_spec = {"kind": "measure", "measure": "1/margin", "n_examples": 128}
    old_key = hashlib.sha256(json_.dumps(old_spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert d.key != old_key and d.canonical()["revision"] == MEASURES_REVISION == 3
    m = Manifest.load(tiny_zoo)
    store = str(tmp_path / "r.db")
    with Store(store) as st:
        with st.transaction() as db:
            db.execute("INSERT INTO definitions VALUES (?, ?, ?, ?, ?)", (old_key, d.name, d.family, 0.0,
                                                                         json_.dumps(old_spec)))
        for e in m.models:
            st.put_results(dict(checkpoint_id=e.id, sha256=e.sha256, factory=e.factory, hparams=e.hparams,
                                metrics=e.metrics),
                           [dict(checkpoint_id=e.id, definition_key=old_key, status="ok", value=1.0, time_s=0.0,
                                 checkpoint_sha256=e.sha256)])
    s = run_sweep(m, [d], store, progress=False)
    assert s.skipped == 0 and s.ok + s.errors == len(m.models)
    text = build_report(store, None, plots=False, n_boot=0).markdown()
    assert "| 1/margin n_examples=128 [revision 1] |" in text


def test_a_small_zoos_data_sets_the_number_of_examples(tiny_zoo, tmp_path, capsys):
    """The tiny zoo's data has 256 training examples: the default preset's 512 (and the jiang
    preset's) become 256, the largest multiple of m = 128 it provides, said on one line; an explicit
    --n-examples beyond the data stays an error."""
    from sharpfast.study.cli import main
    store = str(tmp_path / "r.db")
    assert main(["sweep", "--zoo", tiny_zoo, "--store", store, "--quiet", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert ("sweep: the zoo's data provides fewer than 512 examples: definitions asking for 512 use 256, the largest "
            "multiple of every definition's m (128)") in out
    with Store(store, readonly=True) as st:
        defs = st.definitions()
        assert len(defs) == 6 and all(d["spec"]["n_examples"] == 256 for d in defs.values())
        assert st.counts() == {"ok": 6}
    fitted, message = D.fit_to_data(Manifest.load(tiny_zoo), D.preset("jiang"))
    assert {d.n_examples for d in fitted} == {256} and len(fitted) == 34 and "use 256" in message
    mixed = [Definition.from_dict(dict(kind="avg", norm="l2", rho=0.1, m=96, n_examples=384)),
             Definition.from_dict(dict(kind="avg", norm="l2", rho=0.1, m=64, n_examples=128))]
    fitted, message = D.fit_to_data(Manifest.load(tiny_zoo), mixed)   # lcm(96, 64) = 192 <= 256
    assert [d.n_examples for d in fitted] == [192, 128] and "asking for 384 use 192" in message
    assert D.fit_to_data(Manifest.load(tiny_zoo), QUICK) == (QUICK, None)   # 128 fit: unchanged
    coprime = [Definition.from_dict(dict(kind="avg", norm="l2", rho=0.1, m=m, n_examples=m)) for m in (192, 256)]
    with pytest.raises(ConfigError, match="cannot provide 768 examples, the smallest multiple of every"):
        D.fit_to_data(Manifest.load(tiny_zoo), coprime + [Definition.from_dict(
            dict(kind="avg", norm="l2", rho=0.1, m=128, n_examples=512))])
    big_m = [Definition.from_dict(dict(kind="avg", norm="l2", rho=0.1, m=384, n_examples=384))]
    assert D.fit_to_data(Manifest.load(tiny_zoo), big_m) == (big_m, None)   # nothing fits: said below
    with pytest.raises(ConfigError, match="cannot provide 384 examples.*--n-examples"):
        run_sweep(Manifest.load(tiny_zoo), big_m, str(tmp_path / "big.db"), progress=False, fit_examples=True)
    assert main(["sweep", "--zoo", tiny_zoo, "--store", store, "--quiet", "--n-examples", "512"]) == 2
    assert "cannot provide 512 examples" in capsys.readouterr().err


# ----------------------------------------------------------------------------- stacks


def test_stacks_group_checkpoints_of_one_architecture_and_split_them_over_the_workers(tiny_zoo):
    m = Manifest.load(tiny_zoo)
    tasks = [sweep_mod.Task(e, QUICK) for e in m.models]
    by_width = {w: [e.id for e in m.models if e.kwargs["width"] == w] for w in (8, 16)}
    work = sweep_mod.stacks(tasks, None, jobs=2)   # 4 checkpoints per architecture, 2 workers
    # one definition per stack, definition after definition
    assert [s.definitions for s in work] == [[QUICK[0]]] * 4 + [[QUICK[1]]] * 4
    for d in QUICK:
        assert sorted([t.entry.id for t in s.tasks] for s in work if s.definitions == [d]) == sorted(
            part for ids in by_width.values() for part in (ids[:2], ids[2:]))
    assert [len(s.tasks) for s in sweep_mod.stacks(tasks, 3)] == [3, 1, 3, 1] * 2
    assert [len(s.tasks) for s in sweep_mod.stacks(tasks, 1)] == [1] * 16
    # checkpoints lacking other definitions share the stacks of the definitions they lack
    partial = [sweep_mod.Task(e, QUICK[:1] if e.id == by_width[8][0] else QUICK) for e in m.models]
    assert sorted(len(s.tasks) for s in sweep_mod.stacks(partial, 8)) == [3, 4, 4, 4]


def test_stacked_rows_do_not_depend_on_the_split_and_agree_with_one_at_a_time(tiny_zoo, tmp_path):
    m = Manifest.load(tiny_zoo)
    runs = {}
    for name, kw in (("auto", {}), ("jobs2", dict(jobs=2)), ("stack3", dict(stack=3)), ("one", dict(stack=1))):
        s = run_sweep(m, QUICK, str(tmp_path / f"{name}.db"), progress=False, **kw)
        assert (s.ok, s.errors) == (16, 0)
        runs[name] = _values(str(tmp_path / f"{name}.db"))
    # bit for bit, keys included: one checkpoint per pass is a stack of one
    assert runs["auto"] == runs["jobs2"] == runs["stack3"] == runs["one"]
    with pytest.raises(ValueError, match="stack must be a positive integer"):
        run_sweep(m, QUICK, str(tmp_path / "bad.db"), progress=False, stack=0)


def test_a_failing_checkpoint_gets_its_own_error_row_and_leaves_its_stack_unchanged(tiny_zoo, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from sharpfast.study.zoo.checkpoints import file_sha256

    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    m = Manifest.load(str(zoo))
    clean = run_sweep(m, QUICK, str(tmp_path / "clean.db"), progress=False, stack=4)
    assert clean.errors == 0
    nan_entry, broken_entry = m.models[0], m.models[1]
    state = load_file(m.checkpoint_path(nan_entry))
    state["1.weight"][0, 0] = float("nan")
    save_file(state, m.checkpoint_path(nan_entry))
    with open(m.checkpoint_path(broken_entry), "wb") as f:
        f.write(b"not a checkpoint")
    raw = json.loads((zoo / "manifest.json").read_text())
    for e in raw["models"]:
        if e["id"] in (nan_entry.id, broken_entry.id):
            e["sha256"] = file_sha256(m.checkpoint_path(nan_entry if e["id"] == nan_entry.id else broken_entry))
    (zoo / "manifest.json").write_text(json.dumps(raw))
    s = run_sweep(Manifest.load(str(zoo)), QUICK, str(tmp_path / "r.db"), progress=False, stack=4)
    assert (s.ok, s.errors) == (12, 4)
    rows, before = _values(str(tmp_path / "r.db")), _values(str(tmp_path / "clean.db"))
    with Store(str(tmp_path / "r.db"), readonly=True) as st:
        errors = {r.checkpoint_id: r.error for r in st.rows() if r.status == "error"}
    assert set(errors) == {nan_entry.id, broken_entry.id}
    assert "non-finite" in errors[nan_entry.id] and "1.weight" in errors[nan_entry.id]
    for key, row in rows.items():
        if key[0] not in errors:
            assert row == before[key]   # the stack's other checkpoints: the very same values


def test_a_stack_evaluate_many_refuses_is_evaluated_one_checkpoint_at_a_time(tiny_zoo, monkeypatch):
    m = Manifest.load(tiny_zoo)
    entries = [e.to_dict() for e in m.models[:3]]
    defs = [d.canonical() for d in QUICK]
    expected = sweep_mod.evaluate_checkpoints(m.data, m.root, entries, defs, "cpu", 1, "auto", stack=1)

    real = sharpfast.evaluate_many

    def refuse(models, *a, **kw):   # as for checkpoints loading into other dtypes: each alone is fine
        if len(models) > 1:
            raise ValueError("models[1] is not of models[0]'s architecture")
        return real(models, *a, **kw)
    monkeypatch.setattr(sharpfast, "evaluate_many", refuse)
    rows = sweep_mod.evaluate_checkpoints(m.data, m.root, entries, defs, "cpu", 1, "auto", stack=None)
    strip = lambda rs: [[{k: v for k, v in r.items() if k != "time_s"} for r in row] for row in rs]
    assert strip(rows) == strip(expected) and all(r["status"] == "ok" for row in rows for r in row)


def test_geodesic_definitions_sweep_and_report(tmp_path):
    """Kind ``geodesic`` is a definition like the others: keys of the existing kinds unchanged, rows
    equal to the public API, the preset side by side with the adaptive worst case in the report;
    on a ViT the three differ, on an MLP (no attention) inv and mix are the adaptive value."""
    from sharpfast.study import zoo
    from sharpfast.study.cli import _definitions, build_parser
    from sharpfast.study.analysis.report import build_report
    # the keys the existing kinds had before kind geodesic and its fields existed (the measure's is
    # revision 3's: a measure's key changes with its conventions' revision, and only then)
    assert [d.key for d in (Definition("max", "linf", 0.002), Definition("max", "l2", 0.5, solver="scaled"),
                            Definition("avg", "l2", 0.1), Definition("trace"), Definition("measure", measure="path-norm"))] \
        == ["ebcb181c577c1da3", "2be244c7b63def85", "5c967eb41c686b41", "3a01d04899e02e76", "4c4a2b71c0c20912"]
    mix = Definition.from_dict(dict(kind="geodesic", metric="mix", rho=0.5, n_iters=4, m=64, n_examples=128))
    inv = Definition.from_dict(dict(kind="geodesic", metric="inv", rho=0.5, n_iters=4, m=64, n_examples=128))
    adaptive = Definition.from_dict(dict(kind="max", norm="l2", rho=0.5, n_iters=4, m=64, n_examples=128,
                                         solver="scaled"))
    assert len({mix.key, inv.key, adaptive.key}) == 3
    assert mix.name == "geodesic-mix-adaptive m=64 n_examples=128 n_iters=4 rho=0.5"
    assert Definition("geodesic", rho=0.5, n_samples=7, solver="scaled").key == Definition("geodesic", rho=0.5).key
    assert Definition("geodesic", rho=0.5, rand_init=True, n_restarts=3).key != Definition("geodesic", rho=0.5).key
    assert Definition("geodesic", rho=0.5, rand_init=True, n_restarts=3).settings().init == "random"
    with pytest.raises(ConfigError, match="not 'eigen'"):
        Definition("geodesic", rho=0.5, init="eigen")
    assert Definition("geodesic", rho=0.5, second_order=False).key != Definition("geodesic", rho=0.5).key
    with pytest.raises(ConfigError, match="norm must be 'l2'"):
        Definition("geodesic", "linf", 0.5)
    with pytest.raises(ConfigError, match="metric must be one of"):
        Definition("geodesic", rho=0.5, metric="euclid")
    assert [d.kind for d in D.preset("geodesic")] == ["max", "geodesic", "geodesic"]
    flags = build_parser().parse_args(["sweep", "--zoo", "z", "--kind", "geodesic", "--metric", "inv", "mix",
                                       "--rho", "0.5"])
    assert [d.name for d in _definitions(flags)] == ["geodesic-inv-adaptive m=128 rho=0.5",
                                                     "geodesic-mix-adaptive m=128 rho=0.5"]

    spec = zoo.ZooSpec({"arch": ["mlp", "vit"], "lr": [0.5, 2.0]}, {"width": 8, "epochs": 1, "n_train": 128})
    zoo.build_zoo(str(tmp_path / "zoo"), spec, progress=False, log=lambda s: None)
    m = Manifest.load(str(tmp_path / "zoo"))
    store = str(tmp_path / "r.db")
    s = run_sweep(m, [adaptive, inv, mix], store, progress=False)
    assert (s.ok, s.errors) == (12, 0)
    rows = _values(store)
    for entry in m.models:
        model = load_model(m, entry)
        x, y = m.sharpness_data(128)
        batches = [(x[:64], y[:64]), (x[64:], y[64:])]
        want = sharpfast.geodesic_sharpness(model, batches, rho=0.5, metric="mix", n_iters=4).sharpness
        assert rows[(entry.id, mix.key)][1] == pytest.approx(want, rel=1e-6)
        values = [rows[(entry.id, d.key)][1] for d in (adaptive, inv, mix)]
        if entry.hparams["arch"] == "vit":
            assert len({round(v, 6) for v in values}) == 3
        else:   # no attention: no blocks, and the correction is the blocks' only
            assert values[1] == pytest.approx(values[0], rel=1e-5) and values[2] == pytest.approx(values[0], rel=1e-5)
    # the second-order term's size is stored with each geodesic row (not warned per row), and counted
    with Store(store, readonly=True) as st:
        stored = {(r.checkpoint_id, r.definition_key): r.geodesic_correction for r in st.rows()}
        blocks = {(r.checkpoint_id, r.definition_key): r.gl_blocks for r in st.rows()}
    for e in m.models:   # the MLPs' geodesic rows are the adaptive worst case, and say so
        assert blocks[(e.id, adaptive.key)] is None
        assert blocks[(e.id, mix.key)] == blocks[(e.id, inv.key)] == (0 if e.hparams["arch"] == "mlp" else 4)
    entry = next(e for e in m.models if e.hparams["arch"] == "vit")
    model = load_model(m, entry)
    x, y = m.sharpness_data(128)
    want = sharpfast.geodesic_sharpness(model, [(x[:64], y[:64]), (x[64:], y[64:])], rho=0.5, metric="mix",
                                        n_iters=4).geodesic_correction
    assert stored[(entry.id, mix.key)] == pytest.approx(want, rel=1e-6) and stored[(entry.id, adaptive.key)] is None
    text = build_report(store, None, plots=False).markdown()
    assert "geodesic-inv-adaptive" in text and "geodesic-mix-adaptive" in text and "solver=scaled" in text
    for d in (inv, mix):   # counted over the ViTs: the MLPs' rows are left out, and said
        n = sum(stored[(e.id, d.key)] > 1 for e in m.models)
        assert (f"{d.name}: on {n} of 2 checkpoints the geodesic's second-order term outgrew" in text) == (n > 0)
        assert f"{d.name}: 2 checkpoint(s) without a GL block left out" in text
