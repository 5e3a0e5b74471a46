"""Loss landscapes of chosen zoo checkpoints (``sharpfast landscape --zoo ZOO [--ids ...] --out DIR``),
and their section of the report: each checkpoint's plot, its base loss and the curvature along each
direction (the second difference at the origin, ``d^T H d``) beside its sharpness values.

The landscape command writes ``landscapes.json`` (and a PNG, and the public code's h5 files where
h5py is installed) into DIR; ``sharpfast report --out DIR`` shows what it finds there.
"""
from __future__ import annotations

import base64
import json
import os

import sharpfast

from ..zoo.checkpoints import Manifest, load_model
from .esd import chosen

SUMMARY = "landscapes.json"


def compute(zoo: str, out_dir: str, ids: list[str] | None = None, n_examples: int | None = None, m: int = 128,
            x=(-1.0, 1.0, 51), y=None, kind: str = "random", norm: str | None = "auto", seed: int = 0,
            log=print) -> list[dict]:
    """The landscape of each chosen checkpoint (default: the best and the worst by test error) on
    the zoo's sharpness examples (``n_examples`` as a sweep takes them); returns the summary it writes."""
    from ..definitions import Definition, check_data, fit_to_data

    manifest = Manifest.load(zoo)
    entries = chosen(manifest, ids)
    d = Definition("trace", m=m, n_examples=n_examples)
    if n_examples is None:
        (d,), message = fit_to_data(manifest, [d])
        if message:
            log(f"landscape: {message}")
    check_data(manifest, [d])
    xs, ys = manifest.sharpness_data(d.n_examples)
    batches = [(xs[i:i + m], ys[i:i + m]) for i in range(0, d.n_examples, m)]
    os.makedirs(out_dir, exist_ok=True)
    summary = []
    for entry in entries:
        r = sharpfast.landscape(load_model(manifest, entry), batches, x=x, y=y, kind=kind, norm=norm, seed=seed)
        png = f"landscape-{entry.id}.png"
        r.plot(os.path.join(out_dir, png))
        files = [png]
        try:
            r.to_h5(os.path.join(out_dir, f"landscape-{entry.id}.h5"),
                    os.path.join(out_dir, f"landscape-{entry.id}-directions.h5"))
            files += [f"landscape-{entry.id}.h5", f"landscape-{entry.id}-directions.h5"]
        except ImportError:
            pass   # the h5 files need h5py (pip install h5py); the plot and the summary do not
        summary.append(dict(id=entry.id, test_error=entry.metrics.get("test_error"), base_loss=r.base_loss,
                            curvature=[_curvature(r, a) for a in range(1 if r.y is None else 2)], kind=kind,
                            norm=r.norm, n_examples=d.n_examples, points=r.meta["points"],
                            seconds=r.meta["seconds"], files=files))
        log(f"landscape: {entry.id}: base loss {r.base_loss:.4g} ({r.meta['points']} points, "
            f"{r.meta['seconds']:.1f}s) -> {os.path.join(out_dir, png)}")
    with open(os.path.join(out_dir, SUMMARY), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary


def _curvature(r, axis: int) -> float | None:
    try:
        return r.curvature_along(axis)
    except ValueError:   # a grid without 0 and equal steps around it
        return None


def load(out_dir: str) -> list[dict] | None:
    path = os.path.join(out_dir, SUMMARY)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _sharpness_by_checkpoint(report, ids: set[str]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The report's measured definitions, and each chosen checkpoint's value of each."""
    names = [ln.name for ln in report.lines if ln.key is not None]
    by_key = {ln.key: ln.name for ln in report.lines if ln.key is not None}
    values: dict[str, dict[str, float]] = {i: {} for i in ids}
    for row in report.rows:
        if row.checkpoint_id in ids and row.status == "ok" and row.definition_key in by_key:
            values[row.checkpoint_id][by_key[row.definition_key]] = row.value
    return names, values


def table(report, summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    names, values = _sharpness_by_checkpoint(report, {s["id"] for s in summary})
    axes = max(len(s["curvature"]) for s in summary)
    head = ["checkpoint", "test error", "base loss"] + [f"d{a + 1}^T H d{a + 1}" for a in range(axes)] + names
    fmt = lambda v: "-" if v is None else f"{v:.4g}"
    rows = [[s["id"], fmt(s["test_error"]), fmt(s["base_loss"])]
            + [fmt(c) for c in s["curvature"]] + [""] * (axes - len(s["curvature"]))
            + [fmt(values[s["id"]].get(n)) for n in names] for s in summary]
    return head, rows


def markdown(report, summary: list[dict]) -> str:
    head, rows = table(report, summary)
    out = ["## Loss landscapes", "",
           f"Along {summary[0]['norm'] or 'unnormalized'} directions ({summary[0]['kind']}), on "
           f"{summary[0]['n_examples']} examples; d^T H d: the second difference at the origin.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out += [""] + [f"![{s['id']}]({s['files'][0]})" for s in summary]
    return "\n".join(out)


def html(report, summary: list[dict], out_dir: str) -> str:
    """The section for the self-contained page: the table, the plots inlined."""
    head, rows = table(report, summary)
    cells = lambda r, tag: "".join(f"<{tag}>{c}</{tag}>" for c in r)
    images = []
    for s in summary:
        with open(os.path.join(out_dir, s["files"][0]), "rb") as f:
            data = base64.b64encode(f.read()).decode()
        images.append(f'<figure><img alt="{s["id"]}" src="data:image/png;base64,{data}"><figcaption>{s["id"]}'
                      "</figcaption></figure>")
    return ("<h2>Loss landscapes</h2><table><tr>" + cells(head, "th") + "</tr>"
            + "".join("<tr>" + cells(r, "td") + "</tr>" for r in rows) + "</table>" + "".join(images))
