"""Reading a unit's channel entries from a config, as mmrazor and pyprune write them.

A config lists a unit's channels as ``{"name", "start", "end", "is_output_channel"}`` entries (mmrazor's layout);
pyprune adds ``expand`` where a range is wider than the unit (flatten -> Linear), ``param_dim`` for
channel-sized tensors and ``read_by`` for a layer whose tensors an enclosing module's code reads directly.
mmrazor's analyzer also writes ``expand_ratio`` and lists a norm on both sides of a unit.
"""
from collections.abc import Mapping
from typing import List, Sequence, Tuple

from torch import nn

from ..channels import ChannelRef
from ..errors import ConfigError
from .modules import has_one_selection

__all__ = ["CHANNEL_KEYS", "channel_refs", "config_channels", "repeats_a_shared_layer"]

# keys of one channel entry: pyprune's layout, plus mmrazor's analyzer key ``expand_ratio`` (ignored, as mmrazor's
# Channel.init_from_cfg ignores it: the range's width against the unit's channel count says how wide it is)
CHANNEL_KEYS = {"name", "start", "end", "is_output_channel", "expand", "param_dim", "read_by", "expand_ratio"}


def channel_refs(entries, is_output, num_channels, unit: str) -> List[ChannelRef]:
    """ChannelRefs from config entries of one side of a unit, read as mmrazor reads them.

    ``start`` defaults to 0 and ``end`` to ``start + num_channels``; ``is_output_channel`` defaults to the side the
    entry is listed on (``is_output``; None: the entry must say). ``expand`` (pyprune writes it where it is not 1)
    may be left out: a range ``k`` times the unit's width is a flatten -> Linear range whose unit channels each
    span ``k`` features, which is how mmrazor writes it (``[0, 64)`` for a 16-channel unit).
    """
    refs = []
    for entry in entries:
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise ConfigError(f"unit {unit}: a channel entry must be a dict with a 'name', got {entry!r}")
        unknown = set(entry) - CHANNEL_KEYS
        if unknown:
            raise ConfigError(f"unit {unit}: channel entry {entry['name']!r} has unknown keys {sorted(unknown)}")
        start = entry.get("start", 0)
        end = entry.get("end", None if num_channels is None else start + num_channels)
        side = entry.get("is_output_channel", is_output)
        if not all(isinstance(v, int) for v in (start, end)) or not 0 <= start < end or side is None:
            raise ConfigError(f"unit {unit}: channel entry {dict(entry)!r} needs int start < end and "
                              f"is_output_channel")
        expand = entry.get("expand")
        if expand is None:
            width = end - start
            expand = width // num_channels if num_channels and width > num_channels and \
                width % num_channels == 0 else 1
        refs.append(ChannelRef(entry["name"], start, end, bool(side), int(expand), entry.get("param_dim"),
                               entry.get("read_by")))
    return refs



def _same_range(a: ChannelRef, b: ChannelRef) -> bool:
    return (a.name, a.start, a.end) == (b.name, b.start, b.end)


def repeats_a_shared_layer(ref: ChannelRef, outputs: Sequence[ChannelRef], model: nn.Module) -> bool:
    """An input entry naming a layer whose in and out channels are one selection (norm, depthwise conv) that the
    unit lists as an output already: mmrazor's analyzer writes both, pyprune the output side only."""
    if not any(_same_range(ref, out) for out in outputs):
        return False
    try:
        return has_one_selection(model.get_submodule(ref.name))
    except AttributeError:
        return False


def config_channels(unit, channels: Mapping) -> Tuple[List[ChannelRef], List[ChannelRef]]:
    """A unit's (output, input) refs as a config lists them, for comparison with the traced unit: an input entry
    that repeats one of the config's output entries and that the traced unit does not have as an input is
    mmrazor's second listing of a norm, and is left out."""
    outputs = channel_refs(channels.get("output_related", []), True, unit.num_channels, unit.name)
    inputs = channel_refs(channels.get("input_related", []), False, unit.num_channels, unit.name)
    ours = unit.input_related
    inputs = [ref for ref in inputs if not (any(_same_range(ref, out) for out in outputs)
                                            and not any(_same_range(ref, mine) for mine in ours))]
    return outputs, inputs
