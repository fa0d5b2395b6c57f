"""What every tracer rule works with: the propagation state, readers of fx nodes, and the table of op rules.

A rule is a function ``rule(ctx, node, name) -> value`` that gives the value of one graph node from the values of
its inputs (``ctx.spaces``): a :class:`ChannelSpace` for a tensor whose channel dim it knows, a tuple of those for a
node with several outputs, a ``ChannelSize`` for an int read from a channel dim, or None (nothing prunable). Rules
couple groups, constrain them or fix them through ``ctx.table`` (a :class:`GroupTable`).
"""
import operator
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.fx
from torch import nn

from ..errors import UntraceableOpError
from .channel_space import ChannelSpace, GroupTable, PartedSpace, Segment
from .spec import warn_untraceable

OpRule = Callable[["PropagationContext", torch.fx.Node, str], Any]

# Op name (see :func:`op_name`) -> rule. Filled by the ``@op_rule`` decorators of the rules_* modules.
OP_RULES: Dict[str, OpRule] = {}


def op_rule(*names: str) -> Callable[[OpRule], OpRule]:
    """Register the decorated function as the rule for the ops spelled ``names``.

    The key is the op's name rather than its fx target because one op has many targets: ``x + y`` is
    ``operator.add`` in fx and ``Tensor.__add__`` in a recorded forward, ``x.add(y)`` is the method ``"add"``,
    ``torch.add`` a function; all of them are ``"add"``. Parameterless modules are keyed by their class name
    (``"Flatten"``). A name can have one rule only.
    """
    def register(rule: OpRule) -> OpRule:
        taken = sorted(n for n in names if n in OP_RULES)
        if taken:
            raise ValueError(f"tracer rules for {taken} already exist ({OP_RULES[taken[0]].__qualname__})")
        OP_RULES.update(dict.fromkeys(names, rule))
        return rule
    return register


# ---- reading fx nodes ----------------------------------------------------------------------------------------
def op_name(node: torch.fx.Node, model: nn.Module) -> str:
    """The name rules are keyed by: module class, method name, or function name without dunder underscores."""
    if node.op == "call_module":
        return type(model.get_submodule(node.target)).__name__
    if node.target is operator.getitem:
        return "getitem"
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    # the recorded forward sees Tensor.__getitem__ / __add__ / __radd__ ... (fx too, calling a method on a constant,
    # ``_tensor_constant0.__setitem__``): the same ops as fx's getitem / add / setitem
    return name[2:-2] if name.startswith("__") and name.endswith("__") and len(name) > 4 else name


def shapes(node) -> Any:
    """The output shape of ``node`` (a ``torch.Size``), a tuple of them (None for non-tensor items), or None."""
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    if meta is None:
        return None
    if hasattr(meta, "shape"):  # fx's TensorMetadata is itself a NamedTuple: test for it first
        return meta.shape
    if isinstance(meta, (tuple, list)):
        return tuple(m.shape if m is not None and hasattr(m, "shape") else None for m in meta)
    return None


def flat_nodes(value) -> List[torch.fx.Node]:
    """Every node in ``value`` (args / kwargs, nested in tuples, lists and dicts)."""
    out = []
    torch.fx.node.map_arg(value, lambda n: out.append(n) or n)
    return out


def dim_arg(node: torch.fx.Node, index: int, default=None):
    """The ``dim`` argument of ``node``: positional ``index``, else the ``dim`` / ``axis`` keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get("dim", node.kwargs.get("axis", default))


# ---- propagation state ---------------------------------------------------------------------------------------
class PropagationContext:
    """The state one propagation shares between its rules, and the operations on it every rule needs.

    Args:
        model: the traced model (rules read its submodules, parameters and attributes).
        strict: raise :class:`UntraceableOpError` on an op no rule can map instead of fixing its groups.
        gqa: how grouped-query attention is pruned (:data:`pyprune.tracing.heads.GQA_MODES`).
    """

    def __init__(self, model: nn.Module, strict: bool = False, gqa: str = "keep_kv"):
        self.model, self.strict, self.gqa = model, strict, gqa
        self.recorded = False  # a recorded forward: sizes the code read from tensors are plain numbers there
        self.fixed_outputs = None  # which model outputs keep their channels (:mod:`.outputs`; None: its default)
        self.table = GroupTable()
        self.spaces: Dict[torch.fx.Node, Any] = {}    # node -> its value (see the module docstring)
        self.notes: List[str] = []                    # warnings given, once each
        self.bound_tensors: Dict[str, list] = {}      # channel tensor path -> [(using node, space)]
        self.count_paths: set = set()                 # int attributes bound to follow a group (ChannelCounts)
        self.sliced_parts: List[tuple] = []           # (slicing node, groups its int bounds count): see .fused
        self.fused_parts: set = set()                 # groups sliced out of a fused output at int bounds
        self.unchecked_sizes: List[tuple] = []        # (node, ChannelSize) its output does not follow yet

    def new_space(self, size: int, dim: int, ndim: int, fixed_reason: str = "") -> ChannelSpace:
        """A space on dim ``dim`` (of ``ndim``) holding one new group of ``size`` channels."""
        gid = self.table.new(size, fixed_reason)
        return ChannelSpace(dim, ndim, (Segment(gid, 0, size),))

    def space(self, node) -> Optional[ChannelSpace]:
        """The channel space of a tensor node (its segments read through partitioned groups); None for anything
        else, a :class:`PartedSpace` included (see :meth:`parted`)."""
        value = self.spaces.get(node) if isinstance(node, torch.fx.Node) else None
        return self.table.resolve_space(value) if isinstance(value, ChannelSpace) else None

    def parted(self, node) -> Optional[PartedSpace]:
        """The value of a tensor node whose channels span a parts dim (fused q / k / v), else None."""
        value = self.spaces.get(node) if isinstance(node, torch.fx.Node) else None
        if not isinstance(value, PartedSpace):
            return None
        return PartedSpace(value.dim, value.ndim, tuple(self.table.resolve_space(p) for p in value.parts))

    def spaces_in(self, args) -> List[ChannelSpace]:
        """Every channel space in ``args``, tuples of outputs and the parts of parted values included."""
        out = []
        for n in flat_nodes(args):
            value = self.spaces.get(n)
            for item in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(item, PartedSpace):
                    out += [self.table.resolve_space(p) for p in item.parts]
                elif isinstance(item, ChannelSpace):
                    out.append(self.table.resolve_space(item))
        return out

    def tracked(self, node: torch.fx.Node) -> List[ChannelSpace]:
        """The channel spaces of ``node``'s tensor arguments, in argument order."""
        return [s for s in (self.space(a) for a in flat_nodes((node.args, node.kwargs))) if s is not None]

    def fix_space(self, space, reason: str) -> None:
        """Fix the groups of ``space`` (a ChannelSpace, a PartedSpace or None)."""
        if isinstance(space, PartedSpace):
            for part in space.parts:
                self.fix_space(part, reason)
        elif space is not None:
            for seg in self.table.resolve_space(space).segments:
                self.table.fix(seg.gid, reason)

    def whole(self, seg: Segment) -> bool:
        """Whether ``seg`` covers all channels of its group."""
        return seg.start == 0 and seg.end == self.table.size[self.table.find(seg.gid)]

    def where(self, node) -> str:
        path = node.meta.get("module_path", "")
        return f"op '{op_name(node, self.model)}' (node {node.name}) in module '{path or '<top>'}'"

    def unknown(self, node, name: str, why: str = "") -> None:
        """No rule maps ``node``: fix the groups it reads (warn once), or raise in strict mode. Returns None."""
        spaces = self.spaces_in((node.args, node.kwargs))
        if not spaces:
            return None
        path = node.meta.get("module_path", "") or (node.target if node.op == "call_module" else "")
        message = (f"pyprune cannot map {self.where(node)} to channels{': ' + why if why else ''}; "
                   f"the channel groups it touches are not pruned")
        if self.strict:
            raise UntraceableOpError(f"{message}. Exclude the module with fixed=['{path or node.name}'] "
                                     f"or trace without strict=True")
        if message not in self.notes:
            self.notes.append(message)
            warn_untraceable(message)
        for space in spaces:
            self.fix_space(space, f"{name} at {path or node.name}")
        return None

    def merge_spaces(self, spaces: Sequence[ChannelSpace], why: str) -> None:
        """Couple spaces that must hold the same channels; where they cannot be unioned whole, fix them."""
        first = spaces[0]
        for other in spaces[1:]:
            if len(other.segments) == len(first.segments) and all(
                    a.width == b.width and self.whole(a) and self.whole(b) and
                    max(a.expand, b.expand) % min(a.expand, b.expand) == 0
                    for a, b in zip(first.segments, other.segments)):
                for a, b in zip(first.segments, other.segments):
                    self._union_blocks(a, b, why)
            elif not self.same_channels(first, other) and not self._couple_chunks(first, other, why):
                self.fix_space(first, why)
                self.fix_space(other, why)

    def _couple_chunks(self, a: ChannelSpace, b: ChannelSpace, why: str) -> bool:
        """``x1 * x2`` for ``x1, x2 = fc1(x).chunk(2, -1)`` (a gated MLP packed in one layer): two equal, aligned,
        disjoint ranges of one group. The group is cut into pieces of that width and the two pieces joined, so
        channel i of both halves is one channel of the unit. False where the spaces are not of that form."""
        if len(a.segments) != 1 or len(b.segments) != 1:
            return False
        sa, sb = a.segments[0], b.segments[0]
        length = sa.end - sa.start
        if self.table.find(sa.gid) != self.table.find(sb.gid) or sa.expand != sb.expand or \
                sb.end - sb.start != length or sa.start % length or sb.start % length or sa.start == sb.start:
            return False
        pieces = self.table.cut(sa.gid, length)
        if pieces is None:
            return False
        self.table.union(pieces[sa.start // length], pieces[sb.start // length], why)
        return True

    def _union_blocks(self, a: Segment, b: Segment, why: str) -> None:
        """Union two whole groups over the same tensor positions; where one holds blocks (heads, or a residual
        stream tied to them) and the other single positions, the finer one is cut into those blocks first."""
        if a.expand != b.expand:
            coarse, fine = (a, b) if a.expand > b.expand else (b, a)
            found = self.table.refine(fine.gid, fine.start, fine.end, coarse.expand // fine.expand)
            if found is None:
                self.table.fix(a.gid, why)
                self.table.fix(b.gid, why)
                return
            a, b = coarse, Segment(found[0], found[1], found[2], coarse.expand)
        self.table.union(a.gid, b.gid, why)

    def same_channels(self, a: ChannelSpace, b: ChannelSpace) -> bool:
        """Whether ``a`` and ``b`` hold the same channels in the same order (groups compared by their roots)."""
        def layout(space):
            return [(self.table.find(s.gid), s.start, s.end, s.expand)
                    for s in self.table.resolve_space(space).segments]
        return layout(a) == layout(b)
