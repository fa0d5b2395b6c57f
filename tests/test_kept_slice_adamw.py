"""KeptSliceAdamW (pyprune.ops.kept_slice_adamw): AdamW on the kept channels only, per-channel step counts.

Numerics checked here (tolerance rtol 1e-5 / atol 1e-6 throughout: the bias corrections are float32 tensors where
torch computes Python floats, a relative difference of order 1e-7 per step):

* every channel kept: equal to ``torch.optim.AdamW`` on the same model;
* one fixed subnet for every step: the kept places equal ``torch.optim.AdamW`` training the exported subnet;
* a new subnet every step: equal to a masked reference of the documented lazy rule written on full tensors
  (per-place counts; dropped places keep value, moments and count), on the prefix (in-place view) and the general
  (gather / scatter) paths alike.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from pyprune.ops import kept_slice
from pyprune.ops.kept_slice_adamw import KeptSliceAdamW, step_count_shape
from test_switch_step import LR, _batch, _kept_masks, _subnets, _train, net, prepared  # noqa: F401 (fixtures)

TOL = dict(rtol=1e-5, atol=1e-6)
# the dynamic model and its export sum their convolutions in another order (~1e-7 relative in a gradient); Adam's
# division by sqrt(v) passes such a difference on to the update at full size, over four steps
EXPORT_TOL = dict(rtol=1e-4, atol=1e-5)
OPTIONS = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _assert_close(a, b, tol=TOL):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tol, msg=lambda m: f"{key}: {m}")


def _fast(net, **kwargs):
    optimizer = KeptSliceAdamW(net.model, **{**OPTIONS, **kwargs})
    net.attached.append(optimizer)
    return optimizer


class _LazyAdamWReference:
    """The documented rule on full tensors: torch AdamW's update with a per-place count where the subnet keeps a
    place, nothing (value, moments, count) where it drops it."""

    def __init__(self, model, lr, betas, eps, weight_decay):
        self.model, self.lr, (self.b1, self.b2), self.eps, self.wd = model, lr, betas, eps, weight_decay
        self.m = {p: torch.zeros_like(p) for p in model.parameters()}
        self.v = {p: torch.zeros_like(p) for p in model.parameters()}
        self.t = {p: torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()}
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
            kept, g = self.masks[p], p.grad
            t = torch.where(kept, self.t[p] + 1, self.t[p])
            m = torch.where(kept, self.b1 * self.m[p] + (1 - self.b1) * g, self.m[p])
            v = torch.where(kept, self.b2 * self.v[p] + (1 - self.b2) * g * g, self.v[p])
            safe_t = t.clamp(min=1)
            update = (self.lr / (1 - self.b1 ** safe_t)) * m / (v.sqrt() / (1 - self.b2 ** safe_t).sqrt() + self.eps)
            p.copy_(torch.where(kept, p * (1 - self.lr * self.wd) - update.to(p.dtype), p))
            self.t[p], self.m[p], self.v[p] = t, m, v


def test_every_channel_kept_equals_torch_adamw(net):
    model, mutator = net.model, net.mutator
    mutator.set_global_ratio(1.0)
    x, y = _batch()
    full = [mutator.current_choices]
    _train(model, mutator, torch.optim.AdamW(model.parameters(), **OPTIONS), full, x, y)
    expected = _params(model)
    net.reset()
    optimizer = _fast(net)
    _train(model, mutator, optimizer, full, x, y)
    _assert_close(expected, _params(model))
    assert all(float(optimizer.state[p]["step"].min()) == float(optimizer.state[p]["step"].max()) == 4
               for p in model.parameters())


def test_one_fixed_subnet_equals_torch_adamw_on_the_export(net):
    model, mutator = net.model, net.mutator
    choices = _subnets(mutator)[0]
    mutator.set_choices(choices)
    x, y = _batch()
    exported = mutator.export(copy.deepcopy(model))
    exported.train()
    plain = torch.optim.AdamW(exported.parameters(), **OPTIONS)
    for _ in range(4):
        plain.zero_grad()
        F.cross_entropy(exported(x), y).backward()
        plain.step()
    optimizer = _fast(net)
    _train(model, mutator, optimizer, [choices], x, y)
    assert any(p.grad is None for p in model.parameters())  # the sliced path was taken
    _assert_close({k: v.detach() for k, v in exported.named_parameters()},
                  _params(mutator.export(copy.deepcopy(model))), EXPORT_TOL)


@pytest.mark.parametrize("general_path", [False, True], ids=["prefix-views", "gather-scatter"])
def test_switching_subnets_follow_the_lazy_rule(net, monkeypatch, general_path):
    if general_path:  # every slice takes the gather / scatter path, as a non-prefix selection does
        monkeypatch.setattr(kept_slice, "_prefix_length", lambda index, known: None)
    model, mutator = net.model, net.mutator
    subnets = _subnets(mutator)
    x, y = _batch()
    lazy = _LazyAdamWReference(model, **OPTIONS)
    _train(model, mutator, lazy, subnets, x, y, after_backward=lazy.record_masks)
    expected, moments = _params(model), [(lazy.m[p].clone(), lazy.v[p].clone()) for p in model.parameters()]
    counts = [lazy.t[p].clone() for p in model.parameters()]
    net.reset()
    optimizer = _fast(net)
    _train(model, mutator, optimizer, subnets, x, y)
    _assert_close(expected, _params(model))
    for p, (m, v), t in zip(model.parameters(), moments, counts):
        state = optimizer.state[p]
        torch.testing.assert_close(state["exp_avg"], m, **TOL)
        torch.testing.assert_close(state["exp_avg_sq"], v, **TOL)
        assert torch.equal(state["step"].expand_as(p).double(), t)  # per-place counts, exact
    assert any(float(optimizer.state[p]["step"].min()) < STEPS_DONE for p in model.parameters())


STEPS_DONE = 4  # test_switch_step._train's default step count


def test_dropped_channels_are_untouched(net):
    model, mutator = net.model, net.mutator
    x, y = _batch()
    optimizer = _fast(net)
    mutator.set_global_ratio(1.0)
    _train(model, mutator, optimizer, [mutator.current_choices], x, y, steps=1)
    weight = model.stem[0].weight
    names = ("exp_avg", "exp_avg_sq")
    before = [weight.detach().clone()] + [optimizer.state[weight][n].clone() for n in names]
    count_before = optimizer.state[weight]["step"].clone()
    mutator.set_global_ratio(0.5)
    kept = _kept_masks(model)[weight]
    assert (~kept).any()
    _train(model, mutator, optimizer, [mutator.current_choices], x, y, steps=1)
    after = [weight.detach()] + [optimizer.state[weight][n] for n in names]
    for old, new in zip(before, after):
        assert torch.equal(new[~kept], old[~kept]) and not torch.equal(new[kept], old[kept])
    count = optimizer.state[weight]["step"].expand_as(weight)
    assert torch.equal(count[~kept], count_before.expand_as(weight)[~kept])
    assert bool((count[kept] == 2).all())


def test_state_dict_round_trip_continues_identically(net):
    model, mutator = net.model, net.mutator
    subnets = _subnets(mutator)
    x, y = _batch()
    optimizer = _fast(net)
    _train(model, mutator, optimizer, subnets, x, y, steps=2)
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    _train(model, mutator, optimizer, subnets[2:] + subnets, x, y, steps=2)
    expected = _params(model)
    optimizer.detach()
    model.load_state_dict(saved_model)
    resumed = _fast(net)
    resumed.load_state_dict(saved_optimizer)
    assert all(resumed.state[p]["step"].shape == step_count_shape(p) for p in model.parameters())
    _train(model, mutator, resumed, subnets[2:] + subnets, x, y, steps=2)
    _assert_close(expected, _params(model))


def test_a_torch_adamw_state_dict_loads_with_its_step_on_every_place(net):
    model = net.model
    plain = torch.optim.AdamW(model.parameters(), **OPTIONS)
    model.train()
    x, y = _batch()
    for _ in range(3):
        plain.zero_grad()
        F.cross_entropy(model(x), y).backward()
        plain.step()
    optimizer = _fast(net)
    optimizer.load_state_dict(plain.state_dict())
    for p in model.parameters():
        assert optimizer.state[p]["step"].shape == step_count_shape(p)
        assert bool((optimizer.state[p]["step"] == 3).all())
        assert torch.equal(optimizer.state[p]["exp_avg"], plain.state[p]["exp_avg"])


def test_a_state_dict_that_does_not_fit_is_refused_and_changes_nothing(net):
    model, mutator = net.model, net.mutator
    x, y = _batch()
    optimizer = _fast(net)
    _train(model, mutator, optimizer, _subnets(mutator), x, y, steps=1)
    before = copy.deepcopy(optimizer.state_dict())
    bad = copy.deepcopy(before)
    bad["state"][0]["step"] = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"parameter 0 .* step counts of shape .* got \(3, 2\)"):
        optimizer.load_state_dict(bad)
    bad = copy.deepcopy(before)
    bad["state"][0]["exp_avg"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"parameter 0 has shape .* exp_avg has shape \(1,\)"):
        optimizer.load_state_dict(bad)
    after = optimizer.state_dict()
    assert all(torch.equal(after["state"][k][n], before["state"][k][n]) for k in before["state"]
               for n in before["state"][k])


def test_lr_zero_moves_the_moments_only(net):
    model, mutator = net.model, net.mutator
    x, y = _batch()
    before = _params(model)
    optimizer = _fast(net, lr=0.0)
    _train(model, mutator, optimizer, _subnets(mutator), x, y, steps=2)
    assert all(torch.equal(v, before[k]) for k, v in _params(model).items())
    assert any(bool(optimizer.state[p]["exp_avg"].abs().max() > 0) for p in model.parameters())


@pytest.mark.parametrize("kwargs,key", [(dict(lr=-1.0), "lr"), (dict(eps="1e-8"), "eps"),
                                        (dict(weight_decay=-0.1), "weight_decay"), (dict(betas=(0.9, 1.0)), "betas"),
                                        (dict(betas=0.9), "betas"), (dict(lr=True), "lr")])
def test_bad_hyper_parameters(net, kwargs, key):
    with pytest.raises(ValueError, match=f"KeptSliceAdamW: {key}"):
        _fast(net, **kwargs)


def test_dmcp_trains_with_it_as_the_weights_optimizer():
    from test_dmcp import build, data, loss_fn
    algorithm = build()
    weights = KeptSliceAdamW(algorithm.model, lr=1e-2)
    arch = torch.optim.Adam(algorithm.arch_parameters(), lr=0.5)
    before = {k: v.detach().clone() for k, v in algorithm.model.named_parameters()}
    for _ in range(3):
        losses = algorithm.train_step(data(), loss_fn, {"architecture": weights, "mutator": arch})
    assert all(torch.isfinite(v) for v in losses.values()) and "arch.loss" in losses
    moved = [k for k, v in algorithm.model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert any("arch" not in k for k in moved)
    assert any(float(weights.state[p]["step"].min()) < float(weights.state[p]["step"].max())
               for p in algorithm.model.parameters() if p in weights.state)  # lazy: some channels were dropped
