"""Small real datasets for the demo, examples and benchmarks (scikit-learn's digits)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["load_digits"]


def load_digits(
    dtype: torch.dtype = torch.float32, test_fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as tensors, pixel values scaled to [0, 1].

    Returns ``(x_train, y_train, x_test, y_test)``: inputs ``(n, 64)`` in ``dtype``,
    integer labels ``(n,)`` in 0..9, split by a seeded permutation (numpy's own
    ``Generator``; the global RNG is untouched). 1797 samples in all.
    """
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data comes with scikit-learn: pip install 'dyndiag[demo]'"
        ) from err
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    X, y = _load(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    x = torch.as_tensor(X / 16.0, dtype=dtype)
    t = torch.as_tensor(y, dtype=torch.long)
    return x[train], t[train], x[test], t[test]
