"""The ``switch`` rows of ``pyprune bench models`` alone (a training step on a new random subnet every step), repeated.

    .venv/bin/python benchmarks/bench_switch_step.py --models resnet18 resnet50 --batch 8 --repeats 3

Each repeat is one :func:`pyprune.app.bench.model_bench.bench_switch` run: plain gather mode (``pyprune-ext``), the
kept-slice optimizer (``pyprune-sliced``, :class:`pyprune.ops.kept_slice_sgd.KeptSliceSGD`), the mmrazor-style
reference and the exported subnets, timed pass by pass in turn. Prints one line per repeat (step time over the
exported subnet's, and the speed-up over mmrazor-ref) and the spread over the repeats.
"""
import argparse
import json
import statistics

import torch

from pyprune.app.bench.model_bench import ModelBenchConfig, _fill_vs_dense, bench_switch

BACKENDS = ("pyprune-ext", "pyprune-sliced", "mmrazor-ref", "dense")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--subnets", type=int, default=4)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "thread"), default="thread")
    parser.add_argument("--json", default=None, help="write every row here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelBenchConfig(device=torch.device("cpu"), image_size=args.image_size, backends=BACKENDS,
                           switch_subnets=args.subnets, switch_passes=args.passes, clock=args.clock)
    everything = []
    for model in args.models:
        ratios = {b: [] for b in BACKENDS}
        speedups = []
        for repeat in range(args.repeats):
            rows = bench_switch(cfg, model, args.batch)
            _fill_vs_dense(rows)
            by = {r["backend"]: r for r in rows}
            for b in BACKENDS:
                ratios[b].append(by[b]["vs_dense"])
            speedups.append(by["mmrazor-ref"]["median_ms"] / by["pyprune-sliced"]["median_ms"])
            print(f"{model} b{args.batch} repeat {repeat}: dense {by['dense']['median_ms']:.1f} ms; "
                  + ", ".join(f"{b} {by[b]['vs_dense']:.2f}x" for b in BACKENDS)
                  + f"; sliced vs mmrazor-ref {speedups[-1]:.2f}x", flush=True)
            everything += [dict(r, repeat=repeat) for r in rows]
        print(f"{model} b{args.batch} over {args.repeats} repeats (median [min, max]): "
              + ", ".join(f"{b} {statistics.median(v):.2f}x [{min(v):.2f}, {max(v):.2f}]" for b, v in ratios.items())
              + f"; sliced vs mmrazor-ref {statistics.median(speedups):.2f}x "
                f"[{min(speedups):.2f}, {max(speedups):.2f}]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=1)


if __name__ == "__main__":
    main()
