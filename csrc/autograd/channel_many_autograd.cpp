// Autograd (Autograd key) of the multi-tensor ops channel_gather_many / channel_scatter_many: as for the single
// ops (channel_autograd.cpp) each is the other's backward, output n's gradient going back to input n, and both
// backwards call the dispatcher again (pyprune/ops.h), so double backward works.
//
// Outputs that took no part in the loss have no gradient, and inputs may not require one: backward runs the
// opposite op once, on the pairs that have both, instead of materialising zero gradients for the rest.
#include "pyprune/ops.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace pyprune {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Indices are saved as 2N tensors (out_idx then in_idx; undefined for absent ones) so autograd checks their versions.
void save_indices(AutogradContext* ctx, const OptionalTensorList& out_idx, const OptionalTensorList& in_idx) {
  variable_list saved;
  saved.reserve(out_idx.size() + in_idx.size());
  for (const OptionalTensorList* list : {&out_idx, &in_idx}) {
    for (size_t n = 0; n < list->size(); ++n) {
      saved.push_back(list->get(n).value_or(at::Tensor()));
    }
  }
  ctx->save_for_backward(std::move(saved));
  ctx->set_materialize_grads(false);
}

// The backward of tensor n runs when its output got a gradient and its input needs one.
std::vector<size_t> pairs_with_gradient(AutogradContext* ctx, const variable_list& grads) {
  std::vector<size_t> pairs;
  for (size_t n = 0; n < grads.size(); ++n) {
    if (grads[n].defined() && ctx->needs_input_grad(n)) {
      pairs.push_back(n);
    }
  }
  return pairs;
}

// The saved out_idx / in_idx of the chosen pairs, as the optional lists the ops take.
std::pair<OptionalTensorList, OptionalTensorList> saved_indices(AutogradContext* ctx,
                                                                const std::vector<size_t>& pairs) {
  const variable_list saved = ctx->get_saved_variables();
  const size_t count = saved.size() / 2;
  auto optional = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
  OptionalTensorList out_idx, in_idx;
  for (size_t n : pairs) {
    out_idx.push_back(optional(saved[n]));
    in_idx.push_back(optional(saved[count + n]));
  }
  return {std::move(out_idx), std::move(in_idx)};
}

// Input gradients: results[k] goes to input pairs[k]; the others stay undefined (no gradient).
variable_list spread(const std::vector<at::Tensor>& results, const std::vector<size_t>& pairs, size_t inputs,
                     size_t non_tensor_args) {
  variable_list grads(inputs + non_tensor_args);
  for (size_t k = 0; k < pairs.size(); ++k) {
    grads[pairs[k]] = results[k];
  }
  return grads;
}

// Saves the full shapes of the gathered tensors, concatenated, and each one's rank (so backward can pick some).
void save_full_shapes(AutogradContext* ctx, at::TensorList tensors) {
  std::vector<c10::SymInt> shapes;
  std::vector<int64_t> ranks;
  for (const at::Tensor& t : tensors) {
    shapes.insert(shapes.end(), t.sym_sizes().begin(), t.sym_sizes().end());
    ranks.push_back(t.dim());
  }
  ctx->saved_data["full_shapes"] = c10::IValue(c10::SymIntArrayRef(shapes));
  ctx->saved_data["ranks"] = c10::IValue(ranks);
}

// The concatenated full shapes of the chosen pairs (channel_scatter_many's full_shapes argument).
std::vector<c10::SymInt> saved_full_shapes(AutogradContext* ctx, const std::vector<size_t>& pairs) {
  const std::vector<c10::SymInt> shapes = ctx->saved_data["full_shapes"].toSymIntVector();
  const std::vector<int64_t> ranks = ctx->saved_data["ranks"].toIntVector();
  std::vector<size_t> starts(ranks.size() + 1, 0);
  for (size_t n = 0; n < ranks.size(); ++n) {
    starts[n + 1] = starts[n] + static_cast<size_t>(ranks[n]);
  }
  std::vector<c10::SymInt> chosen;
  for (size_t n : pairs) {
    chosen.insert(chosen.end(), shapes.begin() + starts[n], shapes.begin() + starts[n + 1]);
  }
  return chosen;
}

// Output n is differentiable only when input n is: an output of a frozen tensor stays requires_grad=False, as it
// would after the single op.
variable_list mark_outputs(AutogradContext* ctx, at::TensorList inputs, variable_list outputs) {
  variable_list frozen;
  for (size_t n = 0; n < inputs.size(); ++n) {
    if (!inputs[n].requires_grad()) {
      frozen.push_back(outputs[n]);
    }
  }
  ctx->mark_non_differentiable(frozen);
  return outputs;
}

std::vector<at::Tensor> chosen_grads(const variable_list& grads, const std::vector<size_t>& pairs) {
  std::vector<at::Tensor> chosen;
  chosen.reserve(pairs.size());
  for (size_t n : pairs) {
    chosen.push_back(grads[n]);
  }
  return chosen;
}

class ChannelGatherMany : public torch::autograd::Function<ChannelGatherMany> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList tensors, const OptionalTensorList& out_idx,
                               const OptionalTensorList& in_idx) {
    save_full_shapes(ctx, tensors);
    save_indices(ctx, out_idx, in_idx);
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return mark_outputs(ctx, tensors, ops::channel_gather_many(tensors, out_idx, in_idx));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const std::vector<size_t> pairs = pairs_with_gradient(ctx, grads);
    constexpr size_t kNonTensorArgs = 2;  // out_idx, in_idx
    if (pairs.empty()) {
      return variable_list(grads.size() + kNonTensorArgs);
    }
    const auto [out_idx, in_idx] = saved_indices(ctx, pairs);
    const std::vector<at::Tensor> results =
        ops::channel_scatter_many_symint(chosen_grads(grads, pairs), out_idx, in_idx, saved_full_shapes(ctx, pairs));
    return spread(results, pairs, grads.size(), kNonTensorArgs);
  }
};

class ChannelScatterMany : public torch::autograd::Function<ChannelScatterMany> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList grads, const OptionalTensorList& out_idx,
                               const OptionalTensorList& in_idx, c10::SymIntArrayRef full_shapes) {
    save_indices(ctx, out_idx, in_idx);
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return mark_outputs(ctx, grads, ops::channel_scatter_many_symint(grads, out_idx, in_idx, full_shapes));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const std::vector<size_t> pairs = pairs_with_gradient(ctx, grads);
    constexpr size_t kNonTensorArgs = 3;  // out_idx, in_idx, full_shapes
    if (pairs.empty()) {
      return variable_list(grads.size() + kNonTensorArgs);
    }
    const auto [out_idx, in_idx] = saved_indices(ctx, pairs);
    return spread(ops::channel_gather_many(chosen_grads(grads, pairs), out_idx, in_idx), pairs, grads.size(),
                  kNonTensorArgs);
  }
};

std::vector<at::Tensor> channel_gather_many_autograd(at::TensorList tensors, const OptionalTensorList& out_idx,
                                                     const OptionalTensorList& in_idx) {
  return ChannelGatherMany::apply(tensors, out_idx, in_idx);
}

std::vector<at::Tensor> channel_scatter_many_autograd(at::TensorList grads, const OptionalTensorList& out_idx,
                                                      const OptionalTensorList& in_idx,
                                                      c10::SymIntArrayRef full_shapes) {
  return ChannelScatterMany::apply(grads, out_idx, in_idx, full_shapes);
}

}  // namespace
}  // namespace pyprune

TORCH_LIBRARY_IMPL(pyprune, Autograd, m) {
  m.impl("channel_gather_many", &pyprune::channel_gather_many_autograd);
  m.impl("channel_scatter_many", &pyprune::channel_scatter_many_autograd);
}
