"""Calibration runs for activation importance, and the score file that caches their result.

``calibrate(mutator, model, batches, num_batches=N)`` runs N batches through the model in eval mode without
gradients, with one forward hook on every output-related layer of the mutator's
:class:`~pyprune.units.activation.ActivationMutableChannelUnit` units; the hooks are removed and every module's
train / eval flag restored afterwards, whatever happens. Each hook reduces the layer's output to one statistic per
*active* channel and scatters it through the layer's ``out_index`` of that forward into full-size accumulators, so
gather mode and compact training mode (where the output carries only the kept channels) record the same thing. The
units take the statistics only after the last batch: a failing batch or a short iterable leaves every score as it
was. Under ``torch.distributed`` the sums and counts are all-reduced over the default group first, so every rank
gets the scores of all ranks' batches together (every rank must call ``calibrate`` with the same ``num_batches``).

``save_scores(mutator, path)`` / ``load_scores(mutator, path)`` write / read ``{unit name: float32 CPU tensor
[num_channels]}`` with ``torch.save`` (loadable with ``weights_only=True``), so a costly calibration is done once.
"""
import itertools
import os
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import ops
from ..errors import ConfigError
from .activation import ActivationMutableChannelUnit, reduce_activation
from .modules import module_device

__all__ = ["calibrate", "save_scores", "load_scores", "activation_units", "default_forward"]


def activation_units(target) -> List[ActivationMutableChannelUnit]:
    """The activation units of ``target``: a mutator (its mutable units) or an iterable of units."""
    units = getattr(target, "mutable_units", None)
    if units is None:
        units = [u for u in target if u.is_mutable]
    found = [u for u in units if isinstance(u, ActivationMutableChannelUnit)]
    if not found:
        raise ConfigError(f"{type(target).__name__} has no mutable ActivationMutableChannelUnit; build the mutator "
                          f"with channel_unit_cfg='ActivationMutableChannelUnit'")
    return found


def default_forward(model: nn.Module, batch: Any):
    """One calibration forward: a Tensor is the input, a mapping holds keyword inputs (``input_ids``,
    ``attention_mask``, ...), a tuple / list is ``(inputs, targets, ...)`` as data loaders give it."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    raise ConfigError(f"calibrate: a batch must be a Tensor, a mapping of keyword inputs or an (inputs, targets) "
                      f"tuple, got {type(batch).__name__}; pass forward=fn(model, batch) for other forms")


def output_channel_dim(module: nn.Module, output: Tensor) -> int:
    """The dim of ``output`` that holds the layer's output channels: the layer kind's channel dim (conv / norms:
    1, linear / LayerNorm / attention: last, a served layer: its probed dim), the last dim for an embedding."""
    try:
        dim = module._channel_dims(output)[0]
    except NotImplementedError:  # an embedding: its input carries ids, its output channels are last
        dim = output.dim() - 1
    return dim % output.dim()


class _LayerRecorder:
    """The forward hook of one layer: adds its output's per-channel sums and counts into full-size accumulators."""

    def __init__(self, name: str, module: nn.Module, metric: str):
        self.name, self.metric = name, metric
        # Allocated up front (not at the first forward), so every rank all-reduces the same tensors even where a
        # layer did not run on that rank's batches.
        full, device = type(module).channel_counts(module)[0], module_device(module)
        self.total = torch.zeros(full, dtype=torch.float64, device=device)
        self.count = torch.zeros(full, dtype=torch.float64, device=device)

    def __call__(self, module: nn.Module, inputs, output) -> None:
        if isinstance(output, (tuple, list)):  # MultiheadAttention: (attention output, weights)
            output = next((o for o in output if isinstance(o, Tensor)), None)
        if not isinstance(output, Tensor) or not output.is_floating_point():
            what = f"a {output.dtype} tensor of shape {tuple(output.shape)}" if isinstance(output, Tensor) \
                else type(output).__name__
            raise ConfigError(f"calibrate: layer {self.name!r} ({type(module).__name__}) returned {what}, not a "
                              f"float tensor to measure")
        dim = output_channel_dim(module, output)
        active = module.active_out_channels
        if output.shape[dim] != active:
            raise ConfigError(f"calibrate: layer {self.name!r} ({type(module).__name__}) output has shape "
                              f"{tuple(output.shape)} ({output.dtype}); dim {dim} should hold its {active} active "
                              f"output channels")
        sums = reduce_activation(output, dim, self.metric).to(self.total.device)
        index = module.out_index
        per_channel = float(output.numel() // max(active, 1))
        if index is None:
            self.total += sums
            self.count += per_channel
        else:  # only the kept channels ran: put them back at their full-layer positions
            index = index.to(self.total.device)
            self.total.index_add_(0, index, sums)
            self.count.index_add_(0, index, torch.full_like(sums, per_channel))


def calibrate(mutator, model: nn.Module, batches: Iterable, num_batches: Optional[int] = None,
              forward: Callable[[nn.Module, Any], Any] = default_forward) -> List[str]:
    """Score the channels of the activation units of ``mutator`` on ``batches`` run through ``model``.

    ``num_batches``: how many batches to use (the first N; None = all). ``forward(model, batch)`` runs one batch
    (:func:`default_forward` by default). Units whose metrics differ are measured with one hook per layer and metric.
    Returns the names of the units that were scored (a unit none of whose output layers ran is warned about and
    keeps its score). The selection is not changed: set the choices (or call ``unit.refresh()``) to rank by it.
    """
    units = activation_units(mutator)
    if num_batches is not None and (not isinstance(num_batches, int) or isinstance(num_batches, bool)
                                    or num_batches < 1):
        raise ConfigError(f"calibrate: num_batches must be a positive int or None, got {num_batches!r}")
    recorders: Dict[Tuple[str, str], _LayerRecorder] = {}
    modules: Dict[Tuple[str, str], nn.Module] = {}
    for unit in units:
        for ref, module in unit.output_layers():
            if not isinstance(module, ops.DynamicChannelMixin):  # a per-channel parameter or a module attribute
                continue                                         # (a head count): it has no output to measure
            key = (ref.name, unit.metric)
            if key not in recorders:
                recorders[key], modules[key] = _LayerRecorder(ref.name, module, unit.metric), module
    if not recorders:
        raise ConfigError("calibrate: the activation units are not bound to a model yet; call "
                          "mutator.prepare_from_supernet(model) first")
    modes = {m: m.training for m in model.modules()}
    handles = [modules[key].register_forward_hook(recorder) for key, recorder in recorders.items()]
    seen = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in (batches if num_batches is None else itertools.islice(batches, num_batches)):
                forward(model, batch)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if seen == 0 or (num_batches is not None and seen < num_batches):
        raise ConfigError(f"calibrate: asked for {num_batches if num_batches is not None else 'at least 1'} "
                          f"batches, the iterable gave {seen}; no score changed")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for key in sorted(recorders):  # the same order on every rank
            dist.all_reduce(recorders[key].total)
            dist.all_reduce(recorders[key].count)
    scored, silent = [], []
    for unit in units:
        stats = {name: (r.total, r.count) for (name, metric), r in recorders.items() if metric == unit.metric}
        (scored if unit.absorb(stats) else silent).append(unit.name)
    if silent:
        warnings.warn(f"calibrate: no output layer of units {silent} ran on the calibration batches; their scores "
                      f"are unchanged", stacklevel=2)
    return scored


def save_scores(mutator, path) -> None:
    """Write the activation units' scores to ``path`` (``{unit name: float32 CPU [num_channels]}``)."""
    units = activation_units(mutator)
    missing = [u.name for u in units if u.scores is None]
    if missing:
        raise ConfigError(f"save_scores: units {missing} have no scores yet; run calibrate first")
    torch.save({u.name: u.scores for u in units}, os.fspath(path))


def load_scores(mutator, path) -> None:
    """Read a file of :func:`save_scores` into the activation units; the unit names and widths must match (else
    ConfigError naming the file, the unit and both widths; no score changed). The selection is not changed."""
    path = os.fspath(path)
    units = activation_units(mutator)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"load_scores: no score file {path!r}") from None
    except Exception as error:  # not a torch file, or one holding more than tensors
        raise ConfigError(f"load_scores: {path!r} is not a score file ({type(error).__name__})") from None
    if not isinstance(saved, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in saved.items()):
        raise ConfigError(f"load_scores: {path!r} does not hold {{unit name: score tensor}}")
    names = {u.name for u in units}
    if set(saved) != names:
        raise ConfigError(f"load_scores: {path!r} has scores for other units: missing {sorted(names - set(saved))}, "
                          f"unknown {sorted(set(saved) - names)}")
    for unit in units:
        scores = saved[unit.name]
        if tuple(scores.shape) != (unit.num_channels,) or not scores.is_floating_point():
            raise ConfigError(f"load_scores: {path!r}: unit {unit.name} has {unit.num_channels} channels, the file's "
                              f"scores have shape {tuple(scores.shape)} ({scores.dtype})")
    for unit in units:
        unit.set_scores(saved[unit.name])
