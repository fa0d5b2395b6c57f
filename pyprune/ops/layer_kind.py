"""LayerKind: every fact pyprune asks about a layer type, and the check that a kind answers all of them.

A layer's *kind* is the class that answers these facts for it (:func:`pyprune.ops.layer_kind`): its DynamicOp class
for a torch layer, :class:`~pyprune.ops.ChannelParameter` / ``ChannelCount`` for a channel-sized tensor or width
attribute. Units, the tracer, the budget and the serving probe ask the kind instead of testing torch types, so a
layer type's facts live in one class. The class facts are classmethods taking the module (a plain torch layer, its
DynamicOp, or a channel slot), so they can be asked of a model before it is converted; ``active_attributes`` is
asked of the DynamicOp itself.

Every kind derives from :class:`LayerKind`, which answers the facts that have a common answer and leaves
:data:`REQUIRED_FACTS` to the kind. :func:`check_layer_kind` (run when a kind is registered in
``pyprune.ops.DYNAMIC_OPS``) refuses a kind that lacks one with a TypeError naming the class and the facts.
"""
import inspect
from abc import abstractmethod
from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor

from .cost_terms import CostTerms, LayerCall

__all__ = ["LayerKind", "OneSelectionKind", "FACTS", "CLASS_FACTS", "REQUIRED_FACTS", "missing_facts",
           "check_layer_kind"]


class LayerKind:
    """The facts about one layer type (see the module docstring). ``module`` is a plain layer of the type, its
    DynamicOp, or (for channel slots) the slot; facts about sizes are about the *full* layer."""

    # ------------------------------------------------------------------------------------- facts with no default
    @classmethod
    @abstractmethod
    def channel_counts(cls, module) -> Tuple[int, int]:
        """(output channels, input channels) of the full ``module``: Conv2d ``(out_channels, in_channels)``, norms
        ``(C, C)``, Embedding ``(embedding_dim, num_embeddings)``."""
        raise NotImplementedError(f"{cls.__name__} does not answer channel_counts")

    @classmethod
    @abstractmethod
    def cost_terms(cls, module, calls: Sequence[LayerCall]) -> CostTerms:
        """FLOPs of ``calls`` (the layer's recorded calls in one forward, each :class:`LayerCall` of shapes at the
        call's active widths) and the element count of each parameter, as bilinear forms in the active input /
        output widths (``pyprune.ops.cost_terms``). What the budget's cost model is built from; it must equal what
        ``FlopCounterMode`` and ``sum(p.numel())`` count on the export at every width."""
        raise NotImplementedError(f"{cls.__name__} does not answer cost_terms")

    @classmethod
    @abstractmethod
    def probe_inputs(cls, module) -> List[Tuple[Tuple[int, ...], int]]:
        """Small inputs ``(shape, channel dim)`` the layer type takes, tried in order when a subclass with its own
        ``forward`` is probed (``pyprune.ops.served``; the first that works decides its channel dim); ``[]`` when
        the type takes no such single input (attention, embeddings, channel slots): such subclasses stay fixed."""
        raise NotImplementedError(f"{cls.__name__} does not answer probe_inputs")

    # ---------------------------------------------------------------------------------- facts with a common answer
    @classmethod
    def shares_selection(cls, module) -> bool:
        """True when in and out channels are one and the same selection (norms, depthwise conv, attention's
        embedding width, channel slots); the cost terms then see ``in == out``."""
        return False

    @classmethod
    def selection_groups(cls, module) -> int:
        """Equal channel blocks a selection must keep the same count in (a grouped conv's ``groups``, attention
        heads, GroupNorm groups); 1 = no constraint."""
        return 1

    @classmethod
    def importance_rows(cls, module) -> Optional[Tensor]:
        """The weight as rows ``[out channels, fan_in]`` (detached) whose magnitude ranks the output channels
        (conv / linear / embedding), or None when the layer has no such rows."""
        return None

    @classmethod
    def norm_scale(cls, module) -> Optional[Tensor]:
        """A norm layer's affine scale ``[C]`` (detached; network slimming ranks channels by ``|gamma|``), or None."""
        return None

    @classmethod
    def channelwise(cls, module) -> bool:
        """True when each output channel depends on the same input channel only (batch norm, depthwise conv), so
        the layer at kept channels computes exactly the full layer's outputs there (the serving probe compares
        values, not only shapes)."""
        return False

    def active_attributes(self) -> Dict[str, object]:
        """Asked of the DynamicOp: the module attributes that hold its widths at their active values
        (``num_features``, ``out_channels`` / ``in_channels`` / ``groups``, ``normalized_shape``, ...): what a
        layer's own forward reads while it runs at the active width, and what its export keeps. ``{}``: none."""
        return {}


class OneSelectionKind(LayerKind):
    """A kind whose in and out channels are always one selection (norms, attention, channel slots)."""

    @classmethod
    def shares_selection(cls, module) -> bool:
        return True


# The facts, in the order of the table in docs/ARCHITECTURE.md ("Layer kinds").
FACTS: Tuple[str, ...] = ("channel_counts", "shares_selection", "selection_groups", "importance_rows", "norm_scale",
                          "channelwise", "probe_inputs", "cost_terms", "active_attributes")
CLASS_FACTS: Tuple[str, ...] = FACTS[:-1]  # asked of the class with the module; active_attributes of the op
REQUIRED_FACTS: Tuple[str, ...] = tuple(name for name in FACTS
                                        if getattr(LayerKind.__dict__[name], "__isabstractmethod__", False))


def missing_facts(kind: type) -> List[str]:
    """The facts ``kind`` does not answer, each with what is wrong: not implemented (absent, or :class:`LayerKind`'s
    abstract placeholder) or not a classmethod where the fact is asked of the class."""
    missing = []
    for name in FACTS:
        try:
            found = inspect.getattr_static(kind, name)
        except AttributeError:
            missing.append(f"{name} (not implemented)")
            continue
        if getattr(found, "__isabstractmethod__", False):
            missing.append(f"{name} (not implemented)")
        elif name in CLASS_FACTS and not isinstance(found, classmethod):
            missing.append(f"{name} (must be a classmethod taking the module)")
        elif name not in CLASS_FACTS and not inspect.isfunction(found):
            missing.append(f"{name} (must be a method of the op)")
    return missing


def check_layer_kind(kind: type, what: str = "layer kind") -> type:
    """``kind`` itself when it answers every fact, else TypeError naming the class and each missing fact."""
    if not isinstance(kind, type):
        raise TypeError(f"a {what} must be a class, got {type(kind).__name__}")
    missing = missing_facts(kind)
    if missing:
        raise TypeError(f"{kind.__module__}.{kind.__qualname__} is not a complete {what}: {'; '.join(missing)} "
                        f"(the facts are listed in pyprune.ops.layer_kind.LayerKind)")
    return kind
