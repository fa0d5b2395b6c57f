"""Python ints a recorded forward reads from tensor shapes, kept as graph nodes: ``B, N, C = x.shape``.

A real forward sees ``x.reshape(B, N, 3, self.num_heads, C // self.num_heads)`` as plain numbers, so the
propagation cannot tell a width read from the tensor (which a pruned model reads at its active width) from a number
written in the code (which stays). While recording, ``x.shape`` / ``x.size()`` / ``x.size(d)`` of a recorded tensor
return :class:`TracedInt` s instead: ints with the value the model sees, each with the fx node it stands for
(``getattr(x, "shape")``, ``operator.getitem`` of it, ``x.size(d)``), and ``+ - * // %`` with another int make a
new node (``operator.floordiv``), as torch.fx's graph would hold them. Passed to a torch call, such an int is that
node in the graph, so :mod:`.sizes` knows the ``ChannelSize`` among them and the rules check a reshape by them as
they do in a symbolic graph.

Where such an int reads no channel dim (``B``, ``N``), the propagation writes it back as its number before any rule
sees it (:func:`.sizes.fold_plain_ints`): rules then see what they saw before. Other operations (``int(n)``,
``n / 2``, ``math.sqrt``, comparisons) give plain values; ``min`` / ``max`` return one of their arguments unchanged
(a traced int stands for the width there even where the other bound would win at a smaller one: the narrow check,
which runs the pruned widths, catches a model that then breaks).
"""
import operator
from typing import Callable, Optional, Tuple

import torch.fx

# node meta key: the int (or shape tuple) a size node had in the recorded forward
INT_VALUE = "int_value"


class TracedInt(int):
    """An int of the recorded forward with the node that computes it; ``emit(target, args)`` adds a
    ``call_function`` node to the recording, or returns None once the recording is over (plain ints from then
    on)."""

    def __new__(cls, value: int, node: torch.fx.Node, emit: Callable):
        self = super().__new__(cls, value)
        self.node, self._emit = node, emit
        return self

    def _combine(self, target, other, reflected: bool = False):
        if not isinstance(other, int) or isinstance(other, bool):
            return NotImplemented  # a float, a tensor, ...: their own operator, on the plain value
        value = target(int(other), int(self)) if reflected else target(int(self), int(other))
        args = (other, self) if reflected else (self, other)
        node = self._emit(target, args, value)
        return value if node is None else TracedInt(value, node, self._emit)

    def __add__(self, other):
        return self._combine(operator.add, other)

    def __radd__(self, other):
        return self._combine(operator.add, other, True)

    def __sub__(self, other):
        return self._combine(operator.sub, other)

    def __rsub__(self, other):
        return self._combine(operator.sub, other, True)

    def __mul__(self, other):
        return self._combine(operator.mul, other)

    def __rmul__(self, other):
        return self._combine(operator.mul, other, True)

    def __floordiv__(self, other):
        return self._combine(operator.floordiv, other)

    def __rfloordiv__(self, other):
        return self._combine(operator.floordiv, other, True)

    def __mod__(self, other):
        return self._combine(operator.mod, other)

    def __rmod__(self, other):
        return self._combine(operator.mod, other, True)

    def __neg__(self):
        node = self._emit(operator.neg, (self,), -int(self))
        return -int(self) if node is None else TracedInt(-int(self), node, self._emit)

    # a traced int kept by the model (a cached size) copies and pickles as the plain int it is
    def __reduce_ex__(self, protocol):
        return int, (int(self),)

    def __copy__(self):
        return int(self)

    def __deepcopy__(self, memo):
        return int(self)


class TracedShape(tuple):
    """``x.shape`` / ``x.size()`` of a recorded tensor: a tuple of :class:`TracedInt` (``torch.Size`` cannot be
    subclassed), with ``torch.Size``'s ``numel``."""

    def numel(self) -> int:
        out = 1
        for size in self:
            out *= int(size)
        return out

    def __reduce_ex__(self, protocol):
        return tuple, (tuple(int(s) for s in self),)


def traced_size(value, node: torch.fx.Node, emit: Callable, item: Callable[[torch.fx.Node, int, int], torch.fx.Node]):
    """``value`` (what ``x.shape`` / ``x.size()`` / ``x.size(d)`` returned, recorded as ``node``) as traced ints;
    ``item(node, i, size)`` makes the node of item ``i`` of a shape."""
    node.meta[INT_VALUE] = value
    if isinstance(value, torch.Size):
        return TracedShape(TracedInt(size, item(node, i, size), emit) for i, size in enumerate(value))
    return TracedInt(value, node, emit) if type(value) is int else value


def traced_node(value) -> Optional[torch.fx.Node]:
    """The node a traced int stands for (None for anything else)."""
    return value.node if isinstance(value, TracedInt) else None


def is_shape_read(func) -> Tuple[bool, bool]:
    """(whether ``func`` reads sizes: ``Tensor.shape`` or ``Tensor.size``, whether it is the ``shape`` property)."""
    is_property = getattr(func, "__self__", None) is torch.Tensor.shape  # each access makes a new method-wrapper
    return is_property or getattr(func, "__name__", "") == "size", is_property
