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
