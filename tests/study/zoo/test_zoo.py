"""digits / digits-C and the built-in zoo: determinism, metrics, resumable training."""
import json
import os

import pytest
import torch

from sharpfast.study import zoo
from sharpfast.study.zoo import digits
from sharpfast.study.zoo.checkpoints import Manifest, load_model
from tests.helpers import DATA_DIR


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_digits_split_is_deterministic_and_disjoint():
    x, y, xt, yt = digits.split(300)
    x2, y2, _, _ = digits.split(300)
    assert x.shape == (300, 1, 8, 8) and xt.shape == (digits.DEFAULT_N_TEST, 1, 8, 8)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert set(y.tolist()) == set(range(10))
    flat = {tuple(v.flatten().tolist()) for v in x}
    assert not any(tuple(v.flatten().tolist()) in flat for v in xt[:200])  # train/test disjoint
    with pytest.raises(ValueError, match="n_train"):
        digits.split(5000)


def test_digits_c_corruptions():
    _, _, xt, _ = digits.split(100)
    c = digits.corrupted_test_sets(xt)
    assert list(c) == list(digits.CORRUPTIONS)
    again = digits.corrupted_test_sets(xt)
    for kind, xc in c.items():
        assert xc.shape == xt.shape
        assert torch.equal(xc, again[kind])                       # seeded
        assert not torch.allclose(xc, xt), kind                   # really corrupted
        assert float(xc.min()) >= 0.0 and float(xc.max()) <= 1.0 + 1e-6
    # a shift moves mass but keeps the pixels it does not push off the 8x8 canvas
    assert float(c["shift"].sum()) <= float(xt.sum())
    with pytest.raises(ValueError, match="unknown corruption"):
        digits.corrupt(xt, "snow")


def test_factories_shapes():
    x = torch.rand(5, 1, 8, 8)
    assert zoo.mlp(width=8)(x).shape == (5, 10)
    assert zoo.cnn(width=4)(x).shape == (5, 10)
    vit = zoo.vit(width=16)
    assert vit(x).shape == (5, 10)
    # 2x2 patches: 16 tokens; the classifier depends on every patch, not on the pixel order within one
    assert vit.pos.shape == (1, 16, 16)
    with pytest.raises(ValueError, match="multiple of patch"):
        zoo.ViT(dim=16, patch=3)


def test_vit_sharpness_and_curvature_on_both_backends():
    """The zoo's ViT through the measures: fused = reference (float64) and a finite Hessian trace."""
    import sharpfast
    torch.manual_seed(0)
    model = zoo.vit(width=16).double().eval()
    x, y = torch.rand(32, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (32,))
    for kw in (dict(norm="linf", rho=0.002), dict(norm="l2", rho=0.1, solver="scaled")):
        ref = sharpfast.worst_case_sharpness(model, [(x, y)], n_iters=5, backend="reference", **kw)
        fused = sharpfast.worst_case_sharpness(model, [(x, y)], n_iters=5, backend="fused", **kw)
        assert fused.sharpness == pytest.approx(ref.sharpness, rel=1e-9) and ref.sharpness > 0
    tr = sharpfast.hessian_trace(model, [(x, y)], n_probes=6)
    assert torch.isfinite(torch.tensor(tr.value)) and tr.stderr >= 0


def test_initial_weights_and_trajectory_facts_are_recorded(tmp_path, one_thread):
    cfg = dict(zoo.DEFAULT_TRAIN, arch="vit", width=32, epochs=2, n_train=128, batch_size=64)
    m = zoo.build_zoo(str(tmp_path), zoo.ZooSpec({"lr": [2.0]}, {k: v for k, v in cfg.items() if k != "lr"}),
                      progress=False, log=lambda s: None)
    entry = m.models[0]
    assert entry.factory == "sharpfast.study.zoo:vit" and entry.init_checkpoint.endswith(".init.safetensors")
    initial, trained = load_model(m, entry, initial=True), load_model(m, entry)
    want = zoo.initialized(dict(cfg, lr=2.0))
    for a, b in zip(initial.state_dict().values(), want.state_dict().values()):
        assert torch.equal(a, b)                                          # the weights training started from
    assert any(not torch.equal(a, b) for a, b in zip(initial.state_dict().values(), trained.state_dict().values()))
    assert entry.metrics["train_steps"] == 2 * 2                          # 2 epochs of 128 / 64 steps
    assert "steps_to_loss_0.1" not in entry.metrics                       # 4 steps do not get there
    # a longer run gets there, at an epoch's end, counted in steps
    _, met = zoo.train(dict(zoo.DEFAULT_TRAIN, width=64, epochs=40, n_train=128, batch_size=32))
    assert met["train_steps"] == 160 and met["steps_to_loss_0.1"] % 4 == 0 and met["steps_to_loss_0.1"] <= 160
    # a zoo trained before init checkpoints existed says so by name
    old = Manifest.load(os.path.join(DATA_DIR, "zoo_v0_1"))
    with pytest.raises(Exception, match="no init_checkpoint"):
        load_model(old, old.models[0], initial=True)


def test_training_is_deterministic_and_learns(one_thread):
    aug = dict(zoo.DEFAULT_TRAIN, width=16, epochs=2, n_train=128, augment=True)
    (a1, ma1), (a2, ma2) = zoo.train(aug), zoo.train(aug)
    for a, b in zip(a1.state_dict().values(), a2.state_dict().values()):
        assert torch.equal(a, b)                                          # seeded augmentation too
    assert ma1 == ma2
    cfg = dict(zoo.DEFAULT_TRAIN, width=32, epochs=15, n_train=256)
    m1, met1 = zoo.train(cfg)
    assert met1["train_error"] < 0.3 and met1["test_error"] < 0.4        # far better than chance (0.9)
    assert met1["gap"] == pytest.approx(met1["test_error"] - met1["train_error"])
    assert met1["ood_error"] == pytest.approx(sum(met1[f"ood_error_{k}"] for k in digits.CORRUPTIONS) / 4)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_stack_trains_each_model_as_if_alone(one_thread, optimizer):
    """Models trained together get their own learning rate, weight decay, augmentation and seed:
    each comes out bit for bit as trained alone (no gradient, step or draw leaks across)."""
    spec = zoo.ZooSpec({"lr": [0.5, 2.0], "weight_decay": [0.0, 5e-3], "augment": [False, True], "seed": [0, 1]},
                       {"arch": "vit", "width": 8, "epochs": 2, "n_train": 64, "batch_size": 32, "optimizer": optimizer})
    cfgs = spec.configs()[::3]   # 6 of the 16: every factor varies
    together = zoo.train_stack(cfgs)
    for cfg, (model, metrics) in zip(cfgs, together):
        alone, alone_metrics = zoo.train(cfg)
        for a, b in zip(model.state_dict().values(), alone.state_dict().values()):
            assert torch.equal(a, b)
        assert metrics == alone_metrics
    assert len({float(m.state_dict()["head.weight"].sum()) for m, _ in together}) == len(cfgs)   # all differ
    with pytest.raises(ValueError, match="differ only in lr, weight_decay, augment, seed, sam_rho"):
        zoo.train_stack([cfgs[0], dict(cfgs[1], batch_size=16)])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sam_trained_models_in_a_stack_are_as_if_alone(one_thread, optimizer):
    """sam_rho is a factor of the grid: each model of a stack has its own SAM (its ascent from its
    own gradient's norm), bit for bit as trained alone; sam_rho = 0 beside SAM models is plain
    training, bit for bit."""
    spec = zoo.ZooSpec({"sam_rho": [0.0, 0.05, 0.2], "lr": [0.5, 2.0]},
                       {"arch": "mlp", "width": 8, "epochs": 2, "n_train": 64, "batch_size": 32, "optimizer": optimizer})
    cfgs = spec.configs()
    together = zoo.train_stack(cfgs)
    for cfg, (model, metrics) in zip(cfgs, together):
        alone, alone_metrics = zoo.train(cfg)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), alone.state_dict().values()))
        assert metrics == alone_metrics
        if cfg["sam_rho"] == 0.0:   # and the plain trainer (a configuration without sam_rho)
            plain, _ = zoo.train({k: v for k, v in cfg.items() if k != "sam_rho"})
            assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    assert len({float(sum(v.double().sum() for v in m.state_dict().values())) for m, _ in together}) == len(cfgs)


def test_zoo_names_made_before_sam_rho_stay_and_the_sam_preset_names_it():
    """Configurations hold sam_rho only where a grid sets it: every built-in preset's names are
    the ones they had before it existed."""
    import hashlib
    ids = [zoo.config_id(c) for p in ("default", "full", "tiny") for c in zoo.ZOO_PRESETS[p].configs()]
    assert hashlib.sha256(" ".join(ids).encode()).hexdigest()[:16] == "f60076a2b5d2d6ba"
    sam = zoo.ZOO_PRESETS["sam"].configs()
    assert len(sam) == 48 and {c["sam_rho"] for c in sam} == {0.0, 0.05, 0.1, 0.2}
    assert all(f"-sam{c['sam_rho']:g}-" in zoo.config_id(c) for c in sam)


def test_stacks_of_the_default_zoo():
    stacks = zoo.stacks_of(zoo.ZOO_PRESETS["default"].configs())
    assert len(stacks) == 12 and {len(s) for s in stacks} == {8}   # arch x batch size x width; lr x wd x aug
    for s in stacks:
        assert len({zoo.stack_key(c) for c in s}) == 1


def test_config_ids_unique_over_the_presets():
    for spec in zoo.ZOO_PRESETS.values():
        ids = [zoo.config_id(c) for c in spec.configs()]
        assert len(set(ids)) == len(ids)
    assert len(zoo.ZOO_PRESETS["default"].configs()) >= 24


def test_build_zoo_is_resumable(tmp_path):
    spec = zoo.ZooSpec({"lr": [0.5, 2.0]}, {"epochs": 1, "n_train": 128, "width": 8})
    logs = []
    threads = torch.get_num_threads()
    m = zoo.build_zoo(str(tmp_path), spec, progress=False, log=logs.append)
    assert torch.get_num_threads() == threads            # no side effect on the caller
    assert len(m.models) == 2 and "trained 2 model(s)" in logs[-1]
    raw = json.loads((tmp_path / "manifest.json").read_text())
    e = raw["models"][0]
    assert e["factory"] == "sharpfast.study.zoo:mlp" and e["checkpoint"].endswith(".safetensors")
    assert {"train_error", "train_loss", "test_error", "test_loss", "ood_error", "gap"} <= set(e["metrics"])
    assert e["hparams"]["lr"] == 0.5 and len(e["sha256"]) == 64
    assert e["training"] == {"trainer": "stacked", "stack": 2, "threads": 1, "torch": torch.__version__}
    mtime = os.path.getmtime(tmp_path / e["checkpoint"])
    m2 = zoo.build_zoo(str(tmp_path), spec, progress=False, log=logs.append)
    assert "already present" in logs[-1] and [x.id for x in m2.models] == [x.id for x in m.models]
    assert os.path.getmtime(tmp_path / e["checkpoint"]) == mtime
    # a lost checkpoint is retrained; the loaded model reproduces the manifest's test error
    os.remove(tmp_path / e["checkpoint"])
    zoo.build_zoo(str(tmp_path), spec, progress=False, log=logs.append)
    assert "trained 1 model(s)" in logs[-1]
    man = Manifest.load(str(tmp_path))
    model = load_model(man, man.models[0])
    _, _, xt, yt = digits.split(128)
    err, _ = zoo.evaluate(model, xt, yt)
    assert err == man.models[0].metrics["test_error"]


def test_parallel_training_is_bit_identical(tmp_path):
    spec = zoo.ZooSpec({"lr": [0.5, 2.0], "augment": [False, True]},
                       {"epochs": 1, "n_train": 128, "width": 8})
    a = zoo.build_zoo(str(tmp_path / "a"), spec, jobs=1, progress=False, log=lambda s: None)
    b = zoo.build_zoo(str(tmp_path / "b"), spec, jobs=2, progress=False, log=lambda s: None)
    assert [m.id for m in a.models] == [m.id for m in b.models]          # manifest order = grid order
    assert [m.sha256 for m in a.models] == [m.sha256 for m in b.models]  # same bytes on disk
    assert [m.metrics for m in a.models] == [m.metrics for m in b.models]


def test_zoo_grid_file(tmp_path):
    from sharpfast.study.cli import main

    g = tmp_path / "grid.yaml"
    g.write_text("factors: {lr: [0.5, 1.0]}\nfixed: {epochs: 1, n_train: 64, width: 4, arch: cnn}\n")
    assert main(["zoo", "--out", str(tmp_path / "z"), "--grid", str(g), "--jobs", "1", "--quiet"]) == 0
    m = Manifest.load(str(tmp_path / "z"))
    assert [e.hparams["lr"] for e in m.models] == [0.5, 1.0]
    assert all(e.factory == "sharpfast.study.zoo:cnn" and e.kwargs == {"width": 2} for e in m.models)
    g.write_text("factors: {momentum: [0.9]}\n")
    assert main(["zoo", "--out", str(tmp_path / "z2"), "--grid", str(g), "--quiet"]) == 2
