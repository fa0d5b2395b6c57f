"""Shared pytest fixtures: run kernel-backed tests on every backend, seed every test.

The "ext" backend is skipped when the extension is not built, unless PYPRUNE_REQUIRE_EXT=1, where a missing
extension is a failure rather than a silent skip (scripts/setup.sh, which .ci/run runs, already refuses to finish
without the extension).

Where shared test code lives: models that several test files build in tests/models.py, other shared helpers
(markers, the layer-case table, slicing references) in tests/helpers.py, fixtures here. Test files import those by
module name (``from models import SmallNet``) and never import each other. That works because tests/ has no
``__init__.py``: pytest's default ``prepend`` import mode puts tests/ on ``sys.path`` for this conftest and for
every test module in it (tests/ops/ is a package, so its modules are ``ops.test_*`` with tests/ as their root).
"""
import ctypes
import gc
import os

import pytest
import torch

import pyprune.kernels as kernels

BACKENDS = ("ext", "torch")


def _extension_available() -> bool:
    return getattr(kernels, "extension_available", lambda: False)()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test body with ``pyprune.kernels`` switched to each backend in turn."""
    name = request.param
    if name == "ext" and not _extension_available():
        if os.environ.get("PYPRUNE_REQUIRE_EXT") == "1":
            pytest.fail("PYPRUNE_REQUIRE_EXT=1 but the pyprune._C extension is not built")
        pytest.skip("pyprune._C extension not built")
    with kernels.use_backend(name):
        yield name


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_cpu_thread():
    """One torch CPU thread for a whole test module (``pytestmark = pytest.mark.usefixtures("one_cpu_thread")``),
    restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



# After a test that left the process large (the torchvision sweep builds models of up to 640M parameters), hand the
# freed memory back to the system. Without this, glibc keeps the freed heap of one big model and the next one
# lands elsewhere: the suite's resident memory only ever grew, to 18 GB. Checked from /proc (cheap); the collection
# and trim run only above the threshold, so the small tests pay nothing.
TRIM_ABOVE_BYTES = 1 << 31
try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc: nothing to trim
    _malloc_trim = None


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def pytest_runtest_teardown(item, nextitem):
    if _malloc_trim is not None and os.path.exists("/proc/self/statm") and _resident_bytes() > TRIM_ABOVE_BYTES:
        gc.collect()
        _malloc_trim(0)
