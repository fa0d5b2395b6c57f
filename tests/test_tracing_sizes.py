"""What the recorded forward cannot see as code: advanced indexing that leaves the channel dim whole (CLIP's
end-of-sequence gather), and Python ints read from tensor shapes (``B, N, C = x.shape``), which the recorder keeps
as size nodes so a reshape by them follows the pruned width."""
import pytest
import torch
from torch import nn

from pyprune.mutators import ChannelMutator
from pyprune.tracing import PruningTraceWarning, trace_channel_units

TRACERS = ["fx", "torch_function"]


def prepared(model, demo, ratio=0.5, tracer="auto"):
    import functools
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=demo),
                             trace_fn=functools.partial(trace_channel_units, tracer=tracer))
    mutator.prepare_from_supernet(model)
    mutator.set_global_ratio(ratio)
    return mutator


def assert_export_equals_dynamic(model, mutator, *inputs, atol=1e-5):
    model.eval()
    with torch.no_grad():
        dynamic = model(*inputs)
    exported = mutator.export(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(*inputs), dynamic, atol=atol, rtol=0)
    return exported


def unit_of(mutator, layer):
    return next(u for u in mutator.units if any(r.name == layer for r in u.output_related))


# ---- advanced indexing on other dims than the channels -------------------------------------------------------
class EndOfSequencePool(nn.Module):
    """A text tower's pooling as CLIP writes it: the hidden state of each sequence's largest token id."""

    def __init__(self, vocab=16, hidden=12, index="eos"):
        super().__init__()
        self.embed, self.index = nn.Embedding(vocab, hidden), index
        self.fc = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 3)
        self.register_buffer("channel_of_row", torch.tensor([0, 2, 1]))   # for a batch of 3
        self.register_buffer("mask", torch.rand(3, 5) > 0.5)              # over (B, T) = (3, 5)

    def forward(self, ids):
        h = self.norm(self.fc(self.embed(ids)))  # [B, T, hidden]
        rows = torch.arange(h.shape[0], device=h.device)
        if self.index == "eos":
            pooled = h[rows, ids.argmax(-1)]                  # [B, hidden]
        elif self.index == "channel":
            picked = h[rows, :, self.channel_of_row]          # [B, T]: one channel per row, not mapped
            pooled = picked[:, :1] * h[:, 0]
        else:
            pooled = h[self.mask].sum(0, keepdim=True)        # positions selected by a mask: not looked up
        return self.head(pooled)


@pytest.mark.parametrize("tracer", TRACERS)
def test_gather_on_the_batch_and_token_dims_passes_the_hidden_size_through(tracer):
    torch.manual_seed(0)
    model, ids = EndOfSequencePool().eval(), torch.randint(0, 16, (3, 5))
    with pytest.warns() as caught:
        mutator = prepared(model, ids, tracer=tracer)
    # (argmax reduces the token ids, the model input's dim 1: a group that is fixed anyway)
    assert not [w for w in caught if issubclass(w.category, PruningTraceWarning) and "argmax" not in str(w.message)]
    hidden = unit_of(mutator, "fc")
    assert hidden.is_mutable and {r.name for r in hidden.output_related} == {"fc", "norm"}
    exported = assert_export_equals_dynamic(model, mutator, ids)
    assert exported.fc.out_features == 6


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("index", ["channel", "mask"])
def test_gathers_that_pick_channels_or_mask_positions_fix_the_hidden_size(index, tracer):
    torch.manual_seed(0)
    model, ids = EndOfSequencePool(index=index).eval(), torch.randint(0, 16, (3, 5))
    with pytest.warns(PruningTraceWarning, match="getitem.*indexing with tensors at the channel dim"):
        mutator = prepared(model, ids, tracer=tracer)
    assert not unit_of(mutator, "fc").is_mutable
