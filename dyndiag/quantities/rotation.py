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
    refs = []
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
        refs.append(r)
    if not named:
        return {}
    return RotationMeter(named, refs)(model)


class RotationMeter:
    """Layer rotation against a fixed reference, with the reference flattened once.

    ``layer_rotation`` builds one per call; the LayerRotation probe keeps one for
    the whole run, since the Monitor may measure every step of a sub-millisecond
    training step. Parameters are matched by name (``named``) at construction.
    """

    def __init__(self, named: list[tuple[str, torch.Tensor]], refs: Sequence[torch.Tensor]) -> None:
        self.names = [n for n, _ in named]
        device = named[0][1].device
        self.seg = torch.repeat_interleave(
            torch.arange(len(named), device=device), torch.tensor([p.numel() for _, p in named], device=device)
        )
        w0 = torch.cat([r.detach().reshape(-1).to(device=device, dtype=torch.float64) for r in refs])
        n0 = self._per_tensor(w0 * w0).sqrt()
        self.n0_zero = n0 == 0
        self.u0 = w0 / torch.where(n0 > 0, n0, 1.0)[self.seg]

    def _per_tensor(self, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(self.names), dtype=torch.float64, device=values.device).index_add_(0, self.seg, values)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        # One pass over all tensors at once (segment sums), not a dozen small ops per tensor.
        params = dict(model.named_parameters())
        w = torch.cat([params[n].detach().reshape(-1) for n in self.names]).to(torch.float64)
        nw = self._per_tensor(w * w).sqrt()
        u = w / torch.where(nw > 0, nw, 1.0)[self.seg]
        # An unmoved non-zero tensor gives exactly 0 here (same values, same ops as u0).
        dist = self._per_tensor((u - self.u0).square_()) * 0.5
        # A zero tensor has cosine similarity 0 with any other: 1, or 0 if both are zero.
        both_zero = (nw == 0) & self.n0_zero
        return dict(zip(self.names, torch.where((nw == 0) | self.n0_zero, (~both_zero).double(), dist).tolist()))
