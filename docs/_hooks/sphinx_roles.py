"""mkdocs hook: render the Sphinx roles in dyndiag's docstrings as cross-references.

The docstrings are numpy style and refer to objects as ``:func:`dyndiag.trace```,
``:class:`~dyndiag.HessianOperator```, ``:meth:`matmat```. mkdocstrings renders
these as literal text; this hook turns them into ``<autoref>`` links (resolved by
mkdocs-autorefs to the API reference) through the lazy export tables, so
``dyndiag.eigenvalues`` links to ``dyndiag.curvature.lanczos.eigenvalues``. A
target that does not resolve stays plain code; links are ``optional``, so an
object missing from the reference never fails a ``--strict`` build.
"""

from __future__ import annotations

import html
import importlib
import re

_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|obj|exc):<code>(~?)([A-Za-z_][\w.]*)(\(\))?</code>")
_SHORT: dict[str, str] = {}


def _exports(module: str) -> dict[str, str]:
    try:
        return getattr(importlib.import_module(module), "_EXPORTS", {})
    except ImportError:
        return {}


def _resolve(target: str) -> str:
    """``dyndiag.x.y`` through the lazy tables to the defining module's path."""
    parts = target.split(".")
    if parts[0] != "dyndiag":
        head = _SHORT.get(parts[0])
        return "" if head is None else ".".join([head, *parts[1:]])
    module, rest = "dyndiag", parts[1:]
    while rest:
        table = _exports(module)
        part = rest[0]
        if part not in table:
            break
        sub = module + table[part] if table[part].startswith(".") else table[part]
        if sub.rsplit(".", 1)[-1] == part:  # the name is a submodule
            module, rest = sub, rest[1:]
        elif part in _exports(sub):  # re-exported from a subpackage's own table
            module = sub
        else:
            return ".".join([sub, *rest])
    return ".".join([module, *rest])


def on_config(config, **kwargs):
    # Short names (``grand_scores``, ``HessianOperator``) of every public object.
    for package in ("dyndiag", "dyndiag.curvature", "dyndiag.quantities", "dyndiag.probes",
                    "dyndiag.landscape", "dyndiag.plot"):
        for name in _exports(package):
            full = _resolve(f"{package}.{name}")
            if name[:1].isupper() or "." in full[len("dyndiag."):]:
                _SHORT.setdefault(name, full)
    for name in ("RecordWriter", "load_records", "load_arrays"):
        _SHORT.setdefault(name, f"dyndiag.records.{name}")
    for name in ("preserve_state", "rng_state", "set_rng_state"):
        _SHORT.setdefault(name, f"dyndiag.state.{name}")
    return config


def on_page_content(html_text: str, **kwargs) -> str:
    def link(m: re.Match) -> str:
        tilde, target, call = m.group(1), m.group(2), m.group(3) or ""
        shown = html.escape((target.rsplit(".", 1)[-1] if tilde else target) + call)
        full = _resolve(target)
        if not full:
            return f"<code>{shown}</code>"
        return f'<autoref identifier="{html.escape(full)}" optional><code>{shown}</code></autoref>'

    return _ROLE.sub(link, html_text)
