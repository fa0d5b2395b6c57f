"""Coverage sweep: every torchvision classifier through parse -> prune -> export, one table row each.

``pyprune bench sweep`` prints the support table kept in the README. Per model: parse time, units (mutable / all),
the share of channels that may be pruned, params and FLOPs kept at the ratio, and the largest difference between
the exported and the dynamic model's logits (relative to the logits' scale). A model that fails is a row with
``status`` = the exception, never a crash of the sweep.
"""
import time
import traceback
import warnings
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from ..mutators import ChannelMutator, count_flops, count_params

SWEEP_COLUMNS = ("model", "status", "parse_s", "units", "mutable", "prunable_channels", "params_M",
                 "params_kept", "flops_kept", "max_rel_diff")
NUM_CLASSES = 10


def torchvision_models() -> List[str]:
    import torchvision
    return torchvision.models.list_models(module=torchvision.models)


def example_model(name: str, seed: int = 0) -> Tuple[nn.Module, Tensor]:
    """A randomly initialised torchvision classifier (no download) and the smallest input ``[2, 3, S, S]`` it takes.

    ViTs are built for a 2x2 patch grid; MaxViT needs 224 px (every stage's grid splits into 7x7 windows);
    Inception-v3's train-mode aux head needs 299 px (a 5x5 pool and a 5x5 conv on Mixed_6e).
    """
    import torchvision
    kwargs, size = {}, 64
    if name.startswith("vit_"):
        patch = 14 if name.endswith("_14") else int(name[-2:])
        kwargs["image_size"] = size = 2 * patch
    elif name == "maxvit_t":
        size = 224
    elif name == "inception_v3":
        size = 299
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False  # scipy's truncated-normal init is slow; the aux heads stay
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **kwargs)
    return model, torch.randn(2, 3, size, size)


def logits(output) -> Tensor:
    """The main logits of a model output (GoogLeNet / Inception return named tuples in train mode)."""
    return output[0] if isinstance(output, tuple) else output


def relative_difference(a: Tensor, b: Tensor) -> float:
    """max |a - b| over the scale of ``b`` (at least 1), the tolerance measure of the sweep."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


def prunable_share(mutator: ChannelMutator) -> float:
    """Channels in mutable units / channels in all units."""
    total = sum(u.num_channels for u in mutator.units)
    return sum(u.num_channels for u in mutator.mutable_units) / total if total else 0.0


def sweep_model(name: str, ratio: float = 0.5) -> Dict[str, object]:
    """Parse, set every unit to ``ratio``, export, compare; one row of :data:`SWEEP_COLUMNS`."""
    row: Dict[str, object] = {"model": name}
    try:
        model, x = example_model(name)
        model.eval()
        flops_before, params_before = count_flops(model, (x,)), count_params(model)
        mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=x))
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mutator.prepare_from_supernet(model)
        row["parse_s"] = time.perf_counter() - start
        mutator.set_global_ratio(ratio)
        with torch.no_grad():
            dynamic = logits(model(x))
        pruned = mutator.export(model).eval()
        with torch.no_grad():
            exported = logits(pruned(x))
        row.update(units=len(mutator.units), mutable=len(mutator.mutable_units),
                   prunable_channels=prunable_share(mutator), params_M=params_before / 1e6,
                   params_kept=count_params(pruned) / params_before,
                   flops_kept=count_flops(pruned, (x,)) / flops_before,
                   max_rel_diff=f"{relative_difference(exported, dynamic):.1e}", status="ok")
    except Exception as error:  # a row per model, whatever happens
        row["status"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        row["traceback"] = traceback.format_exc()
    return row
