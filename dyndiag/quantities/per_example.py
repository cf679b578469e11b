"""Per-example scores and statistics of per-example gradients.

GraNd and EL2N ("Deep Learning on a Data Diet"), m-coherence ("Coherent
Gradients") and the gradient signal-to-noise ratio (GSNR).

Every quantity here evaluates each example *alone*: every module is put in eval
mode for the evaluation — dropout off, BatchNorm on its running statistics —
whatever mode the model is in (examples must not interact for a per-example
gradient to exist; design.md, Decisions). The model's modes, buffers, ``.grad`` and
the RNG states are restored afterwards. The per-example loss is ``l(x_i, y_i)``: the
criterion (or closure) on a batch of that one example, not divided by the number of
examples.

Per-example gradients are computed by ``torch.func.vmap(torch.func.grad(...))`` over
``functional_call``, ``chunk_size`` examples at a time (memory grows with
``chunk_size * dim``), in data order; batches of any sizes are split along dim 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from ..data import batch_targets, check_scalar_loss, iter_batches, make_loss_closure, model_outputs, to_device
from ..distributed import all_reduce_sum, is_distributed
from ._common import (
    Evaluate,
    check_chunk_size,
    check_model,
    gather_scores,
    per_example_mode,
    select_params,
    split_examples,
)

__all__ = ["grand_scores", "el2n_scores", "gradient_coherence", "gradient_snr"]

_CHUNK_BYTES = 256 * 2**20  # per-example gradients held at once by the default chunking
_MAX_CHUNK = 1024


def _accumulation_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    return dtype if device.type == "mps" else torch.float64


def _bar(progress: bool | None, desc: str) -> tqdm:
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {type(progress).__name__}")
    return tqdm(desc=desc, unit="ex", disable=None if progress is None else not progress)


def _per_example_gradients(
    model: nn.Module,
    loss_fn: Callable | None,
    data: object,
    params: Sequence[torch.Tensor] | None,
    closure: Callable | None,
    chunk_size: int | None,
    progress: bool | None,
    desc: str,
    consume: Callable[[tuple[torch.Tensor, ...]], None],
) -> tuple[list[str], list[torch.Tensor], int]:
    """Call ``consume(grads)`` for every chunk, in data order.

    ``grads`` holds one ``(c, *shape)`` tensor per parameter: the gradients of the
    ``c`` examples of the chunk, each evaluated alone in eval mode. Returns the
    parameter names, the parameters and the number of examples seen.
    """
    model = check_model(model)
    fn = make_loss_closure(loss_fn, closure)
    names, chosen = select_params(model, params)
    if chunk_size is None:
        # A chunk holds (chunk, dim) gradients: fill a fixed memory budget, so small
        # models get large chunks (fewer, larger kernels) and large models stay bounded.
        row = sum(p.numel() for p in chosen) * chosen[0].element_size()
        chunk_size = max(1, min(_MAX_CHUNK, _CHUNK_BYTES // max(1, row)))
    chunk_size = check_chunk_size(chunk_size)
    device = chosen[0].device
    keys = ["model." + n for n in names]
    evaluate = Evaluate(model, fn)
    primals = tuple(p.detach() for p in chosen)
    bar = _bar(progress, desc)
    total = 0
    try:
        with per_example_mode(model):
            for batch in iter_batches(data):
                examples = split_examples(to_device(batch, device))
                if examples.n == 0:
                    continue

                def loss_one(tensors, example, examples=examples):
                    out = functional_call(evaluate, dict(zip(keys, tensors)), (examples.one(example),))
                    return check_scalar_loss(out, "loss_fn/closure")

                per_example = vmap(grad(loss_one), in_dims=(None, 0))
                for start in range(0, examples.n, chunk_size):
                    stop = min(start + chunk_size, examples.n)
                    consume(per_example(primals, examples.chunk(start, stop)))
                    bar.update(stop - start)
                    total += stop - start
    finally:
        bar.close()
    return names, chosen, total


def grand_scores(
    model: nn.Module,
    loss_fn: Callable | None,
    data: object,
    params: Sequence[torch.Tensor] | None = None,
    *,
    closure: Callable | None = None,
    indices: Sequence[int] | torch.Tensor | None = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """GraNd scores: the norm of each example's loss gradient, ``||grad_theta l(x_i, y_i)||_2``.

    Parameters
    ----------
    model
        The network; evaluated functionally with every module in eval mode (dropout
        off, BatchNorm on its running statistics) and restored exactly.
    loss_fn
        Criterion ``loss_fn(outputs, targets) -> scalar`` (mean reduction); it is
        applied to a batch of one example, so the score is of ``l(x_i, y_i)``. Pass
        ``None`` with ``closure``.
    data
        One batch ``(inputs, targets)`` or an iterable of batches of any sizes. Every
        tensor in a batch whose dim 0 is the batch size is split into examples;
        other entries are shared by every example.
    params
        Parameters to differentiate (default: every parameter with
        ``requires_grad``); the score is the norm over these only.
    closure
        ``closure(model, batch) -> scalar loss`` instead of ``loss_fn``; it receives
        batches of one example.
    indices
        Each example's index in the dataset (e.g. ``list(sampler)`` of a
        ``DistributedSampler`` on each rank). The result is then one score per
        distinct index, in increasing index order — dataset order, with a sampler's
        padding (repeated indices) dropped.
    chunk_size
        Examples per vectorised pass; memory grows with ``chunk_size * dim``.
        Default: as many as fit 256 MiB of gradients (at most 1024).
    progress
        Show a progress bar over examples; ``None`` shows it on a terminal only.

    Returns
    -------
    torch.Tensor
        ``(N,)`` scores in the parameters' dtype on their device, in data order (or
        dataset order with ``indices``). Units: loss units per parameter unit. Under
        an initialised ``torch.distributed`` process group every rank passes its
        shard and receives the scores of all shards, concatenated rank 0 first.
    """
    norms: list[torch.Tensor] = []

    def consume(grads):
        c = grads[0].shape[0]
        per_param = torch.stack([torch.linalg.vector_norm(g.reshape(c, -1), dim=1) for g in grads])
        norms.append(torch.linalg.vector_norm(per_param, dim=0))

    _, chosen, _ = _per_example_gradients(
        model, loss_fn, data, params, closure, chunk_size, progress, "GraNd", consume
    )
    local = torch.cat(norms) if norms else torch.zeros(0, dtype=chosen[0].dtype, device=chosen[0].device)
    return gather_scores(local, indices)


def el2n_scores(
    model: nn.Module,
    data: object,
    *,
    forward: Callable | None = None,
    indices: Sequence[int] | torch.Tensor | None = None,
    chunk_size: int = 256,
    progress: bool | None = None,
) -> torch.Tensor:
    """EL2N scores: ``||softmax(f(x_i)) - onehot(y_i)||_2`` for every example.

    Parameters
    ----------
    model
        A classifier returning ``(n, C)`` logits (or a Hugging Face output with
        ``.logits``). Evaluated with every module in eval mode (dropout off,
        BatchNorm on its running statistics) in chunks of ``chunk_size`` examples:
        in eval mode examples do not interact, so this is each example alone.
    data
        One batch ``(inputs, targets)`` or an iterable of batches. Targets are class
        indices ``(n,)`` or, when floating, target distributions ``(n, C)`` used in
        place of the one-hot vectors.
    forward
        ``forward(model, batch) -> logits`` for batches that are not
        ``(inputs, targets)``; targets are then ``batch[1]`` or ``batch["labels"]``.
    indices
        Each example's dataset index, as for :func:`grand_scores`.
    chunk_size
        Examples per forward pass.
    progress
        Show a progress bar over examples; ``None`` shows it on a terminal only.

    Returns
    -------
    torch.Tensor
        ``(N,)`` scores in ``[0, sqrt(2)]`` (probability units), in the logits' dtype
        (float32 at least) on their device, in data order (dataset order with
        ``indices``); gathered over ranks like :func:`grand_scores`.
    """
    model = check_model(model)
    chunk_size = check_chunk_size(chunk_size)
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable (model, batch) -> logits, got {type(forward).__name__}")
    first = next((p for p in model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    empty_dtype = first.dtype if first is not None and first.dtype.is_floating_point else torch.float32
    if empty_dtype in (torch.float16, torch.bfloat16):
        empty_dtype = torch.float32
    scores: list[torch.Tensor] = []
    bar = _bar(progress, "EL2N")
    try:
        with per_example_mode(model), torch.no_grad():
            for batch in iter_batches(data):
                batch = to_device(batch, device)
                examples = split_examples(batch)
                for start in range(0, examples.n, chunk_size):
                    stop = min(start + chunk_size, examples.n)
                    part = examples.part(start, stop)
                    if forward is not None:
                        logits = forward(model, part)
                    elif isinstance(part, (tuple, list)) and len(part) >= 2:
                        logits = model_outputs(model, part[0])
                    else:
                        raise ValueError("batches must be (inputs, targets); pass forward= for other batches")
                    scores.append(_el2n(logits, batch_targets(part), stop - start))
                    bar.update(stop - start)
    finally:
        bar.close()
    if not scores:
        local = torch.zeros(0, dtype=empty_dtype, device=device)  # a rank without examples
    else:
        local = torch.cat(scores)
    return gather_scores(local, indices)


def _el2n(logits: object, targets: object, n: int) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model must return (n, C) logits for EL2N, got {shape} for n = {n}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    probs = torch.softmax(logits, dim=1)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    targets = targets.to(logits.device)
    if targets.dtype.is_floating_point:
        if targets.shape != probs.shape:
            raise ValueError(
                f"floating targets must be distributions of shape {tuple(probs.shape)}, got {tuple(targets.shape)}"
            )
        want = targets.to(probs.dtype)
    else:
        if targets.shape != (n,):
            raise ValueError(f"class targets must have shape ({n},), got {tuple(targets.shape)}")
        C = probs.shape[1]
        if n and (int(targets.min()) < 0 or int(targets.max()) >= C):
            raise ValueError(f"class targets must lie in [0, {C}), got values in [{int(targets.min())}, {int(targets.max())}]")
        want = torch.nn.functional.one_hot(targets.long(), C).to(probs.dtype)
    return torch.linalg.vector_norm(probs - want, dim=1)


def gradient_coherence(
    model: nn.Module,
    loss_fn: Callable | None,
    data: object,
    params: Sequence[torch.Tensor] | None = None,
    *,
    closure: Callable | None = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
) -> float:
    """m-coherence of the per-example gradients: ``||sum_i g_i||^2 / sum_i ||g_i||^2``.

    ``g_i = grad_theta l(x_i, y_i)`` over the ``m`` examples of ``data`` (each
    evaluated alone in eval mode, see the module docstring). The value lies in
    ``[0, m]``: ``m`` when all gradients are identical, about 1 for orthogonal
    gradients, near 0 when they cancel (Chatterjee, "Coherent Gradients").

    Parameters are as for :func:`grand_scores`.

    Returns
    -------
    float
        The m-coherence (dimensionless); NaN when every per-example gradient is
        zero. Under ``torch.distributed`` the sums run over the union of the ranks'
        shards (``m`` = all examples), and every rank returns the same value.
    """
    acc: dict = {}

    def consume(grads):
        c = grads[0].shape[0]
        flat = torch.cat([g.reshape(c, -1) for g in grads], dim=1)
        dtype = _accumulation_dtype(flat.device, flat.dtype)
        flat = flat.to(dtype)
        if not acc:
            acc["sum"] = torch.zeros(flat.shape[1], dtype=dtype, device=flat.device)
            acc["sq"] = torch.zeros((), dtype=dtype, device=flat.device)
        acc["sum"] += flat.sum(0)
        acc["sq"] += flat.pow(2).sum()

    _, chosen, _ = _per_example_gradients(
        model, loss_fn, data, params, closure, chunk_size, progress, "coherence", consume
    )
    if not acc:
        if not is_distributed():
            raise ValueError("data yielded no examples")
        dim = sum(p.numel() for p in chosen)
        dtype = _accumulation_dtype(chosen[0].device, chosen[0].dtype)
        acc["sum"] = torch.zeros(dim, dtype=dtype, device=chosen[0].device)
        acc["sq"] = torch.zeros((), dtype=dtype, device=chosen[0].device)
    packed = all_reduce_sum(torch.cat([acc["sum"], acc["sq"].reshape(1)]))
    total, sq = packed[:-1], packed[-1]
    if float(sq) == 0.0:
        return float("nan")
    return float(total.pow(2).sum() / sq)


def gradient_snr(
    model: nn.Module,
    loss_fn: Callable | None,
    data: object,
    params: Sequence[torch.Tensor] | None = None,
    *,
    closure: Callable | None = None,
    reduction: str = "none",
    chunk_size: int | None = None,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Gradient signal-to-noise ratio per parameter: ``mean_i(g_i)^2 / var_i(g_i)``.

    Elementwise over the per-example gradients ``g_i`` of the ``N`` examples of
    ``data`` (each evaluated alone in eval mode, see the module docstring), with the
    population variance ``var = mean_i (g_i - mean)^2`` (divide by ``N``; multiply
    by ``(N - 1) / N`` for the unbiased-variance GSNR). Mean and variance are
    accumulated chunk by chunk with Chan's parallel update, in float64.

    Other parameters are as for :func:`grand_scores`; ``data`` must hold at least
    two examples.

    Parameters
    ----------
    reduction
        ``"none"``: one tensor per parameter, of that parameter's shape, holding
        the elementwise GSNR (``inf`` where the variance is 0 and the mean is not,
        ``NaN`` where both are 0). ``"mean"``: one 0-d tensor per parameter, the
        mean of its elementwise GSNR over the elements with non-zero variance, and
        under the key ``""`` the same mean over every element of every parameter
        (the scalar summary; NaN when no element has non-zero variance).

    Returns
    -------
    dict[str, torch.Tensor]
        Keys are the parameter names (``model.named_parameters()``), plus ``""``
        with ``reduction="mean"``. Values are dimensionless, in the parameters'
        dtype on their device. Under ``torch.distributed`` the statistics are over
        the union of the ranks' shards, identical on every rank.
    """
    if reduction not in ("none", "mean"):
        raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")
    acc: dict = {}

    def consume(grads):
        c = grads[0].shape[0]
        flat = torch.cat([g.reshape(c, -1) for g in grads], dim=1)
        flat = flat.to(_accumulation_dtype(flat.device, flat.dtype))
        mean_c = flat.mean(0)
        m2_c = (flat - mean_c).pow(2).sum(0)
        if not acc:
            acc.update(n=c, mean=mean_c, m2=m2_c)
            return
        n = acc["n"]
        total = n + c
        delta = mean_c - acc["mean"]
        acc["mean"] = acc["mean"] + delta * (c / total)
        acc["m2"] = acc["m2"] + m2_c + delta.pow(2) * (n * c / total)
        acc["n"] = total

    names, chosen, _ = _per_example_gradients(
        model, loss_fn, data, params, closure, chunk_size, progress, "GSNR", consume
    )
    dtype, device = chosen[0].dtype, chosen[0].device
    dim = sum(p.numel() for p in chosen)
    acc_dtype = _accumulation_dtype(device, dtype)
    n = acc.get("n", 0)
    mean = acc.get("mean", torch.zeros(dim, dtype=acc_dtype, device=device))
    m2 = acc.get("m2", torch.zeros(dim, dtype=acc_dtype, device=device))
    if is_distributed():
        # Two reductions: the global mean first, then each shard's M2 about it.
        count = all_reduce_sum(torch.tensor([float(n)], dtype=acc_dtype, device=device))
        N = int(count.item())
        glob = all_reduce_sum(mean * n) / max(N, 1)
        m2 = all_reduce_sum(m2 + (mean - glob).pow(2) * n)
        mean, n = glob, N
    if n < 2:
        raise ValueError(f"gradient_snr needs at least 2 examples in data, got {n}")
    var = m2 / n
    snr = mean.pow(2) / var
    parts = torch.split(snr, [p.numel() for p in chosen])
    var_parts = torch.split(var, [p.numel() for p in chosen])
    if reduction == "none":
        return {name: s.reshape(p.shape).to(dtype) for name, s, p in zip(names, parts, chosen)}
    out = {name: _masked_mean(s, v > 0).to(dtype) for name, s, v in zip(names, parts, var_parts)}
    out[""] = _masked_mean(snr, var > 0).to(dtype)
    return out


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    count = mask.sum()
    if int(count) == 0:
        return torch.tensor(float("nan"), dtype=values.dtype, device=values.device)
    return values[mask].sum() / count
