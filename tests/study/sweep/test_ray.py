"""The Ray executor on a local cluster gives the same rows as the local executor."""
import shutil

import pytest

ray = pytest.importorskip("ray")

from sharpfast.study import definitions as D  # noqa: E402
from sharpfast.study import zoo  # noqa: E402
from sharpfast.study.zoo.checkpoints import Manifest  # noqa: E402
from sharpfast.study.store import Store  # noqa: E402
from sharpfast.study.sweep import run_sweep  # noqa: E402
from tests.helpers import wait_for_rows  # noqa: E402

TINY = zoo.ZooSpec({"lr": [0.5, 2.0], "width": [8, 16]}, {"arch": "mlp", "epochs": 2, "n_train": 256})


def _rows(path):
    with Store(path, readonly=True) as st:
        return {(r.checkpoint_id, r.definition_key): r for r in st.rows()}


@pytest.mark.slow
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


def test_what_ray_prints_goes_to_a_log_and_one_line_of_each_message_to_the_sweep(tmp_path):
    """Ray's driver thread prints a dead node's message with its state dump (about 35 lines, twice):
    the sweep's output gets one line of it, the log all of it; other threads' writes pass through."""
    import io
    import threading

    from sharpfast.study.sweep import RayChatter

    out, log = io.StringIO(), tmp_path / "r.db.ray.log"
    chatter = RayChatter(out, str(log))
    message = ("\x1b[33m(raylet)\x1b[0m Raylet is terminated. Termination is unexpected.\n"
               + "".join(f"    [state-dump] line {i}\n" for i in range(35)))
    ray_thread = threading.Thread(target=lambda: [chatter.write(message) for _ in range(2)],
                                  name="ray_listen_error_messages")
    ray_thread.start()
    ray_thread.join()
    chatter.write("sweep: our own line\n")
    chatter.close()
    said = out.getvalue().splitlines()
    assert said == [f"sweep: Ray says: (raylet) Raylet is terminated. Termination is unexpected.; all of it in {log}",
                    "sweep: our own line"]
    assert log.read_text() == 2 * message


def test_a_cluster_that_can_no_longer_run_the_tasks_is_said():
    from sharpfast.study.sweep.executors import _missing_resources

    assert _missing_resources({"CPU": 2.0}, 1.0, 0) is None
    assert _missing_resources({"CPU": 2.0, "GPU": 1.0}, 1.0, 0.25) is None
    said = _missing_resources({"CPU": 0.0}, 1.0, 0)
    assert "asks for 1 CPU, the live nodes have 0 CPU" in said
    assert "and 1 GPU, the live nodes have 4 CPU and 0 GPU" in _missing_resources({"CPU": 4.0}, 1.0, 1.0)


def _raylet_of(port):
    """The pid of the raylet listening on node-manager ``port`` (read from /proc)."""
    import os

    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"raylet") and f"--node_manager_port={port}".encode() in cmd:
            return int(pid)
    return None


@pytest.mark.slow
def test_a_worker_node_dying_mid_sweep_gives_error_rows_a_short_output_and_an_end(tiny_zoo, tmp_path):
    """A two-node cluster on this machine (a head without CPUs, a worker node with one), the
    worker's raylet killed once the sweep stored its first row: the tasks it ran fail with Ray's
    NodeDiedError, those no node can run any more fail saying so (the sweep waited for them
    forever), Ray's messages take a line each instead of their state dumps, exit status 3."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    gcs, node_port = free_port(), free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_health_check_period_ms="1000",
               RAY_health_check_failure_threshold="3", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    start = lambda *a: subprocess.run(["ray", "start", *a, "--disable-usage-stats"], env=env, capture_output=True,
                                      text=True, timeout=120)
    address = f"127.0.0.1:{gcs}"
    try:
        head = start("--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
                     "--include-dashboard=false")
        assert head.returncode == 0, head.stderr
        worker = start(f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                       f"--node-manager-port={node_port}")
        assert worker.returncode == 0, worker.stderr
        store = tmp_path / "r.db"
        cmd = [sys.executable, "-m", "sharpfast", "sweep", "--zoo", tiny_zoo, "--store", str(store), "--quiet",
               "--executor", "ray", "--address", address, "--kind", "max", "--norm", "linf", "l2", "--rho", "0.001",
               "0.01", "--m", "64", "--n-examples", "128", "--n-iters", "100"]
        sweep = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        done = wait_for_rows(str(store), 1, lambda: sweep.poll() is None, status=None, guard_s=300)
        assert done and sweep.poll() is None, "no row was stored, or the sweep ended, before the node was killed"
        os.kill(_raylet_of(node_port), signal.SIGKILL)
        out, err = sweep.communicate(timeout=300)
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert sweep.returncode == 3, err
    assert "[state-dump]" not in out + err and len(out.splitlines()) < 20
    assert "sweep: Ray says: (raylet)" in out and "r.db.ray.log" in out
    with Store(str(store), readonly=True) as st:
        errors = [r.error for r in st.rows() if r.status == "error"]
        assert 0 < len(errors) == 32 - st.counts().get("ok", 0)
    assert all("NodeDiedError" in e or "no node of the Ray cluster can run this task any more" in e
               or "WorkerCrashedError" in e for e in errors), errors
    assert "state-dump" in (tmp_path / "r.db.ray.log").read_text()
