"""How dyndiag evaluates a model without changing it: one place for every layer.

Two evaluation rules (design.md, Decisions):

* :func:`operator_mode` — curvature products, losses, JVPs: every module except
  normalisation layers (BatchNorm/InstanceNorm) in eval mode, so dropout (attention
  dropout too) is off and the evaluation is deterministic; normalisation layers keep
  the model's own mode (train mode: batch statistics, the loss training sees);
* :func:`per_example_mode` — per-example quantities: every module in eval mode, so
  examples do not interact (BatchNorm on its running statistics).

Both run under :func:`dyndiag.state.preserve_state` (modes, buffers and RNG restored),
with gradients enabled and PyTorch's MATH attention kernel — the only
scaled-dot-product kernel with a double backward on CPU. Models are called through
:class:`Evaluate` and ``torch.func.functional_call`` with copied buffers, so their
parameters and running statistics are never written.

Both also mark their block as dyndiag's own (:func:`probing`, as the probe runner
does): a Monitor's hooks ignore the forwards and backwards made there, whichever
Monitor or quantity made them (:func:`is_probing`).

Wrapped models are read through the module inside (:func:`unwrap`): DDP/DataParallel
(``module``) and ``torch.compile`` (``_orig_mod``). Inside :func:`probing`,
``torch.compile`` runs nothing compiled (``set_stance("force_eager")``): a compiled
graph (AOTAutograd) has no double backward, so compiled submodules and
``module.compile()`` are evaluated eagerly too, and dyndiag's evaluations never trace,
guard or recompile anything that training compiled.
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .data import model_outputs
from .state import preserve_state

__all__ = [
    "Evaluate", "math_attention", "operator_mode", "per_example_mode", "probing", "is_probing", "select_params",
    "outputs_fn", "unwrap", "is_compiled", "hook_module",
]

# A context variable, not a Monitor's attribute: two Monitors on one model (or a quantity
# called inside a training step) must not take each other's evaluations for training.
# 0: not probing; 1: probing; 2: probing with torch.compile forced eager.
_PROBING: ContextVar[int] = ContextVar("dyndiag_probing", default=0)


class probing:  # noqa: N801 - used like a function: ``with probing():``
    """Mark the block as dyndiag's own evaluation of the model (nestable), with
    ``torch.compile`` forced to run eagerly inside it (see the module docstring).

    ``eager=False`` only marks the block: for code that reads tensors and never calls
    the model (the cheap per-step probes), which then does not pay for entering the
    stance at every step; a nested ``probing()`` still forces eager.

    A class rather than a generator context manager: it wraps every step's probes.
    """

    def __init__(self, eager: bool = True) -> None:
        self.eager = eager

    def __enter__(self) -> None:
        self._stance = None
        state = _PROBING.get()
        if self.eager and state < 2:
            self._stance = _eager_stance()
            if self._stance is not None:
                self._stance.__enter__()
        self._token = _PROBING.set(2 if self.eager or state == 2 else 1)

    def __exit__(self, *exc: object) -> None:
        _PROBING.reset(self._token)
        if self._stance is not None:
            self._stance.__exit__(*exc)


def _eager_stance():
    """``torch.compiler.set_stance("force_eager")``, or ``None`` when nothing can be compiled.

    Nothing is compiled before ``torch._dynamo`` is imported, and importing it takes
    seconds: a process that never compiles never pays for it.
    """
    if "torch._dynamo" not in sys.modules:
        return None
    return torch.compiler.set_stance("force_eager")


def is_probing() -> bool:
    """Whether the calling code runs inside :func:`probing` (a probe, an operator, a quantity)."""
    return _PROBING.get() > 0

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def math_attention():
        """Scaled-dot-product attention on the MATH kernel (double-differentiable)."""
        return sdpa_kernel(SDPBackend.MATH)

except ImportError:  # pragma: no cover - older torch
    from contextlib import nullcontext as math_attention


def is_compiled(model: object) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper (an ``OptimizedModule``)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    optimized = getattr(eval_frame, "OptimizedModule", None)
    return optimized is not None and isinstance(model, optimized)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` and ``torch.compile``
    wrappers, stacked in any order (else ``model``).

    Diagnostics evaluate the inner module: a forward through the DDP wrapper would
    arm its gradient synchronisation, and ranks would wait on each other inside an
    HVP (every rank's products are all-reduced by dyndiag itself instead); a forward
    through the compiled one would run AOTAutograd's graph, which has no double
    backward, and could trace and guard on dyndiag's evaluations. The inner module
    holds the same parameter tensors, named without the wrappers' prefixes.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif is_compiled(model):
            model = model._orig_mod
        else:
            return model


def hook_module(model: nn.Module) -> nn.Module:
    """The module whose forward hooks see each training forward of ``model``: the
    outermost ``torch.compile`` wrapper in the stack, else :func:`unwrap`'s module.

    A compiled wrapper runs its own hooks eagerly, around the compiled call. Hooks of
    the module inside may run inside the compiled graph instead (``torch.nn``
    containers are traced with their hooks), where a hook added after compiling is
    never called: Dynamo does not guard on hook dicts.
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model if is_compiled(model) else unwrap(model)


class Evaluate(nn.Module):
    """``forward(batch) = fn(model, batch)``, so ``functional_call`` can run a closure."""

    def __init__(self, model: nn.Module, fn: Callable) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch):
        return self.fn(self.model, batch)


@contextmanager
def operator_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off, normalisation layers in the model's mode; restored on exit."""
    # Modes and RNG are the only live state an evaluation could touch: parameters
    # are read through detached views, buffers through copies, .grad never.
    with preserve_state(model, grads=False, buffers=True, rng=True), probing():
        for m in model.modules():
            if not isinstance(m, _NormBase):
                m.training = False
        with math_attention(), torch.enable_grad():
            yield


@contextmanager
def per_example_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode (restored on exit), gradients enabled, MATH attention."""
    with preserve_state(model, grads=False, buffers=True, rng=True), probing():
        for m in model.modules():
            m.training = False
        with math_attention(), torch.enable_grad():
            yield


def outputs_fn(forward: Callable | None) -> Callable:
    """``(model, batch) -> outputs``: ``forward`` if given, else ``model(batch[0])``."""
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable (model, batch) -> outputs, got {type(forward).__name__}")

    def outputs(model, batch):
        if forward is not None:
            return forward(model, batch)
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return model_outputs(model, batch[0])
        raise ValueError("batches must be (inputs, targets); pass forward= for other batches")

    return outputs


def select_params(
    model: nn.Module, params: Sequence[torch.Tensor] | str | Sequence[str] | None
) -> tuple[list[str], list[torch.Tensor]]:
    """``(names, params)``: ``params`` (default: every trainable one) in order, with names.

    ``params`` is a sequence of parameters of ``model``, or name globs: a string or a
    sequence of strings matched (``fnmatch``, case-sensitive) against the names of
    ``model.named_parameters()`` that require grad, e.g. ``"transformer.h.*.attn.*"``;
    the matches come in model order, and a glob matching none is a ``ValueError``.
    Tied parameters appear once; all must share one floating dtype and device.
    """
    named = list(model.named_parameters())  # tied parameters appear once
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("model has no trainable parameters (none with requires_grad=True)")
    elif isinstance(params, str) or (
        isinstance(params, Sequence) and params and all(isinstance(g, str) for g in params)
    ):
        trainable = dict((n, p) for n, p in named if p.requires_grad)
        globs = [params] if isinstance(params, str) else list(params)
        chosen = [(n, trainable[n]) for n in match_names(list(trainable), globs, "params")]
    else:
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be a sequence of parameter tensors or name globs, not a single Tensor")
        by_id = {id(p): n for n, p in named}
        chosen, seen = [], set()
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"params[{i}] must be a tensor, got {type(p).__name__} (name globs must all be strings)"
                )
            if id(p) not in by_id:
                raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of model")
            if id(p) not in seen:
                seen.add(id(p))
                chosen.append((by_id[id(p)], p))
        if not chosen:
            raise ValueError("params is empty: give at least one parameter of model")
    dtypes = {p.dtype for _, p in chosen}
    devices = {p.device for _, p in chosen}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"params must share one dtype and device, got {sorted(map(str, dtypes))} on "
            f"{sorted(map(str, devices))}"
        )
    if not next(iter(dtypes)).is_floating_point:
        raise TypeError("params must be floating point")
    return [n for n, _ in chosen], [p for _, p in chosen]


def match_names(names: Sequence[str], globs: Sequence[str], what: str) -> list[str]:
    """The ``names`` (in their order) matching any of ``globs`` (``fnmatch``,
    case-sensitive); a glob that matches none is a ``ValueError`` naming it and
    ``what`` (the argument it came from)."""
    for g in globs:
        if not isinstance(g, str):
            raise TypeError(f"{what} globs must be strings, got {type(g).__name__}")
        if not any(fnmatch.fnmatchcase(n, g) for n in names):
            example = f" (names look like {names[0]!r})" if names else ""
            raise ValueError(f"{what}: glob {g!r} matches none of the parameter names{example}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)]
