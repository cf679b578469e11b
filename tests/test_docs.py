"""The documentation site: it builds under --strict, its nav is complete, every public
name is in the API reference, and the runnable examples on its pages run."""

from __future__ import annotations

import importlib
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"
# Packages whose export tables are public API: ``dd.x`` and ``dd.probes.x``, ``dd.plot.x``...
PACKAGES = ("dyndiag", "dyndiag.curvature", "dyndiag.quantities", "dyndiag.probes",
            "dyndiag.landscape", "dyndiag.plot")


def _env() -> dict:
    return dict(os.environ, NO_MKDOCS_2_WARNING="1")


def _nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    if isinstance(node, dict):
        return [p for value in node.values() for p in _nav_pages(value)]
    return []


def _config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (site / "index.html").is_file()
    assert (site / "api" / "curvature" / "index.html").is_file()


def test_nav_pages_exist():
    config = _config()
    assert config.get("strict") is True
    pages = _nav_pages(config["nav"])
    assert pages, "mkdocs.yml has no nav"
    missing = [p for p in pages if not p.startswith(("http://", "https://")) and not (DOCS / p).is_file()]
    assert not missing, f"nav lists pages that do not exist: {missing}"
    assert len(pages) == len(set(pages)), "a page is listed twice in the nav"


def _documented_identifiers() -> list[str]:
    """Dotted paths of every ``::: path`` block in docs/api, with the ``members:`` they list."""
    out = []
    for page in sorted(API.glob("*.md")):
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^:::\s+([\w.]+)\s*$", line)
            if not m:
                continue
            out.append(m.group(1))
            j, in_members = i + 1, False
            while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                if re.match(r"^\s+members:\s*$", lines[j]):
                    in_members = True
                elif in_members and (mm := re.match(r"^\s+-\s+(\w+)\s*$", lines[j])):
                    out.append(f"{m.group(1)}.{mm.group(1)}")
                elif lines[j].strip():
                    in_members = False
                j += 1
    return out


def _resolve(path: str):
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def test_every_public_name_is_in_the_api_reference():
    identifiers = _documented_identifiers()
    assert identifiers, "docs/api has no ::: blocks"
    documented = {id(_resolve(p)) for p in identifiers}
    missing = []
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        names = set(getattr(pkg, "_EXPORTS", {})) | set(getattr(pkg, "__all__", ()))
        for name in sorted(names):
            if name.startswith("__"):
                continue
            obj = getattr(pkg, name)
            if isinstance(obj, type(sys)):  # an exported submodule: some page documents inside it
                if not any(p == obj.__name__ or p.startswith(obj.__name__ + ".") for p in identifiers):
                    missing.append(f"{package}.{name} (module)")
            elif id(obj) not in documented:
                missing.append(f"{package}.{name}")
    assert not missing, (
        "public names missing from the API reference (add a '::: module.name' block under docs/api/): "
        f"{missing}"
    )


def _code_block_after(page: Path, heading: str) -> str:
    text = page.read_text()
    start = text.index(heading)
    m = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert m, f"no python block after {heading!r} in {page}"
    return m.group(1)


@pytest.mark.parametrize(
    ("page", "heading", "expect"),
    [
        ("design.md", "## How to add a probe", "grad_sharpness"),
        ("quickstart.md", "## A plain PyTorch loop under a Monitor", "collapsed_fraction"),
    ],
)
def test_docs_examples_run(tmp_path, monkeypatch, capsys, page, heading, expect):
    # In this process (torch is loaded already): a subprocess per example doubled the
    # test's time on a busy 2-core machine. The global RNG is put back afterwards.
    from dyndiag.state import rng_state, set_rng_state

    code = _code_block_after(DOCS / page, heading)
    script = tmp_path / "example.py"
    script.write_text(code)
    monkeypatch.chdir(tmp_path)
    state = rng_state()
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        set_rng_state(state)
    assert expect in capsys.readouterr().out
