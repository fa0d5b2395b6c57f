"""pyprune.kernels.gather_channels_many / scatter_channels_many (torch.ops.pyprune.channel_gather_many /
channel_scatter_many): one call for a list of tensors must equal gather_channels / scatter_channels per tensor.

The single-tensor ops are checked against plain indexing in tests/test_kernels.py; here the list ops are checked
against them, exactly (copies), on both backends through the ``backend`` fixture (tests/conftest.py).
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import pyprune.kernels as kernels
from helpers import requires_cuda

requires_ext = pytest.mark.skipif(not kernels.extension_available(), reason="pyprune._C extension not built")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def index(values):
    return None if values is None else torch.tensor(values, dtype=torch.int64)


# (full shape, out index, in index) of one list: conv, grouped conv, depthwise, linear, bias, None indices, 3-D,
# an empty selection, and 5x5 / 80-element blocks.
MIXED = [
    ((8, 6, 3, 3), [0, 2, 3, 7], [1, 2, 5]),
    ((8, 3, 3, 3), [0, 2, 5, 7], [[0, 2], [1, 2]]),
    ((6, 1, 3, 3), [0, 2, 5], [[0], [0], [0]]),
    ((6, 5), [1, 2, 5], [0, 4]),
    ((7,), [0, 3, 6], None),
    ((7,), None, None),
    ((6, 5), None, [3]),
    ((8, 6, 3, 3), [4], None),
    ((4, 3, 5), [1, 3], [0, 2]),
    ((5, 4), [], [1]),
    ((6, 4, 5, 5), [0, 3, 5], [1, 2]),
    ((3, 2, 4, 4, 5), [0, 2], [1]),
]


def mixed_list(dtypes=(torch.float64,), device="cpu", cases=MIXED):
    """Tensors (dtypes cycled over the list), out indices, in indices."""
    tensors = [torch.randn(shape, dtype=torch.float64).to(dtypes[n % len(dtypes)]).to(device)
               for n, (shape, _, _) in enumerate(cases)]
    on_device = lambda values: None if values is None else index(values).to(device)  # noqa: E731
    return tensors, [on_device(o) for _, o, _ in cases], [on_device(i) for _, _, i in cases]


def per_tensor_gather(tensors, out_indices, in_indices):
    return [kernels.gather_channels(t, o, i) for t, o, i in zip(tensors, out_indices, in_indices)]


def assert_all_equal(results, expected):
    assert len(results) == len(expected)
    for n, (result, reference) in enumerate(zip(results, expected)):
        assert result.dtype == reference.dtype and result.shape == reference.shape, n
        assert result.is_contiguous() and torch.equal(result, reference), n


# ----------------------------------------------------------------------------------------------- gather / scatter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_many_equals_gather_per_tensor(backend, dtype):
    tensors, out_indices, in_indices = mixed_list((dtype,))
    results = kernels.gather_channels_many(tensors, out_indices, in_indices)
    assert_all_equal(results, per_tensor_gather(tensors, out_indices, in_indices))
    assert all(r.data_ptr() != t.data_ptr() for r, t in zip(results, tensors) if t.numel())  # new tensors


def test_gather_many_mixes_dtypes_in_one_list(backend):
    tensors, out_indices, in_indices = mixed_list(DTYPES)
    assert {t.dtype for t in tensors} == set(DTYPES)
    results = kernels.gather_channels_many(tensors, out_indices, in_indices)
    assert_all_equal(results, per_tensor_gather(tensors, out_indices, in_indices))


def test_gather_many_defaults_to_no_indices_and_takes_tuples(backend):
    tensors = (torch.randn(4, 3), torch.randn(5))
    assert_all_equal(kernels.gather_channels_many(tensors), [t.clone() for t in tensors])
    assert kernels.gather_channels_many([]) == []


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_many_equals_scatter_per_tensor(backend, dtype):
    tensors, out_indices, in_indices = mixed_list()
    grads = [g.to(dtype) for g in per_tensor_gather(tensors, out_indices, in_indices)]
    shapes = [t.shape for t in tensors]
    results = kernels.scatter_channels_many(grads, out_indices, in_indices, shapes)
    expected = [kernels.scatter_channels(g, o, i, s) for g, o, i, s in zip(grads, out_indices, in_indices, shapes)]
    assert_all_equal(results, expected)


def test_gather_many_of_non_contiguous_input(backend):
    weight = torch.randn(6, 8, 3, 3).transpose(0, 1)
    out_idx, in_idx = index([0, 5, 7]), index([1, 4])
    [result] = kernels.gather_channels_many([weight], [out_idx], [in_idx])
    assert torch.equal(result, weight[out_idx][:, in_idx])


# ----------------------------------------------------------------------------------------------------- autograd
# Small (gradcheck perturbs every element): conv, grouped conv, linear, bias, no indices, 3-D.
GRAD_CASES = [
    ((4, 3, 2, 2), [0, 3], [1, 2]),
    ((4, 2, 2, 1), [0, 3], [[1], [0]]),
    ((5, 4), [1, 4], [0, 2]),
    ((5,), [0, 3], None),
    ((3,), None, None),
    ((3, 2, 2), [2], [1]),
]


def test_gradcheck_gather_many_and_scatter_many(backend):
    tensors, out_indices, in_indices = mixed_list(cases=GRAD_CASES)
    gather = lambda *ts: kernels.gather_channels_many(ts, out_indices, in_indices)  # noqa: E731
    inputs = tuple(t.requires_grad_(True) for t in tensors)
    assert torch.autograd.gradcheck(gather, inputs)
    assert torch.autograd.gradgradcheck(gather, inputs)
    shapes = [t.shape for t in tensors]
    compact = tuple(g.detach().requires_grad_(True) for g in per_tensor_gather(tensors, out_indices, in_indices))
    scatter = lambda *gs: kernels.scatter_channels_many(gs, out_indices, in_indices, shapes)  # noqa: E731
    assert torch.autograd.gradcheck(scatter, compact)
    assert torch.autograd.gradgradcheck(scatter, compact)


def test_backward_reaches_only_used_outputs_and_inputs_that_need_it(backend):
    tensors, out_indices, in_indices = mixed_list(cases=GRAD_CASES)
    for n in (0, 1, 3):
        tensors[n].requires_grad_(True)
    results = kernels.gather_channels_many(tensors, out_indices, in_indices)
    assert [r.requires_grad for r in results] == [True, True, False, True, False, False]
    upstream = torch.randn_like(results[1])
    (results[1] * upstream).sum().backward()
    assert tensors[0].grad is None and tensors[3].grad is None  # output unused in the loss: no gradient at all
    expected = kernels.scatter_channels(upstream, out_indices[1], in_indices[1], tensors[1].shape)
    assert torch.equal(tensors[1].grad, expected)


def test_backward_equals_per_tensor_backward(backend):
    tensors, out_indices, in_indices = mixed_list((torch.float32,), cases=GRAD_CASES)
    copies = [t.clone().requires_grad_(True) for t in tensors]
    tensors = [t.requires_grad_(True) for t in tensors]
    upstream = [torch.randn_like(g) for g in per_tensor_gather(tensors, out_indices, in_indices)]
    loss = lambda outs: sum((o * u).sum() for o, u in zip(outs, upstream))  # noqa: E731
    loss(kernels.gather_channels_many(tensors, out_indices, in_indices)).backward()
    loss(per_tensor_gather(copies, out_indices, in_indices)).backward()
    assert_all_equal([t.grad for t in tensors], [c.grad for c in copies])


# ------------------------------------------------------------------------------------------------- torch.compile
def test_compile_fullgraph_has_no_graph_break(backend):
    def compact_model(x, weights, out_indices, in_indices):
        conv_w, conv_b, fc_w = kernels.gather_channels_many(weights, out_indices, in_indices)
        y = torch.nn.functional.conv2d(x.index_select(1, in_indices[0]), conv_w, conv_b).mean((2, 3))
        return torch.nn.functional.linear(y, fc_w).square().sum()

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compact_model, backend=counter, fullgraph=True)
    x = torch.randn(2, 6, 5, 5)
    weights = [torch.randn(8, 6, 3, 3), torch.randn(8), torch.randn(3, 8)]
    out_indices = [index([0, 2, 3, 7]), index([0, 2, 3, 7]), None]
    in_indices = [index([1, 2, 5]), None, index([0, 2, 3, 7])]
    results = []
    for fn in (compiled, compact_model):
        leaves = [w.clone().requires_grad_(True) for w in weights]
        loss = fn(x, leaves, out_indices, in_indices)
        loss.backward()
        results.append([loss.detach()] + [w.grad for w in leaves])
    assert counter.frame_count == 1
    for compiled_value, eager_value in zip(*results):
        torch.testing.assert_close(compiled_value, eager_value)


# ---------------------------------------------------------------------------------------- op registration (ext)
@requires_ext
def test_opcheck_channel_gather_many():
    tensors, out_indices, in_indices = mixed_list(cases=GRAD_CASES)
    torch.library.opcheck(torch.ops.pyprune.channel_gather_many.default, (tensors, out_indices, in_indices))


@requires_ext
def test_opcheck_channel_scatter_many():
    tensors, out_indices, in_indices = mixed_list(cases=GRAD_CASES)
    grads = per_tensor_gather(tensors, out_indices, in_indices)
    full_shapes = [size for t in tensors for size in t.shape]
    torch.library.opcheck(torch.ops.pyprune.channel_scatter_many.default, (grads, out_indices, in_indices, full_shapes))


@requires_ext
def test_ops_are_pt2_compliant():
    for op in (torch.ops.pyprune.channel_gather_many, torch.ops.pyprune.channel_scatter_many):
        assert torch.Tag.pt2_compliant_tag in op.default.tags


# -------------------------------------------------------------------------------------------------- bad arguments
def test_bad_arguments_list_lengths(backend):
    tensors = [torch.randn(4, 3), torch.randn(4)]
    with pytest.raises(ValueError, match=r"gather_channels_many: .* per tensor of tensors \(2\), got 1 and 2"):
        kernels.gather_channels_many(tensors, [None], [None, None])
    with pytest.raises(ValueError, match=r"full_shapes needs one shape per gradient \(2\), got 1"):
        kernels.scatter_channels_many(tensors, None, None, [(4, 3)])


@requires_ext
@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.pyprune.channel_gather_many([torch.randn(4, 3)], [None, None], [None]),
     "out_idx and in_idx need one entry (an index or None) per tensor of tensors (1), got 2 and 1"),
    (lambda: torch.ops.pyprune.channel_gather_many([torch.randn(4, 3), torch.randn(4)], [None, index([0]).int()],
                                                   [None, None]),
     "channel_gather_many: tensors[1]: out_idx must be an int64"),
    (lambda: torch.ops.pyprune.channel_gather_many([torch.randn(4, 3), torch.randn(4)], [None, None],
                                                   [None, index([0])]),
     "channel_gather_many: tensors[1]: in_idx needs a tensor of rank >= 2"),
    (lambda: torch.ops.pyprune.channel_gather_many([torch.randn(4, 3)], [index([0, 4])], [None]),
     "channel_gather_many: tensors[0]: out_idx[1] = 4 is out of range for a dimension of size 4"),
    (lambda: torch.ops.pyprune.channel_gather_many([torch.randn(4, 3)], [index([0, 1, 2])], [index([[0], [1]])]),
     "split evenly into 2 groups"),
    (lambda: torch.ops.pyprune.channel_scatter_many([torch.randn(2, 3)], [index([0, 1])], [None], [4]),
     "full_shapes must concatenate the full shape of every gradient (2 sizes for these ranks), got 1"),
    (lambda: torch.ops.pyprune.channel_scatter_many([torch.randn(2), torch.randn(2, 3)], [None, index([0])],
                                                    [None, None], [2, 4, 3]),
     "channel_scatter_many: grads[1]: grad has shape [2, 3] but gathering from full_shape [4, 3]"),
])
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(RuntimeError) as error:
        call()
    assert message in str(error.value)


# --------------------------------------------------------------------------------------------------------- CUDA
def many_shapes(count):
    """A long list of varied sizes (1-D up to a 2 MB conv weight): many table entries, many chunks per tensor."""
    generator = torch.Generator().manual_seed(1)
    cases = []
    for n in range(count):
        c_out, c_in = (int(v) for v in torch.randint(1, 96, (2,), generator=generator))
        keep = lambda c: sorted(torch.randperm(c, generator=generator)[:max(1, c // 2)].tolist())  # noqa: E731
        shape = [(c_out,), (c_out, c_in), (c_out, c_in, 3, 3), (c_out, c_in, 1, 1)][n % 4]
        cases.append((shape, keep(c_out), keep(c_in) if len(shape) > 1 else None))
    cases.append(((512, 256, 3, 3), list(range(0, 512, 2)), list(range(1, 256, 2))))
    return cases


@pytest.mark.cuda
@requires_cuda
@requires_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_gather_and_scatter_many_match_cpu(dtype):
    cases = MIXED + many_shapes(40)
    tensors, out_indices, in_indices = mixed_list((dtype,), "cuda", cases)
    cpu = lambda ts: [None if t is None else t.cpu() for t in ts]  # noqa: E731
    with kernels.use_backend("ext"):
        compact = kernels.gather_channels_many(tensors, out_indices, in_indices)
        assert_all_equal([c.cpu() for c in compact], per_tensor_gather(cpu(tensors), cpu(out_indices), cpu(in_indices)))
        full = kernels.scatter_channels_many(compact, out_indices, in_indices, [t.shape for t in tensors])
        expected = [kernels.scatter_channels(c.cpu(), o, i, t.shape)
                    for c, o, i, t in zip(compact, cpu(out_indices), cpu(in_indices), tensors)]
    assert_all_equal([f.cpu() for f in full], expected)


@pytest.mark.cuda
@requires_cuda
@requires_ext
def test_cuda_unaligned_views_and_autograd():
    storage = torch.randn(3 + 12 * 10 * 9, device="cuda", dtype=torch.float16)
    tensors = [storage[3:].view(12, 10, 9), torch.randn(12, 10, device="cuda", dtype=torch.float64)]
    out_indices = [index([0, 3, 4, 11]).cuda(), index([1, 2]).cuda()]
    in_indices = [index([1, 2, 9]).cuda(), None]
    with kernels.use_backend("ext"):
        results = kernels.gather_channels_many(tensors, out_indices, in_indices)
        assert_all_equal(results, per_tensor_gather(tensors, out_indices, in_indices))
        leaf = tensors[1].clone().requires_grad_(True)
        gather = lambda w: kernels.gather_channels_many([w], out_indices[1:], in_indices[1:])[0]  # noqa: E731
        assert torch.autograd.gradcheck(gather, (leaf,))
        assert torch.autograd.gradgradcheck(gather, (leaf,))


@pytest.mark.cuda
@requires_cuda
@requires_ext
def test_cuda_many_is_sync_free_and_replays_in_a_cuda_graph():
    tensors, out_indices, in_indices = mixed_list((torch.float32,), "cuda", MIXED + many_shapes(8))
    with kernels.use_backend("ext"):
        kernels.gather_channels_many(tensors, out_indices, in_indices)  # warm-up outside the graph
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            kernels.gather_channels_many(tensors, out_indices, in_indices)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = kernels.gather_channels_many(tensors, out_indices, in_indices)
        for _ in range(2):  # new weights, same pointers: each replay copies the current values
            for t in tensors:
                t.copy_(torch.randn_like(t))
            graph.replay()
            torch.cuda.synchronize()
            assert_all_equal(captured, per_tensor_gather(tensors, out_indices, in_indices))
