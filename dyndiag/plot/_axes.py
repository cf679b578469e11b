"""Figure/axes creation without pyplot's global state."""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.figure import Figure


def style_width() -> float:
    """The current style's figure width in inches (``dd.plot.style`` sets it), never
    below a single paper column (3.25 in)."""
    import matplotlib as mpl

    return max(float(mpl.rcParams["figure.figsize"][0]), 3.25)


def figure_and_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """Use the caller's ``ax``, or a new Figure (not registered with pyplot, so it never leaks)."""
    if ax is not None:
        if not isinstance(ax, Axes):
            raise TypeError(f"ax must be a matplotlib Axes, got {type(ax).__name__}")
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()
