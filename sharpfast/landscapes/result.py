"""A loss landscape: the grid, its loss and error, the directions, and how it was made; plots in
the public code's style and its h5 files."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# the public code's 2-D contour levels (plot_2D.py: vmin, vmax, vlevel) and 1-D loss ceiling (plot_1D.py)
CONTOUR_LEVELS = (0.1, 10.0, 0.5)
LOSS_MAX_1D = 5.0


@dataclass
class LandscapeResult:
    """``loss`` and ``error`` are ``[len(x)]`` for a 1-D landscape and ``[len(y), len(x)]`` for a 2-D
    one: ``loss[i, j]`` is the loss at ``w + x[j] d1 + y[i] d2`` (rows follow y, as the public code's
    h5 surface, whose buffer is filled in (y, x) order). ``error`` is the classification error
    (a fraction; None where the targets are not class labels). ``directions``: the normalized
    directions, one ``{name: tensor}`` per axis; ``keys``: their Philox keys ``(seed, stream,
    sample)`` per name (None for directions not drawn)."""

    x: np.ndarray
    y: np.ndarray | None
    loss: np.ndarray
    error: np.ndarray | None
    base_loss: float
    base_error: float | None
    directions: list[dict[str, torch.Tensor]]
    keys: list[dict[str, tuple] | None]
    kind: str
    norm: str | None
    ignore: str | None
    dir_type: str
    cosine: float | None = None
    eigenvalues: list[float] | None = None     # kind "hessian": the directions' eigenvalues ...
    residuals: list[float] | None = None       # ... and ||H v - lambda v||
    explained_variance: list[float] | None = None   # kind "pca"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> np.ndarray | None:
        """``100 (1 - error)``: the public code's train accuracy, in %."""
        return None if self.error is None else 100.0 * (1.0 - self.error)

    def curvature_along(self, axis: int = 0) -> float:
        """The second difference at the origin along an axis, ``(L(h) - 2 L(0) + L(-h)) / h^2``, which
        tends to ``d^T H d`` as the grid's step ``h`` shrinks (needs 0 and +-h on that axis)."""
        coords = self.x if axis == 0 else self.y
        if coords is None:
            raise ValueError(f"the landscape has no axis {axis}")
        line = self.loss if self.y is None else (self.loss[_index(self.y, 0.0)] if axis == 0
                                                 else self.loss[:, _index(self.x, 0.0)])
        i = _index(coords, 0.0)
        if i == 0 or i == len(coords) - 1:
            raise ValueError("the grid needs points on both sides of 0 for a second difference")
        h_minus, h_plus = coords[i] - coords[i - 1], coords[i + 1] - coords[i]
        if not np.isclose(h_minus, h_plus, rtol=1e-9, atol=0):
            raise ValueError("the grid's steps around 0 differ: a second difference needs them equal")
        return float((line[i + 1] - 2 * line[i] + line[i - 1]) / (h_plus * h_minus))

    # -- plots ----------------------------------------------------------------------------------
    def plot(self, path: str | None = None, log: bool = False, levels: tuple = CONTOUR_LEVELS):
        """1-D: the loss (left axis, ``log``: semilog) and the error in % (right axis); the
        interpolation's alpha = 0 and 1 marked. 2-D: the contour and the filled contour at the
        public code's levels, a colorbar, the origin marked. Axis units: the normalization."""
        import matplotlib
        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        units = {"filter": "filter-normalized", "layer": "layer-normalized", "weight": "|w|-scaled",
                 "dfilter": "unit filters", "dlayer": "unit layers", None: "absolute"}[self.norm]
        if self.y is None:
            fig, ax = plt.subplots(figsize=(6, 4))
            (ax.semilogy if log else ax.plot)(self.x, self.loss, "b-", label="loss")
            ax.set_ylabel("loss")
            ax.set_xlabel("alpha (model -> model2)" if self.kind == "interpolate" else f"direction 1 ({units})")
            if not log:
                ax.set_ylim(0, max(LOSS_MAX_1D, float(np.nanmax(self.loss))) if np.isfinite(self.loss).all() else None)
            if self.kind == "interpolate":
                for a in (0.0, 1.0):
                    ax.axvline(a, color="0.6", linestyle=":")
            if self.error is not None:
                twin = ax.twinx()
                twin.plot(self.x, 100 * self.error, "r--", label="error")
                twin.set_ylabel("error (%)")
                twin.set_ylim(0, 100)
        else:
            fig, ax = plt.subplots(figsize=(6, 5))
            X, Y = np.meshgrid(self.x, self.y)
            vmin, vmax, step = levels
            lv = np.arange(vmin, vmax, step)
            filled = ax.contourf(X, Y, self.loss, levels=lv, cmap="summer", extend="max")
            ax.contour(X, Y, self.loss, levels=lv, colors="k", linewidths=0.5)
            fig.colorbar(filled, ax=ax, label="loss")
            ax.plot([0], [0], "r*", markersize=10)
            ax.set_xlabel(f"direction 1 ({units})")
            ax.set_ylabel(f"direction 2 ({units})")
        ax.set_title(f"{self.kind} landscape, base loss {self.base_loss:.4g}")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return fig

    # -- the public code's files --------------------------------------------------------------------
    def to_h5(self, surface_path: str, directions_path: str | None = None) -> None:
        """The surface file (``dir_file``, ``xcoordinates``, ``ycoordinates``, ``train_loss``,
        ``train_acc``: the public code's names, its ``(ny, nx)`` buffer order) and the direction
        file (groups ``xdirection`` / ``ydirection``, one dataset per tensor named "0", "1", ... in
        the model's order). Needs h5py."""
        try:
            import h5py
        except ImportError as e:
            raise ImportError("to_h5 needs h5py: pip install h5py") from e
        directions_path = directions_path or surface_path.rsplit(".", 1)[0] + "_directions.h5"
        with h5py.File(directions_path, "w") as f:
            for group, d in zip(("xdirection", "ydirection"), self.directions):
                g = f.create_group(group)
                for i, t in enumerate(d.values()):
                    g.create_dataset(str(i), data=t.detach().cpu().numpy())
        with h5py.File(surface_path, "w") as f:
            f["dir_file"] = directions_path
            f["xcoordinates"] = self.x
            if self.y is not None:
                f["ycoordinates"] = self.y
            f["train_loss"] = self.loss
            if self.accuracy is not None:
                f["train_acc"] = self.accuracy


def _index(coords: np.ndarray, value: float) -> int:
    hits = np.flatnonzero(np.isclose(coords, value, rtol=0, atol=1e-12))
    if len(hits) == 0:
        raise ValueError(f"the grid has no point at {value}")
    return int(hits[0])
