"""Diagonal blocks of a model operator: which of its parameters each block holds.

``blocks=`` on the estimators names a set of diagonal blocks of the operator (the
Hessian or GGN restricted to some of its parameters, rows and columns alike):

* ``"module"``: one block per module that owns parameters directly, named by its
  module path (``h.0.attn``); parameters of the root module are blocks of their own,
  named by the parameter's name.
* ``"layer"``: one block per repeated block of the model: the children of every
  outermost ``ModuleList``/``Sequential`` whose children (two or more, owning
  parameters) are all of one type (``h.0``, ``h.1``, ... of a transformer;
  ``layer1.0``, ... of a ResNet's stages). Parameters outside them (embeddings, the
  final norm, the head) go to blocks named by their module path cut to the depth of
  the repeated blocks' container (``wte``, ``ln_f``; ``transformer.wte``, ``lm_head``
  on a Hugging Face GPT-2). A model without repeated blocks gets one block per
  top-level module.
* ``{name: glob or [glob, ...]}``: block ``name`` holds the parameters whose names
  (``named_parameters()``) match any of its globs (``fnmatch``, case-sensitive);
  blocks may overlap, parameters matched by none are in no block, and a glob that
  matches none of the operator's parameters is a ``ValueError``. Blocks keep the
  dict's order.
* a callable ``param_name -> block name`` (a ``str``, or ``None`` to leave the
  parameter out).

Blocks come in model order (the order of their first parameter) except for a dict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..evaluation import match_names

__all__ = ["Block", "BlockSpec", "MODES", "resolve_blocks"]

BlockSpec = str | Mapping[str, str | Sequence[str]] | Callable[[str], str | None]

#: The named ways to cut an operator into blocks.
MODES = ("module", "layer")


@dataclass(frozen=True, eq=False)
class Block:
    """One diagonal block: its ``name``, its parameters' names (operator order) and
    ``index``, the ``(d,)`` int64 positions of its coordinates in the operator's flat
    vectors (on the operator's device)."""

    name: str
    params: tuple[str, ...]
    index: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.index.numel())


def resolve_blocks(op: object, blocks: object) -> list[Block]:
    """The diagonal blocks ``blocks`` names on ``op`` (see the module docstring).

    ``op`` must be an operator over named model parameters: ``names`` and ``params``
    (a :class:`~dyndiag.HessianOperator`, :class:`~dyndiag.GGNOperator`, or a
    :class:`~dyndiag.curvature.PreconditionedOperator` of one); ``"layer"`` also
    needs its ``model``.
    """
    names, params = getattr(op, "names", None), getattr(op, "params", None)
    if names is None or params is None:
        raise TypeError(
            "blocks= needs an operator over named model parameters (HessianOperator, GGNOperator "
            f"or a PreconditionedOperator of one), got {type(op).__name__}"
        )
    if getattr(op, "shards", None) is not None:
        raise ValueError("blocks= is not supported on an FSDP-sharded operator (its vectors are local shards)")
    names = list(names)
    if isinstance(blocks, str):
        if blocks not in MODES:
            raise ValueError(f"blocks must be 'module', 'layer', a dict of name globs or a callable, got {blocks!r}")
        if blocks == "module":
            owner = {n: _module_path(n) or n for n in names}
        else:
            model = getattr(op, "model", None)
            if not isinstance(model, nn.Module):
                raise TypeError(
                    f"blocks='layer' needs the operator's model (op.model), which {type(op).__name__} lacks"
                )
            owner = _layers(model, names)
        members = _group(names, owner.get)
    elif isinstance(blocks, Mapping):
        members = _from_globs(names, blocks)
    elif callable(blocks):
        members = _group(names, _checked(blocks))
    else:
        raise TypeError(
            f"blocks must be 'module', 'layer', a dict of name globs or a callable, got {type(blocks).__name__}"
        )
    offsets, start = {}, 0
    for n, p in zip(names, params):
        offsets[n] = (start, start + p.numel())
        start += p.numel()
    device = params[0].device
    out = []
    for name, chosen in members.items():
        index = torch.cat([torch.arange(*offsets[n]) for n in chosen]).to(device)
        out.append(Block(name, tuple(chosen), index))
    return out


def _module_path(name: str) -> str:
    return name.rpartition(".")[0]


def _group(names: list[str], block_of: Callable[[str], str | None]) -> dict[str, list[str]]:
    members: dict[str, list[str]] = {}
    for n in names:
        b = block_of(n)
        if b is not None:
            members.setdefault(b, []).append(n)
    if not members:
        raise ValueError("blocks put none of the operator's parameters in a block")
    return members


def _checked(fn: Callable) -> Callable[[str], str | None]:
    def block_of(name: str) -> str | None:
        b = fn(name)
        if b is not None and not isinstance(b, str):
            raise TypeError(
                f"blocks callable must return a block name (str) or None, got {type(b).__name__} for {name!r}"
            )
        return b

    return block_of


def _from_globs(names: list[str], spec: Mapping) -> dict[str, list[str]]:
    if not spec:
        raise ValueError("blocks dict is empty: give {block name: [parameter-name glob, ...]}")
    members = {}
    for block, globs in spec.items():
        if not isinstance(block, str) or not block:
            raise TypeError(f"blocks dict keys must be non-empty block names (str), got {block!r}")
        globs = [globs] if isinstance(globs, str) else list(globs)
        if not globs:
            raise ValueError(f"blocks[{block!r}] holds no glob")
        members[block] = match_names(names, globs, f"blocks[{block!r}]")
    return members


def _repeated(module: nn.Module) -> bool:
    """A ``ModuleList``/``Sequential`` of two or more children of one type, holding parameters."""
    if not isinstance(module, (nn.ModuleList, nn.Sequential)):
        return False
    children = list(module.children())
    return len(children) >= 2 and len({type(c) for c in children}) == 1 and any(True for _ in module.parameters())


def _layers(model: nn.Module, names: list[str]) -> dict[str, str]:
    """``{parameter name: layer block}`` for ``blocks="layer"``."""
    containers: list[str] = []

    def visit(module: nn.Module, path: str) -> None:
        if _repeated(module):
            containers.append(path)
            return
        for child, sub in module.named_children():
            visit(sub, f"{path}.{child}" if path else child)

    visit(model, "")
    depth = min((c.count(".") + 1 for c in containers if c), default=1)
    owner = {}
    for n in names:
        parts = n.split(".")
        for c in containers:
            lead = c.split(".") if c else []
            if parts[: len(lead)] == lead and len(parts) > len(lead) + 1:
                owner[n] = ".".join(parts[: len(lead) + 1])
                break
        else:
            module = parts[:-1]
            owner[n] = ".".join(module[:depth]) if module else n
    return owner
