// ctest for the C++ build (CMakeLists.txt): calls the pyprune ops through the dispatcher, the way C++ users do,
// and compares them with index_select. Exit status 0 = all checks passed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

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

at::Tensor gather(const at::Tensor& w, const OptionalTensor& out_idx, const OptionalTensor& in_idx) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyprune::channel_gather", "")
                             .typed<at::Tensor(const at::Tensor&, const OptionalTensor&, const OptionalTensor&)>();
  return op.call(w, out_idx, in_idx);
}

at::Tensor scatter(const at::Tensor& grad, const OptionalTensor& out_idx, const OptionalTensor& in_idx,
                   c10::IntArrayRef full_shape) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyprune::channel_scatter", "")
          .typed<at::Tensor(const at::Tensor&, const OptionalTensor&, const OptionalTensor&, c10::SymIntArrayRef)>();
  return op.call(grad, out_idx, in_idx, c10::fromIntArrayRefSlow(full_shape));
}

void update_running_stats(at::Tensor& mean, at::Tensor& var, const at::Tensor& idx, const at::Tensor& m,
                          const at::Tensor& v) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyprune::update_running_stats_", "")
                             .typed<void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&)>();
  op.call(mean, var, idx, m, v);
}

void run_checks(const at::TensorOptions& options, const std::string& device) {
  const auto idx = [&](std::vector<int64_t> values) {
    return at::tensor(values, at::kLong).to(options.device());
  };
  const at::Tensor conv = at::randn({8, 6, 3, 3}, options);
  const at::Tensor out_idx = idx({0, 2, 5, 7});
  const at::Tensor in_idx = idx({1, 4});
  const at::Tensor expected = conv.index_select(0, out_idx).index_select(1, in_idx);
  const at::Tensor compact = gather(conv, out_idx, in_idx);
  check(at::equal(compact, expected), device + " conv gather == index_select");
  check(at::equal(gather(conv, std::nullopt, in_idx), conv.index_select(1, in_idx)), device + " in-only gather");
  check(at::equal(gather(conv, out_idx, std::nullopt), conv.index_select(0, out_idx)), device + " out-only gather");
  const at::Tensor bias = at::randn({8}, options);
  check(at::equal(gather(bias, out_idx, std::nullopt), bias.index_select(0, out_idx)), device + " 1-D gather");

  // Grouped: 2 groups of 4 rows, [8, 3, 3, 3]; compact rows 0-1 use columns {0, 2}, rows 2-3 use {1, 2}.
  const at::Tensor grouped = at::randn({8, 3, 3, 3}, options);
  const at::Tensor group_cols = idx({0, 2, 1, 2}).view({2, 2});
  const at::Tensor grouped_rows = grouped.index_select(0, out_idx);
  const at::Tensor grouped_expected =
      at::cat({grouped_rows.slice(0, 0, 2).index_select(1, group_cols[0]),
               grouped_rows.slice(0, 2, 4).index_select(1, group_cols[1])});
  check(at::equal(gather(grouped, out_idx, group_cols), grouped_expected), device + " grouped gather");

  const at::Tensor full = scatter(compact, out_idx, in_idx, conv.sizes());
  at::Tensor mask = at::zeros({8, 6, 1, 1}, options);
  mask.index_fill_(0, out_idx, 1);
  at::Tensor col_mask = at::zeros({1, 6, 1, 1}, options);
  col_mask.index_fill_(1, in_idx, 1);
  check(at::equal(full, conv * mask * col_mask), device + " scatter == zero-filled masked weight");
  check(at::equal(gather(full, out_idx, in_idx), compact), device + " gather(scatter(x)) == x");

  at::Tensor running_mean = at::zeros({8}, options);
  at::Tensor running_var = at::ones({8}, options);
  const at::Tensor values = at::arange(1, 5, options);
  update_running_stats(running_mean, running_var, out_idx, values, values * 2);
  at::Tensor expected_mean = at::zeros({8}, options);
  expected_mean.index_copy_(0, out_idx, values);
  at::Tensor expected_var = at::ones({8}, options);
  expected_var.index_copy_(0, out_idx, values * 2);
  check(at::equal(running_mean, expected_mean) && at::equal(running_var, expected_var),
        device + " update_running_stats_ writes only the indexed entries");

  // Autograd is registered in C++ too: d(sum(gather(w)))/dw is the scatter of ones.
  const at::Tensor weight = conv.clone().requires_grad_(true);
  gather(weight, out_idx, in_idx).sum().backward();
  check(at::equal(weight.grad(), mask.expand_as(conv) * col_mask), device + " backward of gather");
}

}  // namespace

int main() {
  try {
    run_checks(at::TensorOptions().dtype(at::kFloat), "cpu");
    bool threw = false;
    try {
      gather(at::randn({4, 3}), at::tensor(std::vector<int32_t>{0}, at::kInt), std::nullopt);
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
