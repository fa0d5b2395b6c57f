// CUDA kernel of pyprune::update_running_stats_: write compact batch-norm statistics back into the full buffers,
// mean and var in one launch on the current stream.
#include "pyprune/cuda_launch.h"
#include "pyprune/geometry.h"
#include "pyprune/kernels.h"
#include "pyprune/raw_types.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

namespace pyprune {
namespace {

template <typename T>
__global__ void running_stats_kernel(T* __restrict__ running_mean, int64_t mean_stride, T* __restrict__ running_var,
                                     int64_t var_stride, const int64_t* __restrict__ idx, const T* __restrict__ mean,
                                     const T* __restrict__ var, int64_t count, int64_t channels) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < count; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = idx[k];
    CUDA_KERNEL_ASSERT(c >= 0 && c < channels);
    running_mean[c * mean_stride] = mean[k];
    running_var[c * var_stride] = var[k];
  }
}

}  // namespace

void update_running_stats_cuda(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& idx,
                               const at::Tensor& mean, const at::Tensor& var) {
  check_running_stats_args(running_mean, running_var, idx, mean, var);
  const int64_t count = idx.size(0);
  if (count == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(running_mean.device());
  const at::Tensor index = idx.contiguous();
  // batch_norm may have produced the statistics in another float type (e.g. under autocast): store in ours.
  const at::Tensor mean_values = mean.to(running_mean.scalar_type()).contiguous();
  const at::Tensor var_values = var.to(running_var.scalar_type()).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(running_mean.device().index());
  dispatch_by_size(running_mean.element_size(), "update_running_stats_", [&](auto tag) {
    using T = decltype(tag);
    running_stats_kernel<T><<<cuda::grid_for(count, running_mean.device().index()), cuda::kThreads, 0, stream>>>(
        static_cast<T*>(running_mean.mutable_data_ptr()), running_mean.stride(0),
        static_cast<T*>(running_var.mutable_data_ptr()), running_var.stride(0), index.const_data_ptr<int64_t>(),
        static_cast<const T*>(mean_values.const_data_ptr()), static_cast<const T*>(var_values.const_data_ptr()), count,
        running_mean.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace pyprune
