"""Loss landscapes: random/eigen directions and 1-D/2-D loss surfaces around a model.

Surfaces are evaluated under the state guard (:func:`dyndiag.state.preserve_state`),
so the model comes back bit-identical.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "random_directions": ".directions",
    "eigen_directions": ".directions",
    "surface": ".grid",
    "Surface": ".grid",
    "trajectory_directions": ".trajectory",
    "TrajectoryDirections": ".trajectory",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
