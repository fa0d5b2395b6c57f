"""Every DynamicOp in the layer-case table (tests/helpers.py ``CASES``) against a boolean-slicing (mmrazor-style)
reference and against its export: forward, export, gradients, state_dict round trip, CUDA without host syncs.

Tolerances: fp32, ``rtol = atol = 1e-5`` for outputs, gradients and running stats (the dynamic op, the reference
and the exported layer run the same torch kernels on the same compact tensors; only summation order may differ).
Kernel-backed tests run under both kernel backends through the ``backend`` fixture (tests/conftest.py).
A new layer type gets a row in ``CASES``; what only its family does goes in that family's file here.
"""
import io

import pytest
import torch
from torch import nn

import pyprune.ops as ops
from helpers import (CASES, SELECTIONS, TOL, channels, prepared_case, reference_forward, reference_weight,
                     requires_cuda)


# ------------------------------------------------------------------------------------------------ forward / export
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("case_name", CASES)
def test_forward_equals_reference_and_export(backend, case_name, selection):
    op, reference, out_mask, in_mask, x = prepared_case(case_name, selection)
    for training in (True, False):
        op.train(training), reference.train(training)
        exported = op.export()
        expected_export = exported(x)  # the exported layer's own buffers: independent of the next two calls
        dynamic, expected = op(x), reference_forward(reference, out_mask, in_mask, x)
        torch.testing.assert_close(dynamic, expected, **TOL)
        torch.testing.assert_close(expected_export, expected, **TOL)
    assert op.active_out_channels == int(out_mask.sum()) and op.active_in_channels == int(in_mask.sum())


@pytest.mark.parametrize("case_name", CASES)
def test_export_is_the_plain_layer_with_compact_copies(case_name):
    op, reference, out_mask, in_mask, _ = prepared_case(case_name, "random", seed=3)
    exported = op.export()
    torch_type = type(reference)
    assert type(exported) is torch_type and not isinstance(exported, ops.DynamicChannelMixin)
    assert isinstance(op, torch_type)
    exported_state = exported.state_dict()
    assert set(exported_state) == set(op.state_dict())  # an op saves no selection of its own: the same keys
    for name, tensor in op.state_dict().items():
        compact = exported_state[name]
        assert compact.data_ptr() != tensor.data_ptr()  # copies, never views of the dynamic op's storage
        if tensor.dim() == 0:
            expected = tensor
        elif tensor.dim() == 1:
            expected = tensor[out_mask]
        else:
            expected = reference_weight(reference, out_mask, in_mask)
        assert torch.equal(compact, expected), name
    for attribute in ("stride", "padding", "dilation", "padding_mode", "eps", "momentum", "num_groups", "affine",
                      "track_running_stats", "elementwise_affine", "kernel_size"):
        if hasattr(reference, attribute):
            assert getattr(exported, attribute) == getattr(reference, attribute), attribute
    if isinstance(exported, nn.Conv2d):
        depthwise = channels(reference)[2]
        assert exported.groups == (int(out_mask.sum()) if depthwise else reference.groups)
        assert (exported.in_channels, exported.out_channels) == (int(in_mask.sum()), int(out_mask.sum()))


@pytest.mark.parametrize("case_name", [c for c in CASES if any(True for _ in CASES[c].make().parameters())])
def test_gradients_equal_reference(backend, case_name):
    op, reference, out_mask, in_mask, x = prepared_case(case_name, "random", seed=1)
    x_dynamic, x_reference = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_dynamic = op(x_dynamic)
    out_reference = reference_forward(reference, out_mask, in_mask, x_reference)
    grad_out = torch.randn_like(out_dynamic)
    out_dynamic.backward(grad_out)
    out_reference.backward(grad_out)
    torch.testing.assert_close(x_dynamic.grad, x_reference.grad, **TOL)
    for name, parameter in reference.named_parameters():
        dynamic_grad = getattr(op, name).grad
        torch.testing.assert_close(dynamic_grad, parameter.grad, **TOL)
        if not bool(out_mask.all()):  # inactive channels get an exact zero gradient
            assert torch.count_nonzero(dynamic_grad[~out_mask]) == 0



# ------------------------------------------------------------------------------------------------------ state_dict
@pytest.mark.parametrize("case_name", ["conv3x3", "conv_grouped", "conv_depthwise", "linear", "bn2d", "layernorm",
                                       "groupnorm"])
def test_state_dict_round_trip_with_weights_only(case_name):
    op, _, out_mask, in_mask, x = prepared_case(case_name, "random", seed=4)
    if isinstance(op, nn.modules.batchnorm._BatchNorm):
        op.train()(x)  # non-trivial running stats and num_batches_tracked
    buffer = io.BytesIO()
    torch.save(op.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = ops.to_dynamic(CASES[case_name].make())
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    # the tensors travel; the selection is the units' (a prepared model saves it per unit: test_mutator_safety.py)
    assert fresh.out_index is None and fresh.in_index is None
    fresh.set_out_index(op.out_index)
    fresh.set_in_index(op.in_index)
    assert (fresh.active_out_channels, fresh.active_in_channels) == (int(out_mask.sum()), int(in_mask.sum()))
    op.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), op(x), **TOL)



# ------------------------------------------------------------------------------------------------------------ CUDA
@requires_cuda
@pytest.mark.parametrize("case_name", ["conv3x3", "conv_grouped", "conv_depthwise", "linear", "bn2d", "groupnorm"])
def test_cuda_forward_matches_reference_without_sync(backend, case_name):
    op, reference, out_mask, in_mask, x = prepared_case(case_name, "random", seed=6)
    op, reference, x = op.cuda(), reference.cuda(), x.cuda()
    out_mask, in_mask = out_mask.cuda(), in_mask.cuda()
    assert op.out_index is None or op.out_index.is_cuda
    expected = {t: reference_forward(reference.train(t), out_mask, in_mask, x) for t in (True, False)}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outputs = {t: op.train(t)(x) for t in (True, False)}
        op.set_out_index(op.out_index)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for training in (True, False):
        torch.testing.assert_close(outputs[training], expected[training], **TOL)
