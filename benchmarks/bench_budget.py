"""Uniform vs global channel allocation at the same FLOPs budget: accuracy after the same finetuning, FLOPs, params
and measured latency of the exported models, side by side.

    .venv/bin/python benchmarks/bench_budget.py                       # ResNet-18/50, MobileNetV2 at 50 % FLOPs
    .venv/bin/python benchmarks/bench_budget.py --models resnet18 --pretrain-steps 400 --finetune-steps 150
    .venv/bin/python benchmarks/bench_budget.py --data /path/to/imagefolder --image-size 64 --device cuda

Per model: train the full model ``--pretrain-steps`` steps (so L1 importance means something), then for each
allocation prune a copy of it to ``--target-flops`` of the full model's FLOPs with ``prune_to_budget`` (L1 units,
importance normalised per unit by its mean), export it, finetune the exported model ``--finetune-steps`` steps with
the same optimiser, schedule and batches, and measure top-1 on the validation split, FLOPs / params of the exported
model (``FlopCounterMode`` / ``count_params``) and its latency on ``--device`` at ``--latency-batch`` (the full and
pruned models timed in turn for ``--latency-rounds`` rounds, each a ``pyprune.budget.measure_latency`` median of 3
eval forwards after a warm-up; the median over rounds is reported). Allocations: ``uniform``, ``global`` and
``global:key=value,...`` with planner options (``floor``, ``cost_power``, ``normalization``). The default run
(32 px synthetic images, 150 + 60 steps per allocation, one CPU thread) is about 20 minutes on a 2-core CPU, most of
it ResNet-50; ``--models resnet18`` about 5. benchmarks/RESULTS.md has the longer run.
"""
import argparse
import copy
import datetime
import platform
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pyprune.budget import LatencySettings, measure_latency, prune_to_budget
from pyprune.app.data import build_datasets, make_train_loader
from pyprune.mutators import ChannelMutator, count_flops, count_params
from pyprune.app.training.loop import cosine_lr, evaluate, set_lr
from pyprune.app.training.models import build_model
from pyprune.app.training.step import TrainStep

DEFAULT_MODELS = ("resnet18", "resnet50", "mobilenet_v2")
DEFAULT_ALLOCATIONS = ("uniform", "global", "global:cost_power=0")
FINETUNE_LR_FRACTION = 0.25


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--allocations", nargs="+", type=allocation_spec, default=list(DEFAULT_ALLOCATIONS),
                        help="'uniform' or 'global', optionally with planner options: 'global:floor=0.25', "
                             "'global:cost_power=0'")
    parser.add_argument("--target-flops", type=float, default=0.5, help="kept fraction of the full model's FLOPs")
    parser.add_argument("--floor", type=_floor, default="auto",
                        help="fewest channels a unit keeps: a fraction, or 'auto' (prune_to_budget's default: a "
                             "quarter of the unit, or half its uniform count when less)")
    parser.add_argument("--data", default=None, help="ImageFolder root (default: the built-in synthetic shapes)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--val-samples", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                        help="AdamW learns the synthetic shapes in fewer steps than SGD")
    parser.add_argument("--lr", type=float, default=2e-3, help=f"pretraining learning rate; finetuning uses "
                                                                f"{FINETUNE_LR_FRACTION} of it")
    parser.add_argument("--latency-batch", type=int, default=8)
    parser.add_argument("--latency-rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (one is several times faster than two on a shared, oversubscribed box)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", default=None, help="also write the table (markdown) to this file")
    return parser.parse_args(argv)


def _floor(text: str):
    """``--floor``: 'auto' or a fraction in [0, 1]."""
    if text == "auto":
        return text
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"--floor must be 'auto' or a fraction in [0, 1], got {text!r}")
    return value


def allocation_spec(text: str) -> str:
    """``uniform`` | ``global`` [``:key=value,...``] with keys floor / cost_power / normalization (checked)."""
    allocation_options(text)
    return text


def allocation_options(text: str) -> dict:
    name, _, rest = text.partition(":")
    if name not in ("uniform", "global"):
        raise argparse.ArgumentTypeError(f"allocation must start with 'uniform' or 'global', got {text!r}")
    options = {"allocation": name}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in ("floor", "cost_power", "normalization"):
            raise argparse.ArgumentTypeError(f"unknown allocation option {key!r} in {text!r}")
        options[key] = value if key == "normalization" else float(value)
    return options


def train(model: nn.Module, loader: DataLoader, steps: int, lr: float, device, desc: str, optimizer_name: str) -> None:
    """``steps`` steps of AdamW (weight decay 1e-4) or SGD (momentum 0.9, weight decay 5e-5), cosine learning rate
    from ``lr``, over ``loader`` restarted as often as needed; the loader's order is fixed by its seed, so every
    call sees the same batches."""
    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-5)
    train_step = TrainStep(model, optimizer)
    batches = iter(())
    for step in tqdm(range(steps), desc=desc, leave=False, file=sys.stdout):
        try:
            images, labels = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, labels = next(batches)
        set_lr(optimizer, cosine_lr(lr, step, steps))
        train_step(images.to(device), labels.to(device))


def measure(model: nn.Module, val_set, device, latency_input) -> dict:
    """Top-1, FLOPs of one image, params."""
    return {"top1": evaluate(model, val_set, 128, device), "flops": count_flops(model, (latency_input[:1],)),
            "params": count_params(model)}


def interleaved_latency(models, latency_input, rounds: int) -> list:
    """Seconds per forward of each model: ``rounds`` rounds that each time every model (median of 3 timed forwards
    after one warm-up, :func:`measure_latency`), then the median over rounds. Interleaving puts every model under
    the same machine load, which drifts on a shared CPU."""
    times = [[] for _ in models]
    for _ in tqdm(range(rounds), desc="latency", leave=False, file=sys.stdout):
        for index, model in enumerate(models):
            times[index].append(measure_latency(model, (latency_input,), LatencySettings(warmup=1, repeats=3)))
    return [sorted(t)[len(t) // 2] for t in times]


def bench_model(name: str, args, train_set, val_set, num_classes: int, device) -> list:
    torch.manual_seed(args.seed)
    full = build_model(name, num_classes).to(device)
    loader = make_train_loader(train_set, args.batch_size, args.seed)
    started = time.perf_counter()
    train(full, loader, args.pretrain_steps, args.lr, device, f"{name}: pretrain", args.optimizer)
    latency_input = torch.randn(args.latency_batch, 3, args.image_size, args.image_size, device=device)
    reference = measure(full, val_set, device, latency_input)
    print(f"{name}: full model top-1 {reference['top1']:.3f} after {args.pretrain_steps} steps "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    rows = [dict(model=name, allocation="full", pruned_top1=reference["top1"], narrowest=1.0, **reference)]
    exported = [full]
    for allocation in args.allocations:
        model = copy.deepcopy(full)
        shape = (1, 3, args.image_size, args.image_size)
        mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=shape))
        mutator.prepare_from_supernet(model)
        planned = time.perf_counter()
        options = {"floor": args.floor, **allocation_options(allocation)}  # a spec's own floor= wins
        result = prune_to_budget(model, mutator, flops=args.target_flops, **options)
        plan_s = time.perf_counter() - planned
        small = mutator.export(model)
        pruned_top1 = evaluate(small, val_set, 128, device)
        torch.manual_seed(args.seed)
        train(small, loader, args.finetune_steps, args.lr * FINETUNE_LR_FRACTION, device,
              f"{name}: {allocation} finetune", args.optimizer)
        narrowest = min(u.active_channels / u.num_channels for u in mutator.mutable_units)
        row = dict(model=name, allocation=allocation, pruned_top1=pruned_top1, plan_s=plan_s, narrowest=narrowest,
                   **measure(small, val_set, device, latency_input))
        exported.append(small)
        print(f"{name}: {allocation}: planned in {plan_s:.1f} s, FLOPs kept {result.kept('flops'):.1%}, top-1 "
              f"{pruned_top1:.3f} after pruning, {row['top1']:.3f} after {args.finetune_steps} finetune steps",
              flush=True)
        rows.append(row)
    latencies = interleaved_latency(exported, latency_input, args.latency_rounds)
    for row, seconds in zip(rows, latencies):
        row["latency_s"] = seconds
    for row in rows:
        row["flops_kept"] = row["flops"] / reference["flops"]
        row["params_kept"] = row["params"] / reference["params"]
        row["latency_kept"] = row["latency_s"] / rows[0]["latency_s"]
    return rows


def table(rows) -> str:
    lines = ["| model | allocation | top-1 after pruning | top-1 after finetune | FLOPs (M) | FLOPs kept | "
             "params (M) | params kept | latency (ms) | latency kept | narrowest unit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['allocation']} | {r['pruned_top1']:.3f} | {r['top1']:.3f} | "
                     f"{r['flops'] / 1e6:.1f} | {r['flops_kept']:.1%} | {r['params'] / 1e6:.2f} | "
                     f"{r['params_kept']:.1%} | {r['latency_s'] * 1e3:.2f} | {r['latency_kept']:.1%} | "
                     f"{r['narrowest']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_set, val_set, num_classes = build_datasets(args.data, args.image_size, args.seed, args.train_samples,
                                                     args.val_samples)
    header = (f"{datetime.date.today()}, torch {torch.__version__}, device {device} "
              f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}, "
              f"{torch.get_num_threads()} threads), data {args.data or 'synthetic shapes'} {args.image_size} px, "
              f"{len(train_set)} train / {len(val_set)} val, batch {args.batch_size}, {args.optimizer} lr {args.lr}, "
              f"pretrain {args.pretrain_steps} steps, finetune {args.finetune_steps} steps, FLOPs target "
              f"{args.target_flops:.0%}, floor {args.floor}, latency batch "
              f"{args.latency_batch}")
    print(header, flush=True)
    rows = []
    for name in args.models:
        rows += bench_model(name, args, train_set, val_set, num_classes, device)
    text = table(rows)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(header + "\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
