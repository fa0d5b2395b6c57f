"""``pyprune prune --algorithm group-fisher``: the job runs GroupFisherAlgorithm to a FLOPs budget, then finetunes.

Runs are in process and tiny (8 px images, 32 training samples, 2 iterations per epoch, a 95 % FLOPs budget that a
handful of one-channel steps reach), so the file stays within seconds of a plain import.
"""
import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from pyprune.app import cli
from pyprune.app.training.config import GROUP_FISHER_DEFAULTS, JobConfig
from pyprune.app.training.pruned_run import load_pruned_run

INTERVAL, TARGET = 2, 0.95
TINY = ("--epochs", "1", "--finetune-epochs", "1", "--train-samples", "32", "--val-samples", "16", "--batch-size",
        "16", "--image-size", "8", "--no-progress")
GROUP_FISHER = ("--algorithm", "group-fisher", "--gf-interval", str(INTERVAL), "--target-flops", str(TARGET))
BATCHES = 2  # 32 samples / batch 16: iterations per epoch, so pruning starts at iteration 2


def run(out: Path, *extra: str) -> str:
    """``pyprune prune`` in this process; returns its stdout (a failure fails the test with its stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["prune", *GROUP_FISHER, *TINY, "--output-dir", str(out), *extra])
    assert code == 0, stderr.getvalue()[-3000:]
    return stdout.getvalue()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("group_fisher") / "out"
    return out, run(out)


def _summary(out: Path):
    return json.loads((out / "summary.json").read_text())


# ------------------------------------------------------------------------------------------------- the run
def test_the_run_meets_the_flops_budget_within_one_channel_step(full_run):
    out, stdout = full_run
    summary = _summary(out)
    assert summary["algorithm"] == "group-fisher" and summary["unit_type"] == "GroupFisherChannelUnit"
    assert summary["budget"] == {"flops": TARGET} and summary["reload_max_abs_diff"] <= 1e-4
    fisher = summary["group_fisher"]
    assert (fisher["interval"], fisher["normalization"], fisher["mutate_linear"]) == (INTERVAL, "act", False)
    limit = fisher["limits"]["flops"]
    assert limit == pytest.approx(TARGET * summary["flops_before"])
    # flops_after is counted on the exported model: it meets the budget, and the model one step earlier did not
    assert summary["flops_after"] <= limit < fisher["before_last_step"]["flops"]
    assert fisher["budget_met"] and fisher["after_last_step"]["flops"] == summary["flops_after"]
    assert fisher["after_last_step"]["params"] == summary["params_after"] < summary["params_before"]
    # one channel every INTERVAL iterations from the first pruning iteration on, then finetuning
    assert fisher["prune_end_iteration"] == BATCHES + INTERVAL * (fisher["channel_steps"] - 1) + 1
    assert "algorithm group-fisher (interval 2, act normalization), budget flops 95%" in stdout


def test_metrics_rows_follow_the_pruning_and_the_finetuning(full_run):
    out, stdout = full_run
    summary, rows = _summary(out), json.loads((out / "metrics.json").read_text())
    phases = [r["phase"] for r in rows]
    assert phases[0] == "pretrained" and phases[-1] == "finetuned" and set(phases[1:-1]) == {"prune"}
    assert 1 < len(rows) - 2 <= 4  # a row per quarter of the way to the budget, never more
    flops = [r["flops"] for r in rows]
    assert all(a > b for a, b in zip(flops[:-2], flops[1:-1]))  # each prune row after more removals
    assert flops[-1] == flops[-2] == summary["flops_after"] and rows[-2]["flops_kept"] <= TARGET
    assert rows[-1]["step"] == rows[-2]["step"] == summary["group_fisher"]["channel_steps"]
    assert rows[-1]["iteration"] == summary["group_fisher"]["prune_end_iteration"] + BATCHES
    table = [line for line in stdout.splitlines() if line.strip().split(" ")[0].isdigit()]
    assert len(table) == len(rows)


def test_the_deploy_config_and_the_structure_agree(full_run):
    out, _ = full_run
    assert set(_summary(out)["files"]) >= {"fix_subnet.json", "structure.json", "pruned_model.pt"}
    fix_subnet = json.loads((out / "fix_subnet.json").read_text())
    units = json.loads((out / "structure.json").read_text())["mutator"]["channel_unit_cfg"]["units"]
    assert fix_subnet and all(units[name]["choice"] == choice for name, choice in fix_subnet.items())
    assert any(choice < units[name]["init_args"]["num_channels"] for name, choice in fix_subnet.items())
    model = load_pruned_run(out)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_a_stopped_and_resumed_run_equals_the_uninterrupted_one(full_run, tmp_path):
    reference, _ = full_run
    out = tmp_path / "resumed"
    # stopped after iteration 3: the first channel went at iteration 2, iteration 3's Fisher is accumulated
    # but not used yet, so the checkpoint must carry it (and the interval counter) for the next removal
    run(out, "--max-iterations", str(BATCHES + INTERVAL))
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    state = checkpoint["algorithm"]
    assert checkpoint["position"] == BATCHES + INTERVAL and checkpoint["prune_end"] is None
    assert (state["counter"], state["channels_pruned"], state["done"]) == (INTERVAL, 1, False)
    assert any(s is not None and s["num_updates"] == 1 for s in state["importance"].values())
    assert "resumed from" in run(out, "--resume")
    assert json.loads((out / "structure.json").read_text()) == json.loads((reference / "structure.json").read_text())
    assert json.loads((out / "fix_subnet.json").read_text()) == json.loads((reference / "fix_subnet.json").read_text())
    ours, theirs = (torch.load(d / "pruned_model.pt", weights_only=True) for d in (out, reference))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    a, b = _summary(out), _summary(reference)
    assert a["group_fisher"] == b["group_fisher"] and a["flops_after"] == b["flops_after"]


def test_resume_with_another_interval_is_refused(full_run, capsys):
    out, _ = full_run
    code = cli.main(["prune", *GROUP_FISHER[:2], "--gf-interval", "3", "--target-flops", str(TARGET), *TINY,
                     "--output-dir", str(out), "--resume"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gf_interval (checkpoint 2, now 3)" in err[0]


# ----------------------------------------------------------------------------------------------- options
def test_group_fisher_defaults():
    config = JobConfig(algorithm="group-fisher", quick=True)
    assert config.budget == {"flops": 0.5} and config.target_ratio is None
    assert (config.gf_interval, config.gf_normalization) == (GROUP_FISHER_DEFAULTS["gf_interval"], "act")
    assert config.unit_type == "GroupFisherChannelUnit" and config.prune_times is None and config.step_freq is None
    assert JobConfig().unit_type == "L1MutableChannelUnit" and JobConfig().algorithm == "ite"


def _exit_status(argv):
    try:
        return cli.main(argv)
    except SystemExit as done:  # argparse's own errors
        return done.code


@pytest.mark.parametrize("options, message", [
    (("--algorithm", "group-fisher", "--cuda-graphs", "--no-compact"),
     "--cuda-graphs and --algorithm group-fisher cannot be combined: its importance needs hooks"),
    (("--algorithm", "group-fisher", "--target-ratio", "0.5"), "--target-ratio and --algorithm group-fisher"),
    (("--algorithm", "group-fisher", "--target-latency", "0.5"), "--target-latency and --algorithm group-fisher"),
    (("--algorithm", "group-fisher", "--target-flops", "0.5", "--allocation", "global"),
     "--allocation and --algorithm group-fisher"),
    (("--algorithm", "group-fisher", "--prune-times", "3"), "--prune-times and --algorithm group-fisher"),
    (("--algorithm", "group-fisher", "--step-freq", "3"), "--step-freq and --algorithm group-fisher"),
    (("--algorithm", "group-fisher", "--unit-type", "taylor"), "--unit-type and --algorithm group-fisher"),
    (("--algorithm", "group-fisher", "--amp", "fp16"), "--amp fp16 and --algorithm group-fisher"),
    (("--gf-interval", "5"), "--gf-interval needs --algorithm group-fisher"),
    (("--gf-normalization", "flops"), "--gf-normalization needs --algorithm group-fisher"),
    (("--gf-mutate-linear",), "--gf-mutate-linear needs --algorithm group-fisher"),
    (("--algorithm", "group-fisher", "--gf-interval", "0"), "argument --gf-interval: must be >= 1, got 0"),
    (("--algorithm", "group-fisher", "--gf-normalization", "l1"), "argument --gf-normalization: invalid choice"),
    (("--algorithm", "slimmable"), "argument --algorithm: invalid choice"),
])
def test_bad_options_are_one_line_naming_them_and_write_nothing(options, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert _exit_status(["prune", *options, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("options, message", [
    (dict(gf_interval=0), "--gf-interval must be an integer >= 1, got 0"),
    (dict(gf_interval=2.5), "--gf-interval must be an integer >= 1, got 2.5"),
    (dict(gf_normalization="none"), "--gf-normalization must be one of flops, act, got 'none'"),
])
def test_bad_values_in_the_config_name_the_option(options, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("'", ".")):
        JobConfig(algorithm="group-fisher", **options)
