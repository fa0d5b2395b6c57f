"""Build and install pyprune with its compiled channel kernels, the extension ``pyprune._C``.

    pip install --no-build-isolation -e ".[test]"     # torch must already be installed (it is the build dependency)

Environment knobs:
  PYPRUNE_NO_CUDA=1          build the C++ (CPU) kernels only, even when torch has CUDA and nvcc is present.
  CUDA_HOME                  CUDA toolkit to compile with; when unset we prefer /usr/local/cuda-<torch's CUDA>.
  TORCH_CUDA_ARCH_LIST       GPU architectures (default "8.0;9.0": A100 and H100/H200).
  MAX_JOBS                   parallel compile jobs (ninja).
"""
import os
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _prefer_matching_cuda_home() -> None:
    """torch guesses CUDA_HOME from the first ``nvcc`` on PATH, which may be a wrapper in /usr/local/bin (it then
    guesses /usr/local). Point it at the toolkit matching torch's CUDA version before cpp_extension reads it."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import torch

    if not torch.version.cuda:
        return
    for candidate in (f"/usr/local/cuda-{torch.version.cuda}", "/usr/local/cuda"):
        if (Path(candidate) / "bin" / "nvcc").exists():
            os.environ["CUDA_HOME"] = candidate
            return


_prefer_matching_cuda_home()
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402  (after the CUDA_HOME fix: cpp_extension reads it at import)
from torch.utils import cpp_extension  # noqa: E402


def _version() -> str:
    text = (ROOT / "pyprune" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def _with_cuda() -> bool:
    if os.environ.get("PYPRUNE_NO_CUDA", "0") not in ("", "0"):
        return False
    return bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None and \
        (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists()


def _sources() -> tuple:
    """(C++ sources, CUDA sources) from csrc/sources.txt, the list CMakeLists.txt reads too."""
    lines = (line.split("#", 1)[0].strip() for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines())
    paths = [line for line in lines if line]
    return [p for p in paths if not p.endswith(".cu")], [p for p in paths if p.endswith(".cu")]


def _extension():
    cpu_sources, cuda_sources = _sources()
    macros = [("PYPRUNE_PYTHON_EXTENSION", None)]
    cxx_flags = ["-O3", "-g0", "-fvisibility=hidden"]  # cpp_extension picks the C++ standard torch needs
    common = dict(name="pyprune._C", include_dirs=[str(ROOT / "csrc" / "include")])
    if _with_cuda():
        print(f"pyprune: building CPU + CUDA kernels (CUDA_HOME={cpp_extension.CUDA_HOME}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
        return cpp_extension.CUDAExtension(
            sources=cpu_sources + cuda_sources, define_macros=macros + [("PYPRUNE_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            **common)
    print("pyprune: building CPU kernels only (no CUDA toolkit, torch without CUDA, or PYPRUNE_NO_CUDA=1)")
    return cpp_extension.CppExtension(sources=cpu_sources, define_macros=macros,
                                      extra_compile_args={"cxx": cxx_flags}, **common)


setup(
    name="pyprune",
    version=_version(),
    description="Structured channel pruning for PyTorch on fused C++/CUDA channel kernels",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["pyprune", "pyprune.*"]),
    install_requires=["torch", "tqdm", "matplotlib", "numpy"],
    extras_require={"test": ["pytest", "torchvision", "timm==1.0.31", "transformers>=5,<6"]},
    entry_points={"console_scripts": ["pyprune = pyprune.app.cli:main"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    zip_safe=False,
)
