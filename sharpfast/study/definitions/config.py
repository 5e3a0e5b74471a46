"""Definitions from a config (YAML, JSON or TOML), with the defaults it gives and the presets it
names; one definition per radius where ``rho`` is a list; duplicates (by key) dropped.

    defaults:                      # optional, applied to every definition
      m: 128
      n_examples: 512
    preset: default                # optional: start from a preset's definitions
    definitions:
      - {kind: max, norm: linf, adaptive: true, normalize_logits: true, rho: [0.001, 0.002]}
      - {kind: avg, norm: l2, adaptive: true, rho: 0.1, n_samples: 20}
"""
from __future__ import annotations

import os
from typing import Any, Iterable

from .base import ConfigError, Definition
from .presets import PRESETS

def _expand(d: dict[str, Any], defaults: dict[str, Any], where: str) -> list[Definition]:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    merged = {**defaults, **d}
    rhos = merged.get("rho")
    if isinstance(rhos, (list, tuple)):
        if not rhos:
            raise ConfigError(f"{where}: 'rho' is an empty list")
        return [Definition.from_dict({**merged, "rho": r}, f"{where} (rho={r!r})") for r in rhos]
    return [Definition.from_dict(merged, where)]


def parse_config(raw: Any, where: str = "config") -> list[Definition]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    unknown = set(raw) - {"defaults", "definitions", "preset"}
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {sorted(unknown)}; "
                          "expected 'defaults', 'definitions', 'preset'")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{where}: 'defaults' must be a mapping")
    out: list[Definition] = []
    if raw.get("preset") is not None:
        names = raw["preset"] if isinstance(raw["preset"], list) else [raw["preset"]]
        for n in names:
            if n not in PRESETS:
                raise ConfigError(f"{where}: unknown preset {n!r}; available: {sorted(PRESETS)}")
            out += [d for i, p in enumerate(PRESETS[n]) for d in _expand(p, defaults, f"{where}: preset {n} #{i}")]
    defs = raw.get("definitions", [])
    if not isinstance(defs, list):
        raise ConfigError(f"{where}: 'definitions' must be a list")
    for i, d in enumerate(defs):
        out += _expand(d, defaults, f"{where}: definitions[{i}]")
    if not out:
        raise ConfigError(f"{where}: no definitions (give 'definitions' or 'preset')")
    return dedupe(out)


def load_config(path: str) -> list[Definition]:
    """Definitions from a ``.yaml``/``.yml``/``.json`` or ``.toml`` file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            import tomllib

            with open(path, "rb") as f:
                raw = tomllib.load(f)
        elif ext in (".yaml", ".yml", ".json"):
            import yaml

            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        else:
            raise ConfigError(f"config {path!r}: unknown extension {ext!r}; use .yaml, .yml, .json or .toml")
    except ConfigError:
        raise
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError
        raise ConfigError(f"config {path!r} cannot be parsed: {e}") from e
    return parse_config(raw, f"config {path!r}")


def dedupe(defs: Iterable[Definition]) -> list[Definition]:
    seen: dict[str, Definition] = {}
    for d in defs:
        seen.setdefault(d.key, d)
    return list(seen.values())


def with_overrides(defs: Iterable[Definition], **overrides: Any) -> list[Definition]:
    """Apply ``n_examples=...``, ``m=...`` etc. to every definition (``None`` values ignored)."""
    ov = {k: v for k, v in overrides.items() if v is not None}
    if not ov:
        return list(defs)
    try:
        return dedupe(d.replace(**ov) for d in defs)
    except ConfigError as e:
        raise ConfigError(f"override {ov}: {e}") from None


