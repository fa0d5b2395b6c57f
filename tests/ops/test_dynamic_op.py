"""What every DynamicOp shares: conversion and the registry, the eval-mode gather cache, state_dict loading,
no host sync in the hot path, torch.compile."""
import pytest
import torch
from torch import nn

import pyprune.kernels as kernels
import pyprune.ops as ops
from helpers import TOL, randomize
from pyprune.errors import ChannelSelectionError, ConfigError


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
                             (nn.GroupNorm(1, 2), ops.DynamicGroupNorm), (nn.Conv1d(2, 2, 1), ops.DynamicConv1d),
                             (nn.Conv3d(2, 2, 1), ops.DynamicConv3d), (nn.BatchNorm3d(2), ops.DynamicBatchNorm3d)):
        assert type(ops.to_dynamic(module)) is expected
        assert ops.DYNAMIC_OPS[expected._torch_type] is expected
    assert ops.to_dynamic(op) is op
    for unsupported in (nn.ReLU(), nn.ConvTranspose2d(2, 2, 1), nn.LayerNorm((3, 4)), nn.SyncBatchNorm(2),
                        nn.LazyLinear(3)):
        assert ops.to_dynamic(unsupported) is None, unsupported
    with pytest.raises(ConfigError, match="normalized_shape"):
        ops.DynamicLayerNorm.convert_from(nn.LayerNorm((3, 4)))
    with pytest.raises(ConfigError, match=r"expected an nn\.Conv2d \(or a subclass\), got Linear"):
        ops.DynamicConv2d.convert_from(nn.Linear(2, 2))


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
    op = ops.to_dynamic(randomize(nn.Conv2d(8, 6, 3, padding=1)))
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


# --------------------------------------------------------------------------------------------------------- state_dict
def test_plain_state_dict_loads_into_dynamic_op_and_keeps_selection():
    plain = nn.Conv2d(4, 6, 1)
    op = ops.to_dynamic(nn.Conv2d(4, 6, 1))
    op.set_out_channels(3)
    op.load_state_dict(plain.state_dict())  # strict: an op has exactly the plain layer's keys
    assert torch.equal(op.weight, plain.weight) and op.active_out_channels == 3


def test_an_op_saves_no_selection_of_its_own():
    """The selection belongs to the units: a prepared model saves it per unit (tests/test_mutator_safety.py covers
    that round trip and the refusal of bad ones); a standalone op's state_dict holds its full tensors only."""
    op = ops.to_dynamic(nn.Linear(4, 4))
    op.set_out_channels([0, 2])
    state = op.state_dict()
    assert list(state) == list(nn.Linear(4, 4).state_dict()) and state["weight"].shape == (4, 4)
    fresh = ops.to_dynamic(nn.Linear(4, 4))
    fresh.load_state_dict(state)
    assert fresh.out_index is None and torch.equal(fresh.weight, op.weight)


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
    model = randomize(_stack())
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
