"""A layer's weight read by the code around it: ``F.linear(x, weight=self.qkv.weight, bias=qkv_bias)``.

timm's BEiT and EVA attention never call their fused ``qkv`` Linear: the attention's own forward passes its weight
to ``F.linear`` with a bias concatenated from separate tensors, ``torch.cat((self.q_bias, self.k_bias,
self.v_bias))``. That call is the Linear's: its input channels are the Linear's inputs and its output the
Linear's outputs (one group per part of a fused output, :func:`.rules_layers.split_output_groups`), its refs
marked ``read_by`` the module whose code reads the weight, so a pruned model hands that code the weight at the
kept rows and columns (:mod:`pyprune.ops.read_layers`). The output is cut where the bias pieces meet, each piece a
channel tensor of its own group (:func:`.channel_tensors.bind_channel_tensor`), so a pruned model reads each at
its kept channels.
"""
from typing import List, Optional, Tuple, Union

import torch.fx
from torch import nn

from ..ops.registry import is_prunable_layer, registered_base
from .channel_space import ChannelSpace, slice_space
from .channel_tensors import bind_channel_tensor, is_model_tensor
from .context import PropagationContext, dim_arg, op_name, op_rule, shapes
from .rules_layers import LayerName, layer_inputs, split_output_groups
from .rules_shape import CONCAT

# A bias piece: (the node whose reading binds it, tensor path, [lo, hi) of the output channels it covers)
BiasPiece = Tuple[torch.fx.Node, str, int, int]


def _argument(node: torch.fx.Node, index: int, name: str):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


@op_rule("linear")
def functional_linear(ctx: PropagationContext, node: torch.fx.Node, name: str):
    """``F.linear(x, <layer>.weight, bias)`` with ``<layer>`` an ``nn.Linear`` of the model inside the calling
    module: mapped as a call of that layer, its bias pieces channel tensors of the output groups."""
    x, weight, bias = _argument(node, 0, "input"), _argument(node, 1, "weight"), _argument(node, 2, "bias")
    reader = node.meta.get("module_path", "")
    path = _linear_of_weight(ctx, weight, reader)
    if path is None:
        return ctx.unknown(node, name, "its weight is not the weight of an nn.Linear inside the calling module, "
                                       "read by F.linear only")
    module = ctx.model.get_submodule(path)
    pieces = _bias_pieces(ctx, node, bias, path, module.out_features)
    if isinstance(pieces, str):
        return ctx.unknown(node, name, pieces)
    layer = LayerName(path, read_by=reader)
    space, ndim = ctx.space(x), len(shapes(node))
    layer_inputs(ctx, node, space, ndim - 1 if space is None else space.ndim - 1, False, layer)
    out = split_output_groups(ctx, node, module.out_features, ndim - 1, ndim, layer,
                              cuts=[lo for _, _, lo, _ in pieces])
    for reading, tensor_path, lo, hi in pieces:
        bind_channel_tensor(ctx, reading, ChannelSpace(0, 1, slice_space(out, lo, hi)), tensor_path, 0)
    return out


def _linear_of_weight(ctx: PropagationContext, weight, reader: str) -> Optional[str]:
    """Path of the ``nn.Linear`` whose ``weight`` the node ``weight`` reads, when that layer lives inside the
    ``reader`` module (whose code the pruned model then hands the kept weight) and every read of that weight in
    the graph is the weight of an ``F.linear``; else None."""
    if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr" or not weight.target.endswith(".weight"):
        return None
    path = weight.target[:-len(".weight")]
    if reader and not path.startswith(reader + "."):
        return None
    try:
        module = ctx.model.get_submodule(path)
    except AttributeError:
        return None
    if not is_prunable_layer(module) or registered_base(module) is not nn.Linear:
        return None
    reads = [n for n in weight.graph.nodes if n.op == "get_attr" and n.target == weight.target]
    if any(op_name(user, ctx.model) != "linear" or _argument(user, 1, "weight") is not read or
           user.meta.get("module_path", "") != reader for read in reads for user in read.users):
        return None
    return path


def _bias_pieces(ctx: PropagationContext, node: torch.fx.Node, bias, path: str,
                 width: int) -> Union[List[BiasPiece], str]:
    """The tensors the bias is made of and the output channels each covers ([] for none or the layer's own
    bias), or why the bias cannot follow the output channels."""
    if bias is None:
        return []
    if not isinstance(bias, torch.fx.Node):
        return "its bias is not a tensor of the model"
    if bias.op == "get_attr":
        if bias.target == f"{path}.bias":
            return []
        return [(node, bias.target, 0, width)] if _is_vector(ctx, bias, width) else \
            f"its bias {bias.target} is not a model tensor of shape ({width},)"
    if op_name(bias, ctx.model) not in CONCAT or list(bias.users) != [node] or dim_arg(bias, 1, 0) not in (0, -1):
        return "its bias is computed in a way pyprune cannot follow (only a concatenation of model tensors is)"
    parts = bias.args[0] if bias.args else bias.kwargs.get("tensors")
    pieces, offset = [], 0
    for part in parts:
        size = shapes(part)[0] if isinstance(part, torch.fx.Node) and len(shapes(part) or ()) == 1 else None
        if size is None or part.op != "get_attr" or not _is_vector(ctx, part, size):
            return f"a piece of its bias ({getattr(part, 'name', part)}) is not a parameter or buffer of the model"
        pieces.append((bias, part.target, offset, offset + size))
        offset += size
    if offset != width:
        return f"its bias pieces cover {offset} of {width} output channels"
    return pieces


def _is_vector(ctx: PropagationContext, node: torch.fx.Node, width: int) -> bool:
    """Whether ``node`` reads a 1-d parameter / buffer of the model ``width`` long."""
    shape = shapes(node)
    return is_model_tensor(ctx.model, node.target) and shape is not None and tuple(shape) == (width,)
