"""Tensors to numpy arrays, for records and figures."""

from __future__ import annotations

import numpy as np

__all__ = ["to_numpy"]


def to_numpy(x: object) -> np.ndarray:
    """``x`` as a numpy array that shares no memory with it.

    A tensor is detached and copied to the CPU; bfloat16, which numpy lacks, comes
    back as float32 (which holds every bfloat16 value exactly).
    """
    import torch

    if not isinstance(x, torch.Tensor):
        return np.array(x)
    t = x.detach().cpu().resolve_conj().resolve_neg()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy().copy()
