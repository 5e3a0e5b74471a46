"""Definitions fitted to a zoo's data: the number of examples its data factory provides."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .base import ConfigError, Definition
from .config import dedupe

if TYPE_CHECKING:
    from ..zoo.checkpoints import Manifest

def _provides(manifest: Manifest, n: int) -> bool:
    try:
        return len(manifest.sharpness_data(n)[1]) >= n
    except Exception:  # noqa: BLE001 - a factory that cannot serve n, for whatever reason it says
        return False


def fit_to_data(manifest: Manifest, defs: list[Definition]) -> tuple[list[Definition], str | None]:
    """``defs`` with every ``n_examples`` the zoo's data cannot provide lowered to the largest
    multiple of every definition's ``m`` that it can (a small zoo's data, e.g. the tiny preset's 256
    training examples under the default 512), and the line that says so (None if nothing changed).
    The data factory is asked by bisection over those multiples."""
    need = max(d.n_examples for d in defs)
    if _provides(manifest, need) or not _provides(manifest, min(d.m for d in defs)):
        return defs, None   # enough, or a factory that fails for any number (check_data says why)
    step = math.lcm(*(d.m for d in defs))
    lo, hi = 0, need // step     # the largest k whose k * step examples the data provide
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _provides(manifest, mid * step) else (lo, mid - 1)
    if lo == 0:
        raise ConfigError(f"the zoo's sharpness data ({manifest.data['factory']}) cannot provide {step} examples, "
                          f"the smallest multiple of every definition's m ({sorted({d.m for d in defs})}): use a "
                          "smaller --m")
    n = lo * step
    fitted = dedupe([d.replace(n_examples=min(d.n_examples, n)) for d in defs])
    asked = sorted({d.n_examples for d in defs if d.n_examples > n})
    return fitted, (f"the zoo's data provides fewer than {need} examples: definitions asking for "
                    f"{', '.join(map(str, asked))} use {n}, the largest multiple of every definition's m ({step}) "
                    "that it provides (--n-examples N sets the number)")


def check_data(manifest: Manifest, defs: list[Definition]) -> None:
    """Fail fast, before any work, when the zoo's data cannot serve a definition (a config
    problem, not a checkpoint's): e.g. the paper preset's 1024 examples on a 600-example set, or
    a data factory that cannot be imported or raises."""
    factory = manifest.data["factory"]
    for n in sorted({d.n_examples for d in defs}):
        try:
            x, y = manifest.sharpness_data(n)
            if len(y) < n:
                raise ValueError(f"it returned {len(y)} examples")
        except Exception as e:  # noqa: BLE001 - whatever the user's factory raises, said as a config error
            if _provides(manifest, 1):   # the factory works: the count is the problem
                raise ConfigError(f"the zoo's sharpness data ({factory}) cannot provide {n} examples: {e}. Use "
                                  "fewer examples (--n-examples N, a multiple of every definition's m)") from e
            raise ConfigError(f"the zoo's data factory {factory} failed: {type(e).__name__}: {e}") from e
