"""pyprune prune --target-flops / --target-params / --target-latency: the run meets the budget, bad input is one
line and exit status 2."""
import json

import pytest

from pyprune.app import cli


def test_prune_to_a_flops_budget(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["prune", "--quick", "--no-progress", "--threads", "1", "--target-flops", "0.5",
                     "--allocation", "uniform", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.4 < summary["flops_kept"] <= 0.5
    assert summary["budget"] == {"flops": 0.5} and summary["allocation"] == "uniform"
    assert summary["target_ratio"] is None
    assert "budget flops 50% (uniform allocation)" in capsys.readouterr().out


def test_global_allocation_gets_the_floor_given_on_the_command_line(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["prune", "--quick", "--no-progress", "--threads", "1", "--target-flops", "0.5",
                     "--allocation", "global", "--floor", "0.6", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["allocation"] == "global" and summary["floor"] == 0.6 and 0.4 < summary["flops_kept"] <= 0.5
    units = json.loads((out / "structure.json").read_text())["mutator"]["channel_unit_cfg"]["units"]
    pruned = [u["choice"] for u in units.values() if "fixed" not in u["channels"]]
    assert pruned and min(pruned) >= 0.6 - 1e-9  # no unit below the floor (ratio choices)
    assert len(set(pruned)) > 1  # global: the units keep different fractions


@pytest.mark.parametrize("argv,message", [
    (["--target-ratio", "0.5", "--target-flops", "0.5"], "--target-ratio and --target-flops are alternatives"),
    (["--target-params", "0"], "--target-params: it must be a positive number"),
    (["--target-flops", "12.5"], "whole number"),
    (["--allocation", "global"], "--allocation needs a budget"),
    (["--floor", "0.3"], "--floor needs a budget"),
    (["--target-flops", "0.5", "--floor", "1.5"], "--floor: the kept ratio must be in (0, 1]"),
    (["--target-latency", "1.5"], "--target-latency"),
])
def test_bad_budget_options_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    try:   # argparse refuses malformed values with SystemExit(2), later checks return 2
        status = cli.main(["prune", "--quick", *argv, "--output-dir", str(tmp_path / "run")])
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_an_unreachable_budget_fails_before_training(tmp_path, capsys):
    assert cli.main(["prune", "--quick", "--no-progress", "--target-params", "0.001",
                     "--output-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert "cannot be met" in err and "floor" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
