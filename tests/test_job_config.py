"""The typed options of ``pyprune prune`` (pyprune.app.training.config.JobConfig) and its one training step
(pyprune.app.training.step.TrainStep): defaults filled in one place, bad combinations refused in one line, and a step
that computes exactly what a hand-written training iteration does."""
import argparse
import copy
import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyprune.app import cli
from pyprune.errors import ConfigError
from pyprune.app.training.config import DEFAULTS, QUICK, RESUME_KEYS, JobConfig
from pyprune.app.training.step import TrainStep


def parsed(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["prune", *argv])


# ------------------------------------------------------------------------------------------------------ config
def test_every_option_is_a_field_and_the_namespace_becomes_the_config(tmp_path):
    namespace = parsed("--output-dir", str(tmp_path / "out"), "--unit-type", "taylor", "--lr", "0.05")
    options = set(vars(namespace)) - {"command"}
    assert options == {f.name for f in dataclasses.fields(JobConfig)} - {"argv"}
    config = JobConfig.from_arguments(namespace, ["prune", "--lr", "0.05"])
    assert (tmp_path / "out").is_dir()  # created and proven writable
    assert config.unit_type == "TaylorMutableChannelUnit" and config.lr == 0.05 and config.argv == ("prune", "--lr",
                                                                                                      "0.05")
    assert (config.epochs, config.batch_size, config.image_size, config.target_ratio) == (
        DEFAULTS["epochs"], DEFAULTS["batch_size"], 32, 0.5)
    assert config.compact and config.budget is None and config.target_text() == "kept ratio 0.5"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0  # the job cannot change its options


def test_quick_presets_yield_to_given_values_and_a_budget_replaces_the_ratio():
    config = JobConfig(quick=True, epochs=3, target_flops=0.5)
    assert config.epochs == 3 and config.prune_times == QUICK["prune_times"] and config.step_freq == QUICK["step_freq"]
    assert config.image_size == QUICK["image_size"] and config.target_ratio is None
    assert config.budget == {"flops": 0.5}
    assert config.target_text() == "budget flops 50% (uniform allocation)"
    signature = config.resume_signature()
    assert tuple(signature) == RESUME_KEYS and signature["target_flops"] == 0.5 and signature["epochs"] == 3
    assert JobConfig(output_dir="/runs/a", resume="auto").resume == "/runs/a/checkpoint.pt"


@pytest.mark.parametrize("options, message", [
    (dict(target_ratio=0.5, target_params=0.3), "--target-ratio and --target-params are alternatives"),
    (dict(allocation="global"), "--allocation needs a budget"),
    (dict(target_flops=0.5, floor=0.0), "--floor must be 'auto' or a fraction in (0, 1]"),
    (dict(algorithm="group-fisher", floor=0.3), "--floor"),
    (dict(model="no_such_net"), "unknown model 'no_such_net'"),
    (dict(data="/no/such/folder"), "--data /no/such/folder: no such directory"),
    (dict(cuda_graphs=True), "--cuda-graphs needs --no-compact"),
    (dict(cuda_graphs=True, no_compact=True, device="cpu"), "--cuda-graphs needs a CUDA device"),
    (dict(amp="fp16", device="cpu"), "--amp fp16 needs a CUDA device"),
])
def test_bad_combinations_are_one_config_error(options, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)) as raised:
        JobConfig(**options)
    assert len(str(raised.value).splitlines()) == 1


def test_a_missing_checkpoint_is_refused_after_the_output_dir_is_checked(tmp_path):
    missing = tmp_path / "out" / "checkpoint.pt"
    with pytest.raises(ConfigError, match=re.escape(f"--resume: no checkpoint at {missing}")):
        JobConfig.from_arguments(parsed("--output-dir", str(tmp_path / "out"), "--resume"))


# -------------------------------------------------------------------------------------------------------- step
class _Importance:
    """Stands in for a pruning algorithm: records that it read the gradients after backward."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def after_backward(self):
        self.seen.append(self.model[0].weight.grad.clone())


def _model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    return model, torch.randn(6, 3, 6, 6), torch.randint(0, 5, (6,))


def test_the_eager_step_is_exactly_a_hand_written_iteration_and_feeds_the_algorithm():
    model, x, y = _model_and_batch()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    step = TrainStep(model, optimizer)
    algorithm = _Importance(model)
    for iteration in range(3):
        loss = step(x, y, algorithm if iteration == 1 else None)
        reference_optimizer.zero_grad()
        expected = F.cross_entropy(reference.train()(x), y)
        expected.backward()
        reference_optimizer.step()
        assert loss.dtype == torch.float32 and not loss.requires_grad and torch.equal(loss, expected.detach())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert len(algorithm.seen) == 1  # only the step it was given to
    assert step.scaler.state_dict() == {}  # no loss scaling outside fp16 (what a checkpoint stores)


def test_the_bf16_channels_last_step_runs_under_autocast():
    model, x, y = _model_and_batch()
    seen = []
    model[0].register_forward_pre_hook(lambda module, args: seen.append(
        (torch.is_autocast_enabled("cpu"), args[0].is_contiguous(memory_format=torch.channels_last))))
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), amp="bf16", channels_last=True)
    before = model[0].weight.detach().clone()
    loss = step(x, y)
    assert seen == [(True, True)] and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert not torch.equal(model[0].weight, before)
    with pytest.raises(ValueError, match="amp must be None, 'bf16' or 'fp16', got 'fp32'"):
        TrainStep(model, step.optimizer, amp="fp32")


def test_a_separate_forward_computes_the_logits_and_needs_no_truth_value():
    model, x, y = _model_and_batch()

    class Compiled(nn.Module):  # like torch.compile's wrapper: it forwards len() to a module that has none
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def __len__(self):
            raise TypeError("no len()")

        def forward(self, images):
            self.calls += 1
            return self.inner(images)

    forward = Compiled(model)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), forward=forward)
    model.eval()
    step(x, y)
    assert forward.calls == 1 and model.training  # the model itself is put in train mode
