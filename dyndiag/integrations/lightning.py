"""Run dyndiag probes inside a Lightning ``Trainer``.

::

    from dyndiag.integrations.lightning import DiagnosticsCallback
    trainer = L.Trainer(callbacks=[DiagnosticsCallback([P.GradientNorm(), P.EdgeOfStability(every=50)],
                                                       log_dir="runs/exp1")])

When things run
---------------
Lightning always calls ``optimizer.step(closure)``: forward and backward happen
inside ``step()``, so an optimizer pre-step hook would see the previous step's
gradients. The callback therefore runs the *state* probes from
``on_before_optimizer_step`` (after backward — and after AMP unscaling — but before
gradient clipping and the update) and the *update* probes from a step post-hook it
registers on the torch optimizer, which fires right after the update was applied and
never for a step a gradient scaler skipped. Under gradient accumulation both run only
on the batches where the optimizer actually steps. The step of a record is
``trainer.global_step`` (optimizer steps, from 0).

What is logged
--------------
Every scalar row goes to dyndiag's records (``log_dir``, rank 0 writes; without
``log_dir`` they stay in memory: ``callback.monitor.records()``) and to every logger
of the Trainer (``logger.log_metrics(metrics, step=step)`` on global rank 0) as
``probe/metric`` or ``probe/metric/key`` — the tags of
:func:`dyndiag.integrations.tensorboard.export_scalars`. Loggers are called
directly, not through ``LightningModule.log``, so ``log_every_n_steps`` does not
thin out probe steps and the values do not enter ``trainer.callback_metrics``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dyndiag.integrations.lightning needs Lightning: pip install dyndiag[lightning]"
    ) from err

from ..data import is_single_batch, to_device
from ..monitor import Monitor
from . import check_callback_args, clone_batch, rows_to_metrics, torch_optimizer

__all__ = ["DiagnosticsCallback"]


class DiagnosticsCallback(pl.Callback):
    """A Lightning callback that runs dyndiag probes during ``Trainer.fit``.

    Parameters
    ----------
    probes:
        :class:`~dyndiag.probes.Probe` instances (unique names). ``every=`` counts
        optimizer steps (``trainer.global_step``).
    probe_data:
        The fixed batch (or list of batches) for curvature and loss probes. Default:
        a copy of the first training batch, as the training step receives it (on the
        module's device).
    loss_fn, closure:
        How probes evaluate the loss of ``probe_data``: a criterion
        ``loss_fn(outputs, targets)`` or ``closure(model, batch) -> loss``. Default:
        the module's own ``training_step(batch, 0)`` (a tensor, or the ``"loss"`` of
        a dict), with the module's ``log``/``log_dict`` silenced while probes run.
    log_dir:
        Where records are written (see :func:`dyndiag.load_records`); the first
        recorded step is the trainer's ``global_step`` when training starts, so a
        resumed run continues its records (and a fresh run from step 0 replaces what
        a log dir held).
    log_to_loggers:
        Also send the scalars to the Trainer's loggers (default ``True``).
    log_filter:
        ``(probe, metric, key) -> bool``: which rows go to the loggers (records
        keep every row). Useful to keep per-layer rows out of a metrics dashboard.
    batch_size_fn:
        ``(batch) -> int`` weighting the probe batches in curvature probes (default:
        dim 0 of a batch's first tensor; e.g. count non-padding tokens instead).

    Attributes
    ----------
    monitor:
        The :class:`~dyndiag.Monitor` of the current (or last) ``fit``; ``None``
        before the first training batch.
    """

    def __init__(
        self,
        probes: Sequence,
        probe_data: object = None,
        loss_fn: Callable | None = None,
        closure: Callable | None = None,
        log_dir: str | os.PathLike | None = None,
        *,
        log_to_loggers: bool = True,
        log_filter: Callable[[str, str, str], bool] | None = None,
        batch_size_fn: Callable | None = None,
    ) -> None:
        super().__init__()
        self.probes = check_callback_args(probes, loss_fn, closure, log_filter)
        if not isinstance(log_to_loggers, bool):
            raise TypeError(f"log_to_loggers must be a bool, got {type(log_to_loggers).__name__}")
        self.probe_data = probe_data
        self.loss_fn = loss_fn
        self.closure = closure
        self.log_dir = log_dir
        self.log_to_loggers = log_to_loggers
        self.log_filter = log_filter
        self.batch_size_fn = batch_size_fn
        self.monitor: Monitor | None = None
        self._active = False
        self._hook = None
        self._trainer: pl.Trainer | None = None
        self._module: pl.LightningModule | None = None

    # -- attaching -------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._active:
            self._attach(trainer, pl_module, batch)

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"DiagnosticsCallback monitors one optimizer; the module configured {len(trainer.optimizers)}"
            )
        optimizer = torch_optimizer(trainer.optimizers[0], "the trainer's optimizer")
        probe_data = self.probe_data
        if probe_data is None:
            # A copy on the module's device: the loader may reuse or edit its buffers.
            probe_data = to_device(clone_batch(batch), pl_module.device)
            if not is_single_batch(probe_data):
                probe_data = [probe_data]  # one batch, whatever its structure
        closure = self.closure
        if self.loss_fn is None and closure is None:
            closure = training_step_loss
        self.monitor = Monitor(
            pl_module, optimizer, self.probes, loss_fn=self.loss_fn, probe_data=probe_data,
            log_dir=self.log_dir, closure=closure, start_step=trainer.global_step, step_hooks=False,
            batch_size_fn=self.batch_size_fn,
        )
        self._hook = optimizer.register_step_post_hook(self._after_update)
        self._trainer, self._module, self._active = trainer, pl_module, True

    def _detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.monitor is not None:
            self.monitor.close()
        self._active = False
        self._trainer = self._module = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()  # also after an exception, when on_train_end is not called

    # -- the two phases ------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self._active or torch_optimizer(optimizer) is not self.monitor.optimizer:
            return
        with silenced_logging(pl_module):
            self.monitor.before_step(trainer.global_step)

    def _after_update(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if not self._active:
            return
        step = self.monitor.step
        with silenced_logging(self._module):
            rows = self.monitor.after_step()
        if rows and self.log_to_loggers:
            self._log(rows, step)

    def _log(self, rows: list, step: int) -> None:
        trainer = self._trainer
        if not trainer.is_global_zero:
            return
        metrics = rows_to_metrics(rows, self.log_filter)
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)


def training_step_loss(module: pl.LightningModule, batch: Any) -> torch.Tensor:
    """The loss of ``module.training_step(batch, 0)``: a tensor, or the ``"loss"`` of a dict."""
    with silenced_logging(module):
        out = module.training_step(batch, 0)
    loss = out.get("loss") if isinstance(out, Mapping) else out
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            "training_step must return the loss tensor or a dict with 'loss' for the default probe loss, "
            f"got {type(out).__name__}; pass loss_fn= or closure= to DiagnosticsCallback"
        )
    return loss


@contextmanager
def silenced_logging(module: pl.LightningModule) -> Iterator[None]:
    """``module.log`` and ``module.log_dict`` do nothing inside the block (restored after).

    Probes call ``training_step`` on their own forwards (under ``torch.func``, with
    swapped parameters); what it logs there is not training's and must not be logged.
    """
    saved = {name: module.__dict__.get(name) for name in ("log", "log_dict")}
    for name in saved:
        module.__dict__[name] = _ignore
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None
