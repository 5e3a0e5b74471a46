"""Zoo manifests and safe checkpoint loading.

A manifest (``manifest.json``) lists the models of a zoo::

    {"format": "sharpfast-manifest", "version": 1,
     "data": {"factory": "sharpfast.study.digits:sharpness_data", "kwargs": {...}},
     "models": [{"id": "...", "factory": "package.module:function", "kwargs": {...},
                 "checkpoint": "checkpoints/x.safetensors", "sha256": "...",
                 "hparams": {...}, "metrics": {"test_error": ..., ...}}]}

``data.factory(n_examples=..., **kwargs)`` returns the ``(x, y)`` tensors sharpness is measured
on. A model is rebuilt by calling its factory with its kwargs and loading the checkpoint:
a ``.safetensors`` file, or a ``.pt``/``.pth``/``.bin`` file read with
``torch.load(weights_only=True)``. Arbitrary pickled objects are never unpickled: a pickle
that needs anything beyond tensors and plain containers is refused with ``CheckpointError``.
Paths are relative to the manifest's folder unless absolute.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import pickle
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

MANIFEST_NAME = "manifest.json"
FORMAT = "sharpfast-manifest"
VERSION = 1
_FACTORY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
SAFE_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class ManifestError(ValueError):
    """A manifest that is missing, unreadable, or does not follow the format."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded safely: missing, corrupt, unsafe, or not matching its model."""


# ----------------------------------------------------------------------------- files

def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_state_dict(state: dict[str, torch.Tensor], path: str) -> None:
    """Save a state dict as safetensors (atomically; tensors made contiguous and unshared)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def load_state_dict(path: str, sha256: str | None = None, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint without running code from it; ``CheckpointError`` with the reason otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if sha256 is not None:
        actual = file_sha256(path)
        if actual != sha256:
            raise CheckpointError(f"checkpoint {path!r} has sha256 {actual[:12]}..., the manifest "
                                  f"says {sha256[:12]}...: the file changed or is corrupt")
    lower = path.lower()
    if lower.endswith(SAFE_SUFFIXES):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path!r} is not a valid safetensors file: {e}") from e
    elif lower.endswith(TORCH_SUFFIXES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            lines = [l.strip() for l in str(e).splitlines() if l.strip()]
            why = next((l for l in lines if "global" in l.lower()), lines[0] if lines else type(e).__name__)
            raise CheckpointError(
                f"refusing to load {path!r}: it is a pickle that needs more than tensors and plain "
                f"containers to unpickle (torch.load(weights_only=True) rejected it: {why[:300]}). "
                "sharpfast never unpickles arbitrary objects; save a state dict of tensors "
                "(safetensors preferred)") from e
        except Exception as e:  # truncated zip, random bytes, ...
            raise CheckpointError(f"checkpoint {path!r} is corrupt or not a torch file: "
                                  f"{type(e).__name__}: {e}") from e
    else:
        raise CheckpointError(f"checkpoint {path!r}: unknown file type; expected one of "
                              f"{SAFE_SUFFIXES + TORCH_SUFFIXES}")
    if key is not None:
        if not isinstance(state, dict) or key not in state:
            raise CheckpointError(f"checkpoint {path!r} has no entry {key!r}")
        state = state[key]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"checkpoint {path!r} is not a state dict (a mapping of names to tensors)")
    return state


# ----------------------------------------------------------------------------- factories

# Where the built-in factories lived before the study moved to ``sharpfast.study`` (0.1.0):
# manifests written then name them so and must keep loading.
MOVED_MODULES = {"sharpfast.digits": "sharpfast.study.zoo.digits", "sharpfast.zoo": "sharpfast.study.zoo",
                 # and where they lived in sharpfast.study before its folders: zoos and stores record
                 # these names (the built-in zoo's data and Hugging Face folders are still written so)
                 "sharpfast.study.digits": "sharpfast.study.zoo.digits",
                 "sharpfast.study.hf": "sharpfast.study.zoo.hf",
                 "sharpfast.study.bert_example": "sharpfast.study.experiments.bert_example",
                 "sharpfast.study.diagonal_networks": "sharpfast.study.experiments.diagonal_networks"}


def import_factory(spec: str) -> Callable[..., Any]:
    """``'package.module:function'`` -> the function (imported, never unpickled)."""
    if not isinstance(spec, str) or not _FACTORY_RE.match(spec):
        raise ManifestError(f"factory {spec!r} is not of the form 'package.module:function'")
    mod_name, fn_name = spec.split(":")
    mod_name = MOVED_MODULES.get(mod_name, mod_name)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ManifestError(f"factory {spec!r}: cannot import module {mod_name!r}: {e}") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ManifestError(f"factory {spec!r}: module {mod_name!r} has no callable {fn_name!r}")
    return fn


# ----------------------------------------------------------------------------- manifest

@dataclass
class ModelEntry:
    id: str
    factory: str
    checkpoint: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    state_dict_key: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    train_time_s: float | None = None
    init_checkpoint: str | None = None   # the weights before training (distance-to-initialization measures)
    init_sha256: str | None = None
    training: dict[str, Any] | None = None   # how it was trained (sharpfast.study.zoo: trainer, stack, threads, torch)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Any, where: str = "model entry") -> "ModelEntry":
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected an object, got {type(d).__name__}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ManifestError(f"{where}: unknown field(s) {sorted(unknown)}")
        for req in ("id", "factory", "checkpoint"):
            if not isinstance(d.get(req), str) or not d[req]:
                raise ManifestError(f"{where}: field {req!r} is required and must be a non-empty string")
        if not _FACTORY_RE.match(d["factory"]):
            raise ManifestError(f"{where} ({d['id']}): factory {d['factory']!r} is not of the "
                                "form 'package.module:function'")
        for name in ("kwargs", "hparams", "metrics", "training"):
            if name in d and not isinstance(d[name], dict):
                raise ManifestError(f"{where} ({d['id']}): {name!r} must be an object")
        for k, v in d.get("metrics", {}).items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ManifestError(f"{where} ({d['id']}): metric {k!r} must be a finite number, got {v!r}")
        for name in ("sha256", "init_sha256"):
            if d.get(name) is not None and not re.fullmatch(r"[0-9a-f]{64}", str(d[name])):
                raise ManifestError(f"{where} ({d['id']}): {name} must be 64 lowercase hex digits")
        if d.get("init_checkpoint") is not None and (not isinstance(d["init_checkpoint"], str)
                                                     or not d["init_checkpoint"]):
            raise ManifestError(f"{where} ({d['id']}): init_checkpoint must be a non-empty string")
        return cls(**d)


@dataclass
class Manifest:
    data: dict[str, Any]
    models: list[ModelEntry]
    root: str = "."

    @classmethod
    def load(cls, path: str) -> "Manifest":
        if os.path.isdir(path):
            path = os.path.join(path, MANIFEST_NAME)
        if not os.path.isfile(path):
            raise ManifestError(f"manifest {path!r} does not exist (train a zoo with `sharpfast zoo`)")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"manifest {path!r} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ManifestError(f"manifest {path!r}: expected a JSON object at the top level")
        if raw.get("format") != FORMAT:
            raise ManifestError(f"manifest {path!r}: 'format' must be {FORMAT!r}, got {raw.get('format')!r}")
        if raw.get("version") != VERSION:
            raise ManifestError(f"manifest {path!r}: unsupported version {raw.get('version')!r} (expected {VERSION})")
        data = raw.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("factory"), str):
            raise ManifestError(f"manifest {path!r}: 'data' must be an object with a 'factory' string")
        if not _FACTORY_RE.match(data["factory"]):
            raise ManifestError(f"manifest {path!r}: data factory {data['factory']!r} is not of the form "
                                "'package.module:function'")
        if not isinstance(data.get("kwargs", {}), dict):
            raise ManifestError(f"manifest {path!r}: data 'kwargs' must be an object")
        models = raw.get("models")
        if not isinstance(models, list):
            raise ManifestError(f"manifest {path!r}: 'models' must be a list")
        entries = [ModelEntry.from_dict(m, f"manifest {path!r}, models[{i}]") for i, m in enumerate(models)]
        seen: set[str] = set()
        for e in entries:
            if e.id in seen:
                raise ManifestError(f"manifest {path!r}: duplicate model id {e.id!r}")
            seen.add(e.id)
        return cls(data=data, models=entries, root=os.path.dirname(os.path.abspath(path)))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "data": self.data,
                "models": [m.to_dict() for m in self.models]}

    def save(self, path: str) -> None:
        text = json.dumps(self.to_dict(), indent=1, sort_keys=False)

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)

        _atomic_write(path, write)

    def checkpoint_path(self, entry: ModelEntry, initial: bool = False) -> str:
        rel = entry.init_checkpoint if initial else entry.checkpoint
        return rel if os.path.isabs(rel) else os.path.join(self.root, rel)

    def sharpness_data(self, n_examples: int) -> tuple[torch.Tensor, torch.Tensor]:
        fn = import_factory(self.data["factory"])
        return fn(n_examples=n_examples, **self.data.get("kwargs", {}))


def _state_dict_problems(e: RuntimeError, most: int = 5) -> str:
    """``load_state_dict``'s message on one line: each mismatch it names (the shapes included),
    the first ``most`` of them."""
    lines = [l.strip() for l in str(e).splitlines()[1:] if l.strip()] or [str(e).strip()]
    more = f"; and {len(lines) - most} more" if len(lines) > most else ""
    return "; ".join(lines[:most]) + more


def load_model(manifest: Manifest, entry: ModelEntry, initial: bool = False) -> torch.nn.Module:
    """Rebuild one model of the manifest (eval mode, CPU), with its trained weights or, with
    ``initial``, the weights it started training from. Raises ``CheckpointError`` /
    ``ManifestError``."""
    if initial and entry.init_checkpoint is None:
        raise ManifestError(f"model {entry.id!r} has no init_checkpoint: its zoo did not save the initial "
                            "weights (zoos trained by sharpfast >= 0.2 do)")
    factory = import_factory(entry.factory)
    state = load_state_dict(manifest.checkpoint_path(entry, initial), entry.init_sha256 if initial else entry.sha256,
                            entry.state_dict_key)
    try:
        model = factory(**entry.kwargs)
    except TypeError as e:
        raise ManifestError(f"model {entry.id!r}: factory {entry.factory!r} rejected kwargs "
                            f"{entry.kwargs}: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise ManifestError(f"model {entry.id!r}: factory {entry.factory!r} returned "
                            f"{type(model).__name__}, not a torch.nn.Module")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"model {entry.id!r}: checkpoint does not match the model built by "
                              f"{entry.factory}({entry.kwargs}): {_state_dict_problems(e)}") from e
    return model.eval()
