"""Per-example score distributions (GraNd, EL2N), split by a label such as 'flipped'."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..arrays import to_numpy
from ._axes import figure_and_axes, style_width

__all__ = ["scores"]


def _array(x, name: str) -> np.ndarray:
    arr = to_numpy(x)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    return arr


def scores(
    values,
    labels=None,
    ax: Axes | None = None,
    *,
    bins: int = 40,
    names: dict | None = None,
    xlabel: str = "score",
    density: bool = True,
) -> Figure:
    """Histograms of per-example scores, one per group, and return the Figure.

    Parameters
    ----------
    values:
        ``(N,)`` scores (``dd.grand_scores``, ``dd.el2n_scores``, or the
        ``grand_scores``/``el2n_scores`` arrays of the DataScores probe).
    labels:
        ``(N,)`` boolean mask (e.g. which labels were flipped: drawn as "True"/
        "False" unless ``names`` says otherwise) or group labels; None draws one
        histogram.
    bins:
        Number of bins, shared by every group (common edges over all scores).
    names:
        Display name per label value, e.g. ``{True: "flipped", False: "clean"}``.
    density:
        Normalise each group's histogram (groups of very different sizes stay
        comparable); counts otherwise.
    """
    v = _array(values, "values").astype(float)
    if not np.isfinite(v).all():
        raise ValueError("values must be finite")
    if labels is None:
        groups = np.zeros(v.size, dtype=int)
        names = names or {0: None}
    else:
        groups = _array(labels, "labels")
        if groups.size != v.size:
            raise ValueError(f"labels has {groups.size} entries but values has {v.size}")
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    names = names or {}
    w = style_width()
    fig, ax = figure_and_axes(ax, (w, 0.7 * w))
    edges = np.histogram_bin_edges(v, bins=bins)
    keys = list(np.unique(groups))
    # Largest group first, so the small interesting one is drawn on top.
    keys.sort(key=lambda k: -(groups == k).sum())
    for i, key in enumerate(keys):
        sel = v[groups == key]
        label = names.get(key.item() if hasattr(key, "item") else key, str(key))
        if labels is not None and label is not None:
            label = f"{label} (n={sel.size})"
        ax.hist(sel, bins=edges, density=density, histtype="stepfilled", alpha=0.45, color=f"C{i}", label=label)
        ax.hist(sel, bins=edges, density=density, histtype="step", lw=1.1, color=f"C{i}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density" if density else "examples")
    if labels is not None:
        ax.legend(frameon=False, fontsize="small")
    return fig
