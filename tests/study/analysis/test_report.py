"""The report on stores a user's zoo gives: targets the zoo does not record, statistics that cannot
be informative on it (one run per setting), and the numbers it shows beside the stats module's."""
import math

import numpy as np
import pytest

from sharpfast.study.analysis import stats
from sharpfast.study.definitions import Definition
from sharpfast.study.analysis.report import build_report
from sharpfast.study.store import Store

PNG = b"\x89PNG\r\n\x1a\n"
DEFINITION = Definition.from_dict(dict(kind="max", norm="linf", rho=0.0005, n_iters=3, m=32, n_examples=64))


def write_store(path, models, values):
    """A store of one definition: ``models`` are (id, hparams, metrics), ``values`` its sharpness."""
    with Store(str(path)) as st:
        st.put_definitions([DEFINITION])
        for (cid, hparams, metrics), v in zip(models, values):
            st.put_results(dict(checkpoint_id=cid, sha256=None, factory="f", hparams=hparams, metrics=metrics),
                           [dict(checkpoint_id=cid, definition_key=DEFINITION.key, status="ok", value=v,
                                 per_batch=[v], time_s=0.0)])
    return str(path)


def test_a_zoo_that_records_only_the_test_error_gets_a_report(tmp_path):
    """Four BERTs of a user's table with test_error only: no gap or OOD columns or panels (which had
    no points and crashed matplotlib's log axis), and the report says what it left out."""
    models = [(f"bert-{i}", {"lr": lr, "seed": s}, {"test_error": e})
              for i, (lr, s, e) in enumerate([(1e-4, 0, 0.2), (3e-4, 0, 0.25), (1e-4, 1, 0.22), (3e-4, 1, 0.3)])]
    store = write_store(tmp_path / "r.db", models, [0.01, 0.5, 0.02, 2.0])   # spread > 20x: a log axis
    r = build_report(store, str(tmp_path / "out"), n_boot=20)
    text = r.markdown()
    assert r.targets == ["test_error"]
    assert "| definition | n | tau test error | Psi |" in text
    assert "gen. gap" not in text.split("\n")[2] and "Not recorded by this zoo, so left out: gen. gap, OOD error." in text
    png = [f for f in r.files if f.endswith(".png")]
    assert len(png) == 1 and open(png[0], "rb").read(8) == PNG
    assert "Not recorded by this zoo" in open(tmp_path / "out" / "report.html").read()


def test_a_target_the_zoo_does_not_record_falls_back_and_says_so(tmp_path):
    models = [(f"m{i}", {"lr": i % 2, "width": i // 2}, {"test_error": 0.1 * i}) for i in range(4)]
    store = write_store(tmp_path / "r.db", models, [1.0, 2.0, 3.0, 5.0])
    r = build_report(store, None, target="ood_error", n_boot=0)
    assert r.target == "test_error" and "does not record the OOD error" in r.markdown()
    none = write_store(tmp_path / "none.db", [(m[0], m[1], {}) for m in models], [1.0, 2.0, 3.0, 5.0])
    assert "records no target" in build_report(none, str(tmp_path / "none"), n_boot=0).markdown()


def test_sign_error_left_out_with_its_reason_where_each_setting_has_one_run(tmp_path):
    """One seed per configuration: every environment has one pair of runs, an effective sample size
    of 1 < 12, so no sign-error can be measured; the report says why instead of a column of 1.00."""
    grid = [(lr, w, d) for lr in (1, 2, 3) for w in (1, 2) for d in (1, 2)]
    models = [(f"m{i:02d}", {"lr": lr, "width": w, "depth": d, "seed": 0}, {"test_error": 0.1 * lr + 0.01 * w + 0.03 * d})
              for i, (lr, w, d) in enumerate(grid)]
    store = write_store(tmp_path / "r.db", models, [lr + 0.5 * w - 0.2 * d for lr, w, d in grid])
    text = build_report(store, None, n_boot=0).markdown()
    assert "sign-err robust" not in text and "The robust sign-error is left out" in text
    assert "effective sample size of 12" in text and "the largest here is 1.0" in text
    assert "| Psi | CMI |" in text    # three hyperparameters vary: conditioned on two, the third is left
    # two hyperparameters and one model per setting: conditioned on both, nothing is left to explain
    two = write_store(tmp_path / "two.db", [(c, {k: h[k] for k in ("lr", "width")}, m) for c, h, m in models
                                            if h["depth"] == 1], [1.0, 3.0, 2.0, 4.0, 6.0, 5.0])
    text = build_report(two, None, n_boot=0).markdown()
    assert "CMI" not in text and "The conditional mutual information score is left out" in text


def test_report_statistics_are_the_stats_modules(tmp_path):
    """Five seeds per setting: the sign-error is measured and shown, equal to robust_sign_error's."""
    rng = np.random.default_rng(0)
    hp = [{"lr": lr, "width": w, "seed": s} for lr in (1, 2) for w in (1, 2) for s in range(5)]
    target = [0.05 * h["lr"] + 0.03 * h["width"] + 0.002 * rng.normal() for h in hp]
    values = [t + 0.01 * rng.normal() for t in target]
    models = [(f"m{i}", h, {"test_error": t, "n_test": 10000}) for i, (h, t) in enumerate(zip(hp, target))]
    store = write_store(tmp_path / "r.db", models, values)
    r = build_report(store, None, n_boot=0, n_test=10000)
    line = r.lines[0]
    ids = sorted(m[0] for m in models)
    order = [int(c[1:]) for c in ids]
    want = stats.robust_sign_error([values[i] for i in order], [target[i] for i in order], [hp[i] for i in order],
                                   n_test=10000)
    assert line.sign_error.robust == want.robust and want.n_environments > 0 and not math.isnan(want.robust)
    assert f"{want.robust:.2f} / {want.mean:.2f}" in r.markdown()
    assert line.granulated.psi == pytest.approx(stats.granulated_tau([values[i] for i in order],
                                                                     [target[i] for i in order],
                                                                     [hp[i] for i in order]).psi)


def test_geodesic_rows_out_of_the_maps_domain_are_counted(tmp_path):
    """A geodesic row keeps ``geodesic_correction``; the report counts those above 1 per definition."""
    geo = Definition.from_dict(dict(kind="geodesic", metric="mix", rho=0.1, m=32, n_examples=64))
    with Store(str(tmp_path / "r.db")) as st:
        st.put_definitions([geo])
        for i, corr in enumerate([0.2, 3.0, 0.5, 7.5]):
            cid = f"m{i}"
            st.put_results(dict(checkpoint_id=cid, sha256=None, factory="f", hparams={"lr": i},
                                metrics={"test_error": 0.1 * i}),
                           [dict(checkpoint_id=cid, definition_key=geo.key, status="ok", value=float(i),
                                 per_batch=[float(i)], time_s=0.0, geodesic_correction=corr)])
        assert [r.geodesic_correction for r in st.rows()] == [0.2, 3.0, 0.5, 7.5]
    text = build_report(str(tmp_path / "r.db"), None, n_boot=0).markdown()
    assert f"{geo.name}: on 2 of 4 checkpoints the geodesic's second-order term outgrew the step" in text


def test_geodesic_rows_of_models_without_a_gl_block_are_left_out_and_said(tmp_path):
    """Where ``blocks="auto"`` found no GL block the geodesic value is the adaptive worst case: the
    report keeps those rows out of the geodesic definition's statistics and says how many."""
    geo = Definition.from_dict(dict(kind="geodesic", metric="mix", rho=0.1, m=32, n_examples=64))
    inv = Definition.from_dict(dict(kind="geodesic", metric="inv", rho=0.1, m=32, n_examples=64))
    with Store(str(tmp_path / "r.db")) as st:
        st.put_definitions([geo, inv])
        for i, blocks in enumerate([4, 0, 4, 0, 4, None]):   # None: a row stored before gl_blocks was kept
            cid = f"m{i}"
            st.put_results(dict(checkpoint_id=cid, sha256=None, factory="f", hparams={"lr": i},
                                metrics={"test_error": 0.1 * i}),
                           [dict(checkpoint_id=cid, definition_key=geo.key, status="ok", value=float(i),
                                 per_batch=[float(i)], time_s=0.0, geodesic_correction=0.0, gl_blocks=blocks),
                            dict(checkpoint_id=cid, definition_key=inv.key, status="ok", value=float(i),
                                 per_batch=[float(i)], time_s=0.0, geodesic_correction=0.0, gl_blocks=0)])
    report = build_report(str(tmp_path / "r.db"), None, n_boot=0)
    assert {ln.name: ln.n for ln in report.lines if ln.key == geo.key} == {geo.name: 4}
    assert not any(ln.key == inv.key for ln in report.lines)
    text = report.markdown()
    assert f"{geo.name}: 2 checkpoint(s) without a GL block left out" in text
    assert f"Left out, no checkpoint has a GL block: {inv.name} (6 rows" in text


def test_an_empty_store_and_a_filter_that_removes_every_model_say_what_happened(tmp_path):
    """Neither is a zoo without targets: an empty store says it holds no results, a train-error
    filter that keeps nothing says so with the lowest train error the store holds."""
    models = [(f"m{i}", {"lr": i % 2, "width": i // 2}, {"test_error": 0.3, "train_error": 0.8 - 0.1 * i})
              for i in range(4)]
    store = write_store(tmp_path / "r.db", models, [1.0, 2.0, 3.0, 5.0])
    text = build_report(store, None, n_boot=0, max_train_error=0.01).markdown()
    assert "no checkpoint has a train error <= 0.01 (the store holds 4, the lowest train error 0.5)" in text
    assert "records no target" not in text
    with Store(str(tmp_path / "empty.db")):
        pass
    text = build_report(str(tmp_path / "empty.db"), None, n_boot=0).markdown()
    assert "the store holds no results yet" in text and "records no target" not in text


def test_architectures_at_one_level_of_the_colour_differ_by_marker():
    from sharpfast.study.analysis.render import scatter_markers
    hparams = [{"lr": 0.5, "arch": a} for a in ("mlp", "vit", "cnn", "mlp")] + [{"lr": 2.0, "arch": "vit"}]
    markers = scatter_markers(hparams)
    assert set(markers) == {"mlp", "vit", "cnn"} and len(set(markers.values())) == 3
    assert scatter_markers([{"lr": 1}]) == {"": "o"}


def test_the_report_says_what_it_covers_and_how_many_models_are_far_from_a_minimum(tmp_path):
    models = [(f"m{i}", {"lr": i % 2, "arch": "mlp" if i < 3 else "vit", "epochs": 2},
               {"test_error": 0.3 + 0.01 * i, "train_error": 0.005 if i == 0 else 0.8}) for i in range(4)]
    store = write_store(tmp_path / "r.db", models, [1.0, 2.0, 3.0, 5.0])
    with Store(store) as st:
        st.bind_zoo({"factory": "sharpfast.study.digits:sharpness_data", "kwargs": {}}, str(tmp_path), ["m0"])
    text = build_report(store, None, n_boot=0).markdown()
    assert ("3 of 4 checkpoints have a train error above 1% (the lowest 0.005)" in text
            and "`--max-train-error 0.01` restricts the report" in text)
    assert f"Covers 4 checkpoints of the zoo at {tmp_path}, data sharpfast.study.digits:sharpness_data" in text
    assert "architectures mlp (3), vit (1)" in text and "epochs 2 (4)" in text
    assert "OOD error = the mean error over the zoo's shifted test sets" in text and "lognorm" in text
    filtered = build_report(store, None, n_boot=0, max_train_error=0.01).markdown()
    assert "train error above 1%" not in filtered


def test_a_sam_zoos_report_is_coloured_by_the_training_radius(tmp_path):
    """Where sam_rho varies (the sam zoo preset), the scatter plots show sharpness against it."""
    models = [(f"m{i}", {"lr": lr, "sam_rho": rho}, {"test_error": 0.1 + 0.01 * i})
              for i, (lr, rho) in enumerate([(0.5, 0.0), (0.5, 0.1), (2.0, 0.0), (2.0, 0.1)])]
    store = write_store(tmp_path / "r.db", models, [1.0, 0.5, 2.0, 0.7])
    r = build_report(store, None, n_boot=0)
    assert r.color_by == "sam_rho" and "sam_rho" in r.factors
    assert build_report(write_store(tmp_path / "plain.db", [(m[0], {"lr": m[1]["lr"], "width": i}, m[2])
                                                          for i, m in enumerate(models)], [1.0, 0.5, 2.0, 0.7]),
                        None, n_boot=0).color_by == "lr"
