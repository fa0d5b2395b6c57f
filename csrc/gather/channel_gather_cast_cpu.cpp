// CPU kernels of the "converting" forms of pyprune::channel_gather / channel_scatter: the gather writes its compact
// copy in another dtype and / or memory format (bf16 under autocast, channels_last for a channels_last model) in the
// same pass, and the scatter (its backward) writes the compact gradient of that dtype / format back into a zero
// full-size gradient of the full tensor's dtype / format. The plain forms (same dtype, contiguous) keep the raw-copy
// kernels of channel_gather_cpu.cpp; the dispatch between the two happens in channel_gather_cpu / scatter_cpu.
//
// Tensors are addressed through strides (strided_layout in geometry.h), so a channels_last source is read where it
// lies instead of being made contiguous first.
#include "pyprune/geometry.h"
#include "pyprune/kernels.h"
#include "pyprune/conversion.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/empty.h>

#include <type_traits>
#include <vector>

namespace pyprune {
namespace {

constexpr int64_t kGrainElements = 32768;

// Compact row r = full row out[r] at columns in[g(r)], written in the compact tensor's memory order (a compact row is
// one contiguous run in both contiguous and channels_last layouts).
template <typename From, typename T>
inline void gather_row_strided(const From* src_row, T* dst_row, const ChannelGeometry& geo, const StridedLayout& from,
                               const StridedLayout& to, const int64_t* cols) {
  if (geo.inner == 1) {  // linear / 1x1 conv / bias: one element per column
    for (int64_t c = 0; c < geo.cols; ++c) {
      dst_row[c * to.col] = static_cast<T>(src_row[(cols ? cols[c] : c) * from.col]);
    }
    return;
  }
  if (to.col < to.inner) {  // channels_last: columns innermost
    for (int64_t s = 0; s < geo.inner; ++s) {
      for (int64_t c = 0; c < geo.cols; ++c) {
        dst_row[c * to.col + s * to.inner] = static_cast<T>(src_row[(cols ? cols[c] : c) * from.col + s * from.inner]);
      }
    }
    return;
  }
  for (int64_t c = 0; c < geo.cols; ++c) {
    const From* src_block = src_row + (cols ? cols[c] : c) * from.col;
    T* dst_block = dst_row + c * to.col;
    if (from.inner == 1 && to.inner == 1) {  // contiguous blocks on both sides: a unit-stride run
      for (int64_t s = 0; s < geo.inner; ++s) {
        dst_block[s] = static_cast<T>(src_block[s]);
      }
      continue;
    }
    for (int64_t s = 0; s < geo.inner; ++s) {
      dst_block[s * to.inner] = static_cast<T>(src_block[s * from.inner]);
    }
  }
}

// Compact element (r, c, s) = full element (out[r], in[g(r)][c], s), for every r in [begin, end). A dtype change goes
// through a buffer of the source type holding a chunk of compact rows in the output's order (plain moves), converted
// into the output with one Tensor::copy_ per chunk: ATen's CPU-dispatched vectorised conversion is several times
// faster than converting element by element (bf16 / fp16 rounding), and a chunk stays in cache, so memory still sees
// one read of the source and one write of the result. (Consecutive compact rows are consecutive in the output in
// both contiguous and channels_last layouts.)
template <typename From, typename To>
void gather_rows_strided(const From* src, To* dst, const ChannelGeometry& geo, const StridedLayout& from,
                         const StridedLayout& to, const int64_t* out, const int64_t* in, int64_t begin, int64_t end,
                         at::ScalarType from_dtype, at::ScalarType to_dtype) {
  auto row_of = [&](int64_t r) { return src + (out ? out[r] : r) * from.row; };
  auto cols_of = [&](int64_t r) { return in ? in + (r / geo.rows_per_group) * geo.cols : nullptr; };
  if constexpr (std::is_same_v<From, To>) {
    for (int64_t r = begin; r < end; ++r) {
      gather_row_strided(row_of(r), dst + r * to.row, geo, from, to, cols_of(r));
    }
  } else {
    const int64_t row_elems = geo.cols * geo.inner;
    const int64_t chunk_rows = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_elems));
    std::vector<From> buffer(std::min(chunk_rows, end - begin) * row_elems);
    for (int64_t first = begin; first < end; first += chunk_rows) {
      const int64_t rows = std::min(chunk_rows, end - first);
      for (int64_t k = 0; k < rows; ++k) {
        gather_row_strided(row_of(first + k), buffer.data() + k * row_elems, geo, from, to, cols_of(first + k));
      }
      const int64_t count = rows * row_elems;
      at::from_blob(dst + first * to.row, {count}, at::TensorOptions().dtype(to_dtype))
          .copy_(at::from_blob(buffer.data(), {count}, at::TensorOptions().dtype(from_dtype)));
    }
  }
}

// Inverse: full element (out[r], in[g(r)][c], s) = compact element (r, c, s). Rows are distinct (sorted unique
// indices), so row ranges never write the same element.
template <typename From, typename To>
void scatter_rows_strided(const From* src, To* dst, const ChannelGeometry& geo, const StridedLayout& from,
                          const StridedLayout& to, const int64_t* out, const int64_t* in, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const From* src_row = src + r * from.row;
    To* dst_row = dst + (out ? out[r] : r) * to.row;
    const int64_t* cols = in ? in + (r / geo.rows_per_group) * geo.cols : nullptr;
    for (int64_t c = 0; c < geo.cols; ++c) {
      const From* src_block = src_row + c * from.col;
      To* dst_block = dst_row + (cols ? cols[c] : c) * to.col;
      for (int64_t s = 0; s < geo.inner; ++s) {
        dst_block[s * to.inner] = static_cast<To>(src_block[s * from.inner]);
      }
    }
  }
}

int64_t rows_per_task(const ChannelGeometry& geo) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, geo.cols * geo.inner));
}

}  // namespace

at::Tensor gather_converting_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& out_idx,
                                 const std::optional<at::Tensor>& in_idx, const ChannelGeometry& geo,
                                 at::ScalarType dtype, at::MemoryFormat memory_format, const char* op) {
  const IndexData indices = checked_indices_cpu(out_idx, in_idx, geo, op);
  const int64_t* out = indices.out;
  const int64_t* in = indices.in;

  at::Tensor result = at::empty(geo.compact_shape, weight.options().dtype(dtype).memory_format(memory_format));
  if (result.numel() == 0) {
    return result;
  }
  const at::Tensor src = readable_strided(weight);
  const StridedLayout from = strided_layout(src), to = strided_layout(result);
  dispatch_conversion(src.scalar_type(), dtype, op, [&](auto from_tag, auto to_tag) {
    using From = decltype(from_tag);
    using To = decltype(to_tag);
    const auto* s = static_cast<const From*>(src.const_data_ptr());
    auto* d = static_cast<To*>(result.mutable_data_ptr());
    at::parallel_for(0, geo.rows, rows_per_task(geo), [&](int64_t begin, int64_t end) {
      gather_rows_strided<From, To>(s, d, geo, from, to, out, in, begin, end, src.scalar_type(), dtype);
    });
  });
  return result;
}

at::Tensor scatter_converting_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& out_idx,
                                  const std::optional<at::Tensor>& in_idx, const ChannelGeometry& geo,
                                  at::ScalarType dtype, at::MemoryFormat memory_format, const char* op) {
  const IndexData indices = checked_indices_cpu(out_idx, in_idx, geo, op);
  const int64_t* out = indices.out;
  const int64_t* in = indices.in;

  // (at::zeros would drop the memory format)
  at::Tensor result = at::empty(geo.full_shape, grad.options().dtype(dtype).memory_format(memory_format)).zero_();
  if (grad.numel() == 0) {
    return result;
  }
  const at::Tensor src = readable_strided(grad);
  const StridedLayout from = strided_layout(src), to = strided_layout(result);
  dispatch_conversion(src.scalar_type(), dtype, op, [&](auto from_tag, auto to_tag) {
    using From = decltype(from_tag);
    using To = decltype(to_tag);
    const auto* s = static_cast<const From*>(src.const_data_ptr());
    auto* d = static_cast<To*>(result.mutable_data_ptr());
    at::parallel_for(0, geo.rows, rows_per_task(geo), [&](int64_t begin, int64_t end) {
      scatter_rows_strided<From, To>(s, d, geo, from, to, out, in, begin, end);
    });
  });
  return result;
}

}  // namespace pyprune
