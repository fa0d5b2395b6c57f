"""pyprune.ops: every DynamicOp against a boolean-slicing (mmrazor-style) reference and against its export.

Tolerances: fp32, ``rtol = atol = 1e-5`` for outputs, gradients and running stats (the dynamic op, the reference
and the exported layer run the same torch kernels on the same compact tensors; only summation order may differ).
Kernel-backed tests run under both kernel backends through the ``backend`` fixture (tests/conftest.py).
"""
import copy
import io
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyprune.kernels as kernels
import pyprune.ops as ops
from conftest import requires_cuda
from pyprune.errors import ChannelSelectionError, ConfigError

TOL = dict(rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------- layer cases
@dataclass(frozen=True)
class Case:
    make: Callable[[], nn.Module]
    make_input: Callable[[int], torch.Tensor]     # active in channels -> input
    groups: int = 1                               # balanced blocks a selection must keep (both sides)


def _image(k, size=7):
    return torch.randn(2, k, size, size)


CASES = {
    "conv3x3": Case(lambda: nn.Conv2d(8, 6, 3, padding=1), _image),
    "conv_stride_dilation_nobias": Case(lambda: nn.Conv2d(5, 7, 3, stride=2, dilation=2, padding=2, bias=False),
                                        lambda k: _image(k, 9)),
    "conv_same_padding": Case(lambda: nn.Conv2d(6, 4, (3, 5), padding="same"), _image),
    "conv_reflect": Case(lambda: nn.Conv2d(6, 5, 3, padding=1, padding_mode="reflect"), _image),
    "conv_replicate": Case(lambda: nn.Conv2d(6, 5, 3, padding=2, padding_mode="replicate", stride=2), _image),
    "conv_circular": Case(lambda: nn.Conv2d(6, 5, 3, padding=1, padding_mode="circular"), _image),
    "conv_grouped": Case(lambda: nn.Conv2d(8, 12, 3, padding=1, groups=4), _image, groups=4),
    "conv_grouped_1x1_nobias": Case(lambda: nn.Conv2d(12, 6, 1, groups=3, bias=False), _image, groups=3),
    "conv_depthwise": Case(lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), _image),
    "linear": Case(lambda: nn.Linear(10, 7), lambda k: torch.randn(3, k)),
    "linear_tokens_nobias": Case(lambda: nn.Linear(9, 6, bias=False), lambda k: torch.randn(2, 4, k)),
    "bn1d": Case(lambda: nn.BatchNorm1d(8), lambda k: torch.randn(6, k)),
    "bn1d_sequence": Case(lambda: nn.BatchNorm1d(8), lambda k: torch.randn(4, k, 5)),
    "bn2d": Case(lambda: nn.BatchNorm2d(8), lambda k: _image(k, 3)),
    "bn2d_no_affine": Case(lambda: nn.BatchNorm2d(8, affine=False), lambda k: _image(k, 3)),
    "bn2d_no_stats": Case(lambda: nn.BatchNorm2d(8, track_running_stats=False), lambda k: _image(k, 3)),
    "layernorm": Case(lambda: nn.LayerNorm(10), lambda k: torch.randn(2, 3, k)),
    "layernorm_no_affine": Case(lambda: nn.LayerNorm(10, elementwise_affine=False), lambda k: torch.randn(2, k)),
    "groupnorm": Case(lambda: nn.GroupNorm(3, 12), lambda k: _image(k, 3), groups=3),
}
SELECTIONS = ("one", "random", "all")


def _randomize(module: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running stats, so a wrong channel shows up in the output."""
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif tensor.is_floating_point():
                tensor.normal_()
    return module


def _channels(module: nn.Module):
    """(out channels, in channels, one selection for both) of a plain layer."""
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        return module.out_channels, module.in_channels, depthwise
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, False
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[0], module.normalized_shape[0], True
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, module.num_channels, True
    return module.num_features, module.num_features, True  # batch norm


def random_mask(num_channels: int, kind: str, groups: int = 1, generator=None) -> torch.Tensor:
    """A bool mask ``[num_channels]`` keeping one channel per group ("one"), all, or a random balanced subset."""
    block = num_channels // groups
    if kind == "all":
        return torch.ones(num_channels, dtype=torch.bool)
    keep = 1 if kind == "one" else int(torch.randint(1, block + 1, (1,), generator=generator))
    mask = torch.zeros(groups, block, dtype=torch.bool)
    for g in range(groups):
        mask[g, torch.randperm(block, generator=generator)[:keep]] = True
    return mask.reshape(-1)


# ------------------------------------------------------------------------------ boolean-slicing (mmrazor) reference
def reference_forward(module: nn.Module, out_mask, in_mask, x):
    """What mmrazor computes: slice every per-channel tensor of the full ``module`` by boolean masks."""
    if isinstance(module, nn.Conv2d):
        return _reference_conv(module, out_mask, in_mask, x)
    if isinstance(module, nn.Linear):
        bias = module.bias[out_mask] if module.bias is not None else None
        return F.linear(x, reference_weight(module, out_mask, in_mask)[0], bias)
    weight = module.weight[out_mask] if module.weight is not None else None
    bias = module.bias[out_mask] if module.bias is not None else None
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, (int(out_mask.sum()),), weight, bias, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, weight, bias, module.eps)
    return reference_batch_norm(module, out_mask, x)


def reference_weight(module, out_mask, in_mask):
    """(compact weight, groups) by boolean indexing, as mmrazor slices conv / linear weights."""
    groups = getattr(module, "groups", 1)
    if groups == 1:
        return module.weight[out_mask][:, in_mask], 1
    if groups == module.in_channels == module.out_channels:
        return module.weight[out_mask], int(out_mask.sum())
    # grouped: outer product of the per-group masks over weight.flatten(0, 1)
    pairs = out_mask.reshape(groups, -1).unsqueeze(-1) & in_mask.reshape(groups, -1).unsqueeze(1)
    weight = module.weight.flatten(0, 1)[pairs.flatten()]
    return weight.reshape(int(out_mask.sum()), -1, *module.weight.shape[2:]), groups


def _reference_conv(conv, out_mask, in_mask, x):
    weight, groups = reference_weight(conv, out_mask, in_mask)
    bias = conv.bias[out_mask] if conv.bias is not None else None
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        return F.conv2d(x, weight, bias, conv.stride, 0, conv.dilation, groups)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups)


def reference_batch_norm(bn, mask, x):
    """mmrazor's DynamicBatchNorm: copy the masked running stats, let F.batch_norm update the copies, write them
    back with ``masked_scatter_``; ``num_batches_tracked`` counts every training batch."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    weight = bn.weight[mask] if bn.affine else None
    bias = bn.bias[mask] if bn.affine else None
    running_mean = bn.running_mean[mask] if bn.running_mean is not None else None
    running_var = bn.running_var[mask] if bn.running_var is not None else None
    out = F.batch_norm(x, running_mean, running_var, weight, bias, use_batch_stats, factor, bn.eps)
    if bn.training and bn.track_running_stats:
        bn.running_mean.masked_scatter_(mask, running_mean)
        bn.running_var.masked_scatter_(mask, running_var)
    return out


def prepared(case_name: str, selection: str, seed: int = 0, name: str = "net.layer"):
    """(dynamic op with a selection, plain reference copy, out mask, in mask, input)."""
    case = CASES[case_name]
    generator = torch.Generator().manual_seed(seed)
    plain = _randomize(case.make())
    reference = copy.deepcopy(plain)
    op = ops.to_dynamic(plain)
    op.pyprune_name = name
    full_out, full_in, single = _channels(plain)
    out_mask = random_mask(full_out, selection, case.groups, generator)
    in_mask = out_mask if single else random_mask(full_in, selection, case.groups, generator)
    op.set_out_channels(out_mask)
    if not single:
        op.set_in_channels(in_mask)
    x = case.make_input(int(in_mask.sum()))
    return op, reference, out_mask, in_mask, x


# ------------------------------------------------------------------------------------------------ forward / export
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("case_name", CASES)
def test_forward_equals_reference_and_export(backend, case_name, selection):
    op, reference, out_mask, in_mask, x = prepared(case_name, selection)
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
    op, reference, out_mask, in_mask, _ = prepared(case_name, "random", seed=3)
    exported = op.export()
    torch_type = type(reference)
    assert type(exported) is torch_type and not isinstance(exported, ops.DynamicChannelMixin)
    assert isinstance(op, torch_type)
    exported_state = exported.state_dict()
    assert set(exported_state) == {k for k in op.state_dict() if not k.endswith("_extra_state")}
    for name, tensor in op.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        compact = exported_state[name]
        assert compact.data_ptr() != tensor.data_ptr()  # copies, never views of the dynamic op's storage
        if tensor.dim() == 0:
            expected = tensor
        elif tensor.dim() == 1:
            expected = tensor[out_mask]
        else:
            expected = reference_weight(reference, out_mask, in_mask)[0]
        assert torch.equal(compact, expected), name
    for attribute in ("stride", "padding", "dilation", "padding_mode", "eps", "momentum", "num_groups", "affine",
                      "track_running_stats", "elementwise_affine", "kernel_size"):
        if hasattr(reference, attribute):
            assert getattr(exported, attribute) == getattr(reference, attribute), attribute
    if isinstance(exported, nn.Conv2d):
        depthwise = _channels(reference)[2]
        assert exported.groups == (int(out_mask.sum()) if depthwise else reference.groups)
        assert (exported.in_channels, exported.out_channels) == (int(in_mask.sum()), int(out_mask.sum()))


@pytest.mark.parametrize("case_name", [c for c in CASES if any(True for _ in CASES[c].make().parameters())])
def test_gradients_equal_reference(backend, case_name):
    op, reference, out_mask, in_mask, x = prepared(case_name, "random", seed=1)
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


# ------------------------------------------------------------------------------------------------- batch norm
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", ["bn1d", "bn2d"])
def test_batchnorm_training_updates_only_active_running_stats(backend, kind, momentum):
    plain = _randomize(nn.BatchNorm1d(8, momentum=momentum) if kind == "bn1d" else
                       nn.BatchNorm2d(8, momentum=momentum))
    reference = copy.deepcopy(plain)
    op = ops.to_dynamic(plain).train()
    reference.train()
    generator = torch.Generator().manual_seed(5)
    for step in range(4):  # the selection changes between steps, as during pruning
        mask = random_mask(8, "random" if step < 3 else "all", generator=generator)
        before = op.running_mean.clone()
        op.set_out_channels(mask)
        x = torch.randn(6, int(mask.sum()), *(() if kind == "bn1d" else (3, 3)))
        torch.testing.assert_close(op(x), reference_batch_norm(reference, mask, x), **TOL)
        torch.testing.assert_close(op.running_mean, reference.running_mean, **TOL)
        torch.testing.assert_close(op.running_var, reference.running_var, **TOL)
        assert torch.equal(op.running_mean[~mask], before[~mask])
        assert int(op.num_batches_tracked) == step + 1 == int(reference.num_batches_tracked)
    op.eval(), reference.eval()
    op.set_out_channels([1, 4, 6])
    x = torch.randn(3, 3, *(() if kind == "bn1d" else (3, 3)))
    mask = torch.zeros(8, dtype=torch.bool)
    mask[[1, 4, 6]] = True
    torch.testing.assert_close(op(x), reference_batch_norm(reference, mask, x), **TOL)


def test_naive_masked_running_stats_lose_the_update():
    """Why the op writes the stats back: F.batch_norm on ``running_mean[mask]`` updates a temporary copy."""
    bn = nn.BatchNorm2d(4).train()
    mask = torch.tensor([True, False, True, False])
    F.batch_norm(torch.randn(2, 2, 3, 3), bn.running_mean[mask], bn.running_var[mask], training=True, momentum=0.5)
    assert torch.count_nonzero(bn.running_mean) == 0  # lost
    op = ops.to_dynamic(bn)
    op.set_out_channels(mask)
    op(torch.randn(2, 2, 3, 3) + 1.0)
    assert torch.count_nonzero(op.running_mean[mask]) == 2 and torch.count_nonzero(op.running_mean[~mask]) == 0


# --------------------------------------------------------------------------------------------- grouped / depthwise
def test_depthwise_in_and_out_are_one_selection():
    op = ops.to_dynamic(nn.Conv2d(6, 6, 3, groups=6))
    op.set_in_channels([1, 2, 5])
    assert torch.equal(op.out_index, torch.tensor([1, 2, 5])) and op.in_index is op.out_index
    assert op.active_groups == 3 == op.active_in_channels == op.active_out_channels
    assert op.export().groups == 3


def test_grouped_conv_trusted_path_builds_local_in_index():
    op = ops.to_dynamic(nn.Conv2d(8, 8, 1, groups=2, bias=False))
    op.set_in_index(torch.tensor([1, 2, 4, 7]))
    assert torch.equal(op.in_index, torch.tensor([1, 2, 4, 7]))  # the public index stays global
    assert torch.equal(op._kernel_indices()[1], torch.tensor([[1, 2], [0, 3]]))
    x = torch.randn(1, 4, 2, 2)
    expected = F.conv2d(x, torch.cat([op.weight[:4][:, [1, 2]], op.weight[4:][:, [0, 3]]]), groups=2)
    torch.testing.assert_close(op(x), expected, **TOL)
    with pytest.raises(ChannelSelectionError, match=r"DynamicConv2d.*input channels: 3 channels cannot be split"):
        op.set_in_index(torch.tensor([0, 1, 4]))


@pytest.mark.parametrize("make, choice, side", [
    (lambda: nn.Conv2d(8, 8, 3, groups=4), [0, 1, 2, 3], "in"),          # all in group 0 and 1
    (lambda: nn.Conv2d(8, 8, 3, groups=4), [0, 2, 4, 5], "out"),
    (lambda: nn.Conv2d(8, 8, 3, groups=4), 3, "out"),                    # 3 does not split over 4 groups
    (lambda: nn.GroupNorm(2, 8), [0, 1, 2, 4], "out"),
    (lambda: nn.GroupNorm(2, 8), 0.375, "out"),                          # 3 channels over 2 groups
])
def test_unbalanced_grouped_selection_is_rejected(make, choice, side):
    op = ops.to_dynamic(make())
    op.pyprune_name = "features.3"
    setter = op.set_out_channels if side == "out" else op.set_in_channels
    with pytest.raises(ChannelSelectionError, match=r"features\.3.*groups"):
        setter(choice)
    assert op.out_index is None and op.in_index is None and op.selection_version == 0


def test_ratio_and_count_on_grouped_layers_keep_a_prefix_of_every_group():
    conv = ops.to_dynamic(nn.Conv2d(8, 12, 3, groups=4))
    conv.set_in_channels(0.5)
    conv.set_out_channels(8)
    assert conv.in_index.tolist() == [0, 2, 4, 6] and conv.out_index.tolist() == [0, 1, 3, 4, 6, 7, 9, 10]
    norm = ops.to_dynamic(nn.GroupNorm(2, 8))
    norm.set_out_channels(0.25)
    assert norm.out_index.tolist() == [0, 4]


# ------------------------------------------------------------------------------------------------ module plumbing
def test_convert_from_shares_parameters_and_registry():
    conv = nn.Conv2d(4, 4, 3)
    op = ops.DynamicConv2d.convert_from(conv)
    assert op.weight is conv.weight and op.bias is conv.bias and isinstance(op, nn.Conv2d)
    assert type(conv) is nn.Conv2d and "weight" in conv._parameters  # the original is untouched
    bn = nn.BatchNorm2d(4)
    assert ops.to_dynamic(bn).running_mean is bn.running_mean

    class MyConv(nn.Conv2d):
        pass

    for module, expected in ((MyConv(2, 2, 1), ops.DynamicConv2d), (nn.Linear(2, 2), ops.DynamicLinear),
                             (nn.BatchNorm1d(2), ops.DynamicBatchNorm1d), (nn.LayerNorm(3), ops.DynamicLayerNorm),
                             (nn.GroupNorm(1, 2), ops.DynamicGroupNorm)):
        assert type(ops.to_dynamic(module)) is expected
        assert ops.DYNAMIC_OPS[expected._torch_type] is expected
    assert ops.to_dynamic(op) is op
    for unsupported in (nn.ReLU(), nn.Conv1d(2, 2, 1), nn.LayerNorm((3, 4)), nn.SyncBatchNorm(2), nn.LazyLinear(3)):
        assert ops.to_dynamic(unsupported) is None, unsupported
    with pytest.raises(ConfigError, match="normalized_shape"):
        ops.DynamicLayerNorm.convert_from(nn.LayerNorm((3, 4)))
    with pytest.raises(ConfigError, match=r"expected an nn\.Conv2d \(or a subclass\), got Linear"):
        ops.DynamicConv2d.convert_from(nn.Linear(2, 2))


def test_constructor_builds_a_full_dynamic_layer():
    op = ops.DynamicConv2d(4, 6, 3, padding=1)
    assert op.active_in_channels == 4 and op.active_out_channels == 6 and op.out_index is None
    op.set_out_channels(2)
    assert op(torch.randn(1, 4, 5, 5)).shape == (1, 2, 5, 5)


def test_input_with_wrong_channel_count_names_the_layer():
    op = ops.to_dynamic(nn.Conv2d(8, 4, 1))
    op.pyprune_name = "stem.conv"
    op.set_in_channels(0.5)
    with pytest.raises(ChannelSelectionError, match=r"stem\.conv .*input has 8 channels.*active input channels "
                                                    r"are 4 of 8"):
        op(torch.randn(1, 8, 3, 3))
    linear = ops.to_dynamic(nn.Linear(6, 3))
    linear.set_in_channels(2)
    with pytest.raises(ChannelSelectionError, match="DynamicLinear.*input has 6 features"):
        linear(torch.randn(2, 6))


def test_trusted_index_path_equals_validated_path():
    op = ops.to_dynamic(nn.Linear(6, 5))
    op.set_out_index(torch.tensor([0, 3]))
    op.set_in_index(torch.arange(6))  # a full-length index is "all"
    assert op.in_index is None and op.active_in_channels == 6
    via_trusted = op.export().weight
    op.set_out_channels([3, 0])        # given unsorted: sorted
    assert torch.equal(op.out_index, torch.tensor([0, 3]))
    assert torch.equal(op.export().weight, via_trusted)
    version = op.selection_version
    op.set_out_index(None)
    assert op.out_index is None and op.active_out_channels == 5 and op.selection_version == version + 1


@pytest.mark.parametrize("choice, expected", [
    (0.5, [0, 1, 2, 3]), (1.0, None), (0.01, [0]), (0.3, [0, 1]), (3, [0, 1, 2]), (8, None),
    ([True, False] * 4, [0, 2, 4, 6]), (torch.tensor([7, 1, 4]), [1, 4, 7]), ([5, 2], [2, 5]),
])
def test_choice_forms(choice, expected):
    op = ops.to_dynamic(nn.Conv2d(3, 8, 1))
    op.set_out_channels(choice)
    assert (op.out_index is None) if expected is None else op.out_index.tolist() == expected
    assert op.out_index is None or op.out_index.dtype == torch.int64


def test_moving_the_layer_moves_its_indices():
    op = ops.to_dynamic(nn.Conv2d(4, 4, 3, groups=2))
    op.set_in_channels([0, 3])
    op.set_out_channels([1, 2])
    op.to(torch.float64)
    assert op.in_index.dtype == torch.int64 and op.weight.dtype == torch.float64
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(op(x), op.export()(x))
    op.to("meta")
    assert {op.out_index.device.type, op.in_index.device.type, op._kernel_indices()[1].device.type} == {"meta"}


# ------------------------------------------------------------------------------------------------------ eval cache
def _count_gathers(monkeypatch):
    calls = []
    real = kernels.gather_channels

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(kernels, "gather_channels", counting)
    return calls


def _partial_conv():
    op = ops.to_dynamic(_randomize(nn.Conv2d(8, 6, 3, padding=1)))
    op.set_out_channels([0, 2, 5])
    op.set_in_channels([1, 3, 4, 6])
    return op, torch.randn(2, 4, 5, 5)


def test_eval_cache_hits_and_invalidation(backend, monkeypatch):
    op, x = _partial_conv()
    op.eval()
    calls = _count_gathers(monkeypatch)
    with torch.no_grad():
        first = op(x)
        assert len(calls) == 2  # weight and bias
        assert torch.equal(op(x), first) and len(calls) == 2  # served from the cache

        replacement = nn.Parameter(op.weight.detach() * 3.0)
        while replacement._version < op.weight._version:
            replacement.add_(0.0)
        assert replacement._version == op.weight._version
        op.weight = replacement  # a new Parameter with the same _version: the cache must still notice
        replaced = op(x)
        assert len(calls) == 4 and not torch.allclose(replaced, first)

        op.weight.mul_(2.0)  # in place: bumps weight._version
        changed = op(x)
        assert len(calls) == 6 and not torch.allclose(changed, replaced)
        torch.testing.assert_close(changed, op.export()(x), **TOL)

        calls.clear()
        op.set_out_channels(2)  # a new selection
        assert op(x).shape[1] == 2 and len(calls) == 2
        assert op(x).shape[1] == 2 and len(calls) == 2

    calls.clear()
    op.train()
    with torch.no_grad():
        op(x), op(x)
    assert len(calls) == 4  # training never caches
    op.eval()
    x_grad = x.clone().requires_grad_(True)
    op(x_grad).sum().backward()  # eval with autograd: gathers afresh, and the gradient reaches the weight
    assert len(calls) == 6 and op.weight.grad is not None and x_grad.grad is not None


def test_eval_cache_sees_load_state_dict_and_optimizer_steps():
    op, x = _partial_conv()
    op.eval()
    with torch.no_grad():
        before = op(x)
    optimizer = torch.optim.SGD(op.parameters(), lr=0.5)
    op.train()
    op(x).pow(2).sum().backward()
    optimizer.step()
    op.eval()
    with torch.no_grad():
        after = op(x)
        assert not torch.allclose(after, before)
        torch.testing.assert_close(after, op.export()(x), **TOL)
        op.load_state_dict({k: (torch.zeros_like(v) if k in ("weight", "bias") else v)
                            for k, v in op.state_dict().items()})
        assert torch.count_nonzero(op(x)) == 0


# ------------------------------------------------------------------------------------------------------ state_dict
@pytest.mark.parametrize("case_name", ["conv3x3", "conv_grouped", "conv_depthwise", "linear", "bn2d", "layernorm",
                                       "groupnorm"])
def test_state_dict_round_trip_with_weights_only(case_name):
    op, _, out_mask, in_mask, x = prepared(case_name, "random", seed=4)
    if isinstance(op, nn.modules.batchnorm._BatchNorm):
        op.train()(x)  # non-trivial running stats and num_batches_tracked
    buffer = io.BytesIO()
    torch.save(op.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = ops.to_dynamic(CASES[case_name].make())
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert _same(fresh.out_index, op.out_index) and _same(fresh.in_index, op.in_index)
    assert (fresh.active_out_channels, fresh.active_in_channels) == (int(out_mask.sum()), int(in_mask.sum()))
    op.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), op(x), **TOL)


def _same(a, b):
    return a is b is None or (a is not None and b is not None and torch.equal(a, b))


def test_plain_state_dict_loads_into_dynamic_op_and_keeps_selection():
    plain = nn.Conv2d(4, 6, 1)
    op = ops.to_dynamic(nn.Conv2d(4, 6, 1))
    op.set_out_channels(3)
    op.load_state_dict(plain.state_dict())  # strict, without "_extra_state": still fine
    assert torch.equal(op.weight, plain.weight) and op.active_out_channels == 3


def test_bad_saved_selection_is_rejected_and_changes_nothing():
    op = ops.to_dynamic(nn.Linear(4, 4))
    op.pyprune_name = "head"
    weight = op.weight.detach().clone()
    state = {k: (torch.zeros_like(v) if k == "weight" else v) for k, v in op.state_dict().items()}
    state["_extra_state"] = {"out_index": torch.tensor([0, 9]), "in_index": None}
    with pytest.raises(ChannelSelectionError, match=r"head .*output channels: channel index 9 is out of range"):
        op.load_state_dict(state)
    assert op.out_index is None and op.selection_version == 0 and torch.equal(op.weight, weight)
    state["_extra_state"] = {"selection": [1]}
    with pytest.raises(ChannelSelectionError, match="head .*malformed"):
        op.load_state_dict(state)


# -------------------------------------------------------------------------------------------------------- bad input
BAD_CHOICES = {
    "ratio_zero": (0.0, r"ratio 0\.0 is not in \(0, 1\]"),
    "ratio_above_one": (1.5, r"ratio 1\.5 is not in \(0, 1\]"),
    "ratio_nan": (float("nan"), r"ratio nan is not in \(0, 1\]"),
    "ratio_inf": (float("inf"), r"ratio inf is not in \(0, 1\]"),
    "ratio_negative": (-0.1, r"ratio -0\.1 is not in \(0, 1\]"),
    "count_zero": (0, r"count 0 is out of range \[1, 8\]"),
    "count_too_big": (9, r"count 9 is out of range \[1, 8\]"),
    "bool_scalar": (True, "True is not a channel choice"),
    "mask_too_short": (torch.ones(7, dtype=torch.bool), r"mask must have shape \[8\], got \[7\]"),
    "mask_empty": (torch.zeros(8, dtype=torch.bool), "keeps no channel"),
    "mask_float": (torch.ones(8), "int64 tensor, got dtype torch.float32"),
    "mask_wrong_device": (torch.ones(8, dtype=torch.bool, device="meta"), "on meta but the layer is on cpu"),
    "index_out_of_range": (torch.tensor([0, 8]), "index 8 is out of range for 8 channels"),
    "index_negative": ([-1, 2], "index -1 is out of range"),
    "index_duplicated": (torch.tensor([3, 1, 3]), "index 3 is given more than once"),
    "index_float": (torch.tensor([0.0, 1.0]), "int64 tensor, got dtype torch.float32"),
    "index_int32": (torch.tensor([0, 1], dtype=torch.int32), "int64 tensor, got dtype torch.int32"),
    "index_2d": (torch.tensor([[0, 1]]), r"must be 1-D, got shape \(1, 2\)"),
    "index_empty_list": ([], "selection is empty"),
    "list_mixed": ([1, True], "only int channel indices or only bools"),
    "string": ("half", "unsupported channel choice of type str"),
}


@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("bad", BAD_CHOICES)
@pytest.mark.parametrize("kind", ["conv", "bn"])
def test_bad_choice_names_layer_and_changes_nothing(kind, bad, side):
    op = ops.to_dynamic(nn.Conv2d(8, 8, 3) if kind == "conv" else nn.BatchNorm2d(8))
    op.pyprune_name = "backbone.layer1.0.conv1"
    op.set_out_channels([1, 2, 5])
    if kind == "conv":
        op.set_in_channels(0.5)
    selection = (op.out_index.clone(), None if op.in_index is None else op.in_index.clone(),
                 op.active_out_channels, op.active_in_channels, op.selection_version)
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in op.state_dict().items()}
    choice, message = BAD_CHOICES[bad]
    setter = op.set_out_channels if side == "out" else op.set_in_channels
    with pytest.raises(ChannelSelectionError, match=r"backbone\.layer1\.0\.conv1 \(Dynamic\w+\).*" + message):
        setter(choice)
    assert torch.equal(op.out_index, selection[0]) and _same(op.in_index, selection[1])
    assert (op.active_out_channels, op.active_in_channels, op.selection_version) == selection[2:]
    for name, value in op.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state[name]), name


def test_error_names_the_class_without_a_layer_name():
    op = ops.to_dynamic(nn.Linear(4, 4))
    with pytest.raises(ChannelSelectionError, match=r"^DynamicLinear \(DynamicLinear\) input channels: "):
        op.set_in_channels(0)


# --------------------------------------------------------------------------------------- no host sync in forward
def test_forward_and_trusted_setters_never_sync(backend, monkeypatch):
    """CPU stand-in for cudaStreamSynchronize: forbid every tensor->host read while forwarding and setting."""
    op_stack = [ops.to_dynamic(m) for m in (nn.Conv2d(6, 8, 3, groups=2), nn.BatchNorm2d(8), nn.Linear(8, 5),
                                            nn.LayerNorm(5))]
    x = torch.randn(2, 4, 5, 5)
    index_in, index_out = torch.tensor([0, 1, 3, 4]), torch.tensor([1, 2, 5, 6])

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in a DynamicOp hot path")

    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "nonzero", forbidden)
    conv, bn, linear, norm = op_stack
    conv.set_in_index(index_in), conv.set_out_index(index_out), bn.set_out_index(index_out)
    linear.set_in_index(index_out), linear.set_out_index(None), norm.set_out_index(None)
    for training in (True, False):
        for op in op_stack:
            op.train(training)
        y = bn(conv(x))
        y = norm(linear(y.mean((2, 3))))
    monkeypatch.undo()
    assert y.shape == (2, 5) and int(bn.num_batches_tracked) == 1


# ------------------------------------------------------------------------------------------------- torch.compile
def _stack():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _dynamic_stack():
    model = _randomize(_stack())
    for i in (0, 1, 3, 6):
        model[i] = ops.to_dynamic(model[i])
    kept = torch.tensor([0, 2, 3, 7])
    model[0].set_out_index(kept), model[1].set_out_index(kept), model[3].set_out_index(kept)
    model[6].set_in_index(kept)
    return model


def test_compile_fullgraph_conv_bn_relu_linear(backend):
    torch._dynamo.reset()
    model, eager = _dynamic_stack(), _dynamic_stack()
    eager.load_state_dict(model.state_dict())
    initial_stats = model[1].running_mean.clone()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 6, 6)
    for training in (True, False):
        model.train(training), eager.train(training)
        x_c, x_e = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_c, out_e = compiled(x_c), eager(x_e)
        torch.testing.assert_close(out_c, out_e, **TOL)
        out_c.sum().backward(), out_e.sum().backward()
        torch.testing.assert_close(x_c.grad, x_e.grad, **TOL)
        torch.testing.assert_close(model[0].weight.grad, eager[0].weight.grad, **TOL)
        torch.testing.assert_close(model[1].running_mean, eager[1].running_mean, **TOL)
        torch.testing.assert_close(model[1].running_var, eager[1].running_var, **TOL)
    assert int(model[1].num_batches_tracked) == 1
    inactive = [1, 4, 5, 6]
    assert torch.equal(model[1].running_mean[inactive], initial_stats[inactive])
    assert not torch.allclose(model[1].running_mean[[0, 2, 3, 7]], initial_stats[[0, 2, 3, 7]])


# ------------------------------------------------------------------------------------------------------------ CUDA
@requires_cuda
@pytest.mark.parametrize("case_name", ["conv3x3", "conv_grouped", "conv_depthwise", "linear", "bn2d", "groupnorm"])
def test_cuda_forward_matches_reference_without_sync(backend, case_name):
    op, reference, out_mask, in_mask, x = prepared(case_name, "random", seed=6)
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


# ------------------------------------------------------------------------------------ channels-first LayerNorm
class ChannelsFirstLayerNorm(nn.LayerNorm):
    """torchvision's LayerNorm2d, written out: normalise dim 1 of [N, C, H, W]."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class NotALayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) * 2


def test_channels_first_layer_norm_subclass_is_recognised_by_behaviour():
    assert ops.is_channels_first_layer_norm(ChannelsFirstLayerNorm(6))
    assert not ops.is_channels_first_layer_norm(nn.LayerNorm(6))  # the plain one is channels-last
    assert not ops.is_channels_first_layer_norm(NotALayerNorm(6))
    assert ops.to_dynamic(NotALayerNorm(6)) is None


def test_channels_first_layer_norm_matches_slicing_and_exports_to_its_own_type():
    torch.manual_seed(0)
    norm = ChannelsFirstLayerNorm(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    op = ops.to_dynamic(norm)
    kept = torch.tensor([0, 2, 3, 5])
    op.set_out_channels(kept)
    x = torch.randn(2, 4, 3, 3)
    reference = F.layer_norm(x.permute(0, 2, 3, 1), (4,), norm.weight[kept], norm.bias[kept],
                             norm.eps).permute(0, 3, 1, 2)
    torch.testing.assert_close(op(x), reference)
    exported = op.export()
    assert type(exported) is ChannelsFirstLayerNorm and exported.normalized_shape == (4,)
    torch.testing.assert_close(exported(x), reference)


# ---------------------------------------------------------------------------------------------- attention
def _sliced_attention(mha: nn.MultiheadAttention, kept: torch.Tensor) -> nn.MultiheadAttention:
    """Reference: a plain nn.MultiheadAttention built from boolean-free slices of ``mha``'s tensors."""
    e, k = mha.embed_dim, kept.numel()
    rows = torch.cat([kept, kept + e, kept + 2 * e])
    ref = nn.MultiheadAttention(k, mha.num_heads, batch_first=mha.batch_first, add_bias_kv=mha.bias_k is not None)
    with torch.no_grad():
        ref.in_proj_weight.copy_(mha.in_proj_weight[rows][:, kept])
        ref.in_proj_bias.copy_(mha.in_proj_bias[rows])
        ref.out_proj.weight.copy_(mha.out_proj.weight[kept][:, kept])
        ref.out_proj.bias.copy_(mha.out_proj.bias[kept])
        if mha.bias_k is not None:
            ref.bias_k.copy_(mha.bias_k[..., kept])
            ref.bias_v.copy_(mha.bias_v[..., kept])
    return ref.eval()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("add_bias_kv", [False, True])
def test_attention_matches_slicing_reference_and_export(batch_first, add_bias_kv):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, add_bias_kv=add_bias_kv).eval()
    op = ops.to_dynamic(mha)
    assert isinstance(op, nn.MultiheadAttention) and isinstance(op, ops.DynamicMultiheadAttention)
    kept = torch.tensor([0, 1, 5, 7])  # two channels in each head's block of four
    op.set_out_channels(kept)
    x = torch.randn(3, 5, 4)
    out, weights = op(x, x, x)
    ref_out, ref_weights = _sliced_attention(mha, kept)(x, x, x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(weights, ref_weights)
    exported = op.export().eval()
    assert type(exported) is nn.MultiheadAttention and exported.embed_dim == 4 and exported.num_heads == 2
    torch.testing.assert_close(exported(x, x, x)[0], out)


def test_attention_gradients_reach_only_kept_rows_and_columns():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    op = ops.to_dynamic(mha)
    kept = torch.tensor([0, 1, 5, 7])
    op.set_out_channels(kept)
    op(*(torch.randn(2, 3, 4),) * 3)[0].sum().backward()
    rows = torch.cat([kept, kept + 8, kept + 16])
    grad = mha.in_proj_weight.grad
    mask = torch.zeros_like(grad, dtype=torch.bool)
    mask[rows.unsqueeze(1), kept] = True
    assert torch.all(grad[~mask] == 0) and torch.any(grad[mask] != 0)


def test_attention_selection_must_balance_heads_and_separate_kv_widths_are_refused():
    op = ops.to_dynamic(nn.MultiheadAttention(8, 2))
    with pytest.raises(ChannelSelectionError, match="MultiheadAttention"):
        op.set_out_channels(torch.tensor([0, 1, 2]))  # 3 channels cannot split over 2 heads
    assert op.active_out_channels == 8
    assert ops.to_dynamic(nn.MultiheadAttention(8, 2, kdim=4, vdim=4)) is None


@pytest.mark.parametrize("version", ["ShiftedWindowAttention", "ShiftedWindowAttentionV2"])
def test_swin_window_attention_prunes_its_embedding_and_exports_to_its_own_type(version):
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    torch.manual_seed(0)
    attention = getattr(swin, version)(8, [2, 2], [1, 1], 2).eval()
    op = ops.to_dynamic(attention)
    assert isinstance(op, getattr(swin, version)) and isinstance(op, ops.DynamicChannelMixin)
    with pytest.raises(ChannelSelectionError):
        op.set_out_channels(torch.tensor([0, 1, 2]))  # 3 channels cannot split over 2 heads
    op.set_out_channels(torch.tensor([0, 2, 4, 7]))
    x = torch.randn(2, 4, 4, 4)
    out = op(x)
    exported = op.export().eval()
    assert type(exported) is getattr(swin, version) and exported.qkv.weight.shape == (12, 4)
    torch.testing.assert_close(exported(x), out)
    op.train()
    op(x).sum().backward()
    assert torch.all(attention.qkv.weight.grad[:, [1, 3, 5, 6]] == 0)
