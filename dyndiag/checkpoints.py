"""Read saved checkpoints for offline analysis: plain ``state_dict`` files,
training checkpoints that hold one (Lightning's included) and Hugging Face
checkpoint directories.

Files load with ``torch.load(..., weights_only=True)``: nothing pickled is executed
unless the caller says it trusts the file (``trust=True``, the CLI's
``--trust-checkpoint``). Keys that carry a wrapper's prefix (``model.``, ``net.``,
``module.``, ``_orig_mod.``, a LightningModule's attribute name) are matched to the
model by stripping it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .evaluation import unwrap

__all__ = ["Checkpoint", "load_checkpoint", "checkpoint_step", "match_state_dict", "strip_prefixes", "sort_checkpoints"]

#: Keys under which training checkpoints keep the model's weights, in the order tried.
STATE_KEYS = ("state_dict", "model_state_dict", "model")
#: Keys under which training checkpoints keep the optimizer's state_dict (Lightning:
#: a list, one per optimizer), in the order tried.
OPTIMIZER_KEYS = ("optimizer_states", "optimizer_state_dict", "optimizer")
#: Wrapper prefixes stripped when a state_dict's keys do not match the model's.
PREFIXES = ("model.", "net.", "module.", "_orig_mod.")
#: Weight files of a Hugging Face checkpoint directory, in the order tried.
HF_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class Checkpoint:
    """One loaded checkpoint.

    Attributes
    ----------
    path:
        Where it was read from (a file, or a Hugging Face checkpoint directory).
    state_dict:
        ``{name: tensor}`` as stored (on the CPU), wrapper prefixes not yet stripped.
    step:
        The training step it was taken at, or ``None`` when neither its name nor its
        contents say (see :func:`checkpoint_step`).
    optimizer_state:
        The optimizer's ``state_dict`` when the checkpoint carries one (under
        ``optimizer_states[0]`` — Lightning —, ``optimizer_state_dict`` or
        ``optimizer``; a Hugging Face directory's ``optimizer.pt``), else ``None``.
    """

    path: Path
    state_dict: dict[str, torch.Tensor]
    step: int | None
    optimizer_state: dict | None = None


def checkpoint_step(path: str | os.PathLike, contents: Mapping | None = None) -> int | None:
    """The step of a checkpoint: the last integer in its name (``model_step_120.pt``
    -> 120, ``epoch=3-step=450.ckpt`` -> 450, ``checkpoint-500/`` -> 500), else a
    ``global_step``/``step`` entry of ``contents`` (a training checkpoint's dict or a
    Hugging Face ``trainer_state.json``), else ``None``."""
    name = re.sub(r"\.(pt|pth|ckpt|bin|safetensors|tar)$", "", Path(path).name)
    numbers = re.findall(r"\d+", name)
    if numbers:
        return int(numbers[-1])
    for key in ("global_step", "step"):
        value = (contents or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def load_checkpoint(path: str | os.PathLike, *, trust: bool = False, map_location: str = "cpu") -> Checkpoint:
    """Load the model weights of one checkpoint.

    Parameters
    ----------
    path:
        A file saved with ``torch.save`` holding a ``state_dict``, or a dict holding
        one under ``state_dict`` (Lightning), ``model_state_dict`` or ``model``; or a
        Hugging Face checkpoint directory (``model.safetensors``, sharded safetensors
        with an index, or ``pytorch_model.bin``).
    trust:
        Allow unpickling arbitrary objects (``weights_only=False``). Only for files
        from a source you trust: unpickling can run code.
    map_location:
        Passed to ``torch.load``.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The file needs arbitrary pickled objects and ``trust`` is false (the message
        names ``--trust-checkpoint``), or it holds no recognisable weights.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        return _load_hf_dir(path, trust=trust, map_location=map_location)
    contents = _torch_load(path, trust=trust, map_location=map_location)
    mapping = contents if isinstance(contents, Mapping) else None
    return Checkpoint(path, _weights(contents, path), checkpoint_step(path, mapping), _optimizer_state(mapping))


def _optimizer_state(contents: Mapping | None) -> dict | None:
    for key in OPTIMIZER_KEYS:
        value = (contents or {}).get(key)
        if key == "optimizer_states" and isinstance(value, (list, tuple)) and value:
            value = value[0]
        if isinstance(value, Mapping) and "state" in value and "param_groups" in value:
            return dict(value)
    return None


def _torch_load(path: Path, *, trust: bool, map_location: str):
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as err:
        # torch's message for weights_only refusals is long; one line of it names the type.
        lines = [l.strip() for l in str(err).splitlines() if "Unsupported global" in l]
        if trust or not lines:  # not a refusal: the file is not a checkpoint at all
            raise ValueError(f"checkpoint {str(path)!r} is not a torch checkpoint: {str(err).strip()[:200]}") from err
        first = lines[0][:200]
        raise ValueError(
            f"checkpoint {str(path)!r} holds pickled objects that weights_only loading refuses ({first}); "
            "pass --trust-checkpoint (trust=True) only if you trust where the file came from"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"checkpoint {str(path)!r} is not a torch checkpoint: {err}") from err


def _weights(contents: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(contents, nn.Module):  # a whole pickled model (only with trust)
        return dict(contents.state_dict())
    if isinstance(contents, Mapping):
        if contents and all(isinstance(v, torch.Tensor) for v in contents.values()):
            return dict(contents)
        for key in STATE_KEYS:
            inner = contents.get(key)
            if isinstance(inner, nn.Module):
                return dict(inner.state_dict())
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        keys = sorted(map(str, contents))[:8]
        raise ValueError(
            f"checkpoint {str(path)!r} is a dict without model weights: expected a state_dict or one under "
            f"{list(STATE_KEYS)}; its keys are {keys}"
        )
    raise ValueError(f"checkpoint {str(path)!r} holds a {type(contents).__name__}, not a state_dict")


def _load_hf_dir(path: Path, *, trust: bool, map_location: str) -> Checkpoint:
    state = path / "trainer_state.json"
    contents = json.loads(state.read_text()) if state.is_file() else None
    step = checkpoint_step(path, contents)
    opt_file = path / "optimizer.pt"
    optimizer = None
    if opt_file.is_file():
        optimizer = _optimizer_state({"optimizer": _torch_load(opt_file, trust=trust, map_location=map_location)})
    for name in HF_FILES:
        f = path / name
        if not f.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(_hf_file(path / shard, trust=trust, map_location=map_location))
            return Checkpoint(path, sd, step, optimizer)
        return Checkpoint(path, _hf_file(f, trust=trust, map_location=map_location), step, optimizer)
    raise ValueError(f"checkpoint directory {str(path)!r} holds none of {list(HF_FILES)}")


def _hf_file(f: Path, *, trust: bool, map_location: str) -> dict[str, torch.Tensor]:
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(f), device=map_location)
    return _weights(_torch_load(f, trust=trust, map_location=map_location), f)


def match_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` with the keys of ``model.state_dict()``: as is if they match,
    else after stripping the wrapper prefixes that make them match (up to three
    stacked, such as ``module._orig_mod.``).

    A wrapped ``model`` (``torch.compile``, DDP) also takes the keys of the module
    inside, which get the wrapper's prefix back.

    Raises ``ValueError`` naming the missing and unexpected keys when no prefix does.
    """
    expected = set(model.state_dict())
    keys = set(state_dict)
    found = _strip(dict(state_dict), expected, depth=3)
    if found is not None:
        return {k: found[k] for k in expected}
    inner = unwrap(model)
    if inner is not model:
        # The wrapper's state_dict is the inner one's, in the same order, with a prefix.
        outer_keys = dict(zip(inner.state_dict(), model.state_dict()))
        found = _strip(dict(state_dict), set(outer_keys), depth=3)
        if found is not None:
            return {outer_keys[k]: found[k] for k in outer_keys}
    missing = sorted(expected - keys)
    unexpected = sorted(keys - expected)
    raise ValueError(
        f"checkpoint keys do not match the model ({len(missing)} missing, e.g. {missing[:3]}; "
        f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}), also after stripping a prefix "
        f"such as {list(PREFIXES)}"
    )


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor] | None:
    """``state_dict`` as is when its keys cover ``expected``, else with the wrapper
    prefixes stripped that make them (as :func:`match_state_dict`); ``None`` when none does."""
    return _strip(dict(state_dict), set(expected), depth=3)


def _strip(sd: dict, expected: set, depth: int) -> dict | None:
    """``sd`` with wrapper prefixes stripped (stacked ones too, e.g. DDP around
    ``torch.compile``: ``module._orig_mod.``) until its keys cover ``expected``."""
    if expected <= set(sd):
        return sd
    if depth == 0:
        return None
    firsts = {k.split(".", 1)[0] + "." for k in sd if "." in k}
    for prefix in list(PREFIXES) + sorted(firsts - set(PREFIXES)):  # then e.g. a LightningModule's attribute
        stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if stripped:
            found = _strip(stripped, expected, depth - 1)
            if found is not None:
                return found
    return None


def sort_checkpoints(paths: Sequence[str | os.PathLike]) -> list[tuple[int, Path]]:
    """``(step, path)`` in step order: the step from each name (:func:`checkpoint_step`
    without reading the file), else the position in ``paths``. Repeated steps raise
    ``ValueError``."""
    out = []
    for i, p in enumerate(paths):
        step = checkpoint_step(p)
        if step is None and Path(p).is_dir():
            step = _hf_step(Path(p))
        out.append((i if step is None else step, Path(p)))
    steps = [s for s, _ in out]
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    if repeated:
        clash = [str(p) for s, p in out if s == repeated[0]]
        raise ValueError(f"checkpoints {clash} have the same step {repeated[0]}; name them by step")
    return sorted(out, key=lambda sp: sp[0])


def _hf_step(path: Path) -> int | None:
    state = path / "trainer_state.json"
    if not state.is_file():
        return None
    return checkpoint_step(path, json.loads(state.read_text()))
