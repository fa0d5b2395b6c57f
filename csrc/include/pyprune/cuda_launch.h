#pragma once
// Launch helpers shared by the CUDA kernels (only included from .cu files).

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace pyprune {
namespace cuda {

constexpr int kThreads = 256;

// Grid for a grid-stride loop over `work` items: enough blocks to fill the GPU a few times over, never more than
// the work needs. The SM count is cached per device (querying it each call would cost more than small kernels).
inline unsigned grid_for(int64_t work, c10::DeviceIndex device) {
  constexpr int kMaxDevices = 64;
  static int sm_count[kMaxDevices] = {0};
  int& sms = sm_count[device % kMaxDevices];
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  }
  const int64_t needed = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(needed, int64_t(sms) * 8)));
}

// 32-bit index math is several times cheaper than 64-bit on the GPU; use it whenever every offset (and the
// grid-stride increment added to it) fits.
inline bool fits_32bit(int64_t largest_offset) {
  return largest_offset < (int64_t(1) << 31);
}

// Widest vector (16, 8, 4, 2 or 1 bytes) that divides the block size and keeps both base pointers aligned.
inline int vector_bytes(int64_t block_bytes, const void* a, const void* b) {
  const auto pa = reinterpret_cast<uintptr_t>(a);
  const auto pb = reinterpret_cast<uintptr_t>(b);
  for (int width : {16, 8, 4, 2}) {
    if (block_bytes % width == 0 && pa % width == 0 && pb % width == 0) {
      return width;
    }
  }
  return 1;
}

// Calls fn(V{}) with V a trivially copyable type of `bytes` size, aligned to it (uint4 for 16 bytes).
template <typename Fn>
void dispatch_vector(int bytes, Fn&& fn) {
  switch (bytes) {
    case 16: fn(uint4{}); break;
    case 8: fn(uint2{}); break;
    case 4: fn(uint32_t{}); break;
    case 2: fn(uint16_t{}); break;
    default: fn(uint8_t{}); break;
  }
}

}  // namespace cuda
}  // namespace pyprune
