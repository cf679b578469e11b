"""Layer rotation (Carbonnelle & De Vleeschouwer, "Layer rotation"): the cosine
distance between each parameter tensor and a reference (usually its initialisation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..arrays import to_floats
from ._common import check_model, unwrap

__all__ = ["layer_rotation"]


def layer_rotation(
    model: nn.Module, reference: nn.Module | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
) -> dict[str, float]:
    """``1 - cos(w, w_ref)`` for every parameter tensor, flattened.

    Computed as ``||w/||w|| - w_ref/||w_ref|| ||^2 / 2`` in float64
    (:class:`RotationMeter`), which equals ``1 - cos`` and keeps its precision for
    tiny angles (``1 - cos`` itself would round to 0 below ~1e-4 rad in float32).

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
    named, refs = matched_reference(model, reference)
    values = to_floats(RotationMeter([p for _, p in named], refs, dtype=torch.float64)())
    return {n: v for (n, _), v in zip(named, values)}


def matched_reference(
    model: nn.Module, reference: nn.Module | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
) -> tuple[list[tuple[str, nn.Parameter]], list[torch.Tensor]]:
    """``(model.named_parameters(), the reference tensor of each)``, checked: see
    :func:`layer_rotation` for what ``reference`` may be."""
    model = check_model(model)
    named = list(model.named_parameters())
    if isinstance(reference, nn.Module):
        ref = dict(unwrap(reference).named_parameters())
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
    return named, refs


class RotationMeter:
    """Layer rotation of tensors against fixed references, normalised once.

    ``1 - cos(w, w_ref) = ||w/||w|| - w_ref/||w_ref|| ||^2 / 2`` per tensor with
    foreach kernels, in ``dtype`` (default: each tensor's own, at least float32).
    Nothing is brought to the host: a call returns 0-d tensors.

    Precision floor: the formula has no cancellation. In float32 the error against
    float64 stays below ``1e-12 + 2e-7 * sqrt(r) + 1e-5 * r`` for a rotation ``r``
    (measured at half that bound or less for tensors of 10 to 10^6 elements, angles
    1e-7 to 2 rad, norms changed by factors 0.5 to 3; tested): the rounding of the
    normalised tensors (``eps * sqrt(r / n)``) and of the norms' sums. A direct
    ``1 - cos`` in float32 rounds to 0 below ``r`` of about 6e-8.

    Parameters
    ----------
    tensors:
        The live tensors (parameters), read at each call.
    refs:
        Their references, same shapes (copied here).
    dtype:
        Compute in this dtype (``layer_rotation`` uses float64).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], refs: Sequence[torch.Tensor],
                 dtype: torch.dtype | None = None) -> None:
        self.tensors = list(tensors)
        # Half types compute in float32: their own rounding (2^-8) would swamp small rotations.
        self.dtypes = [dtype or (t.dtype if t.element_size() >= 4 else torch.float32) for t in self.tensors]
        self.cast = any(d != t.dtype for d, t in zip(self.dtypes, self.tensors))
        with torch.no_grad():
            w0 = [r.detach().to(device=t.device, dtype=d) for r, t, d in zip(refs, self.tensors, self.dtypes)]
            norms = torch._foreach_norm(w0) if w0 else []
            # The same ops as for the current weights below: an unmoved tensor gives exactly 0.
            self.u0 = torch._foreach_div(w0, norms) if w0 else []
            self.ref_norm = torch.stack([n.to(norms[0].device) for n in norms]) if norms else None
            self.ref_zero = self.ref_norm == 0 if norms else None
            # Known once, on the host: the common case (no zero reference) then needs fewer kernels.
            self.any_ref_zero = bool(self.ref_zero.any()) if norms else False
        self.devices = len({t.device for t in self.tensors}) > 1

    def __call__(self) -> list[torch.Tensor]:
        """The rotation of each tensor, as 0-d tensors in ``[0, 2]`` (NaN for non-finite weights)."""
        if not self.tensors:
            return []
        with torch.no_grad():  # foreach ops on parameters would otherwise record a graph
            w = self.tensors
            if self.cast:
                w = [t.to(d) for t, d in zip(w, self.dtypes)]
            norms = torch._foreach_norm(w)
            u = torch._foreach_div(w, norms)
            torch._foreach_sub_(u, self.u0)
            dist, a = torch._foreach_norm(u), norms
            if self.devices:  # a model split over devices: combine on one
                dist, a = [d.to(self.ref_norm.device) for d in dist], [n.to(self.ref_norm.device) for n in a]
            dist, a = torch.stack(dist), torch.stack(a)
            # A zero tensor on either side has cosine similarity 0 with the other (torch's
            # convention): rotation 1, or 0 when both are zero (0/0 above gave NaN there).
            # Non-finite weights give NaN.
            rot = dist.square().mul(0.5)  # out of place: a DTensor (FSDP) norm cannot be squared in place
            if self.any_ref_zero:
                rot = torch.where((a == 0) | self.ref_zero, a != self.ref_norm, rot)
            else:  # masked_fill takes the 1 as a scalar: one kernel fewer than where(..., 1.0, ...)
                rot = rot.masked_fill(a == 0, 1.0)
        return list(rot.unbind())
