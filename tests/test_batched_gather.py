"""pyprune.ops.batched_gather: one gather_channels_many call per training forward must give exactly what the per-op
gathers give (forward, gradients, SGD steps), and every path it leaves alone (eval, no grad, compact training,
torch.compile, autocast) must keep working."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import pyprune.kernels as kernels
from models import SmallNet, TinyTransformer
from pyprune.mutators import ChannelMutator
from pyprune.ops import DynamicChannelMixin, batched_gather, compact_training

MODELS = {"resnet_like": SmallNet, "transformer_like": TinyTransformer}


def prepared(name, seed=0):
    """The model with every mutable unit at a random width (the same for a given seed)."""
    torch.manual_seed(seed)
    model = MODELS[name]()
    mutator = ChannelMutator(channel_unit_cfg="L1MutableChannelUnit", parse_cfg=dict(demo_input=(1, 3, 8, 8)))
    mutator.prepare_from_supernet(model)
    generator = torch.Generator().manual_seed(seed)
    mutator.set_choices({name: float(torch.empty(1).uniform_(0.3, 0.9, generator=generator))
                         for name in mutator.choice_template})
    return model.train(), mutator


class CountingGathers:
    """Counts calls of kernels.gather_channels and kernels.gather_channels_many while active."""

    def __init__(self, monkeypatch):
        self.single = self.many = 0
        single, many = kernels.gather_channels, kernels.gather_channels_many

        def count_single(*args, **kwargs):
            self.single += 1
            return single(*args, **kwargs)

        def count_many(*args, **kwargs):
            self.many += 1
            return many(*args, **kwargs)
        monkeypatch.setattr(kernels, "gather_channels", count_single)
        monkeypatch.setattr(kernels, "gather_channels_many", count_many)


def train_steps(model, x, target, steps=3):
    """Losses and final parameters of ``steps`` plain SGD steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("name", MODELS)
def test_forward_and_grads_equal_per_op_path(backend, name):
    model, _ = prepared(name)
    batched_model = copy.deepcopy(model)
    handle = batched_gather(batched_model)
    x = torch.randn(4, 3, 8, 8)
    y, y_batched = model(x), batched_model(x)
    assert handle.gathers == 1
    assert torch.equal(y, y_batched)
    y.square().sum().backward()
    y_batched.square().sum().backward()
    for (param_name, param), other in zip(model.named_parameters(), batched_model.parameters()):
        assert (param.grad is None) == (other.grad is None), param_name
        if param.grad is not None:
            torch.testing.assert_close(other.grad, param.grad, rtol=0, atol=1e-6, msg=param_name)
    for (buffer_name, buffer), other in zip(model.named_buffers(), batched_model.buffers()):
        assert torch.equal(buffer, other), buffer_name  # BN running stats updated in place the same way


@pytest.mark.parametrize("name", MODELS)
def test_sgd_steps_equal_per_op_path(name):
    model, _ = prepared(name, seed=1)
    batched_model = copy.deepcopy(model)
    batched_gather(batched_model)
    x, target = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    losses, batched_losses = train_steps(model, x, target), train_steps(batched_model, x, target)
    torch.testing.assert_close(torch.stack(batched_losses), torch.stack(losses), rtol=0, atol=1e-6)
    for param, other in zip(model.parameters(), batched_model.parameters()):
        torch.testing.assert_close(other, param, rtol=0, atol=1e-6)


def test_one_batched_call_replaces_the_per_op_gathers(monkeypatch):
    model, _ = prepared("resnet_like")
    handle = batched_gather(model)
    counter = CountingGathers(monkeypatch)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert (counter.many, counter.single) == (1, 0)
    pending = [op for op in handle.ops if op.tensor_provider.handed is not None]
    assert pending == []  # everything gathered was used, or dropped after the forward

    counter.many = counter.single = 0
    model.eval()
    model(torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 8, 8))
    assert counter.many == 0 and counter.single > 0  # eval and no-grad forwards keep the per-op path

    handle.remove()
    counter.many = counter.single = 0
    model(torch.randn(2, 3, 8, 8))
    assert counter.many == 0 and counter.single > 0


def test_unused_tensors_do_not_leak_into_the_next_forward():
    model, _ = prepared("resnet_like")
    handle = batched_gather(model)
    skipped = model.fc

    def fail(*args):
        raise RuntimeError("stop")
    hook = model.pool.register_forward_hook(fail)  # the forward stops before fc runs
    with pytest.raises(RuntimeError, match="stop"):
        model(torch.randn(2, 3, 8, 8))
    hook.remove()
    assert skipped.tensor_provider.handed is None and handle.gathers == 1
    with torch.no_grad():
        skipped.weight.add_(1.0)  # a stale compact weight would not see this
    z = torch.randn(3, skipped.active_in_channels)
    assert torch.equal(skipped.eval()(z), skipped.export()(z))


def test_selection_change_between_hook_and_use_drops_the_batch(monkeypatch):
    model, mutator = prepared("resnet_like")
    batched_gather(model)
    op = model.fc
    model.register_forward_pre_hook(lambda module, args: op.set_out_index(op.out_index))
    counter = CountingGathers(monkeypatch)
    model(torch.randn(2, 3, 8, 8))
    assert counter.many == 1 and counter.single >= 1  # fc gathered again for its new selection version


def test_compact_training_ops_gather_nothing(monkeypatch):
    model, mutator = prepared("resnet_like")
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batched_gather(model)
    x = torch.randn(2, 3, 8, 8)
    with compact_training(model, optimizer):
        counter = CountingGathers(monkeypatch)
        y = model(x)
        assert counter.many == 0 and counter.single == 0  # every pruned op holds its compact tensors
    assert torch.allclose(y, reference(x), atol=1e-6)


def test_autocast_leaves_conv_and_linear_to_their_own_gather(monkeypatch):
    model, _ = prepared("resnet_like")
    handle = batched_gather(model)
    counter = CountingGathers(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 8, 8)).float().sum().backward()
    assert counter.many == 1  # the batch norms still come in one call
    assert counter.single > 0  # conv / linear gather straight into bf16
    assert all(op.tensor_provider.handed is None for op in handle.ops)


@pytest.mark.parametrize("name", MODELS)
def test_compile_fullgraph_with_batched_gather(name):
    model, _ = prepared(name)
    reference = copy.deepcopy(model)
    batched_gather(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    y = compiled(x)
    y.sum().backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(y, reference(x), rtol=0, atol=1e-5)
    assert all(op.tensor_provider.handed is None for op in model.modules()
               if isinstance(op, DynamicChannelMixin))
