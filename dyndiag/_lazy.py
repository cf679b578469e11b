"""Lazy exports (PEP 562): ``import dyndiag`` stays light; plotting and pandas load on use."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, table: dict[str, str]) -> tuple[Callable, Callable]:
    """``__getattr__`` and ``__dir__`` for a package exporting ``name -> submodule``.

    A name that maps to a submodule of the same name (``"plot": ".plot"``) is the
    submodule itself. Any other exported name must differ from every submodule's
    name: importing ``pkg.x`` binds ``pkg.x`` to the module, which would shadow a
    function ``x`` (tests/test_package.py checks this).
    """

    def __getattr__(name: str):
        try:
            module = table[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        mod = importlib.import_module(module, package)
        return mod if module.rsplit(".", 1)[-1] == name else getattr(mod, name)

    def __dir__() -> list[str]:
        return sorted(table)

    return __getattr__, __dir__
