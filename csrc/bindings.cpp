// The one bindings file of the pyprune channel ops: their schemas (all tagged pt2_compliant) and the per-device
// kernels, CPU always and CUDA when built with PYPRUNE_WITH_CUDA. Registered elsewhere:
//   * autograd (Autograd key) and the version bump of the in-place op (ADInplaceOrView key): csrc/autograd/;
//   * fake (meta) kernels: Python, pyprune/kernels/_ext_backend.py, which is why the library names that module.
// C++ callers use the typed functions of pyprune/ops.h (csrc/ops.cpp), which go through the dispatcher.
//
// Built two ways from the one source list csrc/sources.txt: as the Python extension pyprune._C (setup.py defines
// PYPRUNE_PYTHON_EXTENSION so that this file also provides the module init), and as the plain shared library
// pyprune_ops (CMakeLists.txt) for C++ users.
#include "pyprune/kernels.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>

TORCH_LIBRARY(pyprune, m) {
  m.set_python_module("pyprune.kernels._ext_backend");  // where the fake kernels are registered
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  // dtype / memory_format: write the result in that dtype and layout in the same pass (autocast, channels_last);
  // None = the input's dtype, contiguous.
  m.def("channel_gather(Tensor w, Tensor? out_idx, Tensor? in_idx, ScalarType? dtype=None, "
        "MemoryFormat? memory_format=None) -> Tensor",
        tags);
  m.def("channel_scatter(Tensor grad, Tensor? out_idx, Tensor? in_idx, SymInt[] full_shape, ScalarType? dtype=None, "
        "MemoryFormat? memory_format=None) -> Tensor",
        tags);
  m.def("update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor idx, Tensor mean, "
        "Tensor var) -> ()",
        tags);
  // Every tensor of a list in one call (CUDA: one launch); full_shapes concatenates the full shapes.
  m.def("channel_gather_many(Tensor[] tensors, Tensor?[] out_idx, Tensor?[] in_idx) -> Tensor[]", tags);
  m.def("channel_scatter_many(Tensor[] grads, Tensor?[] out_idx, Tensor?[] in_idx, SymInt[] full_shapes) -> Tensor[]",
        tags);
}

TORCH_LIBRARY_IMPL(pyprune, CPU, m) {
  m.impl("channel_gather", &pyprune::channel_gather_cpu);
  m.impl("channel_scatter", &pyprune::channel_scatter_cpu);
  m.impl("update_running_stats_", &pyprune::update_running_stats_cpu);
  m.impl("channel_gather_many", &pyprune::channel_gather_many_cpu);
  m.impl("channel_scatter_many", &pyprune::channel_scatter_many_cpu);
}

#ifdef PYPRUNE_WITH_CUDA
TORCH_LIBRARY_IMPL(pyprune, CUDA, m) {
  m.impl("channel_gather", &pyprune::channel_gather_cuda);
  m.impl("channel_scatter", &pyprune::channel_scatter_cuda);
  m.impl("update_running_stats_", &pyprune::update_running_stats_cuda);
  m.impl("channel_gather_many", &pyprune::channel_gather_many_cuda);
  m.impl("channel_scatter_many", &pyprune::channel_scatter_many_cuda);
}
#endif

#ifdef PYPRUNE_PYTHON_EXTENSION
#include <Python.h>

// `import pyprune._C` only has to load this library: the static registrations above do the work.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "pyprune._C",
                               "pyprune channel kernels; use them through torch.ops.pyprune or pyprune.kernels.", -1,
                               nullptr};
  return PyModule_Create(&module);
}
#endif
