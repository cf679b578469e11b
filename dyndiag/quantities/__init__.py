"""Quantities: pure functions on (model, loss, data, optimizer) — sharpness and
edge-of-stability thresholds, GraNd/EL2N, gradient coherence and GSNR, layer
rotation, directional sharpness, Softmax Collapse, safe step radius, subspace
overlap, and the mean gradient they start from. Offline-usable; nothing here changes the model, its optimizer or the RNG."""

from .._lazy import lazy_exports

_EXPORTS = {
    "grand_scores": ".per_example",
    "el2n_scores": ".per_example",
    "gradient_coherence": ".per_example",
    "gradient_snr": ".per_example",
    "directional_sharpness": ".sharpness",
    "preconditioned_sharpness": ".sharpness",
    "stability_threshold": ".sharpness",
    "subspace_overlap": ".sharpness",
    "softmax_collapse": ".softmax",
    "gradient_weight_cosine": ".softmax",
    "layer_rotation": ".rotation",
    "safe_step_radius": ".radius",
    "mean_gradient": ".gradients",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
