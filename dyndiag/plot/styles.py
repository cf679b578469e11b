"""Figure styles for papers, talks and notebooks, applied only inside a ``with`` block.

The module is ``styles`` (not ``style``): a submodule named like the exported
function would shadow it (see ``dyndiag/_lazy.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import matplotlib as mpl
from cycler import cycler

__all__ = ["style", "SINGLE_COLUMN", "DOUBLE_COLUMN", "STYLES"]

SINGLE_COLUMN = 3.25
"""Width in inches of a single-column figure (two-column paper layouts)."""
DOUBLE_COLUMN = 6.75
"""Width in inches of a figure spanning both columns."""

# name -> (base font size in pt, figure width in inches, line width)
STYLES: dict[str, tuple[float, float, float]] = {
    "paper": (8.0, SINGLE_COLUMN, 1.0),
    "notebook": (11.0, 6.0, 1.5),
    "talk": (14.0, 8.0, 2.0),
}


def _rc(name: str) -> dict:
    import seaborn as sns

    font, width, lw = STYLES[name]
    small = font - 1
    return {
        "axes.prop_cycle": cycler(color=sns.color_palette("colorblind").as_hex()),
        "image.cmap": "viridis",
        "figure.figsize": (width, width * 0.68),
        "figure.dpi": 100 if name == "notebook" else 150,
        "savefig.dpi": 300 if name == "paper" else 200,
        "font.size": font,
        "axes.titlesize": font,
        "axes.labelsize": font,
        "xtick.labelsize": small,
        "ytick.labelsize": small,
        "legend.fontsize": small,
        "legend.title_fontsize": font,
        "legend.frameon": False,
        "figure.titlesize": font + 1,
        "lines.linewidth": lw,
        "lines.markersize": 3 * lw,
        "axes.linewidth": 0.6 * lw,
        "xtick.major.width": 0.6 * lw,
        "ytick.major.width": 0.6 * lw,
        "xtick.major.size": 2.5 * lw + 0.5,
        "ytick.major.size": 2.5 * lw + 0.5,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": False,
        "pdf.fonttype": 42,  # TrueType in PDFs: editable text, accepted by publishers
        "ps.fonttype": 42,
        "svg.fonttype": "none",
    }


@contextmanager
def style(name: str = "paper") -> Iterator[None]:
    """Apply a figure style inside a ``with`` block; global rcParams are unchanged after it.

    ``name``: ``"paper"`` (single-column width, 3.25 in, 8 pt fonts), ``"notebook"``
    (6 in, 11 pt) or ``"talk"`` (8 in, 14 pt). All use seaborn's colour-blind palette,
    open axes (no top/right spines), frameless legends and TrueType fonts in PDF.
    Create (and preferably save) figures inside the block: ``dd.plot.*`` functions
    read the style's figure width and fonts when they build a figure. Implemented
    with ``matplotlib.rc_context``.

    Raises ``ValueError`` for an unknown name.
    """
    if name not in STYLES:
        raise ValueError(f"unknown style {name!r}; choose one of {sorted(STYLES)}")
    with mpl.rc_context(_rc(name)):
        yield
