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

    Tensors of one dtype and device are stacked as they are; several kinds are each
    stacked, widened to float64 (exact for every floating type) and joined on the
    first tensor's device. Nothing else synchronises with the device. DTensors
    (values reduced from FSDP shards) are made full first, a collective on every rank.
    """
    import torch

    if not tensors:
        return []
    # A DTensor (a value computed from FSDP shards) becomes its full value: a collective,
    # which every rank reaches at the same flush.
    tensors = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in tensors]
    kinds: dict = {}
    for i, t in enumerate(tensors):
        kinds.setdefault((t.dtype, t.device), []).append(i)
    if len(kinds) == 1:
        return [float(v) for v in torch.stack(tensors).tolist()]
    device = tensors[0].device
    order = [i for idx in kinds.values() for i in idx]
    flat = torch.cat([torch.stack([tensors[i] for i in idx]).to(device, torch.float64) for idx in kinds.values()])
    values = flat.tolist()  # the one copy
    out = [0.0] * len(tensors)
    for i, v in zip(order, values):
        out[i] = float(v)
    return out
