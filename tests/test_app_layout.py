"""The application lives in pyprune.app, the library never imports it, and the old paths still resolve (warning)."""
import ast
import importlib
import pathlib
import subprocess
import sys
import warnings

import pytest

import pyprune

LIBRARY_ROOT = pathlib.Path(pyprune.__file__).parent


def _imported_modules(path: pathlib.Path):
    """Absolute names of the pyprune modules a file imports (relative imports resolved against its package)."""
    package = ".".join(("pyprune",) + path.relative_to(LIBRARY_ROOT).parent.parts)
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_no_library_module_imports_the_application():
    offenders = []
    for path in LIBRARY_ROOT.rglob("*.py"):
        # __main__.py is `python -m pyprune`, the application's own entry point
        if path.relative_to(LIBRARY_ROOT).parts[0] in ("app", "__main__.py"):
            continue
        for name in _imported_modules(path):
            if name == "pyprune.app" or name.startswith("pyprune.app."):
                offenders.append(f"{path.relative_to(LIBRARY_ROOT)} imports {name}")
    assert not offenders, offenders


@pytest.mark.parametrize("old,new", [
    ("pyprune.training.job", "pyprune.app.training.job"),
    ("pyprune.training.config", "pyprune.app.training.config"),
    ("pyprune.data.synthetic", "pyprune.app.data.synthetic"),
    ("pyprune.bench.tables", "pyprune.app.bench.tables"),
    ("pyprune.cli", "pyprune.app.cli"),
])
def test_old_application_paths_resolve_to_the_same_module_with_a_warning(old, new):
    # a fresh interpreter: in this one the old name may already be cached by another test
    code = (
        "import warnings, importlib, sys\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({new!r})\n"
        "assert old is new, (old, new)\n"
        "messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]\n"
        f"assert any({old!r} in m and {new!r} in m for m in messages), messages\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_from_import_of_an_old_package_gives_its_names():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from pyprune.training import load_pruned_run  # noqa: F401  (old spelling of a moved package)
    assert load_pruned_run is importlib.import_module("pyprune.app.training.pruned_run").load_pruned_run
