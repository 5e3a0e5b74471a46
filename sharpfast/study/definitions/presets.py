"""Presets: named lists of definitions, each a dict a config could hold (``sharpfast definitions
--preset NAME`` lists one)."""
from __future__ import annotations

from typing import Any

from ..measures import NEYSHABUR as MEASURE_NAMES_NEYSHABUR
from .base import ConfigError, Definition

def _grid(kind: str, norm: str, radii: dict[str, list[float]], **common: Any) -> list[dict[str, Any]]:
    variants = {"standard": dict(adaptive=False), "adaptive": dict(adaptive=True),
                "adaptive-lognorm": dict(adaptive=True, normalize_logits="norm")}
    return [dict(kind=kind, norm=norm, rho=r, **variants[v], **common)
            for v, rs in radii.items() for r in rs]


def _paper() -> list[dict[str, Any]]:
    """The published CIFAR-10 ResNet-18 grid (sh/eval_sharpness_final.sh of the paper's code):
    {avg, max} x {l2, linf} x {standard, adaptive, adaptive + logit normalization} x 4 radii,
    m = 128 on 1024 training examples, 20 APGD iterations / 20 noise draws, no random init."""
    same = lambda rs: {"standard": rs, "adaptive": rs, "adaptive-lognorm": rs}
    common = dict(m=128, n_examples=1024, n_iters=20, n_samples=20)
    return (_grid("avg", "l2", same([0.05, 0.1, 0.2, 0.4]), **common)
            + _grid("avg", "linf", same([0.1, 0.2, 0.4, 0.8]), **common)
            + _grid("max", "l2", same([0.25, 0.5, 1.0, 2.0]), **common)
            + _grid("max", "linf", {"standard": [0.0005, 0.001, 0.002, 0.004],
                                    "adaptive": [0.001, 0.002, 0.004, 0.008],
                                    "adaptive-lognorm": [0.001, 0.002, 0.004, 0.008]}, **common))


PRESETS: dict[str, list[dict[str, Any]]] = {
    "paper": _paper(),
    # the main job on the digits zoo: the paper's four families, one radius each, m = 128 on 512
    # training examples (radii chosen so the loss increase is well above noise yet < ~1 nat)
    "default": [
        dict(kind="max", norm="linf", adaptive=True, normalize_logits="norm", rho=0.002),
        dict(kind="max", norm="linf", adaptive=True, rho=0.002),
        dict(kind="max", norm="l2", adaptive=True, rho=0.5),
        dict(kind="max", norm="l2", adaptive=False, rho=0.1),
        dict(kind="avg", norm="l2", adaptive=True, rho=0.1),
        dict(kind="avg", norm="linf", adaptive=True, normalize_logits="norm", rho=0.2),
    ],
    # the curvature the sharpness definitions tend to as rho -> 0, and the measures beside it
    "curvature": [
        dict(kind="trace", adaptive=True), dict(kind="trace", adaptive=False),
        dict(kind="lambda_max", adaptive=True), dict(kind="lambda_max", adaptive=False),
        dict(kind="adam", adaptive=False), dict(kind="renyi", adaptive=False, curvature="ggn"),
    ],
    # the worst-case solvers side by side: the published APGD and the scaled solver (from delta = 0
    # and from the top eigenvector of C H C) on the default's worst-case families
    "solvers": [
        dict(kind="max", norm=norm, adaptive=True, rho=rho, solver=solver, **start)
        for norm, rho in (("l2", 0.5), ("linf", 0.002))
        for solver, start in (("published", {}), ("scaled", {}), ("scaled", dict(init="eigen")))
    ],
    # geodesic sharpness (da Silva et al., 2025) beside the adaptive worst case it corrects: the same
    # APGD (the scaled solver), radius and batches; on models without attention blocks the three
    # agree. rho = 0.1: at 0.5 the mix metric's second-order map leaves its domain on the zoo's ViTs
    # (geodesic_correction > 1), and inv reaches several nats
    "geodesic": [
        dict(kind="max", norm="l2", adaptive=True, rho=0.1, solver="scaled"),
        dict(kind="geodesic", metric="inv", rho=0.1),
        dict(kind="geodesic", metric="mix", rho=0.1),
    ],
    # the generalization measures of Jiang et al. (2020) that sharpness is compared with
    "jiang": [dict(kind="measure", measure=name) for name in (
        "param-norm", "frob-distance", "spec-dist", "fro/spec", "prod-of-spec", "prod-of-spec/margin", "sum-of-spec",
        "sum-of-spec/margin", "prod-of-fro", "prod-of-fro/margin", "sum-of-fro", "sum-of-fro/margin",
        "spectral-init", "spectral-orig", "path-norm", "path-norm/margin", "1/margin", "cross-entropy",
        "neg-entropy", "fisher-rao", "num-step-to-0.1-loss", "pacbayes-init", "pacbayes-orig", "1/sigma-pacbayes",
        "sharpness-init", "sharpness-orig", "1/alpha-sharpness", "pacbayes-mag-init", "pacbayes-mag-orig",
        "1/sigma-pacbayes-mag", "pac-sharpness-mag-init", "pac-sharpness-mag-orig", "1/alpha-sharpness-mag",
        "num-params")],
    # the norms over the margin and the generalization bounds of Neyshabur et al.'s generalization-bounds code
    "neyshabur": [dict(kind="measure", measure=name) for name in MEASURE_NAMES_NEYSHABUR],
    # smoke tests: two cheap definitions
    "quick": [
        dict(kind="max", norm="linf", adaptive=True, rho=0.002, n_iters=5, m=64, n_examples=128),
        dict(kind="avg", norm="l2", adaptive=True, rho=0.1, n_samples=4, m=64, n_examples=128),
    ],
}


def preset(name: str, **overrides: Any) -> list[Definition]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return [Definition.from_dict({**d, **overrides}, f"preset {name!r} #{i}") for i, d in enumerate(PRESETS[name])]


