"""The prepared model must run narrower than it was traced: units whose narrowing breaks the forward (a size the
tracer could not see) are fixed at prepare time with a warning naming the unit; strict mode raises."""
import warnings

import pytest
import torch
from torch import nn

from pyprune import ChannelMutator
from pyprune.errors import UntraceableOpError
from pyprune.tracing import PruningTraceWarning


class HiddenWidth(nn.Module):
    """``self.width`` is read from the input once per call into a Python int the recorded forward only sees as a
    number, and then shapes the projection's output: narrowing the input breaks the reshape."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        width = int(x.shape[-1])  # a plain int: the tracer cannot tell it follows x's width
        y = self.proj(x).reshape(x.shape[0], 2, width // 2).flatten(1)
        return self.head(y)


def _prepare(strict=False):
    model = HiddenWidth()
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=(2, 6)), strict=strict)
    mutator.prepare_from_supernet(model)
    return model, mutator


def test_unit_whose_narrowing_breaks_the_forward_is_fixed_with_a_warning():
    with pytest.warns(PruningTraceWarning, match="does not run with it narrower"):
        model, mutator = _prepare()
    assert any(not u.is_mutable and "narrower" in (u.reason or "") for u in mutator.units)
    mutator.set_global_ratio(0.5)
    x = torch.randn(2, 6)
    torch.testing.assert_close(model(x), mutator.export(model)(x))


def test_strict_mode_raises_instead_of_fixing():
    with pytest.raises(UntraceableOpError):
        _prepare(strict=True)


def test_a_model_that_runs_narrower_gets_no_warning():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=(2, 6)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mutator.prepare_from_supernet(model)
    assert [u.is_mutable for u in mutator.units].count(True) == 1
