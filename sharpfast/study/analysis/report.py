"""The correlation report: how well each sharpness definition ranks the models' generalization.

For every definition in the store (``ok`` rows only) and every target the zoo records — test
error, generalization gap (test error - train error) and out-of-distribution error (mean over
digits-C) — it computes Kendall's tau-b with a bootstrap confidence interval, plus the granulated
tau per hyperparameter and Psi (Jiang et al. 2020's sign sum), the conditional mutual information
score (as the PGDL scoring program computes it) and the robust sign-error (Dziugaite et al. 2020,
as their code computes it, Hoeffding-weighted with the models' test-set size) against one target.
A statistic that cannot be measured on the zoo at hand (a target it does not record; a sign-error
with one run per setting; a CMI that nothing is left to condition on) is left out, and the report
says why. A positive tau means "sharper models generalize worse", the hypothesis under test.

In three steps: :func:`collect` reads the store once, :func:`compute` takes the statistics and
says what was left out (a :class:`Report`), and :func:`.render.write` writes ``report.md`` (with one
PNG scatter plot per definition: measure vs each recorded target, coloured by a hyperparameter),
``report.html`` (the same report as a self-contained interactive page, :mod:`.report_html`) and
``results.csv`` into the output folder. :func:`build_report` runs the three.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sharpfast.geodesic import CORRECTION_WARNING

from ..measures import MEASURES_REVISION
from ..store import Store
from . import render
from .stats import bootstrap_tau, conditional_mutual_information, granulated_tau, robust_sign_error, varying_factors

TARGETS = {"test_error": "test error", "gap": "gen. gap", "ood_error": "OOD error"}
BASELINES = {"train_loss": "(baseline) train loss", "train_error": "(baseline) train error"}



# what the scatter plots are coloured by, where it varies: SAM's training radius, then the learning rate
COLOR_BY_FIRST = ("sam_rho", "lr")

@dataclass
class Line:
    name: str
    key: str | None            # definition key; None for a baseline
    n: int
    taus: dict[str, Any]       # target -> BootstrapCI
    granulated: Any            # Granulated
    cmi: Any = None            # ConditionalMI vs the target
    sign_error: Any = None     # SignError vs the target
    values: list[float] = field(repr=False, default_factory=list)
    ids: list[str] = field(repr=False, default_factory=list)


@dataclass
class Report:
    lines: list[Line]
    factors: list[str]
    target: str
    n_checkpoints: int
    n_errors: int
    max_train_error: float | None = None
    n_test: int | None = None
    files: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=lambda: list(TARGETS))   # the targets the zoo records
    notes: list[str] = field(default_factory=list)                      # what was left out, and why
    covers: list[str] = field(default_factory=list)                     # what the report is about, and its terms
    # what it was computed from, for rendering: the collected store (checkpoints, definitions, rows)
    ckpts: dict[str, dict] = field(default_factory=dict, repr=False)
    defs: dict[str, dict] = field(default_factory=dict, repr=False)
    rows: list = field(default_factory=list, repr=False)
    color_by: str | None = None

    def markdown(self, ci: bool = True) -> str:
        return render.markdown(self, ci)

    def granulated_table(self) -> tuple[str, list[str], list[list], list[str]] | None:
        return render.granulated_table(self)

    @staticmethod
    def target_name(target: str) -> str:
        return TARGETS[target]


NEAR_MINIMUM = 0.01   # the train error below which Andriushchenko et al. study a model (near a minimum)


def _near_minimum_note(ckpts: dict[str, dict], max_train_error: float | None) -> str | None:
    """How many models are far from a minimum, and the filter that leaves them out, where none was given."""
    errors = [c["metrics"]["train_error"] for c in ckpts.values() if "train_error" in c["metrics"]]
    above = sum(e > NEAR_MINIMUM for e in errors)
    if max_train_error is not None or not above:
        return None
    return (f"{above} of {len(errors)} checkpoints have a train error above {NEAR_MINIMUM:.0%} (the lowest "
            f"{min(errors):.3g}): they are not near a minimum, where sharpness is defined and studied (Andriushchenko "
            f"et al. keep train error <= 1%); `--max-train-error {NEAR_MINIMUM:g}` restricts the report to the others.")


def _covers(ckpts: dict[str, dict], defs: dict[str, dict], zoo_data: dict | None, zoo_root: str | None) -> list[str]:
    """What the report covers (the zoo, its data, architectures, epochs, examples) and what its terms mean."""
    if not ckpts:
        return []
    hps = [c["hparams"] for c in ckpts.values()]
    counted = lambda name: ", ".join(f"{v} ({n})" for v, n in sorted(Counter(str(h[name]) for h in hps
                                                                              if name in h).items()))
    examples = sorted({d["spec"]["n_examples"] for d in defs.values() if d["spec"].get("n_examples") is not None})
    zoo = f"the zoo at {zoo_root}" if zoo_root else "a zoo"
    data = "" if not zoo_data else f", data {zoo_data.get('factory')}{zoo_data.get('kwargs') or ''}"
    parts = [f"Covers {len(ckpts)} checkpoints of {zoo}{data}"]
    for name, what in (("arch", "architectures"), ("epochs", "epochs")):
        if any(name in h for h in hps):
            parts.append(f"{what} {counted(name)}")
    if examples:
        parts.append(f"examples per definition {', '.join(map(str, examples))}")
    return ["; ".join(parts) + ".",
            "Terms: gen. gap = test error - train error; OOD error = the mean error over the zoo's shifted test sets "
            "(the built-in zoo: the digits-C corruptions of its test set); adaptive = perturbations scaled by |w|; "
            "lognorm / logstd = logits centred and divided by their l2 norm / standard deviation before the loss; "
            "tau > 0: sharper models generalize worse."]


def _label(d: dict[str, Any]) -> str:
    """A definition's name, marked where it is a measure computed under earlier conventions (an
    old store's rows, kept beside the current revision's)."""
    spec = d["spec"]
    if spec.get("kind") == "measure" and spec.get("revision", 1) != MEASURES_REVISION:
        return f"{d['name']} [revision {spec.get('revision', 1)}]"
    return d["name"]


def build_report(store_path: str, out_dir: str | None = None, target: str = "test_error",
                 color_by: str | None = None, n_boot: int = 1000, seed: int = 0, plots: bool = True,
                 baselines: bool = True, max_train_error: float | None = None, n_test: int | None = None) -> Report:
    """Compute the report from a store; write files into ``out_dir`` when given.

    ``max_train_error`` keeps only the models whose train error is at most that (the paper
    studies models close to a minimum, e.g. <= 1% train error). ``n_test``, the test examples behind
    each model's error (the sign-error's Hoeffding weights), defaults to the models' common
    ``n_test`` hyperparameter where they record one."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    report = compute(collect(store_path, max_train_error), target, color_by, n_boot, seed, baselines, n_test)
    if out_dir is not None:
        report.files = render.write(report, out_dir, plots)
    return report


@dataclass
class Collected:
    """What a report reads from a store: its checkpoints (``stored``: all of them; ``ckpts``: those
    the train-error filter keeps), definitions, rows (of the kept checkpoints) and zoo."""
    stored: dict[str, dict]
    ckpts: dict[str, dict]
    defs: dict[str, dict]
    rows: list
    zoo_data: dict | None
    zoo_root: str | None
    max_train_error: float | None


def collect(store_path: str, max_train_error: float | None = None) -> Collected:
    """The store's contents, read once (read-only), filtered to train error <= ``max_train_error``."""
    with Store(store_path, readonly=True) as st:
        ckpts = st.checkpoints()
        defs = st.definitions()
        rows = list(st.rows())
        zoo_data, zoo_root = st.zoo()
    stored = ckpts
    if max_train_error is not None:
        ckpts = {c: v for c, v in ckpts.items()
                 if v["metrics"].get("train_error", float("inf")) <= max_train_error}
        rows = [r for r in rows if r.checkpoint_id in ckpts]
    return Collected(stored, ckpts, defs, rows, zoo_data, zoo_root, max_train_error)


def compute(c: Collected, target: str = "test_error", color_by: str | None = None, n_boot: int = 1000,
            seed: int = 0, baselines: bool = True, n_test: int | None = None) -> Report:
    """The statistics of every definition (and baseline) on the collected checkpoints, and the
    notes on what was left out (:func:`build_report` says what each argument does)."""
    stored, ckpts, defs, rows = c.stored, c.ckpts, c.defs, c.rows
    zoo_data, zoo_root, max_train_error = c.zoo_data, c.zoo_root, c.max_train_error
    n_err = sum(r.status != "ok" for r in rows)
    ids_all = sorted(ckpts)
    hp_all = [ckpts[c]["hparams"] for c in ids_all]
    factors = varying_factors(hp_all)
    if n_test is None:
        recorded = {h.get("n_test") for h in hp_all}
        n_test = recorded.pop() if len(recorded) == 1 and isinstance(next(iter(recorded)), int) else None
    if color_by is None:   # SAM's radius where it varies (a SAM zoo), else lr, else the first that varies
        color_by = next((f for f in COLOR_BY_FIRST if f in factors), factors[0] if factors else None)
    elif color_by not in factors:
        raise ValueError(f"color_by={color_by!r} is not a hyperparameter that varies in this store; "
                         f"those that do: {', '.join(factors) or 'none'}")
    # the targets this zoo records (a user's table may record the test error only)
    recorded = lambda t: any(isinstance(c["metrics"].get(t), (int, float)) and math.isfinite(c["metrics"][t])
                             for c in ckpts.values())
    targets = [t for t in TARGETS if recorded(t)]
    notes = []
    if not ckpts:   # nothing to correlate, and not for want of a target
        if stored:
            lowest = min((v["metrics"].get("train_error", float("inf")) for v in stored.values()))
            notes.append(f"Nothing to report: no checkpoint has a train error <= {max_train_error:g} (the store holds "
                         f"{len(stored)}, the lowest train error {lowest:.3g}); raise --max-train-error.")
        else:
            notes.append("Nothing to report: the store holds no results yet (run `sharpfast sweep` on it first).")
    elif len(targets) < len(TARGETS):
        notes.append("Not recorded by this zoo, so left out: " + ", ".join(TARGETS[t] for t in TARGETS
                                                                          if t not in targets) + ".")
    if targets and target not in targets:
        notes.append(f"The zoo does not record the {TARGETS[target]}: the per-hyperparameter statistics are "
                     f"against the {TARGETS[targets[0]]}.")
        target = targets[0]
    elif ckpts and not targets:
        notes.append("The zoo records no target (test error, generalization gap or OOD error): there is nothing to "
                     "correlate the measures with.")

    def line(name: str, key: str | None, vals: dict[str, float]) -> Line:
        ids = [c for c in ids_all if c in vals]
        values = [vals[c] for c in ids]
        taus = {}
        for t in targets:
            e = [ckpts[c]["metrics"].get(t, float("nan")) for c in ids]
            taus[t] = bootstrap_tau(values, e, n_boot=n_boot, seed=seed)
        e, hp = [ckpts[c]["metrics"].get(target, float("nan")) for c in ids], [ckpts[c]["hparams"] for c in ids]
        return Line(name, key, len(ids), taus, granulated_tau(values, e, hp, factors),
                    conditional_mutual_information(values, e, hp, [f for f in factors if f != "seed"]),
                    robust_sign_error(values, e, hp, n_test=n_test, factors=[f for f in factors if f != "seed"]),
                    values, ids)

    lines = []
    by_def: dict[str, dict[str, float]] = {}
    without_blocks: dict[str, int] = {}   # geodesic rows on models without a GL block: the adaptive worst case
    for r in rows:
        if r.status == "ok" and r.value is not None and r.checkpoint_id in ckpts:
            if r.gl_blocks == 0:
                without_blocks[r.definition_key] = without_blocks.get(r.definition_key, 0) + 1
                continue
            by_def.setdefault(r.definition_key, {})[r.checkpoint_id] = r.value
    failed: dict[str, list[str]] = {}
    for r in rows:
        if r.status != "ok" and r.checkpoint_id in ckpts:
            failed.setdefault(r.definition_key, []).append((r.error or "no message").splitlines()[0][:200])
    out_of_domain: dict[str, int] = {}
    for r in rows:
        if r.status == "ok" and r.checkpoint_id in ckpts and (r.geodesic_correction or 0) > CORRECTION_WARNING:
            out_of_domain[r.definition_key] = out_of_domain.get(r.definition_key, 0) + 1
    for key, d in defs.items():  # sorted by family, rho
        if key in by_def:
            lines.append(line(_label(d), key, by_def[key]))
        if key in without_blocks:
            n = without_blocks[key]
            notes.append(f"{_label(d)}: {n} checkpoint(s) without a GL block left out (there geodesic sharpness is "
                         "the adaptive worst case, which the adaptive definitions measure)" if key in by_def else
                         f"Left out, no checkpoint has a GL block: {_label(d)} ({n} rows, each the adaptive worst "
                         "case)")
        if key in out_of_domain:
            notes.append(f"{_label(d)}: on {out_of_domain[key]} of {len(by_def[key])} checkpoints the geodesic's "
                         "second-order term outgrew the step (geodesic_correction > 1): there the second-order map "
                         "does not follow the geodesic (a smaller rho, or a larger eps where factors are near zero)")
        errors = failed.get(key)
        if errors:   # nothing leaves the report without a word
            count = f"{len(errors)} error{'s' if len(errors) > 1 else ''}: {errors[0]}"
            notes.append(f"Left out, every row failed: {_label(d)} ({count})" if key not in by_def else
                         f"{_label(d)}: {len(errors)} failed row(s) left out (first: {errors[0]})")
    if baselines:
        for metric, name in BASELINES.items():
            vals = {c: ckpts[c]["metrics"][metric] for c in ids_all if metric in ckpts[c]["metrics"]}
            if vals:
                lines.append(line(name, None, vals))
    near_minimum = _near_minimum_note(ckpts, max_train_error)
    if near_minimum:
        notes.append(near_minimum)
    return Report(lines, factors, target, len(ids_all), n_err, max_train_error, n_test, targets=targets,
                  notes=notes, covers=_covers(ckpts, defs, zoo_data, zoo_root), ckpts=ckpts, defs=defs, rows=rows,
                  color_by=color_by)
