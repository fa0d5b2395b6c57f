"""Acceptance sweep: every torchvision classifier parses, prunes to 50 %, exports, and export == dynamic.

For each model in ``torchvision.models.list_models(module=torchvision.models)`` (weights=None, inputs as small as
each architecture allows, see :func:`pyprune.app.bench.sweep.example_model`): trace into units, set every mutable unit to
ratio 0.5, run the dynamic model, ``export()`` it, and check that the exported (physically smaller) model gives the
same logits (fp32: max |diff| <= 1e-4 of the logits' scale), has fewer parameters, and still runs a training-mode
forward + backward (aux heads included). Then random per-unit ratios on a dozen architectures, and a saved config
loaded into a fresh model.
The suite runs the smallest classifier of every family and block variant (:data:`REPRESENTATIVE`, 27 models); the
other 53, the four giant ones (:data:`GIANT`) included, run with ``PYPRUNE_FULL_SWEEP=1`` (the sweep command always
runs them all).
"""
import json
import os
import random

import pytest
import torch

from pyprune.app.bench.sweep import example_model, logits, relative_difference, torchvision_models
from pyprune.mutators import ChannelMutator, count_params

pytestmark = pytest.mark.filterwarnings("ignore::pyprune.tracing.PruningTraceWarning")

TOLERANCE = 1e-4  # max |exported - dynamic| / max(|dynamic|, 1), fp32
# Models whose construction + tracing take several seconds; still run by the default test command.
HEAVY = {"convnext_large", "regnet_y_32gf", "efficientnet_v2_l",
         "vgg19_bn", "vgg16_bn", "swin_v2_b", "swin_b", "maxvit_t", "regnet_x_32gf", "wide_resnet101_2",
         "inception_v3"}
# Random ratios per unit on a dozen architectures that cover every coupling rule.
FUZZED = ["resnet18", "resnext50_32x4d", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "googlenet",
          "shufflenet_v2_x0_5", "squeezenet1_1", "regnet_y_400mf", "convnext_tiny", "swin_t", "vit_b_32"]


def prepared(name: str, unit_type: str = "L1MutableChannelUnit"):
    model, x = example_model(name)
    mutator = ChannelMutator(channel_unit_cfg=unit_type, parse_cfg=dict(demo_input=x))
    mutator.prepare_from_supernet(model)
    assert mutator.mutable_units, f"{name}: no prunable unit found"
    return model.eval(), mutator, x


def assert_export_matches(model, mutator, x):
    with torch.no_grad():
        dynamic = logits(model(x))
    pruned = mutator.export(model).eval()
    assert not any(type(m).__module__.startswith("pyprune") for m in pruned.modules()), "pyprune module left"
    with torch.no_grad():
        difference = relative_difference(logits(pruned(x)), dynamic)
    assert difference <= TOLERANCE, f"exported differs from dynamic by {difference:.2e} of the logits' scale"
    return pruned


# The four largest classifiers (300-640M parameters): a minute each here for building, tracing and a forward at
# their smallest input, and most of the suite's memory. ``pyprune bench sweep --zoo torchvision-classifiers`` checks
# them with the same code (README table); the test command runs them with PYPRUNE_FULL_SWEEP=1.
GIANT = {"regnet_y_128gf", "vit_h_14", "vit_l_16", "vit_l_32"}
FULL_SWEEP = os.environ.get("PYPRUNE_FULL_SWEEP") == "1"


# The smallest model of every family and every block variant (plain / BN VGG, v1 / v2 Swin, X / Y RegNet, the
# EfficientNet-V2 blocks, ...): the coupling rules a family's larger members add nothing to. The other classifiers
# differ in depth and width only; they run with PYPRUNE_FULL_SWEEP=1 and in ``pyprune bench sweep``, on this code.
REPRESENTATIVE = {"alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
                  "inception_v3", "maxvit_t", "mnasnet0_5", "mnasnet1_0", "mobilenet_v2", "mobilenet_v3_large",
                  "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18", "resnet50",
                  "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0", "squeezenet1_1", "swin_t", "swin_v2_t",
                  "vgg11", "vgg11_bn", "vit_b_32", "wide_resnet50_2"}


def _sweep_param(name: str):
    if name in GIANT:
        return pytest.param(name, marks=[pytest.mark.slow, pytest.mark.skipif(
            not FULL_SWEEP, reason="giant classifier: checked by `pyprune bench sweep`; PYPRUNE_FULL_SWEEP=1 runs it")])
    if name not in REPRESENTATIVE:
        return pytest.param(name, marks=[pytest.mark.slow, pytest.mark.skipif(
            not FULL_SWEEP, reason="a larger member of a family the suite runs: PYPRUNE_FULL_SWEEP=1 runs it")])
    return pytest.param(name, marks=pytest.mark.slow) if name in HEAVY else name


@pytest.mark.parametrize("name", [_sweep_param(n) for n in torchvision_models()])
def test_prune_half_export_matches_dynamic(name):
    model, mutator, x = prepared(name)
    original_params = count_params(model)
    mutator.set_global_ratio(0.5)
    pruned = assert_export_matches(model, mutator, x)
    assert count_params(pruned) < original_params

    # The exported model is an ordinary trainable module (train-only branches such as aux heads included).
    pruned.train()
    outputs = pruned(x)
    outputs = [o for o in outputs if o is not None] if isinstance(outputs, tuple) else [outputs]  # + aux logits
    sum(o.float().sum() for o in outputs).backward()
    assert all(p.grad is not None for p in pruned.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", FUZZED)
def test_random_ratio_per_unit_export_matches_dynamic(name):
    model, mutator, x = prepared(name)
    rng = random.Random(sum(map(ord, name)))
    for _ in range(3):
        mutator.set_choices({u.name: rng.choice([0.1, 0.25, 0.4, 0.5, 0.75, 0.9, 1.0]) for u in mutator.mutable_units})
        assert_export_matches(model, mutator, x)


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "densenet121", "convnext_tiny"])
def test_saved_config_loads_into_a_fresh_model(name):
    model, mutator, x = prepared(name)
    rng = random.Random(0)
    mutator.set_choices({u.name: rng.choice([0.25, 0.5, 0.75]) for u in mutator.mutable_units})
    config = json.loads(json.dumps(mutator.config_template(with_unit_init_args=True, with_channels=True)))
    shapes = {k: tuple(v.shape) for k, v in mutator.export(model).state_dict().items()}

    fresh, _ = example_model(name, seed=1)
    config["parse_cfg"] = dict(type="Config")  # rebuild from the saved channels, no tracing
    reloaded = ChannelMutator.from_config(config)
    reloaded.prepare_from_supernet(fresh)
    assert reloaded.current_choices == mutator.current_choices
    assert {k: tuple(v.shape) for k, v in reloaded.export(fresh).state_dict().items()} == shapes
