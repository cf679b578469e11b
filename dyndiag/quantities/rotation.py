"""Layer rotation (Carbonnelle & De Vleeschouwer, "Layer rotation"): the cosine
distance between each parameter tensor and a reference (usually its initialisation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._common import check_model

__all__ = ["layer_rotation"]


def layer_rotation(
    model: nn.Module, reference: nn.Module | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
) -> dict[str, float]:
    """``1 - cos(w, w_ref)`` for every parameter tensor, flattened.

    Computed as ``||w/||w|| - w_ref/||w_ref|| ||^2 / 2`` in float64, which equals
    ``1 - cos`` and keeps its precision for tiny angles (``1 - cos`` itself would
    round to 0 below ~1e-4 rad in float32).

    Parameters
    ----------
    model
        The network now. Only read.
    reference
        The weights to compare with: a module with the same parameter names, a
        ``state_dict`` (or any mapping name -> tensor; extra keys such as buffers are
        ignored), or a list of tensors in the order of ``model.parameters()``.

    Returns
    -------
    dict[str, float]
        One entry per parameter of ``model.named_parameters()`` (frozen ones
        included, tied ones once), in that order: the cosine distance in ``[0, 2]``
        (0: same direction, 1: orthogonal, 2: opposite), invariant to rescaling
        either tensor. A tensor equal to its reference gives 0 (also when both
        are all zeros); otherwise an all-zero tensor on either side gives 1 —
        cosine similarity 0, the convention of
        ``torch.nn.functional.cosine_similarity`` — so a bias initialised at 0
        reads 1 once it moves, never NaN.
    """
    check_model(model)
    named = list(model.named_parameters())
    if isinstance(reference, nn.Module):
        ref = dict(reference.named_parameters())
    elif isinstance(reference, Mapping):
        ref = reference
    elif isinstance(reference, Sequence) and not isinstance(reference, (str, bytes)):
        if isinstance(reference, torch.Tensor):
            raise TypeError("reference must be a module, a state_dict or a list of tensors, not a single Tensor")
        if len(reference) != len(named):
            raise ValueError(
                f"reference holds {len(reference)} tensors, but model has {len(named)} parameters "
                "(a list must follow model.parameters())"
            )
        ref = {name: t for (name, _), t in zip(named, reference)}
    else:
        raise TypeError(
            f"reference must be a module, a state_dict or a list of tensors, got {type(reference).__name__}"
        )
    out: dict[str, float] = {}
    for name, p in named:
        if name not in ref:
            raise ValueError(f"reference has no entry for parameter {name!r}")
        r = ref[name]
        if not isinstance(r, torch.Tensor):
            raise TypeError(f"reference[{name!r}] must be a tensor, got {type(r).__name__}")
        if r.shape != p.shape:
            raise ValueError(
                f"reference[{name!r}] has shape {tuple(r.shape)}, but the parameter has shape {tuple(p.shape)}"
            )
        w = p.detach().reshape(-1).double()
        w0 = r.detach().reshape(-1).to(device=w.device, dtype=torch.float64)
        nw, n0 = torch.linalg.vector_norm(w), torch.linalg.vector_norm(w0)
        if torch.equal(w, w0):
            out[name] = 0.0  # unmoved, including a tensor that is and was all zeros
            continue
        if float(nw) == 0 or float(n0) == 0:
            out[name] = 1.0  # a zero vector has cosine similarity 0 with any other
            continue
        out[name] = float(torch.linalg.vector_norm(w / nw - w0 / n0) ** 2 / 2)
    return out
