"""Host time of ``mutator.set_choices`` (switching subnets), and where it goes.

    .venv/bin/python benchmarks/bench_switch.py [--models resnet18 resnet50] [--units Sequential L1]
                                                [--calls 200] [--device cpu|cuda] [--profile] [--out DIR]

For each model and unit type: prepare a 224 px torchvision model with a fresh ChannelMutator, draw two random
subnets, then time ``calls`` calls of ``set_choices`` alternating between them (each call changes every unit that
differs). The number reported is the median call, in milliseconds of host time (on CUDA the device queue is drained
after each call's timer stopped, so queued copies / kernels do not pile up into later calls; ``set_choices`` itself
never waits for the device). ``--profile`` prints the top functions of a cProfile run of the same loop.
"""
import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

UNIT_TYPES = {"Sequential": "SequentialMutableChannelUnit", "L1": "L1MutableChannelUnit",
              "BNScale": "BNScaleMutableChannelUnit", "OneShot": "OneShotMutableChannelUnit"}


def prepared(model_name: str, unit_type: str, device: torch.device):
    import torchvision
    from pyprune.mutators import ChannelMutator
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None, num_classes=1000)
    mutator = ChannelMutator(channel_unit_cfg=dict(type=UNIT_TYPES[unit_type], default_args=dict(choice_mode="ratio")),
                             parse_cfg=dict(type="ChannelAnalyzer", demo_input=(1, 3, 224, 224)))
    mutator.prepare_from_supernet(model)
    model.to(device)
    return model, mutator


def two_subnets(mutator):
    """Two subnets that differ in every mutable unit (so every call really switches)."""
    first = {u.name: 0.5 for u in mutator.mutable_units}
    second = {u.name: 0.75 for u in mutator.mutable_units}
    return first, second


def time_set_choices(mutator, subnets, calls: int, device: torch.device):
    """Median / mean host milliseconds of one ``set_choices`` call."""
    for i in range(4):  # warm-up: first-use copies, allocator
        mutator.set_choices(subnets[i % 2])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for i in range(calls):
        start = time.perf_counter()
        mutator.set_choices(subnets[i % 2])
        times.append(time.perf_counter() - start)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return statistics.median(times) * 1e3, statistics.fmean(times) * 1e3


def profile(mutator, subnets, calls: int, top: int = 25) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(calls):
        mutator.set_choices(subnets[i % 2])
    profiler.disable()
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--units", nargs="+", choices=sorted(UNIT_TYPES), default=["Sequential", "L1"])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the loop")
    parser.add_argument("--out", type=Path, default=None, help="write switch.json here")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print("| model | units | mutable units | set_choices median ms | mean ms |")
    print("|---|---|---|---|---|")
    for model_name in args.models:
        for unit_type in args.units:
            _, mutator = prepared(model_name, unit_type, device)
            subnets = two_subnets(mutator)
            median, mean = time_set_choices(mutator, subnets, args.calls, device)
            rows.append({"model": model_name, "units": unit_type, "device": str(device),
                         "mutable_units": len(mutator.mutable_units), "median_ms": median, "mean_ms": mean,
                         "calls": args.calls})
            print(f"| {model_name} | {unit_type} | {len(mutator.mutable_units)} | {median:.3f} | {mean:.3f} |",
                  flush=True)
            if args.profile:
                profile(mutator, subnets, args.calls)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "switch.json").write_text(json.dumps(
            {"torch": torch.__version__, "device": str(device), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
