#pragma once
// Internal: the per-device kernels of the pyprune ops, registered with the dispatcher in csrc/bindings.cpp. They
// skip the dispatcher and assume their device; C++ callers use the typed functions of pyprune/ops.h instead.
// Shapes and index conventions: pyprune/geometry.h.

#include "pyprune/geometry.h"
#include "pyprune/ops.h"

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <optional>
#include <vector>

namespace pyprune {

// weight [C_out, C_in, *rest] -> new [K_out, K_in, *rest] = weight[out_idx][:, in_idx], of `dtype` and in
// `memory_format` (default: weight's dtype, contiguous).
at::Tensor channel_gather_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& out_idx,
                              const std::optional<at::Tensor>& in_idx, std::optional<at::ScalarType> dtype,
                              std::optional<at::MemoryFormat> memory_format);
// grad [K_out, K_in, *rest] -> zero-filled full_shape tensor holding grad at the gathered places (of `dtype`, in
// `memory_format`; default: grad's dtype, contiguous).
at::Tensor channel_scatter_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& out_idx,
                               const std::optional<at::Tensor>& in_idx, c10::IntArrayRef full_shape,
                               std::optional<at::ScalarType> dtype, std::optional<at::MemoryFormat> memory_format);
// In place: running_mean[idx] = mean; running_var[idx] = var.
void update_running_stats_cpu(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& idx,
                              const at::Tensor& mean, const at::Tensor& var);
// One call for every tensor of a list (see ops.h); CUDA copies all of them in one kernel launch.
std::vector<at::Tensor> channel_gather_many_cpu(at::TensorList tensors, const OptionalTensorList& out_idx,
                                                const OptionalTensorList& in_idx);
std::vector<at::Tensor> channel_scatter_many_cpu(at::TensorList grads, const OptionalTensorList& out_idx,
                                                 const OptionalTensorList& in_idx, c10::IntArrayRef full_shapes);

// The per-tensor CPU work behind the single and the multi-tensor ops, for arguments already checked into `geo`;
// `op` names the caller in index range errors.
at::Tensor gather_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& out_idx,
                      const std::optional<at::Tensor>& in_idx, const ChannelGeometry& geo, const char* op);
at::Tensor scatter_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& out_idx,
                       const std::optional<at::Tensor>& in_idx, const ChannelGeometry& geo, const char* op);
// The converting forms (another dtype and / or memory format; strided reads), channel_gather_cast_cpu.cpp.
at::Tensor gather_converting_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& out_idx,
                                 const std::optional<at::Tensor>& in_idx, const ChannelGeometry& geo,
                                 at::ScalarType dtype, at::MemoryFormat memory_format, const char* op);
at::Tensor scatter_converting_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& out_idx,
                                  const std::optional<at::Tensor>& in_idx, const ChannelGeometry& geo,
                                  at::ScalarType dtype, at::MemoryFormat memory_format, const char* op);

#ifdef PYPRUNE_WITH_CUDA
at::Tensor channel_gather_cuda(const at::Tensor& weight, const std::optional<at::Tensor>& out_idx,
                               const std::optional<at::Tensor>& in_idx, std::optional<at::ScalarType> dtype,
                               std::optional<at::MemoryFormat> memory_format);
at::Tensor channel_scatter_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& out_idx,
                                const std::optional<at::Tensor>& in_idx, c10::IntArrayRef full_shape,
                                std::optional<at::ScalarType> dtype, std::optional<at::MemoryFormat> memory_format);
at::Tensor gather_converting_cuda(const at::Tensor& weight, const std::optional<at::Tensor>& out_idx,
                                  const std::optional<at::Tensor>& in_idx, const ChannelGeometry& geo,
                                  at::ScalarType dtype, at::MemoryFormat memory_format);
at::Tensor scatter_converting_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& out_idx,
                                   const std::optional<at::Tensor>& in_idx, const ChannelGeometry& geo,
                                   at::ScalarType dtype, at::MemoryFormat memory_format);
void update_running_stats_cuda(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& idx,
                               const at::Tensor& mean, const at::Tensor& var);
std::vector<at::Tensor> channel_gather_many_cuda(at::TensorList tensors, const OptionalTensorList& out_idx,
                                                 const OptionalTensorList& in_idx);
std::vector<at::Tensor> channel_scatter_many_cuda(at::TensorList grads, const OptionalTensorList& out_idx,
                                                  const OptionalTensorList& in_idx, c10::IntArrayRef full_shapes);
#endif

}  // namespace pyprune
