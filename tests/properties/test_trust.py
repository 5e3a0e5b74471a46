"""The CLI and the store refuse what they cannot trust: stale rows, foreign stores and files,
non-finite values stored as ok, flags that are silently bent, tracebacks where an error belongs,
concurrent sweeps and Ctrl-C."""
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from sharpfast.study import definitions as D
from sharpfast.study.zoo.checkpoints import Manifest
from sharpfast.study.cli import main
from sharpfast.study.definitions import Definition
from sharpfast.study import store as store_mod
from sharpfast.study.store import Store, StoreError
from sharpfast.study.sweep import run_sweep
from tests.helpers import wait_for_rows

QUICK = D.preset("quick")
PARAM_NORM = Definition.from_dict(dict(kind="measure", measure="param-norm", n_examples=128))


def copy_zoo(tiny_zoo, tmp_path, name="zoo"):
    dst = tmp_path / name
    shutil.copytree(tiny_zoo, dst)
    return str(dst)


def values(store):
    with Store(store, readonly=True) as st:
        return {(r.checkpoint_id, r.definition_key): r for r in st.rows()}


# ----------------------------------------------------------------------------- silent wrong results

def test_rows_of_replaced_checkpoints_are_not_reused_without_a_manifest_hash(tiny_zoo, tmp_path):
    """A manifest without sha256 (written by hand): the files' own hashes decide. Two models'
    checkpoint files swapped: their rows are recomputed, the others reused."""
    zoo = copy_zoo(tiny_zoo, tmp_path)
    path = os.path.join(zoo, "manifest.json")
    raw = json.load(open(path))
    for entry in raw["models"]:
        entry.pop("sha256", None)
    json.dump(raw, open(path, "w"))
    store = str(tmp_path / "r.db")
    m = Manifest.load(zoo)
    assert run_sweep(m, [PARAM_NORM], store, progress=False).ok == 8
    before = values(store)
    first, second = [e for e in m.models if e.kwargs == m.models[0].kwargs][:2]   # one architecture
    a, b = (os.path.join(zoo, e.checkpoint) for e in (first, second))
    wa, wb = load_file(a), load_file(b)
    save_file(wb, a), save_file(wa, b)
    s = run_sweep(Manifest.load(zoo), [PARAM_NORM], store, progress=False)
    assert (s.ok, s.skipped) == (2, 6)
    after = values(store)
    k0, k1 = (first.id, PARAM_NORM.key), (second.id, PARAM_NORM.key)
    assert after[k0].value == pytest.approx(before[k1].value) and after[k1].value == pytest.approx(before[k0].value)
    assert after[k0].checkpoint_sha256 != before[k0].checkpoint_sha256 and len(after[k0].checkpoint_sha256) == 64


def test_a_store_is_bound_to_its_zoo(tiny_zoo, tmp_path):
    store = str(tmp_path / "r.db")
    m = Manifest.load(tiny_zoo)
    run_sweep(m, [PARAM_NORM], store, progress=False, limit=1)
    other = copy_zoo(tiny_zoo, tmp_path, "other")
    raw = json.load(open(os.path.join(other, "manifest.json")))
    raw["data"]["kwargs"] = {**raw["data"].get("kwargs", {}), "n_train": 200}
    json.dump(raw, open(os.path.join(other, "manifest.json"), "w"))
    with pytest.raises(StoreError, match="belongs to a zoo with other data"):
        run_sweep(Manifest.load(other), [PARAM_NORM], store, progress=False)
    renamed = copy_zoo(tiny_zoo, tmp_path, "renamed")   # same data, none of the store's checkpoints
    raw = json.load(open(os.path.join(renamed, "manifest.json")))
    for entry in raw["models"]:
        entry["id"] = "other-" + entry["id"]
    json.dump(raw, open(os.path.join(renamed, "manifest.json"), "w"))
    with pytest.raises(StoreError, match="none of this one's"):
        run_sweep(Manifest.load(renamed), [PARAM_NORM], store, progress=False)
    assert run_sweep(Manifest.load(renamed), [PARAM_NORM], store, progress=False, limit=1, mix_zoos=True).ok == 1
    moved = copy_zoo(tiny_zoo, tmp_path, "moved")   # the same zoo in another folder keeps its store
    assert run_sweep(Manifest.load(moved), [PARAM_NORM], store, progress=False).skipped == 1
    assert main(["sweep", "--zoo", str(other), "--store", store, "--preset", "quick", "--quiet"]) == 2
    # mixed in once, the store still belongs to its first zoo: another needs the flag every time
    raw = json.load(open(os.path.join(renamed, "manifest.json")))
    raw["data"]["kwargs"] = {**raw["data"].get("kwargs", {}), "n_train": 200}
    json.dump(raw, open(os.path.join(renamed, "manifest.json"), "w"))
    assert run_sweep(Manifest.load(renamed), [PARAM_NORM], store, progress=False, limit=2, mix_zoos=True).ok == 2
    with pytest.raises(StoreError, match="belongs to a zoo with other data"):
        run_sweep(Manifest.load(renamed), [PARAM_NORM], store, progress=False)
    assert run_sweep(m, [PARAM_NORM], store, progress=False).skipped == 8   # its own zoo: no flag needed


class NaNCurvature(torch.nn.Module):
    """Finite outputs whose Hessian is infinite: |x w|^(1/2) has an unbounded curvature at w = 0."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(64, 10))

    def forward(self, x):
        return (x.flatten(1) @ self.w).abs().sqrt()


def test_a_non_finite_value_is_an_error_row_and_the_report_says_what_it_left_out(tiny_zoo, tmp_path):
    from sharpfast.study.analysis.report import build_report
    from sharpfast.study.sweep import evaluate_checkpoint
    m = Manifest.load(tiny_zoo)
    trace = Definition.from_dict(dict(kind="trace", n_probes=2, m=64, n_examples=64, adaptive=False))
    entry = dict(m.models[0].to_dict(), factory="tests.properties.test_trust:NaNCurvature", kwargs={})
    shutil.copy(os.path.join(tiny_zoo, m.models[0].checkpoint), tmp_path / "x.safetensors")
    save_file(NaNCurvature().state_dict(), str(tmp_path / "x.safetensors"))
    entry.update(checkpoint=str(tmp_path / "x.safetensors"), sha256=None)
    rows = evaluate_checkpoint(m.data, m.root, entry, [trace.canonical()], device="cpu")
    assert rows[0]["status"] == "error" and "not finite" in rows[0]["error"]
    store = str(tmp_path / "r.db")
    with Store(store) as st:
        st.put_definitions([trace])
        st.put_results(dict(checkpoint_id=entry["id"], sha256=None, factory="f", hparams={"lr": 1},
                            metrics={"test_error": 0.1}), rows)
    text = build_report(store, None, n_boot=0).markdown()
    assert f"Left out, every row failed: {trace.name} (1 error: ValueError: " in text


def test_a_file_that_is_not_a_store_is_refused_before_anything_is_written(tiny_zoo, tmp_path):
    foreign = tmp_path / "foreign.db"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE people (name TEXT)")
    db.execute("INSERT INTO people VALUES ('ada')")
    db.commit()
    db.close()
    before = foreign.read_bytes()
    with pytest.raises(StoreError, match="SQLite database but not a sharpfast results store .*people"):
        run_sweep(Manifest.load(tiny_zoo), QUICK, str(foreign), progress=False)
    assert foreign.read_bytes() == before and not os.path.exists(str(foreign) + "-wal")
    text = tmp_path / "notes.db"
    text.write_text("hello")
    with pytest.raises(StoreError, match="not an SQLite database"):
        Store(str(text))
    assert text.read_text() == "hello"
    # reading never writes: a store opened read-only keeps its bytes and its journal mode
    store = str(tmp_path / "r.db")
    run_sweep(Manifest.load(tiny_zoo), [PARAM_NORM], store, progress=False, limit=1)
    sqlite3.connect(store).execute("PRAGMA journal_mode=DELETE").fetchone()
    before = open(store, "rb").read()
    with Store(store, readonly=True) as st:
        assert len(list(st.rows())) == 1
    assert open(store, "rb").read() == before
    assert sqlite3.connect(store).execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert main(["report", "--store", str(foreign)]) == 2


def test_an_old_store_without_the_new_columns_reads_and_resumes(tiny_zoo, tmp_path):
    store = str(tmp_path / "r.db")
    run_sweep(Manifest.load(tiny_zoo), [PARAM_NORM], store, progress=False, limit=2)
    db = sqlite3.connect(store)   # as a store written before the threads column and claims existed
    db.execute("ALTER TABLE results DROP COLUMN threads")
    db.execute("DROP TABLE claims")
    db.commit()
    db.close()
    with Store(store, readonly=True) as st:
        assert [r.threads for r in st.rows()] == [None, None]
    s = run_sweep(Manifest.load(tiny_zoo), [PARAM_NORM], store, progress=False, threads=1)
    assert (s.skipped, s.ok) == (2, 6)
    assert sorted(str(r.threads) for r in values(store).values()) == ["1"] * 6 + ["None"] * 2


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("argv, message", [
    (["sweep", "--zoo", "Z", "--limit", "-1"], "argument --limit: must be >= 1, got -1"),
    (["sweep", "--zoo", "Z", "--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["sweep", "--zoo", "Z", "--threads", "-2"], "argument --threads: must be >= 1, got -2"),
    (["sweep", "--zoo", "Z", "--jobs", "x"], "argument --jobs: expected an integer, got 'x'"),
    (["zoo", "--out", "Z", "--epochs", "-1"], "argument --epochs: must be >= 1, got -1"),
    (["zoo", "--out", "Z", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["report", "--store", "S", "--n-boot", "-5"], "argument --n-boot: must be >= 0, got -5"),
    (["sweep", "--zoo", "Z", "--cpus-per-task", "0"], "argument --cpus-per-task: must be > 0, got 0"),
    (["sweep", "--zoo", "Z", "--stack", "0"], "argument --stack: must be >= 1, got 0"),
    (["run", "--out", "Z", "--stack", "many"], "argument --stack: expected an integer, got 'many'"),
])
def test_bad_numbers_are_refused_by_name(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # nothing is written where the tests run, even if a flag got through
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_devices_color_by_and_data_factories_are_errors_not_tracebacks(tiny_zoo, tmp_path, capsys, monkeypatch):
    store = str(tmp_path / "r.db")
    if not torch.cuda.is_available():
        assert main(["sweep", "--zoo", tiny_zoo, "--store", store, "--device", "cuda", "--jobs", "1"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert main(["sweep", "--zoo", tiny_zoo, "--store", store, "--device", "bogus"]) == 2
    assert "'bogus' is not a device" in capsys.readouterr().err
    assert main(["doctor", "--device", "bogus"]) == 2
    assert "'bogus' is not a device" in capsys.readouterr().err
    assert main(["esd", "--zoo", tiny_zoo, "--out", str(tmp_path / "e"), "--ids", "nope"]) == 2
    assert "no checkpoint(s) ['nope'] in the zoo" in capsys.readouterr().err
    assert main(["esd", "--zoo", tiny_zoo, "--out", str(tmp_path / "e"), "--m", "64"]) == 0   # 256 of its 256
    assert "esd: the zoo's data provides fewer than 512 examples: definitions asking for 512 use 256" in \
        capsys.readouterr().out
    run_sweep(Manifest.load(tiny_zoo), [PARAM_NORM], store, progress=False, limit=2)
    assert main(["report", "--store", store, "--color-by", "depth", "--n-boot", "0"]) == 2
    assert "color_by='depth' is not a hyperparameter that varies in this store; those that do: " in \
        capsys.readouterr().err
    zoo = copy_zoo(tiny_zoo, tmp_path)
    raw = json.load(open(os.path.join(zoo, "manifest.json")))
    raw["data"] = {"factory": "tests.properties.test_trust:raising_data", "kwargs": {}}
    json.dump(raw, open(os.path.join(zoo, "manifest.json"), "w"))
    assert main(["sweep", "--zoo", zoo, "--store", str(tmp_path / "x.db"), "--preset", "quick"]) == 2
    err = capsys.readouterr().err
    assert "data factory tests.properties.test_trust:raising_data failed: RuntimeError: the data server is down" in err
    assert "fewer examples" not in err


def raising_data(n_examples):
    raise RuntimeError("the data server is down")


def test_a_grid_file_with_a_bad_count_is_refused(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("factors: {lr: [0.5, 1.0]}\nfixed: {epochs: 0}\n")
    assert main(["zoo", "--out", str(tmp_path / "z"), "--grid", str(grid), "--quiet"]) == 2
    assert "zoo hyperparameter epochs must be a positive integer, got 0" in capsys.readouterr().err


def test_an_m_that_does_not_divide_512(tiny_zoo, tmp_path, capsys):
    d = Definition.from_dict(dict(kind="max", norm="linf", rho=0.01, m=100))
    assert d.n_examples == 500 and Definition.from_dict(dict(kind="max", norm="linf", rho=0.01)).n_examples == 512
    store = str(tmp_path / "r.db")
    assert main(["sweep", "--zoo", tiny_zoo, "--store", store, "--kind", "max", "--rho", "0.01", "--m", "100",
                 "--n-examples", "200", "--n-iters", "2", "--quiet", "--limit", "1", "--jobs", "1"]) == 0
    with Store(store, readonly=True) as st:
        (spec,) = [d["spec"] for d in st.definitions().values()]
    assert (spec["m"], spec["n_examples"]) == (100, 200)


def test_a_closed_pipe_is_not_a_traceback():
    r = subprocess.run(f"{sys.executable} -m sharpfast definitions --preset paper | head -1", shell=True,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "BrokenPipeError" not in r.stderr and "Traceback" not in r.stderr


def test_a_table_written_by_excel_with_a_byte_order_mark(tmp_path):
    from tests.study.zoo.test_table import write_zoo
    from sharpfast.study.zoo.table import manifest_from_table
    table = write_zoo(tmp_path)
    table.write_bytes(b"\xef\xbb\xbf" + table.read_bytes())
    assert [e.id for e in manifest_from_table(str(table), "tests.study.zoo.test_table:keyword_data").models] == ["m0", "m1", "m2"]


def test_a_checkpoint_of_other_shapes_names_them(tiny_zoo, tmp_path):
    from sharpfast.study.zoo.checkpoints import CheckpointError, load_model
    m = Manifest.load(tiny_zoo)
    entry = m.models[0]
    entry.kwargs = {**entry.kwargs, "width": 5}
    with pytest.raises(CheckpointError, match=r"size mismatch for .*copying a param with shape torch.Size\(\["):
        load_model(m, entry)


# ----------------------------------------------------------------------------- concurrency

def test_two_sweeps_on_one_store_share_the_work(tiny_zoo, tmp_path):
    """A live sweep's claims are left to it; a dead one's are taken over."""
    store = str(tmp_path / "r.db")
    m = Manifest.load(tiny_zoo)
    run_sweep(m, [PARAM_NORM], store, progress=False, limit=1)   # binds the store
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with Store(store) as st:
            st.db.executemany("INSERT INTO claims (checkpoint_id, definition_key, host, pid, claimed_at) "
                              "VALUES (?, ?, ?, ?, ?)",   # no start time: a claim of an older sharpfast
                              [(e.id, PARAM_NORM.key, __import__("socket").gethostname(), other.pid, time.time())
                               for e in m.models[1:4]])
        s = run_sweep(m, [PARAM_NORM], store, progress=False)
        assert s.ok == 4 and len(s.claimed_elsewhere) == 3 and f"pid {other.pid}" in s.text(store)
    finally:
        other.kill()
        other.wait()
    s = run_sweep(m, [PARAM_NORM], store, progress=False)   # the claimant is gone: its work is taken over
    assert s.ok == 3 and not s.claimed_elsewhere
    with Store(store, readonly=True) as st:
        assert st.db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0


def test_two_sweeps_of_other_definitions_on_one_store_each_compute_their_own(tiny_zoo, tmp_path):
    """Claims are per (checkpoint, definition): a live sweep computing one definition leaves every
    other definition of its checkpoints to a second sweep, which computes them all."""
    import socket
    store = str(tmp_path / "r.db")
    m = Manifest.load(tiny_zoo)
    other_definition = Definition.from_dict(dict(kind="measure", measure="num-params", n_examples=128))
    run_sweep(m, [PARAM_NORM], store, progress=False, limit=1)   # binds the store
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with Store(store) as st:   # the live sweep computes PARAM_NORM on every checkpoint
            st.db.executemany("INSERT INTO claims (checkpoint_id, definition_key, host, pid, claimed_at) "
                              "VALUES (?, ?, ?, ?, ?)", [(e.id, PARAM_NORM.key, socket.gethostname(), other.pid,
                                                          time.time()) for e in m.models[1:]])
        s = run_sweep(m, [other_definition], store, progress=False)
        assert s.ok == len(m.models) and not s.claimed_elsewhere
        s = run_sweep(m, [PARAM_NORM, other_definition], store, progress=False)
        assert s.ok == 0 and len(s.claimed_elsewhere) == len(m.models) - 1   # the live sweep's rows only
    finally:
        other.kill()
        other.wait()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="the process start time is read from /proc")
def test_a_claim_whose_pid_was_reused_by_another_process_is_taken_over(tiny_zoo, tmp_path):
    """After a kill -9, the claimer's PID can belong to an unrelated live process: a claim records
    its process's start, and a live process that started at another time does not hold it."""
    import socket
    from sharpfast.study.store import process_start
    store = str(tmp_path / "r.db")
    m = Manifest.load(tiny_zoo)
    run_sweep(m, [PARAM_NORM], store, progress=False, limit=1)   # binds the store
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = process_start(other.pid)
        assert start is not None and process_start(os.getpid()) != start
        with Store(store) as st:
            rows = [(e.id, PARAM_NORM.key, socket.gethostname(), other.pid, time.time(),
                     start if i < 2 else str(int(start) - 1))
                    for i, e in enumerate(m.models[1:4])]   # two its own, one a dead process's of that PID
            st.db.executemany("INSERT INTO claims (checkpoint_id, definition_key, host, pid, claimed_at, started) "
                              "VALUES (?, ?, ?, ?, ?, ?)", rows)
        s = run_sweep(m, [PARAM_NORM], store, progress=False)
        assert s.ok == 5 and sorted(s.claimed_elsewhere) == sorted(e.id for e in m.models[1:3])
    finally:
        other.kill()
        other.wait()


def test_a_locked_store_says_so(tmp_path, monkeypatch):
    store = str(tmp_path / "r.db")
    Store(store).close()
    holder = sqlite3.connect(store, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    monkeypatch.setattr(store_mod, "LOCK_TIMEOUT_S", 0.1)
    try:
        with pytest.raises(StoreError, match="is locked: another process"):
            Store(store)
    finally:
        holder.execute("ROLLBACK")



@pytest.mark.parametrize("signum, status, said", [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated")])
def test_an_interrupt_with_two_jobs_keeps_what_finished_and_says_so(tiny_zoo, tmp_path, signum, status, said):
    """Half of the zoo is built by a factory that waits for a file this test never writes, so the
    signal arrives while the sweep is running, however fast or loaded the machine: the rows of the
    other half are kept, the held checkpoints' claims released, and the sweep says so. Ctrl-C
    reaches the driver and its workers (the terminal's process group), SIGTERM the driver alone."""
    zoo_dir = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo_dir)
    manifest = Manifest.load(str(zoo_dir))
    half = len(manifest.models) // 2
    for i, e in enumerate(manifest.models):   # the free half first: the workers take its stacks first
        release = None if i < half else str(tmp_path / "never")
        e.kwargs = {"factory": e.factory, "kwargs": e.kwargs, "release": release}
        e.factory = "tests.toy_models:gated"
    manifest.save(str(zoo_dir / "manifest.json"))
    store = str(tmp_path / "r.db")
    cmd = [sys.executable, "-m", "sharpfast", "sweep", "--zoo", str(zoo_dir), "--store", store, "--jobs", "2",
           "--quiet", "--kind", "avg", "--norm", "l2", "--rho", "0.1", "--n-samples", "4", "--m", "64",
           "--n-examples", "256"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env=env)
    done = wait_for_rows(store, half, lambda: p.poll() is None)
    assert done == half and p.poll() is None, "the free half's rows were not written, or the sweep ended"
    if signum == signal.SIGINT:
        os.killpg(p.pid, signum)
    else:
        os.kill(p.pid, signum)
    out, err = p.communicate(timeout=300)
    with Store(store, readonly=True) as st:
        counts = st.counts()
        claims = st.db.execute("SELECT COUNT(*) FROM claims").fetchone()[0]
    assert p.returncode == status and f"{said}; rerun to resume" in err
    assert counts.get("ok", 0) == half and counts.get("error", 0) == 0 and claims == 0


def test_with_two_jobs_each_definitions_rows_are_stored_as_soon_as_they_exist(tiny_zoo, tmp_path):
    """The second definition's data (256 examples) is served to the workers only once this test
    writes a file, so the sweep is held after the first definition, however fast the machine:
    its rows are in the store by then (a kill now would lose only the held definition's work)."""
    import threading

    zoo_dir = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo_dir)
    manifest = Manifest.load(str(zoo_dir))
    release = tmp_path / "release"
    manifest.data = {"factory": "tests.toy_models:gated_data",
                     "kwargs": {"factory": manifest.data["factory"], "kwargs": manifest.data.get("kwargs", {}),
                                "gate": 256, "release": str(release), "driver": os.getpid()}}
    manifest.save(str(zoo_dir / "manifest.json"))
    defs = [Definition("avg", "l2", 0.1, m=64, n_examples=n, n_samples=2) for n in (128, 256)]
    store, outcome = str(tmp_path / "r.db"), {}

    def sweep():
        try:
            outcome["summary"] = run_sweep(Manifest.load(str(zoo_dir)), defs, store, jobs=2, progress=False)
        except BaseException as e:  # noqa: BLE001 - said by the assertion below
            outcome["error"] = e
    thread = threading.Thread(target=sweep)
    thread.start()
    try:
        done = wait_for_rows(store, len(manifest.models), thread.is_alive)
        held = thread.is_alive()
    finally:
        release.touch()
        thread.join()
    assert "error" not in outcome, outcome.get("error")
    assert held and done == len(manifest.models), "the first definition's rows waited for the second's"
    assert (outcome["summary"].ok, outcome["summary"].errors) == (2 * len(manifest.models), 0)
