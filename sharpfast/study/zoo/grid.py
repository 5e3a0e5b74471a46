"""The zoo's grids: a full factorial over training configurations, the presets, and each
configuration's stable name."""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from . import digits


#: optimizer-specific base learning rates; the grid's ``lr`` is a multiplier of these, so
#: "the same learning rate" means the same relative step size for SGD and Adam.
BASE_LR = {"sgd": 0.05, "adam": 0.002}


@dataclass(frozen=True)
class ZooSpec:
    """A full factorial grid ``factors`` over the training configuration ``fixed``."""

    factors: dict[str, list[Any]]
    fixed: dict[str, Any] = field(default_factory=dict)

    def configs(self) -> list[dict[str, Any]]:
        names = list(self.factors)
        out = []
        for values in itertools.product(*(self.factors[n] for n in names)):
            cfg = dict(DEFAULT_TRAIN)
            cfg.update(self.fixed)
            cfg.update(dict(zip(names, values)))
            out.append(cfg)
        return out


DEFAULT_TRAIN: dict[str, Any] = {
    "arch": "mlp", "width": 64, "optimizer": "sgd", "lr": 1.0, "batch_size": 32,
    "weight_decay": 0.0, "augment": False, "epochs": 20, "seed": 0, "n_train": 600,
    "n_test": digits.DEFAULT_N_TEST, "split_seed": digits.DEFAULT_SPLIT_SEED,
}

#: training settings a configuration holds only where its grid sets them, so the names and digests
#: of configurations made before they existed stay: SAM's radius (0: plain training; the paper's
#: zoos were trained with ``--sam_rho``, tml-epfl/sam-low-rank-features) and its |w|-scaled ascent
OPTIONAL_TRAIN: dict[str, Any] = {"sam_rho": 0.0, "sam_adaptive": False}

ZOO_PRESETS: dict[str, ZooSpec] = {
    # the README's main job: 3 x 2^5 = 96 models (three architectures, five training knobs)
    "default": ZooSpec({"arch": ["mlp", "cnn", "vit"], "lr": [0.5, 2.0], "batch_size": [16, 128],
                        "width": [16, 64], "weight_decay": [0.0, 5e-3], "augment": [False, True]},
                       {"optimizer": "sgd", "epochs": 60}),
    # every factor the zoo knows, 3 x 2^6 = 192 models
    "full": ZooSpec({"arch": ["mlp", "cnn", "vit"], "optimizer": ["sgd", "adam"], "lr": [0.5, 2.0],
                     "batch_size": [16, 128], "width": [16, 64], "weight_decay": [0.0, 5e-3],
                     "augment": [False, True]}, {"epochs": 60}),
    # SAM-trained models beside plain ones: sharpness against the radius they were trained with,
    # 3 x 4 x 2 x 2 = 48 models (sharpfast.optim.SAM on the stacked trainer)
    "sam": ZooSpec({"arch": ["mlp", "cnn", "vit"], "sam_rho": [0.0, 0.05, 0.1, 0.2], "lr": [0.5, 2.0],
                    "batch_size": [16, 128]}, {"optimizer": "sgd", "epochs": 60}),
    # for tests and smoke runs: 8 tiny models, MLPs and ViTs
    "tiny": ZooSpec({"arch": ["mlp", "vit"], "lr": [0.5, 2.0], "batch_size": [32, 128]},
                    {"width": 8, "epochs": 3, "n_train": 256}),
}


def config_id(cfg: dict[str, Any]) -> str:
    """A readable, unique, stable name for one training configuration."""
    short = {"arch": "", "optimizer": "", "lr": "lr", "batch_size": "bs", "width": "w",
             "weight_decay": "wd", "augment": "aug", "epochs": "ep", "seed": "s", "sam_rho": "sam",
             "sam_adaptive": "asam"}
    parts = []
    for k, p in short.items():
        if k in OPTIONAL_TRAIN and k not in cfg:
            continue
        v = cfg[k]
        if isinstance(v, bool):
            v = int(v)
        parts.append(f"{p}{v:g}" if isinstance(v, float) else f"{p}{v}")
    digest = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:6]
    return "-".join(parts) + "-" + digest


