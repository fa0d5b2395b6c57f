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

using OptionalDtype = std::optional<at::ScalarType>;
using OptionalFormat = std::optional<at::MemoryFormat>;

// What the backward of a converting op must write to land in its input's form: the input's dtype when the forward
// changed it, the input's channels_last layout when it had one (None = the defaults: same dtype, contiguous).
void save_input_form(AutogradContext* ctx, const at::Tensor& input, OptionalDtype dtype) {
  const bool converted = dtype.has_value() && *dtype != input.scalar_type();
  ctx->saved_data["dtype"] = converted ? c10::IValue(input.scalar_type()) : c10::IValue();
  const at::MemoryFormat format = input.is_contiguous() ? at::MemoryFormat::Contiguous : input.suggest_memory_format();
  ctx->saved_data["format"] = format != at::MemoryFormat::Contiguous ? c10::IValue(format) : c10::IValue();
}

std::pair<OptionalDtype, OptionalFormat> saved_input_form(AutogradContext* ctx) {
  const c10::IValue& dtype = ctx->saved_data["dtype"];
  const c10::IValue& format = ctx->saved_data["format"];
  return {dtype.isNone() ? OptionalDtype() : OptionalDtype(dtype.toScalarType()),
          format.isNone() ? OptionalFormat() : OptionalFormat(format.toMemoryFormat())};
}

class ChannelGather : public torch::autograd::Function<ChannelGather> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& w, const OptionalTensor& out_idx,
                            const OptionalTensor& in_idx, OptionalDtype dtype, OptionalFormat memory_format) {
    ctx->saved_data["full_shape"] = c10::IValue(w.sym_sizes());
    save_indices(ctx, out_idx, in_idx);
    save_input_form(ctx, w, dtype);
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::channel_gather(w, out_idx, in_idx, dtype, memory_format);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto [out_idx, in_idx] = saved_indices(ctx);
    const auto [dtype, format] = saved_input_form(ctx);
    const std::vector<c10::SymInt> full_shape = ctx->saved_data["full_shape"].toSymIntVector();
    return {ops::channel_scatter_symint(grads[0], out_idx, in_idx, full_shape, dtype, format), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class ChannelScatter : public torch::autograd::Function<ChannelScatter> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, const OptionalTensor& out_idx,
                            const OptionalTensor& in_idx, c10::SymIntArrayRef full_shape, OptionalDtype dtype,
                            OptionalFormat memory_format) {
    save_indices(ctx, out_idx, in_idx);
    save_input_form(ctx, grad, dtype);
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::channel_scatter_symint(grad, out_idx, in_idx, full_shape, dtype, memory_format);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto [out_idx, in_idx] = saved_indices(ctx);
    const auto [dtype, format] = saved_input_form(ctx);
    return {ops::channel_gather(grads[0], out_idx, in_idx, dtype, format), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor channel_gather_autograd(const at::Tensor& w, const OptionalTensor& out_idx, const OptionalTensor& in_idx,
                                   OptionalDtype dtype, OptionalFormat memory_format) {
  return ChannelGather::apply(w, out_idx, in_idx, dtype, memory_format);
}

at::Tensor channel_scatter_autograd(const at::Tensor& grad, const OptionalTensor& out_idx,
                                    const OptionalTensor& in_idx, c10::SymIntArrayRef full_shape, OptionalDtype dtype,
                                    OptionalFormat memory_format) {
  return ChannelScatter::apply(grad, out_idx, in_idx, full_shape, dtype, memory_format);
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
