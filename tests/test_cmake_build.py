"""The CMake build: configure, build libpyprune_ops and its C++ test, run ctest (what C++ users link)."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The venv's bin holds pip's ninja; put it on PATH for cmake.
ENV = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def run(*cmd):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=ENV)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_configure_build_ctest(tmp_path):
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja", path=ENV["PATH"]) else []
    configure = run("cmake", "-S", str(ROOT), "-B", str(build), *generator,
                    f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}")
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compiled = run("cmake", "--build", str(build), "--parallel", "2")
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    assert list(build.rglob("libpyprune_ops*")), "libpyprune_ops was not built"
    tested = run("ctest", "--test-dir", str(build), "--output-on-failure")
    assert tested.returncode == 0, tested.stdout[-3000:] + tested.stderr[-3000:]
    assert "100% tests passed" in tested.stdout
