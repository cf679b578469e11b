"""Batches, sample counts and losses: how dyndiag reads the ``data`` it is given.

A *batch* is ``(inputs, targets)`` — ``inputs`` a tensor (the model is called as
``model(inputs)``) or a mapping (``model(**inputs)``) — or, with a ``closure``, any
object the closure understands; a mapping (a Hugging Face batch) is always one
batch. *data* is one batch or an iterable of batches (a list, a DataLoader).

Rule for telling them apart: ``data`` is one batch when it is a mapping, a
tuple/list whose first item is a tensor, or a pair ``(mapping, tensor)``. Anything else iterable is a
sequence of batches. A single batch of another shape is passed as ``[batch]``.

An iterable is iterated afresh for every product, so the batches must be the
same on every pass. A plain shuffling DataLoader qualifies as long as examples do
not interact (the mean over all samples does not depend on the order). It does
not when they do or when the samples themselves change: BatchNorm in train mode
(batch statistics depend on which examples share a batch), ``drop_last`` with
shuffling (a different remainder is dropped), random augmentation. The curvature
operators check this on first use and refuse such data; pass ``cache_data=True``
to fix the batches once (held in memory on the operator's device).

A criterion's *reduction* says how its batch losses combine into the loss over
all the data: ``"mean"`` (per-batch means weighted by batch size, the default) or
``"sum"`` (batch sums added), see :func:`loss_reduction`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .distributed import all_reduce_sum, is_distributed

__all__ = [
    "is_single_batch",
    "iter_batches",
    "default_batch_size",
    "loss_count",
    "split_batch",
    "CausalLMLoss",
    "IGNORE_INDEX",
    "to_device",
    "model_outputs",
    "make_loss_closure",
    "criterion_outputs",
    "batch_targets",
    "check_scalar_loss",
    "tensors_in",
    "weighted_mean",
    "loss_reduction",
]

Batch = Any
#: Label value that losses skip (padding, prompt tokens): PyTorch's and Hugging Face's convention.
IGNORE_INDEX = -100
LossClosure = Callable[[nn.Module, Batch], torch.Tensor]


def is_single_batch(data: object) -> bool:
    """Whether ``data`` is one batch (see the module docstring for the rule)."""
    if isinstance(data, Mapping):
        return True
    if isinstance(data, (tuple, list)) and len(data) > 0:
        if isinstance(data[0], torch.Tensor):
            return True
        # (inputs_dict, targets) is one batch; [dict_batch, dict_batch] is two.
        return len(data) == 2 and isinstance(data[0], Mapping) and isinstance(data[1], torch.Tensor)
    return False


def iter_batches(data: object, name: str = "data") -> Iterator[Batch]:
    """Yield the batches of ``data``; a single batch is yielded once."""
    if data is None:
        raise ValueError(f"{name} must be a batch (inputs, targets) or an iterable of batches, got None")
    if isinstance(data, torch.Tensor):
        raise TypeError(
            f"{name} must be a batch (inputs, targets) or an iterable of batches, got a bare Tensor"
        )
    if is_single_batch(data):
        yield data
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            f"{name} must be a batch (inputs, targets) or an iterable of batches, "
            f"got {type(data).__name__}"
        )
    yield from data


def default_batch_size(batch: Batch) -> int:
    """Number of samples in a batch: dim 0 of the first tensor found in it."""
    t = _first_tensor(batch)
    if t is None or t.dim() == 0:
        raise ValueError(
            "cannot tell the number of samples in a batch (no tensor with a batch dimension); "
            "pass batch_size_fn=lambda batch: ..."
        )
    return int(t.shape[0])


class CausalLMLoss(nn.Module):
    """Next-token cross-entropy of a causal language model, as a criterion.

    ``forward(logits, labels)``: ``logits`` ``(B, T, V)``, ``labels`` ``(B, T)`` token
    ids aligned with the inputs (Hugging Face's convention: the loss shifts them, so
    position ``t`` predicts ``labels[:, t + 1]``); labels equal to ``ignore_index``
    (padding, prompt tokens) are skipped. ``reduction="mean"`` averages over the
    tokens that are not ignored (what Hugging Face causal LMs return as ``.loss``),
    ``"sum"`` adds them. :meth:`count` is the number of tokens the mean averages,
    which dyndiag uses to weight batches (:func:`loss_count`).
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(
                f"CausalLMLoss needs logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} "
                f"and {tuple(labels.shape)}"
            )
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=self.ignore_index,
            reduction=self.reduction,
        )

    def count(self, labels: torch.Tensor) -> int:
        """Tokens the mean averages: labels after the first position that are not ignored."""
        return int((labels[:, 1:] != self.ignore_index).sum())


def loss_count(batch: Batch, loss_fn: Callable | None = None) -> int:
    """How many terms a batch's mean loss averages: its weight among batches.

    ``loss_fn.count(targets)`` when the criterion defines it (:class:`CausalLMLoss`);
    for a mapping batch with integer ``labels`` of two or more dimensions (a Hugging
    Face language-model batch), the labels after the first position that are not
    ``-100``, the tokens a causal LM's ``.loss`` averages; for ``nn.CrossEntropyLoss``
    or ``nn.NLLLoss`` with class-index targets, the targets that are not its
    ``ignore_index``; otherwise the number of samples (:func:`default_batch_size`).
    """
    count = getattr(loss_fn, "count", None)
    if callable(count):
        return int(count(batch_targets(batch)))
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        targets = batch_targets(batch)
        if isinstance(targets, torch.Tensor) and not targets.is_floating_point():
            # A mean cross-entropy averages over the targets it does not ignore.
            return int((targets != loss_fn.ignore_index).sum())
    if isinstance(batch, Mapping):
        labels = batch.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() >= 2 and not labels.is_floating_point():
            return int((labels[:, 1:] != IGNORE_INDEX).sum())
    return default_batch_size(batch)


def split_batch(batch: Batch, size: int) -> list[Batch]:
    """``batch`` cut along dim 0 into consecutive batches of at most ``size`` samples.

    Every tensor in the batch (nested in mappings, tuples and lists) is split along
    its first dimension, which must be the batch's number of samples
    (:func:`default_batch_size`); 0-d tensors and other objects are shared by every
    part. One part (the batch itself) when it holds at most ``size`` samples.
    """
    n = default_batch_size(batch)
    if n <= size:
        return [batch]
    for t in tensors_in(batch):
        if t.dim() > 0 and t.shape[0] != n:
            raise ValueError(
                f"micro_batch_size: cannot split a batch whose tensors disagree on dim 0 ({n} and "
                f"{t.shape[0]} samples)"
            )
    return [
        _map_tensors(batch, lambda t, i=slice(start, start + size): t[i] if t.dim() > 0 else t)
        for start in range(0, n, size)
    ]


def _map_tensors(obj: object, fn: Callable[[torch.Tensor], torch.Tensor]) -> object:
    """``obj`` with every tensor ``t`` in it (nested in mappings, tuples, lists) replaced
    by ``fn(t)``; other objects pass through. Mappings become plain dicts, so
    ``model(**inputs)`` works for any mapping type (BatchEncoding too)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def weighted_mean(
    terms: Iterable[tuple[torch.Tensor, int]], zero: torch.Tensor, reduction: str = "mean", *, over_ranks: bool = True
) -> torch.Tensor:
    """The loss-like quantity of all of ``data`` from per-batch ``(x_b, n_b)`` pairs,
    summed over ranks.

    ``reduction="mean"``: ``sum_b n_b x_b / sum_b n_b``, the mean over every sample
    from per-batch means ``x_b`` of ``n_b`` samples. ``reduction="sum"``:
    ``sum_b x_b``, for per-batch sums. ``zero`` (zeros of the result's shape, dtype
    and device) is the accumulator, so a rank whose shard is empty still joins the
    reduction; pairs with ``n_b <= 0`` are skipped. ``over_ranks=False`` keeps this
    process's data alone (no collective). ``ValueError`` when no rank saw a sample.
    """
    total = zero
    count = 0
    for value, n in terms:
        if n > 0:
            total.add_(value.to(total.dtype), alpha=n if reduction == "mean" else 1)
            count += n
    if over_ranks and is_distributed():
        all_reduce_sum(total)
        count = int(all_reduce_sum(torch.tensor([float(count)], dtype=torch.float64, device=total.device)).item())
    if count == 0:
        raise ValueError("data yielded no samples")
    return total / count if reduction == "mean" else total


def loss_reduction(loss_fn: Callable | None, reduction: str | None) -> str:
    """How batch losses combine: ``"mean"`` or ``"sum"``.

    ``reduction=None`` reads it from the criterion (``nn`` losses carry
    ``loss_fn.reduction``; ``"sum"`` is a sum, anything else a mean); a closure, or
    a criterion without that attribute, is a mean unless ``reduction="sum"`` says
    it sums over its batch. A stated reduction that contradicts the criterion's is
    a ``ValueError``.
    """
    if reduction not in (None, "mean", "sum"):
        raise ValueError(f"reduction must be 'mean', 'sum' or None, got {reduction!r}")
    declared = getattr(loss_fn, "reduction", None) if loss_fn is not None else None
    declared = None if declared is None else ("sum" if declared == "sum" else "mean")
    if reduction is not None and declared is not None and reduction != declared:
        raise ValueError(
            f"reduction={reduction!r} contradicts loss_fn.reduction={loss_fn.reduction!r}"
        )
    return reduction or declared or "mean"


def tensors_in(obj: object) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) batch, depth first."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for item in obj.values():
            yield from tensors_in(item)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from tensors_in(item)


def _first_tensor(obj: object) -> torch.Tensor | None:
    return next(tensors_in(obj), None)


def to_device(batch: Batch, device: torch.device, float_dtype: torch.dtype | None = None) -> Batch:
    """Move every tensor in a (nested) batch to ``device``; other objects pass through.

    ``float_dtype`` also casts floating-point tensors (integer labels and token ids
    keep their dtype).
    """
    def move(t: torch.Tensor) -> torch.Tensor:
        if float_dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=float_dtype)
        return t.to(device)

    return _map_tensors(batch, move)


def model_outputs(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Call the model on a batch's inputs; take ``.logits`` from a Hugging Face output."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else out


def batch_targets(batch: Batch) -> Any:
    """The targets of a batch: ``batch[1]``, or ``batch["labels"]`` for a mapping."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise ValueError("a mapping batch needs a 'labels' entry to serve as targets")
        return batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    raise ValueError("a batch must be (inputs, targets) to take targets from it")


def make_loss_closure(
    loss_fn: Callable | None, closure: Callable | None
) -> LossClosure:
    """One ``(model, batch) -> scalar loss`` from either a criterion or a closure.

    Exactly one of ``loss_fn`` (a criterion ``loss_fn(outputs, targets)`` with mean
    reduction) and ``closure`` (``closure(model, batch) -> scalar``) must be given.
    """
    if (loss_fn is None) == (closure is None):
        raise ValueError("give exactly one of loss_fn (a criterion) and closure (model, batch) -> loss")
    if closure is not None:
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        return closure
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")

    def criterion_closure(model: nn.Module, batch: Batch) -> torch.Tensor:
        return loss_fn(criterion_outputs(model, batch), batch[1])

    return criterion_closure


def criterion_outputs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's outputs on an ``(inputs, targets)`` batch, for a criterion."""
    if isinstance(batch, Mapping) or not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError("with loss_fn, each batch must be (inputs, targets); use closure= for other batches")
    return model_outputs(model, batch[0])


def check_scalar_loss(loss: object, source: str) -> torch.Tensor:
    """Raise a clear error unless ``loss`` is a 0-d tensor."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{source} must return a scalar tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(
            f"{source} must return a scalar loss (mean reduction), got shape {tuple(loss.shape)}"
        )
    return loss
