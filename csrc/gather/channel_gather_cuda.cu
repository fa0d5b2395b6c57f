// CUDA kernels of pyprune::channel_gather and pyprune::channel_scatter (its backward).
//
// Each is one grid-stride kernel over the elements of the tensor it writes, so writes are coalesced. Elements are
// moved as the widest vectors (up to 16 bytes) that the contiguous block (geometry.h) and pointer alignment allow,
// and index math is 32-bit whenever offsets fit. Everything runs on the current stream without host-device syncs;
// index values are trusted (the Python layers guarantee their range; device asserts catch bugs).
#include "pyprune/cuda_launch.h"
#include "pyprune/geometry.h"
#include "pyprune/kernels.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

namespace pyprune {
namespace {

// Compact vector v = (row r, block k, vector e) reads full row out_idx[r], block in_idx[g(r)][k].
template <typename V, typename I>
__global__ void gather_kernel(const V* __restrict__ src, V* __restrict__ dst, const int64_t* __restrict__ out_idx,
                              const int64_t* __restrict__ in_idx, I total, I vectors_per_block, I compact_blocks,
                              I full_blocks, I rows_per_group, I in_idx_row, int64_t full_rows, int64_t full_cols) {
  for (I v = blockIdx.x * blockDim.x + threadIdx.x; v < total; v += I(gridDim.x) * blockDim.x) {
    const I e = v % vectors_per_block;
    const I block = v / vectors_per_block;
    const I k = block % compact_blocks;
    const I r = block / compact_blocks;
    I o = r;
    if (out_idx != nullptr) {
      const int64_t source_row = out_idx[r];
      CUDA_KERNEL_ASSERT(source_row >= 0 && source_row < full_rows);
      o = static_cast<I>(source_row);
    }
    I i = k;
    if (in_idx != nullptr) {
      const int64_t source_col = in_idx[(r / rows_per_group) * in_idx_row + k];
      CUDA_KERNEL_ASSERT(source_col >= 0 && source_col < full_cols);
      i = static_cast<I>(source_col);
    }
    dst[v] = src[(o * full_blocks + i) * vectors_per_block + e];
  }
}

// Full vector v = (row o, block i, vector e) reads compact row inverse_out[o], block inverse_in[g][i], or is 0.
template <typename V, typename I>
__global__ void scatter_kernel(const V* __restrict__ src, V* __restrict__ dst, const int64_t* __restrict__ inverse_out,
                               const int64_t* __restrict__ inverse_in, I total, I vectors_per_block, I compact_blocks,
                               I full_blocks, I rows_per_group) {
  for (I v = blockIdx.x * blockDim.x + threadIdx.x; v < total; v += I(gridDim.x) * blockDim.x) {
    const I e = v % vectors_per_block;
    const I block = v / vectors_per_block;
    const I i = block % full_blocks;
    const I o = block / full_blocks;
    const int64_t r = inverse_out != nullptr ? inverse_out[o] : static_cast<int64_t>(o);
    V value{};
    if (r >= 0) {
      const int64_t c = inverse_in != nullptr ? inverse_in[(I(r) / rows_per_group) * full_blocks + i]
                                              : static_cast<int64_t>(i);
      if (c >= 0) {
        value = src[(I(r) * compact_blocks + I(c)) * vectors_per_block + e];
      }
    }
    dst[v] = value;
  }
}

// inverse_out[out_idx[r]] = r and inverse_in[g][in_idx[g][k]] = k, in one launch over both index tensors. The
// maps were pre-filled with -1 (absent).
__global__ void inverse_maps_kernel(const int64_t* __restrict__ out_idx, int64_t rows, int64_t full_rows,
                                    int64_t* __restrict__ inverse_out, const int64_t* __restrict__ in_idx,
                                    int64_t groups, int64_t cols, int64_t full_cols, int64_t* __restrict__ inverse_in) {
  const int64_t total = (out_idx != nullptr ? rows : 0) + (in_idx != nullptr ? groups * cols : 0);
  const int64_t out_count = out_idx != nullptr ? rows : 0;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    if (t < out_count) {
      const int64_t o = out_idx[t];
      CUDA_KERNEL_ASSERT(o >= 0 && o < full_rows);
      inverse_out[o] = t;
    } else {
      const int64_t u = t - out_count;
      const int64_t g = u / cols;
      const int64_t i = in_idx[u];
      CUDA_KERNEL_ASSERT(i >= 0 && i < full_cols);
      inverse_in[g * full_cols + i] = u - g * cols;
    }
  }
}

template <typename V, typename I>
void launch_gather(const ChannelGeometry& geo, const void* src, void* dst, const int64_t* out, const int64_t* in,
                   int64_t vectors_per_block, c10::DeviceIndex device, cudaStream_t stream) {
  const int64_t total = geo.rows * geo.compact_blocks_per_row() * vectors_per_block;
  gather_kernel<V, I><<<cuda::grid_for(total, device), cuda::kThreads, 0, stream>>>(
      static_cast<const V*>(src), static_cast<V*>(dst), out, in, I(total), I(vectors_per_block),
      I(geo.compact_blocks_per_row()), I(geo.full_blocks_per_row()), I(geo.rows_per_group), I(geo.cols),
      geo.full_rows, geo.full_cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename V, typename I>
void launch_scatter(const ChannelGeometry& geo, const void* src, void* dst, const int64_t* inverse_out,
                    const int64_t* inverse_in, int64_t vectors_per_block, c10::DeviceIndex device,
                    cudaStream_t stream) {
  const int64_t total = geo.full_rows * geo.full_blocks_per_row() * vectors_per_block;
  scatter_kernel<V, I><<<cuda::grid_for(total, device), cuda::kThreads, 0, stream>>>(
      static_cast<const V*>(src), static_cast<V*>(dst), inverse_out, inverse_in, I(total), I(vectors_per_block),
      I(geo.compact_blocks_per_row()), I(geo.full_blocks_per_row()), I(geo.rows_per_group));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor channel_gather_cuda(const at::Tensor& weight, const std::optional<at::Tensor>& out_idx,
                               const std::optional<at::Tensor>& in_idx, std::optional<at::ScalarType> dtype,
                               std::optional<at::MemoryFormat> memory_format) {
  const ChannelGeometry geo = check_gather_args(weight, out_idx, in_idx);
  const Conversion to = check_conversion(weight, dtype, memory_format, weight.dim(), "channel_gather");
  if (to.changes_dtype || to.memory_format != at::MemoryFormat::Contiguous || !weight.is_contiguous()) {
    return gather_converting_cuda(weight, out_idx, in_idx, geo, to.dtype, to.memory_format);  // (cast_cuda.cu)
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor out_holder, in_holder;
  const int64_t* out = index_data(out_idx, geo.has_out, out_holder);
  const int64_t* in = index_data(in_idx, geo.has_in, in_holder);
  const at::Tensor src = weight.contiguous();
  at::Tensor result = at::empty(geo.compact_shape, weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (result.numel() == 0) {
    return result;
  }
  const int64_t block_bytes = geo.block_elems() * weight.element_size();
  const int width = cuda::vector_bytes(block_bytes, src.const_data_ptr(), result.const_data_ptr());
  const int64_t vectors_per_block = block_bytes / width;
  const int64_t largest = std::max(src.numel(), result.numel()) * weight.element_size() / width;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(weight.device().index());
  cuda::dispatch_vector(width, [&](auto vector) {
    using V = decltype(vector);
    if (cuda::fits_32bit(largest)) {
      launch_gather<V, uint32_t>(geo, src.const_data_ptr(), result.mutable_data_ptr(), out, in, vectors_per_block,
                                 weight.device().index(), stream);
    } else {
      launch_gather<V, int64_t>(geo, src.const_data_ptr(), result.mutable_data_ptr(), out, in, vectors_per_block,
                                weight.device().index(), stream);
    }
  });
  return result;
}

at::Tensor channel_scatter_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& out_idx,
                                const std::optional<at::Tensor>& in_idx, c10::IntArrayRef full_shape,
                                std::optional<at::ScalarType> dtype, std::optional<at::MemoryFormat> memory_format) {
  const ChannelGeometry geo = check_scatter_args(grad, out_idx, in_idx, full_shape);
  const Conversion to = check_conversion(grad, dtype, memory_format, static_cast<int64_t>(full_shape.size()),
                                         "channel_scatter");
  if (to.changes_dtype || to.memory_format != at::MemoryFormat::Contiguous) {
    return scatter_converting_cuda(grad, out_idx, in_idx, geo, to.dtype, to.memory_format);  // (cast_cuda.cu)
  }
  const c10::cuda::CUDAGuard guard(grad.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grad.device().index());
  at::Tensor out_holder, in_holder;
  const int64_t* out = index_data(out_idx, geo.has_out, out_holder);
  const int64_t* in = index_data(in_idx, geo.has_in, in_holder);
  const at::Tensor src = grad.contiguous();
  at::Tensor result = at::empty(geo.full_shape, grad.options().memory_format(at::MemoryFormat::Contiguous));
  if (result.numel() == 0) {
    return result;
  }
  if (src.numel() == 0) {
    // Nothing selected. (An empty index has no data pointer, so the kernels below would take it for "all rows".)
    return result.zero_();
  }

  // Both inverse maps live in one small buffer: memset to 0xFF bytes (= -1 as int64), then one launch fills them.
  const int64_t out_map = out ? geo.full_rows : 0;
  const int64_t in_map = in ? geo.groups * geo.full_cols : 0;
  int64_t* inverse_out = nullptr;
  int64_t* inverse_in = nullptr;
  at::Tensor maps;
  if (out_map + in_map > 0) {
    maps = at::empty({out_map + in_map}, grad.options().dtype(at::kLong));
    int64_t* base = maps.mutable_data_ptr<int64_t>();
    inverse_out = out ? base : nullptr;
    inverse_in = in ? base + out_map : nullptr;
    C10_CUDA_CHECK(cudaMemsetAsync(base, 0xFF, (out_map + in_map) * sizeof(int64_t), stream));
    const int64_t work = (out ? geo.rows : 0) + (in ? geo.groups * geo.cols : 0);
    if (work > 0) {
      inverse_maps_kernel<<<cuda::grid_for(work, grad.device().index()), cuda::kThreads, 0, stream>>>(
          out, geo.rows, geo.full_rows, inverse_out, in, geo.groups, geo.cols, geo.full_cols, inverse_in);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  const int64_t block_bytes = geo.block_elems() * grad.element_size();
  const int width = cuda::vector_bytes(block_bytes, src.const_data_ptr(), result.const_data_ptr());
  const int64_t vectors_per_block = block_bytes / width;
  const int64_t largest = std::max(src.numel(), result.numel()) * grad.element_size() / width;
  cuda::dispatch_vector(width, [&](auto vector) {
    using V = decltype(vector);
    if (cuda::fits_32bit(largest)) {
      launch_scatter<V, uint32_t>(geo, src.const_data_ptr(), result.mutable_data_ptr(), inverse_out, inverse_in,
                                  vectors_per_block, grad.device().index(), stream);
    } else {
      launch_scatter<V, int64_t>(geo, src.const_data_ptr(), result.mutable_data_ptr(), inverse_out, inverse_in,
                                 vectors_per_block, grad.device().index(), stream);
    }
  });
  return result;
}

}  // namespace pyprune
