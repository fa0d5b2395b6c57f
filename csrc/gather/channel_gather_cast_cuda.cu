// CUDA kernels of the converting forms of pyprune::channel_gather / channel_scatter (see
// channel_gather_cast_cpu.cpp): the compact copy written in another dtype and / or memory format in the same pass
// (bf16 / fp16 under autocast, channels_last), and the scatter of such a gradient into a zero full-size gradient
// of the full tensor's dtype and format. One element per thread-iteration, addressed through strides
// (StridedLayout); the gather walks its output in memory order, so its writes are coalesced. Sync-free; index
// values are trusted (device asserts catch bugs), as in channel_gather_cuda.cu.
#include "pyprune/cuda_launch.h"
#include "pyprune/geometry.h"
#include "pyprune/kernels.h"
#include "pyprune/conversion.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace pyprune {
namespace {

// What both kernels need of the geometry, passed by value.
struct Walk {
  int64_t total;           // compact elements
  int64_t cols;            // K_in (1 for rank 1)
  int64_t inner;           // prod(rest)
  int64_t rows_per_group;  // compact rows per in_idx row
  int64_t full_rows;
  int64_t full_cols;
  bool cols_innermost;     // the compact tensor's memory order is (row, s, col) rather than (row, col, s)
};

// Compact element number v, in the compact tensor's memory order -> (r, c, s).
__device__ __forceinline__ void coordinates(const Walk& w, int64_t v, int64_t& r, int64_t& c, int64_t& s) {
  if (w.cols_innermost) {
    c = v % w.cols;
    s = (v / w.cols) % w.inner;
    r = v / (w.cols * w.inner);
  } else {
    s = v % w.inner;
    c = (v / w.inner) % w.cols;
    r = v / (w.cols * w.inner);
  }
}

__device__ __forceinline__ void source_of(const Walk& w, const int64_t* out_idx, const int64_t* in_idx, int64_t r,
                                          int64_t c, int64_t& o, int64_t& i) {
  o = r;
  if (out_idx != nullptr) {
    o = out_idx[r];
    CUDA_KERNEL_ASSERT(o >= 0 && o < w.full_rows);
  }
  i = c;
  if (in_idx != nullptr) {
    i = in_idx[(r / w.rows_per_group) * w.cols + c];
    CUDA_KERNEL_ASSERT(i >= 0 && i < w.full_cols);
  }
}

template <typename From, typename To>
__global__ void gather_converting_kernel(const From* __restrict__ src, To* __restrict__ dst,
                                         const int64_t* __restrict__ out_idx, const int64_t* __restrict__ in_idx,
                                         Walk w, StridedLayout from, StridedLayout to) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < w.total; v += stride) {
    int64_t r, c, s, o, i;
    coordinates(w, v, r, c, s);
    source_of(w, out_idx, in_idx, r, c, o, i);
    dst[r * to.row + c * to.col + s * to.inner] = static_cast<To>(src[o * from.row + i * from.col + s * from.inner]);
  }
}

// Writes every compact element to its full place; the rest of the (zero-filled) output stays 0.
template <typename From, typename To>
__global__ void scatter_converting_kernel(const From* __restrict__ src, To* __restrict__ dst,
                                          const int64_t* __restrict__ out_idx, const int64_t* __restrict__ in_idx,
                                          Walk w, StridedLayout from, StridedLayout to) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < w.total; v += stride) {
    int64_t r, c, s, o, i;
    coordinates(w, v, r, c, s);
    source_of(w, out_idx, in_idx, r, c, o, i);
    dst[o * to.row + i * to.col + s * to.inner] = static_cast<To>(src[r * from.row + c * from.col + s * from.inner]);
  }
}

Walk walk_of(const ChannelGeometry& geo, const StridedLayout& compact) {
  return Walk{geo.rows * geo.cols * geo.inner, geo.cols, geo.inner, geo.rows_per_group, geo.full_rows,
              geo.full_cols, geo.inner > 1 && compact.col < compact.inner};
}

template <bool kGather>
at::Tensor run_converting(const at::Tensor& input, const std::optional<at::Tensor>& out_idx,
                          const std::optional<at::Tensor>& in_idx, const ChannelGeometry& geo, at::ScalarType dtype,
                          at::MemoryFormat memory_format) {
  const char* op = kGather ? "channel_gather" : "channel_scatter";
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index());
  at::Tensor out_holder, in_holder;
  const int64_t* out = index_data(out_idx, geo.has_out, out_holder);
  const int64_t* in = index_data(in_idx, geo.has_in, in_holder);
  const auto options = input.options().dtype(dtype).memory_format(memory_format);
  at::Tensor result = kGather ? at::empty(geo.compact_shape, options) : at::empty(geo.full_shape, options).zero_();
  const int64_t compact_elements = geo.rows * geo.cols * geo.inner;
  if (result.numel() == 0 || compact_elements == 0) {
    return result;  // (an empty index has no data pointer: the kernel would take it for "all")
  }
  const at::Tensor src = readable_strided(input);
  const StridedLayout from = strided_layout(src), to = strided_layout(result);
  const Walk walk = walk_of(geo, kGather ? to : from);
  const unsigned grid = cuda::grid_for(walk.total, input.device().index());
  dispatch_conversion(src.scalar_type(), dtype, op, [&](auto from_tag, auto to_tag) {
    using From = decltype(from_tag);
    using To = decltype(to_tag);
    const auto* s = static_cast<const From*>(src.const_data_ptr());
    auto* d = static_cast<To*>(result.mutable_data_ptr());
    if constexpr (kGather) {
      gather_converting_kernel<From, To><<<grid, cuda::kThreads, 0, stream>>>(s, d, out, in, walk, from, to);
    } else {
      scatter_converting_kernel<From, To><<<grid, cuda::kThreads, 0, stream>>>(s, d, out, in, walk, from, to);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

}  // namespace

at::Tensor gather_converting_cuda(const at::Tensor& weight, const std::optional<at::Tensor>& out_idx,
                                  const std::optional<at::Tensor>& in_idx, const ChannelGeometry& geo,
                                  at::ScalarType dtype, at::MemoryFormat memory_format) {
  return run_converting<true>(weight, out_idx, in_idx, geo, dtype, memory_format);
}

at::Tensor scatter_converting_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& out_idx,
                                   const std::optional<at::Tensor>& in_idx, const ChannelGeometry& geo,
                                   at::ScalarType dtype, at::MemoryFormat memory_format) {
  return run_converting<false>(grad, out_idx, in_idx, geo, dtype, memory_format);
}

}  // namespace pyprune
