// CPU kernels of pyprune::channel_gather_many and pyprune::channel_scatter_many: the single-tensor kernels
// (channel_gather_cpu.cpp) on each tensor of the list. The saving on the CPU is the per-call cost (one dispatcher
// call, one autograd node, one Python call for the whole list); every argument is checked before any work starts.
#include "pyprune/geometry.h"
#include "pyprune/kernels.h"

namespace pyprune {

std::vector<at::Tensor> channel_gather_many_cpu(at::TensorList tensors, const OptionalTensorList& out_idx,
                                                const OptionalTensorList& in_idx) {
  const std::vector<ChannelGeometry> geometry = check_gather_many_args(tensors, out_idx, in_idx);
  std::vector<at::Tensor> results;
  results.reserve(tensors.size());
  for (size_t n = 0; n < tensors.size(); ++n) {
    results.push_back(gather_cpu(tensors[n], out_idx.get(n), in_idx.get(n), geometry[n],
                                 list_item_name("channel_gather_many", "tensors", n).c_str()));
  }
  return results;
}

std::vector<at::Tensor> channel_scatter_many_cpu(at::TensorList grads, const OptionalTensorList& out_idx,
                                                 const OptionalTensorList& in_idx, c10::IntArrayRef full_shapes) {
  const std::vector<ChannelGeometry> geometry = check_scatter_many_args(grads, out_idx, in_idx, full_shapes);
  std::vector<at::Tensor> results;
  results.reserve(grads.size());
  for (size_t n = 0; n < grads.size(); ++n) {
    results.push_back(scatter_cpu(grads[n], out_idx.get(n), in_idx.get(n), geometry[n],
                                  list_item_name("channel_scatter_many", "grads", n).c_str()));
  }
  return results;
}

}  // namespace pyprune
