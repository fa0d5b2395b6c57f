"""Whole-model step time by number format and memory format: fp32 / bf16 autocast x contiguous / channels_last.

    python3 benchmarks/bench_formats.py [--device cuda] [--models resnet50] [--batch 64] [--ratio 0.5]
                                        [--image-size 224] [--warmup 3] [--reps 10] [--out DIR] [--quick]

One subnet (every unit at ``--ratio``), each backend in each format: ``pyprune`` (the prepared model, eager),
``dense`` (``mutator.export``, eager), ``mmrazor-ref`` (boolean-mask slicing, eager) and, on CUDA,
``pyprune-graph`` / ``dense-graph`` (the whole step replayed from a CUDA graph, :mod:`pyprune.graphs`). Workloads
``train`` (forward + cross-entropy + backward + SGD step) and ``eval`` (no-grad forward). bf16 runs the step under
``torch.autocast(dtype=torch.bfloat16)``; channels_last converts the models and the input with
``memory_format=torch.channels_last``. ``vs_dense`` = time / the eager dense model's in the same format. Writes
``formats.csv`` / ``formats.json``. ``--quick``: the tiny CNN at 16 px, 1 warm-up, 2 repetitions (seconds on CPU).
"""
import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch

from pyprune.app.bench.mmrazor_reference import build_reference_model
from pyprune.app.bench.model_bench import (GraphRunner, Runner, build_supernet, dynamic_backend_name, num_classes_of,
                                  prepare)
from pyprune.app.bench.tables import format_header, format_table, run_header, write_csv, write_json
from pyprune.app.bench.timing import measure

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
COLUMNS = ("model", "batch", "ratio", "dtype", "format", "workload", "backend", "median_ms", "vs_dense", "status")


def runners_for(model, mutator, device: torch.device, memory_format) -> dict:
    """Fresh copies per format (a conversion is in place), so every format starts from the same weights."""
    dynamic = copy.deepcopy(model)  # keeps the layers' selections; the subnet never changes here
    dense = mutator.export(copy.deepcopy(model))
    reference = build_reference_model(model, mutator).model
    for module in (dynamic, dense, reference):
        module.to(device=device, memory_format=memory_format)
    runners = {"pyprune": Runner(dynamic, dynamic_backend_name()), "dense": Runner(dense, "torch"),
               "mmrazor-ref": Runner(reference, "torch")}
    if device.type == "cuda":
        runners["pyprune-graph"] = GraphRunner(dynamic, _frozen_key(mutator), dynamic_backend_name())
        runners["dense-graph"] = GraphRunner(copy.deepcopy(dense), None, "torch")
    return runners


def _frozen_key(mutator):
    """The subnet never changes in this benchmark: one constant key."""
    key = mutator.subnet_key()
    return lambda: key


def bench_model(name: str, args, device: torch.device) -> list:
    torch.manual_seed(0)
    model = build_supernet(name, args.image_size)
    mutator = prepare(model, args.image_size)
    mutator.set_global_ratio(args.ratio)
    x0 = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, num_classes_of(name), (args.batch,), device=device)
    backends = ["pyprune", "dense", "mmrazor-ref", "pyprune-graph", "dense-graph"]
    rows = []
    for format_name, memory_format in FORMATS.items():
        runners = runners_for(model, mutator, device, memory_format)
        x = x0.to(device=device, memory_format=memory_format)
        for dtype_name, dtype in DTYPES.items():
            autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None
                        else contextlib.nullcontext())
            for workload in ("train", "eval"):
                for backend in backends:
                    row = {"model": name, "batch": args.batch, "ratio": args.ratio, "dtype": dtype_name,
                           "format": format_name, "workload": workload, "backend": backend,
                           "median_ms": float("nan"), "vs_dense": float("nan")}
                    runner = runners.get(backend)
                    if runner is None:
                        rows.append(dict(row, status="skipped: needs CUDA"))
                        continue
                    step = _step(runner, workload, x, y, autocast)
                    try:
                        result = measure(step, device, warmup=args.warmup, reps=args.reps, syncs=False)
                    except Exception as error:  # one failing backend must not hide the others' numbers
                        rows.append(dict(row, status=f"error: {type(error).__name__}: "
                                                     f"{str(error).splitlines()[0][:100]}"))
                        continue
                    rows.append(dict(row, median_ms=result.median_s * 1e3, status="ok"))
    _fill_vs_dense(rows)
    return rows


def _fill_vs_dense(rows: list) -> None:
    """``vs_dense`` = time / the eager dense model's time in the same dtype, format and workload."""
    def where(row):
        return row["model"], row["dtype"], row["format"], row["workload"]
    dense = {where(r): r["median_ms"] for r in rows if r["backend"] == "dense" and r["status"] == "ok"}
    for row in rows:
        if row["status"] == "ok" and where(row) in dense:
            row["vs_dense"] = row["median_ms"] / dense[where(row)]


def _step(runner, workload: str, x, y, autocast):
    if workload == "train":
        def step():
            with autocast:
                runner.train_step(x, y)
    else:
        def step():
            with autocast:
                runner.eval_step(x)
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["resnet50"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--quick", action="store_true", help="tiny CNN, 16 px, batch 2, 1 warm-up, 2 repetitions")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.image_size, args.warmup, args.reps = ["tiny"], 2, 16, 1, 2
    if args.batch < 1 or args.warmup < 0 or args.reps < 1 or not 0.0 < args.ratio <= 1.0:
        parser.error("need --batch >= 1, --warmup >= 0, --reps >= 1 and --ratio in (0, 1]")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but no CUDA device is available")
    header = run_header(device, benchmark="formats", batch=args.batch, ratio=args.ratio, image_size=args.image_size,
                        warmup=args.warmup, reps=args.reps)
    rows = [row for name in args.models for row in bench_model(name, args, device)]
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "formats.csv", rows, COLUMNS)
    write_json(args.out / "formats.json", header, rows)
    print(format_header(header))
    print()
    print(format_table(rows, COLUMNS))
    print(f"\nwrote {args.out / 'formats.csv'}, {args.out / 'formats.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
