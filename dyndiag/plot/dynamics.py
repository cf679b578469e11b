"""Training dynamics from Monitor records: edge of stability, metrics over steps, layer rotation.

Every function takes the DataFrame of :func:`dyndiag.load_records` (columns
``step, probe, metric, key, value, wall_time, run``), an optional ``ax`` and returns
the Figure. Lines over steps break where the ``run`` segment changes (two runs
logged into one directory, a resumed run): a line never joins two segments, even
where their steps continue each other. A frame without ``run`` is one segment.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ._axes import figure_and_axes, style_width

__all__ = ["edge_of_stability", "metrics", "layer_rotation"]

_COLUMNS = ("step", "probe", "metric", "key", "value")
MAX_LEGEND_KEYS = 8
"""Above this many keys a panel colours its lines by a colormap instead of a legend."""


def _check_frame(df) -> None:
    missing = [c for c in _COLUMNS if c not in getattr(df, "columns", ())]
    if missing:
        raise ValueError(
            f"df must be a records DataFrame from dyndiag.load_records with columns "
            f"{list(_COLUMNS)}; missing {missing}"
        )


_width = style_width
# y labels for the record names of design.md's Decisions (others: the name, spaced).
_AXIS_LABELS = {"grad_norm": "gradient norm", "ratio": "step / safe radius", "overlap": "subspace overlap"}
# A safe-step ratio of 1 or more predicts a loss spike (SafeStepRadius): drawn as a
# line, but only for one-step updates (offline updates span several, `update_steps`).
_REFERENCES = {"ratio": (1.0, "spike predicted")}
# Fractions: their axis starts at 0 (an all-zero series would otherwise sit mid-axis
# between negative ticks), with a sliver below it.
_FRACTIONS = {"collapsed_fraction"}


def _series(df, metric: str, probe: str | None = None, key: str | None = ""):
    """(steps, values) of one metric for a line (see :func:`_line`); key=None keeps every key."""
    sel = df["metric"] == metric
    if probe is not None:
        sel &= df["probe"] == probe
    if key is not None:
        sel &= df["key"].astype(str) == key
    return _line(df.loc[sel])


def _line(rows) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``rows`` sorted by step, with a NaN point wherever the run
    segment changes: matplotlib breaks a line at NaN, so no line joins two segments."""
    rows = rows.sort_values("step", kind="stable")
    x, y = rows["step"].to_numpy(dtype=float), rows["value"].to_numpy(dtype=float)
    if "run" in rows:
        cut = np.flatnonzero(np.diff(rows["run"].to_numpy()) != 0) + 1
        x, y = np.insert(x, cut, np.nan), np.insert(y, cut, np.nan)
    return x, y


def _span_text(spans) -> str:
    """``"50"``, or ``"10-50"`` for updates of several lengths."""
    low, high = int(spans.min()), int(spans.max())
    return str(high) if low == high else f"{low}-{high}"


def _key_order(keys) -> list[str]:
    """Keys in record order, numbers ("0", "1", ..., "10") numerically."""
    keys = list(dict.fromkeys(str(k) for k in keys))
    if keys and all(k.lstrip("-").isdigit() for k in keys):
        return sorted(keys, key=int)
    return keys


#: Series with at most this many points get markers (lines alone hide how few there are).
SPARSE_POINTS = 20


def _panels(ax: Axes | None, second: bool, figsize) -> tuple[Figure, Axes, Axes | None]:
    """(figure, main axes, lower axes or None): the given ``ax`` alone; else a new
    figure with a second, shorter panel sharing the step axis when ``second``."""
    if ax is not None:
        fig, top = figure_and_axes(ax, (0, 0))
        return fig, top, None
    w = _width()
    if second:
        fig = Figure(figsize=figsize or (w, 0.9 * w), layout="constrained")
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
        return fig, top, bottom
    fig, top = figure_and_axes(None, figsize or (w, 0.6 * w))
    return fig, top, None


def _auto_log(values: np.ndarray) -> bool:
    v = values[np.isfinite(values)]
    return v.size > 1 and bool(np.all(v > 0)) and v.max() / v.min() > 100


def _per_key(ax: Axes, sub, *, legend: str = "right", legend_title: str | None = None) -> None:
    """One line per key of ``sub`` (rows of one metric); the "" key as a thick black total.

    Up to MAX_LEGEND_KEYS keys get palette colours and a legend; more get a viridis
    colormap in key order with a colorbar naming the first and last key.
    """
    groups = {str(k): g for k, g in sub.groupby(sub["key"].astype(str), sort=False)}
    total = groups.pop("", None)
    keys = _key_order(k for k in sub["key"].astype(str) if k in groups)
    use_cmap = len(keys) > MAX_LEGEND_KEYS
    cmap = mpl.colormaps["viridis"]
    for i, key in enumerate(keys):
        color = cmap(i / max(len(keys) - 1, 1)) if use_cmap else None
        ax.plot(*_line(groups[key]), color=color, lw=0.8 * mpl.rcParams["lines.linewidth"],
                label=None if use_cmap else key)
    if total is not None:  # the total over layers: thick black; a plain scalar: an ordinary line
        style = dict(color="black", lw=1.6 * mpl.rcParams["lines.linewidth"], label="total", zorder=3) if keys else {}
        if len(total) <= SPARSE_POINTS:  # a probe run every 25 steps: show where the measurements are
            style.update(marker="o", ms=3)
        ax.plot(*_line(total), **style)
    if use_cmap:
        sm = ScalarMappable(norm=Normalize(0, len(keys) - 1), cmap=cmap)
        cb = ax.figure.colorbar(sm, ax=ax, pad=0.02, fraction=0.04, aspect=30)
        cb.set_ticks([0, len(keys) - 1], labels=[keys[0], keys[-1]])
        if legend_title:  # the first and last key names already say what the colours are
            cb.set_label(legend_title)
        if total is not None:
            ax.legend(loc="best")
    elif keys:
        if legend == "below":  # a figure legend under the axes: constrained layout makes room for it
            ax.figure.legend(*ax.get_legend_handles_labels(), loc="outside lower center",
                             ncols=min(len(keys) + (total is not None), 4), title=legend_title)
        elif legend == "inside":
            ax.legend(loc="best", title=legend_title)
        else:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, title=legend_title)


def edge_of_stability(
    df,
    ax: Axes | None = None,
    *,
    probe: str = "edge_of_stability",
    logy: bool | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Sharpness against the optimizer's stability threshold, and the loss, over steps.

    Parameters
    ----------
    df:
        Records from :func:`dyndiag.load_records` holding the ``sharpness`` and
        ``threshold`` metrics of the :class:`~dyndiag.probes.EdgeOfStability` probe
        named ``probe`` (and, optionally, ``preconditioned_sharpness`` and ``loss``).
    ax:
        Draw only the sharpness panel on this Axes. Without it, a new Figure with
        two panels sharing the step axis.
    logy:
        Log axis for the sharpness panel; ``None`` chooses one when the values drawn
        span more than a factor of 100 (Adam: the plain top eigenvalue next to a
        preconditioned sharpness and threshold near 38/lr), else a linear axis from 0.

    Notes
    -----
    Drawn: top panel, the sharpness λ_max (line with markers), the
    ``preconditioned_sharpness`` (Adam) when recorded, and the recorded threshold
    (2/η for SGD, momentum-aware) as a dashed step line, since a schedule changes
    it; bottom panel, the probe batch's ``loss`` on a log axis (omitted when the
    records have no ``loss``). With several param groups (keys ``"0"``, ``"1"``,
    ...), each group's sharpness and threshold are drawn in a colour of their own.
    """
    _check_frame(df)
    mine = df[df["probe"] == probe]
    lacking = [m for m in ("sharpness", "threshold") if not (mine["metric"] == m).any()]
    if lacking:
        raise ValueError(
            f"df has no {' or '.join(repr(m) for m in lacking)} records from probe {probe!r}; "
            "record them with dd.probes.EdgeOfStability (probes present: "
            f"{sorted(df['probe'].astype(str).unique())})"
        )
    # One line set per param group (key "0", "1", ...); a single group has key "".
    groups = _key_order(mine.loc[mine["metric"] == "sharpness", "key"])
    l_steps, loss = _series(df, "loss", probe)

    fig, top, bottom = _panels(ax, bool(loss.size), figsize)

    drawn = []
    for i, g in enumerate(groups):
        steps, sharp = _series(df, "sharpness", probe, g)
        t_steps, thresh = _series(df, "threshold", probe, g)
        p_steps, psharp = _series(df, "preconditioned_sharpness", probe, g)
        # One group: the usual colours. Several: one colour per group, told apart by line style.
        tag, colours = (f" (group {g})", [f"C{i}"] * 3) if len(groups) > 1 else ("", ["C0", "C1", "C3"])
        top.plot(steps, sharp, "o-", color=colours[0], ms=2.5, label=f"$\\lambda_{{\\max}}$ of the loss Hessian{tag}")
        if psharp.size:
            top.plot(p_steps, psharp, "s-", color=colours[1], ms=2.5, label=f"preconditioned sharpness{tag}")
        top.plot(t_steps, thresh, "--", drawstyle="steps-post", color=colours[2], label=f"stability threshold{tag}")
        drawn += [sharp, thresh, psharp]
    top.set_ylabel("sharpness")
    drawn = np.concatenate(drawn)
    if logy or (logy is None and _auto_log(drawn)):  # Adam: lambda_max ~25 next to a threshold ~4000
        top.set_yscale("log")
    else:
        top.set_ylim(bottom=0 if np.nanmin(drawn) >= 0 else None)
    top.legend(loc="best")
    if bottom is None:
        top.set_xlabel("step")
        return fig
    bottom.plot(l_steps, loss, "o-", color="C2", ms=2.5)
    if np.all(loss[np.isfinite(loss)] > 0):
        bottom.set_yscale("log")
    bottom.set_ylabel("loss")
    bottom.set_xlabel("step")
    fig.align_ylabels([top, bottom])
    return fig


def metrics(
    df,
    names: str | Sequence[str],
    ax: Axes | None = None,
    *,
    probe: str | None = None,
    logy: bool | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Record metrics over steps, one panel per metric name (stacked, sharing the step axis).

    Parameters
    ----------
    df:
        Records from :func:`dyndiag.load_records`.
    names:
        Metric names (``"grad_norm"``, ``"coherence"``, ...); each must be in ``df``.
    ax:
        Draw on this Axes (then ``names`` must be a single metric).
    probe:
        Take the metrics from this probe only (for a name several probes record).
    logy:
        Log y axes; ``None`` chooses per panel (log when every value is positive and
        they span more than a factor of 100).

    Notes
    -----
    Drawn: a scalar metric (key ``""``) as one line; a per-layer metric as one thin
    line per key with a legend (over 8 keys: viridis in record order, with a
    colorbar), its ``""`` key as a thick black "total" line. A metric that several
    probes record gets one line per probe and key. The safe-step ``ratio`` gets the
    "spike predicted" line at 1, which holds for one optimizer step; where its
    probe's ``update_steps`` (offline analysis: the steps between checkpoints) are
    more than 1, the panel says so instead of drawing it.
    """
    _check_frame(df)
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("names must name at least one metric")
    rows = df if probe is None else df.loc[df["probe"] == probe]
    known = set(rows["metric"].astype(str))
    missing = [n for n in names if n not in known]
    if missing:
        where = "df" if probe is None else f"df (probe {probe!r})"
        raise ValueError(f"{where} has no records of metric(s) {missing}; metrics present: {sorted(known)}")
    if ax is not None:
        if len(names) != 1:
            raise ValueError(f"with ax= give one metric name, got {len(names)}")
        fig, _ = figure_and_axes(ax, (0, 0))
        axes = [ax]
    else:
        w = _width()
        fig = Figure(figsize=figsize or (w, 0.2 * w + 0.45 * w * len(names)), layout="constrained")
        axes = list(np.atleast_1d(fig.subplots(len(names), 1, sharex=True)))
    for a, name in zip(axes, names):
        sub = rows.loc[rows["metric"] == name].copy()
        if sub["probe"].nunique() > 1:
            sub["key"] = sub["probe"].astype(str) + ": " + sub["key"].astype(str)
            sub.loc[sub["key"].str.endswith(": "), "key"] = sub["key"].str[:-2]
        _per_key(a, sub)
        if logy or (logy is None and _auto_log(sub["value"].to_numpy(float))):
            a.set_yscale("log")
        label = _AXIS_LABELS.get(name, name.replace("_", " "))
        spans = rows.loc[(rows["metric"] == "update_steps") & rows["probe"].isin(sub["probe"].unique()), "value"]
        if name in _REFERENCES and (spans > 1).any():  # offline: a displacement over several steps
            label = "update / safe radius" if name == "ratio" else label
            a.set_title(f"updates over {_span_text(spans)} steps: no one-step reference", loc="right",
                        fontsize="x-small", color="0.4")
        elif name in _REFERENCES:
            level, text = _REFERENCES[name]
            a.axhline(level, color="0.5", ls="--", lw=0.8, gid="dyndiag-reference")
            a.text(0.99, level, text, transform=a.get_yaxis_transform(), ha="right", va="bottom",
                   fontsize="x-small", color="0.4")
        if name in _FRACTIONS and a.get_yscale() == "linear":
            top = a.get_ylim()[1]
            a.set_ylim(-0.03 * top, top)  # from 0, with a sliver so a line at 0 clears the spine
        a.set_ylabel(label)
    axes[-1].set_xlabel("step")
    if len(axes) > 1:
        fig.align_ylabels(axes)
    return fig


def layer_rotation(
    df,
    ax: Axes | None = None,
    *,
    probe: str = "layer_rotation",
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Rotation of each parameter tensor from its initial value, over steps.

    ``df``: records from :func:`dyndiag.load_records` with the ``rotation`` metric of
    the :class:`~dyndiag.probes.LayerRotation` probe named ``probe`` (keys =
    parameter names). Drawn: one line per parameter, ``1 − cos(w_t, w_0)`` on y
    (0 = same direction as at initialisation, 1 = orthogonal, 2 = reversed). The
    legend goes below the axes as a figure legend (inside the axes when ``ax`` is
    given); over 8 parameters, lines take viridis from first to last layer, with a
    colorbar instead.
    """
    _check_frame(df)
    sub = df.loc[(df["metric"] == "rotation") & (df["probe"] == probe)]
    if sub.empty:
        raise ValueError(
            f"df has no 'rotation' records from probe {probe!r}; record them with "
            f"dd.probes.LayerRotation (probes present: {sorted(df['probe'].astype(str).unique())})"
        )
    w = _width()
    own = ax is None
    fig, ax = figure_and_axes(ax, figsize or (w, 0.85 * w))
    _per_key(ax, sub, legend="below" if own else "inside")
    ax.set_ylabel("1 − cos(w, w₀)")
    ax.set_xlabel("step")
    ax.set_ylim(bottom=0)
    return fig


def coherence(
    df,
    ax: Axes | None = None,
    *,
    probes: str | Sequence[str] | None = None,
    m: int | None = None,
    logy: bool | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Gradient coherence over steps, against its reference values, and the GSNR.

    Parameters
    ----------
    df:
        Records from :func:`dyndiag.load_records` with the ``coherence`` metric (and
        optionally ``gsnr``) of :class:`~dyndiag.probes.GradientCoherence` probes.
    ax:
        Draw only the coherence panel on this Axes. Without it, a new Figure with a
        second panel for the GSNR when recorded.
    probes:
        The probe names to draw (e.g. two runs named ``"real labels"`` and
        ``"random labels"``); default every probe that recorded ``coherence``, one
        line each, labelled by name when there are several.
    m:
        The number of examples the coherence was measured on: draws the ``m`` line
        (identical gradients) next to the line at 1 (orthogonal gradients).

    Notes
    -----
    m-coherence ``||sum g_i||^2 / sum ||g_i||^2`` is 1 for orthogonal per-example
    gradients, ``m`` for identical ones and below 1 when they cancel (Chatterjee,
    "Coherent Gradients"). The y axis is logarithmic when the values span more
    than a factor of 100 (``logy=None``).
    """
    _check_frame(df)
    rows = df.loc[df["metric"] == "coherence"]
    names = list(dict.fromkeys(rows["probe"].astype(str))) if probes is None else (
        [probes] if isinstance(probes, str) else list(probes))
    rows = rows.loc[rows["probe"].isin(names)]
    if rows.empty:
        raise ValueError(
            f"df has no 'coherence' records from probes {names}; record them with dd.probes.GradientCoherence "
            f"(probes present: {sorted(df['probe'].astype(str).unique())})"
        )
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"m must be a positive int (the number of examples), got {m!r}")
    gsnr = df.loc[(df["metric"] == "gsnr") & df["probe"].isin(names)]
    fig, top, bottom = _panels(ax, not gsnr.empty, figsize)
    several = len(names) > 1
    for i, name in enumerate(names):
        steps, values = _series(df, "coherence", name)
        if values.size:
            top.plot(steps, values, "o-", ms=2.5, color=f"C{i}", label=name if several else "m-coherence")
            if bottom is not None:
                g_steps, g = _series(df, "gsnr", name)
                bottom.plot(g_steps, g, "o-", ms=2.5, color=f"C{i}")
    top.axhline(1.0, color="0.5", ls=":", lw=1, label="1: orthogonal gradients")
    if m is not None:
        top.axhline(float(m), color="0.3", ls="--", lw=1, label=f"{m}: identical gradients")
    drawn = np.concatenate([rows["value"].to_numpy(float), [1.0] + ([float(m)] if m else [])])
    if logy or (logy is None and _auto_log(drawn)):
        top.set_yscale("log")
    top.set_ylabel("m-coherence")
    top.legend(loc="best", fontsize="small")
    if bottom is None:
        top.set_xlabel("step")
    else:
        if _auto_log(gsnr["value"].to_numpy(float)):
            bottom.set_yscale("log")
        bottom.set_ylabel("GSNR (mean)")
        bottom.set_xlabel("step")
        fig.align_ylabels([top, bottom])
    return fig
