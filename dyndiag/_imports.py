"""Import strings of the command line: ``package.module:name`` or ``path/to/file.py:name``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

__all__ = ["resolve"]


def resolve(spec: str, option: str) -> object:
    """The object named by ``spec``; errors are ``ValueError`` naming ``option``.

    ``spec`` is ``MODULE:NAME`` where MODULE is an importable module
    (``mypkg.models``, searched from the current directory too) or a Python file
    (``models.py``, ``experiments/models.py``), and NAME an attribute of it
    (dotted for nested attributes: ``Models.small``).
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"{option} must be MODULE:NAME (e.g. mypkg.models:make_model or models.py:make_model), got {spec!r}")
    module_name, attr = spec.split(":")
    module = _module(module_name, option)
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{option}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _module(name: str, option: str):
    if name.endswith(".py") or "/" in name or "\\" in name:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"{option}: no Python file {name!r}")
        mod_name = f"_dyndiag_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look modules up here
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[mod_name]
            raise ValueError(f"{option}: importing {name!r} failed: {type(err).__name__}: {err}") from err
        return module
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: modules in the current directory are found
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise ValueError(f"{option}: cannot import module {name!r} ({err})") from err
    except Exception as err:
        raise ValueError(f"{option}: importing {name!r} failed: {type(err).__name__}: {err}") from err
