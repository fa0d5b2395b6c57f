"""pyprune.kernels: the compiled ops (torch.ops.pyprune.*) and the pure-torch fallback against plain PyTorch.

Gather and scatter are copies, so results must match the indexing reference exactly (torch.equal). Most tests run
under both backends through the ``backend`` fixture (tests/conftest.py); op registration tests need the extension.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pyprune.kernels as kernels
from helpers import requires_cuda

REPO = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
requires_ext = pytest.mark.skipif(not kernels.extension_available(), reason="pyprune._C extension not built")


def index(values):
    return None if values is None else torch.tensor(values, dtype=torch.int64)


# (full shape, out index, in index): a 1-D or 2-D in index; a 2-D one is per group ([G, K_in_g]).
CASES = {
    "bias": ((7,), [0, 3, 6], None),
    "bias_all": ((7,), None, None),
    "linear": ((6, 5), [1, 2, 5], [0, 4]),
    "linear_in_only": ((6, 5), None, [3]),
    "conv": ((8, 6, 3, 3), [0, 2, 3, 7], [1, 2, 5]),
    "conv_out_only": ((8, 6, 3, 3), [4], None),
    "conv_one_channel": ((8, 6, 3, 3), [5], [2]),
    "conv_all_channels": ((8, 6, 3, 3), list(range(8)), list(range(6))),
    "conv1x1": ((8, 6, 1, 1), [1, 6], [0, 3, 5]),
    "grouped": ((8, 3, 3, 3), [0, 2, 5, 7], [[0, 2], [1, 2]]),
    "depthwise": ((6, 1, 3, 3), [0, 2, 5], [[0], [0], [0]]),
    "conv3d": ((4, 3, 2, 2, 2), [1, 3], [0, 2]),
    "conv5x5": ((6, 4, 5, 5), [0, 3, 5], [1, 2]),          # the CPU kernel's fixed-size block paths: 1, 9, 25, 49
    "conv7x7": ((4, 3, 7, 7), [1, 2], [0, 2]),
    "conv3d_long_block": ((3, 2, 4, 4, 5), [0, 2], [1]),   # 80-element blocks: the library-copy path
    "no_rows": ((8, 6, 3, 3), [], [1, 2]),                  # empty selections: scatter gives zeros
    "no_columns": ((6, 5), [1, 4], []),
}


def case_args(name, dtype=torch.float64, device="cpu"):
    shape, out_values, in_values = CASES[name]
    weight = torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device)
    out_idx, in_idx = index(out_values), index(in_values)
    return weight, (out_idx.to(device) if out_idx is not None else None), \
        (in_idx.to(device) if in_idx is not None else None)


def reference_gather(weight, out_idx, in_idx):
    """weight[out_idx][:, in_idx] by plain indexing; a grouped in_idx row g serves K_out // G consecutive rows."""
    rows = weight if out_idx is None else weight[out_idx]
    if in_idx is None:
        return rows.clone()
    if in_idx.dim() == 1:
        return rows[:, in_idx]
    rows_per_group = rows.shape[0] // in_idx.shape[0]
    return torch.stack([rows[r][in_idx[r // rows_per_group]] for r in range(rows.shape[0])])


def reference_scatter(grad, out_idx, in_idx, full_shape):
    full = torch.zeros(full_shape, dtype=grad.dtype, device=grad.device)
    rows = range(full_shape[0]) if out_idx is None else out_idx.tolist()
    rows_per_group = grad.shape[0] // (in_idx.shape[0] if in_idx is not None and in_idx.dim() == 2 else 1)
    for r, row in enumerate(rows):
        if in_idx is None:
            full[row] = grad[r]
        else:
            cols = in_idx if in_idx.dim() == 1 else in_idx[r // rows_per_group]
            full[row, cols] = grad[r]
    return full


# ----------------------------------------------------------------------------------------------- gather / scatter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_gather_matches_indexing(backend, case, dtype):
    weight, out_idx, in_idx = case_args(case, dtype)
    result = kernels.gather_channels(weight, out_idx, in_idx)
    expected = reference_gather(weight, out_idx, in_idx)
    assert result.is_contiguous() and result.dtype == dtype
    assert torch.equal(result, expected)
    assert result.data_ptr() != weight.data_ptr()  # a new tensor, even when everything is kept


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_scatter_matches_reference(backend, case, dtype):
    weight, out_idx, in_idx = case_args(case)
    grad = reference_gather(weight, out_idx, in_idx).to(dtype)
    result = kernels.scatter_channels(grad, out_idx, in_idx, list(weight.shape))
    assert result.shape == weight.shape and result.is_contiguous()
    assert torch.equal(result, reference_scatter(grad, out_idx, in_idx, weight.shape))


@pytest.mark.parametrize("case", CASES)
def test_gather_scatter_identities(backend, case):
    weight, out_idx, in_idx = case_args(case)
    compact = kernels.gather_channels(weight, out_idx, in_idx)
    full = kernels.scatter_channels(compact, out_idx, in_idx, weight.shape)  # torch.Size is a fine full_shape
    kept = kernels.scatter_channels(torch.ones_like(compact), out_idx, in_idx, weight.shape).bool()
    assert torch.equal(full, torch.where(kept, weight, torch.zeros_like(weight)))
    assert torch.equal(kernels.gather_channels(full, out_idx, in_idx), compact)
    assert int(kept.sum()) == compact.numel()  # each compact element lands on its own full element


def test_gather_of_non_contiguous_input(backend):
    weight = torch.randn(6, 8, 3, 3).transpose(0, 1)  # [8, 6, 3, 3], not contiguous
    out_idx, in_idx = index([0, 5, 7]), index([1, 4])
    assert torch.equal(kernels.gather_channels(weight, out_idx, in_idx), weight[out_idx][:, in_idx])


@pytest.mark.parametrize("case", ["linear", "conv", "grouped", "bias", "conv_out_only"])
def test_gradcheck_gather_and_scatter(backend, case):
    weight, out_idx, in_idx = case_args(case)
    weight.requires_grad_(True)
    gather = lambda w: kernels.gather_channels(w, out_idx, in_idx)  # noqa: E731
    assert torch.autograd.gradcheck(gather, (weight,))
    assert torch.autograd.gradgradcheck(gather, (weight,))
    grad = reference_gather(weight.detach(), out_idx, in_idx).requires_grad_(True)
    scatter = lambda g: kernels.scatter_channels(g, out_idx, in_idx, list(weight.shape))  # noqa: E731
    assert torch.autograd.gradcheck(scatter, (grad,))
    assert torch.autograd.gradgradcheck(scatter, (grad,))


def test_gather_backward_is_zero_filled_scatter(backend):
    weight, out_idx, in_idx = case_args("conv")
    weight.requires_grad_(True)
    upstream = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    kernels.gather_channels(weight, out_idx, in_idx).backward(upstream)
    assert torch.equal(weight.grad, reference_scatter(upstream, out_idx, in_idx, weight.shape))


# ------------------------------------------------------------------------------------------------- running stats
@pytest.mark.parametrize("compact_dtype", [torch.float32, torch.float64], ids=str)
def test_update_running_stats_touches_only_indexed_entries(backend, compact_dtype):
    running_mean, running_var = torch.randn(10), torch.rand(10)
    before_mean, before_var = running_mean.clone(), running_var.clone()
    idx = index([1, 4, 9])
    mean, var = torch.randn(3, dtype=compact_dtype), torch.rand(3, dtype=compact_dtype)
    assert kernels.update_running_stats_(running_mean, running_var, idx, mean, var) is None
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(running_mean[untouched], before_mean[untouched])
    assert torch.equal(running_var[untouched], before_var[untouched])
    assert torch.equal(running_mean[idx], mean.float()) and torch.equal(running_var[idx], var.float())


def test_update_running_stats_bumps_version_counters(backend):
    """Like aten in-place ops: caches keyed by tensor._version (DynamicOps in eval mode) must see the change."""
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    versions = running_mean._version, running_var._version
    kernels.update_running_stats_(running_mean, running_var, index([2]), torch.ones(1), torch.ones(1))
    assert running_mean._version > versions[0] and running_var._version > versions[1]


# ------------------------------------------------------------------------------------------------- torch.compile
def test_compile_fullgraph_has_no_graph_break(backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    def pruned_conv(x, weight, bias, out_idx, in_idx, running_mean, running_var):
        compact = kernels.gather_channels(weight, out_idx, in_idx)
        y = torch.nn.functional.conv2d(x.index_select(1, in_idx), compact, kernels.gather_channels(bias, out_idx))
        kernels.update_running_stats_(running_mean, running_var, out_idx, y.mean((0, 2, 3)), y.var((0, 2, 3)))
        return y.square().sum()

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(pruned_conv, backend=counter, fullgraph=True)
    x = torch.randn(2, 6, 5, 5)
    weight, out_idx, in_idx = case_args("conv", torch.float32)
    bias = torch.randn(8)
    results = []
    for fn in (compiled, pruned_conv):
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        stats = (torch.zeros(8), torch.ones(8))
        loss = fn(x, w, b, out_idx, in_idx, *stats)
        loss.backward()
        results.append((loss.detach(), w.grad, b.grad, *stats))
    assert counter.frame_count == 1  # one graph, no break
    for compiled_value, eager_value in zip(*results):
        torch.testing.assert_close(compiled_value, eager_value)


# ---------------------------------------------------------------------------------------- op registration (ext)
OPCHECK_GATHER_CASES = ["bias", "linear", "conv", "grouped", "bias_all", "linear_in_only"]


@requires_ext
@pytest.mark.parametrize("case", OPCHECK_GATHER_CASES)
def test_opcheck_channel_gather(case):
    torch.library.opcheck(torch.ops.pyprune.channel_gather.default, case_args(case))


@requires_ext
@pytest.mark.parametrize("case", ["linear", "grouped", "conv_out_only"])
def test_opcheck_channel_scatter(case):
    weight, out_idx, in_idx = case_args(case)
    grad = reference_gather(weight, out_idx, in_idx)
    torch.library.opcheck(torch.ops.pyprune.channel_scatter.default, (grad, out_idx, in_idx, list(weight.shape)))


@requires_ext
def test_opcheck_update_running_stats():
    args = (torch.zeros(6), torch.ones(6), index([0, 2, 3]), torch.randn(3), torch.rand(3))
    torch.library.opcheck(torch.ops.pyprune.update_running_stats_.default, args)


@requires_ext
@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.pyprune.channel_gather(torch.randn(4, 3), index([0]).int(), None), "out_idx must be an int64"),
    (lambda: torch.ops.pyprune.channel_gather(torch.randn(4), None, index([0])), "rank >= 2"),
    (lambda: torch.ops.pyprune.channel_gather(torch.randn(4, 3), index([[0]]), None), "out_idx must have 1"),
    (lambda: torch.ops.pyprune.channel_gather(torch.randn(4, 3), index([0, 1, 2]), index([[0], [1]])),
     "split evenly into 2 groups"),
    (lambda: torch.ops.pyprune.channel_gather(torch.randn(4, 3), index([4]), None), "out of range"),
    (lambda: torch.ops.pyprune.channel_scatter(torch.randn(2, 3), index([0]), None, [4, 3]), "grad has shape"),
    (lambda: torch.ops.pyprune.update_running_stats_(torch.zeros(4), torch.zeros(5), index([0]), torch.zeros(1),
                                                     torch.zeros(1)), "running_var has 5"),
    (lambda: torch.ops.pyprune.update_running_stats_(torch.zeros(4), torch.zeros(4), index([0, 1]), torch.zeros(1),
                                                     torch.zeros(1)), "mean must have shape [2]"),
])
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call()


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown pyprune kernel backend"):
        kernels.set_backend("triton")
    with kernels.use_backend("torch"):
        assert kernels.backend() == "torch"


# --------------------------------------------------------------------------------- fallback selection (subprocess)
def run_python(code, hide_extension=False, **env):
    """Run `code` in a fresh interpreter (backend selection happens at import) and return its stdout.
    hide_extension: make `import pyprune._C` fail there, as on a machine where it was never built."""
    code = textwrap.dedent(code)
    if hide_extension:
        code = "import sys\nsys.modules['pyprune._C'] = None\n" + code
    environment = {k: v for k, v in os.environ.items() if k != "PYPRUNE_BACKEND"}
    environment.update(env, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=environment, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_missing_extension_warns_once_and_falls_back():
    output = run_python("""
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import pyprune.kernels as kernels
            import pyprune.kernels
            import torch
            kernels.gather_channels(torch.randn(4, 3), torch.tensor([1]), None)
            kernels.gather_channels(torch.randn(4, 3), torch.tensor([2]), None)
        ours = [w for w in caught if issubclass(w.category, UserWarning) and "pyprune._C" in str(w.message)]
        try:
            kernels.set_backend("ext")
        except RuntimeError as error:
            refused = "could not be imported" in str(error)
        print(len(ours), kernels.backend(), kernels.extension_available(), refused,
              "pip install --no-build-isolation" in str(ours[0].message))
    """, hide_extension=True)
    assert output == "1 torch False True True"


def test_environment_forces_torch_backend_without_warning():
    code = """
        import warnings
        warnings.simplefilter("error")  # any warning would fail the import
        import pyprune.kernels as kernels
        print(kernels.backend())
    """
    assert run_python(code, PYPRUNE_BACKEND="torch") == "torch"
    assert run_python(code, hide_extension=True, PYPRUNE_BACKEND="torch") == "torch"


def test_environment_requesting_missing_extension_fails_clearly():
    output = run_python("""
        try:
            import pyprune.kernels
        except ImportError as error:
            print("ImportError", "PYPRUNE_BACKEND=ext" in str(error))
    """, hide_extension=True, PYPRUNE_BACKEND="ext")
    assert output == "ImportError True"


@requires_ext
def test_environment_selects_extension():
    assert run_python("import pyprune.kernels as k; print(k.backend())", PYPRUNE_BACKEND="ext") == "ext"


# --------------------------------------------------------------------------------------------------------- CUDA
@requires_cuda
@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_cuda_gather_and_scatter_match_cpu(case, dtype):
    weight, out_idx, in_idx = case_args(case, dtype, "cuda")
    with kernels.use_backend("ext"):
        compact = kernels.gather_channels(weight, out_idx, in_idx)
        full = kernels.scatter_channels(compact, out_idx, in_idx, list(weight.shape))
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    expected = reference_gather(weight.cpu(), cpu(out_idx), cpu(in_idx))
    assert compact.is_cuda and torch.equal(compact.cpu(), expected)
    assert torch.equal(full.cpu(), reference_scatter(expected, cpu(out_idx), cpu(in_idx), weight.shape))


@requires_cuda
@requires_ext
@pytest.mark.parametrize("inner, offset", [(1, 0), (2, 1), (4, 0), (9, 0), (16, 0), (16, 3), (64, 0)])
def test_cuda_vector_widths_and_alignment(inner, offset):
    """Blocks of 2..128 bytes, from base pointers off the 16-byte alignment, pick every vector width."""
    storage = torch.randn(offset + 12 * 10 * inner, device="cuda", dtype=torch.float16)
    weight = storage[offset:].view(12, 10, inner)
    out_idx, in_idx = index([0, 3, 4, 11]).cuda(), index([1, 2, 9]).cuda()
    with kernels.use_backend("ext"):
        for cols in (in_idx, None):
            compact = kernels.gather_channels(weight, out_idx, cols)
            assert torch.equal(compact, reference_gather(weight, out_idx, cols))
            full = kernels.scatter_channels(compact, out_idx, cols, list(weight.shape))
            assert torch.equal(full, reference_scatter(compact, out_idx, cols, weight.shape))


@requires_cuda
@requires_ext
def test_cuda_autograd_and_running_stats():
    weight, out_idx, in_idx = case_args("grouped", device="cuda")
    weight.requires_grad_(True)
    with kernels.use_backend("ext"):
        gather = lambda w: kernels.gather_channels(w, out_idx, in_idx)  # noqa: E731
        assert torch.autograd.gradcheck(gather, (weight,))
        assert torch.autograd.gradgradcheck(gather, (weight,))
        running_mean, running_var = torch.zeros(8, device="cuda"), torch.ones(8, device="cuda")
        kernels.update_running_stats_(running_mean, running_var, out_idx, torch.arange(4.0, device="cuda"),
                                      torch.full((4,), 2.0, device="cuda", dtype=torch.float64))
    assert running_mean.tolist() == [0, 0, 1, 0, 0, 2, 0, 3]
    assert running_var.tolist() == [2, 1, 2, 1, 1, 2, 1, 2]
