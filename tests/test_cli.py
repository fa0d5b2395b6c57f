"""``pyprune prune`` end to end (quick mode, in a subprocess), resume, outputs, and bad input.

The subprocess runs need the real ``pyprune.ops`` and ``pyprune.tracing``; the argument checks run in process.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyprune.app import cli
from pyprune.app.training.config import QUICK

REPO = Path(__file__).resolve().parents[1]
FINAL_FILES = {"pruned_model.pt", "structure.json", "metrics.csv", "metrics.json", "pruning_curve.png",
               "summary.json"}



def run_cli(*args, cwd, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "pyprune", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def _run_files(out: Path):
    """The run's files, after checking that it left no hidden ones (lock, temporaries, staging folders)."""
    names = {p.name for p in out.iterdir()}
    assert not [n for n in names if n.startswith(".")], names
    return names


def _same_files(a: Path, b: Path, names):
    for name in names:
        if name.endswith(".pt"):
            x, y = torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True)
            assert x.keys() == y.keys()
            assert all(torch.equal(x[k], y[k]) for k in x), name
        else:
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One uninterrupted quick run (Taylor units, so importance state matters for the resume test)."""
    out = tmp_path_factory.mktemp("quick") / "out"
    result = run_cli("prune", "--quick", "--unit-type", "taylor", "--no-progress", "--output-dir", str(out),
                     cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_quick_run_writes_every_output(quick_run):
    out, result = quick_run
    assert _run_files(out) == FINAL_FILES | {"checkpoint.pt"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files"] and set(summary["files"]) == FINAL_FILES
    assert summary["params_after"] < summary["params_before"] and summary["flops_after"] < summary["flops_before"]
    assert summary["reload_max_abs_diff"] <= 1e-4 and summary["ranks_agree"]

    rows = json.loads((out / "metrics.json").read_text())
    assert [(r["step"], r["phase"]) for r in rows] == [(0, "pretrained"), (1, "prune"), (2, "prune"),
                                                       (2, "finetuned")]
    assert [r["kept_ratio"] for r in rows] == pytest.approx([1.0, 0.75, 0.5, 0.5])
    params = [r["params"] for r in rows]
    assert params[0] == summary["params_before"] and params[1] < params[0] and params[2] < params[1]
    with open(out / "metrics.csv") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [int(r["params"]) for r in csv_rows] == params
    assert (out / "pruning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the per-step table went to stdout: one line per row
    table = [line for line in result.stdout.splitlines() if line.strip().split(" ")[0].isdigit()]
    assert len(table) == len(rows)


def test_exported_model_reloads_into_a_fresh_model_and_matches(quick_run):
    from pyprune.app.training import load_pruned_run
    from pyprune.app.data import synthetic_splits
    from pyprune.app.training.loop import evaluate
    out, _ = quick_run
    summary = json.loads((out / "summary.json").read_text())
    structure = json.loads((out / "structure.json").read_text())
    assert structure["model"]["name"] == "small_resnet"
    assert structure["mutator"]["type"] == "ChannelMutator"
    assert all("channels" in u for u in structure["mutator"]["channel_unit_cfg"]["units"].values())

    model = load_pruned_run(out)
    assert not any(type(m).__module__.startswith("pyprune.ops") for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == summary["params_after"]
    _, val = synthetic_splits(QUICK["train_samples"], QUICK["val_samples"], QUICK["image_size"], 0)
    assert evaluate(model, val, 64, torch.device("cpu")) == pytest.approx(summary["accuracy_exported"])


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(quick_run, tmp_path):
    reference, _ = quick_run
    out = tmp_path / "out"
    common = ("prune", "--quick", "--unit-type", "taylor", "--no-progress", "--output-dir", str(out))
    stopped = run_cli(*common, "--max-iterations", "10", cwd=tmp_path)  # in the pruning phase, after step 1
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert _run_files(out) == {"checkpoint.pt"}, "a stopped run must not look complete"
    resumed = run_cli(*common, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    _same_files(out, reference, ["pruned_model.pt", "structure.json"])
    rows = json.loads((out / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    for row in (rows, expected):
        for r in row:
            r.pop("wall_s")
    assert rows == expected


def test_resume_with_other_options_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["prune", "--quick", "--no-progress", "--max-iterations", "2", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["prune", "--quick", "--no-progress", "--target-ratio", "0.25", "--resume",
                     "--output-dir", str(out)]) == 1
    assert "target_ratio" in capsys.readouterr().err


def test_image_folder_data(tmp_path, capsys):
    from torchvision.utils import save_image
    from pyprune.app.data import SyntheticShapes
    for split, count, seed in (("train", 48, 1), ("val", 12, 2)):
        shapes = SyntheticShapes(count, 16, seed=seed)
        for i in range(count):
            image, label = shapes[i]
            folder = tmp_path / "images" / split / shapes.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            save_image(image * 0.3 + 0.24, folder / f"{i}.png")
    out = tmp_path / "out"
    assert cli.main(["prune", "--quick", "--data", str(tmp_path / "images"), "--batch-size", "8", "--no-progress",
                     "--output-dir", str(out)]) == 0, capsys.readouterr().err
    structure = json.loads((out / "structure.json").read_text())
    assert structure["model"]["num_classes"] == 10 and structure["model"]["input_shape"] == [1, 3, 16, 16]
    assert json.loads((out / "summary.json").read_text())["params_after"] < 78042


# ----------------------------------------------------------------------------------------------- bad input
def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("pyprune prune: error: ")
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--model", "no_such_net"], "unknown model 'no_such_net'"),
    (["--target-ratio", "0"], r"(0, 1]"),
    (["--target-ratio", "1.5"], r"(0, 1]"),
    (["--target-ratio", "nan"], r"(0, 1]"),
    (["--prune-times", "0"], ">= 1"),
    (["--unit-type", "magic"], "unknown unit type"),
    (["--data", "/no/such/folder"], "no such directory"),
    (["--resume", "/no/such/checkpoint.pt"], "no checkpoint"),
])
def test_bad_arguments_exit_2_with_one_line(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert _exit_code(["prune", "--output-dir", str(out), *args]) == 2
    assert message in _one_error_line(capsys)
    assert not out.exists() or not any(out.iterdir())


def _exit_code(argv) -> int:
    """``cli.main``'s return value, or the status of the SystemExit argparse raises for malformed options."""
    try:
        return cli.main(argv)
    except SystemExit as done:
        return done.code


def test_output_dir_that_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert cli.main(["prune", "--output-dir", str(blocker)]) == 2
    assert "not a directory" in _one_error_line(capsys)
    assert cli.main(["prune", "--output-dir", str(blocker / "sub")]) == 2
    assert "not writable" in _one_error_line(capsys)


def test_runtime_failure_is_one_line_and_leaves_the_finished_run_alone(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # left by an earlier complete run in the same folder
    code = cli.main(["prune", "--quick", "--batch-size", "100000", "--no-progress", "--output-dir", str(out)])
    assert code == 2 and "holds a finished run" in _one_error_line(capsys)
    code = cli.main(["prune", "--quick", "--batch-size", "100000", "--no-progress", "--overwrite",
                     "--output-dir", str(out)])
    assert code == 1
    assert "batch-size" in _one_error_line(capsys)
    # the new run failed before it changed anything: the earlier run is still marked complete
    assert (out / "summary.json").read_text() == "{}"
    assert _run_files(out) == {"summary.json"}


def test_bad_ratio_in_a_real_process_exits_nonzero_with_one_stderr_line(tmp_path):
    result = run_cli("prune", "--target-ratio", "-0.5", "--output-dir", str(tmp_path / "out"), cwd=tmp_path,
                     timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pyprune prune: error: argument --target-ratio: the kept ratio must be in (0, 1], got -0.5"]


def test_bench_is_delegated_with_its_arguments(monkeypatch):
    import pyprune.app.bench
    seen = []
    monkeypatch.setattr(pyprune.app.bench, "main", lambda argv: seen.append(argv) or 7)
    assert cli.main(["bench", "ops", "--quick"]) == 7
    assert seen == [["ops", "--quick"]]


def test_unknown_command_and_help(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert cli.main([]) == 0
    assert "prune" in capsys.readouterr().out
    for flag in ("--help", "-h"):
        assert cli.main([flag]) == 0
        captured = capsys.readouterr()
        assert "prune" in captured.out and "bench" in captured.out and captured.err == ""


# ------------------------------------------------------------------------------------------- bench bad input
def _one_bench_error_line(capsys, command: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"pyprune bench {command}: error: ")
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["models", "--ratios", "1.5"], "(0, 1]"),
    (["models", "--ratios", "0.5", "0"], "(0, 1]"),
    (["models", "--compile-ratios", "nan"], "(0, 1]"),
    (["models", "--models", "resnet18", "no_such_net"], "unknown model 'no_such_net'"),
    (["models", "--compile-models", "no_such_net"], "unknown model 'no_such_net'"),
    (["models", "--reps", "0"], ">= 1"),
    (["models", "--batch-sizes", "0"], ">= 1"),
    (["models", "--warmup", "-1"], ">= 0"),
    (["models", "--compile-backend", "no_such_backend"], "unknown torch.compile backend"),
    (["ops", "--reps", "0"], ">= 1"),
])
def test_bench_bad_arguments_exit_2_with_one_line(args, message, tmp_path, capsys):
    out = tmp_path / "bench"
    assert _exit_code(["bench", *args, "--quick", "--out", str(out)]) == 2
    assert message in _one_bench_error_line(capsys, args[0])
    assert not out.exists()


def test_bench_run_with_errored_rows_exits_1(tmp_path, capsys, monkeypatch):
    from pyprune.app.bench import model_bench

    def failing_eval_step(self, x):
        raise RuntimeError("injected eval failure")

    monkeypatch.setattr(model_bench.Runner, "eval_step", failing_eval_step)
    assert cli.main(["bench", "models", "--quick", "--backends", "dense", "--ratios", "0.5",
                     "--out", str(tmp_path)]) == 1
    with open(tmp_path / "models.csv", newline="") as handle:
        statuses = {row["workload"]: row["status"] for row in csv.DictReader(handle)}
    assert statuses["eval"].startswith("error: RuntimeError: injected") and statuses["train"] == "ok"
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert line.startswith("pyprune bench models: error: 1 of 3 rows failed") and "injected eval failure" in line
