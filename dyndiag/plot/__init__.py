"""Figures from dyndiag's results. Every function takes ``ax=None`` and returns the Figure."""

from .._lazy import lazy_exports

_EXPORTS = {
    "landscape": ".landscapes",
    "scores": ".distributions",
    "spectrum": ".spectra",
    "block_spectra": ".spectra",
    "save": ".files",
    "style": ".styles",
    "SINGLE_COLUMN": ".styles",
    "DOUBLE_COLUMN": ".styles",
    "edge_of_stability": ".dynamics",
    "metrics": ".dynamics",
    "layer_rotation": ".dynamics",
    "coherence": ".dynamics",
    "run_figures": ".runs",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
