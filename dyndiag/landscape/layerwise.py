"""Grid points of an ``nn.Sequential`` MLP evaluated layer by layer, many at once.

Every parameter of a grid point is affine in its coordinates,
``theta + sum_k c_k d_k``, and so is the first ``Linear``'s output, because its
input is the data: ``x W(c)^T + b(c) = (x W0^T + b0) + sum_k c_k (x E_k^T + e_k)``
with ``E_k, e_k`` the directions' parts for that layer. Those k+1 products are
computed once per batch for the whole grid; a chunk of P points then gets its
first-layer outputs from one matmul ``(P, k+1) @ (k+1, width * n)`` instead of
P matrix products with the data. Activations are kept feature-major,
``(P, features, n)``: each later ``Linear`` is one ``baddbmm`` of the chunk's own
weights ``(P, out, in)`` (views of the chunk's parameters) with them, and the
elementwise modules between layers run once on the whole stack (ReLU, Tanh and
Sigmoid in place). No ``vmap``, so a chunk pays no per-call setup.
``nn.CrossEntropyLoss`` (mean reduction, no class weights, class-index targets)
is computed on the stack directly, like torch computes it; any other criterion,
and ``metric``, run under ``vmap`` over the chunk on ``(P, n, features)`` views.
Values equal the per-point loop's to float rounding.

Used by :func:`dyndiag.landscape.surface` when :func:`plan` accepts the model:
``nn.Linear`` layers, with before the first one a parameter-free head (once per
batch, on the data) and after it a plain chain of known parameter-free steps
(activations, dropout that is off, the softmax family over the features). An
exact ``nn.Sequential`` (nested ones flattened) is read module by module, with
the modules in ``_HEAD`` and ``_TAIL`` (exact types: a subclass may change
``forward``); any other model is traced with ``torch.fx`` (:mod:`._traced`),
so an MLP written as a class with a ``forward`` qualifies too. Also needed: no
forward hooks anywhere, a loss criterion (no closure), batches ``(inputs,
targets)`` held in memory whose first-layer output is ``(n, features)``, and
the k+1 outputs for all of them within ``_HEAD_ELEMENTS``. Anything else takes
the ``vmap`` path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

__all__ = ["Plan", "auto_chunk", "evaluator", "head_cache", "plan"]

# Modules that act on each element alone and hold no parameters or buffers
# (dropout is off under surface's evaluation rule): allowed anywhere.
_ELEMENTWISE = (
    nn.Identity, nn.Dropout, nn.AlphaDropout,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.LogSigmoid, nn.Threshold,
)
_SOFTMAX = (nn.Softmax, nn.LogSoftmax, nn.Softmin)
_SOFTMAX_FN = {nn.Softmax: F.softmax, nn.LogSoftmax: F.log_softmax, nn.Softmin: F.softmin}
# Before the first Linear, on the data (once per batch): per-sample modules too.
_HEAD = (*_ELEMENTWISE, *_SOFTMAX, nn.Flatten, nn.Unflatten,
         nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout)
# After it, on the chunk's (P, features, n) stack: elementwise modules, and the
# softmax family over the features (dim 1 or -1 of a sample's (n, features)).
_TAIL = (*_ELEMENTWISE, *_SOFTMAX)
# Same values as the module, written into its input (a chunk's own intermediate).
_INPLACE = {nn.ReLU: torch.relu_, nn.Tanh: torch.tanh_, nn.Sigmoid: torch.sigmoid_}
# Cached first-layer outputs, (k + 1) x samples x width, at most: 128 MiB in float32.
_HEAD_ELEMENTS = 2**25
# Chunk rule: P x samples x width of a chunk's widest activation, at most 2**21
# elements (8 MiB in float32). On a 2-core CPU the time was flat from about 2**19
# to 2**22 on the digits models (docs/benchmarks.md); smaller chunks pay the
# per-chunk Python and dispatch cost more often.
_CHUNK_ELEMENTS = 2**21
_MAX_CHUNK = 128


@dataclass
class _Linear:
    module: nn.Linear
    weight: tuple[int, int] | None  # (offset, numel) in the flat parameter vector, or None: fixed
    bias: tuple[int, int] | None


@dataclass
class Plan:
    """``head(inputs)`` is the first Linear's input (parameter-free, once per batch);
    ``first`` that Linear; ``tail`` the rest as ``_Linear`` or ``f(h) -> h`` on the
    feature-major stack ``(P, features, n)``."""

    head: Callable
    first: _Linear
    tail: list


def plan(model: nn.Module, chosen: Sequence[torch.Tensor], loss_fn: Callable | None,
         closure: Callable | None) -> Plan | str:
    """How to evaluate ``model`` layer by layer, or a string saying why it cannot be.

    An ``nn.Sequential`` is read module by module; any other model is traced with
    ``torch.fx`` and its graph must be the same kind of chain. ``chosen`` are the
    parameters the directions span, in flat-vector order.
    """
    if closure is not None or loss_fn is None:
        return "a closure"
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return "global forward hooks"
    for m in model.modules():  # the containers too: their hooks would not run either
        if m._forward_hooks or m._forward_pre_hooks:
            return f"a hook on {type(m).__name__}"
    offsets, at = {}, 0
    for p in chosen:
        offsets[id(p)] = (at, p.numel())
        at += p.numel()

    def linear(m: nn.Linear) -> _Linear:
        return _Linear(m, offsets.get(id(m.weight)), None if m.bias is None else offsets.get(id(m.bias)))

    if type(model) is nn.Sequential:
        found = _sequential(list(_flatten(model)), linear)
    else:
        from . import _traced  # torch.fx only for models that need it

        found = _traced.chain(model, linear, _head_module, _module_step)
    if isinstance(found, str):
        return found
    covered = {id(p) for m in [found.first, *found.tail] if isinstance(m, _Linear) for p in m.module.parameters()}
    if any(id(p) not in covered for p in chosen):
        return "a chosen parameter outside the Linear layers"
    return found


def _sequential(mods: list, linear: Callable) -> Plan | str:
    first = next((i for i, m in enumerate(mods) if type(m) is nn.Linear), None)
    if first is None:
        return "no Linear layer"
    head = []
    for m in mods[:first]:
        why = _head_module(m)
        if why:
            return why
        head.append(m)
    tail = []
    for m in mods[first + 1:]:
        step = linear(m) if type(m) is nn.Linear else _module_step(m)
        if isinstance(step, str):
            return step
        tail.append(step)
    return Plan(nn.Sequential(*head), linear(mods[first]), tail)


def _head_module(m: nn.Module) -> str | None:
    """Why module ``m`` cannot run before the first Linear, or None."""
    if type(m) not in _HEAD or list(m.parameters()) or list(m.buffers()):
        return f"{type(m).__name__} is not a known parameter-free module"
    if (isinstance(m, _SOFTMAX) and m.dim in (0, None)) or (isinstance(m, nn.Flatten) and m.start_dim == 0) \
            or (isinstance(m, nn.Unflatten) and m.dim == 0):
        return f"{type(m).__name__} over the batch dim"
    return None


def _module_step(m: nn.Module) -> Callable | str:
    """``f(h)`` for a module after the first Linear, on the feature-major stack."""
    if type(m) not in _TAIL or list(m.parameters()) or list(m.buffers()):
        if type(m) in _HEAD:
            return f"{type(m).__name__} after the first Linear"
        return f"{type(m).__name__} is not a Linear layer or a known parameter-free module"
    if isinstance(m, _SOFTMAX):
        if m.dim not in (1, -1):
            return f"{type(m).__name__} over dim {m.dim}"
        return functools.partial(_SOFTMAX_FN[type(m)], dim=1)  # the features are dim 1 here
    # The stack is the chunk's own intermediate: these may overwrite it.
    return _INPLACE.get(type(m), m)


def _flatten(seq: nn.Sequential):
    for m in seq:
        if type(m) is nn.Sequential:
            yield from _flatten(m)
        else:
            yield m


def head_cache(plan: Plan, theta: torch.Tensor, dirs: Sequence[torch.Tensor],
               batches: list) -> list | str:
    """Per batch ``(A (k+1, out * n), targets, n)``: the first Linear's output at
    ``theta`` (row 0) and along each direction, each ``(out, n)`` flattened; or
    why not (too large, or not one feature vector per sample)."""
    lin = plan.first
    out, total = [], 0
    for batch, n in batches:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not isinstance(batch[0], torch.Tensor):
            return "a batch that is not (inputs, targets)"
        h = plan.head(batch[0])
        parts = [F.linear(h, *_weights(lin, theta, fixed=True))]
        for d in dirs:
            w, b = _weights(lin, d, fixed=False)
            if w is not None:
                parts.append(F.linear(h, w, b))
            else:  # the weight is not in the directions: only the bias moves (or nothing)
                parts.append((torch.zeros_like(parts[0]) if b is None else b.expand_as(parts[0])).contiguous())
        total += sum(p.numel() for p in parts)
        if total > _HEAD_ELEMENTS:
            return f"its first layer's outputs for every batch exceed {_HEAD_ELEMENTS} elements"
        if parts[0].shape[0] != n or parts[0].dim() != 2:
            return "the first Linear's output is not (n, features)"
        # Feature-major rows (out * n): every later layer then works on (P, features, n).
        out.append((torch.stack([p.T.reshape(-1) for p in parts]), batch[1], n))
    return out


def _weights(lin: _Linear, vec: torch.Tensor, fixed: bool):
    """``(weight, bias)`` of ``lin`` read from ``vec`` (the centre or a direction); a
    part not in the flat vector is the module's own (centre) or None (direction)."""
    m = lin.module

    def part(loc, p):
        if loc is not None:
            return vec[loc[0]:loc[0] + loc[1]].view_as(p)
        return p.detach() if fixed else None

    w = part(lin.weight, m.weight)
    b = None if m.bias is None else part(lin.bias, m.bias)
    return w, b


def auto_chunk(plan: Plan, heads: list) -> int:
    """Points per chunk: a chunk's widest activation within ``_CHUNK_ELEMENTS``."""
    widest = max(m.module.out_features for m in [plan.first, *plan.tail] if isinstance(m, _Linear))
    per_point = max(n for _, _, n in heads) * widest
    return max(1, min(_MAX_CHUNK, _CHUNK_ELEMENTS // per_point))


def evaluator(plan: Plan, heads: list, loss_fn: Callable, metric: Callable | None,
              theta: torch.Tensor, D: torch.Tensor) -> tuple[Callable, Callable]:
    """``(prepare, on_batch)``: ``prepare(c)`` for a chunk's coordinates ``c (P, k)``
    makes its state, ``on_batch(state, b, batch)`` returns ``(loss,)`` or
    ``(loss, metric)``, each ``(P,)``, on batch ``b`` of ``heads``."""
    rest = plan.tail
    later = any(isinstance(m, _Linear) for m in rest)
    per_point_loss = _stacked_loss(loss_fn)
    vmapped_metric = None if metric is None else torch.func.vmap(metric, in_dims=(0, None), randomness="error")

    def prepare(c: torch.Tensor):
        # (1, c) per point, and the chunk's parameters (P, dim) if a later layer reads them.
        c1 = torch.cat([torch.ones_like(c[:, :1]), c], 1)
        return c1, (torch.addmm(theta.unsqueeze(0), c, D.T) if later else None)

    def on_batch(state, b: int, batch) -> tuple[torch.Tensor, ...]:
        c1, params = state
        a, targets, n = heads[b]
        P = c1.shape[0]
        # The first layer at every point: (P, k+1) @ (k+1, out * n); a matmul, not an
        # addmm with a broadcast centre row, which would copy that row P times first.
        h = torch.mm(c1, a).view(P, -1, n)
        for m in rest:
            h = _linear(m, h, params, P) if isinstance(m, _Linear) else m(h)
        loss = per_point_loss(h, targets)
        if not isinstance(loss, torch.Tensor) or loss.shape != (P,):
            raise ValueError("loss_fn must return a scalar loss (mean reduction) per point")
        if vmapped_metric is None:
            return (loss,)
        mv = vmapped_metric(h.transpose(1, 2), targets)
        if not isinstance(mv, torch.Tensor) or mv.shape != (P,):
            raise ValueError("metric must return a scalar tensor")
        return loss, mv

    return prepare, on_batch


def _linear(m: _Linear, h: torch.Tensor, params: torch.Tensor, P: int) -> torch.Tensor:
    """``m`` at every point of the chunk, feature-major: ``(P, in, n) -> (P, out, n)``.

    ``W @ h`` with n as the long dimension: for a narrow output layer (10 classes)
    this was 3.7x faster here than ``h^T @ W^T`` in sample-major layout."""
    mod = m.module
    if m.weight is not None:
        o, k = m.weight
        w = params[:, o:o + k].view(P, mod.out_features, mod.in_features)
    else:
        w = mod.weight.detach().expand(P, -1, -1)
    if mod.bias is None:
        return torch.bmm(w, h)
    if m.bias is not None:
        o, k = m.bias
        bias = params[:, o:o + k].unsqueeze(2)  # (P, out, 1)
    else:
        bias = mod.bias.detach().view(1, -1, 1)
    return torch.baddbmm(bias, w, h)


def _stacked_loss(loss_fn: Callable) -> Callable:
    """``(z (P, classes, n), targets) -> (P,)``: the criterion at each point of a
    chunk, from feature-major outputs."""
    vm = torch.func.vmap(loss_fn, in_dims=(0, None), randomness="error")

    def general(z: torch.Tensor, targets) -> torch.Tensor:
        return vm(z.transpose(1, 2), targets)

    if not (type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None and loss_fn.reduction == "mean"):
        return general
    ignore, smoothing = loss_fn.ignore_index, loss_fn.label_smoothing
    # Per targets tensor (a landscape's batches are fixed): which samples count, their
    # class index, and how many. Checked once, not at every chunk: on a GPU the bounds
    # check is a device-to-host sync. Keyed by id, the tensor kept alive with it.
    seen: dict[int, tuple] = {}

    def prepared(targets: torch.Tensor, classes: int, n: int) -> tuple:
        hit = seen.get(id(targets))
        if hit is None:
            keep = targets != ignore
            index = torch.where(keep, targets, 0)
            if bool(((index < 0) | (index >= classes)).any()):
                raise IndexError(f"target out of bounds for {classes} classes")
            hit = seen[id(targets)] = (targets, keep, index.view(1, 1, n), keep.sum())
        return hit[1:]

    def cross_entropy(z: torch.Tensor, targets) -> torch.Tensor:
        P, classes, n = z.shape
        if not (isinstance(targets, torch.Tensor) and targets.shape == (n,) and not targets.is_floating_point()):
            return general(z, targets)  # class probabilities: the general rule
        # torch's mean cross-entropy without class weights: per sample
        # (1 - s) * nll + s * mean over classes of -log p, zero where the target is
        # ignored, summed and divided by the samples not ignored (NaN if none).
        # log_softmax over dim 1 of (P, classes, n) was 3.7x faster than over the
        # last dim of (P * n, classes).
        keep, index, count = prepared(targets, classes, n)
        logp = torch.log_softmax(z, 1)
        per_sample = logp.gather(1, index.expand(P, 1, n)).squeeze(1).neg_()
        if smoothing > 0:
            per_sample.mul_(1 - smoothing).sub_(logp.mean(1), alpha=smoothing)
        return (per_sample * keep).sum(1) / count

    return cross_entropy
