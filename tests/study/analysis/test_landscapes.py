"""`sharpfast landscape`: the chosen checkpoints' landscapes, and the report's section that puts
their curvature along each direction beside their sharpness values."""
import json

import numpy as np
import pytest

import sharpfast
from sharpfast.study.cli import main
from sharpfast.study.definitions import Definition
from sharpfast.study.sweep import run_sweep
from sharpfast.study.zoo.checkpoints import Manifest, load_model


def test_landscapes_of_the_best_and_worst_checkpoints_in_the_report(tiny_zoo, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["landscape", "--zoo", tiny_zoo, "--out", str(out), "--x", "-0.2", "0.2", "5", "--y", "-0.2", "0.2",
                 "3", "--n-examples", "128", "--m", "64"]) == 0
    summary = json.loads((out / "landscapes.json").read_text())
    m = Manifest.load(tiny_zoo)
    ranked = sorted(m.models, key=lambda e: e.metrics["test_error"])
    assert [s["id"] for s in summary] == [ranked[0].id, ranked[-1].id]
    for s in summary:
        assert (out / s["files"][0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(s["curvature"]) == 2
    # the numbers are the public function's on the zoo's sharpness examples
    x, y = m.sharpness_data(128)
    direct = sharpfast.landscape(load_model(m, ranked[0]), [(x[:64], y[:64]), (x[64:], y[64:])], x=(-0.2, 0.2, 5),
                                 y=(-0.2, 0.2, 3))
    assert summary[0]["base_loss"] == pytest.approx(direct.base_loss)
    assert summary[0]["curvature"][0] == pytest.approx(direct.curvature_along(0))

    d = Definition.from_dict(dict(kind="max", norm="linf", rho=0.002, n_iters=2, m=64, n_examples=128))
    store = str(tmp_path / "r.db")
    run_sweep(m, [d], store, progress=False)
    assert main(["report", "--store", store, "--out", str(out), "--n-boot", "0"]) == 0
    md = (out / "report.md").read_text()
    section = md[md.index("## Loss landscapes"):]
    assert "d1^T H d1" in section and d.name in section and ranked[-1].id in section
    row = next(line for line in section.splitlines() if line.startswith(f"| {ranked[0].id} "))
    assert f"{summary[0]['base_loss']:.4g}" in row
    page = (out / "report.html").read_text()
    assert "Loss landscapes" in page and "data:image/png;base64," in page
    assert main(["landscape", "--zoo", tiny_zoo, "--out", str(out), "--x", "-1", "1", "2.5"]) == 2
    assert np.isfinite(summary[1]["base_loss"])
