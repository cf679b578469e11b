"""Attach probes to a training loop through optimizer and forward hooks.

The training loop stays unchanged: the monitor registers an optimizer step
pre-hook (state probes, on the current gradients and parameters), a post-hook
(update probes, then one record transaction per step) and a forward hook that
keeps the last training forward's outputs. With ``step_hooks=False`` no optimizer
hook is registered and the caller drives the two phases with
:meth:`Monitor.before_step` (after backward) and :meth:`Monitor.after_step` (after
the update): what the Lightning and Hugging Face callbacks do, since their
optimizer steps may run forward and backward inside ``step()``. Every probe runs under
:func:`~dyndiag.state.preserve_state`, so training with a monitor gives
bit-identical weights to training without one.

Probes see the run through one :class:`~dyndiag.probes.RunContext` (``mon.run``,
whose ``logits`` the forward hook keeps current, and whose parameters are re-read
from the optimizer's param groups at every step) and run through
:func:`~dyndiag.probes.base.run_probes`, with its failure policy: a probe that
raises is reported once as a ``RuntimeWarning`` and disabled (on every rank
together under ``torch.distributed``); training goes on. A NaN or inf value is
recorded as it is, with one warning per probe and metric.

No host synchronisation on cheap steps: probes with ``syncs = False`` (the
per-step ``GradientNorm``, ``LayerRotation``, ``SoftmaxCollapse``) leave their
values on the device; finished steps wait in a queue that :meth:`Monitor.flush`
brings to the host in one copy and writes, every ``sync_every`` steps, around a
step whose probes synchronise anyway (curvature), and at ``close()`` (also from
``with``, on an exception, and at interpreter exit).
"""

from __future__ import annotations

import atexit
import sys
import time
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .evaluation import hook_module, is_probing, unwrap
from .probes.base import Probe, check_probes, resolve_rows, run_probes, warn_once
from .probes.context import RunContext, StepContext
from .quantities.softmax import loss_dtype

__all__ = ["Monitor"]


class Monitor:
    """Run probes on a model during training and record what they measure.

    Parameters
    ----------
    model:
        The trained module, as training calls it: wrapped by DDP, DataParallel or
        ``torch.compile`` (probes then evaluate the module inside). Parameters on
        the meta device or uninitialised (lazy modules before their first forward)
        are refused (``ValueError``).
    optimizer:
        Its optimizer; ``step`` counts its ``step()`` calls from 0.
    probes:
        :class:`~dyndiag.probes.Probe` instances (names must be unique).
    loss_fn, closure:
        How probes that need a loss evaluate ``probe_data``: a criterion
        ``loss_fn(outputs, targets)`` or ``closure(model, batch) -> loss``.
    probe_data:
        A fixed batch (or list of batches) for curvature and loss probes. Fixed,
        so that changes over steps come from the model, not from the data.
    log_dir:
        Where records are written (SQLite, see :func:`~dyndiag.load_records` and
        :func:`~dyndiag.load_arrays`). ``None`` keeps the scalar records in memory
        (:meth:`records`); array results (per-example scores, densities) are then
        not kept — they need a ``log_dir``.
    start_step:
        First step number; default: continue from the records already in
        ``log_dir`` (0 for a new one).
    step_hooks:
        ``True`` (default): probes run from optimizer step hooks. ``False``: no
        optimizer hook is registered; call :meth:`before_step` after backward and
        :meth:`after_step` after the update (the forward hook stays).
    batch_size_fn:
        ``(batch) -> int``: how curvature probes weight the batches of
        ``probe_data`` (default: dim 0 of a batch's first tensor), e.g. the number
        of non-padding tokens of a dict batch.
    sync_every:
        Bring the values of probes that leave them on the device (``syncs =
        False``) to the host, and write their steps, at least every this many steps
        (default 50; also around any step whose probes synchronise anyway, and at
        :meth:`flush`, :meth:`records` and :meth:`close`). Steps not yet written are
        lost if the process is killed; 1 writes every step as it ends.
    grad_scaler:
        The ``torch.amp.GradScaler`` of a mixed-precision loop, so that
        ``grad_norm_before_clip`` (taken at the end of backward, where gradients are
        still scaled) is divided by its scale. Its scale tensor is read on the
        device, without a synchronisation.
    progress:
        A step whose curvature probes run longer than about 2 s shows a progress
        bar of its Hessian-vector products, removed when the step ends: ``None``
        (default) on an interactive terminal only, never into a log file or pipe;
        ``False`` never; ``True`` always.

    Attributes
    ----------
    run:
        The :class:`~dyndiag.probes.RunContext` the probes see: the model (the
        module inside DDP and ``torch.compile`` wrappers), optimizer, loss, probe
        data, the parameters the optimizer trains (re-read at every step:
        parameters added with ``add_param_group`` or unfrozen enter every probe,
        frozen ones leave) and the last training forward's outputs.
    step:
        The step the next ``optimizer.step()`` records under.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        probes: Sequence[Probe],
        loss_fn: Callable | None = None,
        probe_data: object = None,
        log_dir: str | None = None,
        *,
        closure: Callable | None = None,
        start_step: int | None = None,
        step_hooks: bool = True,
        batch_size_fn: Callable | None = None,
        sync_every: int = 50,
        grad_scaler: object = None,
        progress: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        probes = check_probes(probes)
        needing = [p.name for p in probes if {"curvature", "probe_batch"} & set(p.needs)]
        if needing and (probe_data is None or (loss_fn is None and closure is None)):
            raise ValueError(f"probes {needing} need probe_data and a loss_fn (or closure)")
        if start_step is not None and (not isinstance(start_step, int) or start_step < 0):
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        if not isinstance(step_hooks, bool):
            raise TypeError(f"step_hooks must be a bool, got {type(step_hooks).__name__}")
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
        if grad_scaler is not None and not (hasattr(grad_scaler, "unscale_") and hasattr(grad_scaler, "is_enabled")):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")

        # Probes evaluate the module inside DDP and torch.compile wrappers (never arming a
        # gradient sync, never running a compiled graph); the forward hook goes where it
        # sees every training forward (a compiled wrapper's hooks run outside its graph).
        hooked = hook_module(model)
        model = unwrap(model)
        self.run = RunContext(model, optimizer, loss_fn, closure, probe_data, batch_size_fn, progress=progress)
        self.model = model
        self.optimizer = optimizer
        self.probes = probes
        self.log_dir = log_dir
        self._writer = None
        self._memory: list[tuple] = []  # scalar records kept in memory when log_dir is None
        if log_dir is not None:
            from .records import RecordWriter

            self._writer = RecordWriter(log_dir, start_step=start_step)
            self.step = self._writer.next_step
        else:
            self.step = start_step or 0
        self.sync_every = sync_every
        self.grad_scaler = grad_scaler
        self._queue: list[tuple] = []  # finished steps not yet written: (step, wall_time, scalars, arrays)
        self._pending = None
        self._warned: set = set()
        self.step_hooks = step_hooks
        self._handles = [hooked.register_forward_hook(self._capture, with_kwargs=True)]
        if isinstance(loss_fn, nn.Module):  # the criterion training calls sees the targets of the logits
            self._handles.append(loss_fn.register_forward_hook(self._capture_targets))
        if step_hooks:
            self._handles += [
                optimizer.register_step_pre_hook(self._pre_step),
                optimizer.register_step_post_hook(self._post_step),
            ]
        # grad_norm_before_clip: post-accumulate-grad hooks on the measured parameters
        # queue one snapshot of the gradient norms for the end of each backward.
        self._snapshots = any("before_clip" in p.needs for p in probes)
        self._grad_hooks: dict[int, object] = {}
        self._snapshot_queued = False
        self._refreshed = -1  # the step whose parameters were last re-read
        self._hook_params()
        for p in probes:
            p.setup(self.run)
        # A monitor that is never closed still writes its last steps when Python exits.
        self._close_at_exit = _closer(weakref.ref(self))
        atexit.register(self._close_at_exit)

    # -- hooks --------------------------------------------------------------
    def _capture(self, module, inputs, kwargs, output) -> None:
        # A probe's own forward (this Monitor's or another's) is not training's. Probes never
        # run compiled (evaluation.probing), so a forward being traced is training's: there
        # the context variable, which Dynamo cannot trace (a graph break), is not read.
        if not torch.compiler.is_compiling() and is_probing():
            return
        # The usual case first: no getattr, which raises inside for a tensor.
        logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", output)
        if isinstance(logits, torch.Tensor):
            run = self.run
            run.logits = logits.detach()
            labels = kwargs.get("labels") if kwargs else None
            run.targets = labels.detach() if isinstance(labels, torch.Tensor) else None
            run.loss_dtype = loss_dtype(logits)

    def _capture_targets(self, module, inputs, output) -> None:
        run = self.run
        if (not torch.compiler.is_compiling() and is_probing()) or len(inputs) < 2 or run.logits is None:
            return
        logits, targets = inputs[0], inputs[1]
        if isinstance(logits, torch.Tensor) and isinstance(targets, torch.Tensor) and logits.shape == run.logits.shape:
            run.targets = targets.detach()
            run.loss_dtype = loss_dtype(logits)  # the autocast state the loss itself ran in

    def _pre_step(self, optimizer, args, kwargs) -> None:
        if torch.compiler.is_compiling():  # a compiled optimizer.step: probes run eagerly, outside its graph
            return torch.compiler.disable(self._pre_step)(optimizer, args, kwargs)
        # torch passes step()'s own arguments, the optimizer first: (opt, closure?).
        closure_step = kwargs.get("closure", args[1] if len(args) > 1 else None) is not None
        self._begin(closure_step)

    def _post_step(self, optimizer, args, kwargs) -> None:
        if torch.compiler.is_compiling():
            return torch.compiler.disable(self._post_step)(optimizer, args, kwargs)
        self._finish()

    def _hook_params(self) -> None:
        if self._snapshots:
            for p in self.run.params:
                if id(p) not in self._grad_hooks:
                    self._grad_hooks[id(p)] = p.register_post_accumulate_grad_hook(self._on_grad)

    def _on_grad(self, param) -> None:
        # Once per backward (the first parameter whose gradient is accumulated), and only
        # when the coming step has a due probe that reads the snapshot.
        if self._snapshot_queued or is_probing():
            return
        step = self.step
        if not any(p.enabled and "before_clip" in p.needs and p.due(step) for p in self.probes):
            return
        self._snapshot_queued = True
        torch.autograd.Variable._execution_engine.queue_callback(self._snapshot_last)

    def _snapshot_last(self) -> None:
        # Callbacks run in the order queued, and one queued from a callback runs after
        # all of them: after DDP's, which averages the gradients and is queued later.
        torch.autograd.Variable._execution_engine.queue_callback(self._snapshot)

    def _snapshot(self) -> None:
        """At the end of a backward: the norms of the accumulated gradients, on the device."""
        self._snapshot_queued = False
        self._refresh()  # parameters unfrozen since the last step have gradients now
        params = [p for p in self.run.params if p.grad is not None]
        with torch.no_grad():
            norms = torch._foreach_norm([p.grad for p in params]) if params else []
            scaler = self.grad_scaler
            scale = getattr(scaler, "_scale", None) if scaler is not None and scaler.is_enabled() else None
            if scale is not None and norms:  # the loss was scaled: gradients are scale x the true ones
                norms = torch._foreach_div(norms, scale.to(norms[0].device))
        self.run.norms_before_clip = {id(p): n for p, n in zip(params, norms)}

    def _refresh(self) -> None:
        """Follow the optimizer: parameters added or unfrozen enter, frozen ones leave."""
        if self._refreshed == self.step:  # once per step: at the end of its backward, or at the step
            return
        self._refreshed = self.step
        if not self.run.refresh():
            return
        self._hook_params()
        for probe in self.probes:
            if probe.enabled:
                try:
                    probe.params_changed(self.run)
                except Exception as err:  # the failure policy of run_probes
                    probe.enabled = False
                    self._warn_once(("failed", probe.name), f"probe {probe.name!r} failed at step {self.step} "
                                    f"and is disabled: {type(err).__name__}: {err}")

    def _begin(self, closure_step: bool) -> None:
        """Run the state probes due at ``self.step``; keep their rows for :meth:`_finish`."""
        step = self.step
        self._refresh()
        due = [p for p in self.probes if p.enabled and p.due(step)]
        self._pending = None
        if not self.run.params:  # nothing is trained (yet): only probes that need no parameters
            due = [p for p in due if not {"gradients", "before_clip", "curvature", "update"} & set(p.needs)]
        if not due:
            return
        if closure_step:
            self._warn_once(
                "closure",
                "optimizer.step(closure) runs forward and backward inside step(), so the "
                "pre-step hook sees the previous step's gradients; probes that need gradients "
                "are skipped on such steps (use the Lightning or Hugging Face callback, which "
                "run after backward)",
            )
        syncs = any(p.syncs for p in due)
        if syncs:  # this step waits for the device anyway: write the steps that wait first
            self.flush()
        ctx = StepContext(self.run, step, due)
        stale = {"gradients", "before_clip"} if closure_step else set()  # the previous step's gradients
        pre = [p for p in due if p.phase == "pre" and not stale & set(p.needs)]
        post = [p for p in due if p.phase == "post"]
        if post:
            ctx.theta_before = [p.detach().clone() for p in ctx.params]
        scalars, arrays = self._run(pre, ctx)
        self._pending = (ctx, post, scalars, arrays, syncs)

    def _finish(self) -> list[tuple]:
        """Run the pending update probes, queue the step, advance the counter; the rows written."""
        step = self.step
        self.step += 1
        self.run.norms_before_clip = None  # the snapshot belonged to this step
        pending, self._pending = self._pending, None
        if pending is not None:
            ctx, post, scalars, arrays, syncs = pending
            if post:
                s, a = self._run(post, ctx)
                scalars += s
                arrays += a
            self._queue.append((step, time.time(), scalars, arrays))
            if syncs:
                return self.flush()
        if self._queue and step - self._queue[0][0] + 1 >= self.sync_every:
            return self.flush()
        return []

    # -- manual driving (step_hooks=False) ------------------------------------
    def before_step(self, step: int | None = None) -> None:
        """Run the state probes due at ``step``, on the current gradients and parameters.

        For ``step_hooks=False``: call it after backward, before the optimizer's
        update. ``step`` (default: the monitor's counter) sets the counter; it may
        skip ahead but never go back. If the previous :meth:`before_step` was never
        followed by :meth:`after_step` (its update did not happen, e.g. a gradient
        scaler skipped it), that step's state-probe rows are written first — unless
        ``step`` is that same step again, whose rows this call then replaces.

        Returns
        -------
        None
        """
        self._need_manual("before_step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if self._pending is not None:
            if step is not None and step == self._pending[0].step:
                self._pending = None  # the same step again: its first attempt was never applied
            else:
                self._flush_pending()
        if step is not None:
            if step < self.step:
                raise ValueError(f"step must be >= the monitor's next step {self.step}, got {step}")
            self.step = step
        self._begin(closure_step=False)

    def after_step(self) -> list[tuple[int, str, str, str, float]]:
        """Run the update probes (after the optimizer's update) and finish the step.

        For ``step_hooks=False``: call it once the update is applied. The step is
        written with the others when the Monitor next flushes (see ``sync_every``).

        Returns
        -------
        list of ``(step, probe, metric, key, value)``
            The scalar rows written by this call: those of every step flushed now
            (this one's, when it was flushed; empty otherwise).
        """
        self._need_manual("after_step")
        return self._finish()

    def _need_manual(self, method: str) -> None:
        if self.step_hooks:
            raise RuntimeError(
                f"{method}() drives a monitor built with step_hooks=False; this one runs from optimizer hooks"
            )

    def _flush_pending(self) -> None:
        """Queue the state-probe rows of a step whose update never came (no update probes)."""
        ctx, _, scalars, arrays, _ = self._pending
        self._pending = None
        self.step = ctx.step + 1
        self._queue.append((ctx.step, time.time(), scalars, arrays))

    # -- running probes and writing ----------------------------------------------
    def _run(self, probes: list[Probe], ctx: StepContext) -> tuple[list, list]:
        return run_probes(probes, ctx, self._warned, defer=True)

    def flush(self) -> list[tuple[int, str, str, str, float]]:
        """Bring the values waiting on the device to the host, in one copy, and write their steps.

        Returns
        -------
        list of ``(step, probe, metric, key, value)``
            The scalar rows written, in step order (empty when nothing waited).
        """
        if not self._queue:
            return []
        queue, self._queue = self._queue, []
        resolved = resolve_rows([(step, scalars) for step, _, scalars, _ in queue], self._warned)
        rows = []
        for (step, wall_time, _, arrays), scalars in zip(queue, resolved):
            self._write(step, scalars, arrays, wall_time)
            rows += [(step, *row) for row in scalars]
        return rows

    def _write(self, step: int, scalars: list, arrays: list, wall_time: float | None = None) -> None:
        if self._writer is not None:
            try:
                self._writer.write_step(step, scalars, arrays, wall_time=wall_time)
            except Exception as err:  # a full disk must not stop training either
                self._warn_once("write", f"records could not be written (step {step}): {type(err).__name__}: {err}")
        else:
            now = time.time() if wall_time is None else wall_time
            self._memory += [(step, probe, metric, key, value, now) for probe, metric, key, value in scalars]

    def _warn_once(self, key, message: str) -> None:
        warn_once(self._warned, key, message)

    # -- lifecycle ---------------------------------------------------------------
    def records(self):
        """The records so far as a DataFrame (``step, probe, metric, key, value, wall_time, run``).

        With a ``log_dir``, read from the store: every step written so far, by this
        Monitor and by earlier ones on the same dir (each its own ``run`` segment);
        without one, this Monitor's rows, all ``run`` 0. Flushes first.
        """
        self.flush()
        if self.log_dir is not None:
            from .records import load_records

            return load_records(self.log_dir)
        import pandas as pd

        columns = ["step", "probe", "metric", "key", "value", "wall_time"]
        return pd.DataFrame(self._memory, columns=columns).assign(run=0)

    def close(self) -> list[tuple[int, str, str, str, float]]:
        """Write what waits, remove every hook and close the record store. Idempotent.

        With ``step_hooks=False``, the state-probe rows of a step begun by
        :meth:`before_step` but never finished are written first. The store's step
        counter is brought up to the Monitor's (steps with no due probe write
        nothing), so a Monitor opened later on the same ``log_dir`` continues from
        the step after the last one trained.

        Returns
        -------
        list of ``(step, probe, metric, key, value)``
            The scalar rows written by this call (as :meth:`flush`).
        """
        if not self.step_hooks and self._pending is not None:
            self._flush_pending()
        rows = self.flush()
        for h in self._handles + list(self._grad_hooks.values()):
            h.remove()
        self._handles = []
        self._grad_hooks = {}
        self._snapshots = False
        atexit.unregister(self._close_at_exit)
        if self._writer is not None:
            if self.step > self._writer.next_step:  # an empty step: only the counter
                self._write(self.step - 1, [], [])
            self._writer.close()
            self._writer = None
        return rows

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Monitor(step={self.step}, probes={[p.name for p in self.probes]}, log_dir={self.log_dir!r})"


def _closer(ref: weakref.ref) -> Callable[[], None]:
    """``close()`` of the Monitor behind ``ref`` if it still lives; at interpreter exit,
    where an error (a log dir already deleted) can only be reported, not acted on."""

    def close() -> None:
        mon = ref()
        if mon is not None:
            try:
                mon.close()
            except Exception as err:  # pragma: no cover - depends on what exit tore down
                print(f"dyndiag: a Monitor could not write its last steps at exit: {err}", file=sys.stderr)

    return close
