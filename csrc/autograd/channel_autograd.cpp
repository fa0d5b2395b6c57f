// Autograd-layer kernels of the pyprune ops: autograd for channel_gather / channel_scatter (Autograd key), and the
// version-counter bump of the in-place update_running_stats_ (ADInplaceOrView key).
//
// Each is the other's backward: d/dw gather(w) = scatter(grad) and d/dgrad scatter(grad) = gather(grad). Both
// backwards call back into the dispatcher (through pyprune/ops.h), so the graph they record is differentiable
// again (double backward).
// Written in C++ rather than with torch.library.register_autograd because a Python autograd kernel sits on every
// call's path, grad or not; these ops run in every layer forward (see docs/ARCHITECTURE.md for the numbers).
#include "pyprune/ops.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

namespace pyprune {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;

// save_for_backward takes undefined tensors for absent indices; turn them back into nullopt.
void save_indices(AutogradContext* ctx, const OptionalTensor& out_idx, const OptionalTensor& in_idx) {
  ctx->save_for_backward({out_idx.value_or(at::Tensor()), in_idx.value_or(at::Tensor())});
}

std::pair<OptionalTensor, OptionalTensor> saved_indices(AutogradContext* ctx) {
  const variable_list saved = ctx->get_saved_variables();
  auto optional = [](const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : OptionalTensor(); };
  return {optional(saved[0]), optional(saved[1])};
}

class ChannelGather : public torch::autograd::Function<ChannelGather> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& w, const OptionalTensor& out_idx,
                            const OptionalTensor& in_idx) {
    ctx->saved_data["full_shape"] = c10::IValue(w.sym_sizes());
    save_indices(ctx, out_idx, in_idx);
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::channel_gather(w, out_idx, in_idx);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto [out_idx, in_idx] = saved_indices(ctx);
    const std::vector<c10::SymInt> full_shape = ctx->saved_data["full_shape"].toSymIntVector();
    return {ops::channel_scatter_symint(grads[0], out_idx, in_idx, full_shape), at::Tensor(), at::Tensor()};
  }
};

class ChannelScatter : public torch::autograd::Function<ChannelScatter> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, const OptionalTensor& out_idx,
                            const OptionalTensor& in_idx, c10::SymIntArrayRef full_shape) {
    save_indices(ctx, out_idx, in_idx);
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::channel_scatter_symint(grad, out_idx, in_idx, full_shape);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto [out_idx, in_idx] = saved_indices(ctx);
    return {ops::channel_gather(grads[0], out_idx, in_idx), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor channel_gather_autograd(const at::Tensor& w, const OptionalTensor& out_idx, const OptionalTensor& in_idx) {
  return ChannelGather::apply(w, out_idx, in_idx);
}

at::Tensor channel_scatter_autograd(const at::Tensor& grad, const OptionalTensor& out_idx,
                                    const OptionalTensor& in_idx, c10::SymIntArrayRef full_shape) {
  return ChannelScatter::apply(grad, out_idx, in_idx, full_shape);
}

// In-place ops must bump the version counters of what they mutate, as aten's in-place ops do: autograd uses them to
// catch stale saved tensors, and caches keyed by tensor._version (DynamicOps in eval mode) rely on them.
void update_running_stats_bump_versions(c10::DispatchKeySet keys, at::Tensor& running_mean, at::Tensor& running_var,
                                        const at::Tensor& idx, const at::Tensor& mean, const at::Tensor& var) {
  {
    const at::AutoDispatchBelowADInplaceOrView below_inplace_or_view;
    ops::redispatch::update_running_stats_(keys & c10::after_ADInplaceOrView_keyset, running_mean, running_var, idx,
                                           mean, var);
  }
  torch::autograd::impl::bump_version(running_mean);
  torch::autograd::impl::bump_version(running_var);
}

}  // namespace
}  // namespace pyprune

TORCH_LIBRARY_IMPL(pyprune, Autograd, m) {
  m.impl("channel_gather", &pyprune::channel_gather_autograd);
  m.impl("channel_scatter", &pyprune::channel_scatter_autograd);
}

TORCH_LIBRARY_IMPL(pyprune, ADInplaceOrView, m) {
  m.impl("update_running_stats_", &pyprune::update_running_stats_bump_versions);
}
