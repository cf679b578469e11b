"""Write a figure in several formats at once."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

__all__ = ["save"]

_FORMATS = {"pdf", "png", "svg", "eps", "jpg", "jpeg", "tiff", "webp"}


def save(
    fig: Figure, stem: str | Path, formats: Sequence[str] = ("pdf", "png", "svg"), dpi: int = 300
) -> list[Path]:
    """Save ``fig`` as ``stem.<format>`` for each format (parent folders are created).

    Returns the written paths. ``dpi`` applies to raster formats.
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",")]
    bad = [f for f in formats if f.lower() not in _FORMATS]
    if bad or not formats:
        raise ValueError(f"formats must be a non-empty subset of {sorted(_FORMATS)}, got {list(formats)}")
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt.lower()}")
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        paths.append(path)
    return paths
