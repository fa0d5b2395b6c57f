"""benchmarks/bench_algorithms.py's --quick path on one method and seed: the CSV and markdown table have the
documented columns, one row per (data, model, method), and the exported model meets the FLOPs target within one
allocation step."""
import csv
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_algorithms", ROOT / "benchmarks" / "bench_algorithms.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["global-taylor"])
def test_quick_run_writes_the_table_and_meets_the_flops_target(tmp_path, method):
    bench = load_bench()
    csv_path, md_path, runs_path = tmp_path / "summary.csv", tmp_path / "table.md", tmp_path / "runs.csv"
    assert bench.main(["--quick", "--methods", method, "--csv", str(csv_path), "--markdown", str(md_path),
                       "--runs-csv", str(runs_path)]) == 0
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    assert set(bench.COLUMNS) <= set(rows[0])
    row = rows[0]
    assert (row["dataset"], row["model"], row["method"], row["seeds"]) == ("shapes", "resnet18", method, "1")
    assert 0.0 <= float(row["top1_mean"]) <= 1.0 and float(row["top1_spread"]) == 0.0  # one seed: no spread
    assert 0.4 < float(row["flops_kept_min"]) <= float(row["flops_kept_max"]) <= 0.5 and row["target_met"] == "True"
    assert row["within_step"] == "True"  # the export is less than one allocation step below the target
    assert float(row["narrowest_min"]) >= 0.25 - 1e-9  # the default ('auto') global floor at 50 % FLOPs
    with open(runs_path, newline="") as handle:
        runs = list(csv.DictReader(handle))
    assert [(r["seed"], r["method"]) for r in runs] == [("0", method)] and set(runs[0]) == set(bench.RUN_COLUMNS)
    merged_md = tmp_path / "merged.md"  # --merge of the same runs twice: the same top-1, two seeds' worth
    assert bench.main(["--merge", str(runs_path), str(runs_path), "--csv", str(tmp_path / "m.csv"), "--markdown",
                       str(merged_md)]) == 0
    assert f"| shapes | resnet18 | {method} | {float(row['top1_mean']):.3f} | 0.000 |" in merged_md.read_text()
    text = md_path.read_text()
    assert "torch " in text and "device cpu" in text and "UTC" in text  # the run's setting is in the header
    header = next(line for line in text.splitlines() if line.startswith("| data |"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "data", "model", "method", "top-1 mean", "spread", "full model", "FLOPs kept (min-max)", "target met",
        "within one step", "narrowest unit", "wall s / run"]
    assert f"| shapes | resnet18 | {method} |" in text


def test_quick_leaves_explicit_options_alone():
    bench = load_bench()
    args = bench.parse_args(["--quick", "--seeds", "3", "4"])
    assert args.seeds == [3, 4] and args.image_size == 16 and args.datasets == ["shapes"]
    assert bench.parse_args([]).global_floor == "auto" and bench.parse_args(["--global-floor", "0.3"]).global_floor == 0.3
