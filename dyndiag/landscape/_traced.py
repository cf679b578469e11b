"""The layer-by-layer plan of a model that is not an ``nn.Sequential``, read from its
``torch.fx`` graph (see :mod:`dyndiag.landscape.layerwise`).

The graph must be: one input; a parameter-free head (known modules, functions and
methods: flatten, view, size, dtype casts, arithmetic with constants, elementwise
activations) ending in an ``nn.Linear``; then a chain in which each node takes the
previous one as its only tensor and nothing else uses it: ``nn.Linear`` layers,
known modules, and known elementwise functions or methods (``F.relu(x)``,
``x.tanh()``, ``F.dropout(x, p, training=False)``, ``F.log_softmax(x, dim=1)``);
the output is the last node. Anything else (a branch, a residual, a buffer, an
unknown call, a graph that does not trace) gives the reason and the vmap path.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["chain"]

# Functions and methods that act on each element alone, so they may run on the
# feature-major stack of a chunk; the tensor is their first argument.
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.tanh, torch.sigmoid, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
    F.silu, F.mish, F.tanh, F.sigmoid, F.hardtanh, F.hardsigmoid, F.hardswish, F.softplus, F.softsign,
    F.logsigmoid, F.tanhshrink, F.softshrink, F.hardshrink,
}
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid", "relu_", "tanh_", "sigmoid_"}
# The same values written into the stack, which is the chunk's own intermediate:
# no fresh allocation (and page faults) per chunk.
_INPLACE = {torch.tanh: torch.tanh_, F.tanh: torch.tanh_, torch.relu: torch.relu_, F.relu: torch.relu_,
            torch.sigmoid: torch.sigmoid_, F.sigmoid: torch.sigmoid_, "tanh": torch.tanh_, "relu": torch.relu_,
            "sigmoid": torch.sigmoid_, "tanh_": torch.tanh_, "relu_": torch.relu_, "sigmoid_": torch.sigmoid_}
_SOFTMAX_FUNCTIONS = {F.softmax: F.softmax, F.log_softmax: F.log_softmax, F.softmin: F.softmin,
                      torch.softmax: F.softmax, torch.log_softmax: F.log_softmax}
_SOFTMAX_METHODS = {"softmax": F.softmax, "log_softmax": F.log_softmax}
_DROPOUT_FUNCTIONS = {F.dropout, F.alpha_dropout}
# The head runs once per batch on the data, before any parameter is read.
_HEAD_FUNCTIONS = _ELEMENTWISE_FUNCTIONS | {
    torch.flatten, torch.reshape, operator.getitem, getattr, operator.truediv, operator.mul, operator.add,
    operator.sub, operator.neg,
}
_HEAD_METHODS = _ELEMENTWISE_METHODS | {"view", "reshape", "flatten", "size", "float", "double", "to",
                                        "contiguous", "unsqueeze", "squeeze"}


def chain(model: nn.Module, linear: Callable, head_module: Callable, module_step: Callable):
    """A :class:`~dyndiag.landscape.layerwise.Plan` for ``model``, or why not.

    ``linear``, ``head_module`` and ``module_step`` are the Sequential reader's own
    rules for an ``nn.Linear``, a module before it and a module after it."""
    from .layerwise import Plan

    # Tracing runs forward's Python with real buffers (the caller's state guard puts
    # them back); one that writes a buffer is not a chain of pure layers.
    buffers = list(model.buffers())
    versions = [b._version for b in buffers]
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - control flow on values, unsupported code: the vmap path
        return f"not traceable by torch.fx ({type(e).__name__})"
    if [b._version for b in buffers] != versions:
        return "the forward writes a buffer"
    nodes = list(gm.graph.nodes)
    if sum(n.op == "placeholder" for n in nodes) != 1:
        return "a forward with other than one input"
    modules = dict(gm.named_modules())
    first = next((i for i, n in enumerate(nodes) if n.op == "call_module"
                  and type(modules[n.target]) is nn.Linear), None)
    if first is None:
        return "no Linear layer"
    for n in nodes[:first]:
        why = _head_node(n, modules, head_module)
        if why:
            return why
    lin_node = nodes[first]
    if len(lin_node.args) != 1 or lin_node.kwargs:
        return "a Linear called with more than its input"
    graph = fx.Graph()
    env: dict = {}
    for n in nodes[:first]:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[lin_node.args[0]])
    head = fx.GraphModule(gm, graph)

    tail, prev = [], lin_node
    for n in nodes[first + 1:]:
        if len(prev.users) != 1 or n not in prev.users:
            return "a branch after the first Linear (a node used twice, or a residual)"
        if n.op == "output":
            if n.args != (prev,):
                return "an output other than the last node"
            return Plan(head, linear(modules[lin_node.target]), tail)
        step = _tail_node(n, prev, modules, linear, module_step)
        if isinstance(step, str):
            return step
        tail.append(step)
        prev = n
    return "no output"


def _head_node(n: fx.Node, modules: dict, head_module: Callable) -> str | None:
    if n.op == "placeholder":
        return None
    if n.op == "call_module":
        return head_module(modules[n.target])
    if n.op == "call_function" and n.target in _HEAD_FUNCTIONS:
        return None
    if n.op == "call_method" and n.target in _HEAD_METHODS:
        return None
    return f"{n.op} {getattr(n.target, '__name__', n.target)} before the first Linear"


def _tail_node(n: fx.Node, prev: fx.Node, modules: dict, linear: Callable, module_step: Callable):
    others = [a for a in [*n.args[1:], *n.kwargs.values()] if isinstance(a, fx.Node)]
    if not n.args or n.args[0] is not prev or others:
        return f"{n.op} {getattr(n.target, '__name__', n.target)} takes more than the previous layer"
    rest, kwargs = n.args[1:], dict(n.kwargs)
    if n.op == "call_module":
        m = modules[n.target]
        if rest or kwargs:
            return f"{type(m).__name__} called with more than its input"
        return linear(m) if type(m) is nn.Linear else module_step(m)
    fn = n.target
    if n.op == "call_method":
        if fn in _ELEMENTWISE_METHODS and not rest and not kwargs:
            return _INPLACE[fn]
        fn = _SOFTMAX_METHODS.get(fn)
    elif n.op == "call_function":
        if fn in _ELEMENTWISE_FUNCTIONS:
            return _INPLACE.get(fn, fn) if not rest and not kwargs else _Bound(fn, rest, kwargs)
        if fn in _DROPOUT_FUNCTIONS:
            training = kwargs.get("training", rest[1] if len(rest) > 1 else True)
            return _identity if training is False else "dropout that is on (training=True)"
        fn = _SOFTMAX_FUNCTIONS.get(fn)
    else:
        fn = None
    if fn is None:
        return f"{n.op} {getattr(n.target, '__name__', n.target)} after the first Linear"
    dim = kwargs.pop("dim", rest[0] if rest else None)
    kwargs.pop("_stacklevel", None)  # recorded by the trace; only changes warnings
    if kwargs.get("dtype", None) is None:
        kwargs.pop("dtype", None)
    if dim not in (1, -1) or len(rest) > 1 or kwargs:
        return f"softmax over dim {dim}"
    return functools.partial(fn, dim=1)  # the features are dim 1 of the stack


def _identity(h: torch.Tensor) -> torch.Tensor:
    return h


class _Bound:
    """``fn(h, *args, **kwargs)``: the traced call with the stack as its tensor."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(h, *self.args, **self.kwargs)
