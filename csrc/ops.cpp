// The typed C++ front door declared in pyprune/ops.h: each function looks its operator up in the dispatcher once
// (a function-local static, so after the library's static registrations) and calls it through that typed handle.
#include "pyprune/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace pyprune {
namespace ops {
namespace {

using OptionalTensor = std::optional<at::Tensor>;
using OptionalDtype = std::optional<at::ScalarType>;
using OptionalFormat = std::optional<at::MemoryFormat>;
using GatherSignature = at::Tensor(const at::Tensor&, const OptionalTensor&, const OptionalTensor&, OptionalDtype,
                                   OptionalFormat);
using ScatterSignature = at::Tensor(const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                                    c10::SymIntArrayRef, OptionalDtype, OptionalFormat);
using GatherManySignature = std::vector<at::Tensor>(at::TensorList, const OptionalTensorList&,
                                                    const OptionalTensorList&);
using ScatterManySignature = std::vector<at::Tensor>(at::TensorList, const OptionalTensorList&,
                                                     const OptionalTensorList&, c10::SymIntArrayRef);
using RunningStatsSignature = void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

const c10::TypedOperatorHandle<RunningStatsSignature>& running_stats_op() {
  static const auto op = find_op<RunningStatsSignature>("pyprune::update_running_stats_");
  return op;
}

}  // namespace

at::Tensor channel_gather(const at::Tensor& weight, const OptionalTensor& out_idx, const OptionalTensor& in_idx,
                          OptionalDtype dtype, OptionalFormat memory_format) {
  static const auto op = find_op<GatherSignature>("pyprune::channel_gather");
  return op.call(weight, out_idx, in_idx, dtype, memory_format);
}

at::Tensor channel_scatter_symint(const at::Tensor& grad, const OptionalTensor& out_idx, const OptionalTensor& in_idx,
                                  c10::SymIntArrayRef full_shape, OptionalDtype dtype, OptionalFormat memory_format) {
  static const auto op = find_op<ScatterSignature>("pyprune::channel_scatter");
  return op.call(grad, out_idx, in_idx, full_shape, dtype, memory_format);
}

at::Tensor channel_scatter(const at::Tensor& grad, const OptionalTensor& out_idx, const OptionalTensor& in_idx,
                           c10::IntArrayRef full_shape, OptionalDtype dtype, OptionalFormat memory_format) {
  return channel_scatter_symint(grad, out_idx, in_idx, c10::fromIntArrayRefSlow(full_shape), dtype, memory_format);
}

void update_running_stats_(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& idx,
                           const at::Tensor& mean, const at::Tensor& var) {
  running_stats_op().call(running_mean, running_var, idx, mean, var);
}

std::vector<at::Tensor> channel_gather_many(at::TensorList tensors, const OptionalTensorList& out_idx,
                                            const OptionalTensorList& in_idx) {
  static const auto op = find_op<GatherManySignature>("pyprune::channel_gather_many");
  return op.call(tensors, out_idx, in_idx);
}

std::vector<at::Tensor> channel_scatter_many_symint(at::TensorList grads, const OptionalTensorList& out_idx,
                                                    const OptionalTensorList& in_idx,
                                                    c10::SymIntArrayRef full_shapes) {
  static const auto op = find_op<ScatterManySignature>("pyprune::channel_scatter_many");
  return op.call(grads, out_idx, in_idx, full_shapes);
}

std::vector<at::Tensor> channel_scatter_many(at::TensorList grads, const OptionalTensorList& out_idx,
                                             const OptionalTensorList& in_idx, c10::IntArrayRef full_shapes) {
  return channel_scatter_many_symint(grads, out_idx, in_idx, c10::fromIntArrayRefSlow(full_shapes));
}

void redispatch::update_running_stats_(c10::DispatchKeySet keys, at::Tensor& running_mean, at::Tensor& running_var,
                                       const at::Tensor& idx, const at::Tensor& mean, const at::Tensor& var) {
  running_stats_op().redispatch(keys, running_mean, running_var, idx, mean, var);
}

}  // namespace ops
}  // namespace pyprune
