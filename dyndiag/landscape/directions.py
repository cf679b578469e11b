"""Directions for loss landscapes: filter-normalised random directions, Hessian eigenvectors.

Directions are flat ``(dim,)`` tensors in parameter order (the order of
``params``, default every trainable parameter of the model); several directions
are a list.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..curvature.sharded import gathered
from ..evaluation import select_params, unwrap
from ..state import preserve_state

__all__ = ["random_directions", "eigen_directions"]

_NORMALIZATIONS = ("filter", "layer", "none")
_IGNORE = ("bias", "norm")


def _norm_modules() -> tuple[type, ...]:
    kinds = [nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm]
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None:
        kinds.append(rms)
    return tuple(kinds)


def _norm_param_ids(model: nn.Module) -> set[int]:
    kinds = _norm_modules()
    return {
        id(p) for m in model.modules() if isinstance(m, kinds) for p in m.parameters(recurse=False)
    }


def random_directions(
    model: nn.Module,
    n: int = 2,
    normalization: str = "filter",
    seed: int = 0,
    *,
    params: Sequence[torch.Tensor] | None = None,
    ignore: Sequence[str] = ("bias", "norm"),
    orthogonalize: bool = False,
) -> list[torch.Tensor]:
    """``n`` Gaussian directions, normalised to the weights (Li et al. 2018).

    Parameters
    ----------
    model:
        The network; only read. On an FSDP-sharded model (``fully_shard``) every
        rank of the mesh must call this: the parameters are gathered once and
        every rank returns the full-size directions of one process.
    n:
        Number of directions (>= 1).
    normalization:
        ``"filter"``: for every parameter with at least 2 dimensions, each output
        unit's slice (a slice along dim 0: a row of a Linear weight, a filter of a
        convolution) is rescaled to the norm of the same slice of the weights; a
        parameter with fewer dimensions that is not ignored is rescaled as a whole.
        ``"layer"``: each parameter's direction is rescaled to that parameter's norm.
        ``"none"``: plain standard Gaussian entries.
        Filter normalisation makes surfaces invariant to rescalings of the weights
        that leave the function unchanged (ReLU layers, layers before BatchNorm).
    seed:
        Seed of a private ``torch.Generator``; the global RNG is untouched. The
        numbers are drawn on the CPU in the parameters' dtype, so a seed gives the
        same directions on every device.
    params:
        The parameters spanned, in order; default every trainable parameter.
    ignore:
        Parameters whose directions are zero: ``"bias"`` — every parameter with
        fewer than 2 dimensions (biases, normalisation scales); ``"norm"`` — every
        parameter of a normalisation module (BatchNorm, InstanceNorm, LayerNorm,
        GroupNorm, RMSNorm). ``ignore=()`` keeps them all.
    orthogonalize:
        Gram–Schmidt the directions in order (in float64); each is then rescaled
        to its norm before orthogonalisation. Orthogonalised directions are no
        longer exactly filter-normalised.

    Returns
    -------
    list of ``n`` flat tensors of shape ``(dim,)`` on the parameters' device and dtype
    (``dim``: every chosen parameter's full number of entries, also on an FSDP model).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(ignore, str):
        ignore = (ignore,)
    bad = [x for x in ignore if x not in _IGNORE]
    if bad:
        raise ValueError(f"ignore must hold names from {_IGNORE}, got {bad!r}")
    model = unwrap(model)
    # An FSDP model's directions are full-size, drawn and normalised as in one process.
    with gathered(model) as swap, preserve_state(model, params=True):
        _, chosen = select_params(model, swap(params))
        norm_ids = _norm_param_ids(model) if "norm" in ignore else set()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        dtype, device = chosen[0].dtype, chosen[0].device
        directions = []
        for _ in range(n):
            parts = []
            for p in chosen:
                w = p.detach()
                d = torch.randn(w.shape, generator=gen, dtype=dtype).to(device)
                if id(p) in norm_ids or ("bias" in ignore and w.dim() < 2):
                    d.zero_()
                elif normalization == "filter" and w.dim() >= 2:
                    wn = w.reshape(w.shape[0], -1).norm(dim=1)
                    dn = d.reshape(d.shape[0], -1).norm(dim=1).clamp_min(torch.finfo(dtype).tiny)
                    d = d * (wn / dn).reshape(-1, *([1] * (w.dim() - 1)))
                elif normalization in ("filter", "layer"):
                    d = d * (w.norm() / d.norm().clamp_min(torch.finfo(dtype).tiny))
                parts.append(d.reshape(-1))
            directions.append(torch.cat(parts))
        if orthogonalize:
            directions = _gram_schmidt(directions)
    return directions


def _gram_schmidt(directions: list[torch.Tensor]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    basis: list[torch.Tensor] = []
    for i, d in enumerate(directions):
        v = d.double()
        norm = v.norm()
        for _ in range(2):  # twice is enough (Kahan–Parlett)
            for q in basis:
                v = v - (q @ v) * q
        vn = v.norm()
        if vn <= 1e-10 * max(float(norm), torch.finfo(torch.float64).tiny):
            raise ValueError(f"directions[{i}] is linearly dependent on the previous ones; cannot orthogonalize")
        q = v / vn
        basis.append(q)
        out.append((q * norm).to(d.dtype))
    return out


def eigen_directions(H: object, k: int = 2, *, seed: int = 0, tol: float = 1e-6) -> list[torch.Tensor]:
    """The top-``k`` (largest algebraic) unit eigenvectors of a curvature operator.

    ``H`` is a :class:`~dyndiag.HessianOperator` (or any curvature operator); the
    vectors come from :func:`dyndiag.eigenvalues` (``seed`` seeds its start block,
    ``tol`` is its relative eigenvalue tolerance; eigenvector errors scale like
    ``residual / eigengap``, so lower ``tol`` for sharper vectors),
    largest eigenvalue first. Each is flat ``(dim,)`` in the operator's parameter
    order, with the sign fixed so that its largest-magnitude entry is positive. On
    an operator of an FSDP-sharded model (local vectors, ``H.shards``) the vectors
    are gathered: every rank returns the same full-size ``(H.shards.full_dim,)``
    directions, as :func:`surface` takes them.
    """
    from ..curvature.lanczos import eigenvalues

    if not (hasattr(H, "matmat") and hasattr(H, "dim")):
        raise TypeError(f"H must be a curvature operator (e.g. HessianOperator), got {type(H).__name__}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    result = eigenvalues(H, k, tol=tol, return_vectors=True, seed=seed)
    vectors = result.vectors
    shards = getattr(H, "shards", None)
    if shards is not None:
        vectors = shards.full(vectors)
    out = []
    for i in range(vectors.shape[1]):
        v = vectors[:, i].clone()
        if v[v.abs().argmax()] < 0:
            v = -v
        out.append(v)
    return out
