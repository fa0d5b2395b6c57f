"""The package edges of docs/ARCHITECTURE.md hold: each package imports only packages of lower layers; the
application lives in pyprune.app, the library never imports it, and the old application paths still resolve."""
import ast
import importlib
import pathlib
import subprocess
import sys
import warnings

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


# docs/ARCHITECTURE.md's import rule, lowest layer first: a package may import packages of lower layers only
LAYERS = [
    {"errors"},
    {"registry", "channels", "utils"},
    {"kernels"},
    {"ops"},
    {"graphs", "tracing"},
    {"units"},
    {"mutators"},
    {"budget"},
    {"algorithms"},
    {"compat", "app"},
]
LAYER_OF = {package: level for level, packages in enumerate(LAYERS) for package in packages}


def _package(path: pathlib.Path) -> str:
    first = path.relative_to(LIBRARY_ROOT).parts[0]
    return first[:-3] if first.endswith(".py") else first


def _imported_package(name: str):
    parts = name.split(".")
    return parts[1] if parts[0] == "pyprune" and len(parts) > 1 else None


def test_every_package_imports_only_lower_layers():
    offenders = []
    for path in LIBRARY_ROOT.rglob("*.py"):
        package = _package(path)
        if package in ("__init__", "__main__"):  # the top level serves names from anywhere, lazily
            continue
        assert package in LAYER_OF, f"package {package!r} has no layer in the import rule (docs/ARCHITECTURE.md)"
        for name in _imported_modules(path):
            target = _imported_package(name)
            if target is None or target == package or target == "_C":
                continue
            if target not in LAYER_OF or LAYER_OF[target] >= LAYER_OF[package]:
                offenders.append(f"{path.relative_to(LIBRARY_ROOT)} imports {name}")
    assert not offenders, offenders


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


MOVED = [
    ("pyprune.training.job", "pyprune.app.training.job"),
    ("pyprune.training.config", "pyprune.app.training.config"),
    ("pyprune.data.synthetic", "pyprune.app.data.synthetic"),
    ("pyprune.bench.tables", "pyprune.app.bench.tables"),
    ("pyprune.cli", "pyprune.app.cli"),
]


def test_old_application_paths_resolve_to_the_same_module_with_a_warning():
    # a fresh interpreter (one for all pairs): in this one the old names may already be cached by another test
    code = (
        "import warnings, importlib\n"
        "warnings.simplefilter('always')\n"
        f"for old_name, new_name in {MOVED!r}:\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        old = importlib.import_module(old_name)\n"
        "    assert old is importlib.import_module(new_name), (old_name, new_name)\n"
        "    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]\n"
        "    assert any(old_name in m and new_name in m for m in messages), (old_name, messages)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_from_import_of_an_old_package_gives_its_names():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from pyprune.training import load_pruned_run  # noqa: F401  (old spelling of a moved package)
    assert load_pruned_run is importlib.import_module("pyprune.app.training.pruned_run").load_pruned_run
