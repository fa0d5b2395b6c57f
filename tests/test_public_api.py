"""pyprune's public surface: fifteen top-level names, mmrazor's spellings in pyprune.compat.mmrazor, the old
top-level names still working for one release with one DeprecationWarning each, and a light ``import pyprune``."""
import importlib
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import pyprune
import pyprune.compat.mmrazor as mmrazor

WORKFLOW = ["ChannelMutator", "trace_channel_units", "BaseAlgorithm", "ItePruneAlgorithm",
            "SequentialMutableChannelUnit", "L1MutableChannelUnit", "TaylorMutableChannelUnit", "compact_training",
            "GraphedTrainStep", "prune_to_budget", "save_pruned", "load_pruned", "PyPruneError", "ConfigError",
            "ChannelSelectionError"]
DOCS = Path(__file__).resolve().parents[1] / "docs"


def run_python(code: str, cwd: Path) -> str:
    script = cwd / "script.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_top_level_is_the_workflow_list():
    assert sorted(pyprune.__all__) == sorted(WORKFLOW)
    assert set(pyprune.__all__) <= set(dir(pyprune))
    assert not set(pyprune.__all__) & set(pyprune._MOVED)  # a name is either current or moved, never both


def test_each_top_level_name_imports_from_its_package_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in WORKFLOW:
            namespace = {}
            exec(f"from pyprune import {name}", namespace)
            value = namespace[name]
            assert value is getattr(importlib.import_module(pyprune._EXPORTS[name]), name), name
            assert value.__module__.startswith("pyprune."), (name, value.__module__)
        from pyprune import errors  # submodules still import through `from pyprune import ...`
        assert errors.PyPruneError is pyprune.PyPruneError
    with pytest.raises(AttributeError, match="'NoSuchThing'"):
        pyprune.NoSuchThing


def test_import_pyprune_does_not_import_torch(tmp_path):
    loaded = json.loads(run_python(
        "import json, sys\nimport pyprune, pyprune.compat\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m == 'pyprune._C')))\n",
        tmp_path))
    assert loaded == []


def test_every_moved_name_resolves_to_its_new_home_and_warns_once_at_the_users_line(tmp_path):
    # a fresh interpreter: in this one, an earlier access would already have spent a name's one warning
    code = '''import importlib, json, warnings
import pyprune
report = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from pyprune import SquentialMutableChannel  # line 6
    first = list(caught)
    for name, home in pyprune._MOVED.items():
        del caught[:]
        values = [getattr(pyprune, name), getattr(pyprune, name)]  # line 10
        values.append(getattr(importlib.import_module(home), name))
        report[name] = {"same": all(v is values[0] for v in values), "home": home,
                        "warnings": [(w.category.__name__, str(w.message), w.filename, w.lineno) for w in caught]}
report["from-import"] = [(w.category.__name__, str(w.message), w.filename, w.lineno) for w in first]
print(json.dumps(report))
'''
    report = json.loads(run_python(code, tmp_path))
    script = str(tmp_path / "script.py")
    assert report.pop("from-import") == [
        ["DeprecationWarning", "pyprune.SquentialMutableChannel is deprecated; import it from pyprune.compat.mmrazor",
         script, 6]]
    assert set(report) == set(pyprune._MOVED)
    for name, entry in report.items():
        assert entry["same"], name
        expected = [] if name == "SquentialMutableChannel" else [  # its warning was spent by the import above
            ["DeprecationWarning", f"pyprune.{name} is deprecated; import it from {entry['home']}", script, 10]]
        assert entry["warnings"] == expected, name


def test_compat_mmrazor_serves_pyprune_objects_and_every_mmrazor_spelling_moved_there():
    assert set(mmrazor.__all__) == set(mmrazor.MMRAZOR_MODULES)
    for name in mmrazor.__all__:
        if name in pyprune._EXPORTS:  # the workflow names are the same objects at the top level
            assert getattr(mmrazor, name) is getattr(pyprune, name), name
        else:
            assert pyprune._MOVED[name] == "pyprune.compat.mmrazor", name
    assert all(module.split(".")[0] in ("mmrazor", "mmengine") for module in mmrazor.MMRAZOR_MODULES.values())


def test_the_import_map_in_coming_from_mmrazor_lists_every_compat_name():
    page = (DOCS / "COMING_FROM_MMRAZOR.md").read_text()
    import_map = page[page.index("## Import map"):page.index("What behaves as in mmrazor")]
    missing = [name for name in mmrazor.__all__ if not re.search(rf"\b{name}\b", import_map)]
    assert missing == []
    assert "pyprune.compat.mmrazor" in import_map
