"""Loss landscapes: random/eigen directions and 1-D/2-D loss surfaces around a model.

The model is evaluated functionally (``torch.func.functional_call`` on scratch
parameters and copied buffers), so it comes back bit-identical.
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
