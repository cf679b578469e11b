"""The package's public surface: every exported name resolves to what it promises."""

import importlib
import pkgutil
import subprocess
import sys
import types

import dyndiag

SUBPACKAGES = {"plot", "datasets", "probes", "quantities", "landscape"}


def test_every_export_resolves_and_no_submodule_shadows_a_function():
    # Import every submodule first: that is when a same-named function would be shadowed.
    for info in pkgutil.walk_packages(dyndiag.__path__, "dyndiag."):
        if not info.name.endswith(".cli"):
            importlib.import_module(info.name)
    for pkg in (dyndiag, dyndiag.curvature, dyndiag.plot, dyndiag.probes, dyndiag.quantities, dyndiag.landscape):
        for name in pkg.__all__:
            value = getattr(pkg, name)
            if pkg is dyndiag and name in SUBPACKAGES:
                assert isinstance(value, types.ModuleType), name
            else:
                assert not isinstance(value, types.ModuleType), f"{pkg.__name__}.{name} is a module"
            assert getattr(pkg, name) is value  # stable on the second access


def test_import_does_not_load_plotting_or_pandas():
    code = "import sys, dyndiag; print(any(m.split('.')[0] in ('matplotlib', 'seaborn', 'pandas') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_ci_runs_exactly_the_readme_test_command():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ci_lines = [l for l in (root / ".ci" / "run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    assert len(ci_lines) == 1
    assert ci_lines[0] in (root / "README.md").read_text().splitlines()


def test_no_probe_module_refers_to_the_monitor():
    # Probes see a RunContext and a StepContext; the Monitor is one of two drivers (analyze is the other).
    import ast
    from pathlib import Path

    for path in sorted((Path(dyndiag.__file__).parent / "probes").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.arg):
                names = [node.arg]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
            assert not any("monitor" in n.lower() for n in names), f"{path.name}:{node.lineno} refers to {names}"


def _internal_imports():
    """``(importing module, imported module)`` for every dyndiag import, function-level ones included."""
    import ast
    from pathlib import Path

    root = Path(dyndiag.__file__).parent
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        package = parts[:-1]
        module = ".".join(parts if parts[-1] != "__init__" else parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                file = root.parent / name.replace(".", "/")
                if name.startswith("dyndiag.") and (file.with_suffix(".py").exists() or file.is_dir()):
                    yield module, name


def _layer(module: str) -> str:
    """``dyndiag.curvature.lanczos`` -> ``dyndiag.curvature``; top-level modules are their own layer."""
    return ".".join(module.split(".")[:2])


def test_layers_import_no_private_module_of_another_layer_and_form_no_cycle():
    edges = set()
    for source, target in _internal_imports():
        a, b = _layer(source), _layer(target)
        if a == b:
            continue
        private = [p for p in target.split(".")[2:] if p.startswith("_") and p != "__init__"]
        assert not private, f"{source} imports {target}, a private module of another layer"
        edges.add((a, b))
    graph: dict = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    # Depth-first search for a cycle between layers.
    state: dict = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != "open", f"import cycle between layers: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in list(graph):
        if node not in state:
            visit(node, [node])
    assert ("dyndiag.curvature", "dyndiag.probes") not in edges  # a sanity check that edges were found
    assert ("dyndiag.probes", "dyndiag.quantities") in edges


def test_python_dash_m_runs_the_command():
    out = subprocess.run([sys.executable, "-m", "dyndiag", "--help"], capture_output=True, text=True, check=True)
    assert "Usage: dyndiag" in out.stdout
    for command in ("demo", "analyze", "plot", "landscape"):
        assert command in out.stdout
    bad = subprocess.run([sys.executable, "-m", "dyndiag", "plot", "/nonexistent/run"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.startswith("dyndiag: error:")
