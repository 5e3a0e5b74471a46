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

Writes ``report.md`` (with one PNG scatter plot per definition: measure vs each recorded target,
coloured by a hyperparameter), ``report.html`` (the same report as a self-contained interactive page,
:mod:`.report_html`) and ``results.csv`` into the output folder.
"""
from __future__ import annotations

import csv
from collections import Counter
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sharpfast.geodesic import CORRECTION_WARNING

from . import report_html
from ..measures import MEASURES_REVISION
from .stats import bootstrap_tau, conditional_mutual_information, granulated_tau, robust_sign_error, varying_factors
from ..store import Store

TARGETS = {"test_error": "test error", "gap": "gen. gap", "ood_error": "OOD error"}
BASELINES = {"train_loss": "(baseline) train loss", "train_error": "(baseline) train error"}


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

    def markdown(self, ci: bool = True) -> str:
        return _markdown(self, ci)

    def granulated_table(self) -> tuple[str, list[str], list[list], list[str]] | None:
        return granulated_table(self)

    @staticmethod
    def target_name(target: str) -> str:
        return TARGETS[target]


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}"


def _plain(x: float) -> str:
    """A score in [0, 1], no sign."""
    return "n/a" if x is None or math.isnan(x) else f"{x:.2f}"


def _cell(c: Any, ci: bool) -> str:
    s = _fmt(c.tau, 2)
    if ci and not math.isnan(c.low):
        s += f" [{_fmt(c.low, 2)}, {_fmt(c.high, 2)}]"
    return s


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


def _sign_error_note(r: Report) -> str | None:
    """Why no line has a sign-error, where none has (else None)."""
    errors = [ln.sign_error for ln in r.lines if ln.sign_error is not None]
    if not errors or any(e.n_environments for e in errors):
        return None
    max_ess = max(e.max_ess for e in errors)
    return (f"The robust sign-error is left out: no environment (two settings that differ in one hyperparameter) "
            f"reaches the effective sample size of {errors[0].min_ess:g} that Dziugaite et al. require (the largest "
            f"here is {max_ess:.1f}; with k runs per setting an environment has at most k^2 pairs of runs, so it "
            "needs several seeds per setting).")


def _cmi_note(r: Report) -> str | None:
    if any(ln.cmi is not None and not math.isnan(ln.cmi.score) for ln in r.lines):
        return None
    varied = len([f for f in r.factors if f != "seed"])
    why = (f"this zoo varies {varied}" if varied < 2 else
           f"given any two of this zoo's {varied}, the order of the target in every group of pairs is already "
           "decided (no entropy left to explain), as where each setting has one model and only two hyperparameters vary")
    return ("The conditional mutual information score is left out: it conditions on two hyperparameters at a time "
            f"(the PGDL scoring program's rule), and {why}.")


def granulated_table(r: Report) -> tuple[str, list[str], list[list], list[str]] | None:
    """The per-hyperparameter table: its caption, columns and rows (a tau as a float, a score as
    text), and the notes on the columns left out; None where the zoo has no factor or target."""
    if not (r.factors and r.targets):
        return None
    sign_note, cmi_note = _sign_error_note(r), _cmi_note(r)
    weighting = (f"Hoeffding-weighted, {r.n_test} test examples" if r.n_test else "unweighted: test-set size unknown")
    columns = ["tau", "Psi"] + ([] if cmi_note else ["CMI"]) + ([] if sign_note else ["sign-err robust / mean"])
    caption = (f"Granulated tau per hyperparameter (vs {TARGETS[r.target]}; Jiang et al. 2020's sign sum within each "
               "group), overall tau, Psi")
    if not cmi_note:
        caption += (", the conditional mutual information score (CMI, as the PGDL scoring program computes it: "
                    "the minimum over pairs of hyperparameters conditioned on)")
    if not sign_note:
        caption += (f", the sign-error over coupled pairs (Dziugaite et al. 2020: environments of two settings that "
                    f"differ in one hyperparameter, every run against every run, {weighting}, effective sample size "
                    ">= 12; robust = the worst environment, and the mean over them; 0.5 is a coin flip)")
    rows = []
    for ln in r.lines:
        cells = [ln.name] + [ln.granulated.psi.get(f, float("nan")) for f in r.factors]
        cells += [ln.taus[r.target].tau, ln.granulated.Psi]
        if not cmi_note:
            cells.append(_plain(ln.cmi.score))
        if not sign_note:
            cells.append(f"{_plain(ln.sign_error.robust)} / {_plain(ln.sign_error.mean)}")
        rows.append(cells)
    return caption, ["definition"] + r.factors + columns, rows, [n for n in (cmi_note, sign_note) if n]


def _markdown(r: Report, ci: bool) -> str:
    head = ["definition", "n"] + [f"tau {TARGETS[t]}" for t in r.targets] + ["Psi"]
    sel = "" if r.max_train_error is None else f" with train error <= {r.max_train_error:g}"
    out = [f"Kendall tau-b between each measure and generalization over {r.n_checkpoints} checkpoints{sel}"
           + (f" ({r.n_errors} failed rows left out)" if r.n_errors else "")
           + ("; [95% bootstrap CI]" if ci else "") + f"; Psi = mean granulated tau vs {TARGETS[r.target]}.",
           "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ln in r.lines:
        cells = [ln.name, str(ln.n)] + [_cell(ln.taus[t], ci) for t in r.targets] + [_fmt(ln.granulated.Psi, 2)]
        out.append("| " + " | ".join(cells) + " |")
    granulated = granulated_table(r)
    if granulated:
        caption, columns, rows, said = granulated
        out += ["", caption + ":", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for cells in rows:
            out.append("| " + " | ".join(c if isinstance(c, str) else _fmt(c, 2) for c in cells) + " |")
        out += [""] + said
    if r.notes:
        out += [""] + r.notes
    if r.covers:
        out += [""] + r.covers
    return "\n".join(out).rstrip("\n")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", s).strip("_")


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def scatter_markers(hparams: list[dict]) -> dict[str, str]:
    """A marker per architecture (the ``arch`` hyperparameter), distinct for up to eight: the colour is
    the ``color_by`` level, so two architectures at one level differ by their marker."""
    archs = sorted({str(h.get("arch", "")) for h in hparams})
    return {arch: MARKERS[i % len(MARKERS)] for i, arch in enumerate(archs)}


def _plot(path: str, name: str, values: list[float], metrics: list[dict], hparams: list[dict],
          color_by: str | None, taus: dict[str, Any], targets: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    v = np.asarray(values, dtype=float)
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.6), squeeze=False)
    labels = [str(h.get(color_by)) for h in hparams] if color_by else ["all"] * len(v)
    levels = sorted(set(labels), key=lambda s: (len(s), s))
    cmap = plt.get_cmap("viridis" if len(levels) > 2 else "coolwarm")
    colors = {lv: cmap(i / max(1, len(levels) - 1)) for i, lv in enumerate(levels)}
    markers = scatter_markers(hparams)
    log_x = bool(np.all(v > 0) and v.max() / v.min() > 20)
    for ax, t in zip(axes[0], targets):
        tname = TARGETS[t]
        e = np.asarray([m.get(t, np.nan) for m in metrics], dtype=float)
        for lv in levels:
            for arch in sorted({str(h.get("arch", "")) for h in hparams}):
                sel = [i for i in range(len(v)) if labels[i] == lv and str(hparams[i].get("arch", "")) == arch]
                if sel:
                    ax.scatter(v[sel], e[sel], color=colors[lv], marker=markers[arch], s=22,
                               alpha=0.85, edgecolors="none",
                               label=f"{color_by}={lv}" + (f" {arch}" if arch else "") if color_by else arch or None)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel("sharpness")
        ax.set_ylabel(tname)
        ax.set_title(f"tau = {_fmt(taus[t].tau, 2)}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    n_err = sum(r.status != "ok" for r in rows)
    ids_all = sorted(ckpts)
    hp_all = [ckpts[c]["hparams"] for c in ids_all]
    factors = varying_factors(hp_all)
    if n_test is None:
        recorded = {h.get("n_test") for h in hp_all}
        n_test = recorded.pop() if len(recorded) == 1 and isinstance(next(iter(recorded)), int) else None
    if color_by is None:   # lr where it varies, else the first hyperparameter that does
        color_by = "lr" if "lr" in factors else (factors[0] if factors else None)
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
    report = Report(lines, factors, target, len(ids_all), n_err, max_train_error, n_test, targets=targets,
                    notes=notes, covers=_covers(ckpts, defs, zoo_data, zoo_root))
    if out_dir is None:
        return report
    os.makedirs(out_dir, exist_ok=True)
    plot_files, figures = [], []
    if plots:
        pdir = os.path.join(out_dir, "plots")
        os.makedirs(pdir, exist_ok=True)
        for ln in lines:
            if ln.key is None or ln.n < 2 or not targets:
                continue
            fname = _slug(ln.name) + ".png"
            metrics, hparams = [ckpts[c]["metrics"] for c in ln.ids], [ckpts[c]["hparams"] for c in ln.ids]
            _plot(os.path.join(pdir, fname), ln.name, ln.values, metrics, hparams, color_by, ln.taus, targets)
            plot_files.append((ln.name, os.path.join("plots", fname)))
            figures.append(report_html.scatter_figure(ln.name, ln.values, ln.ids, metrics, hparams, color_by, ln.taus,
                                                      {t: TARGETS[t] for t in targets}, scatter_markers(hparams)))
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("# sharpfast report\n\n" + report.markdown() + "\n")
        for name, rel in plot_files:
            f.write(f"\n![{name}]({rel})\n")
    html_path = os.path.join(out_dir, "report.html")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(report_html.page(report, ckpts, defs, figures))
    csv_path = os.path.join(out_dir, "results.csv")
    metric_names = sorted({k for c in ckpts.values() for k in c["metrics"]})
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint_id", "definition", "rho", "status", "sharpness", "err_sharpness", "time_s",
                    "error"] + factors + metric_names)
        for r in rows:
            c = ckpts.get(r.checkpoint_id, {"hparams": {}, "metrics": {}})
            d = defs.get(r.definition_key, {"name": r.definition_key, "rho": None})
            w.writerow([r.checkpoint_id, d["name"], d["rho"], r.status, r.value, r.err_value, r.time_s,
                        r.error or ""] + [c["hparams"].get(k) for k in factors]
                       + [c["metrics"].get(k) for k in metric_names])
    report.files = [md_path, html_path, csv_path] + [os.path.join(out_dir, p) for _, p in plot_files]
    return report
