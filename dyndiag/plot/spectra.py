"""Eigenvalue spectra: SLQ densities, exact spectra and top eigenvalues."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib as mpl
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..curvature.density import SpectralDensity
from ..curvature.results import EigenResult
from ._axes import figure_and_axes, style_width

__all__ = ["spectrum", "block_spectra"]


def _as_array(values) -> np.ndarray:
    if isinstance(values, EigenResult):
        values = values.values
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=float).reshape(-1)
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError("eigenvalues must be a non-empty array of finite numbers")
    return arr


def spectrum(
    spec: SpectralDensity | EigenResult | np.ndarray | torch.Tensor,
    ax: Axes | None = None,
    *,
    top: EigenResult | np.ndarray | torch.Tensor | None = None,
    bandwidth: float | None = None,
    logy: bool = True,
    label: str | None = None,
    color: str | None = None,
) -> Figure:
    """Draw an eigenvalue spectrum and return the Figure.

    Parameters
    ----------
    spec:
        A :class:`~dyndiag.SpectralDensity` (drawn as its smoothed density), a 1-D
        array of eigenvalues (a full spectrum: drawn as a kernel density of those
        eigenvalues with a rug), or an :class:`~dyndiag.EigenResult` (a few top
        eigenvalues: drawn as stems).
    top:
        Eigenvalues to mark as outliers (dashed lines, labelled λ1, λ2, ...), e.g.
        the top-k from :func:`~dyndiag.eigenvalues` next to a density.
    bandwidth:
        Kernel width in eigenvalue units (default: 1 % of the spectral range).
    logy:
        Density on a log axis (the bulk and the outliers differ by orders of magnitude).
    """
    w = style_width()  # the style's column width, so the figure drops into a paper unscaled
    fig, ax = figure_and_axes(ax, (w, 0.68 * w))
    if isinstance(spec, EigenResult):
        vals = _as_array(spec)
        ax.vlines(vals, 0, 1, color=color or "C0", lw=1.5, label=label)
        ax.plot(vals, np.ones_like(vals), "o", color=color or "C0", ms=4)
        ax.set_ylim(0, 1.15)
        ax.set_yticks([])
        ax.set_ylabel("top eigenvalues")
    else:
        density = spec if isinstance(spec, SpectralDensity) else _exact_density(_as_array(spec))
        lo, hi = float(density.nodes.min()), float(density.nodes.max())
        bw = bandwidth if bandwidth is not None else density.default_bandwidth
        grid = np.linspace(lo - 4 * bw, hi + 4 * bw, 2000)
        pdf = density.pdf(grid, bandwidth=bw)
        if logy:
            floor = pdf.max() * 1e-10
            pdf = np.maximum(pdf, floor)
            ax.set_yscale("log")
            ax.set_ylim(floor, pdf.max() * 3)
        ax.plot(grid, pdf, color=color or "C0", lw=1.4, label=label)
        ax.fill_between(grid, pdf, pdf.min(), color=color or "C0", alpha=0.15, lw=0)
        ax.set_ylabel("spectral density")
        if not isinstance(spec, SpectralDensity):
            ax.plot(density.nodes, np.full_like(density.nodes, pdf.min()), "|", color="0.3", ms=8, alpha=0.5)
    if top is not None:
        vals = _as_array(top)
        lo, hi = ax.get_xlim()
        span = max(hi, vals.max()) - min(lo, vals.min())  # the x range once the lines are drawn
        for j, (first, last) in enumerate(_label_groups(vals, 0.03 * span)):
            for val in vals[first : last + 1]:
                ax.axvline(val, color="C3", ls="--", lw=0.9, alpha=0.8)
            text = f"λ{first + 1}" if first == last else f"λ{first + 1}–λ{last + 1}"
            ax.annotate(
                text,
                (vals[first : last + 1].max(), 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -2 - 9 * (j % 3)),
                textcoords="offset points",
                fontsize=7,
                color="C3",
                va="top",
            )
    ax.set_xlabel("eigenvalue")
    if label is not None:
        ax.legend(frameon=False)
    return fig


def block_spectra(
    spectra: Mapping[str, SpectralDensity | EigenResult | np.ndarray | torch.Tensor],
    top: Mapping[str, EigenResult | np.ndarray | torch.Tensor] | None = None,
    ax: Axes | Sequence[Axes] | np.ndarray | None = None,
    *,
    ncols: int | None = None,
    bandwidth: float | None = None,
    logy: bool = True,
    sharey: bool = True,
    color: str | None = None,
) -> Figure:
    """One panel per diagonal block: its spectrum, its top eigenvalues marked; returns the Figure.

    Parameters
    ----------
    spectra:
        ``{block: spectrum}`` as :func:`dyndiag.spectral_density` or
        :func:`dyndiag.eigenvalues` return them with ``blocks=`` (or 1-D arrays of
        eigenvalues); panels follow its order.
    top:
        ``{block: eigenvalues}`` to mark on each panel (dashed lines), e.g.
        ``dd.eigenvalues(op, k=3, blocks=...)``; blocks missing from it get none.
    ax:
        Axes to draw into, one per block (a sequence or array with at least as many
        axes as blocks; a single Axes for a single block). Default: a new figure, a
        grid of ``ncols`` columns (default ``ceil(sqrt(#blocks))``), x axes shared
        (one eigenvalue scale for every block, so blocks compare at a glance).
    bandwidth:
        Kernel width in eigenvalue units for every density. Default: 1 % of the
        range of all blocks' nodes together, so equal widths mean equal spreads.
    logy:
        Densities on a log axis.
    sharey:
        One density scale for every panel.
    """
    if not isinstance(spectra, Mapping) or not spectra:
        raise ValueError("spectra must be a non-empty dict {block: spectrum}, as returned with blocks=")
    if top is not None and not isinstance(top, Mapping):
        raise TypeError(f"top must be a dict {{block: eigenvalues}}, got {type(top).__name__}")
    names = list(spectra)
    n = len(names)
    if ncols is not None and (isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1):
        raise ValueError(f"ncols must be a positive int, got {ncols!r}")
    if ax is None:
        cols = min(n, ncols or math.ceil(math.sqrt(n)))
        rows = math.ceil(n / cols)
        w = style_width()
        fig = Figure(figsize=(max(w, 1.6 * cols), 1.15 * rows + 0.4), layout="constrained")
        grid = fig.subplots(rows, cols, sharex=True, sharey=sharey, squeeze=False)
        axes = list(grid.ravel())
        for a in axes[n:]:
            a.set_visible(False)
    else:
        axes = [ax] if isinstance(ax, Axes) else list(np.asarray(ax, dtype=object).ravel())
        if len(axes) < n or not all(isinstance(a, Axes) for a in axes):
            raise ValueError(f"ax must be {n} matplotlib Axes (one per block), got {len(axes)}")
        fig, cols = axes[0].figure, n
    if bandwidth is None:
        nodes = [_nodes(s) for s in spectra.values() if not isinstance(s, EigenResult)]
        if nodes:
            lo, hi = min(x.min() for x in nodes), max(x.max() for x in nodes)
            bandwidth = 0.01 * (hi - lo) if hi > lo else None
    small = 0.8 * float(mpl.rcParams["font.size"])
    limits = []
    for i, (name, a) in enumerate(zip(names, axes)):
        marks = None if top is None else top.get(name)
        spectrum(spectra[name], ax=a, top=marks, bandwidth=bandwidth, logy=logy, color=color)
        limits.append(a.get_ylim())
        a.set_title(name, fontsize=small, pad=2)
        a.tick_params(labelsize=small)
        for text in a.texts:  # the λ labels of the marked eigenvalues
            text.set_fontsize(0.8 * small)
        if ax is None:
            bottom = i >= n - cols  # the lowest panel of its column (the grid's last row may be short)
            a.xaxis.set_tick_params(labelbottom=bottom)
            a.set_xlabel("eigenvalue" if bottom else "", fontsize=small)
            a.set_ylabel("density" if i % cols == 0 else "", fontsize=small)
    if ax is None and sharey and logy:
        # spectrum() sets each panel's limits; the shared axis takes the union of them.
        axes[0].set_ylim(min(l[0] for l in limits), max(l[1] for l in limits))
    return fig


def _nodes(spec) -> np.ndarray:
    return spec.nodes if isinstance(spec, SpectralDensity) else _as_array(spec)


def _label_groups(vals: np.ndarray, gap: float) -> list[tuple[int, int]]:
    """Index ranges of eigenvalues (in the given order) that lie within ``gap`` of
    their neighbour: they share one label (``λ4–λ7``) instead of overprinting."""
    groups: list[tuple[int, int]] = []
    for i in range(len(vals)):
        if groups and abs(vals[i] - vals[i - 1]) < gap:
            groups[-1] = (groups[-1][0], i)
        else:
            groups.append((i, i))
    return groups


def _exact_density(eigs: np.ndarray) -> SpectralDensity:
    return SpectralDensity(nodes=eigs, weights=np.full(eigs.size, 1.0 / eigs.size), num_matvecs=0, dim=eigs.size)
