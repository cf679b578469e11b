"""Sharpness along directions and under preconditioners, stability thresholds, and the
overlap of a vector with the top Hessian eigenspace.

Edge of stability (Cohen et al. 2021): gradient descent with step size ``lr`` is
linearly stable on a quadratic only while the sharpness ``lambda_max(H)`` stays
below :func:`stability_threshold`; for Adam the comparison is with the
preconditioned sharpness ``lambda_max(P^-1/2 H P^-1/2)``
(:func:`preconditioned_sharpness`), ``P`` the denominator Adam divides its step by.
"""

from __future__ import annotations

import math

import torch

from ..curvature.vectors import check_int, check_operator, column_norms, full_dim, inner, multiply, orthonormal, reduce
from ..curvature.base import CurvatureOperator
from ..curvature.lanczos import eigenvalues
from ..curvature.preconditioned import PreconditionedOperator
from ..curvature.results import EigenResult
from ._common import to_float

__all__ = ["directional_sharpness", "preconditioned_sharpness", "stability_threshold", "subspace_overlap"]


def _check_vector(v: object, name: str, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a flat torch.Tensor of shape ({dim},), got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != dim:
        raise ValueError(f"{name} must have shape ({dim},) (flat, in the operator's parameter order), got {tuple(v.shape)}")
    if v.dtype != dtype:
        raise TypeError(f"{name} has dtype {v.dtype}, but the operator works in {dtype}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} must be finite (it holds NaN or inf)")
    return v.detach().to(device)


def _unit(op: object, v: torch.Tensor, name: str) -> torch.Tensor:
    norm = column_norms(op, v)  # over every rank's entries when op is sharded (FSDP)
    if float(norm) == 0.0:
        raise ValueError(f"{name} must be non-zero")
    return v / norm


def directional_sharpness(op: object, direction: torch.Tensor) -> float:
    """Curvature along a direction: ``d^T H d / ||d||^2``.

    Parameters
    ----------
    op
        A curvature operator ``H`` (e.g. :class:`~dyndiag.HessianOperator`).
    direction
        Flat ``(op.dim,)`` tensor ``d`` in the operator's parameter order and dtype
        (e.g. an optimizer's update ``theta_after - theta_before``); non-zero.

    Returns
    -------
    float
        The Rayleigh quotient (loss units per squared parameter unit); one product
        of ``op``. Independent of the length of ``d``.
    """
    dim, dtype, device = check_operator(op)
    u = _unit(op, _check_vector(direction, "direction", dim, dtype, device), "direction")
    return float(reduce(op, u @ multiply(op, u[:, None])[:, 0]))


def _top_eigenvalue(op: CurvatureOperator, tol: float, seed: int) -> float:
    if full_dim(op) == 1:
        return float(multiply(op, torch.ones(1, 1, dtype=op.dtype, device=op.device))[0, 0])
    return float(eigenvalues(op, k=1, which="LA", tol=tol, seed=seed).values[0])


class _Restricted(CurvatureOperator):
    """The principal submatrix of ``op`` on the coordinates ``index``."""

    def __init__(self, op: CurvatureOperator, index: torch.Tensor) -> None:
        super().__init__()
        self.op = op
        self.index = index
        self.dim, self.dtype, self.device = int(index.numel()), op.dtype, op.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(self.op.dim, V.shape[1], dtype=self.dtype, device=self.device)
        full[self.index] = V
        return multiply(self.op, full)[self.index]


def _check_group(group: object, optimizer: torch.optim.Optimizer) -> int | None:
    if group is None:
        return None
    group = check_int(group, "group")
    n = len(optimizer.param_groups)
    if not 0 <= group < n:
        raise ValueError(f"group must index one of the optimizer's {n} param groups, got {group}")
    return group


def preconditioned_sharpness(
    op: object,
    optimizer: torch.optim.Optimizer,
    gradient: torch.Tensor | None = None,
    *,
    group: int | None = None,
    tol: float = 1e-6,
    seed: int = 0,
) -> float:
    """Top eigenvalue of ``P^-1/2 H P^-1/2`` for an Adam/AdamW optimizer.

    ``P = (1 - beta1^t) * (sqrt(v / (1 - beta2^t)) + eps)`` elementwise, the
    denominator torch's Adam divides its step by (its step is
    ``lr * m / P``), so Adam is linearly stable on the quadratic ``H`` while this
    value stays below :func:`stability_threshold` (``(2 + 2 beta1) / ((1 - beta1) lr)``).

    Parameters
    ----------
    op
        A curvature operator with a ``params`` attribute (e.g.
        :class:`~dyndiag.HessianOperator`): the optimizer's state is matched to its
        parameters by identity, so every one of them must be in the optimizer.
    optimizer
        ``torch.optim.Adam`` or ``torch.optim.AdamW`` (or a subclass). Each
        parameter uses its own group's ``betas``, ``eps``, ``weight_decay`` and
        ``amsgrad``; mixed groups are fine. Only read, never modified.
    gradient
        Flat ``(op.dim,)`` gradient of the loss in ``op``'s parameter order (what the
        parameters' ``.grad`` hold before ``optimizer.step()``). Without it, ``v``
        and ``t`` are the optimizer's state as it is — the preconditioner of the
        last step taken; a ``ValueError`` before the first step. With it, the
        preconditioner the coming step will apply: ``t + 1`` and
        ``v = beta2 * v + (1 - beta2) * g^2`` with ``g`` the gradient Adam will see
        (negated under ``maximize``, plus ``weight_decay * theta`` for Adam's coupled
        decay), which exists at step 0 too.
    group
        Restrict to the parameters of this param group (the top eigenvalue of the
        diagonal block of ``P^-1/2 H P^-1/2`` on them), e.g. to compare with
        ``stability_threshold(optimizer, group=group)``.
    tol, seed
        Passed to :func:`dyndiag.eigenvalues` (Lanczos, ``which="LA"``).

    Returns
    -------
    float
        The preconditioned sharpness, in the same units as
        ``stability_threshold(optimizer)`` (1 / lr units) so the two compare
        directly. AMSGrad uses the running maximum of ``v`` (with ``gradient``:
        ``max(max_exp_avg_sq, new v)``). Adam's coupled ``weight_decay`` ``w``
        makes the operator ``P^-1/2 (H + w I) P^-1/2``; AdamW's decoupled decay
        (or Adam's ``decoupled_weight_decay=True``) enters nothing. One Lanczos run
        on ``op``: its products are counted in ``op.num_matvecs``.
    """
    dim, dtype, device = check_operator(op)
    if not isinstance(optimizer, torch.optim.Adam):  # AdamW subclasses Adam
        raise TypeError(
            "preconditioned_sharpness needs a torch.optim.Adam or AdamW optimizer, "
            f"got {type(optimizer).__name__}"
        )
    params = getattr(op, "params", None)
    if params is None:
        raise TypeError(
            "op must expose its parameters as op.params (e.g. a HessianOperator) to be matched "
            f"with the optimizer's state, got {type(op).__name__}"
        )
    params = list(params)
    if sum(p.numel() for p in params) != dim:
        raise ValueError(f"op.params hold {sum(p.numel() for p in params)} numbers, but op.dim is {dim}")
    names = list(getattr(op, "names", [f"params[{i}]" for i in range(len(params))]))
    g = None if gradient is None else _check_vector(gradient, "gradient", dim, dtype, device)
    group = _check_group(group, optimizer)
    where = {id(p): i for i, grp in enumerate(optimizer.param_groups) for p in grp["params"]}
    decoupled_class = isinstance(optimizer, torch.optim.AdamW)

    diag, shift, keep = [], [], []
    offset = 0
    for name, p in zip(names, params):
        n = p.numel()
        gi = where.get(id(p))
        if gi is None:
            raise ValueError(f"parameter {name!r} of op is not in the optimizer's param groups")
        hp = optimizer.param_groups[gi]
        beta1, beta2 = (to_float(b, "betas") for b in hp["betas"])
        eps = to_float(hp["eps"], "eps")
        wd = to_float(hp.get("weight_decay", 0.0), "weight_decay")
        decoupled = decoupled_class or bool(hp.get("decoupled_weight_decay", False))
        amsgrad = bool(hp.get("amsgrad", False))
        state = optimizer.state.get(p, {})
        step = to_float(state["step"], "step") if "step" in state else 0.0
        v = state.get("exp_avg_sq")
        vmax = state.get("max_exp_avg_sq")
        if g is None:
            if step == 0 or v is None or (amsgrad and vmax is None):
                raise ValueError(
                    f"the optimizer has not taken a step for parameter {name!r} yet, so it has no "
                    "preconditioner; pass gradient= (the current gradient) to use the one the "
                    "coming step will apply"
                )
            t = step
            second = (vmax if amsgrad else v).detach()
        else:
            gp = g[offset : offset + n].reshape(p.shape)
            if hp.get("maximize", False):
                gp = -gp
            if wd != 0 and not decoupled:
                gp = gp + wd * p.detach()
            old = v.detach() if (v is not None and step > 0) else torch.zeros_like(gp)
            second = beta2 * old + (1 - beta2) * gp * gp
            if amsgrad and vmax is not None and step > 0:
                second = torch.maximum(vmax.detach(), second)
            t = step + 1
        bc1 = 1 - beta1**t
        bc2 = 1 - beta2**t
        P = (second.sqrt() / math.sqrt(bc2) + eps) * bc1
        diag.append(P.reshape(-1).to(dtype=dtype, device=device))
        shift.append(wd if (wd != 0 and not decoupled) else 0.0)
        keep.append(group is None or gi == group)
        offset += n

    if len(set(shift)) == 1:
        shift_arg: float | torch.Tensor = shift[0]
    else:
        shift_arg = torch.cat(
            [torch.full((p.numel(),), s, dtype=dtype, device=device) for s, p in zip(shift, params)]
        )
    pre: CurvatureOperator = PreconditionedOperator(op, torch.cat(diag), shift_arg)
    if group is not None:
        if not any(keep):
            raise ValueError(f"param group {group} holds none of op's parameters")
        if not all(keep):
            mask = torch.cat([torch.full((p.numel(),), k, dtype=torch.bool) for k, p in zip(keep, params)])
            pre = _Restricted(pre, mask.nonzero().squeeze(1).to(device))
    return _top_eigenvalue(pre, tol, seed)


_SGD_KEYS = ("lr", "momentum", "dampening", "nesterov", "weight_decay")
_ADAM_KEYS = ("lr", "beta1")


def _hyper(optimizer: torch.optim.Optimizer, hp: dict) -> dict:
    if isinstance(optimizer, torch.optim.SGD):
        out = {
            "lr": to_float(hp["lr"], "lr"),
            "momentum": to_float(hp.get("momentum", 0.0), "momentum"),
            "dampening": to_float(hp.get("dampening", 0.0), "dampening"),
            "nesterov": bool(hp.get("nesterov", False)),
            "weight_decay": to_float(hp.get("weight_decay", 0.0), "weight_decay"),
        }
        if out["momentum"] == 0:  # torch ignores dampening and nesterov without momentum
            out["dampening"], out["nesterov"] = 0.0, False
        return out
    return {"lr": to_float(hp["lr"], "lr"), "beta1": to_float(hp["betas"][0], "betas")}


def stability_threshold(optimizer: torch.optim.Optimizer, *, group: int | None = None) -> float:
    """The largest sharpness at which the optimizer is linearly stable on a quadratic.

    ===========================  ==========================================
    optimizer                    threshold
    ===========================  ==========================================
    SGD / GD                     ``2 / lr``
    SGD, heavy ball ``b``        ``(2 + 2b) / ((1 - d) lr)``, dampening ``d``
    SGD, Nesterov ``b``          ``(2 + 2b) / ((1 + 2b) lr)`` (torch's form)
    Adam / AdamW                 ``(2 + 2 beta1) / ((1 - beta1) lr)``
    ===========================  ==========================================

    SGD's coupled ``weight_decay`` ``w`` makes the optimized operator ``H + w I``,
    so the returned threshold is reduced by ``w`` and compares with the loss's own
    sharpness ``lambda_max(H)``. For Adam/AdamW the threshold is to be compared with
    :func:`preconditioned_sharpness` (which holds Adam's coupled decay); weight decay
    does not change it. ``maximize`` is ignored (the operator is then that of the
    maximized objective's negative).

    Parameters
    ----------
    optimizer
        ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (or a subclass); ``lr`` may be a
        float or a one-element tensor, and is read at call time (schedules are
        followed).
    group
        Use this param group's hyperparameters. Without it, every group must have
        the same relevant hyperparameters (SGD: lr, momentum, dampening, nesterov,
        weight_decay; Adam: lr, beta1), else ``ValueError``.

    Returns
    -------
    float
        The threshold in sharpness units (1 / (lr units)); ``inf`` when ``lr`` is 0
        (or SGD's dampening is 1 with momentum: no step is taken).
    """
    if not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam)):
        raise TypeError(
            "stability_threshold supports torch.optim.SGD, Adam and AdamW, "
            f"got optimizer of type {type(optimizer).__name__}"
        )
    group = _check_group(group, optimizer)
    groups = optimizer.param_groups
    if group is None:
        values = [_hyper(optimizer, hp) for hp in groups]
        differ = sorted({k for v in values[1:] for k in v if v[k] != values[0][k]})
        if differ:
            raise ValueError(
                f"the optimizer's param groups differ in {', '.join(differ)}, so there is no single "
                "threshold; pass group= (an index into optimizer.param_groups)"
            )
        hp = values[0]
    else:
        hp = _hyper(optimizer, groups[group])
    lr = hp["lr"]
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if lr == 0:
        return math.inf
    if isinstance(optimizer, torch.optim.SGD):
        b, d, w = hp["momentum"], hp["dampening"], hp["weight_decay"]
        if not 0 <= b < 1:
            raise ValueError(f"momentum must lie in [0, 1) for a stability threshold, got {b}")
        if b == 0:
            base = 2 / lr
        elif hp["nesterov"]:
            if d != 0:
                raise ValueError("Nesterov momentum with dampening has no closed-form threshold (torch forbids it)")
            base = (2 + 2 * b) / ((1 + 2 * b) * lr)
        else:
            if not 0 <= d <= 1:
                raise ValueError(f"dampening must lie in [0, 1], got {d}")
            if d == 1:
                return math.inf
            base = (2 + 2 * b) / ((1 - d) * lr)
        return base - w
    b1 = hp["beta1"]
    if not 0 <= b1 < 1:
        raise ValueError(f"betas[0] must lie in [0, 1), got {b1}")
    return (2 + 2 * b1) / ((1 - b1) * lr)


def subspace_overlap(
    op: object, vector: torch.Tensor, k: int, *, tol: float = 1e-6, seed: int = 0, eigen: EigenResult | None = None
) -> float:
    """Fraction of a vector in the top-``k`` eigenspace: ``||P_k v||^2 / ||v||^2``.

    ``P_k`` projects onto the span of the eigenvectors of the ``k`` largest
    (algebraic) eigenvalues of ``op``, found by :func:`dyndiag.eigenvalues` with
    ``return_vectors=True`` (Gur-Ari et al., "Gradient Descent Happens in a Tiny
    Subspace": the gradient lies mostly in that span).

    Parameters
    ----------
    op
        A curvature operator.
    vector
        Flat ``(op.dim,)`` non-zero tensor in the operator's parameter order and
        dtype (e.g. the gradient).
    k
        Dimension of the eigenspace, ``1 <= k < op.dim``. When eigenvalue ``k`` and
        ``k + 1`` are equal the top-``k`` eigenspace is not unique and the result
        depends on which copy Lanczos returns.
    tol, seed
        Passed to :func:`dyndiag.eigenvalues`.
    eigen
        An :class:`~dyndiag.EigenResult` of ``op`` with at least ``k`` eigenvectors
        (``return_vectors=True``) to use instead of running Lanczos here (``tol``
        and ``seed`` are then unused).

    Returns
    -------
    float
        The overlap in ``[0, 1]`` (dimensionless; 1: ``v`` lies in the eigenspace).
    """
    dim, dtype, device = check_operator(op)
    k = check_int(k, "k")
    if not 1 <= k < full_dim(op):
        raise ValueError(f"k must satisfy 1 <= k < op.dim = {dim}, got {k}")
    u = _unit(op, _check_vector(vector, "vector", dim, dtype, device), "vector")
    if eigen is None:
        eigen = eigenvalues(op, k=k, which="LA", tol=tol, seed=seed, return_vectors=True)
    elif eigen.vectors is None or eigen.vectors.dim() != 2 or eigen.vectors.shape[0] != dim or eigen.vectors.shape[1] < k:
        raise ValueError(f"eigen must hold at least k = {k} eigenvectors of the operator (return_vectors=True)")
    Q = orthonormal(op, eigen.vectors[:, :k].to(device))
    proj = inner(op, Q, u)
    return float(min(max(float(proj @ proj), 0.0), 1.0))
