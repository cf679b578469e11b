"""Probes: thin scheduled wrappers around dyndiag's quantities, plus the Probe protocol."""

from .._lazy import lazy_exports

_EXPORTS = {
    "Probe": ".base",
    "RunContext": ".context",
    "StepContext": ".context",
    "GradientNorm": ".gradients",
    "GradientCoherence": ".gradients",
    "HessianSpectrum": ".curvature",
    "EdgeOfStability": ".curvature",
    "SubspaceOverlap": ".curvature",
    "DirectionalSharpness": ".updates",
    "SafeStepRadius": ".updates",
    "SoftmaxCollapse": ".outputs",
    "DataScores": ".outputs",
    "LayerRotation": ".weights",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
