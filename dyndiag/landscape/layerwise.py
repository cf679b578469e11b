"""Grid points of an ``nn.Sequential`` MLP evaluated layer by layer, many at once.

Every parameter of a grid point is affine in its coordinates,
``theta + sum_k c_k d_k``, and so is the first ``Linear``'s output, because its
input is the data: ``x W(c)^T + b(c) = (x W0^T + b0) + sum_k c_k (x E_k^T + e_k)``
with ``E_k, e_k`` the directions' parts for that layer. Those k+1 products are
computed once per batch for the whole grid; a chunk of P points then gets its
first-layer outputs from one ``addmm`` of shape ``(P, k) @ (k, n * width)``
instead of P matrix products with the data. Each later ``Linear`` is one
``baddbmm`` over the chunk's own weights (``(P, out, in)``, views of the chunk's
parameters), and the parameter-free modules between them (activations, dropout,
flatten) run once on the ``(P * n, ...)`` stack, which they treat like a batch
of P * n samples. No ``vmap``, so a chunk pays no per-call setup, and
``nn.CrossEntropyLoss`` (mean reduction, no class weights) is evaluated as one
``cross_entropy(reduction="none")`` over the stack; any other criterion, and
``metric``, run under ``vmap`` over the chunk. Values equal the per-point loop's
to float rounding.

Used by :func:`dyndiag.landscape.surface` when :func:`plan` accepts the model:
an ``nn.Sequential`` (nested ones are flattened) of ``nn.Linear`` layers and the
parameter-free modules in ``_PER_SAMPLE`` (exact types: a subclass may change
``forward``), with no hooks anywhere, a loss criterion (no closure), batches
``(inputs, targets)`` held in memory, and the first layer's k+1 outputs for all
of them within ``_HEAD_ELEMENTS``. Anything else takes the ``vmap`` path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

__all__ = ["auto_chunk", "evaluator", "head_cache", "plan"]

# Modules applied to the (P * n, ...) stack as to a batch: each acts on every
# sample on its own and holds no parameters or buffers.
_PER_SAMPLE = (
    nn.Identity, nn.Flatten, nn.Unflatten,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.LogSigmoid, nn.Threshold,
    nn.Softmax, nn.LogSoftmax, nn.Softmin,
)
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


def plan(model: nn.Module, chosen: Sequence[torch.Tensor], loss_fn: Callable | None,
         closure: Callable | None) -> list | str:
    """The layers of ``model`` for the layer-by-layer path, or a string saying why not.

    ``chosen`` are the parameters the directions span, in flat-vector order.
    """
    if closure is not None or loss_fn is None:
        return "a closure"
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return "global forward hooks"
    if type(model) is not nn.Sequential:
        return "not an nn.Sequential"
    offsets, at = {}, 0
    for p in chosen:
        offsets[id(p)] = (at, p.numel())
        at += p.numel()
    layers: list = []
    for m in _flatten(model):
        if m._forward_hooks or m._forward_pre_hooks or getattr(m, "_forward_hooks_with_kwargs", None):
            return f"a hook on {type(m).__name__}"
        if type(m) is nn.Linear:
            layers.append(_Linear(m, offsets.get(id(m.weight)),
                                  None if m.bias is None else offsets.get(id(m.bias))))
        elif type(m) in _PER_SAMPLE and not list(m.parameters()) and not list(m.buffers()):
            if isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin)) and m.dim in (0, None):
                return f"{type(m).__name__} over dim {m.dim}"
            if isinstance(m, nn.Flatten) and m.start_dim == 0:
                return "Flatten from dim 0"
            if isinstance(m, nn.Unflatten) and m.dim == 0:
                return "Unflatten of dim 0"
            layers.append(m)
        else:
            return f"{type(m).__name__} is not a Linear layer or a known parameter-free module"
    first = next((i for i, m in enumerate(layers) if isinstance(m, _Linear)), None)
    if first is None:
        return "no Linear layer"
    covered = {id(p) for m in layers if isinstance(m, _Linear) for p in m.module.parameters()}
    if any(id(p) not in covered for p in chosen):
        return "a chosen parameter outside the Linear layers"
    return layers


def _flatten(seq: nn.Sequential):
    for m in seq:
        if type(m) is nn.Sequential:
            yield from _flatten(m)
        else:
            yield m


def head_cache(layers: list, theta: torch.Tensor, dirs: Sequence[torch.Tensor],
               batches: list) -> list | str:
    """Per batch ``(A (k+1, n * ... * out), lead_shape, targets, n)``: the first Linear's
    output at ``theta`` (row 0) and along each direction, flattened, with
    ``lead_shape`` its shape without the feature dim; or why not (too large)."""
    first = next(i for i, m in enumerate(layers) if isinstance(m, _Linear))
    lin = layers[first]
    out, total = [], 0
    for batch, n in batches:
        if (not isinstance(batch, (tuple, list)) or len(batch) < 2 or not isinstance(batch[0], torch.Tensor)
                or batch[0].dim() < 2 or batch[0].shape[0] != n):
            return "a batch that is not (inputs (n, ...), targets)"
        h = batch[0]
        for m in layers[:first]:
            h = m(h)
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
        if parts[0].shape[0] != n:
            return "a module before the first Linear changes the batch size"
        out.append((torch.stack([p.reshape(-1) for p in parts]), tuple(parts[0].shape[:-1]), batch[1], n))
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


def auto_chunk(layers: list, heads: list) -> int:
    """Points per chunk: a chunk's widest activation within ``_CHUNK_ELEMENTS``."""
    widest = max(m.module.out_features for m in layers if isinstance(m, _Linear))
    per_point = max(math.prod(lead) for _, lead, _, _ in heads) * widest
    return max(1, min(_MAX_CHUNK, _CHUNK_ELEMENTS // per_point))


def evaluator(layers: list, heads: list, loss_fn: Callable, metric: Callable | None,
              theta: torch.Tensor, D: torch.Tensor) -> tuple[Callable, Callable]:
    """``(prepare, on_batch)``: ``prepare(c)`` for a chunk's coordinates ``c (P, k)``
    makes its state, ``on_batch(state, b, batch)`` returns ``(loss,)`` or
    ``(loss, metric)``, each ``(P,)``, on batch ``b`` of ``heads``."""
    first = next(i for i, m in enumerate(layers) if isinstance(m, _Linear))
    rest = layers[first + 1:]
    later = any(isinstance(m, _Linear) for m in rest)
    per_point_loss = _stacked_loss(loss_fn)
    vmapped_metric = None if metric is None else torch.func.vmap(metric, in_dims=(0, None), randomness="error")

    def prepare(c: torch.Tensor):
        # (1, c) per point, and the chunk's parameters (P, dim) if a later layer reads them.
        c1 = torch.cat([torch.ones_like(c[:, :1]), c], 1)
        return c1, (torch.addmm(theta.unsqueeze(0), c, D.T) if later else None)

    def on_batch(state, b: int, batch) -> tuple[torch.Tensor, ...]:
        c1, params = state
        a, lead, targets, n = heads[b]
        P = c1.shape[0]
        # The first layer at every point: (P, k+1) @ (k+1, n * width); a matmul, not an
        # addmm with a broadcast centre row, which would copy that row P times first.
        h = torch.mm(c1, a).view(P * n, *lead[1:], -1)
        for m in rest:
            if isinstance(m, _Linear):
                h = _linear(m, h, params, P)
            else:  # h is this chunk's own intermediate: activations may overwrite it
                inplace = _INPLACE.get(type(m))
                h = inplace(h) if inplace is not None else m(h)
        z = h.view(P, n, *h.shape[1:])
        loss = per_point_loss(z, targets)
        if not isinstance(loss, torch.Tensor) or loss.shape != (P,):
            raise ValueError("loss_fn must return a scalar loss (mean reduction) per point")
        if vmapped_metric is None:
            return (loss,)
        mv = vmapped_metric(z, targets)
        if not isinstance(mv, torch.Tensor) or mv.shape != (P,):
            raise ValueError("metric must return a scalar tensor")
        return loss, mv

    return prepare, on_batch


def _linear(m: _Linear, h: torch.Tensor, params: torch.Tensor, P: int) -> torch.Tensor:
    """``m`` at every point of the chunk: h ``(P * n, ..., in)`` -> ``(P * n, ..., out)``."""
    mod = m.module
    lead = h.shape[:-1]
    x = h.reshape(P, -1, mod.in_features)
    if m.weight is not None:
        o, k = m.weight
        w = params[:, o:o + k].view(P, mod.out_features, mod.in_features)
    else:
        w = mod.weight.detach().expand(P, -1, -1)
    wt = w.transpose(1, 2)
    if mod.bias is None:
        y = torch.bmm(x, wt)
    else:
        if m.bias is not None:
            o, k = m.bias
            bias = params[:, o:o + k].unsqueeze(1)  # (P, 1, out)
        else:
            bias = mod.bias.detach().view(1, 1, -1)
        y = torch.baddbmm(bias, x, wt)
    return y.view(*lead, mod.out_features)


def _stacked_loss(loss_fn: Callable) -> Callable:
    """``(z (P, n, ...), targets) -> (P,)``: the criterion at each point of a chunk."""
    if type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None and loss_fn.reduction == "mean":
        ignore, smoothing = loss_fn.ignore_index, loss_fn.label_smoothing
        vm = torch.func.vmap(loss_fn, in_dims=(0, None), randomness="error")

        def cross_entropy(z: torch.Tensor, targets) -> torch.Tensor:
            if not (isinstance(targets, torch.Tensor) and z.dim() == 3 and targets.shape == z.shape[1:2]
                    and not targets.is_floating_point()):
                return vm(z, targets)  # class probabilities or extra dims: the general rule
            P, n, classes = z.shape
            per_sample = F.cross_entropy(z.reshape(P * n, classes), targets.repeat(P), ignore_index=ignore,
                                         label_smoothing=smoothing, reduction="none").view(P, n)
            # "mean" divides by the samples not ignored (NaN if none, as the module does).
            return per_sample.sum(1) / (targets != ignore).sum()

        return cross_entropy
    return torch.func.vmap(loss_fn, in_dims=(0, None), randomness="error")
