"""Switching subnets cheaply: what the fast ``set_choices`` path must still get right.

The LayerIndexAssembler builds host-known index pieces on the host and moves them in one copy per device, skips
layer sides whose units' selection keys did not change, and Sequential units keep their prefix on the host. These
tests check the resulting layer indices against a mask-built reference, the one-copy batching (on the meta device,
so it runs without a GPU), the skipping, and ``ChannelMutator.subnet_key``. Timing lives in
benchmarks/bench_switch.py, not here.
"""
import pytest
import torch
import torchvision

from models import SmallNet, small_net_specs
from pyprune import ops
from pyprune.mutators import ChannelMutator
from pyprune.units import L1MutableChannelUnit, LayerIndexAssembler, SequentialMutableChannelUnit
from pyprune.units import assembler as assembler_module

RATIO_MODE = dict(choice_mode="ratio", min_ratio=0.0)


def prepared_small_net(unit_type):
    model = SmallNet().eval()
    units = [u for u in (unit_type.from_spec(s, **RATIO_MODE) for s in small_net_specs()) if u.is_mutable]
    for unit in units:
        unit.prepare_for_pruning(model)
    assembler = LayerIndexAssembler(units).attach(model)
    return model, units, assembler


def reference_index(assembler, key):
    """The side's kept channels built from each unit's mask, the slow obvious way (None = all kept)."""
    name, is_output = key
    mask = torch.ones(assembler._sizes[key], dtype=torch.bool)
    for r in assembler._ranges[key]:
        mask[r.start:r.end] = r.unit.current_mask.cpu().repeat_interleave(r.expand)
    return None if bool(mask.all()) else torch.nonzero(mask).reshape(-1)


def layer_side_index(assembler, key):
    module = assembler._modules[key[0]]
    return module.out_index if key[1] or assembler._sides[key].setter == "set_out_index" else module.in_index


def assert_layers_match_units(assembler):
    for key in assembler._ranges:
        expected, actual = reference_index(assembler, key), layer_side_index(assembler, key)
        if expected is None:
            assert actual is None, key
        else:
            assert actual is not None and actual.tolist() == expected.tolist(), key


@pytest.mark.parametrize("unit_type", [SequentialMutableChannelUnit, L1MutableChannelUnit])
def test_layer_indices_equal_the_mask_reference_through_many_switches(unit_type):
    model, units, assembler = prepared_small_net(unit_type)
    generator = torch.Generator().manual_seed(1)
    for _ in range(12):
        with assembler.deferred():
            for unit in units:
                ratio = float(torch.randint(1, 5, (), generator=generator)) / 4  # 0.25 ... 1.0, often repeated
                unit.current_choice = ratio
        assert_layers_match_units(assembler)
    with torch.no_grad():  # and the model runs at that width
        assert model(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_sequential_units_keep_their_prefix_on_the_host():
    _, units, _ = prepared_small_net(SequentialMutableChannelUnit)
    unit = units[0]
    unit.current_choice = 0.5
    assert unit.selected_index.device.type == "cpu"
    assert unit.selected_index.tolist() == list(range(unit.active_channels))
    assert unit.selection_key == unit.active_channels
    unit.apply_index(torch.tensor([0, 2, 5, 7]))  # an exact selection is not a prefix: keyed by version
    assert unit.selection_key == ("version", unit.version)


def count_index_sets(monkeypatch, model):
    calls = []
    for name, module in model.named_modules():
        if isinstance(module, ops.DynamicChannelMixin):
            for method in ("set_out_index", "set_in_index"):
                original = getattr(module, method)
                monkeypatch.setattr(module, method,
                                    lambda index, _o=original, _n=name: (calls.append(_n), _o(index))[1])
    return calls


def test_a_side_whose_units_came_back_is_not_touched(monkeypatch):
    model, units, assembler = prepared_small_net(SequentialMutableChannelUnit)
    calls = count_index_sets(monkeypatch, model)
    unit = units[0]
    with assembler.deferred():
        unit.current_choice = 0.5
        unit.current_choice = 1.0
    assert calls == []
    unit.current_choice = 0.5
    assert sorted(set(calls)) == ["bn0", "bn1", "conv0", "conv1", "conv2", "conv3"]


def test_a_layer_set_from_outside_is_rebuilt_even_when_the_keys_came_back():
    model, units, assembler = prepared_small_net(SequentialMutableChannelUnit)
    unit = units[0]
    unit.current_choice = 0.5
    model.conv2.set_in_channels([0, 1, 2, 7])  # someone else sets the layer directly
    with assembler.deferred():
        unit.current_choice = 1.0
        unit.current_choice = 0.5
    assert model.conv2.in_index.tolist() == [0, 1, 2, 3]


def test_host_pieces_reach_the_device_in_one_copy(monkeypatch):
    """With the layers on another device (meta here: shapes only), every host-built piece of one flush goes there
    in one copy and each layer gets a view of that one buffer."""
    model, units, assembler = prepared_small_net(SequentialMutableChannelUnit)
    meta = torch.device("meta")
    monkeypatch.setattr(assembler_module, "_device_of", lambda module: meta)
    copies = []
    original_copy = assembler_module._HostToDevice.copy

    def recording_copy(self):
        copies.append({device: len(pieces) for device, pieces in self._pieces.items()})
        original_copy(self)
    monkeypatch.setattr(assembler_module._HostToDevice, "copy", recording_copy)
    with assembler.deferred():
        for unit in units:
            unit.current_choice = 0.5
    assert len(copies) == 1 and list(copies[0]) == [meta] and copies[0][meta] >= 10
    indices = [layer_side_index(assembler, key) for key in assembler._ranges]
    assert all(i is not None and i.device == meta for i in indices)
    assert len({id(i._base) for i in indices}) == 1  # views of one buffer
    expected = [reference_index(assembler, key).numel() for key in assembler._ranges]
    assert [i.numel() for i in indices] == expected


def test_device_pieces_are_joined_with_the_moved_host_pieces(monkeypatch):
    """A unit whose index already lives on the device (as an importance unit's does) is concatenated there with the
    host-built pieces around it (the uncovered channels of a concat consumer here): one copy, the right length."""
    model, units, assembler = prepared_small_net(SequentialMutableChannelUnit)
    meta = torch.device("meta")
    monkeypatch.setattr(assembler_module, "_device_of", lambda module: meta)
    concat_part = next(u for u in units if any(r.name == "dw" and r.start == 6 for r in u.output_related))
    concat_part.apply_index(torch.tensor([0, 3], device=meta))  # on the "device": channels 6 and 9 of dw
    dw_out = model.dw.out_index
    assert dw_out.device == meta and dw_out.numel() == 6 + 2


def test_subnet_key_follows_the_choices():
    model = torchvision.models.resnet18(num_classes=10)
    mutator = ChannelMutator(channel_unit_cfg=dict(type="SequentialMutableChannelUnit"),
                             parse_cfg=dict(type="ChannelAnalyzer", demo_input=(1, 3, 32, 32)))
    mutator.prepare_from_supernet(model)
    first, second = mutator.sample_choices(), {u.name: 0.5 for u in mutator.mutable_units}
    mutator.set_choices(first)
    key_first = mutator.subnet_key()
    mutator.set_choices(second)
    assert mutator.subnet_key() != key_first
    mutator.set_choices(first)
    assert mutator.subnet_key() == key_first and hash(key_first) is not None
    assert len(key_first) == len(mutator.mutable_units)


def test_subnet_key_of_ranking_units_changes_when_they_rerank():
    model, units, assembler = prepared_small_net(L1MutableChannelUnit)
    before = tuple(u.selection_key for u in units)
    units[0].current_choice = 0.5
    after = tuple(u.selection_key for u in units)
    assert after[0] != before[0] and after[1:] == before[1:]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("unit_type", ["SequentialMutableChannelUnit", "L1MutableChannelUnit"])
def test_cuda_switch_is_one_host_to_device_copy_and_never_syncs(unit_type):
    model = torchvision.models.resnet18(num_classes=10)
    mutator = ChannelMutator(channel_unit_cfg=dict(type=unit_type),
                             parse_cfg=dict(type="ChannelAnalyzer", demo_input=(1, 3, 32, 32)))
    mutator.prepare_from_supernet(model)
    model.cuda().eval()
    subnets = [{u.name: r for u in mutator.mutable_units} for r in (0.25, 0.5, 0.75)]
    mutator.set_choices(subnets[0])  # first use: allocator, pinned host pool
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            for choices in subnets[1:]:
                mutator.set_choices(choices)
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    copies = [e for e in profile.events() if "HtoD" in e.name]
    if unit_type == "SequentialMutableChannelUnit":
        assert len(copies) == 2  # one per set_choices
    else:
        assert len(copies) <= 2  # ranked on the device: at most the uncovered ranges go over, once per switch
    x = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(mutator.export(model)(x), model(x), rtol=1e-4, atol=1e-4)
