"""Head-structured channel groups: a channel dim split by a reshape into ``(heads, head_dim)``.

``q_proj(x).view(B, N, heads, head_dim)`` (or ``-1`` for the heads, or a fused ``qkv(x).reshape(B, N, 3, heads,
head_dim)``) turns the ``heads * head_dim`` channels of the projection into heads: the group is refined into a group
of heads whose every channel (slot) covers ``head_dim`` consecutive channels (:meth:`GroupTable.refine`), so a unit
keeps whole heads and ``head_dim`` stays what it is (rotary embeddings and any op along ``head_dim`` see the same
size). The heads dim is then a channel dim like any other: permute / transpose move it, SDPA and matmul couple the
heads of q, k and v (:mod:`.rules_attention`), and ``transpose(1, 2).reshape(B, N, heads * head_dim)`` merges it
back, each head spanning ``head_dim`` positions of the output projection's input.

A split is mapped only where a pruned model computes it the same way: the heads entry of the target shape is ``-1``,
a size that follows the width (``C // head_dim``) or an int attribute of the module whose code reshapes (bound as a
:class:`~pyprune.ops.ChannelCount`, e.g. timm's ``num_heads``); the head_dim entry is a constant. Int attributes of
that module that hold its head counts or head widths by their conventional names (:data:`HEAD_COUNT_ATTRIBUTES`,
:data:`HEAD_WIDTH_ATTRIBUTES`, ...) follow the heads too, though the forward never reads them into a shape (BERT's
``num_attention_heads`` / ``all_head_size``).

Grouped-query attention (fewer key / value heads than query heads, ``repeat_kv`` or ``enable_gqa=True``) is pruned
in one of :data:`GQA_MODES`: ``"keep_kv"`` (default) keeps every key / value head and drops query heads, the same
number in every KV group (the query heads' unit is balanced over the KV groups; ``num_key_value_groups`` follows);
``"drop_kv_groups"`` drops whole KV groups, each with its key / value head and its query heads.
"""
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple, Union

import torch.fx
from torch import nn

from .channel_space import ChannelSpace, PartedSpace, Segment, merge_adjacent, slice_space
from .context import PropagationContext
from .fused import is_fused_part
from .sizes import ChannelSize, tie_blocks
from .spec import ChannelRef

GQA_MODES = ("keep_kv", "drop_kv_groups")

# Int attributes of an attention module that hold, by convention, its number of (query) heads, the width of all its
# heads together, its number of key / value heads, and query heads per key / value head.
HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_heads", "n_head", "num_head", "heads")
HEAD_WIDTH_ATTRIBUTES = ("all_head_size", "attn_dim", "split_size", "inner_dim")
KV_HEAD_ATTRIBUTES = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head")
KV_GROUP_ATTRIBUTES = ("num_key_value_groups", "num_kv_groups", "n_rep", "num_queries_per_kv")
PREFERRED = HEAD_COUNT_ATTRIBUTES + KV_HEAD_ATTRIBUTES + HEAD_WIDTH_ATTRIBUTES + KV_GROUP_ATTRIBUTES
# Int attributes that hold the size of one head (it stays fixed), and ones that are indices, not counts: they
# never follow a unit.
HEAD_SIZE_ATTRIBUTES = ("head_dim", "attention_head_size", "head_size", "dim_head", "d_head", "d_kv",
                        "key_value_proj_dim")
KEPT_ATTRIBUTES = HEAD_SIZE_ATTRIBUTES + ("layer_idx", "layer_id", "layer_index", "block_idx")


def module_of(ctx: PropagationContext, node: torch.fx.Node) -> Tuple[str, Optional[nn.Module]]:
    """(path, module) of the module whose code made ``node`` (None where the path names no module)."""
    path = node.meta.get("module_path", "")
    try:
        return path, (ctx.model.get_submodule(path) if path else ctx.model)
    except AttributeError:
        return path, None


def _int_attributes(module: Optional[nn.Module]) -> dict:
    """The public int attributes of ``module`` that may hold a channel count (not :data:`KEPT_ATTRIBUTES`)."""
    if module is None:
        return {}
    return {a: v for a, v in vars(module).items()
            if type(v) is int and not a.startswith("_") and a not in KEPT_ATTRIBUTES}


def _path(owner_path: str, attribute: str) -> str:
    return f"{owner_path}.{attribute}" if owner_path else attribute


def count_attribute(ctx: PropagationContext, node: torch.fx.Node, value: int, heads: bool = False) -> Optional[str]:
    """Path of the int attribute equal to ``value`` of the module whose code made ``node`` (never one of
    :data:`KEPT_ATTRIBUTES`): the only one, or the only one with a conventional head-count / width name. With
    ``heads`` (a head count), only attributes whose name says heads are taken."""
    owner_path, owner = module_of(ctx, node)
    names = [a for a, v in _int_attributes(owner).items() if v == value]
    if heads:
        names = [a for a in names if a in PREFERRED or "head" in a]
    if len(names) > 1:
        names = [a for a in names if a in PREFERRED]
    return _path(owner_path, names[0]) if len(names) == 1 else None


def named_attributes(ctx: PropagationContext, node: torch.fx.Node, names: Sequence[str], value: int,
                     config: bool = False) -> List[str]:
    """Paths of the attributes called one of ``names`` that equal ``value`` in the module whose code made ``node``;
    with ``config``, those of the config object it holds too (``config.num_attention_heads``, see
    :func:`_config_attributes`)."""
    owner_path, owner = module_of(ctx, node)
    found = _int_attributes(owner)
    if config:
        found.update(_config_attributes(owner))
    return [_path(owner_path, a) for a, v in found.items() if a.rpartition(".")[2] in names and v == value]


def _config_attributes(module: Optional[nn.Module]) -> dict:
    """``{"config.<name>": value}``: the public int attributes of the plain config object ``module.config``
    (an HF config; Phi-3 computes its q | k | v slice bounds from ``self.config.num_attention_heads``)."""
    config = vars(module).get("config") if module is not None else None
    if config is None or isinstance(config, (nn.Module, torch.Tensor)):
        return {}
    return {f"config.{a}": getattr(config, a) for a in HEAD_COUNT_ATTRIBUTES + KV_HEAD_ATTRIBUTES
            if type(getattr(config, a, None)) is int}


def _named_value(ctx: PropagationContext, node: torch.fx.Node, names: Sequence[str], value: int) -> bool:
    """Whether the module whose code made ``node`` has an int attribute called one of ``names`` equal to ``value``."""
    _, owner = module_of(ctx, node)
    found = vars(owner) if owner is not None else {}
    return any(type(found.get(a)) is int and found[a] == value for a in names)


def bind_count(ctx: PropagationContext, space: ChannelSpace, path: str, expand: int = 1) -> None:
    """Int attribute ``path`` follows the channels of ``space``: it counts its positions, times ``expand`` (the
    width in channels of a space of heads: ``head_dim`` per head); a partial segment pins its group."""
    offset = 0
    ctx.count_paths.add(path)
    for seg in space.segments:
        width = seg.width * expand
        if ctx.whole(seg):
            ctx.table.add_ref(seg.gid, ChannelRef(path, offset, offset + width, True, seg.expand * expand))
        else:
            ctx.table.fix(seg.gid, f"only part of the group is counted by {path}")
        offset += width


# ---- the split ------------------------------------------------------------------------------------------------
def split_heads(ctx: PropagationContext, node: torch.fx.Node, space: ChannelSpace, factors: Sequence[int],
                first: int, entries: Optional[Sequence], ndim: int) -> Union[ChannelSpace, PartedSpace, str]:
    """The value of a reshape that splits the channel dim of ``space`` into the output dims ``first, first + 1,
    ...`` of sizes ``factors`` (``(heads, head_dim)`` or ``(parts, heads, head_dim)``), or why it cannot be mapped.

    ``entries`` are what the code wrote for those dims (ints, -1, size nodes), None when the op names no sizes.
    """
    if len(factors) not in (2, 3):
        return f"it splits the channel dim into {len(factors)} dims"
    parts, heads, block = (1, *factors) if len(factors) == 2 else tuple(factors)
    if entries is None:
        return "its sizes are not written out"
    if not all(ctx.whole(seg) for seg in space.segments):
        # a slice of a group (``qkv[..., :q_width]``) is cut where the code says, which a pruned model may not keep
        return "it splits a slice of a channel group into heads"
    why, literal_attribute = _check_entries(ctx, node, space, entries, parts, heads, block)
    if why:
        return why
    width_read = _head_dim_from_width(ctx, entries[-1], heads, block)
    sliced = is_fused_part(ctx, space)  # before the refinement gives its channels new groups
    plan = _plan(ctx, space, parts, heads, block)
    if isinstance(plan, str):
        return plan
    part_spaces = []
    for segments in plan:
        refined = []
        for seg, slot in segments:
            found = ctx.table.refine(seg.gid, seg.start, seg.end, slot)
            if found is None:
                return "a head would take part of a channel another op already groups differently"
            refined.append(Segment(found[0], found[1], found[2]))
        part_spaces.append(ChannelSpace(first + len(factors) - 2, ndim, merge_adjacent(refined)))
    _bind_head_attributes(ctx, node, part_spaces, heads, block, literal_attribute, sliced)
    if width_read is not None:
        if not tie_blocks(ctx, node, width_read, part_spaces[0].expanded(block)):  # each head: block channels
            why = f"{ctx.where(node)} computes head_dim from the width of another group"
            ctx.fix_space(width_read, why)
            for part in part_spaces:
                ctx.fix_space(part, why)
        node.meta["sizes_tied"] = True
    if parts == 1:
        return part_spaces[0]
    return PartedSpace(first, ndim, tuple(part_spaces))


def _check_entries(ctx: PropagationContext, node: torch.fx.Node, space: ChannelSpace, entries: Sequence,
                   parts: int, heads: int, block: int) -> Tuple[str, Optional[str]]:
    """Whether a pruned model computes the same split: ``(why not or "", attribute)`` where ``attribute`` is the
    path of the int attribute the heads entry reads (None when it is -1 or a size that follows the width)."""
    *outer, heads_entry, block_entry = entries
    if outer and not (type(outer[0]) is int and outer[0] in (parts, -1)):
        return "the number of parts is not written as a constant", None
    if _head_dim_from_width(ctx, block_entry, heads, block) is not None:
        if type(heads_entry) is int and heads_entry == heads:
            attribute = count_attribute(ctx, node, heads, heads=True)
            if attribute is not None:
                return "", attribute
        return "head_dim is C // heads with the head count not an int attribute of the module", None
    if not (type(block_entry) is int and block_entry in (block, -1)):
        return f"head_dim would follow the width (it is not written as the constant {block})", None
    if ctx.recorded and block_entry == block and not _named_value(ctx, node, HEAD_SIZE_ATTRIBUTES, block):
        # a recorded forward shows C // num_heads as a plain number too: only a head-size attribute proves it fixed
        return (f"head_dim {block} may be computed from a width (the module has no attribute "
                f"{'/'.join(HEAD_SIZE_ATTRIBUTES[:3])} ... of that value)"), None
    if type(heads_entry) is int and heads_entry == -1:
        return ("", None) if block_entry == block else ("both heads and head_dim are -1", None)
    value = ctx.spaces.get(heads_entry) if isinstance(heads_entry, torch.fx.Node) else None
    if isinstance(value, ChannelSize):
        if value.exact and value.factor * space.width == heads and ctx.same_channels(value.spaces[0], space):
            return "", None
        return "the head count is computed from another width", None
    if type(heads_entry) is int and heads_entry == heads:
        attribute = count_attribute(ctx, node, heads, heads=True)
        if attribute is not None:
            return "", attribute
        return f"the head count {heads} is written as a number, not an int attribute of the module", None
    return "the head count is computed in a way pyprune cannot follow", None


def _head_dim_from_width(ctx: PropagationContext, entry, heads: int, block: int) -> Optional[ChannelSpace]:
    """The channel space whose width ``entry`` divides by the head count (``C // self.num_heads``, ``C`` read from
    the input), or None. With the head count an attribute that follows the heads and that width tied to the heads
    (:func:`.sizes.tie_blocks`), a pruned model computes the same ``head_dim``."""
    value = ctx.spaces.get(entry) if isinstance(entry, torch.fx.Node) else None
    if isinstance(value, ChannelSize) and value.exact and len(value.spaces) == 1 and \
            value.factor == Fraction(1, heads) and value.spaces[0].width == heads * block:
        return value.spaces[0]
    return None


def _plan(ctx: PropagationContext, space: ChannelSpace, parts: int, heads: int, block: int):
    """Per part, the (segment, channels per head) pairs to refine; or why the segments do not split into heads."""
    plan, width = [], heads * block
    for p in range(parts):
        segments = slice_space(space, p * width, (p + 1) * width)
        if segments is None:
            return "a head would take part of a flattened channel"
        position, part = 0, []
        for seg in segments:
            if block % seg.expand or position % block or seg.width % block:
                return "a head would take channels of two groups, or part of a flattened channel"
            part.append((seg, block // seg.expand))
            position += seg.width
        plan.append(part)
    return plan


def _bind_head_attributes(ctx: PropagationContext, node: torch.fx.Node, part_spaces: List[ChannelSpace],
                          heads: int, block: int, literal_attribute: Optional[str], sliced: bool) -> None:
    """The attribute the code spelled the head count with, and the module's conventionally named head counts /
    widths of the same value, follow the heads of every part. For a part sliced out of a fused output
    (``sliced``, :mod:`.fused`), whose bounds the code may compute from head counts of its config, so do the
    config's."""
    counts = named_attributes(ctx, node, HEAD_COUNT_ATTRIBUTES + KV_HEAD_ATTRIBUTES, heads, config=sliced)
    if literal_attribute is not None and literal_attribute not in counts:
        counts.append(literal_attribute)
    widths = named_attributes(ctx, node, HEAD_WIDTH_ATTRIBUTES, heads * block)
    for space in part_spaces:
        for path in counts:
            bind_count(ctx, space, path)
        for path in widths:
            bind_count(ctx, space, path, expand=block)


# ---- grouped-query attention ----------------------------------------------------------------------------------
def couple_grouped_heads(ctx: PropagationContext, node: torch.fx.Node, query: ChannelSpace,
                         kvs: Sequence[ChannelSpace], repeat: int) -> None:
    """Query heads ``query`` attend to key / value heads ``kvs``, ``repeat`` query heads per KV head (query head
    ``h`` reads KV head ``h // repeat``): couple them as ``ctx.gqa`` says."""
    groups = query.width // repeat
    if not _one_whole_group(ctx, query) or any(not _one_whole_group(ctx, kv) for kv in kvs) or \
            any(kv.width not in (groups, query.width) for kv in kvs):
        reason = f"grouped-query attention in {ctx.where(node)} over heads that are not whole groups"
        for space in (query, *kvs):
            ctx.fix_space(space, reason)
        return
    if ctx.gqa == "keep_kv":
        attributes = named_attributes(ctx, node, KV_GROUP_ATTRIBUTES, repeat)
        if not attributes and any(kv.width == query.width for kv in kvs):
            # the key / value heads are repeated in the graph (repeat_kv) by a count pyprune cannot keep in step
            reason = (f"{ctx.where(node)} repeats key / value heads by a count that is not a module attribute "
                      f"named {list(KV_GROUP_ATTRIBUTES)}")
            for space in (query, *kvs):
                ctx.fix_space(space, reason)
            return
        for kv in kvs:
            ctx.fix_space(kv, f"grouped-query attention in {ctx.where(node)} keeps its key / value heads "
                              f"(gqa='keep_kv'; gqa='drop_kv_groups' drops whole KV groups)")
        ctx.table.constrain_groups(query.segments[0].gid, groups)
        for path in attributes:
            # an attribute worth a count per KV group: its ref spans every query head, the count is one group's
            ctx.table.add_ref(query.segments[0].gid, ChannelRef(path, 0, query.width, True))
        return
    found = ctx.table.refine(query.segments[0].gid, 0, query.width, repeat)
    if found is None:
        ctx.fix_space(query, f"the query heads of {ctx.where(node)} cannot be grouped by KV head")
        for kv in kvs:
            ctx.fix_space(kv, f"the query heads of {ctx.where(node)} cannot be grouped by KV head")
        return
    for kv in kvs:
        kv_groups = kv if kv.width == groups else _coarsened(kv, repeat)
        if kv_groups is None:
            ctx.fix_space(kv, f"repeated key / value heads of {ctx.where(node)}")
            ctx.table.fix(found[0], f"repeated key / value heads of {ctx.where(node)}")
            continue
        ctx.table.union(found[0], kv_groups.segments[0].gid, f"{ctx.where(node)} couples heads of different counts")


def _coarsened(space: ChannelSpace, repeat: int) -> Optional[ChannelSpace]:
    """``space`` with every channel repeated ``repeat`` times (``repeat_kv``) as the channels it repeats."""
    seg = space.segments[0]
    if seg.expand != repeat:
        return None
    return ChannelSpace(space.dim, space.ndim, (Segment(seg.gid, seg.start, seg.end),))


def _one_whole_group(ctx: PropagationContext, space: ChannelSpace) -> bool:
    return len(space.segments) == 1 and ctx.whole(space.segments[0])


def repeated_heads(query: ChannelSpace, other: ChannelSpace) -> int:
    """How many query heads share each head of ``other`` (1: the same heads; 0: no such relation): ``other`` holds
    the heads of a smaller group each repeated over ``repeat`` positions (``repeat_kv``), or fewer heads."""
    if len(query.segments) != 1 or len(other.segments) != 1 or query.segments[0].expand != 1:
        return 0
    seg = other.segments[0]
    if other.width == query.width:
        return seg.expand
    if seg.expand == 1 and other.width < query.width and query.width % other.width == 0:
        return query.width // other.width
    return 0
