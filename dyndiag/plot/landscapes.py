"""Loss-landscape figures: 1-D lines, 2-D contours (log-spaced levels), filled contours, 3-D surfaces.

2-D figures carry a colourbar labelled with what the values are (``metric``,
"loss" by default). Contour labels go on the outer levels, each where its line is
farthest from the grid's minimum: the inner levels crowd around the minimum, where
labels would pile up on each other and on the model's marker.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colors, ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..landscape.grid import Surface
from ._axes import figure_and_axes, style_width

__all__ = ["landscape"]

_KINDS = ("contour", "filled", "surface", "line")


def landscape(
    surf: Surface,
    ax: Axes | None = None,
    *,
    kind: str | None = None,
    levels: int = 20,
    log: bool | None = None,
    trajectory=None,
    cmap: str = "viridis",
    labels: tuple[str, str] = ("direction 1", "direction 2"),
    color: str | None = None,
    label: str | None = None,
    metric: str = "loss",
) -> Figure:
    """Draw a :class:`~dyndiag.landscape.Surface` and return the Figure.

    Parameters
    ----------
    surf:
        From :func:`dyndiag.landscape.surface`: 1-D (a line) or 2-D.
    kind:
        ``"contour"`` (default for 2-D: contour lines, labelled, with a
        colourbar), ``"filled"`` (filled contours with a colourbar), ``"surface"``
        (3-D; ``ax`` must then be a 3-D axes) or ``"line"`` (the only kind for 1-D).
    levels:
        Number of contour levels.
    log:
        Log-spaced levels / log y axis; default: when every value is positive and
        they span more than a factor of 10 (losses around a minimum usually do —
        linear levels would put every line in the outer rim).
    trajectory:
        A training path to overlay on a 2-D plot: an ``(T, 2)`` array of
        coordinates in the surface's direction basis, or an object with ``.path``
        (e.g. :func:`dyndiag.landscape.trajectory_directions`'s result). Drawn as a
        line with markers, its last point (the model the surface is centred on)
        marked with a star. When it carries ``explained_variance`` (trajectory
        directions), each direction's axis label says the share of the path's
        variance it explains (also on a 1-D line, where no path is drawn).
    labels:
        Axis labels for the two directions.
    color, label:
        Line colour and legend label of a 1-D line (several surfaces on one ``ax``:
        pass a label to each and a legend is drawn).
    metric:
        What ``surf.values`` are: the colourbar's label and the value axis of a
        line or 3-D surface.
    """
    if not isinstance(surf, Surface):
        raise TypeError(f"surf must be a dyndiag.landscape.Surface, got {type(surf).__name__}")
    values = np.asarray(surf.values, dtype=float)
    if not np.isfinite(values).any():
        raise ValueError("surf has no finite values to draw")
    if kind is None:
        kind = "line" if surf.ndim == 1 else "contour"
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if (surf.ndim == 1) != (kind == "line"):
        raise ValueError(f"kind={kind!r} does not fit a {surf.ndim}-D surface")
    if not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an int >= 2, got {levels!r}")
    finite = values[np.isfinite(values)]
    if log is None:
        log = bool(finite.min() > 0 and finite.max() / finite.min() > 10)
    elif log and finite.min() <= 0:
        raise ValueError("log=True needs positive values")
    if not isinstance(metric, str):
        raise TypeError(f"metric must be a str (the colourbar's label), got {type(metric).__name__}")
    labels = _with_variance(labels, trajectory)

    if kind == "surface":
        return _surface3d(surf, values, ax, log, cmap, labels, metric)
    w = style_width()
    fig, ax = figure_and_axes(ax, (w, 0.85 * w) if kind != "line" else (w, 0.7 * w))
    if kind == "line":
        # Without a colour the Axes' cycle picks one: several lines on one ax differ.
        ax.plot(surf.coords[0], values, color=color, lw=1.5, label=label)
        if not any(line.get_gid() == "dyndiag-origin" for line in ax.lines):
            ax.axvline(0.0, color="0.6", lw=0.8, ls=":", gid="dyndiag-origin")
        if label is not None:
            ax.legend(frameon=False, fontsize="small")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel(labels[0])
        ax.set_ylabel(metric)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(5))  # a column-wide figure fits about five
        return fig

    x, y = surf.coords
    X, Y = np.meshgrid(x, y, indexing="ij")
    lv = np.geomspace(finite.min(), finite.max(), levels) if log else np.linspace(finite.min(), finite.max(), levels)
    norm = colors.LogNorm(lv[0], lv[-1]) if log else None
    path = np.empty((0, 2))
    if trajectory is not None:
        path = np.asarray(getattr(trajectory, "path", trajectory), dtype=float)
        if path.ndim != 2 or path.shape[1] < 2:
            raise ValueError(f"trajectory must be (T, 2) coordinates, got shape {path.shape}")
    if kind == "filled":
        cs = ax.contourf(X, Y, values, levels=lv, cmap=cmap, norm=norm)
    else:
        cs = ax.contour(X, Y, values, levels=lv, cmap=cmap, norm=norm, linewidths=0.9)
        _label_contours(ax, cs, values, X, Y, avoid=np.vstack([path[:, :2], [[0.0, 0.0]]]))
    # Ticks at a few of the levels, compactly formatted; the bar no taller than the square axes.
    fig.colorbar(cs, ax=ax, label=metric, ticks=lv[:: max(1, levels // 5)], format="%.3g", shrink=0.8)
    ax.plot([0.0], [0.0], marker="*", color="black", ms=9, ls="none", label="model")
    if trajectory is not None:
        ax.plot(path[:, 0], path[:, 1], color="C3", lw=1.2, marker="o", ms=2.5, label="training path")
        ax.legend(frameon=False, fontsize="small", loc="upper right")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(ticker.MaxNLocator(5))
    ax.set_aspect("equal", adjustable="box")
    return fig


def _with_variance(labels, trajectory) -> tuple[str, ...]:
    """``labels``, each with its direction's share of the path variance when ``trajectory`` has one."""
    ev = getattr(trajectory, "explained_variance", None)
    ev = [] if ev is None else list(ev)
    return tuple(f"{text} ({100 * ev[i]:.1f} % of path variance)" if i < len(ev) else text
                 for i, text in enumerate(labels))


def _label_contours(ax: Axes, cs, values: np.ndarray, X: np.ndarray, Y: np.ndarray, avoid: np.ndarray,
                    count: int = 5) -> None:
    """Label up to ``count`` levels, each at the point of its line farthest from the grid's
    minimum, skipping levels whose lines stay near the minimum (their labels would
    overlap) and points near the polyline ``avoid`` (the training path and the model)."""
    i, j = np.unravel_index(np.nanargmin(values), values.shape)
    low, high = np.array([X.min(), Y.min()]), np.array([X.max(), Y.max()])
    scale = high - low
    centre = (np.array([X[i, j], Y[i, j]]) - low) / scale  # in axes fractions from here on
    t = np.linspace(0.0, 1.0, 10)[:, None, None]
    avoid = (avoid - low) / scale
    avoid = np.vstack([avoid, (avoid[:-1] + t * (avoid[1:] - avoid[:-1])).reshape(-1, 2)])
    chosen: list = []  # (level, point in axes fractions), from the outermost level in
    for level, path in reversed(list(zip(cs.levels, cs.get_paths()))):
        v = (path.vertices - low) / scale
        # Off the edges (a label there is cut by the axes) and off the path.
        v = v[np.all((v > 0.1) & (v < 0.9), axis=1)]
        if len(v):
            v = v[np.min(np.linalg.norm(v[:, None] - avoid[None], axis=2), axis=1) > 0.08]
        if len(v):
            far = np.linalg.norm(v - centre, axis=1)
            point = v[far.argmax()]
            # Beyond the crowd around the minimum, and apart from the labels placed so far.
            if far.max() > 0.15 and all(np.linalg.norm(point - q) > 0.15 for _, q in chosen):
                chosen.append((level, point))
        if len(chosen) == count:
            break
    if chosen:
        ax.clabel(cs, [lv for lv, _ in chosen], inline=True, fontsize="x-small", fmt="%.3g",
                  manual=[tuple(q * scale + low) for _, q in chosen])


def _surface3d(surf: Surface, values: np.ndarray, ax, log: bool, cmap: str, labels, metric: str) -> Figure:
    if ax is None:
        fig = Figure(figsize=(4.6, 3.8), layout="constrained")
        ax = fig.add_subplot(projection="3d")
    elif getattr(ax, "name", "") != "3d":
        raise ValueError("kind='surface' needs a 3-D axes (add_subplot(projection='3d')) or ax=None")
    else:
        fig = ax.figure
    X, Y = np.meshgrid(*surf.coords, indexing="ij")
    Z = np.log10(values) if log else values
    ax.plot_surface(X, Y, Z, cmap=cmap, linewidth=0, antialiased=True)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_zlabel(f"log10 {metric}" if log else metric)
    return fig
