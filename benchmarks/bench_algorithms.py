"""Pruning algorithms side by side at one FLOPs budget: top-1 after the same training budget, FLOPs kept on the
exported model, wall time, over several seeds.

    .venv/bin/python benchmarks/bench_algorithms.py --datasets shapes --models resnet18   # one (data, model)
    .venv/bin/python benchmarks/bench_algorithms.py --quick            # smoke test: one tiny run per method
    .venv/bin/python benchmarks/bench_algorithms.py --methods uniform-l1 group-fisher --seeds 0 --models resnet18

Per data set (``shapes``: the built-in synthetic shapes, 10 classes; ``hard``: 20 classes, every shape in two
adjacent size bands, stronger noise), model and seed: the full model is trained ``--pretrain-steps`` steps (so
importance means something), then every method starts from a copy of it and gets the same ``--prune-steps +
--finetune-steps`` training iterations (same optimiser, schedule and batches) before top-1 is measured on the
exported model:

* ``uniform-l1``, ``global-l1``, ``global-taylor``: one-shot ``prune_to_budget`` (Taylor importance is accumulated
  over the first ``--prune-steps`` batches without updating the weights, then the weights train for all
  ``--prune-steps + --finetune-steps``); the global ones use ``--global-floor`` (default the planner's ``'auto'``)
  and the planner's default normalisation (Taylor raw, L1 per unit mean).
* ``group-fisher``: ``GroupFisherAlgorithm`` trains ``--prune-steps`` iterations, pruning as it goes
  (``--gf-channels`` channels per iteration, each the globally least Fisher-per-FLOP one, the Fisher information
  of that iteration kept for all of them) until the budget is met, then the export finetunes.
* ``dmcp``: ``DMCP`` trains weights and architecture parameters ``--prune-steps`` iterations (max / min / random
  subnets, the expected-FLOPs loss towards the target), then the expected subnet is exported and finetuned.
* ``dcff``: ``DCFF`` with the widths of the uniform 50 % FLOPs plan, ``--prune-steps`` iterations of fused-filter
  training with the temperature rising, then the fused export finetunes.

The defaults (32 px, 2048 train / 500 val images, batch 32, 200 pretraining steps at AdamW 3e-3) are the smallest
setting found in which the unpruned models learn the shapes well above chance on one CPU thread; the full model is
pretrained once per seed and every method starts from it.

Columns: top-1 (mean and spread = max - min over seeds), FLOPs kept on the exported model (``count_flops``, the
smallest and largest over the seeds), whether every seed met the target and was within one step of it (the
allocation's granularity, GroupFisher's last channel; DMCP aims at an expected cost: "-"), the narrowest unit's
kept fraction, and wall seconds per run (pruning phase + finetuning). A CSV and a markdown table (with device,
torch version and date) are rewritten after every run, so a cut run keeps what it measured.
"""
import argparse
import copy
import csv
import datetime
import math
import platform
import statistics
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pyprune.algorithms import DCFF, DMCP, GroupFisherAlgorithm
from pyprune.app.data import make_train_loader
from pyprune.app.data.synthetic import hard_synthetic_splits, synthetic_splits
from pyprune.app.training.loop import cosine_lr, evaluate, set_lr
from pyprune.app.training.models import build_model
from pyprune.budget import BudgetPlanner, prune_to_budget
from pyprune.mutators import ChannelMutator, GroupFisherChannelMutator, count_flops

METHODS = ("uniform-l1", "global-l1", "global-taylor", "group-fisher", "dmcp", "dcff")
DATASETS = {"shapes": synthetic_splits, "hard": hard_synthetic_splits}
COLUMNS = ("dataset", "model", "method", "top1_mean", "top1_spread", "flops_kept_max", "flops_kept_min", "target_met",
           "within_step", "narrowest_min", "wall_s_mean", "seeds")
RUN_COLUMNS = ("dataset", "model", "seed", "method", "top1", "full_top1", "flops_kept", "narrowest", "wall_s", "step")
FINETUNE_LR_FRACTION = 0.25


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["shapes", "hard"])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--target-flops", type=float, default=0.5)
    parser.add_argument("--global-floor", type=floor_arg, default="auto",
                        help="floor of every unit under global allocation: 'auto' (the planner's default: a quarter "
                             "of the unit's channels, or half its uniform count when less) or a kept fraction")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--train-samples", type=int, default=2048)
    parser.add_argument("--val-samples", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--prune-steps", type=int, default=8, help="iterations of the pruning phase")
    parser.add_argument("--finetune-steps", type=int, default=16)
    parser.add_argument("--gf-channels", type=int, default=0,
                        help="GroupFisher channels pruned per iteration (0: enough to reach the budget in about "
                             "half of --prune-steps)")
    parser.add_argument("--lr", type=float, default=3e-3, help=f"AdamW learning rate of pretraining; the pruning "
                                                                f"phase and finetuning use {FINETUNE_LR_FRACTION} of it")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--csv", default="bench_algorithms.csv")
    parser.add_argument("--markdown", default="bench_algorithms.md")
    parser.add_argument("--runs-csv", default="bench_algorithms_runs.csv", help="one row per run (seed)")
    parser.add_argument("--merge", nargs="+", metavar="RUNS_CSV", default=None,
                        help="run nothing: summarise the --runs-csv files of runs made apart (e.g. one process per "
                             "seed) into --csv / --markdown")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 16 px, 64 images, a few steps, one seed (override with the options above)")
    args = parser.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        quick = {"--datasets": ("datasets", ["shapes"]), "--models": ("models", ["resnet18"]),
                 "--seeds": ("seeds", [0]), "--image-size": ("image_size", 16), "--train-samples": ("train_samples", 64),
                 "--val-samples": ("val_samples", 32), "--batch-size": ("batch_size", 16),
                 "--pretrain-steps": ("pretrain_steps", 2), "--prune-steps": ("prune_steps", 3),
                 "--finetune-steps": ("finetune_steps", 2)}
        for flag, (key, value) in quick.items():
            if flag not in given:
                setattr(args, key, value)
    return args


def floor_arg(text: str):
    return text if text == "auto" else float(text)


# ------------------------------------------------------------------------------------------------------ training
class Batches:
    """An endless stream of ``(images, labels)`` from ``loader``, restarted as often as needed: the loader's order
    is fixed by its seed, so every method sees the same batches."""

    def __init__(self, loader, device):
        self.loader, self.device, self.it = loader, device, iter(())

    def __next__(self):
        try:
            images, labels = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            images, labels = next(self.it)
        return images.to(self.device), labels.to(self.device)


def sgd_step(model, optimizer, images, labels, lr, after_backward=None) -> None:
    set_lr(optimizer, lr)
    loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    if after_backward is not None:
        after_backward()
    optimizer.step()


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0, weight_decay=1e-4)


def train_plain(model, batches, steps, lr, desc, offset=0, total=None) -> None:
    """``steps`` AdamW steps on the cosine schedule of a ``total``-step run, starting at position ``offset``."""
    optimizer = adamw(model)
    total = steps if total is None else total
    for step in tqdm(range(steps), desc=desc, leave=False, file=sys.stdout):
        images, labels = next(batches)
        sgd_step(model, optimizer, images, labels, cosine_lr(lr, offset + step, total))


# ------------------------------------------------------------------------------------------------------- methods
def demo(args):
    return (1, 3, args.image_size, args.image_size)


def one_shot(full, args, batches, allocation, unit_type):
    """Prune a copy of ``full`` with ``prune_to_budget``; Taylor importance from ``--prune-steps`` batches."""
    model = copy.deepcopy(full)
    mutator = ChannelMutator(unit_type, parse_cfg=dict(demo_input=demo(args)))
    mutator.prepare_from_supernet(model)
    if unit_type == "TaylorMutableChannelUnit":
        for _ in range(args.prune_steps):  # gradients only: the weights are those of the pretrained model
            images, labels = next(batches)
            model.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            for unit in mutator.mutable_units:
                unit.update_importance()
        model.zero_grad()
    floor = args.global_floor if allocation == "global" else None
    result = prune_to_budget(model, mutator, flops=args.target_flops, allocation=allocation, floor=floor)
    narrowest = min(u.active_channels / u.num_channels for u in mutator.mutable_units)
    small = mutator.export(model)
    steps = args.prune_steps + args.finetune_steps
    train_plain(small, batches, steps, args.lr * FINETUNE_LR_FRACTION, f"{allocation} finetune")
    return small, narrowest, result.granularity["flops"] / result.full.flops


def group_fisher(full, args, batches):
    model = copy.deepcopy(full)
    mutator = GroupFisherChannelMutator(channel_unit_cfg=dict(type="GroupFisherChannelUnit", default_args=dict(
        normalization_type="flops")), parse_cfg=dict(demo_input=demo(args)))
    algorithm = GroupFisherAlgorithm(model, mutator, interval=1, budget={"flops": args.target_flops})
    per_iteration = args.gf_channels or max(1, math.ceil(
        0.35 * sum(u.num_channels for u in mutator.mutable_units) / max(1, args.prune_steps // 2)))
    optimizer = adamw(algorithm.model)
    lr, total = args.lr * FINETUNE_LR_FRACTION, args.prune_steps + args.finetune_steps
    for step in tqdm(range(args.prune_steps), desc="group-fisher", leave=False, file=sys.stdout):
        images, labels = next(batches)
        sgd_step(algorithm.model, optimizer, images, labels, cosine_lr(lr, step, total), algorithm.after_backward)
        prune_many(algorithm, per_iteration)
        if algorithm.done:
            break
    while not algorithm.done:  # the budget must be met: more Fisher batches without weight updates
        images, labels = next(batches)
        algorithm.model.zero_grad()
        F.cross_entropy(algorithm.model(images), labels).backward()
        algorithm.after_backward()
        prune_many(algorithm, per_iteration)
    algorithm.mutator.end_record_info()
    narrowest = min(u.active_channels / u.num_channels for u in mutator.mutable_units)
    small = algorithm.export()
    train_plain(small, batches, total - args.prune_steps, lr, "group-fisher finetune", args.prune_steps, total)
    return small, narrowest, last_channel_step(algorithm)


def last_channel_step(algorithm) -> float:
    """The FLOPs fraction GroupFisher's last pruned channel removed: the model before it missed the budget, so the
    export is within this of the target."""
    flops = [algorithm.full_cost.flops] + [entry["flops"] for entry in algorithm.history]
    return (flops[-2] - flops[-1]) / algorithm.full_cost.flops if len(flops) > 1 else 0.0


def prune_many(algorithm, count: int) -> None:
    """``count`` GroupFisher pruning steps on this iteration's Fisher information: the accumulated information is
    restored after each step (the algorithm resets it), so every step ranks by the same batches."""
    saved = {u.name: u.normalized_fisher_info for u in algorithm.mutator.mutable_units}
    for _ in range(count):
        if algorithm.done:
            return
        for unit in algorithm.mutator.mutable_units:
            if saved[unit.name] is not None:
                unit.normalized_fisher_info, unit.num_updates = saved[unit.name].clone(), 1
        algorithm.prune_step()


def dmcp(full, args, batches):
    model = copy.deepcopy(full)
    full_flops = count_flops(model, (torch.randn(demo(args)),))
    target_mmacs = args.target_flops * full_flops / 2 / 1e6  # DMCP counts millions of multiply-adds
    algorithm = DMCP(model, mutator_cfg=dict(type="DMCPChannelMutator", parse_cfg=dict(demo_input=demo(args))),
                     target_flops=target_mmacs, arch_start_train=max(0, args.prune_steps // 4), arch_train_freq=1,
                     strategy=["max", "min", "arch_random"], flop_loss_weight=1.0, seed=0)
    lr, total = args.lr * FINETUNE_LR_FRACTION, args.prune_steps + args.finetune_steps
    weights = adamw(algorithm.model)
    optim = {"architecture": weights,
             "mutator": torch.optim.Adam(algorithm.arch_parameters(), lr=0.05, weight_decay=1e-3)}

    def loss_fn(net, batch):
        return F.cross_entropy(net(batch[0]), batch[1])

    for step in tqdm(range(args.prune_steps), desc="dmcp", leave=False, file=sys.stdout):
        set_lr(weights, cosine_lr(lr, step, total))
        algorithm.train_step(next(batches), loss_fn, optim)
    algorithm.derive_subnet()
    narrowest = min(u.active_channels / u.num_channels for u in algorithm.mutator.mutable_units)
    small = algorithm.export()
    train_plain(small, batches, total - args.prune_steps, lr, "dmcp finetune", args.prune_steps, total)
    return small, narrowest, math.nan  # DMCP aims at the expected FLOPs, not at the budget within a step


def dcff(full, args, batches):
    planner_model = copy.deepcopy(full)
    planner_mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=demo(args)))
    planner_mutator.prepare_from_supernet(planner_model)
    planner = BudgetPlanner(planner_model, planner_mutator, allocation="uniform")
    plan = planner.plan({"flops": args.target_flops})
    model = copy.deepcopy(full)
    steps = max(2, args.prune_steps)
    algorithm = DCFF(model, dict(type="DCFFChannelMutator", parse_cfg=dict(demo_input=demo(args))),
                     target_pruning_ratio=dict(plan.counts), step_freq=0, prune_times=max(1, min(4, steps - 1)),
                     max_iters=steps, strict=True)
    lr, total = args.lr * FINETUNE_LR_FRACTION, args.prune_steps + args.finetune_steps
    optimizer = adamw(algorithm.model)
    for step in tqdm(range(steps), desc="dcff", leave=False, file=sys.stdout):
        images, labels = next(batches)
        sgd_step(algorithm.model, optimizer, images, labels, cosine_lr(lr, step, total))
        algorithm.step()
    narrowest = min(u.active_channels / u.num_channels for u in algorithm.mutator.mutable_units)
    small = algorithm.export()
    train_plain(small, batches, total - steps, lr, "dcff finetune", steps, total)
    return small, narrowest, plan.granularity["flops"] / planner.full.flops  # the widths of the uniform plan


def run_method(method, full, args, batches):
    if method == "uniform-l1":
        return one_shot(full, args, batches, "uniform", "L1MutableChannelUnit")
    if method == "global-l1":
        return one_shot(full, args, batches, "global", "L1MutableChannelUnit")
    if method == "global-taylor":
        return one_shot(full, args, batches, "global", "TaylorMutableChannelUnit")
    return {"group-fisher": group_fisher, "dmcp": dmcp, "dcff": dcff}[method](full, args, batches)


# ---------------------------------------------------------------------------------------------------- the run
def bench(args, on_run=None) -> List[Dict]:
    """One row per (dataset, model, seed, method) run; ``on_run(runs)`` after each (to write partial tables)."""
    device = torch.device(args.device)
    x = torch.randn(demo(args), device=device)
    runs = []
    for dataset in args.datasets:
        for name in args.models:
            for seed in args.seeds:
                train_set, val_set = DATASETS[dataset](args.train_samples, args.val_samples, args.image_size, seed)
                torch.manual_seed(seed)
                full = build_model(name, train_set.num_classes).to(device)
                loader = make_train_loader(train_set, args.batch_size, seed)
                train_plain(full, Batches(loader, device), args.pretrain_steps, args.lr, f"{dataset} {name} pretrain")
                full_top1 = evaluate(full, val_set, 128, device)
                full_flops = count_flops(full, (x,))
                print(f"{dataset} {name} seed {seed}: full model top-1 {full_top1:.3f}", flush=True)
                for method in args.methods:
                    torch.manual_seed(seed)
                    batches = Batches(make_train_loader(train_set, args.batch_size, seed + 1000), device)
                    started = time.perf_counter()
                    small, narrowest, step = run_method(method, full, args, batches)
                    wall = time.perf_counter() - started
                    row = dict(dataset=dataset, model=name, seed=seed, method=method,
                               top1=evaluate(small, val_set, 128, device), full_top1=full_top1,
                               flops_kept=count_flops(small, (x,)) / full_flops, narrowest=narrowest, wall_s=wall,
                               step=step)
                    print(f"  {method:14} top-1 {row['top1']:.3f}  FLOPs kept {row['flops_kept']:.2%} (step "
                          f"{step:.2%})  narrowest {narrowest:.1%}  {wall:.1f} s", flush=True)
                    runs.append(row)
                    if on_run is not None:
                        on_run(runs)
    return runs


def summarise(runs: List[Dict], target: float) -> List[Dict]:
    """Per (dataset, model, method): mean and spread (max - min) of top-1 over the seeds, the largest and smallest
    FLOPs kept, whether every seed met the target, whether every seed's export is within one step (the method's last
    channel / allocation step; None for DMCP, which aims at an expected cost) below it, the narrowest unit and the
    mean wall time."""
    groups: Dict[tuple, List[Dict]] = {}
    for row in runs:
        groups.setdefault((row["dataset"], row["model"], row["method"]), []).append(row)
    rows = []
    for (dataset, model, method), group in groups.items():
        top1 = [r["top1"] for r in group]
        flops = [r["flops_kept"] for r in group]
        steps = [r["step"] for r in group]
        within = None if any(math.isnan(s) for s in steps) else \
            all(target - r["flops_kept"] <= r["step"] + 1e-9 for r in group)
        rows.append(dict(dataset=dataset, model=model, method=method, top1_mean=statistics.fmean(top1),
                         top1_spread=max(top1) - min(top1), flops_kept_max=max(flops), flops_kept_min=min(flops),
                         target_met=all(f <= target + 1e-9 for f in flops), within_step=within,
                         narrowest_min=min(r["narrowest"] for r in group),
                         wall_s_mean=statistics.fmean(r["wall_s"] for r in group), seeds=len(group),
                         full_top1=statistics.fmean(r["full_top1"] for r in group)))
    return rows


def markdown(rows: List[Dict], header: str) -> str:
    lines = [header, "", "| data | model | method | top-1 mean | spread | full model | FLOPs kept (min-max) | target met "
             "| within one step | narrowest unit | wall s / run |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        within = "-" if r["within_step"] is None else ("yes" if r["within_step"] else "no")
        lines.append(f"| {r['dataset']} | {r['model']} | {r['method']} | {r['top1_mean']:.3f} | "
                     f"{r['top1_spread']:.3f} | {r['full_top1']:.3f} | {r['flops_kept_min']:.1%}-"
                     f"{r['flops_kept_max']:.1%} | {'yes' if r['target_met'] else 'no'} | {within} | "
                     f"{r['narrowest_min']:.1%} | {r['wall_s_mean']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        print(write_tables(args, read_runs(args.merge), f"merged from {', '.join(args.merge)}"))
        return 0
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    header = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, device "
              f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}"
              f", {torch.get_num_threads()} threads); data {'/'.join(args.datasets)} {args.image_size} px, "
              f"{args.train_samples} train / {args.val_samples} val images, batch {args.batch_size}, AdamW lr "
              f"{args.lr} (x{FINETUNE_LR_FRACTION} after pretraining), pretrain {args.pretrain_steps} steps, then "
              f"{args.prune_steps} pruning-phase + {args.finetune_steps} finetune steps per method; FLOPs target "
              f"{args.target_flops:.0%}, global floor {args.global_floor}; seeds {args.seeds}")
    print(header, flush=True)
    started = time.perf_counter()

    def write(runs, final=False):
        with open(args.runs_csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=RUN_COLUMNS)
            writer.writeheader()
            writer.writerows(runs)
        return write_tables(args, runs, header + f"; {'total' if final else 'so far'} "
                                                f"{time.perf_counter() - started:.0f} s")

    print(write(bench(args, on_run=write), final=True))  # partial tables after every run: a long run can be cut
    return 0


def write_tables(args, runs, header: str) -> str:
    """The summary CSV and markdown table of ``runs``; returns the markdown."""
    text = markdown(summarise(runs, args.target_flops), header)
    with open(args.csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS) + ["full_top1"])
        writer.writeheader()
        writer.writerows(summarise(runs, args.target_flops))
    with open(args.markdown, "w") as handle:
        handle.write(text)
    return text


def read_runs(paths) -> List[Dict]:
    """The runs of ``--runs-csv`` files (seeds run in separate processes)."""
    runs = []
    for path in paths:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                runs.append({k: (v if k in ("dataset", "model", "method") else float(v)) for k, v in row.items()})
    return runs


if __name__ == "__main__":
    sys.exit(main())
