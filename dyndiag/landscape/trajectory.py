"""Trajectory directions: PCA of a training path of checkpoints (Li et al. 2018, sec. 7).

The path is the flattened parameter vectors ``theta_0 .. theta_T`` of the
checkpoints, in parameter order (every trainable parameter, as everywhere in
dyndiag). The differences ``theta_t - center`` (default centre: the last
checkpoint) are decomposed by an SVD in float64; the top right singular vectors
are the directions. Pass the model at the centre (by default the final model)
to :func:`~dyndiag.landscape.surface` with these directions and the projected
path (``TrajectoryDirections.path``) lines up with the surface's coordinates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..checkpoints import strip_prefixes
from ..curvature.sharded import is_sharded_param
from ..evaluation import select_params, unwrap

__all__ = ["TrajectoryDirections", "trajectory_directions"]

# State-dict entries that are buffers, not parameters (BatchNorm statistics).
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


class TrajectoryDirections(list):
    """The top-``n`` PCA directions of a training path: a list of flat tensors plus extras.

    It *is* a ``list`` of ``n`` unit-norm flat ``(dim,)`` tensors (parameter order,
    the parameters' dtype and device), so it can be passed wherever a list of
    directions is expected, e.g. ``surface(final_model, loss_fn, data, traj)``.

    Attributes
    ----------
    directions:
        The directions as a plain ``list`` (a copy of the list itself).
    explained_variance:
        ``np.ndarray (n,)``: the fraction of ``sum_t ||theta_t - center||^2``
        captured by each direction, descending; the sum is <= 1 (1 when the
        path lies in the span of the directions).
    path:
        ``np.ndarray (T+1, n)``: ``path[t, k] = (theta_t - center) . d_k``, the
        checkpoints' coordinates in the direction basis (float64). With the
        default centre the last row is the origin.
    """

    def __init__(self, directions: Sequence[torch.Tensor], explained_variance: np.ndarray, path: np.ndarray):
        super().__init__(directions)
        self.explained_variance = explained_variance
        self.path = path

    @property
    def directions(self) -> list[torch.Tensor]:
        return list(self)

    def extent(self, margin: float = 1.2) -> float:
        """An ``extent`` for :func:`surface` that holds the whole path: ``margin * max |path|``."""
        return float(margin) * float(np.abs(self.path).max())

    def __repr__(self) -> str:
        dim = self[0].shape[0] if len(self) else 0
        ev = np.array2string(self.explained_variance, precision=4)
        return f"TrajectoryDirections(n={len(self)}, dim={dim}, explained_variance={ev}, path_len={len(self.path)})"


def _param_names(model: nn.Module) -> list[str]:
    names, _ = select_params(unwrap(model), None)
    return names


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors' full values, detached and concatenated flat; an FSDP-sharded one
    (``DTensor``) is gathered, a collective every rank of its mesh enters."""
    flat = [t.detach() for t in tensors]
    return torch.cat([(t.full_tensor() if is_sharded_param(t) else t).reshape(-1) for t in flat])


def _flatten(entry, names: list[str] | None, what: str) -> torch.Tensor:
    """One checkpoint-like entry -> flat ``(dim,)`` tensor (detached, not copied if avoidable)."""
    if isinstance(entry, nn.Module):
        _, params = select_params(unwrap(entry), None)
        return _flat(params)
    if isinstance(entry, torch.Tensor):
        if entry.dim() != 1:
            raise ValueError(f"{what} must be a flat (dim,) tensor, got shape {tuple(entry.shape)}")
        if not entry.is_floating_point():
            raise TypeError(f"{what} must be floating point, got {entry.dtype}")
        return entry.detach()
    if isinstance(entry, Mapping):
        if names is not None:
            # A state_dict saved through a wrapper (torch.compile: _orig_mod., DDP: module.).
            entry = strip_prefixes(entry, set(names)) or entry
            missing = [k for k in names if k not in entry]
            if missing:
                raise ValueError(f"{what} (a state_dict) lacks parameter(s) {missing[:5]}")
            tensors = [entry[k] for k in names]
        else:
            tensors = [
                v
                for k, v in entry.items()
                if isinstance(v, torch.Tensor)
                and v.is_floating_point()
                and not str(k).endswith(_BUFFER_SUFFIXES)
            ]
        if not tensors:
            raise ValueError(f"{what} (a state_dict) holds no floating-point parameter tensors")
        for t in tensors:
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"{what} (a state_dict) holds a non-floating or non-tensor parameter entry")
        return _flat(tensors)
    raise TypeError(
        f"{what} must be an nn.Module, a state_dict (mapping) or a flat (dim,) tensor, got {type(entry).__name__}"
    )


def trajectory_directions(
    checkpoints: Sequence[nn.Module | Mapping[str, torch.Tensor] | torch.Tensor],
    n: int = 2,
    *,
    center: nn.Module | Mapping[str, torch.Tensor] | torch.Tensor | None = None,
    params_of: nn.Module | None = None,
) -> TrajectoryDirections:
    """The top-``n`` principal directions of a training path (PCA of the checkpoints).

    Parameters
    ----------
    checkpoints:
        A sequence of at least 2 checkpoints in training order, each an
        ``nn.Module``, a ``state_dict`` or a flat ``(dim,)`` tensor (they may be
        mixed); all must hold the same parameters. A module contributes its
        trainable parameters (``requires_grad``) in ``named_parameters()`` order,
        flattened — the order of every flat vector in dyndiag. A state_dict
        contributes the entries named by the trainable parameters of
        ``params_of`` (default: the first module among ``checkpoints`` and
        ``center``); with no module at all, every floating-point tensor in key
        order except BatchNorm statistics (keys ending in ``running_mean``,
        ``running_var``, ``num_batches_tracked``). Pass ``params_of`` for models
        with frozen parameters or other floating buffers. Only read. Modules and
        state_dicts of an FSDP-sharded model (``DTensor`` entries) are gathered to
        full values, so every rank of the mesh must call this, and the directions
        are full-size on every rank.
    n:
        Number of directions, ``1 <= n <= len(checkpoints) - 1``.
    center:
        The point the path is expressed around (same kinds as a checkpoint);
        default the last checkpoint, matching :func:`surface`, which centres on
        the model it is given: pass the final model to ``surface``.
    params_of:
        A model whose trainable parameter names select the state_dict entries.

    Returns
    -------
    :class:`TrajectoryDirections`: a list of ``n`` unit-norm flat directions (the
    top right singular vectors of the matrix of rows ``theta_t - center``,
    computed in float64, each with its largest-magnitude entry positive; in
    the first checkpoint's dtype and device), with ``explained_variance`` and
    ``path``. For a plot window holding the path use ``extent=traj.extent()``
    (``1.2 * max |path|``).

    Raises ``ValueError`` for fewer than 2 checkpoints, ``n`` out of range,
    checkpoints of different sizes, or a path spanning fewer than ``n``
    dimensions (e.g. identical checkpoints).
    """
    if isinstance(checkpoints, (torch.Tensor, nn.Module, Mapping)) or not isinstance(checkpoints, Sequence):
        raise TypeError(
            f"checkpoints must be a sequence (list) of models, state_dicts or flat tensors, "
            f"got {type(checkpoints).__name__}"
        )
    checkpoints = list(checkpoints)
    if len(checkpoints) < 2:
        raise ValueError(f"checkpoints must hold at least 2 checkpoints, got {len(checkpoints)}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if n > len(checkpoints) - 1:
        raise ValueError(
            f"n must be <= len(checkpoints) - 1 = {len(checkpoints) - 1} (the rank of the path), got {n}"
        )
    if params_of is not None and not isinstance(params_of, nn.Module):
        raise TypeError(f"params_of must be an nn.Module, got {type(params_of).__name__}")

    names = None
    ref = params_of
    if ref is None:
        ref = next((c for c in [*checkpoints, center] if isinstance(c, nn.Module)), None)
    if ref is not None:
        names = _param_names(ref)

    vectors = [_flatten(c, names, f"checkpoints[{i}]") for i, c in enumerate(checkpoints)]
    dim = vectors[0].shape[0]
    for i, v in enumerate(vectors):
        if v.shape[0] != dim:
            raise ValueError(
                f"checkpoints must all have the same parameters: checkpoints[0] has {dim} entries, "
                f"checkpoints[{i}] has {v.shape[0]}"
            )
    dtype, device = vectors[0].dtype, vectors[0].device
    if center is None:
        c = vectors[-1]
    else:
        c = _flatten(center, names, "center")
        if c.shape[0] != dim:
            raise ValueError(f"center must have {dim} entries like the checkpoints, got {c.shape[0]}")
    c = c.to(device=device, dtype=torch.float64)

    X = torch.stack([v.to(device=device, dtype=torch.float64) for v in vectors]) - c  # (T+1, dim)
    if not torch.isfinite(X).all():
        raise ValueError("checkpoints (or center) hold NaN or inf")
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    total = float((S**2).sum())
    tol = max(X.shape) * torch.finfo(torch.float64).eps * float(S[0]) if len(S) else 0.0
    if total == 0.0 or float(S[n - 1]) <= tol:
        raise ValueError(
            f"checkpoints span fewer than n={n} dimensions around the centre; the directions are undefined"
        )
    V = Vh[:n].clone()  # (n, dim), float64
    for k in range(n):
        if V[k, V[k].abs().argmax()] < 0:
            V[k] = -V[k]
    path = (X @ V.T).cpu().numpy()
    explained = (S[:n] ** 2 / total).cpu().numpy()
    directions = [V[k].to(dtype=dtype) for k in range(n)]
    return TrajectoryDirections(directions, explained, path)
