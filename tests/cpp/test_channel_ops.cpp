// ctest for the C++ build (CMakeLists.txt): calls the pyprune ops through their typed front door pyprune/ops.h,
// the way C++ users do, and compares them with index_select. Exit status 0 = all checks passed.
#include "pyprune/ops.h"

#include <ATen/ATen.h>

#include <functional>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

namespace {

using OptionalTensor = std::optional<at::Tensor>;

int failures = 0;

void check(bool ok, const std::string& what) {
  std::cout << (ok ? "ok   " : "FAIL ") << what << std::endl;
  failures += ok ? 0 : 1;
}

using pyprune::OptionalTensorList;
using pyprune::ops::channel_gather;
using pyprune::ops::channel_gather_many;
using pyprune::ops::channel_scatter;
using pyprune::ops::channel_scatter_many;
using pyprune::ops::update_running_stats_;

void run_checks(const at::TensorOptions& options, const std::string& device) {
  const auto idx = [&](std::vector<int64_t> values) {
    return at::tensor(values, at::kLong).to(options.device());
  };
  const at::Tensor conv = at::randn({8, 6, 3, 3}, options);
  const at::Tensor out_idx = idx({0, 2, 5, 7});
  const at::Tensor in_idx = idx({1, 4});
  const at::Tensor expected = conv.index_select(0, out_idx).index_select(1, in_idx);
  const at::Tensor compact = channel_gather(conv, out_idx, in_idx);
  check(at::equal(compact, expected), device + " conv gather == index_select");
  check(at::equal(channel_gather(conv, std::nullopt, in_idx), conv.index_select(1, in_idx)),
        device + " in-only gather");
  check(at::equal(channel_gather(conv, out_idx), conv.index_select(0, out_idx)), device + " out-only gather");
  const at::Tensor bias = at::randn({8}, options);
  check(at::equal(channel_gather(bias, out_idx), bias.index_select(0, out_idx)), device + " 1-D gather");

  // Grouped: 2 groups of 4 rows, [8, 3, 3, 3]; compact rows 0-1 use columns {0, 2}, rows 2-3 use {1, 2}.
  const at::Tensor grouped = at::randn({8, 3, 3, 3}, options);
  const at::Tensor group_cols = idx({0, 2, 1, 2}).view({2, 2});
  const at::Tensor grouped_rows = grouped.index_select(0, out_idx);
  const at::Tensor grouped_expected =
      at::cat({grouped_rows.slice(0, 0, 2).index_select(1, group_cols[0]),
               grouped_rows.slice(0, 2, 4).index_select(1, group_cols[1])});
  check(at::equal(channel_gather(grouped, out_idx, group_cols), grouped_expected), device + " grouped gather");

  const at::Tensor full = channel_scatter(compact, out_idx, in_idx, conv.sizes());
  at::Tensor mask = at::zeros({8, 6, 1, 1}, options);
  mask.index_fill_(0, out_idx, 1);
  at::Tensor col_mask = at::zeros({1, 6, 1, 1}, options);
  col_mask.index_fill_(1, in_idx, 1);
  check(at::equal(full, conv * mask * col_mask), device + " scatter == zero-filled masked weight");
  check(at::equal(channel_gather(full, out_idx, in_idx), compact), device + " gather(scatter(x)) == x");

  at::Tensor running_mean = at::zeros({8}, options);
  at::Tensor running_var = at::ones({8}, options);
  const at::Tensor values = at::arange(1, 5, options);
  update_running_stats_(running_mean, running_var, out_idx, values, values * 2);
  at::Tensor expected_mean = at::zeros({8}, options);
  expected_mean.index_copy_(0, out_idx, values);
  at::Tensor expected_var = at::ones({8}, options);
  expected_var.index_copy_(0, out_idx, values * 2);
  check(at::equal(running_mean, expected_mean) && at::equal(running_var, expected_var),
        device + " update_running_stats_ writes only the indexed entries");

  // Autograd is registered in C++ too: d(sum(gather(w)))/dw is the scatter of ones.
  const at::Tensor weight = conv.clone().requires_grad_(true);
  channel_gather(weight, out_idx, in_idx).sum().backward();
  check(at::equal(weight.grad(), mask.expand_as(conv) * col_mask), device + " backward of gather");

  // The list ops: one call equals one single call per tensor, and each gradient goes back to its own tensor.
  const OptionalTensorList many_out({out_idx, std::nullopt, out_idx});
  const OptionalTensorList many_in({in_idx, std::nullopt, group_cols});
  const std::vector<at::Tensor> compacts = channel_gather_many({conv, bias, grouped}, many_out, many_in);
  check(compacts.size() == 3 && at::equal(compacts[0], compact) && at::equal(compacts[1], bias) &&
            at::equal(compacts[2], grouped_expected),
        device + " gather_many == gather per tensor");
  const std::vector<int64_t> full_shapes{8, 6, 3, 3, 8, 8, 3, 3, 3};
  const std::vector<at::Tensor> fulls = channel_scatter_many(compacts, many_out, many_in, full_shapes);
  check(fulls.size() == 3 && at::equal(fulls[0], full) && at::equal(fulls[1], bias) &&
            at::equal(fulls[2], channel_scatter(grouped_expected, out_idx, group_cols, grouped.sizes())),
        device + " scatter_many == scatter per tensor");
  const at::Tensor leaf = bias.clone().requires_grad_(true);
  channel_gather_many({conv, leaf}, OptionalTensorList({std::nullopt, out_idx}),
                      OptionalTensorList({std::nullopt, std::nullopt}))[1].sum().backward();
  check(at::equal(leaf.grad(), at::zeros({8}, options).index_fill_(0, out_idx, 1)),
        device + " backward of gather_many");
}

}  // namespace

int main() {
  try {
    run_checks(at::TensorOptions().dtype(at::kFloat), "cpu");
    bool threw = false;
    try {
      channel_gather(at::randn({4, 3}), at::tensor(std::vector<int32_t>{0}, at::kInt), std::nullopt);
    } catch (const c10::Error& error) {
      threw = std::string(error.what()).find("must be an int64 tensor") != std::string::npos;
    }
    check(threw, "int32 index rejected with a clear message");
#ifdef PYPRUNE_WITH_CUDA
    if (at::hasCUDA()) {
      run_checks(at::TensorOptions().dtype(at::kFloat).device(at::kCUDA), "cuda");
    } else {
      std::cout << "skip cuda checks: no GPU" << std::endl;
    }
#endif
  } catch (const std::exception& error) {
    std::cout << "FAIL exception: " << error.what() << std::endl;
    return 1;
  }
  std::cout << (failures == 0 ? "all checks passed" : std::to_string(failures) + " check(s) failed") << std::endl;
  return failures == 0 ? 0 : 1;
}
