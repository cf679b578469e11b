"""Run dyndiag probes inside a Hugging Face ``transformers.Trainer``.

::

    from dyndiag.integrations.transformers import DiagnosticsCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[DiagnosticsCallback(probes, log_dir="runs/bert")])

When things run
---------------
The *state* probes run from ``on_pre_optimizer_step``: after backward and gradient
clipping, before the update, so they see the gradient the optimizer applies
(``grad_norm``); ``grad_norm_before_clip`` is taken at the end of the last backward
(divided by Accelerate's gradient scaler under fp16, when the Trainer is known). The
*update* probes run from a step post-hook on the torch optimizer inside the Trainer's
(Accelerate) wrapper, which fires right after the update and never for a step the
gradient scaler skipped (``on_optimizer_step`` is called for those too). Under
gradient accumulation both run once per optimizer step. The step of a record is
``state.global_step`` (optimizer steps, from 0).

The probe batch
---------------
Default: the first ``per_device_train_batch_size`` examples of the training dataset,
collated by the Trainer's own collator (the training dataloader's ``collate_fn``, so
unused columns are removed exactly as for training). The shuffling dataloader is
never iterated — that would draw from the RNG and change training — and the global
RNG states are restored around the collation. The loss defaults to
``model(**batch).loss``; curvature products run attention on PyTorch's MATH kernel
(the only one with a double backward on CPU), whatever ``attn_implementation`` is.

What is logged
--------------
Every scalar row goes to dyndiag's records (``log_dir``; rank 0 writes; without
``log_dir`` they stay in memory, ``callback.monitor.records()``) and through
``Trainer.log`` as ``probe/metric`` or ``probe/metric/key``, so the values land in
``trainer.state.log_history`` (with ``"step"`` = the probe step) and reach every
reporting integration (``report_to``). Callbacks are not given the Trainer: pass
``trainer=`` (or set ``callback.trainer``); otherwise the callback finds the Trainer
that owns the ``TrainerState`` it is called with (through the garbage collector's
referrers, once per ``train()``), and if none is found it appends to
``state.log_history`` directly, with a warning that reporting integrations will
not see the values. ``Trainer.log`` stamps the Trainer's current step, so while
logging to the Trainer every step's values come to the host as the step ends
(``sync_every=1``); with ``log_to_trainer=False`` the cheap probes' values wait on
the device and are written every ``sync_every`` steps.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

try:
    import transformers
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dyndiag.integrations.transformers needs transformers: pip install dyndiag[transformers]"
    ) from err

from ..data import to_device
from ..monitor import Monitor
from ..state import rng_state, set_rng_state
from . import check_callback_args, clone_batch, rows_by_step, torch_optimizer

__all__ = ["DiagnosticsCallback", "model_loss"]


class DiagnosticsCallback(transformers.TrainerCallback):
    """A ``TrainerCallback`` that runs dyndiag probes during ``Trainer.train``.

    Parameters
    ----------
    probes:
        :class:`~dyndiag.probes.Probe` instances (unique names). ``every=`` counts
        optimizer steps (``state.global_step``).
    probe_data:
        A fixed batch (a dict the model takes as ``model(**batch)``) or a list of
        them. Default: the first ``per_device_train_batch_size`` training examples,
        collated by the Trainer's collator (see the module docstring).
    loss_fn, closure:
        How probes evaluate the loss: a criterion ``loss_fn(outputs, targets)`` for
        ``(inputs, targets)`` batches, or ``closure(model, batch) -> loss``. Default:
        ``model(**batch).loss`` (the batch must hold ``labels``). Several batches
        are weighted by their size, dim 0 of their first tensor.
    log_dir:
        Where records are written (:func:`dyndiag.load_records`); the first step is
        ``state.global_step`` when training starts (a resumed run continues).
    trainer:
        The ``Trainer`` to log through; default: found from the state (see above).
    log_to_trainer:
        Also log the scalars through ``Trainer.log`` (default ``True``).
    log_filter:
        ``(probe, metric, key) -> bool``: which rows are logged through the Trainer
        (records keep every row).
    batch_size_fn:
        ``(batch) -> int`` weighting the probe batches in curvature probes (default:
        dim 0 of a batch's first tensor; e.g. count non-padding tokens instead).
    sync_every:
        Passed to the :class:`~dyndiag.Monitor` when ``log_to_trainer=False``
        (logging through the Trainer needs each step's values at that step: 1).

    Attributes
    ----------
    monitor:
        The :class:`~dyndiag.Monitor` of the current (or last) ``train()``; ``None``
        before training starts.
    """

    def __init__(
        self,
        probes: Sequence,
        probe_data: object = None,
        loss_fn: Callable | None = None,
        closure: Callable | None = None,
        log_dir: str | os.PathLike | None = None,
        *,
        trainer: transformers.Trainer | None = None,
        log_to_trainer: bool = True,
        log_filter: Callable[[str, str, str], bool] | None = None,
        batch_size_fn: Callable | None = None,
        sync_every: int = 50,
    ) -> None:
        self.probes = check_callback_args(probes, loss_fn, closure, log_filter)
        if trainer is not None and not isinstance(trainer, transformers.Trainer):
            raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
        if not isinstance(log_to_trainer, bool):
            raise TypeError(f"log_to_trainer must be a bool, got {type(log_to_trainer).__name__}")
        self.probe_data = probe_data
        self.loss_fn = loss_fn
        self.closure = closure
        self.log_dir = log_dir
        self.trainer = trainer
        self.log_to_trainer = log_to_trainer
        self.log_filter = log_filter
        self.batch_size_fn = batch_size_fn
        self.sync_every = sync_every
        self.monitor: Monitor | None = None
        self._hook = None
        self._state = None
        self._warned = False

    # -- attaching ---------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if model is None or optimizer is None:
            raise ValueError("DiagnosticsCallback needs the Trainer's model and optimizer at on_train_begin")
        self._detach()  # a previous train() on the same callback
        probe_data = self.probe_data
        if probe_data is None:
            probe_data = first_examples(train_dataloader, args.per_device_train_batch_size, model)
        closure = self.closure
        if self.loss_fn is None and closure is None:
            closure = model_loss
        inner = torch_optimizer(optimizer, "the Trainer's optimizer")
        if self.trainer is None or self.trainer.state is not state:  # to log through, and for its scaler
            self.trainer = _find_trainer(state) or self.trainer  # a later train() may be another Trainer's
        accelerator = getattr(self.trainer, "accelerator", None)
        self.monitor = Monitor(
            model, inner, self.probes, loss_fn=self.loss_fn, probe_data=probe_data, log_dir=self.log_dir,
            closure=closure, start_step=state.global_step, step_hooks=False, batch_size_fn=self.batch_size_fn,
            sync_every=1 if self.log_to_trainer else self.sync_every, grad_scaler=getattr(accelerator, "scaler", None),
        )
        self._hook = inner.register_step_post_hook(self._after_update)
        self._state = state

    def on_train_end(self, args, state, control, **kwargs):
        self._detach()

    def _detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
            self._log(self.monitor.close())

    # -- the two phases ---------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        if self._hook is not None:  # the step this backward belongs to (for the gradient snapshot)
            self.monitor.step = max(self.monitor.step, state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._hook is not None:
            self.monitor.before_step(state.global_step)

    def _after_update(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._log(self.monitor.after_step())

    def _log(self, rows: list) -> None:
        if not rows or not self.log_to_trainer:
            return
        for step, metrics in rows_by_step(rows, self.log_filter):
            trainer = self.trainer
            if trainer is not None and trainer.state is self._state:
                if step == self._state.global_step:  # Trainer.log stamps global_step
                    trainer.log(metrics)  # on_log for every reporting integration
                    continue
            elif not self._warned:
                self._warned = True
                warnings.warn(
                    "DiagnosticsCallback could not find its Trainer (pass trainer=): probe values are appended to "
                    "state.log_history, but reporting integrations (report_to) do not see them",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self._state.log_history.append({**metrics, "epoch": self._state.epoch, "step": step})


def model_loss(model: nn.Module, batch: Mapping) -> torch.Tensor:
    """``model(**batch).loss``: the default probe loss (the batch must hold ``labels``)."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"the default probe loss calls model(**batch) and needs dict batches, got {type(batch).__name__}; "
            "pass loss_fn= or closure= to DiagnosticsCallback"
        )
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise ValueError(
            "model(**batch).loss is None: the probe batch needs 'labels' (or pass loss_fn= or closure=)"
        )
    return loss


def first_examples(dataloader: object, n: int, model: nn.Module) -> dict:
    """The first ``n`` examples of ``dataloader.dataset``, collated by its ``collate_fn``, on the model's device.

    The dataloader itself is never iterated (a shuffling sampler would draw from the
    global RNG); the RNG states are restored after indexing and collating, in case
    the dataset or collator draws random numbers (masking, augmentation).

    Returns
    -------
    dict
        A copy of the collated batch.
    """
    dataset = getattr(dataloader, "dataset", None)
    collate = getattr(dataloader, "collate_fn", None)
    if dataset is None or collate is None:
        raise ValueError("the Trainer's training dataloader has no dataset/collate_fn; pass probe_data=")
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__"):
        raise ValueError("the training dataset cannot be indexed (an IterableDataset?); pass probe_data=")
    count = min(n, len(dataset))
    saved = rng_state()
    try:
        batch = collate([dataset[i] for i in range(count)])
    finally:
        set_rng_state(saved)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return to_device(clone_batch(batch), device)


def _find_trainer(state: object) -> transformers.Trainer | None:
    """The Trainer whose ``state`` attribute is ``state`` (one pass over the GC's referrers)."""
    for ref in gc.get_referrers(state):
        # Python 3.11+ may keep instance attributes inline (the object refers directly)
        # or in a __dict__ (the dict refers, the object refers to the dict).
        if isinstance(ref, transformers.Trainer) and ref.state is state:
            return ref
        if isinstance(ref, dict) and ref.get("state") is state:
            for owner in gc.get_referrers(ref):
                if isinstance(owner, transformers.Trainer) and owner.state is state:
                    return owner
    return None

