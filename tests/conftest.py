"""Shared pytest fixtures: run kernel-backed tests on every backend.

The "ext" backend is skipped when the extension is not built, unless PYPRUNE_REQUIRE_EXT=1 (set by .ci/run), where a
missing extension is a failure rather than a silent skip.
"""
import os

import pytest
import torch

import pyprune.kernels as kernels

BACKENDS = ("ext", "torch")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
