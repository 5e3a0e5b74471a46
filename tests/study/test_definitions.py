"""Definitions: one class per kind, keys that never change, presets, configs."""
import hashlib

import pytest

import sharpfast
from sharpfast.settings import ApgdSettings
from sharpfast.study import definitions as D
from sharpfast.study.definitions import ConfigError, Definition


def test_a_definition_is_built_as_the_class_of_its_kind():
    assert type(Definition("avg", "l2", 0.1)) is D.AverageCase
    assert type(Definition("max", "linf", 0.002)) is D.WorstCase
    assert type(Definition("geodesic", rho=0.5)) is D.Geodesic
    assert {type(Definition(k)) for k in D.CURVATURE_KINDS} == {D.Curvature}
    assert type(Definition("measure", measure="path-norm")) is D.Measure
    assert Definition("max", "l2", 0.5) == D.WorstCase(norm="l2", rho=0.5)
    # a setting another kind takes is ignored (one config's defaults serve every kind); none takes "rh"
    assert not hasattr(Definition("avg", "l2", 0.1, n_iters=0), "n_iters")
    with pytest.raises(TypeError, match="unknown field"):
        Definition("avg", "l2", 0.1, rh=2)
    with pytest.raises(ConfigError, match="kind must be one of"):
        Definition("mx", "l2", 0.1)
    with pytest.raises(ConfigError, match="'measure' is for kind 'measure'"):
        Definition("max", "l2", 0.1, measure="path-norm")


def test_defaults_are_the_cores():
    w, a, g = Definition("max", "l2", 0.5), Definition("avg", "l2", 0.5), Definition("geodesic", rho=0.5)
    core = ApgdSettings.__dataclass_fields__
    assert (w.n_iters, w.n_restarts, w.step_size_mult) == tuple(core[f].default for f in
                                                                ("n_iters", "n_restarts", "step_size_mult"))
    assert a.n_samples == sharpfast.AverageCaseSettings(rho=0.5, norm="l2").n_samples
    core_geodesic = sharpfast.GeodesicSettings(rho=0.5)
    assert (g.metric, g.eps, g.second_order) == (core_geodesic.metric, core_geodesic.eps, core_geodesic.second_order)
    assert w.settings().describe() == sharpfast.WorstCaseSettings(rho=0.5, norm="l2").describe()


def test_the_presets_keys_and_names_never_change():
    """Stores written by earlier versions are reused only while the keys stay: every preset's keys
    and names, as they have been since the presets existed."""
    keys = [d.key for p in sorted(D.PRESETS) for d in D.preset(p)]
    names = [d.name for p in sorted(D.PRESETS) for d in D.preset(p)]
    assert len(keys) == 119
    assert hashlib.sha256(" ".join(keys).encode()).hexdigest()[:16] == "79d95a1c8fb4f722"
    assert hashlib.sha256("|".join(names).encode()).hexdigest()[:16] == "aff85286d979d62b"


def test_replace_goes_through_the_kind():
    d = Definition("trace", m=64)
    assert d.replace(n_examples=128, n_iters=5).n_examples == 128   # n_iters: not a curvature setting
    assert D.with_overrides([d, Definition("max", "l2", 0.5)], n_examples=256)[1].n_examples == 256


def test_paper_preset_is_the_published_grid():
    defs = D.preset("paper")
    assert len(defs) == 48 and len({d.key for d in defs}) == 48
    fam = {}
    for d in defs:
        fam.setdefault(d.family, []).append(d.rho)
        assert (d.m, d.n_examples) == (128, 1024)
        assert (d.n_iters, d.rand_init) == (20, False) if d.kind == "max" else d.n_samples == 20
    assert len(fam) == 12 and all(len(v) == 4 for v in fam.values())
    assert sorted(fam["max-linf-standard m=128 n_examples=1024"]) == [0.0005, 0.001, 0.002, 0.004]
    assert sorted(fam["max-linf-adaptive-lognorm m=128 n_examples=1024"]) == [0.001, 0.002, 0.004, 0.008]
    assert sorted(fam["avg-l2-adaptive m=128 n_examples=1024"]) == [0.05, 0.1, 0.2, 0.4]
    assert len(D.preset("default")) >= 4


def test_definition_keys():
    a = Definition("max", "linf", 0.002)
    assert a.key == Definition("max", "linf", 0.002, n_samples=99).key      # irrelevant for max
    assert a.key != Definition("max", "linf", 0.002, n_iters=21).key
    assert a.key != Definition("max", "linf", 0.004).key
    assert Definition("avg", "l2", 0.1, normalize_logits=True).normalize_logits == "norm"
    settings = Definition("avg", "l2", 0.1, n_samples=7).settings()
    assert isinstance(settings, sharpfast.AverageCaseSettings) and settings.n_samples == 7
    worst = Definition("max", "l2", 0.1, n_iters=9, rand_init=True, n_restarts=2).settings("reference")
    assert isinstance(worst, sharpfast.WorstCaseSettings) and (worst.n_iters, worst.n_restarts) == (9, 2)
    assert worst.backend == "reference" and worst.norm == "l2" and worst.rho == 0.1


def test_yaml_and_toml_configs(tmp_path):
    y = tmp_path / "d.yaml"
    y.write_text("defaults: {m: 64, n_examples: 128}\n"
                 "definitions:\n"
                 "  - {kind: max, norm: linf, adaptive: true, normalize_logits: true, rho: [0.001, 0.002]}\n"
                 "  - {kind: avg, norm: l2, rho: 0.1, n_samples: 5}\n")
    t = tmp_path / "d.toml"
    t.write_text("[defaults]\nm = 64\nn_examples = 128\n\n"
                 "[[definitions]]\nkind = 'max'\nnorm = 'linf'\nadaptive = true\nnormalize_logits = true\n"
                 "rho = [0.001, 0.002]\n\n"
                 "[[definitions]]\nkind = 'avg'\nnorm = 'l2'\nrho = 0.1\nn_samples = 5\n")
    dy, dt = D.load_config(str(y)), D.load_config(str(t))
    assert [d.key for d in dy] == [d.key for d in dt]
    assert len(dy) == 3 and dy[0].normalize_logits == "norm" and dy[2].n_samples == 5 and dy[2].m == 64
    p = tmp_path / "p.yaml"
    p.write_text("preset: paper\ndefaults: {n_examples: 512}\n")
    assert len(D.load_config(str(p))) == 48


@pytest.mark.parametrize("text, message", [
    ("definitions: [{kind: max, norm: linf, rho: -1}]", "rho must be a positive"),
    ("definitions: [{kind: mx, norm: linf, rho: 1}]", "kind must be one of"),
    ("definitions: [{kind: max, norm: l3, rho: 1}]", "norm must be one of"),
    ("definitions: [{kind: max, norm: linf, rho: 1, rh: 2}]", "unknown field"),
    ("definitions: [{kind: max, norm: linf}]", "missing field"),
    ("definitions: [{kind: max, norm: linf, rho: 1, m: 100, n_examples: 512}]", "multiple of m"),
    ("definitions: [{kind: max, norm: linf, rho: 1, n_iters: 0}]", "positive integer"),
    ("definitions: [{kind: max, norm: linf, rho: 1, normalize_logits: maybe}]", "normalize_logits"),
    ("preset: nope", "unknown preset"),
    ("foo: 1", "unknown top-level key"),
    ("definitions: []", "no definitions"),
    ("definitions: [1, 2", "cannot be parsed"),
])
def test_bad_configs(tmp_path, text, message):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        D.load_config(str(p))


def test_config_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        D.load_config(str(tmp_path / "none.yaml"))
    (tmp_path / "x.ini").write_text("a=1")
    with pytest.raises(ConfigError, match="unknown extension"):
        D.load_config(str(tmp_path / "x.ini"))
