// Argument checks shared by every kernel of the pyprune channel ops (see include/pyprune/geometry.h).
#include "pyprune/geometry.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace pyprune {
namespace {

void check_index_tensor(const at::Tensor& index, const at::Tensor& data, const char* op, const char* name,
                        int64_t min_dim, int64_t max_dim) {
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": ", name, " must be an int64 tensor, got ",
              index.scalar_type());
  TORCH_CHECK(index.device() == data.device(), op, ": ", name, " is on ", index.device(),
              " but the data tensor is on ", data.device());
  TORCH_CHECK(index.dim() >= min_dim && index.dim() <= max_dim, op, ": ", name, " must have ",
              min_dim == max_dim ? std::to_string(min_dim) : std::to_string(min_dim) + " or " + std::to_string(max_dim),
              " dimension(s), got shape ", index.sizes());
}

void check_data_tensor(const at::Tensor& data, const char* op, const char* name) {
  TORCH_CHECK(data.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got ",
              data.layout());
  TORCH_CHECK(!data.is_quantized(), op, ": ", name, " must not be quantized");
  TORCH_CHECK(data.dim() >= 1, op, ": ", name, " must have rank >= 1, got a scalar");
}

// Fills the geometry of `full_shape` gathered by (out_idx, in_idx); shared by gather and scatter.
ChannelGeometry make_geometry(c10::IntArrayRef full_shape, const at::Tensor& data,
                              const std::optional<at::Tensor>& out_idx, const std::optional<at::Tensor>& in_idx,
                              const char* op) {
  ChannelGeometry geo;
  geo.full_shape = full_shape.vec();
  geo.full_rows = full_shape[0];
  geo.full_cols = full_shape.size() >= 2 ? full_shape[1] : 1;
  for (size_t d = 2; d < full_shape.size(); ++d) {
    geo.inner *= full_shape[d];
  }
  geo.has_out = out_idx.has_value() && out_idx->defined();
  geo.has_in = in_idx.has_value() && in_idx->defined();
  if (geo.has_out) {
    check_index_tensor(*out_idx, data, op, "out_idx", 1, 1);
  }
  geo.rows = geo.has_out ? out_idx->size(0) : geo.full_rows;
  geo.cols = geo.full_cols;
  if (geo.has_in) {
    TORCH_CHECK(full_shape.size() >= 2, op, ": in_idx needs a tensor of rank >= 2 (dim 1 = input channels), got "
                "shape ", full_shape);
    check_index_tensor(*in_idx, data, op, "in_idx", 1, 2);
    geo.cols = in_idx->size(-1);
    if (in_idx->dim() == 2) {
      geo.groups = in_idx->size(0);
      TORCH_CHECK(geo.groups >= 1 && geo.rows % geo.groups == 0, op, ": a grouped in_idx of shape ",
                  in_idx->sizes(), " needs the ", geo.rows, " selected output channels to split evenly into ",
                  geo.groups, " groups");
    }
  }
  geo.rows_per_group = std::max<int64_t>(1, geo.rows / geo.groups);
  geo.compact_shape = geo.full_shape;
  geo.compact_shape[0] = geo.rows;
  if (full_shape.size() >= 2) {
    geo.compact_shape[1] = geo.cols;
  }
  return geo;
}

}  // namespace

ChannelGeometry check_gather_args(const at::Tensor& weight, const std::optional<at::Tensor>& out_idx,
                                  const std::optional<at::Tensor>& in_idx, const char* op) {
  check_data_tensor(weight, op, "w");
  return make_geometry(weight.sizes(), weight, out_idx, in_idx, op);
}

ChannelGeometry check_scatter_args(const at::Tensor& grad, const std::optional<at::Tensor>& out_idx,
                                   const std::optional<at::Tensor>& in_idx, c10::IntArrayRef full_shape,
                                   const char* op) {
  check_data_tensor(grad, op, "grad");
  TORCH_CHECK(!full_shape.empty(), op, ": full_shape must have at least one dimension");
  for (int64_t size : full_shape) {
    TORCH_CHECK(size >= 0, op, ": full_shape ", full_shape, " has a negative size");
  }
  ChannelGeometry geo = make_geometry(full_shape, grad, out_idx, in_idx, op);
  TORCH_CHECK(grad.sizes() == c10::IntArrayRef(geo.compact_shape), op, ": grad has shape ", grad.sizes(),
              " but gathering from full_shape ", full_shape, " with these indices gives ",
              c10::IntArrayRef(geo.compact_shape));
  return geo;
}

std::string list_item_name(const char* op, const char* list, size_t n) {
  return std::string(op) + ": " + list + "[" + std::to_string(n) + "]";
}

namespace {

// Lengths of the index lists and one device for all data tensors (the CUDA kernel copies them in one launch).
void check_many_lists(at::TensorList tensors, const OptionalTensorList& out_idx, const OptionalTensorList& in_idx,
                      const char* op, const char* list) {
  TORCH_CHECK(out_idx.size() == tensors.size() && in_idx.size() == tensors.size(), op, ": out_idx and in_idx need ",
              "one entry (an index or None) per tensor of ", list, " (", tensors.size(), "), got ", out_idx.size(),
              " and ", in_idx.size());
  for (size_t n = 1; n < tensors.size(); ++n) {
    TORCH_CHECK(tensors[n].device() == tensors[0].device(), list_item_name(op, list, n), " is on ",
                tensors[n].device(), " but ", list, "[0] is on ", tensors[0].device(), "; all must be on one device");
  }
}

}  // namespace

std::vector<ChannelGeometry> check_gather_many_args(at::TensorList tensors, const OptionalTensorList& out_idx,
                                                    const OptionalTensorList& in_idx) {
  const char* op = "channel_gather_many";
  check_many_lists(tensors, out_idx, in_idx, op, "tensors");
  std::vector<ChannelGeometry> geometry;
  geometry.reserve(tensors.size());
  for (size_t n = 0; n < tensors.size(); ++n) {
    geometry.push_back(
        check_gather_args(tensors[n], out_idx.get(n), in_idx.get(n), list_item_name(op, "tensors", n).c_str()));
  }
  return geometry;
}

std::vector<ChannelGeometry> check_scatter_many_args(at::TensorList grads, const OptionalTensorList& out_idx,
                                                     const OptionalTensorList& in_idx, c10::IntArrayRef full_shapes) {
  const char* op = "channel_scatter_many";
  check_many_lists(grads, out_idx, in_idx, op, "grads");
  size_t ranks = 0;
  for (const at::Tensor& grad : grads) {
    ranks += static_cast<size_t>(grad.dim());
  }
  TORCH_CHECK(full_shapes.size() == ranks, op, ": full_shapes must concatenate the full shape of every gradient (",
              ranks, " sizes for these ranks), got ", full_shapes.size(), " sizes");
  std::vector<ChannelGeometry> geometry;
  geometry.reserve(grads.size());
  size_t start = 0;
  for (size_t n = 0; n < grads.size(); ++n) {
    const c10::IntArrayRef full_shape = full_shapes.slice(start, grads[n].dim());
    start += static_cast<size_t>(grads[n].dim());
    geometry.push_back(check_scatter_args(grads[n], out_idx.get(n), in_idx.get(n), full_shape,
                                          list_item_name(op, "grads", n).c_str()));
  }
  return geometry;
}

void check_running_stats_args(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& idx,
                              const at::Tensor& mean, const at::Tensor& var) {
  const char* op = "update_running_stats_";
  TORCH_CHECK(running_mean.dim() == 1 && running_var.dim() == 1, op, ": running_mean and running_var must be 1-D, "
              "got shapes ", running_mean.sizes(), " and ", running_var.sizes());
  TORCH_CHECK(running_mean.size(0) == running_var.size(0), op, ": running_mean has ", running_mean.size(0),
              " channels but running_var has ", running_var.size(0));
  TORCH_CHECK(running_mean.scalar_type() == running_var.scalar_type(), op, ": running_mean is ",
              running_mean.scalar_type(), " but running_var is ", running_var.scalar_type());
  TORCH_CHECK(at::isFloatingType(running_mean.scalar_type()), op, ": running stats must be floating point, got ",
              running_mean.scalar_type());
  check_index_tensor(idx, running_mean, op, "idx", 1, 1);
  const int64_t count = idx.size(0);
  for (const at::Tensor* stat : {&mean, &var}) {
    const char* name = stat == &mean ? "mean" : "var";
    TORCH_CHECK(stat->device() == running_mean.device(), op, ": ", name, " is on ", stat->device(),
                " but running_mean is on ", running_mean.device());
    TORCH_CHECK(stat->dim() == 1 && stat->size(0) == count, op, ": ", name, " must have shape [", count,
                "] (one value per index), got ", stat->sizes());
    TORCH_CHECK(at::isFloatingType(stat->scalar_type()), op, ": ", name, " must be floating point, got ",
                stat->scalar_type());
  }
  TORCH_CHECK(running_var.device() == running_mean.device(), op, ": running_var is on ", running_var.device(),
              " but running_mean is on ", running_mean.device());
}

StridedLayout strided_layout(const at::Tensor& tensor) {
  StridedLayout layout;
  const int64_t rank = tensor.dim();
  layout.row = tensor.stride(0);
  layout.col = rank >= 2 ? tensor.stride(1) : 0;
  layout.inner = rank >= 3 ? tensor.stride(rank - 1) : 0;
  return layout;
}

at::Tensor readable_strided(const at::Tensor& tensor) {
  for (int64_t d = 2; d + 1 < tensor.dim(); ++d) {
    if (tensor.size(d) != 1 && tensor.stride(d) != tensor.stride(d + 1) * tensor.size(d + 1)) {
      return tensor.contiguous();
    }
  }
  return tensor;
}

Conversion check_conversion(const at::Tensor& data, std::optional<at::ScalarType> dtype,
                            std::optional<at::MemoryFormat> memory_format, int64_t rank, const char* op) {
  Conversion conversion{dtype.value_or(data.scalar_type()), memory_format.value_or(at::MemoryFormat::Contiguous),
                        false};
  conversion.changes_dtype = conversion.dtype != data.scalar_type();
  auto convertible = [](at::ScalarType t) {
    return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
  };
  TORCH_CHECK(!conversion.changes_dtype || (convertible(data.scalar_type()) && convertible(conversion.dtype)), op,
              ": dtype converts between float32, float64, float16 and bfloat16 only, got ", data.scalar_type(),
              " to ", conversion.dtype);
  const at::MemoryFormat format = conversion.memory_format;
  TORCH_CHECK(format == at::MemoryFormat::Contiguous || (format == at::MemoryFormat::ChannelsLast && rank == 4) ||
                  (format == at::MemoryFormat::ChannelsLast3d && rank == 5),
              op, ": memory_format must be contiguous_format, channels_last (rank 4) or channels_last_3d (rank 5); ",
              "got ", format, " for a tensor of rank ", rank);
  return conversion;
}

void check_index_range_cpu(const int64_t* index, int64_t count, int64_t limit, const char* op, const char* name) {
  // A branch-free min / max pass (vectorises); the slow search for the culprit runs only when one exists.
  int64_t low = 0, high = 0;
  if (count > 0) {
    low = high = index[0];
  }
  for (int64_t k = 1; k < count; ++k) {
    low = std::min(low, index[k]);
    high = std::max(high, index[k]);
  }
  if (low >= 0 && high < limit) {
    return;
  }
  for (int64_t k = 0; k < count; ++k) {
    TORCH_CHECK(index[k] >= 0 && index[k] < limit, op, ": ", name, "[", k, "] = ", index[k],
                " is out of range for a dimension of size ", limit);
  }
}

const int64_t* index_data(const std::optional<at::Tensor>& index, bool present, at::Tensor& holder) {
  if (!present) {
    return nullptr;
  }
  holder = index->contiguous();
  return holder.const_data_ptr<int64_t>();
}

IndexData checked_indices_cpu(const std::optional<at::Tensor>& out_idx, const std::optional<at::Tensor>& in_idx,
                              const ChannelGeometry& geo, const char* op) {
  IndexData data;
  data.out = index_data(out_idx, geo.has_out, data.out_holder);
  data.in = index_data(in_idx, geo.has_in, data.in_holder);
  if (data.out) check_index_range_cpu(data.out, geo.rows, geo.full_rows, op, "out_idx");
  if (data.in) check_index_range_cpu(data.in, geo.groups * geo.cols, geo.full_cols, op, "in_idx");
  return data;
}

}  // namespace pyprune
