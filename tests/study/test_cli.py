"""End-to-end CLI on a tiny zoo: `sharpfast run`, its resume, `zoo`/`sweep`/`report`, bad input."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

import sharpfast

from sharpfast.study.cli import main
from sharpfast.study.store import Store

PNG = b"\x89PNG\r\n\x1a\n"


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "sharpfast", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_run_end_to_end_and_resume(tmp_path):
    out = tmp_path / "out"
    r = _cli("run", "--out", str(out), "--zoo-preset", "tiny", "--preset", "quick", "--n-boot", "50",
             "--quiet", "--jobs", "1")
    assert r.returncode == 0, r.stderr
    # the tau table: a header and one line per definition plus baselines, taus in [-1, 1]
    assert "| definition | n | tau test error | tau gen. gap | tau OOD error | Psi |" in r.stdout
    lines = [l for l in r.stdout.splitlines() if l.startswith("| max-") or l.startswith("| avg-")]
    assert len(lines) == 2 * 2            # main table + granulated table, 2 definitions each
    for l in lines[:2]:
        cells = [c.strip() for c in l.strip("|").split("|")]
        assert cells[1] == "8"
        for c in cells[2:5]:
            tau = float(c.split()[0])
            assert -1.0 <= tau <= 1.0
    assert "zoo: trained 8 model(s)" in r.stdout
    assert "computed 16 (16 ok, 0 error)" in r.stdout
    # files: zoo, store, report, plots
    manifest = json.loads((out / "zoo" / "manifest.json").read_text())
    assert len(manifest["models"]) == 8
    assert all(os.path.exists(out / "zoo" / m["checkpoint"]) for m in manifest["models"])
    with Store(str(out / "results.db"), readonly=True) as st:
        assert st.counts() == {"ok": 16}
    assert (out / "report.md").read_text().startswith("# sharpfast report")
    html = (out / "report.html").read_text()
    assert "<table>" in html and html.count("Plotly.newPlot(") == 2   # the tables, a scatter per definition
    pngs = sorted((out / "plots").glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:8] == PNG and p.stat().st_size > 5000 for p in pngs)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and {"test_error", "ood_error", "lr", "sharpness"} <= set(rows[0])
    # rerun: nothing trained, nothing computed, same table
    r2 = _cli("run", "--out", str(out), "--zoo-preset", "tiny", "--preset", "quick", "--n-boot", "50",
              "--quiet", "--jobs", "1")
    assert r2.returncode == 0, r2.stderr
    assert "already present" in r2.stdout and "computed 0 (0 ok, 0 error), 16 already done" in r2.stdout
    table = lambda s: [l for l in s.splitlines() if l.startswith("|")]
    assert table(r2.stdout) == table(r.stdout)


def test_subcommands_in_process(tmp_path, capsys):
    z, store, rep = tmp_path / "z", tmp_path / "r.db", tmp_path / "rep"
    assert main(["zoo", "--out", str(z), "--preset", "tiny", "--epochs", "1", "--jobs", "1", "--quiet"]) == 0
    cfg = tmp_path / "defs.yaml"
    cfg.write_text("definitions:\n  - {kind: avg, norm: l2, rho: [0.05, 0.1], m: 64, n_examples: 128, n_samples: 3}\n")
    assert main(["sweep", "--zoo", str(z), "--store", str(store), "--config", str(cfg), "--quiet", "--jobs", "1",
                 "--kind", "max", "--norm", "linf", "--rho", "0.001", "--m", "64", "--n-iters", "3",
                 "--n-examples", "128"]) == 0
    out = capsys.readouterr().out
    assert "8 checkpoint(s) x 3 definition(s) = 24 row(s); computed 24 (24 ok, 0 error)" in out
    assert main(["report", "--store", str(store), "--out", str(rep), "--n-boot", "0", "--color-by", "batch_size",
                 "--target", "gap"]) == 0
    out = capsys.readouterr().out
    assert "Psi = mean granulated tau vs gen. gap" in out
    assert len(list((rep / "plots").glob("*.png"))) == 3
    # the paper's near-minimum selection keeps only low-train-error models
    from sharpfast.study.analysis.report import build_report
    with Store(str(store), readonly=True) as st:
        train_err = sorted(c["metrics"]["train_error"] for c in st.checkpoints().values())
    cut = train_err[3]
    rsel = build_report(str(store), None, n_boot=0, max_train_error=cut)
    assert rsel.n_checkpoints == sum(e <= cut for e in train_err) < 8
    assert all(ln.n == rsel.n_checkpoints for ln in rsel.lines)
    assert f"train error <= {cut:g}" in rsel.markdown()
    assert main(["definitions", "--preset", "paper"]) == 0
    assert "48 definition(s)" in capsys.readouterr().out
    # --yaml dumps an editable config that parses back to the same definitions
    assert main(["definitions", "--preset", "paper", "--yaml"]) == 0
    dumped = tmp_path / "paper.yaml"
    dumped.write_text(capsys.readouterr().out)
    from sharpfast.study import definitions as D
    assert [d.key for d in D.load_config(str(dumped))] == [d.key for d in D.preset("paper")]


@pytest.mark.parametrize("args, message", [
    (["sweep", "--zoo", "{tmp}/nowhere"], "does not exist"),
    (["sweep", "--zoo", "{zoo}", "--config", "{tmp}/bad.yaml"], "rho must be a positive"),
    (["sweep", "--zoo", "{zoo}", "--kind", "max"], "--kind avg/max/geodesic needs --rho"),
    (["sweep", "--zoo", "{zoo}", "--preset", "nope"], "unknown preset"),
    (["sweep", "--zoo", "{tmp}/badmanifest"], "not valid JSON"),
    (["report", "--store", "{tmp}/none.db"], "does not exist"),
    (["zoo", "--out", "{tmp}/z2", "--preset", "huge"], "unknown zoo preset"),
])
def test_clear_errors(tmp_path, capsys, args, message):
    (tmp_path / "bad.yaml").write_text("definitions: [{kind: max, norm: linf, rho: 0}]")
    (tmp_path / "badmanifest").mkdir()
    (tmp_path / "badmanifest" / "manifest.json").write_text("{oops")
    zdir = tmp_path / "zoo"
    zdir.mkdir()
    (zdir / "manifest.json").write_text(json.dumps({"format": "sharpfast-manifest", "version": 1,
                                                    "data": {"factory": "sharpfast.study.digits:sharpness_data"},
                                                    "models": []}))
    args = [a.format(tmp=tmp_path, zoo=zdir) for a in args]
    assert main(args) == 2                     # an exception other than the clear ones would propagate
    err = capsys.readouterr().err
    assert message in err and f"sharpfast {args[0]}: error:" in err


def test_clear_error_from_the_command_line(tmp_path):
    r = _cli("sweep", "--zoo", str(tmp_path / "nowhere"))
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_console_script():
    exe = shutil.which("sharpfast")
    if exe is None:
        pytest.skip("the sharpfast console script is not installed (pip install -e .)")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for cmd in ("zoo", "sweep", "report", "run"):
        assert cmd in r.stdout


def test_doctor(capsys, monkeypatch):
    from sharpfast import _ops

    if not _ops.available("cpu"):
        pytest.skip("extension not built")
    assert main(["doctor", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"torch {_ops.build_info()['torch']}" in out and "OpenMP" in out
    n_ops = len(sharpfast._ops.build_info()["ops"])
    assert f"self-test on cpu: ok ({n_ops} ops" in out and "apgd_step_l2_" in out and "scaled_gram" in out
    broken = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("invalid device function"))
    monkeypatch.setattr(_ops, "copy_if_", broken)
    assert main(["doctor", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert "FAILED: copy_if_" in captured.out and "invalid device function" in captured.out
    assert "uses the pure-PyTorch reference" in captured.err


def test_curvature_kinds_from_flags(capsys):
    assert main(["definitions", "--kind", "trace", "lambda_max", "--adaptive", "both"]) == 0
    out = capsys.readouterr().out
    assert "4 definition(s)" in out and "trace-hessian-standard" in out and "lambda_max-hessian-adaptive" in out
    assert main(["definitions", "--preset", "curvature"]) == 0
    assert "renyi-ggn-standard" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--kind", "geodesic", "--rho", "0.1", "--norm", "linf"],
     "--norm is for --kind avg/max: --kind geodesic does not take it (geodesic sharpness is a ball of the l2 norm"),
    (["--kind", "avg", "--rho", "0.1", "--solver", "scaled"], "--solver is for --kind max: --kind avg does not take it"),
    (["--kind", "max", "--rho", "0.1", "--n-samples", "5"], "--n-samples is for --kind avg: --kind max does not"),
    (["--kind", "avg", "--rho", "0.1", "--n-iters", "5"], "--n-iters is for --kind max/geodesic"),
    (["--kind", "max", "--rho", "0.1", "--metric", "inv"], "--metric is for --kind geodesic"),
    (["--kind", "trace", "--rho", "0.1"], "--rho is for --kind avg/max/geodesic: --kind trace does not take it"),
    (["--rho", "0.1"], "--rho is only used with --kind"),
    (["--preset", "quick", "--norm", "l2"], "--norm is only used with --kind"),
    (["--preset", "quick", "--m", "64"], "--m is only used with --kind"),
])
def test_definition_flags_that_would_change_nothing_are_refused(argv, message, capsys):
    assert main(["definitions", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_flag_applies_to_the_given_kinds_that_take_it(capsys):
    assert main(["definitions", "--kind", "max", "geodesic", "--rho", "0.1", "--norm", "linf", "--solver", "scaled"]) == 0
    out = capsys.readouterr().out
    assert "2 definition(s)" in out and "max-linf-adaptive" in out and "geodesic-mix-adaptive" in out


@pytest.mark.parametrize("flag", [["--address", "127.0.0.1:6379"], ["--num-cpus", "2"], ["--cpus-per-task", "2"],
                                  ["--gpus-per-task", "0.5"]])
def test_ray_flags_without_the_ray_executor_are_refused(flag, tmp_path, capsys):
    assert main(["sweep", "--zoo", str(tmp_path / "none"), *flag]) == 2
    assert f"{flag[0]} is for --executor ray" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["report", "--store", "r.db"], ["esd", "--zoo", "z"], ["run"], ["zoo"]])
def test_an_out_that_names_a_file_is_refused_before_any_work(command, tmp_path, capsys):
    existing = tmp_path / "report.txt"
    existing.write_text("kept")
    assert main([*command, "--out", str(existing)]) == 2
    assert f"--out {str(existing)!r} is a file, not a folder" in capsys.readouterr().err
    assert existing.read_text() == "kept"


def test_a_sweep_in_which_rows_failed_exits_with_status_3(tiny_zoo, tmp_path, capsys):
    """A checkpoint whose file is not what the manifest recorded: its rows are stored as errors, the
    others computed, and the exit status says rows failed (``sweep && report`` notices)."""
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    from sharpfast.study.zoo.checkpoints import Manifest
    entry = Manifest.load(str(zoo)).models[0]
    with open(zoo / entry.checkpoint, "ab") as f:
        f.write(b"changed")
    flags = ["--store", str(tmp_path / "r.db"), "--kind", "avg", "--norm", "l2", "--rho", "0.1", "--n-samples", "2",
             "--m", "64", "--n-examples", "128", "--quiet", "--jobs", "1"]
    assert main(["sweep", "--zoo", str(zoo), *flags]) == 3
    err = capsys.readouterr().err
    assert "1 row(s) of this run failed" in err and "exit status 3" in err
    assert main(["sweep", "--zoo", str(zoo), *flags, "--no-retry-errors"]) == 0   # nothing failed this time


def test_definitions_print_the_keys_a_sweep_on_the_zoo_stores(tiny_zoo, tmp_path, capsys):
    """The tiny zoo's data hold 256 examples: the default preset's 512 are fitted by the sweep, and
    `definitions --zoo` prints the keys it stores (which the rows carry)."""
    assert main(["definitions", "--preset", "default"]) == 0
    plain = capsys.readouterr().out
    assert "`sharpfast definitions --zoo ZOO` prints those" in plain
    assert main(["definitions", "--preset", "default", "--zoo", tiny_zoo]) == 0
    fitted = capsys.readouterr().out
    assert "as a sweep on" in fitted and "use 256" in fitted
    keys = lambda text: {line.split()[0] for line in text.splitlines() if line.startswith("  ")}
    store = str(tmp_path / "r.db")
    assert main(["sweep", "--zoo", tiny_zoo, "--store", store, "--preset", "default", "--limit", "1", "--quiet",
                 "--jobs", "1"]) == 0
    with Store(store, readonly=True) as st:
        stored = {r.definition_key for r in st.rows()}
    assert stored == keys(fitted) and not stored & keys(plain)


def test_a_ray_address_where_nothing_listens_is_refused_at_once(tiny_zoo, tmp_path, capsys):
    """Ray retries a wrong --address for minutes: the sweep checks that something accepts a
    connection there first (a port just freed on this machine: refused at once)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["sweep", "--zoo", tiny_zoo, "--store", str(tmp_path / "r.db"), "--executor", "ray", "--preset", "quick",
            "--quiet"]
    assert main([*argv, "--address", f"127.0.0.1:{port}"]) == 2
    assert f"no Ray cluster answers at '127.0.0.1:{port}'" in capsys.readouterr().err
    assert main([*argv, "--address", "nowhere"]) == 2
    assert "is not host:port, ray://host:port or auto" in capsys.readouterr().err


def test_importing_sharpfast_loads_no_torch_and_an_interrupt_while_torch_loads_is_said(monkeypatch, capsys):
    """The package's names load on first use, so the command's entry point runs before torch loads
    and a Ctrl-C in those seconds ends with the command's own message, not a traceback."""
    import types
    out = subprocess.run([sys.executable, "-c", "import sys, sharpfast; print('torch' in sys.modules, "
                          "sharpfast.WorstCaseSettings.__name__, 'torch' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "WorstCaseSettings", "True"]

    class Loading(types.ModuleType):   # the command line's module, interrupted while it loads
        def __getattr__(self, name):
            raise KeyboardInterrupt
    monkeypatch.setitem(sys.modules, "sharpfast.study.cli", Loading("sharpfast.study.cli"))
    from sharpfast.__main__ import main as entry
    assert entry() == 130
    assert capsys.readouterr().err == "sharpfast: interrupted; rerun to resume\n"
