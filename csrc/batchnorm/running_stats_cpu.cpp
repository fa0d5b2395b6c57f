// CPU kernel of pyprune::update_running_stats_: write compact batch-norm statistics back into the full buffers.
#include "pyprune/geometry.h"
#include "pyprune/kernels.h"
#include "pyprune/raw_types.h"

namespace pyprune {

void update_running_stats_cpu(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& idx,
                              const at::Tensor& mean, const at::Tensor& var) {
  check_running_stats_args(running_mean, running_var, idx, mean, var);
  const at::Tensor index = idx.contiguous();
  const int64_t count = index.size(0);
  const int64_t* positions = index.const_data_ptr<int64_t>();
  check_index_range_cpu(positions, count, running_mean.size(0), "update_running_stats_", "idx");

  // batch_norm may have produced the statistics in another float type (e.g. under autocast): store in ours.
  const at::Tensor mean_values = mean.to(running_mean.scalar_type()).contiguous();
  const at::Tensor var_values = var.to(running_var.scalar_type()).contiguous();
  const int64_t mean_stride = running_mean.stride(0);
  const int64_t var_stride = running_var.stride(0);
  dispatch_by_size(running_mean.element_size(), "update_running_stats_", [&](auto tag) {
    using T = decltype(tag);
    T* dst_mean = static_cast<T*>(running_mean.mutable_data_ptr());
    T* dst_var = static_cast<T*>(running_var.mutable_data_ptr());
    const T* src_mean = static_cast<const T*>(mean_values.const_data_ptr());
    const T* src_var = static_cast<const T*>(var_values.const_data_ptr());
    for (int64_t k = 0; k < count; ++k) {
      dst_mean[positions[k] * mean_stride] = src_mean[k];
      dst_var[positions[k] * var_stride] = src_var[k];
    }
  });
}

}  // namespace pyprune
