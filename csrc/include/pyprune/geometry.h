#pragma once
// Shape bookkeeping and argument checks shared by the CPU and CUDA channel kernels.
//
// A "full" tensor has shape [C_out, C_in, *rest] (rank >= 1; rank 1 means C_in = 1 and no rest). Its "compact"
// counterpart is [K_out, K_in, *rest] with K_out = out_idx.numel() (C_out when out_idx is absent) and
// K_in = in_idx.size(-1) (C_in when in_idx is absent). A 2-D in_idx [G, K_in] holds per-group local column indices:
// compact row r reads the columns in_idx[r / (K_out / G)].
//
// Kernels copy contiguous "blocks": with an in_idx a block is one (row, column) pair of `inner` = prod(rest)
// elements; without one the whole row (C_in * inner elements) is a single block in both tensors.

#include "pyprune/ops.h"

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <optional>
#include <string>
#include <vector>

namespace pyprune {

struct ChannelGeometry {
  int64_t full_rows = 0;       // C_out
  int64_t full_cols = 1;       // C_in (1 for rank-1 tensors)
  int64_t inner = 1;           // prod(rest)
  int64_t rows = 0;            // K_out
  int64_t cols = 1;            // K_in
  int64_t groups = 1;          // in_idx.size(0) for a 2-D in_idx, else 1
  int64_t rows_per_group = 1;  // K_out / groups (>= 1 so kernels may divide by it)
  bool has_out = false;
  bool has_in = false;
  std::vector<int64_t> full_shape;
  std::vector<int64_t> compact_shape;

  // Elements per contiguous block (see above), blocks per compact row, blocks per full row.
  int64_t block_elems() const { return has_in ? inner : full_cols * inner; }
  int64_t compact_blocks_per_row() const { return has_in ? cols : 1; }
  int64_t full_blocks_per_row() const { return has_in ? full_cols : 1; }
};

// Checks gather arguments (ranks, index dtype int64 and device) and returns the geometry. `op` names the caller
// in error messages. Index values are NOT checked here: on CUDA that would need a host-device sync.
ChannelGeometry check_gather_args(const at::Tensor& weight, const std::optional<at::Tensor>& out_idx,
                                  const std::optional<at::Tensor>& in_idx, const char* op = "channel_gather");

// Same for scatter: `grad` must have the compact shape that gathering from `full_shape` would produce.
ChannelGeometry check_scatter_args(const at::Tensor& grad, const std::optional<at::Tensor>& out_idx,
                                   const std::optional<at::Tensor>& in_idx, c10::IntArrayRef full_shape,
                                   const char* op = "channel_scatter");

// The multi-tensor ops: one index entry per tensor, every tensor on one device, and each (tensor, out_idx[n],
// in_idx[n]) checked as above; errors name the list item ("channel_gather_many: tensors[3]: ..."). For scatter,
// full_shapes is the concatenation of the full shapes (grads[n].dim() entries each). Returns one geometry per item.
std::vector<ChannelGeometry> check_gather_many_args(at::TensorList tensors, const OptionalTensorList& out_idx,
                                                    const OptionalTensorList& in_idx);
std::vector<ChannelGeometry> check_scatter_many_args(at::TensorList grads, const OptionalTensorList& out_idx,
                                                     const OptionalTensorList& in_idx, c10::IntArrayRef full_shapes);

// "op: list[n]", how errors about one item of a list argument start.
std::string list_item_name(const char* op, const char* list, size_t n);

// Checks the in-place running-stats update: two 1-D buffers of one floating dtype, an int64 [K] index, and [K]
// compact statistics, all on one device.
void check_running_stats_args(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& idx,
                              const at::Tensor& mean, const at::Tensor& var);

// Where element (row, column, s) of a [C_out, C_in, *rest] tensor lies, s running over prod(rest) in order:
// offset = row * this.row + column * this.col + s * this.inner. Holds when the rest dims are dense among themselves,
// as in contiguous and channels_last(_3d) tensors (readable_strided makes a copy otherwise).
struct StridedLayout {
  int64_t row = 0;
  int64_t col = 0;
  int64_t inner = 0;
};
StridedLayout strided_layout(const at::Tensor& tensor);
// `tensor` itself when strided_layout can address it, else a contiguous copy.
at::Tensor readable_strided(const at::Tensor& tensor);

// The dtype / memory format a converting gather or scatter writes (the optional arguments of channel_gather /
// channel_scatter resolved against the tensor `data` they read). Checks: a conversion between two dtypes needs both
// floating (float, double, half, bfloat16); memory_format is contiguous_format, channels_last (rank-4 output) or
// channels_last_3d (rank 5). `rank` is the output's rank.
struct Conversion {
  at::ScalarType dtype;
  at::MemoryFormat memory_format;
  bool changes_dtype;
};
Conversion check_conversion(const at::Tensor& data, std::optional<at::ScalarType> dtype,
                            std::optional<at::MemoryFormat> memory_format, int64_t rank, const char* op);

// Host-side range check of index values; only for CPU tensors (free there, a sync on a GPU).
void check_index_range_cpu(const int64_t* index, int64_t count, int64_t limit, const char* op, const char* name);

// Contiguous int64 data of an optional index (nullptr when `present` is false). `holder` keeps a copy alive if one
// was needed.
const int64_t* index_data(const std::optional<at::Tensor>& index, bool present, at::Tensor& holder);

// A kernel's out / in index data (nullptr = all) with the tensors that keep it alive.
struct IndexData {
  at::Tensor out_holder, in_holder;
  const int64_t* out = nullptr;
  const int64_t* in = nullptr;
};

// index_data of both indices, each range-checked against `geo` on the host (CPU kernels).
IndexData checked_indices_cpu(const std::optional<at::Tensor>& out_idx, const std::optional<at::Tensor>& in_idx,
                              const ChannelGeometry& geo, const char* op);

}  // namespace pyprune
