"""``pyprune prune --unit-type activation``: channels scored from calibration batches before every pruning step.

In-process and tiny (8 px images, 32 training samples), like the other job tests.
"""
import contextlib
import io
import json
from pathlib import Path

import pytest

from pyprune.app import cli
from pyprune.app.training.config import DEFAULT_CALIBRATION_BATCHES, JobConfig
from pyprune.errors import ConfigError
from pyprune.units import calibration

TINY = ("--epochs", "1", "--finetune-epochs", "1", "--train-samples", "32", "--val-samples", "16", "--batch-size",
        "16", "--image-size", "8", "--no-progress", "--prune-times", "2", "--step-freq", "1")


def run(out: Path, *extra: str) -> str:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["prune", *TINY, "--output-dir", str(out), *extra])
    assert code == 0, stderr.getvalue()[-3000:]
    return stdout.getvalue()


def test_each_pruning_step_is_calibrated_first(tmp_path, monkeypatch):
    calls = []
    real = calibration.calibrate

    def counting(mutator, model, batches, *args, **kwargs):
        calls.append(len(batches))
        return real(mutator, model, batches, *args, **kwargs)

    monkeypatch.setattr("pyprune.app.training.job.calibrate", counting)
    out = tmp_path / "out"
    run(out, "--unit-type", "activation", "--calibration-batches", "2")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unit_type"] == "ActivationMutableChannelUnit"
    assert calls == [2, 2]  # one calibration of 2 batches (32 samples / 16) per pruning step, and no other
    assert summary["params_after"] < summary["params_before"]


def test_the_calibration_option_belongs_to_activation_units():
    assert JobConfig(unit_type="ActivationMutableChannelUnit").calibration_batches == DEFAULT_CALIBRATION_BATCHES
    assert JobConfig().calibration_batches is None
    with pytest.raises(ConfigError, match="--calibration-batches needs --unit-type activation"):
        JobConfig(calibration_batches=4)
    with pytest.raises(ConfigError, match="--calibration-batches must be an integer >= 1"):
        JobConfig(unit_type="ActivationMutableChannelUnit", calibration_batches=0)
