"""KeptSliceSGD (pyprune.ops.kept_slice_sgd): a new subnet every step, gradients and updates on the kept channels only.

Numerics checked here: with ``momentum == 0 and weight_decay == 0`` the parameters and running statistics after N
switching steps equal ``torch.optim.SGD`` in gather mode (tolerance 1e-6 relative; in practice bitwise); with
momentum / weight decay / nesterov they equal a masked reference of the documented lazy rule (kept places: torch's
SGD update; dropped places: value and momentum buffer unchanged), on the prefix (in-place view) and the general
(gather / scatter) paths alike.
"""
import copy
import random

import pytest
import torch
import torch.nn.functional as F

from pyprune import kernels
from pyprune.app.bench.model_bench import TinyNet, prepare
from pyprune.ops import kept_slice
from pyprune.ops.base import DynamicChannelMixin
from pyprune.ops.kept_slice_sgd import KeptSliceSGD

STEPS, SUBNETS, LR = 4, 3, 0.1


@pytest.fixture(scope="module")
def prepared():
    """One prepared TinyNet for the whole file (preparing is the slow part) and its initial state."""
    torch.manual_seed(0)
    model = TinyNet(width=8)
    mutator = prepare(model, 8)
    return model, mutator, copy.deepcopy(model.state_dict())


class Net:
    """The prepared model back at its initial state; ``fast(**kw)`` attaches a KeptSliceSGD, detached after the
    test (the model is shared by the whole file)."""

    def __init__(self, model, mutator, initial):
        self.model, self.mutator, self.initial, self.attached = model, mutator, initial, []

    def reset(self):
        self.model.load_state_dict(self.initial)
        return self.model

    def fast(self, **kwargs):
        optimizer = KeptSliceSGD(self.model, **kwargs)
        self.attached.append(optimizer)
        return optimizer


@pytest.fixture
def net(prepared):
    net = Net(*prepared)
    net.reset()
    yield net
    for optimizer in net.attached:
        optimizer.detach()


def _subnets(mutator):
    random.seed(1)
    torch.manual_seed(1)
    return [mutator.sample_choices() for _ in range(SUBNETS)]


def _batch():
    torch.manual_seed(2)
    return torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))


def _train(model, mutator, optimizer, subnets, x, y, steps=STEPS, after_backward=None):
    for i in range(steps):
        mutator.set_choices(subnets[i % len(subnets)])
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if after_backward is not None:
            after_backward(model)
        optimizer.step()


def _tensors(model):
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}


def _assert_same(ta, tb):
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=1e-6, atol=1e-7, msg=lambda m: f"{key}: {m}")


def _kept_masks(model):
    """{parameter: bool mask of the places the current subnet keeps} (all True for unsliced parameters)."""
    masks = {p: torch.ones_like(p, dtype=torch.bool) for p in model.parameters()}
    for op in model.modules():
        if isinstance(op, DynamicChannelMixin):
            for piece in op._compact_layout():
                if isinstance(piece.tensor, torch.nn.Parameter):
                    ones = torch.ones_like(kernels.gather_channels(piece.tensor.detach(), piece.rows, piece.cols))
                    masks[piece.tensor] = kernels.scatter_channels(ones, piece.rows, piece.cols,
                                                                   piece.tensor.shape) != 0
    return masks


class _LazyReference:
    """The documented rule written out on full tensors: torch SGD's update where the subnet keeps a place,
    nothing (value and momentum buffer) where it drops it."""

    def __init__(self, model, lr, momentum, weight_decay, nesterov):
        self.model, self.lr, self.momentum, self.wd, self.nesterov = model, lr, momentum, weight_decay, nesterov
        self.buffers = {p: torch.zeros_like(p) for p in model.parameters()}
        self.masks = {}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)

    def record_masks(self, model):
        self.masks = _kept_masks(model)

    @torch.no_grad()
    def step(self):
        for p in self.model.parameters():
            if p.grad is None:
                continue
            kept = self.masks[p]
            d = p.grad + self.wd * p if self.wd else p.grad
            if self.momentum:
                buf = torch.where(kept, self.momentum * self.buffers[p] + d, self.buffers[p])
                self.buffers[p] = buf
                d = d + self.momentum * buf if self.nesterov else buf
            p.copy_(torch.where(kept, p - self.lr * d, p))


def test_plain_sgd_is_reproduced_exactly(net):
    model, mutator = net.model, net.mutator
    subnets = _subnets(mutator)
    x, y = _batch()
    _train(model, mutator, torch.optim.SGD(model.parameters(), lr=LR), subnets, x, y)
    plain = _tensors(model)
    model.eval()
    with torch.no_grad():
        plain_out = model(x)
    net.reset()
    optimizer = net.fast(lr=LR)
    _train(model, mutator, optimizer, subnets, x, y)
    _assert_same(plain, _tensors(model))
    # the sliced parameters never got a full-size gradient
    sliced = {id(piece.tensor) for op in model.modules() if isinstance(op, DynamicChannelMixin)
              for piece in op._compact_layout()}
    assert sliced and all(p.grad is None for p in model.parameters() if id(p) in sliced)
    # eval after the in-place writes reads the new weights (the eval cache keys on the version counter)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("general_path", [False, True], ids=["prefix-views", "gather-scatter"])
@pytest.mark.parametrize("momentum,weight_decay,nesterov", [(0.9, 1e-2, False), (0.8, 1e-2, True)])
def test_lazy_momentum_rule(net, monkeypatch, general_path, momentum, weight_decay, nesterov):
    if general_path:  # every slice takes the gather / scatter path, as a non-prefix selection does
        monkeypatch.setattr(kept_slice, "_prefix_length", lambda index, known: None)
    model, mutator = net.model, net.mutator
    subnets = _subnets(mutator)
    x, y = _batch()
    lazy = _LazyReference(model, LR, momentum, weight_decay, nesterov)
    _train(model, mutator, lazy, subnets, x, y, after_backward=lazy.record_masks)
    reference = _tensors(model)
    reference_buffers = [lazy.buffers[p].clone() for p in model.parameters()]
    net.reset()
    optimizer = net.fast(lr=LR, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    _train(model, mutator, optimizer, subnets, x, y)
    _assert_same(reference, _tensors(model))
    for p, expected in zip(model.parameters(), reference_buffers):
        torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], expected, rtol=1e-6, atol=1e-7)


def test_dropped_channels_keep_value_and_momentum(net):
    model, mutator = net.model, net.mutator
    x, y = _batch()
    optimizer = net.fast(lr=LR, momentum=0.9, weight_decay=1e-2)
    mutator.set_global_ratio(1.0)
    _train(model, mutator, optimizer, [mutator.current_choices], x, y, steps=1)
    weight = model.stem[0].weight
    before = weight.detach().clone(), optimizer.state[weight]["momentum_buffer"].clone()
    mutator.set_global_ratio(0.5)
    kept = _kept_masks(model)[weight]
    assert (~kept).any()
    _train(model, mutator, optimizer, [mutator.current_choices], x, y, steps=1)
    after = weight.detach(), optimizer.state[weight]["momentum_buffer"]
    assert torch.equal(after[0][~kept], before[0][~kept]) and torch.equal(after[1][~kept], before[1][~kept])
    assert not torch.equal(after[0][kept], before[0][kept])
    assert not torch.equal(after[1][kept], before[1][kept])


def test_contiguous_prefix_blocks_are_handed_as_views_and_written_in_place(net, monkeypatch):
    """A prefix subnet's batch norms get views of their full tensors (no copy), and F.batch_norm's running-statistics
    update lands in the full buffers with nothing carried back; strided conv blocks are contiguous copies."""
    model, mutator = net.model, net.mutator
    x, y = _batch()
    optimizer = net.fast(lr=LR)
    mutator.set_global_ratio(0.5)
    carried = []
    monkeypatch.setattr(kernels, "update_running_stats_", lambda *args: carried.append(args))
    bn = model.stem[1]
    before = bn.running_mean.clone()
    model.train()
    F.cross_entropy(model(x), y).backward()
    entry = optimizer._leaves[id(bn)]
    kept = bn.out_index.numel()
    assert 0 < kept < bn.num_features
    for handed, full in zip(entry.handed, (bn.weight, bn.bias, bn.running_mean, bn.running_var)):
        assert handed.data_ptr() == full.data_ptr() and handed.shape == (kept,)
    assert carried == []  # nothing written back: the update went to the full buffers
    assert not torch.equal(bn.running_mean[:kept], before[:kept]) and torch.equal(bn.running_mean[kept:],
                                                                                 before[kept:])
    conv = model.expand[0]  # pruned inputs and outputs: a strided block of its weight
    weight_leaf = optimizer._leaves[id(conv)].handed[0]
    assert weight_leaf.is_contiguous() and weight_leaf.data_ptr() != conv.weight.data_ptr()
    assert torch.equal(weight_leaf, conv.weight[:weight_leaf.shape[0], :weight_leaf.shape[1]])
    optimizer.step()


def test_two_forwards_accumulate_like_plain_backward(net):
    model, mutator = net.model, net.mutator
    subnets = _subnets(mutator)
    x, y = _batch()
    results = []
    for make in (lambda: torch.optim.SGD(model.parameters(), lr=LR), lambda: net.fast(lr=LR)):
        net.reset()
        optimizer = make()
        mutator.set_choices(subnets[0])
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(model(x[:2]), y[:2]).backward()
        F.cross_entropy(model(x[2:]), y[2:]).backward()
        optimizer.step()
        results.append(_tensors(model))
    _assert_same(*results)


def test_selection_change_before_step_is_refused(net):
    model, mutator = net.model, net.mutator
    subnets = _subnets(mutator)
    x, y = _batch()
    net.fast(lr=LR)
    mutator.set_choices(subnets[0])
    model.train()
    F.cross_entropy(model(x), y).backward()
    mutator.set_global_ratio(0.25)
    before = _tensors(model)
    with pytest.raises(RuntimeError, match="selection of Dynamic.* changed"):
        model(x)
    assert all(torch.equal(before[k], v) for k, v in _tensors(model).items())


@pytest.mark.parametrize("kwargs,key", [(dict(lr=-1.0), "lr"), (dict(momentum="0.9"), "momentum"),
                                        (dict(weight_decay=-1e-4), "weight_decay"),
                                        (dict(nesterov=True), "nesterov")])
def test_bad_hyper_parameters(net, kwargs, key):
    with pytest.raises(ValueError, match=key):
        net.fast(**kwargs)


def test_detach_restores_the_gather_path(net):
    model, mutator = net.model, net.mutator
    subnets = _subnets(mutator)
    x, y = _batch()
    optimizer = net.fast(lr=LR)
    optimizer.detach()
    _train(model, mutator, optimizer, subnets, x, y, steps=1)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow  # three prepared copies of the tiny model and their exports
def test_bench_switch_rows_include_the_kept_slice_optimizer():
    from pyprune.app.bench import model_bench
    cfg = model_bench.quick_config(torch.device("cpu"))
    cfg.backends = ("pyprune-torch", "pyprune-sliced", "mmrazor-ref", "dense")
    rows = model_bench.bench_switch(cfg, "tiny", 2)
    model_bench._fill_vs_dense(rows)
    by = {r["backend"]: r for r in rows}
    assert set(cfg.backends) <= set(by)
    for backend in cfg.backends:
        assert by[backend]["status"] == "ok" and len(by[backend]["times_ms"]) == cfg.switch_passes
        assert model_bench.is_finite_positive(by[backend]["median_ms"])
    assert model_bench.is_finite_positive(by["pyprune-sliced"]["vs_dense"])
