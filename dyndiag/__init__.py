"""dyndiag: training-dynamics diagnostics for PyTorch.

Hessian spectra, traces and densities on batched Hessian-vector products;
edge of stability, per-example scores and other training-dynamics quantities;
a Monitor that records them during training; loss landscapes and figures.
Names load on first use, so ``import dyndiag`` does not import plotting libraries.
"""

from ._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "preserve_state": ".state",
    "plot": ".plot",
    "datasets": ".datasets",
    "probes": ".probes",
    "Probe": ".probes",
    "Monitor": ".monitor",
    "load_records": ".records",
    "load_arrays": ".records",
    "analyze": ".analysis",
    "load_checkpoint": ".checkpoints",
    "quantities": ".quantities",
    "landscape": ".landscape",
    **{
        name: ".quantities"
        for name in (
            "grand_scores",
            "el2n_scores",
            "gradient_coherence",
            "gradient_snr",
            "directional_sharpness",
            "preconditioned_sharpness",
            "stability_threshold",
            "subspace_overlap",
            "softmax_collapse",
            "gradient_weight_cosine",
            "layer_rotation",
            "safe_step_radius",
        )
    },
    **{
        name: ".curvature"
        for name in (
            "CurvatureOperator",
            "MatrixOperator",
            "HessianOperator",
            "GGNOperator",
            "PreconditionedOperator",
            "eigenvalues",
            "trace",
            "diagonal",
            "spectral_density",
            "SpectralDensity",
            "EigenResult",
            "TraceResult",
        )
    },
}
__all__ = sorted(_EXPORTS) + ["__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
