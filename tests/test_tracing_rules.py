"""The tracer's parts on their own: the rule tables, single rules on a hand-made context, channel sizes, channel
tensors and int attributes, and adding a rule in one place."""
import operator
from fractions import Fraction
from contextlib import nullcontext

import pytest
import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from pyprune.ops import DYNAMIC_OPS
from pyprune.tracing import PruningTraceWarning, trace_channel_units
from pyprune.tracing.channel_tensors import count_attribute
from pyprune.tracing.context import OP_RULES, PropagationContext, op_name, op_rule
from pyprune.tracing.rules_layers import LAYER_RULES, layer_rule
from pyprune.tracing.rules_shape import concat, getitem, permute, reshape, split, stack
from pyprune.tracing.propagate import visit
from pyprune.tracing.sizes import ChannelSize, check_sizes, check_unchecked_sizes


def traced(fn, *shapes):
    """fx graph of ``fn`` with shapes recorded for inputs of ``shapes``, and a context whose inputs each hold one
    free (prunable) group of their dim-1 channels."""
    gm = torch.fx.symbolic_trace(fn)
    ShapeProp(gm).propagate(*(torch.randn(s) for s in shapes))
    ctx = PropagationContext(nn.Module())
    for node, shape in zip([n for n in gm.graph.nodes if n.op == "placeholder"], shapes):
        ctx.spaces[node] = ctx.new_space(shape[1], 1, len(shape))
    return gm.graph, ctx


def node_named(graph, name):
    return next(n for n in graph.nodes if n.name == name)


def layout(ctx, space):
    return [(ctx.table.find(s.gid), s.start, s.end, s.expand) for s in space.segments]


# ---- tables ------------------------------------------------------------------------------------------------
def test_every_layer_with_a_dynamic_op_has_a_layer_rule():
    assert set(LAYER_RULES) == set(DYNAMIC_OPS)


def test_a_name_or_layer_type_takes_one_rule_only():
    with pytest.raises(ValueError, match="already exist"):
        op_rule("cat")(lambda ctx, node, name: None)
    with pytest.raises(ValueError, match="Conv2d"):
        layer_rule(nn.Conv2d)(lambda ctx, node, module: None)
    assert OP_RULES["cat"] is concat and OP_RULES["transpose"] is permute


def test_op_names_join_fx_and_recorded_spellings():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    nodes = [graph.call_function(operator.add, (x, x)), graph.call_function(torch.Tensor.__add__, (x, 1)),
             graph.call_method("add", (x, x)), graph.call_function(torch.add, (x, x))]
    assert {op_name(n, nn.Module()) for n in nodes} == {"add"}


# ---- single rules --------------------------------------------------------------------------------------------
def test_permute_moves_the_channel_dim():
    graph, ctx = traced(lambda x: x.permute(0, 2, 3, 1), (2, 8, 3, 3))
    space = permute(ctx, node_named(graph, "permute"), "permute")
    assert (space.dim, space.ndim, space.width) == (3, 4, 8)


def test_flatten_expands_each_channel_over_the_trailing_dims():
    graph, ctx = traced(lambda x: x.flatten(1), (2, 8, 3, 3))
    space = reshape(ctx, node_named(graph, "flatten"), "flatten")
    assert (space.dim, space.segments[0].expand, space.width) == (1, 9, 72)


def test_reshape_that_splits_the_channel_dim_fixes_the_group():
    graph, ctx = traced(lambda x: x.reshape(2, 2, 4, 9), (2, 8, 3, 3))
    with pytest.warns(PruningTraceWarning, match="splits the channel dim"):
        assert reshape(ctx, node_named(graph, "reshape"), "reshape") is None
    assert ctx.table.is_fixed(0)


@pytest.mark.parametrize("dim, channel_dim", [(-1, 1), (0, 2), (1, 2), (2, 1)])
def test_stack_keeps_the_channels_of_its_pieces_on_their_dim(dim, channel_dim):
    graph, ctx = traced(lambda a, b: torch.stack([a, b], dim), (2, 8, 4), (2, 8, 4))
    space = stack(ctx, node_named(graph, "stack"), "stack")
    assert (space.dim, space.ndim, space.width) == (channel_dim, 4, 8)
    assert ctx.table.find(0) == ctx.table.find(1) and not ctx.table.is_fixed(0)  # both pieces: one group


def test_stack_of_pieces_with_channels_on_different_dims_fixes_them():
    graph, ctx = traced(lambda a, b: torch.stack([a, b.transpose(1, 2)], -1), (2, 8, 8), (2, 8, 8))
    ctx.spaces[node_named(graph, "transpose")] = permute(ctx, node_named(graph, "transpose"), "transpose")
    with pytest.warns(PruningTraceWarning, match="same dim"):
        assert stack(ctx, node_named(graph, "stack"), "stack") is None
    assert ctx.table.is_fixed(0) and ctx.table.is_fixed(1)


def test_concat_then_split_give_back_the_pieces():
    graph, ctx = traced(lambda a, b: torch.cat([a, b], 1).split([8, 4], 1), (2, 8, 4), (2, 4, 4))
    cat_node, split_node = node_named(graph, "cat"), node_named(graph, "split")
    ctx.spaces[cat_node] = concat(ctx, cat_node, "cat")
    assert [(s.gid, s.start, s.end) for s in ctx.spaces[cat_node].segments] == [(0, 0, 8), (1, 0, 4)]
    pieces = split(ctx, split_node, "split")
    assert [layout(ctx, p) for p in pieces] == [[(0, 0, 8, 1)], [(1, 0, 4, 1)]]


def test_getitem_slices_channels_and_refuses_single_channels():
    graph, ctx = traced(lambda x: (x[:, 2:6], x[:, 3]), (2, 8, 4))
    sliced, single = [n for n in graph.nodes if op_name(n, ctx.model) == "getitem"]
    assert [(s.start, s.end) for s in getitem(ctx, sliced, "getitem").segments] == [(2, 6)]
    with pytest.warns(PruningTraceWarning, match="selects single channels"):
        assert getitem(ctx, single, "getitem") is None


# ---- sizes ---------------------------------------------------------------------------------------------------
def visit_all(graph, ctx):
    """The driver's loop over the op nodes (the inputs already have values; the output would pin what it returns)."""
    for node in graph.nodes:
        if node.op not in ("placeholder", "output"):
            ctx.spaces[node] = visit(ctx, node)
            check_sizes(ctx, node)
    check_unchecked_sizes(ctx)


def test_channel_count_read_from_a_tensor_is_an_exact_channel_size():
    graph, ctx = traced(lambda x: (x.shape[1] * 2, x.shape[1] // 4, x.shape[1] + 1), (2, 8, 4))
    visit_all(graph, ctx)
    x = ctx.spaces[node_named(graph, "x")]
    assert ctx.spaces[node_named(graph, "getitem")] == ChannelSize((x,))
    # scaled by a plain int it stays proportional to the width (kv_heads * n_rep, C // head_dim); anything else not
    assert ctx.spaces[node_named(graph, "mul")] == ChannelSize((x,), factor=Fraction(2))
    assert ctx.spaces[node_named(graph, "floordiv")] == ChannelSize((x,), factor=Fraction(1, 4))
    assert ctx.spaces[node_named(graph, "add")] == ChannelSize((x,), exact=False)


@pytest.mark.parametrize("fn, pinned", [(lambda x, y: x.reshape(2, x.shape[1], -1), False),
                                        (lambda x, y: y.reshape(2, x.shape[1], -1), True)])
def test_channel_count_may_size_only_its_own_channels(fn, pinned):
    graph, ctx = traced(fn, (2, 8, 4), (2, 4, 8))
    with pytest.warns() if pinned else nullcontext():
        visit_all(graph, ctx)
    assert ctx.table.is_fixed(ctx.spaces[node_named(graph, "x")].segments[0].gid) == pinned


# ---- channel tensors and int attributes ----------------------------------------------------------------------
class Owner(nn.Module):
    def __init__(self, **ints):
        super().__init__()
        for name, value in ints.items():
            setattr(self, name, value)


@pytest.mark.parametrize("ints, expected", [({"hidden_dim": 8, "heads": 2}, "block.hidden_dim"),
                                             ({"hidden_dim": 8, "width": 8}, None), ({"_hidden": 8}, None)])
def test_count_attribute_binds_only_one_public_int(ints, expected):
    model = nn.Module()
    model.block = Owner(**ints)
    graph = torch.fx.Graph()
    node = graph.placeholder("x")
    node.meta["module_path"] = "block"
    assert count_attribute(model, node, 8) == expected


# ---- adding a rule -------------------------------------------------------------------------------------------
class Cleaned(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.nan_to_num(self.a(x)))


def unit_after_a(model):
    return next(s for s in trace_channel_units(model, torch.randn(1, 3, 4, 4))
                if any(r.name == "a" for r in s.output_related))


def test_a_new_op_rule_is_one_table_entry(monkeypatch):
    assert not unit_after_a(Cleaned()).fixed  # no rule for nan_to_num: the generic rule passes the channels on

    def nan_to_num(ctx, node, name):
        """A rule that (for the sake of the example) keeps the channels it meets whole."""
        space = ctx.space(node.args[0])
        ctx.fix_space(space, "kept whole by the new rule")
        return space

    monkeypatch.setitem(OP_RULES, "nan_to_num", nan_to_num)
    unit = unit_after_a(Cleaned())
    assert unit.fixed and unit.reason == "kept whole by the new rule"


class _Reorder(nn.Module):
    """conv (8 channels) -> an op that may move values along a dim -> conv."""

    def __init__(self, op):
        super().__init__()
        self.a, self.b, self.op = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), op

    def forward(self, x):
        return self.b(self.op(self.a(x)))


@pytest.mark.parametrize("tracer", ["fx", "torch_function"])
@pytest.mark.parametrize("op, reorders", [
    (lambda y: torch.roll(y, 1, 1), True), (lambda y: y.roll(3), True), (lambda y: torch.roll(y, 1, 2), False),
    (lambda y: y.flip(1), True), (lambda y: torch.flip(y, [3]), False),
    (lambda y: y.cumsum(1), True), (lambda y: torch.cumsum(y, dim=2), False),
    (lambda y: y.sort(1)[0], True), (lambda y: y.sort(-1)[0], False)])
def test_ops_that_reorder_along_the_channel_dim_fix_the_group(op, reorders, tracer):
    """Channel c before ``roll`` / ``flip`` / ``cumsum`` / ``sort`` over channels is not channel c after it: a
    pruned index would name other channels. Over other dims the channels pass through."""
    with pytest.warns(PruningTraceWarning) if reorders else nullcontext():
        specs = trace_channel_units(_Reorder(op), torch.randn(1, 3, 4, 4), tracer=tracer)
    unit = next(s for s in specs if s.num_channels == 8)
    assert unit.fixed == reorders
