"""Converting gathers: ``gather_channels(..., dtype=, memory_format=)`` writes the compact copy in
the autocast dtype / channels_last in one pass, its backward scatters the gradient back into the full tensor's dtype
(and layout); DynamicConv2d / DynamicLinear use it under autocast and for channels_last inputs. Everything must equal
the per-op path followed by a cast / layout copy, value for value."""
import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F

import pyprune.kernels as kernels
from helpers import requires_cuda
from models import SmallNet
from pyprune.mutators import ChannelMutator
from pyprune.ops import DynamicConv2d, DynamicLinear

CASES = {  # (full shape, out index, in index)
    "bias": ((7,), [0, 3, 6], None),
    "linear": ((6, 5), [1, 2, 5], [0, 4]),
    "linear_in_only": ((6, 5), None, [3]),
    "conv": ((8, 6, 3, 3), [0, 2, 3, 7], [1, 2, 5]),
    "conv_out_only": ((8, 6, 3, 3), [4], None),
    "conv1x1": ((8, 6, 1, 1), [1, 6], [0, 3, 5]),
    "grouped": ((8, 3, 3, 3), [0, 2, 5, 7], [[0, 2], [1, 2]]),
    "depthwise": ((6, 1, 3, 3), [0, 2, 5], [[0], [0], [0]]),
    "conv3d": ((4, 3, 2, 2, 2), [1, 3], [0, 2]),
    "no_rows": ((8, 6, 3, 3), [], [1, 2]),
}
CONV_CASES = [name for name, (shape, _, _) in CASES.items() if len(shape) == 4]
LOW_PRECISION = (torch.bfloat16, torch.float16)


def case_args(name, dtype=torch.float32, device="cpu"):
    shape, out_values, in_values = CASES[name]
    weight = torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device)
    as_index = lambda v: None if v is None else torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
    return weight, as_index(out_values), as_index(in_values)


def channels_last_of(tensor):
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(tensor.dim())


# ------------------------------------------------------------------------------------------------------ the op
@pytest.mark.parametrize("dtype", LOW_PRECISION + (torch.float64,), ids=str)
@pytest.mark.parametrize("case", CASES)
def test_gather_to_dtype_equals_gather_then_cast(backend, case, dtype):
    weight, out_idx, in_idx = case_args(case)
    result = kernels.gather_channels(weight, out_idx, in_idx, dtype=dtype)
    assert result.dtype == dtype and result.is_contiguous()
    assert torch.equal(result, kernels.gather_channels(weight, out_idx, in_idx).to(dtype))


@pytest.mark.parametrize("source_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", [name for name in CASES if len(CASES[name][0]) >= 4])
def test_gather_to_channels_last(backend, case, source_layout):
    weight, out_idx, in_idx = case_args(case)
    layout = channels_last_of(weight)
    if source_layout == "channels_last":
        weight = weight.contiguous(memory_format=layout)
    expected = kernels.gather_channels(weight, out_idx, in_idx)
    for dtype in (None, torch.bfloat16):
        result = kernels.gather_channels(weight, out_idx, in_idx, dtype=dtype, memory_format=layout)
        assert result.is_contiguous(memory_format=layout)
        assert torch.equal(result, expected.to(dtype or expected.dtype))
    # a channels_last source with no arguments still gives the contiguous copy it always gave
    assert expected.is_contiguous() and torch.equal(expected, kernels.gather_channels(weight.contiguous(), out_idx,
                                                                                      in_idx))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_backward_scatters_into_the_full_dtype(backend, case, dtype):
    weight, out_idx, in_idx = case_args(case)
    weight.requires_grad_(True)
    compact = kernels.gather_channels(weight, out_idx, in_idx, dtype=dtype)
    upstream = torch.randn(compact.shape).to(dtype)
    (grad,) = torch.autograd.grad(compact, weight, upstream)
    assert grad.dtype == torch.float32
    assert torch.equal(grad, kernels.scatter_channels(upstream.float(), out_idx, in_idx, weight.shape))


@pytest.mark.parametrize("case", CONV_CASES)
def test_channels_last_weight_gets_a_channels_last_gradient(backend, case):
    weight, out_idx, in_idx = case_args(case)
    weight = weight.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    compact = kernels.gather_channels(weight, out_idx, in_idx, dtype=torch.bfloat16, memory_format=torch.channels_last)
    upstream = torch.randn(compact.shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    (grad,) = torch.autograd.grad(compact, weight, upstream)
    assert grad.dtype == torch.float32
    if backend == "ext":  # the compiled scatter writes the layout directly (index_select's backward does not)
        assert grad.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(grad, kernels.scatter_channels(upstream.float(), out_idx, in_idx, weight.shape))


@pytest.mark.parametrize("case", ["conv", "grouped", "conv_out_only", "conv1x1"])
def test_gradcheck_channels_last_gather_and_scatter(backend, case):
    weight, out_idx, in_idx = case_args(case, torch.float64)
    weight = weight.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    gather = lambda w: kernels.gather_channels(w, out_idx, in_idx, memory_format=torch.channels_last)  # noqa: E731
    assert torch.autograd.gradcheck(gather, (weight,), fast_mode=True)
    assert torch.autograd.gradgradcheck(gather, (weight,), fast_mode=True)
    grad = kernels.gather_channels(weight.detach(), out_idx, in_idx).requires_grad_(True)
    scatter = lambda g: kernels.scatter_channels(g, out_idx, in_idx, weight.shape,  # noqa: E731
                                                 memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(scatter, (grad,), fast_mode=True)
    assert torch.autograd.gradgradcheck(scatter, (grad,), fast_mode=True)


def test_gradcheck_float32_to_float64_gather():
    """A widening gather is exact, so gradcheck applies (its inputs are float32, checked at float32 tolerances)."""
    weight, out_idx, in_idx = case_args("conv")
    weight.requires_grad_(True)
    gather = lambda w: kernels.gather_channels(w, out_idx, in_idx, dtype=torch.float64)  # noqa: E731
    assert torch.autograd.gradcheck(gather, (weight,), eps=1e-3, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("case", ["grouped", "linear"])
def test_opcheck_converting_forms(case):
    if not kernels.extension_available():
        pytest.skip("pyprune._C extension not built")
    weight, out_idx, in_idx = case_args(case)
    layout = channels_last_of(weight)
    torch.library.opcheck(torch.ops.pyprune.channel_gather.default,
                          (weight.requires_grad_(True), out_idx, in_idx, torch.bfloat16, layout))
    grad = kernels.gather_channels(weight.detach(), out_idx, in_idx, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.pyprune.channel_scatter.default,
                          (grad, out_idx, in_idx, list(weight.shape), torch.float32, layout))


def test_compile_fullgraph_converting_gather():
    weight, out_idx, in_idx = case_args("conv")
    weight.requires_grad_(True)

    def compact(w):
        return kernels.gather_channels(w, out_idx, in_idx, dtype=torch.bfloat16, memory_format=torch.channels_last)
    compiled = torch.compile(compact, backend="aot_eager", fullgraph=True)
    result = compiled(weight)
    assert result.dtype == torch.bfloat16 and result.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(result, compact(weight))


@pytest.mark.parametrize("call, message", [
    (lambda w, o, i: kernels.gather_channels(w, o, i, dtype=torch.int64), "dtype converts between"),
    (lambda w, o, i: kernels.gather_channels(w.long(), o, i, dtype=torch.float32), "dtype converts between"),
    (lambda w, o, i: kernels.gather_channels(w[:, :, 0, 0], o, i, memory_format=torch.channels_last),
     "memory_format must be"),
    (lambda w, o, i: kernels.gather_channels(w, o, i, memory_format=torch.channels_last_3d), "memory_format must be"),
    (lambda w, o, i: kernels.scatter_channels(w[o][:, i], o, i, w.shape, memory_format=torch.preserve_format),
     "memory_format must be"),
])
def test_bad_arguments_converting_gather(call, message):
    if not kernels.extension_available():
        pytest.skip("pyprune._C extension not built")
    weight, out_idx, in_idx = case_args("conv")
    with kernels.use_backend("ext"), pytest.raises(RuntimeError, match=message):
        call(weight, out_idx, in_idx)


# --------------------------------------------------------------------------------------------------- the layers
def plain_form(monkeypatch):
    """The per-op path as it was: gather in fp32 / contiguous, let autocast cast and conv pick the layout."""
    for op_type in (DynamicConv2d, DynamicLinear):
        monkeypatch.setattr(op_type, "_gather_form", lambda self, x: None)


def pruned_conv():
    conv = DynamicConv2d.convert_from(torch.nn.Conv2d(8, 6, 3, padding=1))
    conv.set_out_channels(torch.tensor([0, 2, 3, 5]))
    conv.set_in_channels(torch.tensor([1, 2, 4, 6, 7]))
    return conv


def test_conv_under_cpu_autocast_gathers_bf16(backend, monkeypatch):
    conv = pruned_conv()
    seen = []
    original = kernels.gather_channels
    monkeypatch.setattr(kernels, "gather_channels", lambda *a, **k: seen.append(o := original(*a, **k)) or o)
    x = torch.randn(2, 5, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert [t.dtype for t in seen] == [torch.bfloat16, torch.bfloat16] and y.dtype == torch.bfloat16


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_channels_last_input(backend, layout):
    conv = pruned_conv()
    x = torch.randn(2, 5, 6, 6)
    expected = F.conv2d(x, conv.weight[conv.out_index][:, conv.in_index], conv.bias[conv.out_index], padding=1)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight, _ = conv.active_tensors(x)
    assert weight.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    y = conv(x)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=1)
def _prepared_small_net():
    torch.manual_seed(0)
    model = SmallNet()
    mutator = ChannelMutator(channel_unit_cfg="L1MutableChannelUnit", parse_cfg=dict(demo_input=(1, 3, 8, 8)))
    mutator.prepare_from_supernet(model)
    mutator.set_global_ratio(0.5)
    return model


def prepared_small_net(channels_last=False):
    """SmallNet with every unit at half width (a fresh copy each call; the tracing is done once)."""
    model = copy.deepcopy(_prepared_small_net())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def run_step(model, x, autocast_dtype):
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        y = model(x)
    y.float().square().sum().backward()
    return y, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_model_under_bf16_autocast_equals_gather_then_cast(backend, monkeypatch, channels_last):
    model = prepared_small_net(channels_last)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y, grads = run_step(model, x, torch.bfloat16)
    plain_form(monkeypatch)
    y_ref, grads_ref = run_step(reference, x, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        if channels_last and grad.dim() == 4 and backend == "ext":
            assert grad.is_contiguous(memory_format=torch.channels_last), name
        torch.testing.assert_close(grad, grads_ref[name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_cuda_converting_gather_and_scatter_match_cpu(case, dtype):
    weight, out_idx, in_idx = case_args(case)
    layout = channels_last_of(weight)
    for fmt in {None, layout}:
        expected = kernels.gather_channels(weight, out_idx, in_idx, dtype=dtype, memory_format=fmt)
        moved = [None if t is None else t.cuda() for t in (weight, out_idx, in_idx)]
        compact = kernels.gather_channels(*moved, dtype=dtype, memory_format=fmt)
        assert compact.dtype == dtype and torch.equal(compact.cpu(), expected)
        assert compact.is_contiguous(memory_format=fmt or torch.contiguous_format)
        full = kernels.scatter_channels(compact, moved[1], moved[2], weight.shape, dtype=torch.float32,
                                        memory_format=fmt)
        assert torch.equal(full.cpu(), kernels.scatter_channels(expected, out_idx, in_idx, weight.shape,
                                                                dtype=torch.float32, memory_format=fmt))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_cuda_model_under_autocast_equals_gather_then_cast(monkeypatch, dtype):
    model = prepared_small_net(channels_last=True).cuda()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=dtype):
        y = model(x)
    plain_form(monkeypatch)
    with torch.autocast("cuda", dtype=dtype):
        y_ref = reference(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, rtol=1e-2, atol=1e-2)  # cuDNN may pick other algorithms per layout


# ------------------------------------------------------------------------------------------ pyprune prune --amp
def test_prune_job_with_bf16_autocast_and_channels_last(tmp_path, monkeypatch):
    from pyprune.app import cli
    from pyprune.ops.conv import _DynamicConvNd
    forms = []
    original = _DynamicConvNd._gather_form
    monkeypatch.setattr(_DynamicConvNd, "_gather_form", lambda self, x: forms.append(f := original(self, x)) or f)
    out = tmp_path / "out"
    assert cli.main(["prune", "--quick", "--no-progress", "--no-compact", "--amp", "bf16", "--channels-last",
                     "--epochs", "0", "--train-samples", "64", "--val-samples", "32", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params_after"] < summary["params_before"] and summary["reload_max_abs_diff"] <= 1e-4
    assert (torch.bfloat16, torch.channels_last) in forms  # training steps gathered bf16 channels_last weights


@pytest.mark.parametrize("args, message", [
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"),
    (["--amp", "fp32"], "invalid choice"),
])
def test_bad_arguments_amp(args, message, tmp_path, capsys):
    from pyprune.app import cli
    out = tmp_path / "out"
    try:
        code = cli.main(["prune", "--output-dir", str(out), *args])
    except SystemExit as done:  # argparse's own refusals
        code = done.code
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
