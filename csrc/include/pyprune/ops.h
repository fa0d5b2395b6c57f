#pragma once
// The C++ front door of the pyprune channel ops: one typed function per op, as torchvision's vision::ops. Each
// calls the dispatcher (its typed handle is looked up once), so the device kernel, autograd and every other
// registered dispatch key apply, exactly as for torch.ops.pyprune.* in Python. Schemas (csrc/bindings.cpp):
//   pyprune::channel_gather(Tensor w, Tensor? out_idx, Tensor? in_idx, ScalarType? dtype=None,
//                           MemoryFormat? memory_format=None) -> Tensor
//   pyprune::channel_scatter(Tensor grad, Tensor? out_idx, Tensor? in_idx, SymInt[] full_shape,
//                            ScalarType? dtype=None, MemoryFormat? memory_format=None) -> Tensor
//   pyprune::update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor idx, Tensor mean,
//                                  Tensor var) -> ()
//   pyprune::channel_gather_many(Tensor[] tensors, Tensor?[] out_idx, Tensor?[] in_idx) -> Tensor[]
//   pyprune::channel_scatter_many(Tensor[] grads, Tensor?[] out_idx, Tensor?[] in_idx, SymInt[] full_shapes)
//                                 -> Tensor[]
// Shapes and index conventions: pyprune/geometry.h and docs/ARCHITECTURE.md ("pyprune.kernels"). Link the
// library that registers the ops (CMake target pyprune_ops, or load the Python extension pyprune._C) first.

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/MemoryFormat.h>
#include <c10/core/ScalarType.h>
#include <c10/core/SymIntArrayRef.h>
#include <c10/util/ArrayRef.h>
#include <optional>

namespace pyprune {

// The C++ type of a Tensor?[] argument: one optional index per tensor of the list.
using OptionalTensorList = c10::List<std::optional<at::Tensor>>;

namespace ops {

// weight [C_out, C_in, *rest] -> new [K_out, K_in, *rest] = weight[out_idx][:, in_idx]; in_idx is [K_in] or, for
// grouped convolutions, [G, K_in] per-group local columns. The result has `dtype` (a conversion between float32,
// float64, float16 and bfloat16; default weight's) and `memory_format` (contiguous by default; channels_last(_3d)
// for rank 4 (5)), written in one pass. Differentiable w.r.t. weight (the gradient comes back in weight's dtype).
at::Tensor channel_gather(const at::Tensor& weight, const std::optional<at::Tensor>& out_idx = std::nullopt,
                          const std::optional<at::Tensor>& in_idx = std::nullopt,
                          std::optional<at::ScalarType> dtype = std::nullopt,
                          std::optional<at::MemoryFormat> memory_format = std::nullopt);

// Inverse of channel_gather: zeros of full_shape holding grad [K_out, K_in, *rest] at the gathered places, of
// `dtype` and in `memory_format` (default: grad's dtype, contiguous).
at::Tensor channel_scatter(const at::Tensor& grad, const std::optional<at::Tensor>& out_idx,
                           const std::optional<at::Tensor>& in_idx, c10::IntArrayRef full_shape,
                           std::optional<at::ScalarType> dtype = std::nullopt,
                           std::optional<at::MemoryFormat> memory_format = std::nullopt);
at::Tensor channel_scatter_symint(const at::Tensor& grad, const std::optional<at::Tensor>& out_idx,
                                  const std::optional<at::Tensor>& in_idx, c10::SymIntArrayRef full_shape,
                                  std::optional<at::ScalarType> dtype = std::nullopt,
                                  std::optional<at::MemoryFormat> memory_format = std::nullopt);

// In place: running_mean[idx] = mean; running_var[idx] = var (1-D; idx int64 [K]; mean / var [K]).
void update_running_stats_(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& idx,
                           const at::Tensor& mean, const at::Tensor& var);

// channel_gather for every tensor of a list at once (one kernel launch on CUDA): result n = channel_gather(
// tensors[n], out_idx[n], in_idx[n]). All tensors on one device; out_idx and in_idx have one entry per tensor.
// Differentiable: output n's gradient scatters back to tensors[n].
std::vector<at::Tensor> channel_gather_many(at::TensorList tensors, const OptionalTensorList& out_idx,
                                            const OptionalTensorList& in_idx);

// channel_scatter for every gradient of a list: full_shapes is the concatenation of the full shapes, the n-th
// having grads[n].dim() entries.
std::vector<at::Tensor> channel_scatter_many(at::TensorList grads, const OptionalTensorList& out_idx,
                                             const OptionalTensorList& in_idx, c10::IntArrayRef full_shapes);
std::vector<at::Tensor> channel_scatter_many_symint(at::TensorList grads, const OptionalTensorList& out_idx,
                                                    const OptionalTensorList& in_idx,
                                                    c10::SymIntArrayRef full_shapes);

// For kernels that continue a dispatch (as at::redispatch::): skip the keys that `keys` no longer holds.
namespace redispatch {
void update_running_stats_(c10::DispatchKeySet keys, at::Tensor& running_mean, at::Tensor& running_var,
                           const at::Tensor& idx, const at::Tensor& mean, const at::Tensor& var);
}  // namespace redispatch

}  // namespace ops
}  // namespace pyprune
