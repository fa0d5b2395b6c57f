"""The C++ builds: csrc/sources.txt lists every source once (setup.py and CMake read it); CMake configure, build of
libpyprune_ops and its C++ test, ctest (what C++ users link)."""
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


def listed_sources():
    lines = (line.split("#", 1)[0].strip() for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines())
    return [line for line in lines if line]


def test_source_list_names_every_source_once():
    """A kernel file missing from csrc/sources.txt would silently not be built (its op never registered)."""
    listed = listed_sources()
    assert len(listed) == len(set(listed)), "csrc/sources.txt lists a file twice"
    on_disk = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu"))
    assert sorted(listed) == on_disk

