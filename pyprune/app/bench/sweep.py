"""Coverage sweep: every model of a zoo through parse -> prune -> export, one table row each.

``pyprune bench sweep [--zoo torchvision|timm|torchvision-classifiers]`` prints the support tables kept in the
README. Per model (built by :mod:`pyprune.app.bench.zoos`, random init, no download): parse time, units (mutable / all),
the share of channels that may be pruned, params and FLOPs kept at the ratio, and the largest difference between the
exported and the dynamic model's outputs (relative to their scale) at the ratio and at a randomly sampled subnet;
then one training step of the exported model where the model trains on its input alone. A model that fails is a row
with ``status`` = the exception, never a crash of the sweep.
"""
import random
import time
import traceback
import warnings
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from ...mutators import ChannelMutator, count_flops, count_params
from ...tracing.example_inputs import call_model, tensor_leaves
from . import zoos

SWEEP_COLUMNS = ("model", "status", "parse_s", "units", "mutable", "prunable_channels", "params_M",
                 "params_kept", "flops_kept", "max_rel_diff", "sampled_rel_diff", "trained")
NUM_CLASSES = zoos.NUM_CLASSES


def torchvision_models() -> List[str]:
    return zoos.torchvision_classifiers()


def example_model(name: str, seed: int = 0) -> Tuple[nn.Module, Tensor]:
    """A randomly initialised torchvision classifier (no download) and the smallest input ``[2, 3, S, S]`` it takes
    (see :mod:`pyprune.app.bench.zoos`)."""
    built = zoos.build("torchvision-classifiers", name, seed)
    return built.model, built.inputs.args[0]


def logits(output) -> Tensor:
    """The main logits of a model output (GoogLeNet / Inception return named tuples in train mode)."""
    return output[0] if isinstance(output, tuple) else output


def relative_difference(a: Tensor, b: Tensor) -> float:
    """max |a - b| over the scale of ``b`` (at least 1), the tolerance measure of the sweep."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


def output_difference(a, b) -> float:
    """:func:`relative_difference` over every tensor of two outputs of the same structure (detection's lists of
    dicts, segmentation's dicts, optical flow's lists); a structure or shape mismatch raises."""
    left, right = tensor_leaves(a), tensor_leaves(b)
    if len(left) != len(right) or any(x.shape != y.shape for x, y in zip(left, right)):
        raise AssertionError(f"the exported model's outputs have another structure: {[tuple(x.shape) for x in left]}"
                             f" vs {[tuple(y.shape) for y in right]}")
    floats = [(x, y) for x, y in zip(left, right) if x.is_floating_point()]
    exact = all(torch.equal(x, y) for x, y in zip(left, right) if not x.is_floating_point())
    if not exact:
        raise AssertionError("the exported model's integer outputs (labels, indices) differ")
    return max((relative_difference(x.float(), y.float()) for x, y in floats if x.numel()), default=0.0)


def prunable_share(mutator: ChannelMutator) -> float:
    """Channels in mutable units / channels in all units."""
    total = sum(u.num_channels for u in mutator.units)
    return sum(u.num_channels for u in mutator.mutable_units) / total if total else 0.0


def _exported_output(model: nn.Module, mutator: ChannelMutator, inputs):
    with torch.no_grad():
        dynamic = call_model(model, inputs)
    pruned = mutator.export(model).eval()
    with torch.no_grad():
        exported = call_model(pruned, inputs)
    return pruned, output_difference(exported, dynamic)


def _train_step(pruned: nn.Module, inputs) -> None:
    """One forward + backward of the exported model in training mode (aux heads included)."""
    pruned.train()
    loss = sum(t.float().mean() for t in tensor_leaves(call_model(pruned, inputs)) if t.is_floating_point())
    loss.backward()
    if not any(p.grad is not None for p in pruned.parameters()):
        raise AssertionError("no gradient reached the exported model's parameters")


def columns(zoo: str) -> Tuple[str, ...]:
    """The table columns of ``zoo``'s rows: its own (``ZOOS[zoo]['columns']``) or :data:`SWEEP_COLUMNS`."""
    return tuple(zoos.ZOOS[zoo].get("columns", SWEEP_COLUMNS))


def sweep_model(name: str, ratio: float = 0.5, zoo: str = "torchvision-classifiers") -> Dict[str, object]:
    """Parse, set every unit to ``ratio``, export, compare; then a sampled subnet; one row of :data:`SWEEP_COLUMNS`
    (or of the zoo's own columns, by the zoo's own row function where it has one)."""
    if "sweep" in zoos.ZOOS[zoo]:
        return zoos.ZOOS[zoo]["sweep"](name, ratio)
    row: Dict[str, object] = {"model": name}
    try:
        model, inputs, trains = zoos.build(zoo, name)
        model.eval()
        flops_before, params_before = count_flops(model, inputs), count_params(model)
        mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=inputs))
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mutator.prepare_from_supernet(model)
        row["parse_s"] = time.perf_counter() - start
        mutator.set_global_ratio(ratio)
        pruned, difference = _exported_output(model, mutator, inputs)
        row.update(units=len(mutator.units), mutable=len(mutator.mutable_units),
                   prunable_channels=prunable_share(mutator), params_M=params_before / 1e6,
                   params_kept=count_params(pruned) / params_before,
                   flops_kept=count_flops(pruned, inputs) / flops_before,
                   max_rel_diff=f"{difference:.1e}")
        random.seed(0)
        mutator.set_choices(mutator.sample_choices())
        row["sampled_rel_diff"] = f"{_exported_output(model, mutator, inputs)[1]:.1e}"
        if trains:
            _train_step(pruned, inputs)
        row.update(trained="yes" if trains else "eval only", status="ok")
    except Exception as error:  # a row per model, whatever happens
        row["status"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        row["traceback"] = traceback.format_exc()
    return row
