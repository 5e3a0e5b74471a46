"""Manifests and safe checkpoint loading: round trips, corrupt files, malicious pickles, bad manifests."""
import json
import os
import pickle

import pytest
import torch

from sharpfast.study.zoo.checkpoints import (CheckpointError, Manifest, ManifestError, ModelEntry, file_sha256,
                                   import_factory, load_model, load_state_dict, save_state_dict)
from sharpfast.study.zoo import mlp

MARKER = "pwned-marker"


class Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _manifest(tmp_path, entries, data=None):
    raw = {"format": "sharpfast-manifest", "version": 1,
           "data": data or {"factory": "sharpfast.study.digits:sharpness_data", "kwargs": {"n_train": 256}},
           "models": entries}
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps(raw))
    return p


def _saved_mlp(tmp_path, name="m.safetensors", width=8):
    torch.manual_seed(0)
    model = mlp(width=width)
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_state_dict(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), str(path))
    return model, path


@pytest.mark.parametrize("name", ["m.safetensors", "m.pt"])
def test_round_trip(tmp_path, name):
    model, path = _saved_mlp(tmp_path, name)
    p = _manifest(tmp_path, [{"id": "a", "factory": "sharpfast.study.zoo:mlp", "kwargs": {"width": 8},
                              "checkpoint": name, "sha256": file_sha256(str(path)),
                              "hparams": {"lr": 0.1}, "metrics": {"test_error": 0.1}}])
    m = Manifest.load(str(tmp_path))          # a folder finds its manifest.json
    assert [e.id for e in m.models] == ["a"]
    loaded = load_model(m, m.models[0])
    assert not loaded.training
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    x, y = m.sharpness_data(32)
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)
    assert Manifest.load(str(p)).to_dict()["models"][0]["hparams"] == {"lr": 0.1}


def test_corrupt_safetensors_refused(tmp_path):
    _, path = _saved_mlp(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])               # truncated
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_state_dict(str(path))
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_state_dict(str(path))


def test_corrupt_torch_file_refused(tmp_path):
    _, path = _saved_mlp(tmp_path, "m.pt")
    data = path.read_bytes()
    path.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="corrupt or not a torch file"):
        load_state_dict(str(path))


def test_sha256_mismatch_refused(tmp_path):
    _, path = _saved_mlp(tmp_path)
    with pytest.raises(CheckpointError, match="sha256"):
        load_state_dict(str(path), sha256="0" * 64)


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_malicious_pickle_refused_and_never_executed(tmp_path, how):
    marker = tmp_path / MARKER
    path = tmp_path / "evil.pt"
    payload = {"0.weight": torch.zeros(2), "evil": Evil(str(marker))}
    if how == "torch.save":
        torch.save(payload, str(path))
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    # sanity: a plain unpickle really would run the command
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refusing to load") as exc:
        load_state_dict(str(path))
    assert "never unpickles arbitrary objects" in str(exc.value)
    assert not marker.exists(), "the malicious pickle ran code"
    # through a manifest and the sweep's loader too
    m = Manifest.load(str(_manifest(tmp_path, [{"id": "evil", "factory": "sharpfast.study.zoo:mlp",
                                                 "kwargs": {"width": 8}, "checkpoint": "evil.pt"}])))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(m, m.models[0])
    assert not marker.exists()


def test_the_payload_is_really_malicious(tmp_path):
    """Guard against a vacuous test: the same bytes *do* execute under an unrestricted unpickle."""
    marker = tmp_path / MARKER
    blob = pickle.dumps({"evil": Evil(str(marker))})
    pickle.loads(blob)
    assert marker.exists()


def test_state_dict_mismatch(tmp_path):
    _saved_mlp(tmp_path, width=8)
    m = Manifest.load(str(_manifest(tmp_path, [{"id": "a", "factory": "sharpfast.study.zoo:mlp",
                                                 "kwargs": {"width": 16}, "checkpoint": "m.safetensors"}])))
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_model(m, m.models[0])


def test_missing_checkpoint_and_unknown_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(str(tmp_path / "nope.safetensors"))
    (tmp_path / "m.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown file type"):
        load_state_dict(str(tmp_path / "m.npz"))


@pytest.mark.parametrize("mutate, message", [
    (lambda raw: "not json {", "not valid JSON"),
    (lambda raw: {**raw, "format": "other"}, "'format' must be"),
    (lambda raw: {**raw, "version": 99}, "unsupported version"),
    (lambda raw: {**raw, "models": {}}, "'models' must be a list"),
    (lambda raw: {**raw, "data": {}}, "'data' must be an object"),
    (lambda raw: {**raw, "models": [{"factory": "a.b:c", "checkpoint": "x"}]}, "'id' is required"),
    (lambda raw: {**raw, "models": [{"id": "a", "factory": "os.system", "checkpoint": "x"}]},
     "not of the form 'package.module:function'"),
    (lambda raw: {**raw, "models": [{"id": "a", "factory": "a.b:c", "checkpoint": "x", "extra": 1}]},
     "unknown field"),
    (lambda raw: {**raw, "models": [{"id": "a", "factory": "a.b:c", "checkpoint": "x"}] * 2}, "duplicate model id"),
    (lambda raw: {**raw, "models": [{"id": "a", "factory": "a.b:c", "checkpoint": "x",
                                     "metrics": {"test_error": "high"}}]}, "finite number"),
])
def test_bad_manifests(tmp_path, mutate, message):
    raw = {"format": "sharpfast-manifest", "version": 1,
           "data": {"factory": "sharpfast.study.digits:sharpness_data"}, "models": []}
    out = mutate(raw)
    (tmp_path / "manifest.json").write_text(out if isinstance(out, str) else json.dumps(out))
    with pytest.raises(ManifestError, match=message):
        Manifest.load(str(tmp_path / "manifest.json"))


def test_missing_manifest_and_bad_factories(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        Manifest.load(str(tmp_path))
    with pytest.raises(ManifestError, match="cannot import module"):
        import_factory("no_such_module_xyz:f")
    with pytest.raises(ManifestError, match="no callable"):
        import_factory("sharpfast.study.zoo:no_such_function")
    _saved_mlp(tmp_path)
    m = Manifest.load(str(_manifest(tmp_path, [{"id": "a", "factory": "sharpfast.study.zoo:mlp",
                                                 "kwargs": {"nope": 1}, "checkpoint": "m.safetensors"}])))
    with pytest.raises(ManifestError, match="rejected kwargs"):
        load_model(m, m.models[0])
    m2 = Manifest.load(str(_manifest(tmp_path, [{"id": "a", "factory": "sharpfast.study.digits:split",
                                                  "checkpoint": "m.safetensors"}])))
    with pytest.raises(ManifestError, match="not a torch.nn.Module"):
        load_model(m2, m2.models[0])


def test_model_entry_round_trip():
    e = ModelEntry(id="a", factory="x.y:z", checkpoint="c.safetensors", kwargs={"w": 1},
                   hparams={"lr": 1.0}, metrics={"test_error": 0.5})
    assert ModelEntry.from_dict(e.to_dict()) == e
