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
    return RotationMeter(named, refs)()


class RotationMeter:
    """Layer rotation against a fixed reference, with the reference normalised once.

    ``layer_rotation`` builds one per call; the LayerRotation probe keeps one for
    the whole run, since the Monitor may measure every step of a sub-millisecond
    training step. The parameters (``named``) are held, matched to the reference
    at construction; calling the meter reads their current values.
    """

    def __init__(self, named: list[tuple[str, torch.Tensor]], refs: Sequence[torch.Tensor]) -> None:
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.u0: list[torch.Tensor] = []
        self.zero0: list[bool] = []
        for (_, p), r in zip(named, refs):
            w0 = r.detach().reshape(-1).to(device=p.device, dtype=torch.float64, copy=True)
            n0 = torch.linalg.vector_norm(w0)
            self.zero0.append(bool(n0 == 0))
            # The same ops as for the current weights below: an unmoved tensor gives exactly 0.
            self.u0.append(w0.div_(n0) if n0 > 0 else w0)

    def __call__(self) -> dict[str, float]:
        # Per tensor, in place, one value out per tensor: at most one tensor's float64
        # copy is alive at a time, never a float64 copy of the whole model.
        sums = []
        for p, u0 in zip(self.params, self.u0):
            w = p.detach().reshape(-1)
            # A float64 copy to work on in place (.double() alone would alias a float64
            # parameter, which the in-place ops below must not touch).
            w = w.double() if w.dtype != torch.float64 else w.clone()
            d = w.div_(torch.linalg.vector_norm(w)).sub_(u0)
            sums.append(torch.dot(d, d))
        if not sums:
            values = []
        elif sums[0].device.type == "cpu":  # no transfer to save: float() is cheaper than a stack
            values = [float(t) for t in sums]
        else:  # one device-to-host copy instead of one synchronisation per tensor
            values = torch.stack(sums).tolist()
        out = {}
        for name, p, zero0, sq in zip(self.names, self.params, self.zero0, values):
            if zero0 or sq != sq:  # a zero reference, or NaN: a zero tensor (0/0) or non-finite weights
                out[name] = _degenerate(p, zero0)
            else:
                out[name] = 0.5 * sq
        return out


def _degenerate(p: torch.Tensor, zero0: bool) -> float:
    """Rotation where a norm is zero — cosine similarity 0 with any other tensor: 1,
    or 0 if both are zero — and NaN for non-finite weights."""
    zero = not bool(p.detach().any())
    if zero or zero0:
        return 0.0 if (zero and zero0) else 1.0
    return float("nan")
