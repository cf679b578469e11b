"""Offline analysis: run probes on saved checkpoints instead of a live training loop.

Each checkpoint is loaded into one model (built once) and the probes run on it as
a Monitor would run them at that step, with the needs computed from the fixed
``probe_data`` instead of the training loop:

* ``gradients``: the gradient of the mean probe-data loss at the checkpoint;
* ``logits``: the model's outputs on the first probe batch;
* ``update`` (update probes: directional sharpness, safe step radius): the
  displacement to the *next* checkpoint, theta_next - theta, with curvature taken
  at theta. The last checkpoint has no update, so update probes skip it;
* ``curvature``: the Hessian of the probe data's loss, shared by the probes.

The model is evaluated in eval mode by default (dropout off, BatchNorm with the
running statistics stored in the checkpoint); ``train_mode=True`` uses batch
statistics as training saw them. Layer rotation is measured against the first
checkpoint analysed unless the probe is given a ``reference``. The edge-of-stability
threshold and Adam's preconditioned sharpness read an optimizer: the checkpoint's
own optimizer state when it carries one (Lightning, training dicts, Hugging Face's
``optimizer.pt``), else the hyper-parameters of the ``optimizer`` given (the CLI
builds it from ``--optimizer``/``--lr``/``--momentum``).

Probes run as under a Monitor (the same contexts, the same
:func:`~dyndiag.probes.base.run_probes`): one that raises is warned about once
and disabled for the remaining checkpoints. Records are written like a Monitor's,
under each checkpoint's step. A re-run skips the steps already recorded; if a
checkpoint is new at a step before the last recorded one (or failed before), the
records from that step on are replaced.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .checkpoints import load_checkpoint, match_state_dict, sort_checkpoints
from .data import iter_batches, make_loss_closure, model_outputs
from .evaluation import math_attention, operator_mode
from .probes.base import Probe, check_probes, run_probes
from .probes.context import RunContext, StepContext
from .state import preserve_state

__all__ = ["analyze", "AnalysisResult"]


class AnalysisResult(dict):
    """``{"analysed": [steps], "skipped": [steps], "failed": {path: message}}`` with
    ``log_dir`` the records' directory."""

    log_dir: Path


def analyze(
    checkpoints: Sequence[str | Path],
    model: nn.Module | Callable[[], nn.Module],
    probes: Sequence[Probe],
    probe_data: object,
    log_dir: str | Path,
    loss_fn: Callable | None = None,
    *,
    closure: Callable | None = None,
    optimizer: torch.optim.Optimizer | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    train_mode: bool = False,
    trust: bool = False,
    progress: bool | None = None,
    on_error: Callable[[Path, Exception], None] | None = None,
) -> AnalysisResult:
    """Run ``probes`` on each checkpoint and write their records to ``log_dir``.

    Parameters
    ----------
    checkpoints:
        Paths of checkpoints (see :func:`dyndiag.checkpoints.load_checkpoint`). Each
        one's step is the last integer in its name (``model_step_120.pt`` -> 120), a
        Hugging Face directory's ``trainer_state.json``, else its position; they are
        analysed in step order.
    model:
        A module to load the weights into, or a factory returning one. It is
        returned with its own weights, buffers and mode restored.
    probes:
        :class:`~dyndiag.Probe` instances (names unique), every one run on every
        checkpoint (``every=`` is ignored offline).
    probe_data:
        A batch or a list of batches: the data the curvature, gradients and losses
        are measured on.
    log_dir:
        Where the records go (``dd.load_records(log_dir)``).
    loss_fn, closure:
        The criterion ``loss_fn(outputs, targets)``, or ``closure(model, batch)``.
    optimizer:
        What probes that need the optimizer read (the edge-of-stability threshold,
        Adam's preconditioned sharpness); never stepped. An optimizer over the
        model's parameters or a callable ``params -> optimizer``: its
        hyper-parameters serve checkpoints that carry no optimizer state. An
        optimizer class (``torch.optim.Adam``): built over the parameters, every
        checkpoint must carry its state. Either way, a checkpoint's own optimizer
        state (:attr:`~dyndiag.checkpoints.Checkpoint.optimizer_state`) is loaded
        before its probes run, so learning-rate schedules and Adam's second
        moments are the run's.
    train_mode:
        Evaluate in train mode (BatchNorm batch statistics) instead of eval mode.
    trust:
        Allow checkpoints with arbitrary pickled objects (see ``load_checkpoint``).
    progress:
        Show a progress bar (default: on a terminal).
    on_error:
        Called with ``(path, exception)`` for a checkpoint that fails; the rest go
        on. Default: a ``RuntimeWarning``.

    Returns
    -------
    AnalysisResult
        Steps analysed, skipped (already recorded) and failed checkpoints.
    """
    from .records import RecordWriter, load_records

    if isinstance(checkpoints, (str, Path)):
        checkpoints = [checkpoints]
    if not checkpoints:
        raise ValueError("checkpoints must name at least one checkpoint")
    probes = check_probes(probes)
    if not probes:
        raise ValueError("probes must hold at least one probe")
    if probe_data is None:
        raise ValueError("probe_data is required offline: the gradients, logits and curvature are measured on it")
    make_loss_closure(loss_fn, closure)  # validates: exactly one of the two
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a factory returning one, got {type(model).__name__}")
        model = model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the model factory returned a {type(model).__name__}, not an nn.Module")
    from .quantities.gradients import mean_gradient

    run = RunContext(model, loss_fn=loss_fn, closure=closure, probe_data=probe_data)
    params = run.params
    run.gradient_fn = lambda: mean_gradient(model, loss_fn, probe_data, params, closure=closure).to(params[0].dtype)
    opt_class = None
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        opt_class, optimizer = optimizer, None  # built at the first checkpoint that carries a state
    elif optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(params)
    ordered = sort_checkpoints(checkpoints)

    log_dir = Path(log_dir)
    done: set[int] = set()
    if (log_dir / "records.sqlite").exists():
        done = set(load_records(log_dir).step.unique().tolist())
    todo = [(s, p) for s, p in ordered if s not in done]
    result = AnalysisResult(analysed=[], skipped=[s for s, _ in ordered if s in done], failed={})
    result.log_dir = log_dir
    if not todo:
        return result
    writer = RecordWriter(log_dir)
    if todo[0][0] < writer.next_step:  # rewind: RecordWriter stores steps in increasing order
        writer.close()
        writer = RecordWriter(log_dir, start_step=todo[0][0])
        rewound = [(s, p) for s, p in ordered if s >= todo[0][0]]
        result["skipped"] = [s for s in result["skipped"] if s < todo[0][0]]
        todo = rewound
    report = on_error or (lambda path, err: warnings.warn(
        f"checkpoint {str(path)!r} skipped: {type(err).__name__}: {err}", RuntimeWarning, stacklevel=3))

    from tqdm.auto import tqdm

    bar = tqdm(todo, desc="checkpoints", unit="ckpt", disable=None if progress is None else not progress)
    # Update probes read the next checkpoint, which is then the current one: each file is read once.
    read = lru_cache(maxsize=2)(lambda path: load_checkpoint(path, trust=trust))
    warned: set = set()
    with writer, preserve_state(model, optimizer, params=True), torch.enable_grad():
        model.train(train_mode)
        for p in probes:
            p.enabled = True
        first = True
        for step, path in bar:
            bar.set_postfix_str(f"step {step}")
            try:
                ck = read(path)
                _load(model, match_state_dict(ck.state_dict, model))
                if ck.optimizer_state is not None and (optimizer is not None or opt_class is not None):
                    if optimizer is None:
                        optimizer = opt_class(params)
                    _load_optimizer(optimizer, ck.optimizer_state)
                elif opt_class is not None:
                    raise ValueError(
                        f"it carries no optimizer state, and the optimizer was given as the class "
                        f"{opt_class.__name__} without hyper-parameters (pass an optimizer instance or --lr)"
                    )
                run.optimizer = optimizer
                if first:
                    for p in probes:
                        p.setup(run)
                    first = False
                due = [p for p in probes if p.enabled]
                run.logits = _first_outputs(run) if any("logits" in p.needs for p in due) else None
                ctx = StepContext(run, step, due)
                scalars, arrays = run_probes([p for p in due if p.phase == "pre"], ctx, warned)
                post = [p for p in due if p.phase == "post"]
                later = [p for s, p in ordered if s > step]
                if post and later:
                    nxt = match_state_dict(read(later[0]).state_dict, model)
                    ctx.theta_before = [p.detach().clone() for p in params]
                    _load(model, nxt)
                    s, a = run_probes(post, ctx, warned)
                    scalars += s
                    arrays += a
                writer.write_step(step, scalars, arrays)
                result["analysed"].append(step)
            except Exception as err:  # one bad checkpoint must not stop the others
                result["failed"][str(path)] = f"{type(err).__name__}: {err}"
                report(path, err)
    return result


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The checkpoint's optimizer state (hyper-parameters of every group included)."""
    kinds = {key for group in state.get("param_groups", []) for key in group}
    # Only the keys that tell the kinds apart: newer torch versions add other defaults
    # that states saved by older ones lack.
    defining = {"momentum", "dampening"} if isinstance(optimizer, torch.optim.SGD) else {"betas", "eps"}
    lacking = sorted(defining & set(optimizer.defaults) - kinds)
    if lacking:  # e.g. Adam's state offered to SGD: its groups have betas, no momentum
        raise ValueError(
            f"its optimizer state is not a {type(optimizer).__name__}'s (its groups lack {lacking}); "
            "name the run's optimizer (--optimizer sgd|adam|adamw)"
        )
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as err:
        raise ValueError(
            f"its optimizer state does not fit a {type(optimizer).__name__} over the model's trainable "
            f"parameters in one group ({err})"
        ) from err


def _load(model: nn.Module, state_dict: dict) -> None:
    with torch.no_grad():
        model.load_state_dict(state_dict, strict=True)


def _first_outputs(run: RunContext) -> torch.Tensor:
    """The model's outputs on the first probe batch: what offline probes judge as ``logits``."""
    batch = next(iter_batches(run.probe_data, "probe_data"))
    with torch.no_grad(), operator_mode(run.model), math_attention():
        return model_outputs(run.model, batch if isinstance(batch, dict) else batch[0]).detach()
