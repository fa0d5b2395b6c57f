"""Channel-sized tensors the model's own code uses (ConvNeXt's layer_scale, ViT-style class token / position
embedding): pruned with the stream they scale, served at the kept channels, exported compact."""
import io
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision

from models import TokenNet
from pyprune.errors import ConfigError
from pyprune.mutators import ChannelMutator
from pyprune.ops import ChannelParameter, channel_parameters


def prepared(seed=0, ratio=0.5):
    torch.manual_seed(seed)
    model = TokenNet()
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=(2, 3, 4, 4)))
    mutator.prepare_from_supernet(model)
    mutator.set_global_ratio(ratio)
    return model, mutator


def stream_unit(mutator):
    return next(u for u in mutator.mutable_units if u.name.startswith("embed_"))


def test_stream_with_channel_tensors_is_pruned_and_exports_compact():
    model, mutator = prepared()
    slots = {slot.pyprune_name: slot for slot in channel_parameters(model)}
    assert set(slots) == {"class_token", "pos_embedding", "layer_scale"}
    assert all(slot.active_out_channels == 4 for slot in slots.values())
    assert model.class_token.shape == (1, 1, 4) and model._parameters["class_token"].shape == (1, 1, 8)
    x = torch.randn(2, 3, 4, 4)
    model.eval()
    with torch.no_grad():
        dynamic = model(x)
    exported = mutator.export(model).eval()
    assert type(exported) is TokenNet and not list(channel_parameters(exported))
    assert exported.class_token.shape == (1, 1, 4) and exported.layer_scale.shape == (4,)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), dynamic, rtol=1e-5, atol=1e-6)
    kept = stream_unit(mutator).current_index
    torch.testing.assert_close(exported.pos_embedding, model._parameters["pos_embedding"][..., kept])


def test_gradients_reach_only_the_kept_channels_of_the_full_tensors():
    model, mutator = prepared()
    model.train()
    F.cross_entropy(model(torch.randn(4, 3, 4, 4)), torch.tensor([0, 1, 2, 0])).backward()
    kept = stream_unit(mutator).current_mask
    grad = model._parameters["layer_scale"].grad
    assert grad.shape == (8,) and torch.all(grad[~kept] == 0) and torch.any(grad[kept] != 0)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in TokenNet().named_parameters()]


def test_state_dict_round_trip_restores_the_channel_tensor_selection():
    model, _ = prepared(ratio=0.5)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    other, _ = prepared(seed=1, ratio=1.0)
    other.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert other.class_token.shape == (1, 1, 4)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(torch.ones(1, 3, 4, 4)), model.eval()(torch.ones(1, 3, 4, 4)))


def test_bad_saved_selection_raises_and_changes_nothing():
    model, mutator = prepared()
    state = model.state_dict()
    stream = stream_unit(mutator).name
    state["_pyprune_selection"] = {**state["_pyprune_selection"], stream: torch.tensor([0, 0, 1, 2])}
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ConfigError, match=rf"unit {re.escape(stream)}: channel index 0 is given more than once"):
        model.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor))
    assert model.class_token.shape == (1, 1, 4)


def test_moving_the_model_moves_the_kept_indices():
    model, _ = prepared()
    model.to(torch.float64)
    slot = next(s for s in channel_parameters(model) if s.pyprune_name == "layer_scale")
    assert isinstance(slot, ChannelParameter) and slot.out_index.dtype == torch.int64
    assert model(torch.randn(1, 3, 4, 4, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.filterwarnings("ignore::pyprune.tracing.PruningTraceWarning")
def test_convnext_streams_are_pruned_through_layer_scale_and_layernorm2d():
    model = torchvision.models.convnext_tiny(weights=None, num_classes=10).eval()
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=(1, 3, 64, 64)))
    mutator.prepare_from_supernet(model)
    assert len(mutator.mutable_units) == len(mutator.units) - 2  # all but the model's input and logits
    mutator.set_global_ratio(0.5)
    exported = mutator.export(model).eval()
    assert type(exported.features[0][1]).__name__ == "LayerNorm2d"
    assert exported.features[0][1].normalized_shape == (48,)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-4)


def test_compiles_without_graph_breaks():
    model, _ = prepared()
    model.eval()
    x = torch.randn(2, 3, 4, 4)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.filterwarnings("ignore::pyprune.tracing.PruningTraceWarning")
def test_vit_stream_is_pruned_through_attention_class_token_and_hidden_dim():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_32(weights=None, image_size=64, num_classes=10).eval()
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=(1, 3, 64, 64)))
    mutator.prepare_from_supernet(model)
    stream = next(u for u in mutator.mutable_units if u.name.startswith("conv_proj_"))
    assert stream.num_channels == 768 and stream.groups == 12  # balanced over the attention heads
    mutator.set_choices({stream.name: 0.5})
    assert model.hidden_dim == 384 and model.class_token.shape == (1, 1, 384)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dynamic = model(x)
    exported = mutator.export(model).eval()
    assert exported.hidden_dim == 384 and exported.encoder.layers[0].self_attention.embed_dim == 384
    with torch.no_grad():
        torch.testing.assert_close(exported(x), dynamic, rtol=1e-4, atol=1e-4)
    mutator.set_choices({stream.name: 1.0})
    assert model.hidden_dim == 768


@pytest.mark.filterwarnings("ignore::pyprune.tracing.PruningTraceWarning")
def test_vit_state_dict_restores_hidden_dim():
    def prepared_vit(ratio):
        model = torchvision.models.vit_b_32(weights=None, image_size=64, num_classes=10).eval()
        mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=(1, 3, 64, 64)))
        mutator.prepare_from_supernet(model)
        mutator.set_global_ratio(ratio)
        return model
    pruned, fresh = prepared_vit(0.5), prepared_vit(1.0)
    fresh.load_state_dict(pruned.state_dict())
    assert fresh.hidden_dim == 384
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), pruned(x))


class CachedScaleNet(torch.nn.Module):
    """A channel scale whose eval-mode value is cached and dropped by ``train()`` (timm's attention-bias caches in
    LeViT / TinyViT): x ``[N, 6]`` -> ``[N, 3]``."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 8)
        self.scale = torch.nn.Parameter(torch.rand(8) + 0.5)
        self.head = torch.nn.Linear(8, 3)
        self.cache = {}

    def train(self, mode=True):
        super().train(mode)
        self.cache = {}
        return self

    def scaled(self):
        if self.training or torch.jit.is_tracing():
            return self.scale * 2
        if "scale" not in self.cache:
            self.cache["scale"] = self.scale * 2
        return self.cache["scale"]

    def forward(self, x):
        return self.head(self.proj(x) * self.scaled())


@pytest.mark.parametrize("tracer", ["FxTracer", "BackwardTracer"])
def test_a_value_the_owner_derives_from_a_channel_tensor_follows_every_new_selection(tracer):
    torch.manual_seed(0)
    model = CachedScaleNet().train()
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=(2, 6), tracer_type=tracer))
    mutator.prepare_from_supernet(model)
    unit = next(u for u in mutator.mutable_units if u.name.startswith("proj_"))
    model.eval()
    x = torch.randn(4, 6)
    for count in (8, 4, 6, 2):  # eval forwards at one width after another: the cache must not outlive its width
        mutator.set_choices({unit.name: count})
        with torch.no_grad():
            dynamic = model(x)
            torch.testing.assert_close(mutator.export(model).eval()(x), dynamic, rtol=1e-5, atol=1e-6)
    assert [m.training for m in model.modules()] == [False] * len(list(model.modules()))  # modes left as they were
