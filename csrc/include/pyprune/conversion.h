#pragma once
// The element types a converting gather / scatter (dtype= argument) moves between, for the CPU and CUDA files alike.

#include "pyprune/raw_types.h"

#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>

namespace pyprune {

// Calls fn(From{}, To{}): the same type when the dtypes agree (any element size, moved as raw bytes), else a pair of
// floating types converted with static_cast (c10::Half / c10::BFloat16 convert through float).
template <typename Fn>
void dispatch_conversion(at::ScalarType from, at::ScalarType to, const char* op, Fn&& fn) {
  if (from == to) {
    dispatch_by_size(c10::elementSize(from), op, [&](auto tag) { fn(tag, tag); });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, from, "pyprune converting copy", [&] {
    using From = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, to, "pyprune converting copy",
                                    [&] { fn(From{}, scalar_t{}); });
  });
}

}  // namespace pyprune
