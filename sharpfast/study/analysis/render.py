"""The report written out: markdown with a PNG scatter plot per definition, the CSV of every row,
and the interactive page (:mod:`.report_html`); the text of its tables and notes."""
from __future__ import annotations

import csv
import math
import os
import re
from typing import Any

import numpy as np

from . import landscapes, report_html
from .report_html import signed


def _plain(x: float) -> str:
    """A score in [0, 1], no sign."""
    return "n/a" if x is None or math.isnan(x) else f"{x:.2f}"


def _cell(c: Any, ci: bool) -> str:
    s = signed(c.tau)
    if ci and not math.isnan(c.low):
        s += f" [{signed(c.low)}, {signed(c.high)}]"
    return s


def _sign_error_note(r) -> str | None:
    """Why no line has a sign-error, where none has (else None)."""
    errors = [ln.sign_error for ln in r.lines if ln.sign_error is not None]
    if not errors or any(e.n_environments for e in errors):
        return None
    max_ess = max(e.max_ess for e in errors)
    return (f"The robust sign-error is left out: no environment (two settings that differ in one hyperparameter) "
            f"reaches the effective sample size of {errors[0].min_ess:g} that Dziugaite et al. require (the largest "
            f"here is {max_ess:.1f}; with k runs per setting an environment has at most k^2 pairs of runs, so it "
            "needs several seeds per setting).")


def _cmi_note(r) -> str | None:
    if any(ln.cmi is not None and not math.isnan(ln.cmi.score) for ln in r.lines):
        return None
    varied = len([f for f in r.factors if f != "seed"])
    why = (f"this zoo varies {varied}" if varied < 2 else
           f"given any two of this zoo's {varied}, the order of the target in every group of pairs is already "
           "decided (no entropy left to explain), as where each setting has one model and only two hyperparameters vary")
    return ("The conditional mutual information score is left out: it conditions on two hyperparameters at a time "
            f"(the PGDL scoring program's rule), and {why}.")


def granulated_table(r) -> tuple[str, list[str], list[list], list[str]] | None:
    """The per-hyperparameter table: its caption, columns and rows (a tau as a float, a score as
    text), and the notes on the columns left out; None where the zoo has no factor or target."""
    if not (r.factors and r.targets):
        return None
    sign_note, cmi_note = _sign_error_note(r), _cmi_note(r)
    weighting = (f"Hoeffding-weighted, {r.n_test} test examples" if r.n_test else "unweighted: test-set size unknown")
    columns = ["tau", "Psi"] + ([] if cmi_note else ["CMI"]) + ([] if sign_note else ["sign-err robust / mean"])
    caption = (f"Granulated tau per hyperparameter (vs {r.target_name(r.target)}; Jiang et al. 2020's sign sum within each "
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


def markdown(r, ci: bool) -> str:
    head = ["definition", "n"] + [f"tau {r.target_name(t)}" for t in r.targets] + ["Psi"]
    sel = "" if r.max_train_error is None else f" with train error <= {r.max_train_error:g}"
    out = [f"Kendall tau-b between each measure and generalization over {r.n_checkpoints} checkpoints{sel}"
           + (f" ({r.n_errors} failed rows left out)" if r.n_errors else "")
           + ("; [95% bootstrap CI]" if ci else "") + f"; Psi = mean granulated tau vs {r.target_name(r.target)}.",
           "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ln in r.lines:
        cells = [ln.name, str(ln.n)] + [_cell(ln.taus[t], ci) for t in r.targets] + [signed(ln.granulated.Psi)]
        out.append("| " + " | ".join(cells) + " |")
    granulated = granulated_table(r)
    if granulated:
        caption, columns, rows, said = granulated
        out += ["", caption + ":", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for cells in rows:
            out.append("| " + " | ".join(c if isinstance(c, str) else signed(c) for c in cells) + " |")
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
          color_by: str | None, taus: dict[str, Any], targets: dict[str, str]) -> None:
    """The PNG scatter plot of one definition against each target (``{key: name}``)."""
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
    for ax, (t, tname) in zip(axes[0], targets.items()):
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
        ax.set_title(f"tau = {signed(taus[t].tau)}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report, out_dir: str, plots: bool = True) -> list[str]:
    """Write ``report`` (a :class:`~.report.Report`) into ``out_dir``; return the files written."""
    ckpts, defs, rows, factors, color_by = report.ckpts, report.defs, report.rows, report.factors, report.color_by
    targets = {t: report.target_name(t) for t in report.targets}
    os.makedirs(out_dir, exist_ok=True)
    plot_files, figures = [], []
    if plots:
        pdir = os.path.join(out_dir, "plots")
        os.makedirs(pdir, exist_ok=True)
        for ln in report.lines:
            if ln.key is None or ln.n < 2 or not report.targets:
                continue
            fname = _slug(ln.name) + ".png"
            metrics, hparams = [ckpts[c]["metrics"] for c in ln.ids], [ckpts[c]["hparams"] for c in ln.ids]
            _plot(os.path.join(pdir, fname), ln.name, ln.values, metrics, hparams, color_by, ln.taus, targets)
            plot_files.append((ln.name, os.path.join("plots", fname)))
            figures.append(report_html.scatter_figure(ln.name, ln.values, ln.ids, metrics, hparams, color_by, ln.taus,
                                                      targets, scatter_markers(hparams)))
    shapes = landscapes.load(out_dir)   # written by `sharpfast landscape --out` into the same folder
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("# sharpfast report\n\n" + report.markdown() + "\n")
        for name, rel in plot_files:
            f.write(f"\n![{name}]({rel})\n")
        if shapes:
            f.write("\n" + landscapes.markdown(report, shapes) + "\n")
    html_path = os.path.join(out_dir, "report.html")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(report_html.page(report, figures, [landscapes.html(report, shapes, out_dir)] if shapes else []))
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
    return [md_path, html_path, csv_path] + [os.path.join(out_dir, p) for _, p in plot_files]
