"""Every figure a run's records support, drawn in one call (``dyndiag plot``)."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure

__all__ = ["run_figures"]

#: Scalar metrics drawn over steps (one panel each), grouped into figures, when present.
TIMELINES = {
    "gradients": ("grad_norm", "overlap"),
    "dynamics": ("directional_sharpness", "ratio", "collapsed_fraction"),
}


def run_figures(log_dir: str | os.PathLike) -> dict[str, Figure]:
    """The figures that a run's records support, by name.

    Parameters
    ----------
    log_dir:
        A run's record directory (what a :class:`~dyndiag.Monitor` or
        :func:`~dyndiag.analyze` wrote).

    Returns
    -------
    dict
        Any of ``edge_of_stability`` (sharpness against its threshold, and the
        loss), ``spectrum`` (the last recorded Hessian spectrum: its SLQ density
        when recorded, with the top eigenvalues marked, else the top eigenvalues),
        ``layer_rotation``, ``coherence`` (with the GSNR), ``gradients``
        (gradient norm, subspace overlap), ``dynamics`` (directional sharpness, safe-step ratio, collapsed
        fraction) — each with the metrics recorded — and
        ``scores`` (the last EL2N scores). Empty when the run has no records.
    """
    from ..curvature.density import SpectralDensity
    from ..curvature.results import EigenResult
    from ..records import load_records
    from .distributions import scores
    from .dynamics import coherence, edge_of_stability, layer_rotation, metrics
    from .spectra import spectrum

    df = load_records(log_dir)
    figures: dict[str, Figure] = {}
    if df.empty:
        return figures
    present = set(df["metric"].astype(str))
    if {"sharpness", "threshold"} <= present:
        figures["edge_of_stability"] = edge_of_stability(df, probe=_probe_of(df, "sharpness"))
    if "eigenvalue" in present:
        probe = _probe_of(df, "eigenvalue")
        eig = df[(df.probe == probe) & (df.metric == "eigenvalue")]
        last = int(eig.step.max())
        rows = eig[eig.step == last].sort_values("key", key=lambda k: k.astype(int))
        import torch

        values = torch.tensor(rows.value.to_numpy(float))
        top = EigenResult(values=values, vectors=None, num_matvecs=0, converged=True,
                          error_bounds=torch.zeros_like(values))
        nodes = _arrays(log_dir, probe, "density_nodes", step=last)
        if nodes:
            weights = _arrays(log_dir, probe, "density_weights", step=last)
            density = SpectralDensity(nodes=np.asarray(nodes[last], float), weights=np.asarray(weights[last], float),
                                      num_matvecs=0, dim=0)
            fig = spectrum(density, top=top)
        else:
            fig = spectrum(top)
        fig.axes[0].set_title(f"Hessian spectrum at step {last}")
        figures["spectrum"] = fig
    if "rotation" in present:
        figures["layer_rotation"] = layer_rotation(df)
    if "coherence" in present:
        figures["coherence"] = coherence(df)
    for name, group in TIMELINES.items():
        timeline = [m for m in group if m in present]
        if timeline:
            figures[name] = metrics(df, timeline)
    if "el2n" in present:
        probe = _probe_of(df, "el2n")
        el2n = _arrays(log_dir, probe, "el2n_scores")
        if el2n:
            last = max(el2n)
            figures["scores"] = scores(el2n[last], xlabel=f"EL2N score at step {last} ({len(el2n[last])} examples)")
    return figures


def _arrays(log_dir, probe: str, metric: str, step: int | None = None) -> dict:
    """``load_arrays``, or ``{}`` when the run stored no such arrays (a spectrum
    recorded without its density, say): a figure that needs them is then left out."""
    from ..records import load_arrays

    try:
        return load_arrays(log_dir, probe, metric, step=step)
    except ValueError as err:
        if "no arrays" not in str(err):
            raise
        return {}


def _probe_of(df, metric: str) -> str:
    return str(df.loc[df.metric == metric, "probe"].iloc[0])
