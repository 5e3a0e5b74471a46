"""Hugging Face models in a zoo. A model is a local folder written by ``save_pretrained``: the
architecture is built from its ``config.json`` and the weights come from its ``model.safetensors``
through the zoo's checked loading (sha256, strict keys, no unpickling). Nothing is fetched from a
hub: every call passes ``local_files_only=True``."""
from __future__ import annotations

import os

from torch import nn

DEFAULT_CLASS = "AutoModelForSequenceClassification"
WEIGHTS_FILE = "model.safetensors"


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("Hugging Face models need the transformers package: pip install transformers") from e
    return transformers


def from_folder(folder: str, hf_class: str = DEFAULT_CLASS) -> nn.Module:
    """The architecture of the model saved in ``folder`` (its config), with fresh weights: a zoo
    entry's factory; the sweep loads the weights from ``folder/model.safetensors``."""
    transformers = _transformers()
    cls = getattr(transformers, hf_class, None)
    if cls is None or not (hasattr(cls, "from_config") or hasattr(cls, "config_class")):
        raise ValueError(f"hf_class {hf_class!r} is not a transformers model class (e.g. {DEFAULT_CLASS})")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder!r} has no config.json: not a folder written by save_pretrained")
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    return cls.from_config(config) if hf_class.startswith("Auto") else cls(config)


def weights_path(folder: str) -> str:
    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} has no {WEIGHTS_FILE} (save with save_pretrained(folder), which writes "
                                "safetensors by default)")
    return path
