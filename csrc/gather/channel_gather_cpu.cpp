// CPU kernels of pyprune::channel_gather and pyprune::channel_scatter (its backward).
//
// Both walk rows in parallel (at::parallel_for) and move whole contiguous blocks (see geometry.h): one block per
// row when in_idx is absent, else one kh*kw block per selected (row, column) pair.
#include "pyprune/geometry.h"
#include "pyprune/kernels.h"
#include "pyprune/raw_types.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

namespace pyprune {
namespace {

constexpr int64_t kGrainElements = 32768;  // at::internal::GRAIN_SIZE: below this, threading costs more than it saves

int64_t rows_per_task(int64_t elements_per_row) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_row));
}

constexpr int64_t kShortRun = 64;  // below this many elements an inlined loop beats a memmove / memset call

// Copies `count` contiguous elements. kh*kw blocks (1..49 elements) and the one-element rows of 1-D tensors (bias,
// norm statistics) are short, where a library call per block would cost more than the copy.
template <typename T>
inline void copy_run(const T* src, T* dst, int64_t count) {
  if (count >= kShortRun) {
    std::copy_n(src, count, dst);
    return;
  }
  for (int64_t e = 0; e < count; ++e) {
    dst[e] = src[e];
  }
}

template <typename T>
inline void zero_run(T* dst, int64_t count) {
  if (count >= kShortRun) {
    std::fill_n(dst, count, T{});
    return;
  }
  for (int64_t e = 0; e < count; ++e) {
    dst[e] = T{};
  }
}

// Moves `count` blocks between a dense run of blocks and blocks at `cols[k] * block`: gather reads the indexed
// blocks (kToDense), scatter writes them. The common conv block sizes are compile-time constants, so each block
// is a few vector moves instead of a scalar loop (the kernel's inner loop in every training step).
template <typename T, bool kToDense, int64_t kBlock>
inline void move_blocks_fixed(const T* src, T* dst, const int64_t* cols, int64_t count) {
  for (int64_t k = 0; k < count; ++k) {
    const T* from = src + (kToDense ? cols[k] : k) * kBlock;
    T* to = dst + (kToDense ? k : cols[k]) * kBlock;
    for (int64_t e = 0; e < kBlock; ++e) {
      to[e] = from[e];
    }
  }
}

template <typename T, bool kToDense>
inline void move_blocks(const T* src, T* dst, const int64_t* cols, int64_t count, int64_t block) {
  switch (block) {
    case 1: return move_blocks_fixed<T, kToDense, 1>(src, dst, cols, count);
    case 9: return move_blocks_fixed<T, kToDense, 9>(src, dst, cols, count);      // 3x3
    case 25: return move_blocks_fixed<T, kToDense, 25>(src, dst, cols, count);    // 5x5
    case 49: return move_blocks_fixed<T, kToDense, 49>(src, dst, cols, count);    // 7x7
    default:
      for (int64_t k = 0; k < count; ++k) {
        const int64_t from = (kToDense ? cols[k] : k) * block;
        const int64_t to = (kToDense ? k : cols[k]) * block;
        copy_run(src + from, dst + to, block);
      }
  }
}

// One element per row (bias, norm statistics): a plain indexed copy, threaded only when it is large.
template <typename T>
void gather_elements(const T* __restrict__ src, T* __restrict__ dst, const int64_t* __restrict__ out,
                     int64_t count) {
  at::parallel_for(0, count, kGrainElements, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      dst[r] = src[out[r]];
    }
  });
}

// Inverse of gather_elements: zero the full vector, then place each compact value.
template <typename T>
void scatter_elements(const T* __restrict__ src, T* __restrict__ dst, const int64_t* __restrict__ out, int64_t count,
                      int64_t full_count) {
  zero_run(dst, full_count);
  for (int64_t r = 0; r < count; ++r) {
    dst[out[r]] = src[r];
  }
}

template <typename T>
void gather_rows(const T* src, T* dst, const ChannelGeometry& geo, const int64_t* out, const int64_t* in) {
  const int64_t block = geo.block_elems();
  if (in == nullptr && out != nullptr && block == 1) {
    gather_elements(src, dst, out, geo.rows);
    return;
  }
  const int64_t src_row_elems = geo.full_blocks_per_row() * block;
  const int64_t dst_row_elems = geo.compact_blocks_per_row() * block;
  at::parallel_for(0, geo.rows, rows_per_task(dst_row_elems), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* src_row = src + (out ? out[r] : r) * src_row_elems;
      T* dst_row = dst + r * dst_row_elems;
      if (in == nullptr) {
        copy_run(src_row, dst_row, dst_row_elems);
        continue;
      }
      move_blocks<T, true>(src_row, dst_row, in + (r / geo.rows_per_group) * geo.cols, geo.cols, block);
    }
  });
}

// Each full row is zero-filled and then receives its compact blocks while it is still in cache, so the output is
// streamed once. Rows come from the inverse row map (full row -> compact row or -1); columns use the forward index.
template <typename T>
void scatter_rows(const T* src, T* dst, const ChannelGeometry& geo, const int64_t* inverse_out, const int64_t* in) {
  const int64_t block = geo.block_elems();
  const int64_t full_row_elems = geo.full_blocks_per_row() * block;
  const int64_t compact_row_elems = geo.compact_blocks_per_row() * block;
  at::parallel_for(0, geo.full_rows, rows_per_task(full_row_elems), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      T* dst_row = dst + o * full_row_elems;
      const int64_t r = inverse_out ? inverse_out[o] : o;
      if (r < 0) {
        zero_run(dst_row, full_row_elems);
        continue;
      }
      const T* src_row = src + r * compact_row_elems;
      if (in == nullptr) {
        copy_run(src_row, dst_row, full_row_elems);
        continue;
      }
      zero_run(dst_row, full_row_elems);
      move_blocks<T, false>(src_row, dst_row, in + (r / geo.rows_per_group) * geo.cols, geo.cols, block);
    }
  });
}

}  // namespace

at::Tensor gather_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& out_idx,
                      const std::optional<at::Tensor>& in_idx, const ChannelGeometry& geo, const char* op) {
  const IndexData indices = checked_indices_cpu(out_idx, in_idx, geo, op);
  const int64_t* out = indices.out;
  const int64_t* in = indices.in;

  at::Tensor result = at::empty(geo.compact_shape, weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (result.numel() == 0) {
    return result;  // (an empty index has no data pointer: the kernels below would take it for "all")
  }
  const at::Tensor src = weight.contiguous();
  dispatch_by_size(weight.element_size(), op, [&](auto tag) {
    using T = decltype(tag);
    gather_rows<T>(static_cast<const T*>(src.const_data_ptr()), static_cast<T*>(result.mutable_data_ptr()), geo,
                   out, in);
  });
  return result;
}

at::Tensor scatter_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& out_idx,
                       const std::optional<at::Tensor>& in_idx, const ChannelGeometry& geo, const char* op) {
  at::Tensor out_holder, in_holder;
  const int64_t* out = index_data(out_idx, geo.has_out, out_holder);
  const int64_t* in = index_data(in_idx, geo.has_in, in_holder);

  if (out) check_index_range_cpu(out, geo.rows, geo.full_rows, op, "out_idx");
  if (grad.numel() == 0) {
    // Nothing selected. (An empty index has no data pointer, so the kernels below would take it for "all rows".)
    return at::zeros(geo.full_shape, grad.options().memory_format(at::MemoryFormat::Contiguous));
  }
  const at::Tensor src = grad.contiguous();
  at::Tensor result = at::empty(geo.full_shape, grad.options().memory_format(at::MemoryFormat::Contiguous));
  if (out != nullptr && in == nullptr && geo.block_elems() == 1) {
    dispatch_by_size(grad.element_size(), op, [&](auto tag) {
      using T = decltype(tag);
      scatter_elements(static_cast<const T*>(src.const_data_ptr()), static_cast<T*>(result.mutable_data_ptr()),
                       out, geo.rows, geo.full_rows);
    });
    return result;
  }

  // Inverse row map, full row -> compact row or -1 (small: one entry per channel), built serially.
  std::vector<int64_t> inverse_out;
  if (out) {
    inverse_out.assign(geo.full_rows, -1);
    for (int64_t r = 0; r < geo.rows; ++r) inverse_out[out[r]] = r;
  }
  if (in) check_index_range_cpu(in, geo.groups * geo.cols, geo.full_cols, op, "in_idx");

  dispatch_by_size(grad.element_size(), op, [&](auto tag) {
    using T = decltype(tag);
    scatter_rows<T>(static_cast<const T*>(src.const_data_ptr()), static_cast<T*>(result.mutable_data_ptr()), geo,
                    out ? inverse_out.data() : nullptr, in);
  });
  return result;
}

// The plain kernels above serve the default (same dtype, contiguous in and out); anything else takes the
// converting kernels of channel_gather_cast_cpu.cpp, which read through strides and convert while copying.
at::Tensor channel_gather_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& out_idx,
                              const std::optional<at::Tensor>& in_idx, std::optional<at::ScalarType> dtype,
                              std::optional<at::MemoryFormat> memory_format) {
  const char* op = "channel_gather";
  const ChannelGeometry geo = check_gather_args(weight, out_idx, in_idx);
  const Conversion to = check_conversion(weight, dtype, memory_format, weight.dim(), op);
  if (!to.changes_dtype && to.memory_format == at::MemoryFormat::Contiguous && weight.is_contiguous()) {
    return gather_cpu(weight, out_idx, in_idx, geo, op);
  }
  return gather_converting_cpu(weight, out_idx, in_idx, geo, to.dtype, to.memory_format, op);
}

at::Tensor channel_scatter_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& out_idx,
                               const std::optional<at::Tensor>& in_idx, c10::IntArrayRef full_shape,
                               std::optional<at::ScalarType> dtype, std::optional<at::MemoryFormat> memory_format) {
  const char* op = "channel_scatter";
  const ChannelGeometry geo = check_scatter_args(grad, out_idx, in_idx, full_shape);
  const Conversion to = check_conversion(grad, dtype, memory_format, static_cast<int64_t>(full_shape.size()), op);
  if (!to.changes_dtype && to.memory_format == at::MemoryFormat::Contiguous) {
    return scatter_cpu(grad, out_idx, in_idx, geo, op);
  }
  return scatter_converting_cpu(grad, out_idx, in_idx, geo, to.dtype, to.memory_format, op);
}

}  // namespace pyprune
