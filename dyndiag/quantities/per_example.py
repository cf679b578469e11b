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

Language models: an example is a sequence. A dict batch (``input_ids``,
``attention_mask``, ``labels`` with ``-100``) or an ``(input_ids, labels)`` batch is
split along dim 0 like any batch, each sequence keeping its own mask, and the
sequence's loss is its mean over its tokens that are not ignored (what
:class:`~dyndiag.data.CausalLMLoss` and a Hugging Face causal LM's ``.loss`` return on
a batch of one sequence). A sequence with no such token has no loss: its GraNd and
EL2N scores are NaN and coherence and GSNR leave it out.

Per-example gradients are computed by ``torch.func.vmap(torch.func.grad(...))`` over
``functional_call``, ``chunk_size`` examples at a time (memory grows with
``chunk_size * dim``), in data order; batches of any sizes are split along dim 0.
A model that cannot run under ``vmap`` (one that branches on its inputs' values, as
Hugging Face models do when they build the attention mask from ``attention_mask``)
is evaluated one example at a time instead, with one ``RuntimeWarning``: the same
values, more slowly. Where even one example alone cannot be evaluated, the model's
or the closure's own error is raised.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from ..data import IGNORE_INDEX, batch_targets, check_scalar_loss, iter_batches, loss_count, model_outputs, to_device
from ..distributed import all_reduce_sum, is_distributed
from ._common import (
    Evaluate,
    check_chunk_size,
    check_model,
    gather_scores,
    loss_closure,
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
    forward: Callable | None,
    chunk_size: int | None,
    progress: bool | None,
    desc: str,
    consume: Callable[[tuple[torch.Tensor, ...], torch.Tensor | None], None],
) -> tuple[list[str], list[torch.Tensor], int]:
    """Call ``consume(grads, empty)`` for every chunk, in data order.

    ``grads`` holds one ``(c, *shape)`` tensor per parameter: the gradients of the
    ``c`` examples of the chunk, each evaluated alone in eval mode. ``empty`` is a
    ``(c,)`` bool tensor marking examples whose loss averages nothing (a sequence
    whose labels are all ignored: its gradient is not defined), or ``None`` when
    there are none. Returns the parameter names, the parameters and the number of
    examples seen.
    """
    model = check_model(model)
    fn = loss_closure(loss_fn, closure, forward)
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
    looped = False  # vmap failed once: every later chunk of this call is looped
    try:
        with per_example_mode(model):
            for batch in iter_batches(data):
                examples = split_examples(to_device(batch, device))
                if examples.n == 0:
                    continue

                def loss_one(tensors, example, examples=examples):
                    out = functional_call(evaluate, dict(zip(keys, tensors)), (examples.one(example),))
                    return check_scalar_loss(out, "loss_fn/closure")

                one = grad(loss_one)
                per_example = vmap(one, in_dims=(None, 0))
                empty = _empty_examples(examples, loss_fn)
                for start in range(0, examples.n, chunk_size):
                    stop = min(start + chunk_size, examples.n)
                    chunk = examples.chunk(start, stop)
                    if looped:
                        grads = _looped(one, primals, chunk)
                    else:
                        try:
                            grads = per_example(primals, chunk)
                        except Exception as err:  # noqa: BLE001 - any failure under vmap: try without it
                            # The loop raises the model's own error when even one example
                            # alone cannot be evaluated: never vmap's message.
                            grads = _looped(one, primals, chunk)
                            looped = True
                            _warn_looped(desc, err)
                    consume(grads, None if empty is None else empty[start:stop])
                    bar.update(stop - start)
                    total += stop - start
    finally:
        bar.close()
    return names, chosen, total


def _looped(one: Callable, primals: tuple[torch.Tensor, ...], chunk: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Per-example gradients of a chunk one example at a time (what vmap batches)."""
    rows = [one(primals, tuple(t[i] for t in chunk)) for i in range(chunk[0].shape[0])]
    return tuple(torch.stack(per_param) for per_param in zip(*rows))


def _warn_looped(desc: str, err: Exception) -> None:
    reason = str(err).strip().split("\n")[0].split(". ")[0][:160]
    warnings.warn(
        f"{desc}: the model cannot be evaluated under torch.func.vmap ({type(err).__name__}: {reason}), "
        "typically because it branches on data (Hugging Face models building their attention mask "
        "from attention_mask do); per-example gradients are computed one example at a time instead "
        "(same values, slower).",
        RuntimeWarning,
        stacklevel=4,
    )


def _empty_examples(examples, loss_fn: Callable | None) -> torch.Tensor | None:
    """``(n,)`` bool: examples whose loss averages no term (all labels ignored), or None
    when every example has one (the usual case, and always for one-sample examples)."""
    try:
        targets = batch_targets(examples.part(0, examples.n))
    except ValueError:  # a closure's batch without targets: nothing to count
        return None
    if not isinstance(targets, torch.Tensor) or targets.dim() < 2 or targets.is_floating_point():
        return None  # class labels: every example is one term
    empty = [loss_count(examples.part(i, i + 1), loss_fn) == 0 for i in range(examples.n)]
    if not any(empty):
        return None
    return torch.tensor(empty, device=examples.split_leaves[0].device)


def grand_scores(
    model: nn.Module,
    loss_fn: Callable | None,
    data: object,
    params: Sequence[torch.Tensor] | None = None,
    *,
    closure: Callable | None = None,
    forward: Callable | None = None,
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
        Criterion ``loss_fn(outputs, targets) -> scalar`` (mean reduction, e.g.
        :class:`~dyndiag.data.CausalLMLoss` for ``(B, T, V)`` logits); it is applied
        to a batch of one example, so the score is of ``l(x_i, y_i)``. Pass ``None``
        with ``closure``.
    data
        One batch ``(inputs, targets)`` or a mapping (a Hugging Face batch), or an
        iterable of batches of any sizes. Every tensor in a batch whose dim 0 is the
        batch size is split into examples (sequences); other entries are shared by
        every example.
    params
        Parameters to differentiate (default: every parameter with
        ``requires_grad``); the score is the norm over these only.
    closure
        ``closure(model, batch) -> scalar loss`` instead of ``loss_fn`` (e.g.
        ``lambda m, b: m(**b).loss`` for a Hugging Face model); it receives batches
        of one example.
    forward
        ``forward(model, batch) -> outputs`` with ``loss_fn``, for batches that are
        not ``(inputs, targets)`` (e.g. ``lambda m, b: m(b["input_ids"],
        b["attention_mask"])``); targets are then ``batch[1]`` or
        ``batch["labels"]``. As for :class:`~dyndiag.GGNOperator`.
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
        dataset order with ``indices``); NaN for a sequence whose labels are all
        ignored. Units: loss units per parameter unit. Under
        an initialised ``torch.distributed`` process group every rank passes its
        shard and receives the scores of all shards, concatenated rank 0 first.
    """
    norms: list[torch.Tensor] = []

    def consume(grads, empty):
        c = grads[0].shape[0]
        per_param = torch.stack([torch.linalg.vector_norm(g.reshape(c, -1), dim=1) for g in grads])
        norm = torch.linalg.vector_norm(per_param, dim=0)
        norms.append(norm if empty is None else norm.masked_fill(empty, float("nan")))

    _, chosen, _ = _per_example_gradients(
        model, loss_fn, data, params, closure, forward, chunk_size, progress, "GraNd", consume
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
    shift_labels: bool = True,
    ignore_index: int = IGNORE_INDEX,
    progress: bool | None = None,
) -> torch.Tensor:
    """EL2N scores: ``||softmax(f(x_i)) - onehot(y_i)||_2`` for every example.

    For a classifier, one score per example. For a language model (token-level
    logits ``(n, T, V)`` and labels ``(n, T)``), one score per sequence: the mean over
    its scored tokens of ``||softmax(z_t) - onehot(y)||_2``, where the scored tokens
    are those whose label is not ``ignore_index``; with ``shift_labels`` position
    ``t`` is scored against ``labels[:, t + 1]`` (the causal shift of
    :class:`~dyndiag.data.CausalLMLoss` and Hugging Face causal LMs), so the last
    position is never scored.

    Parameters
    ----------
    model
        A classifier returning ``(n, C)`` logits, or a language model returning
        ``(n, T, V)`` (either may be a Hugging Face output with ``.logits``).
        Evaluated with every module in eval mode (dropout off, BatchNorm on its
        running statistics) in chunks of ``chunk_size`` examples: in eval mode
        examples do not interact (each sequence attends under its own
        ``attention_mask``), so this is each example alone.
    data
        One batch or an iterable of batches: ``(inputs, targets)`` (the model is
        called as ``model(inputs)``), or a mapping such as a Hugging Face batch
        (called as ``model(**batch)``, targets ``batch["labels"]``). Class targets
        are indices ``(n,)`` or, when floating, target distributions ``(n, C)`` used
        in place of the one-hot vectors; token targets are ids ``(n, T)``.
    forward
        ``forward(model, batch) -> logits`` for other batches or calls (e.g.
        ``lambda m, b: m(b["input_ids"], b["attention_mask"])``); targets are then
        ``batch[1]`` or ``batch["labels"]``.
    indices
        Each example's dataset index, as for :func:`grand_scores`.
    chunk_size
        Examples per forward pass; memory grows with ``chunk_size * T * V`` for
        token-level logits.
    shift_labels
        Token-level logits only: ``True`` scores position ``t`` against label
        ``t + 1`` (causal LM); ``False`` against label ``t`` (masked LM, token
        classification).
    ignore_index
        Token labels with this value are not scored (padding, prompt tokens).
    progress
        Show a progress bar over examples; ``None`` shows it on a terminal only.

    Returns
    -------
    torch.Tensor
        ``(N,)`` scores in ``[0, sqrt(2)]`` (probability units), in the logits' dtype
        (float32 at least) on their device, in data order (dataset order with
        ``indices``); NaN for a sequence with no scored token; gathered over ranks
        like :func:`grand_scores`.
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
                    logits = _logits(model, part, forward)
                    scores.append(_el2n(logits, batch_targets(part), stop - start, shift_labels, ignore_index))
                    bar.update(stop - start)
    finally:
        bar.close()
    if not scores:
        local = torch.zeros(0, dtype=empty_dtype, device=device)  # a rank without examples
    else:
        local = torch.cat(scores)
    return gather_scores(local, indices)


def _logits(model: nn.Module, batch: object, forward: Callable | None) -> object:
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, Mapping):
        try:
            return model_outputs(model, batch)
        except TypeError as err:  # e.g. "forward() got an unexpected keyword argument 'labels'"
            raise TypeError(
                f"EL2N calls model(**batch) on mapping batches, which this model refuses ({err}); "
                "pass forward=(model, batch) -> logits"
            ) from err
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return model_outputs(model, batch[0])
    raise ValueError("batches must be (inputs, targets) or mappings; pass forward= for other batches")


def _el2n(logits: object, targets: object, n: int, shift_labels: bool, ignore_index: int) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3) or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model must return (n, C) or (n, T, V) logits for EL2N, got {shape} for n = {n}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    targets = targets.to(logits.device)
    C = logits.shape[-1]
    if logits.dim() == 3:
        if targets.dtype.is_floating_point or targets.shape != logits.shape[:2]:
            raise ValueError(
                f"token-level logits {tuple(logits.shape)} need integer labels of shape "
                f"{tuple(logits.shape[:2])}, got {tuple(targets.shape)} ({targets.dtype})"
            )
        if shift_labels:
            logits, targets = logits[:, :-1], targets[:, 1:]
        scored = targets != ignore_index
        _check_classes(targets[scored], C)
        dist = _distance_to_onehot(torch.softmax(logits, dim=-1), targets.masked_fill(~scored, 0))
        # The sequence's mean over its scored tokens (0/0 = NaN for a sequence with none).
        return (dist * scored).sum(1) / scored.sum(1)
    probs = torch.softmax(logits, dim=1)
    if targets.dtype.is_floating_point:
        if targets.shape != probs.shape:
            raise ValueError(
                f"floating targets must be distributions of shape {tuple(probs.shape)}, got {tuple(targets.shape)}"
            )
        return torch.linalg.vector_norm(probs - targets.to(probs.dtype), dim=1)
    if targets.shape != (n,):
        raise ValueError(f"class targets must have shape ({n},), got {tuple(targets.shape)}")
    _check_classes(targets, C)
    return _distance_to_onehot(probs, targets)


def _check_classes(targets: torch.Tensor, C: int) -> None:
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= C):
        raise ValueError(f"class targets must lie in [0, {C}), got values in [{int(targets.min())}, {int(targets.max())}]")


def _distance_to_onehot(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``||p - onehot(y)||_2`` over the last dim, without a one-hot tensor (a vocabulary
    wide one per token would triple the memory of the logits)."""
    diff = probs.scatter_add(-1, targets.long().unsqueeze(-1), torch.full_like(probs[..., :1], -1.0))
    return torch.linalg.vector_norm(diff, dim=-1)


def gradient_coherence(
    model: nn.Module,
    loss_fn: Callable | None,
    data: object,
    params: Sequence[torch.Tensor] | None = None,
    *,
    closure: Callable | None = None,
    forward: Callable | None = None,
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
    moments = _gradient_moments(model, loss_fn, data, params, closure, forward, chunk_size, progress, "coherence")
    return _coherence(*moments[2:])


def _coherence(n: int, mean: torch.Tensor, m2: torch.Tensor) -> float:
    """``||sum_i g_i||^2 / sum_i ||g_i||^2`` from the moments of ``n`` gradients:
    ``sum_i g_i = n mean`` and ``sum_i ||g_i||^2 = sum(m2) + n ||mean||^2``."""
    if n == 0:
        raise ValueError("data yielded no examples")
    mean_sq = mean.pow(2).sum()
    sq = m2.sum() + n * mean_sq
    if float(sq) == 0.0:
        return float("nan")
    return float(n * n * mean_sq / sq)


def gradient_snr(
    model: nn.Module,
    loss_fn: Callable | None,
    data: object,
    params: Sequence[torch.Tensor] | None = None,
    *,
    closure: Callable | None = None,
    forward: Callable | None = None,
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
    _check_reduction(reduction)
    moments = _gradient_moments(model, loss_fn, data, params, closure, forward, chunk_size, progress, "GSNR")
    return _snr(*moments, reduction)


def coherence_and_snr(
    model: nn.Module,
    loss_fn: Callable | None,
    data: object,
    params: Sequence[torch.Tensor] | None = None,
    *,
    closure: Callable | None = None,
    forward: Callable | None = None,
    reduction: str = "none",
    chunk_size: int | None = None,
    progress: bool | None = None,
) -> tuple[float, dict[str, torch.Tensor]]:
    """:func:`gradient_coherence` and :func:`gradient_snr` from one pass of per-example
    gradients (what the GradientCoherence probe records); arguments as for those two."""
    _check_reduction(reduction)
    moments = _gradient_moments(model, loss_fn, data, params, closure, forward, chunk_size, progress, "coherence")
    return _coherence(*moments[2:]), _snr(*moments, reduction)


def _check_reduction(reduction: object) -> None:
    if reduction not in ("none", "mean"):
        raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")


def _gradient_moments(
    model, loss_fn, data, params, closure, forward, chunk_size, progress, desc
) -> tuple[list[str], list[torch.Tensor], int, torch.Tensor, torch.Tensor]:
    """``(names, params, n, mean, m2)``: the elementwise mean and summed squared
    deviation ``m2 = sum_i (g_i - mean)^2`` of the ``n`` per-example gradients, flat
    ``(dim,)`` in float64 (Chan's parallel update over chunks), over every rank's
    examples under ``torch.distributed``."""
    acc: dict = {}

    def consume(grads, empty):
        flat = _rows(grads, empty)
        c = flat.shape[0]
        if c == 0:
            return
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
        model, loss_fn, data, params, closure, forward, chunk_size, progress, desc, consume
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
    return names, chosen, n, mean, m2


def _snr(names: list[str], chosen: list[torch.Tensor], n: int, mean: torch.Tensor, m2: torch.Tensor,
         reduction: str) -> dict[str, torch.Tensor]:
    """:func:`gradient_snr`'s result from the moments of :func:`_gradient_moments`."""
    dtype = chosen[0].dtype
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


def _rows(grads: tuple[torch.Tensor, ...], empty: torch.Tensor | None) -> torch.Tensor:
    """``(c, dim)`` flat per-example gradients, without the examples whose loss is empty."""
    c = grads[0].shape[0]
    flat = torch.cat([g.reshape(c, -1) for g in grads], dim=1)
    return flat if empty is None else flat[~empty]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    count = mask.sum()
    if int(count) == 0:
        return torch.tensor(float("nan"), dtype=values.dtype, device=values.device)
    return values[mask].sum() / count
