"""Curvature operators and estimators. Knows nothing of training loops, probes, files or plots."""

from .._lazy import lazy_exports

_EXPORTS = {
    "CurvatureOperator": ".base",
    "MatrixOperator": ".base",
    "HessianOperator": ".operators",
    "GGNOperator": ".operators",
    "PreconditionedOperator": ".preconditioned",
    "eigenvalues": ".lanczos",
    "trace": ".hutchinson",
    "diagonal": ".hutchinson",
    "spectral_density": ".density",
    "SpectralDensity": ".density",
    "EigenResult": ".results",
    "TraceResult": ".results",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
