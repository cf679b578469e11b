"""Tensors to numpy arrays, for records and figures."""

from __future__ import annotations

import numpy as np

__all__ = ["to_numpy", "to_floats"]


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


def to_floats(tensors: list) -> list[float]:
    """The values of 0-d tensors (any dtypes and devices) as Python floats, in one
    device-to-host copy.

    Values of one dtype are stacked as they are; mixed dtypes are widened to float64
    first (exact for every floating type). Nothing else synchronises with the device.
    """
    import torch

    if not tensors:
        return []
    first = tensors[0]
    if all(t.dtype == first.dtype and t.device == first.device for t in tensors):
        flat = torch.stack(tensors)
    else:
        flat = torch.stack([t.to(device=first.device, dtype=torch.float64) for t in tensors])
    return [float(v) for v in flat.tolist()]
