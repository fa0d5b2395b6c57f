// CUDA kernels of pyprune::channel_gather_many and pyprune::channel_scatter_many: every tensor of the list in one
// launch (the scatter in two: zero-fill all full tensors, then write all compact blocks into them).
//
// The host packs one TableEntry per tensor (pointers, block geometry, vector width) into pinned memory and sends
// the table to the GPU with one non-blocking copy on the current stream: no host-device sync, and safe under CUDA
// graph capture (torch's caching host allocator never recycles a pinned block that a capture used). Work is cut
// into chunks of kChunkVectors vectors; each entry owns a run of consecutive chunks, and a CUDA block finds the
// entry of its chunk by binary search over the entries' first chunks, so one block only ever copies one tensor.
// Per tensor the copy is the single-tensor kernel's (channel_gather_cuda.cu): widest vectors the block and the
// alignment allow, 32-bit index math when offsets fit, index values trusted (device asserts catch bugs).
#include "pyprune/cuda_launch.h"
#include "pyprune/geometry.h"
#include "pyprune/kernels.h"

#include <ATen/core/CachingHostAllocator.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include <cstring>
#include <vector>

namespace pyprune {
namespace {

constexpr int64_t kChunkVectors = 2048;  // 8 vectors per thread of a 256-thread block

int64_t chunks_for(int64_t vectors) {
  return (vectors + kChunkVectors - 1) / kChunkVectors;
}

// One tensor of the list. "full" is [C_out, C_in, *rest], "compact" its gathered [K_out, K_in, *rest].
struct TableEntry {
  const void* full;
  void* compact_out;          // gather: the output; scatter: unused
  const void* compact_in;     // scatter: the gradient; gather: unused
  void* full_out;             // scatter: the output; gather: unused
  const int64_t* out_idx;     // nullptr = every row
  const int64_t* in_idx;      // nullptr = every column; [G, cols] for grouped rows
  int64_t copy_vectors;       // vectors of the compact tensor: the work of the copy pass
  int64_t vectors_per_block;  // vectors per contiguous block (geometry.h)
  int64_t compact_blocks;     // blocks per compact row
  int64_t full_blocks;        // blocks per full row
  int64_t rows_per_group;
  int64_t cols;               // length of one in_idx row
  int64_t full_rows, full_cols;
  int64_t first_copy_chunk;
  int64_t zero_vectors;       // scatter: vectors of zero_bytes that clear the full tensor
  int64_t first_zero_chunk;
  int32_t copy_bytes;         // vector width of the copy pass (16, 8, 4, 2, 1)
  int32_t zero_bytes;         // vector width of the zero pass
  int32_t narrow;             // every offset fits 32-bit index math
};

enum class Pass { kGather, kScatterWrite, kZero };

// Last entry whose first chunk is <= chunk: the one owning it (entries without chunks share their successor's first
// chunk and come before it, so they are never picked).
__device__ int64_t find_entry(const TableEntry* table, int64_t entries, int64_t chunk, bool zero_pass) {
  int64_t low = 0, high = entries - 1;
  while (low < high) {
    const int64_t mid = (low + high + 1) / 2;
    const int64_t first = zero_pass ? table[mid].first_zero_chunk : table[mid].first_copy_chunk;
    if (first <= chunk) {
      low = mid;
    } else {
      high = mid - 1;
    }
  }
  return low;
}

// Copy pass over compact vectors [begin, end) of one tensor: compact vector v = (row r, block k, vector e) sits at
// full row out_idx[r], block in_idx[g(r)][k]. Gather reads the full tensor there, scatter writes it.
template <typename V, typename I, Pass kPass>
__device__ void copy_vectors(const TableEntry& t, int64_t begin, int64_t end) {
  const I vectors_per_block = I(t.vectors_per_block), compact_blocks = I(t.compact_blocks);
  const I full_blocks = I(t.full_blocks), rows_per_group = I(t.rows_per_group), cols = I(t.cols);
  for (I v = I(begin) + threadIdx.x; v < I(end); v += blockDim.x) {
    const I e = v % vectors_per_block;
    const I block = v / vectors_per_block;
    const I k = block % compact_blocks;
    const I r = block / compact_blocks;
    I o = r;
    if (t.out_idx != nullptr) {
      const int64_t row = t.out_idx[r];
      CUDA_KERNEL_ASSERT(row >= 0 && row < t.full_rows);
      o = I(row);
    }
    I i = k;
    if (t.in_idx != nullptr) {
      const int64_t col = t.in_idx[(r / rows_per_group) * cols + k];
      CUDA_KERNEL_ASSERT(col >= 0 && col < t.full_cols);
      i = I(col);
    }
    const I full = (o * full_blocks + i) * vectors_per_block + e;
    if constexpr (kPass == Pass::kGather) {
      static_cast<V*>(t.compact_out)[v] = static_cast<const V*>(t.full)[full];
    } else {
      static_cast<V*>(t.full_out)[full] = static_cast<const V*>(t.compact_in)[v];
    }
  }
}

template <typename V>
__device__ void zero_vectors(const TableEntry& t, int64_t begin, int64_t end) {
  for (int64_t v = begin + threadIdx.x; v < end; v += blockDim.x) {
    static_cast<V*>(t.full_out)[v] = V{};
  }
}

// Calls fn(V{}) with V the vector type of `bytes` (uniform within a CUDA block: one block, one tensor).
template <typename Fn>
__device__ void with_vector(int32_t bytes, Fn&& fn) {
  switch (bytes) {
    case 16: fn(uint4{}); break;
    case 8: fn(uint2{}); break;
    case 4: fn(uint32_t{}); break;
    case 2: fn(uint16_t{}); break;
    default: fn(uint8_t{}); break;
  }
}

template <Pass kPass>
__global__ void many_kernel(const TableEntry* __restrict__ table, int64_t entries, int64_t chunks) {
  __shared__ TableEntry entry;
  constexpr bool kZeroPass = kPass == Pass::kZero;
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    if (threadIdx.x == 0) {
      entry = table[find_entry(table, entries, chunk, kZeroPass)];
    }
    __syncthreads();
    const int64_t first = kZeroPass ? entry.first_zero_chunk : entry.first_copy_chunk;
    const int64_t total = kZeroPass ? entry.zero_vectors : entry.copy_vectors;
    const int64_t begin = (chunk - first) * kChunkVectors;
    const int64_t end = begin + kChunkVectors < total ? begin + kChunkVectors : total;
    if constexpr (kZeroPass) {
      with_vector(entry.zero_bytes, [&](auto vector) { zero_vectors<decltype(vector)>(entry, begin, end); });
    } else if (entry.narrow) {
      with_vector(entry.copy_bytes,
                  [&](auto vector) { copy_vectors<decltype(vector), uint32_t, kPass>(entry, begin, end); });
    } else {
      with_vector(entry.copy_bytes,
                  [&](auto vector) { copy_vectors<decltype(vector), int64_t, kPass>(entry, begin, end); });
    }
    __syncthreads();  // everyone is done with `entry` before thread 0 loads the next one
  }
}

const int64_t* index_data(const std::optional<at::Tensor>& index, bool present, std::vector<at::Tensor>& holders) {
  if (!present) {
    return nullptr;
  }
  holders.push_back(index->contiguous());
  return holders.back().const_data_ptr<int64_t>();
}

// Geometry and copy-pass fields of one entry; `full` and `compact` are the contiguous tensors of the pair.
TableEntry make_entry(const ChannelGeometry& geo, const at::Tensor& full, const at::Tensor& compact,
                      const int64_t* out, const int64_t* in) {
  TableEntry t{};
  t.out_idx = out;
  t.in_idx = in;
  const int64_t element = full.element_size();
  const int64_t block_bytes = geo.block_elems() * element;
  t.copy_bytes = block_bytes == 0 ? 1 : cuda::vector_bytes(block_bytes, full.const_data_ptr(),
                                                            compact.const_data_ptr());
  t.vectors_per_block = std::max<int64_t>(1, block_bytes / t.copy_bytes);
  t.copy_vectors = compact.numel() * element / t.copy_bytes;
  t.compact_blocks = geo.compact_blocks_per_row();
  t.full_blocks = geo.full_blocks_per_row();
  t.rows_per_group = geo.rows_per_group;
  t.cols = geo.cols;
  t.full_rows = geo.full_rows;
  t.full_cols = geo.full_cols;
  t.narrow = cuda::fits_32bit(std::max(full.numel(), compact.numel()) * element / t.copy_bytes);
  return t;
}

// Sends the table to the GPU (one pinned host buffer, one async copy on `stream`) and launches the passes.
void launch(std::vector<TableEntry>& table, int64_t copy_chunks, int64_t zero_chunks, Pass copy_pass,
            const at::Device& device, cudaStream_t stream) {
  if (table.empty() || copy_chunks + zero_chunks == 0) {
    return;
  }
  const size_t bytes = table.size() * sizeof(TableEntry);
  at::HostAllocator* host_allocator = at::getHostAllocator(at::kCUDA);
  const at::DataPtr host = host_allocator->allocate(bytes);
  std::memcpy(host.get(), table.data(), bytes);
  const at::Tensor device_table = at::empty({static_cast<int64_t>(bytes)},
                                            at::TensorOptions().dtype(at::kByte).device(device));
  C10_CUDA_CHECK(cudaMemcpyAsync(device_table.mutable_data_ptr(), host.get(), bytes, cudaMemcpyHostToDevice, stream));
  // The pinned block goes back to torch's cache when `host` dies; the event keeps it from reuse until the copy ran.
  host_allocator->record_event(host.get(), host.get_context(),
                               c10::cuda::getCurrentCUDAStream(device.index()).unwrap());
  const auto* entries = static_cast<const TableEntry*>(device_table.const_data_ptr());
  const auto count = static_cast<int64_t>(table.size());
  const auto grid = [&](int64_t chunks) { return cuda::grid_for(chunks * cuda::kThreads, device.index()); };
  if (zero_chunks > 0) {
    many_kernel<Pass::kZero><<<grid(zero_chunks), cuda::kThreads, 0, stream>>>(entries, count, zero_chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (copy_chunks > 0) {
    if (copy_pass == Pass::kGather) {
      many_kernel<Pass::kGather><<<grid(copy_chunks), cuda::kThreads, 0, stream>>>(entries, count, copy_chunks);
    } else {
      many_kernel<Pass::kScatterWrite><<<grid(copy_chunks), cuda::kThreads, 0, stream>>>(entries, count,
                                                                                          copy_chunks);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

std::vector<at::Tensor> channel_gather_many_cuda(at::TensorList tensors, const OptionalTensorList& out_idx,
                                                 const OptionalTensorList& in_idx) {
  const std::vector<ChannelGeometry> geometry = check_gather_many_args(tensors, out_idx, in_idx);
  std::vector<at::Tensor> results;
  if (tensors.empty()) {
    return results;
  }
  const at::Device device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  std::vector<at::Tensor> holders;  // contiguous copies, alive until the kernel is queued
  std::vector<TableEntry> table;
  int64_t chunks = 0;
  results.reserve(tensors.size());
  for (size_t n = 0; n < tensors.size(); ++n) {
    const ChannelGeometry& geo = geometry[n];
    const at::Tensor full = tensors[n].contiguous();  // a handle: `holders` may reallocate below
    holders.push_back(full);
    results.push_back(at::empty(geo.compact_shape, tensors[n].options().memory_format(at::MemoryFormat::Contiguous)));
    if (results.back().numel() == 0) {
      continue;
    }
    TableEntry t = make_entry(geo, full, results.back(), index_data(out_idx.get(n), geo.has_out, holders),
                              index_data(in_idx.get(n), geo.has_in, holders));
    t.full = full.const_data_ptr();
    t.compact_out = results.back().mutable_data_ptr();
    t.first_copy_chunk = chunks;
    chunks += chunks_for(t.copy_vectors);
    table.push_back(t);
  }
  launch(table, chunks, 0, Pass::kGather, device, stream);
  return results;
}

std::vector<at::Tensor> channel_scatter_many_cuda(at::TensorList grads, const OptionalTensorList& out_idx,
                                                  const OptionalTensorList& in_idx, c10::IntArrayRef full_shapes) {
  const std::vector<ChannelGeometry> geometry = check_scatter_many_args(grads, out_idx, in_idx, full_shapes);
  std::vector<at::Tensor> results;
  if (grads.empty()) {
    return results;
  }
  const at::Device device = grads[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  std::vector<at::Tensor> holders;
  std::vector<TableEntry> table;
  int64_t copy_chunks = 0, zero_chunks = 0;
  results.reserve(grads.size());
  for (size_t n = 0; n < grads.size(); ++n) {
    const ChannelGeometry& geo = geometry[n];
    const at::Tensor compact = grads[n].contiguous();  // a handle: `holders` may reallocate below
    holders.push_back(compact);
    results.push_back(at::empty(geo.full_shape, grads[n].options().memory_format(at::MemoryFormat::Contiguous)));
    const at::Tensor& full = results.back();
    if (full.numel() == 0) {
      continue;
    }
    TableEntry t = make_entry(geo, full, compact, index_data(out_idx.get(n), geo.has_out, holders),
                              index_data(in_idx.get(n), geo.has_in, holders));
    t.compact_in = compact.const_data_ptr();
    t.full_out = full.mutable_data_ptr();
    const int64_t full_bytes = full.numel() * full.element_size();
    t.zero_bytes = cuda::vector_bytes(full_bytes, full.const_data_ptr(), full.const_data_ptr());
    t.zero_vectors = full_bytes / t.zero_bytes;
    t.first_zero_chunk = zero_chunks;
    zero_chunks += chunks_for(t.zero_vectors);
    t.first_copy_chunk = copy_chunks;
    copy_chunks += chunks_for(t.copy_vectors);
    table.push_back(t);
  }
  launch(table, copy_chunks, zero_chunks, Pass::kScatterWrite, device, stream);
  return results;
}

}  // namespace pyprune
