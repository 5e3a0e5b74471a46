"""The report as a page a researcher reads in a browser: what was measured first, then the tau
tables coloured on a diverging scale with their confidence intervals drawn, then one interactive
scatter plot per definition whose points name their checkpoint and hyperparameters on hover.

One self-contained file: Plotly's JavaScript is written into the page once, so it opens offline
and can be mailed or archived as it is. ``report.md`` keeps the static PNGs.
"""
from __future__ import annotations

import html
import math

import numpy as np

from .stats import BootstrapCI

# A diverging scale for tau in [-1, 1]: blue where sharper models generalize better, red where
# they generalize worse (the hypothesis under test), white at 0 (ColorBrewer RdBu's ends).
NEGATIVE, POSITIVE = (33, 102, 172), (178, 24, 43)
# Plotly's names for the PNGs' matplotlib markers (render.MARKERS), in the same order
SYMBOLS = {"o": "circle", "s": "square", "^": "triangle-up", "D": "diamond", "v": "triangle-down", "P": "cross",
           "X": "x", "*": "star"}

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1400px;
     padding:0 1.5em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
.summary{background:#f6f8fa;border:1px solid #d8dee4;border-radius:6px;padding:.8em 1.2em}
.summary dl{display:grid;grid-template-columns:max-content 1fr;gap:.25em 1.2em;margin:.4em 0}
.summary dt{font-weight:600} .summary dd{margin:0}
.legend{font-size:.9em;color:#444}
.swatch{display:inline-block;width:80px;height:.8em;vertical-align:middle;border:1px solid #ccc;
        background:linear-gradient(to right,rgb(33,102,172),#fff,rgb(178,24,43))}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:4px 9px;text-align:right;vertical-align:middle}
th{background:#f6f8fa;position:sticky;top:0} td:first-child,th:first-child{text-align:left}
td.tau{min-width:7.5em} td.tau .v{font-weight:600;font-variant-numeric:tabular-nums}
td.tau .ci{display:block;font-size:.8em;font-variant-numeric:tabular-nums}
td.tau svg{display:block;margin:2px auto 0}
ul.notes li{margin:.25em 0}
.plot{margin:1em 0 2em}
"""


def tau_colour(tau: float) -> str:
    """The cell colour of ``tau`` on the diverging scale (light grey where it is undefined)."""
    if tau is None or math.isnan(tau):
        return "#eeeeee"
    end = POSITIVE if tau > 0 else NEGATIVE
    a = min(1.0, abs(tau))
    return "rgb({},{},{})".format(*(round(255 + (e - 255) * a) for e in end))


def signed(x: float, digits: int = 2) -> str:
    """A statistic with its sign, as every table of the report writes it ("n/a" where undefined)."""
    return "n/a" if x is None or math.isnan(x) else f"{x:+.{digits}f}"


def _ci_bar(c: BootstrapCI, dark: bool) -> str:
    """The interval and the estimate on [-1, 1], zero marked: the width of the CI at a glance."""
    x = lambda t: 2 + 86 * (min(1.0, max(-1.0, t)) + 1) / 2
    ink = "#fff" if dark else "#333"
    parts = [f"<line x1='2' x2='88' y1='5' y2='5' stroke='{ink}' stroke-opacity='.3'/>",
             f"<line x1='{x(0):.1f}' x2='{x(0):.1f}' y1='1' y2='9' stroke='{ink}' stroke-opacity='.5'/>"]
    if not (math.isnan(c.low) or math.isnan(c.high)):
        parts.append(f"<line x1='{x(c.low):.1f}' x2='{x(c.high):.1f}' y1='5' y2='5' stroke='{ink}' stroke-width='2'/>")
    if not math.isnan(c.tau):
        parts.append(f"<circle cx='{x(c.tau):.1f}' cy='5' r='2.6' fill='{ink}'/>")
    return f"<svg width='90' height='10' aria-hidden='true'>{''.join(parts)}</svg>"


def _cell_style(tau: float) -> tuple[str, bool]:
    """A tau cell's colours, and whether its ink is light (on a dark cell)."""
    dark = not math.isnan(tau) and abs(tau) > 0.55
    return f"background:{tau_colour(tau)};color:{'#fff' if dark else '#222'}", dark


def tau_cell(c: BootstrapCI, what: str) -> str:
    """A tau with its 95% bootstrap interval: the number, the interval in words and drawn, the colour."""
    style, dark = _cell_style(c.tau)
    has_ci = not (math.isnan(c.low) or math.isnan(c.high))
    ci = f"[{signed(c.low)}, {signed(c.high)}]" if has_ci else ""
    title = f"{what}: tau = {signed(c.tau, 3)}" + (f", 95% bootstrap CI {ci}" if has_ci else "")
    return (f"<td class='tau' style='{style}' title='{html.escape(title)}'><span class='v'>{signed(c.tau)}</span>"
            f"<span class='ci'>{ci}</span>{_ci_bar(c, dark) if has_ci else ''}</td>")


def _plain_tau_cell(tau: float, what: str) -> str:
    title = html.escape(f"{what}: {signed(tau, 3)}")
    return f"<td class='tau' style='{_cell_style(tau)[0]}' title='{title}'><span class='v'>{signed(tau)}</span></td>"


def _summary(r) -> str:
    """What was measured, on what (the zoo, its data, architectures and examples: ``r.covers``), and
    what was left out: the first thing on the page."""
    measured = [ln for ln in r.lines if ln.key is not None]
    items = [("Models", f"{r.n_checkpoints} checkpoints"
              + (f" with train error <= {r.max_train_error:g}" if r.max_train_error is not None else ""))]
    if r.factors:
        items.append(("Varied", ", ".join(r.factors)))
    items.append(("Definitions", f"{len(measured)} reported of {len(r.defs)} in the store"
                  + (f"; {r.n_errors} failed rows left out" if r.n_errors else "")))
    items.append(("Targets", ", ".join(r.target_name(t) for t in r.targets) or "none recorded"))
    dl = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items)
    covers = "".join(f"<p>{html.escape(line)}</p>" for line in r.covers)
    notes = ("<p><b>Left out, and why</b></p><ul class='notes'>"
             + "".join(f"<li>{html.escape(n)}</li>" for n in r.notes) + "</ul>") if r.notes else ""
    legend = ("<p class='legend'>Cells are coloured by tau: <span class='swatch'></span> -1 (sharper models "
              "generalize better) to +1 (sharper models generalize worse, the hypothesis under test); the bar under "
              "each value is its 95% bootstrap confidence interval on [-1, 1], the tick at 0.</p>")
    return f"<section class='summary'><dl>{dl}</dl>{covers}{notes}</section>{legend}"


def _tau_table(r) -> str:
    sel = "" if r.max_train_error is None else f" with train error <= {r.max_train_error:g}"
    head = ("<tr><th>definition</th><th>n</th>"
            + "".join(f"<th>tau {html.escape(r.target_name(t))}</th>" for t in r.targets)
            + f"<th title='mean granulated tau vs {html.escape(r.target_name(r.target))}'>Psi</th></tr>")
    rows = []
    for ln in r.lines:
        cells = [f"<td>{html.escape(ln.name)}</td>", f"<td>{ln.n}</td>"]
        cells += [tau_cell(ln.taus[t], f"{ln.name} vs {r.target_name(t)}") for t in r.targets]
        cells.append(_plain_tau_cell(ln.granulated.Psi, f"{ln.name}: Psi"))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    caption = (f"Kendall tau-b between each measure and generalization over {r.n_checkpoints} checkpoints{sel}, "
               f"with its 95% bootstrap confidence interval; Psi = mean granulated tau vs "
               f"{r.target_name(r.target)}.")
    return f"<h2>Kendall tau</h2><p>{html.escape(caption)}</p><table>{head}{''.join(rows)}</table>"


def _granulated_table(r) -> str:
    """Tau per hyperparameter, coloured like tau; CMI and sign-error as text."""
    table = r.granulated_table()
    if table is None:
        return ""
    caption, columns, rows, said = table
    out = ["<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"]
    for cells in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" if isinstance(c, str) else
                                    _plain_tau_cell(c, f"{cells[0]}: {columns[i]}") for i, c in enumerate(cells))
                   + "</tr>")
    return (f"<h2>Per hyperparameter</h2><p>{html.escape(caption)}.</p><table>{''.join(out)}</table>"
            + "".join(f"<p>{html.escape(n)}</p>" for n in said))


def scatter_figure(name: str, values: list[float], ids: list[str], metrics: list[dict], hparams: list[dict],
                   color_by: str | None, taus: dict[str, BootstrapCI], targets: dict[str, str],
                   markers: dict[str, str]):
    """A Plotly figure: the measure against each target (``{key: name}``), one panel per target,
    coloured by ``color_by``, one marker per architecture (``markers``: the PNGs' matplotlib
    markers); hovering a point names its checkpoint, its hyperparameters and both values."""
    from plotly.colors import sample_colorscale
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    v = np.asarray(values, dtype=float)
    labels = [str(h.get(color_by)) for h in hparams] if color_by else ["all"] * len(v)
    levels = sorted(set(labels), key=lambda s: (len(s), s))
    palette = sample_colorscale("Viridis", [i / max(1, len(levels) - 1) for i in range(len(levels))]) \
        if len(levels) > 2 else ["rgb(59,76,192)", "rgb(180,4,38)"][:len(levels)]
    colours = dict(zip(levels, palette))
    archs = sorted({str(h.get("arch", "")) for h in hparams})
    about = [f"<b>{html.escape(i)}</b><br>" + "<br>".join(f"{html.escape(str(k))} = {html.escape(str(x))}"
                                                           for k, x in sorted(h.items())) for i, h in zip(ids, hparams)]
    fig = make_subplots(rows=1, cols=len(targets), horizontal_spacing=0.07,
                        subplot_titles=[f"{tname}: tau = {signed(taus[t].tau)}" for t, tname in targets.items()])
    for col, (t, tname) in enumerate(targets.items(), start=1):
        e = np.asarray([m.get(t, np.nan) for m in metrics], dtype=float)
        for lv in levels:
            for arch in archs:
                sel = [i for i in range(len(v)) if labels[i] == lv and str(hparams[i].get("arch", "")) == arch]
                if not sel:
                    continue
                legend = (f"{color_by}={lv}" if color_by else "all") + (f" {arch}" if arch else "")
                fig.add_trace(go.Scatter(
                    x=v[sel], y=e[sel], mode="markers", name=legend, legendgroup=legend, showlegend=col == 1,
                    marker=dict(color=colours[lv], symbol=SYMBOLS[markers[arch]], size=9, opacity=0.85,
                                line=dict(width=0.5, color="#333")),
                    text=[about[i] for i in sel],
                    hovertemplate=f"%{{text}}<br>sharpness = %{{x:.4g}}<br>{tname} = %{{y:.4g}}<extra></extra>"),
                    row=1, col=col)
        fig.update_xaxes(title_text="sharpness", row=1, col=col,
                         type="log" if bool(np.all(v > 0) and v.max() / v.min() > 20) else "linear")
        fig.update_yaxes(title_text=tname, row=1, col=col)
    fig.update_layout(title=dict(text=html.escape(name), font=dict(size=14)), height=460, autosize=True,
                      template="plotly_white", margin=dict(l=60, r=20, t=70, b=40),
                      legend=dict(orientation="h", yanchor="top", y=-0.18, font=dict(size=11),
                                  title=dict(text=f"{color_by}, arch: " if color_by else "")))
    return fig


def page(r, figures: list, sections: list[str] = ()) -> str:
    """The report's HTML: summary, tau tables, then ``figures`` (Plotly figures) with Plotly's
    JavaScript inlined once, then ``sections`` (HTML of their own: the loss landscapes)."""
    body = [_summary(r)]
    if r.lines and r.targets:
        body += [_tau_table(r), _granulated_table(r)]
    if figures:
        body.append("<h2>Each definition against generalization</h2><p class='legend'>Hover a point for its "
                    "checkpoint and hyperparameters; click a legend entry to hide it, double-click to show it "
                    "alone.</p>")
        for i, fig in enumerate(figures):
            body.append("<div class='plot'>" + fig.to_html(full_html=False, include_plotlyjs=i == 0,
                                                            config={"displaylogo": False, "responsive": True}) + "</div>")
    body += list(sections)
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>sharpfast report</title>"
            f"<style>{STYLE}</style></head><body><h1>sharpfast: sharpness vs generalization</h1>"
            + "\n".join(body) + "</body></html>")
