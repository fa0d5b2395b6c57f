#pragma once
// The channel kernels only move bytes, so they are instantiated per element *size* rather than per dtype: one
// instantiation serves float/int32, another half/bfloat16, and so on. That keeps every dtype supported and the
// build small.

#include <c10/util/Exception.h>
#include <cstdint>

namespace pyprune {

struct Raw16 {  // complex128 (8-byte alignment is enough for plain copies)
  uint64_t lo, hi;
};

// Calls fn(T{}) with T an unsigned type of `bytes` size (1, 2, 4, 8 or 16).
template <typename Fn>
decltype(auto) dispatch_by_size(int64_t bytes, const char* op, Fn&& fn) {
  switch (bytes) {
    case 1: return fn(uint8_t{});
    case 2: return fn(uint16_t{});
    case 4: return fn(uint32_t{});
    case 8: return fn(uint64_t{});
    case 16: return fn(Raw16{});
    default: TORCH_CHECK(false, op, ": unsupported element size of ", bytes, " bytes");
  }
}

}  // namespace pyprune
