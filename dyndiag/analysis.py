"""Offline analysis: run probes on saved checkpoints instead of a live training loop.

Each checkpoint is loaded into one model (built once) and the probes run on it as
a Monitor would run them at that step, with the needs computed from the fixed
``probe_data`` instead of the training loop:

* ``gradients``: the gradient of the mean probe-data loss at the checkpoint;
* ``logits``: the model's outputs on the first probe batch;
* ``update`` (update probes: directional sharpness, safe step radius): the
  displacement to the *next* checkpoint, theta_next - theta, with curvature taken
  at theta; each such probe also records ``update_steps``, the number of training
  steps the displacement spans (figures draw one-step references only where it
  is 1). The last checkpoint has no update, so update probes skip it;
* ``curvature``: the Hessian of the probe data's loss, shared by the probes.

The model is evaluated in eval mode by default (dropout off, BatchNorm with the
running statistics stored in the checkpoint); ``train_mode=True`` uses batch
statistics as training saw them. Probes are set up at the first checkpoint given
(in step order): layer rotation is measured against it unless the probe is given
a ``reference``. The edge-of-stability
threshold and Adam's preconditioned sharpness read an optimizer: the checkpoint's
own optimizer state when it carries one (Lightning, training dicts, Hugging Face's
``optimizer.pt``), else the hyper-parameters of the ``optimizer`` given (the CLI
builds it from ``--optimizer``/``--lr``/``--momentum``).

Probes run as under a Monitor (the same contexts, the same
:func:`~dyndiag.probes.base.run_probes`): one that raises is warned about once
and disabled for the remaining checkpoints. Records are written like a Monitor's,
under each checkpoint's step. A re-run into the same ``log_dir`` computes at each
checkpoint the probes that have nothing recorded at its step, and skips the rest:
other probes, new checkpoints, checkpoints that failed before and update probes
at a checkpoint that has gained a next one are filled in beside what is stored
(a new run segment, see :func:`~dyndiag.load_records`); nothing stored is computed
again or replaced.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .checkpoints import load_checkpoint, match_state_dict, sort_checkpoints
from .data import batch_targets, iter_batches, make_loss_closure, model_outputs
from .evaluation import math_attention, operator_mode, unwrap
from .probes.base import Probe, check_probes, run_probes
from .probes.context import RunContext, StepContext
from .state import preserve_state

__all__ = ["analyze", "AnalysisResult", "OptimizerStateMissing"]


class OptimizerStateMissing(ValueError):
    """A checkpoint carries no optimizer state, and the optimizer was given as a class
    (no hyper-parameters): the threshold it would read is unknown."""


class AnalysisResult(dict):
    """``{"analysed": [steps], "skipped": [steps], "failed": {path: message}}`` with
    ``log_dir`` the records' directory: the steps where probes were computed, the
    steps whose every probe was already recorded, and the checkpoints that failed."""

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
        Show a progress bar over the checkpoints, and one of a checkpoint's
        Hessian-vector products once they run longer than about 2 s (default: on
        an interactive terminal only).
    on_error:
        Called with ``(path, exception)`` for a checkpoint that fails; the rest go
        on. Default: a ``RuntimeWarning``.

    Returns
    -------
    AnalysisResult
        Steps analysed, skipped (every probe already recorded) and failed checkpoints.
    """
    from .records import DB_NAME, RecordWriter, recorded_probes

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
    model = unwrap(model)  # checkpoints load into, and probes read, the module inside DDP/torch.compile
    from .quantities.gradients import mean_gradient

    run = RunContext(model, loss_fn=loss_fn, closure=closure, probe_data=probe_data, progress=progress)
    params = run.params
    run.gradient_fn = lambda: mean_gradient(model, loss_fn, probe_data, params, closure=closure).to(params[0].dtype)
    opt_class = None
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        opt_class, optimizer = optimizer, None  # built at the first checkpoint that carries a state
    elif optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(params)
    ordered = sort_checkpoints(checkpoints)

    log_dir = Path(log_dir)
    stored = recorded_probes(log_dir) if (log_dir / DB_NAME).exists() else {}
    last = ordered[-1][0]
    plan = [(s, path, [p for p in probes if p.name not in stored.get(s, ()) and (p.phase == "pre" or s < last)])
            for s, path in ordered]
    result = AnalysisResult(analysed=[], skipped=[s for s, _, due in plan if not due], failed={})
    result.log_dir = log_dir
    if not any(due for _, _, due in plan):
        return result
    # The first checkpoint is read even with nothing to compute: the probes are set up on it.
    todo = [entry for i, entry in enumerate(plan) if entry[2] or i == 0]
    writer = RecordWriter(log_dir)
    report = on_error or (lambda path, err: warnings.warn(
        f"checkpoint {str(path)!r} skipped: {type(err).__name__}: {err}", RuntimeWarning, stacklevel=3))

    from tqdm.auto import tqdm

    bar = tqdm(total=sum(1 for e in todo if e[2]), desc="checkpoints", unit="ckpt",
               disable=None if progress is None else not progress)
    # Update probes read the next checkpoint, which is then the current one: each file is read once.
    read = lru_cache(maxsize=2)(lambda path: load_checkpoint(path, trust=trust))
    warned: set = set()
    with writer, preserve_state(model, optimizer, params=True), torch.enable_grad():
        model.train(train_mode)
        for p in probes:
            p.enabled = True
        first = True
        for step, path, planned in todo:
            if planned:
                bar.set_postfix_str(f"step {step}")
            try:
                ck = read(path)
                _load(model, match_state_dict(ck.state_dict, model))
                due = [p for p in planned if p.enabled]
                if ck.optimizer_state is not None and (optimizer is not None or opt_class is not None):
                    if optimizer is None:
                        optimizer = opt_class(params)
                    _load_optimizer(optimizer, ck.optimizer_state)
                elif opt_class is not None and due:
                    raise OptimizerStateMissing(
                        f"it carries no optimizer state, and the optimizer was given as the class "
                        f"{opt_class.__name__} without hyper-parameters (give an optimizer instance, or a "
                        "callable params -> optimizer)"
                    )
                run.optimizer = optimizer
                if first:
                    for p in probes:
                        p.setup(run)
                    first = False
                if not due:
                    continue
                run.logits = _first_outputs(run) if any("logits" in p.needs for p in due) else None
                run.targets = _first_targets(run) if run.logits is not None else None
                ctx = StepContext(run, step, due)
                scalars, arrays = run_probes([p for p in due if p.phase == "pre"], ctx, warned)
                post = [p for p in due if p.phase == "post"]
                if post:
                    nxt_step, nxt_path = next(entry for entry in ordered if entry[0] > step)
                    nxt = match_state_dict(read(nxt_path).state_dict, model)
                    ctx.theta_before = [p.detach().clone() for p in params]
                    _load(model, nxt)
                    s, a = run_probes(post, ctx, warned)
                    # Offline an update spans every training step between the two checkpoints.
                    span = float(nxt_step - step)
                    scalars += s + [(name, "update_steps", "", span) for name in dict.fromkeys(r[0] for r in s)]
                    arrays += a
                writer.write_step(step, scalars, arrays, amend=True)
                result["analysed"].append(step)
            except Exception as err:  # one bad checkpoint must not stop the others
                if not planned:  # read only to set the probes up: it is not "already analysed" either
                    result["skipped"].remove(step)
                result["failed"][str(path)] = f"{type(err).__name__}: {err}"
                report(path, err)
            finally:
                if planned:
                    bar.update(1)
    bar.close()
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


def _first_targets(run: RunContext) -> torch.Tensor | None:
    """The first probe batch's targets (labels), which go with :func:`_first_outputs`."""
    try:
        targets = batch_targets(next(iter_batches(run.probe_data, "probe_data")))
    except ValueError:  # a closure's batch without targets
        return None
    return targets if isinstance(targets, torch.Tensor) else None


def _first_outputs(run: RunContext) -> torch.Tensor:
    """The model's outputs on the first probe batch: what offline probes judge as ``logits``."""
    batch = next(iter_batches(run.probe_data, "probe_data"))
    with torch.no_grad(), operator_mode(run.model), math_attention():
        return model_outputs(run.model, batch if isinstance(batch, dict) else batch[0]).detach()
