"""Run dyndiag probes inside a Lightning ``Trainer``.

::

    from dyndiag.integrations.lightning import DiagnosticsCallback
    trainer = L.Trainer(callbacks=[DiagnosticsCallback([P.GradientNorm(), P.EdgeOfStability(every=50)],
                                                       log_dir="runs/exp1")])

When things run
---------------
Lightning calls ``optimizer.step(closure)``: forward, backward, AMP unscaling,
``on_before_optimizer_step`` and gradient clipping all happen inside the closure,
inside ``step()``. The callback registers a step pre-hook on the torch optimizer
that wraps that closure: the *state* probes run right after it returns (after
clipping, before the update), so ``GradientNorm`` sees the gradient the update
applies, as in a plain loop and in the Hugging Face Trainer. (With a gradient
scaler Lightning runs the closure itself and then calls ``scaler.step(optimizer)``
without one; the pre-hook then runs the probes directly — the same point.) The
*update* probes run from a step post-hook, right after the update was applied and
never for a step a gradient scaler skipped. Under gradient accumulation both run
only on the batches where the optimizer actually steps. The step of a record is
``trainer.global_step`` (optimizer steps, from 0). ``grad_norm_before_clip`` is
taken at the end of the last backward, divided by the precision plugin's gradient
scaler when there is one.

What is logged
--------------
Every scalar row goes to dyndiag's records (``log_dir``, rank 0 writes; without
``log_dir`` they stay in memory: ``callback.monitor.records()``) and to every logger
of the Trainer (``logger.log_metrics(metrics, step=step)`` on global rank 0) as
``probe/metric`` or ``probe/metric/key`` — the tags of
:func:`dyndiag.integrations.tensorboard.export_scalars`. Loggers are called
directly, not through ``LightningModule.log``, so ``log_every_n_steps`` does not
thin out probe steps and the values do not enter ``trainer.callback_metrics``.
Values of the cheap per-step probes stay on the device and reach the records and the
loggers (with their own steps) when the Monitor flushes, every ``sync_every`` steps.
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
from . import check_callback_args, clone_batch, rows_by_step, torch_optimizer

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
    sync_every:
        Passed to the :class:`~dyndiag.Monitor`: how many steps the values of the
        cheap probes may wait on the device before they are written and logged.

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
        sync_every: int = 50,
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
        self.sync_every = sync_every
        self.monitor: Monitor | None = None
        self._active = False
        self._hooks: list = []
        self._trainer: pl.Trainer | None = None
        self._module: pl.LightningModule | None = None

    # -- attaching -------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._active:
            self._attach(trainer, pl_module, batch)
        # The step this batch's backward belongs to (the Monitor takes its gradient
        # snapshot only when a probe is due then).
        self.monitor.step = max(self.monitor.step, trainer.global_step)

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
            batch_size_fn=self.batch_size_fn, sync_every=self.sync_every,
            grad_scaler=getattr(trainer.precision_plugin, "scaler", None),
        )
        self._hooks = [optimizer.register_step_pre_hook(self._before_update),
                       optimizer.register_step_post_hook(self._after_update)]
        self._trainer, self._module, self._active = trainer, pl_module, True

    def _detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._active:
            self._log(self.monitor.close())
        self._active = False
        self._trainer = self._module = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()  # also after an exception, when on_train_end is not called

    # -- the two phases ------------------------------------------------------------
    def _before_update(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict):
        if not self._active:
            return None
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:  # the closure already ran (AMP: scaler.step(optimizer)): gradients are final
            self._state_probes()
            return None
        ran = []

        def probed_closure():
            loss = closure()  # forward, backward, on_before_optimizer_step, clipping
            if not ran:  # LBFGS calls it again at moved parameters: only the first is this step's
                ran.append(True)
                self._state_probes()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": probed_closure}
        return (args[0], probed_closure, *args[2:]), kwargs

    def _state_probes(self) -> None:
        with silenced_logging(self._module):
            self.monitor.before_step(self._trainer.global_step)

    def _after_update(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if not self._active:
            return
        with silenced_logging(self._module):
            rows = self.monitor.after_step()
        self._log(rows)

    def _log(self, rows: list) -> None:
        """Send ``(step, probe, metric, key, value)`` rows to the loggers, one call per step."""
        trainer = self._trainer
        if not rows or not self.log_to_loggers or trainer is None or not trainer.is_global_zero:
            return
        for step, metrics in rows_by_step(rows, self.log_filter):
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
