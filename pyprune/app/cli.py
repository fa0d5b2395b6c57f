"""``pyprune`` command line: ``pyprune prune`` (the main job) and ``pyprune bench`` (benchmarks).

``pyprune prune`` with no options trains pyprune's small ResNet on its built-in synthetic shapes dataset, prunes
it to half its channels in four steps, finetunes, exports, reloads and verifies: a few minutes on 2 CPU cores.
Run it under ``torchrun --nproc_per_node N -m pyprune prune ...`` for DistributedDataParallel training.
"""
import argparse
import math
import os
import sys
import traceback
from typing import List, Optional, Sequence

UNIT_TYPES = {"l1": "L1MutableChannelUnit", "l2": "L2MutableChannelUnit", "taylor": "TaylorMutableChannelUnit",
              "bn_scale": "BNScaleMutableChannelUnit", "sequential": "SequentialMutableChannelUnit",
              "activation": "ActivationMutableChannelUnit"}


class OneLineArgumentParser(argparse.ArgumentParser):
    """Bad arguments -> one line on stderr (``pyprune prune: error: ...``) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def kept_ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"the kept ratio must be in (0, 1], got {text}")
    return value


def budget_value(text: str) -> float:
    """A --target-flops / --target-params value: a fraction in (0, 1] of the full model or an absolute count."""
    from ..budget import Budget, BudgetError
    try:
        return Budget(flops=text).flops
    except BudgetError as error:
        reason = str(error).replace("budget flops: ", "").replace("budget flops ", "it ")
        raise argparse.ArgumentTypeError(reason) from None


def floor_value(text: str):
    """A --floor value: ``auto`` or a kept fraction in (0, 1]."""
    return text if text == "auto" else kept_ratio(text)


def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _unit_type(text: str) -> str:
    if text in UNIT_TYPES:
        return UNIT_TYPES[text]
    if text in UNIT_TYPES.values():
        return text
    raise argparse.ArgumentTypeError(f"unknown unit type {text!r}; choose from {', '.join(UNIT_TYPES)}")


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pyprune prune``; their defaults that depend on other options are filled, and the whole set
    checked, by :class:`pyprune.app.training.config.JobConfig`."""
    from .training.config import DEFAULT_MODEL
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"'{DEFAULT_MODEL}' (built in), 'tiny-llama' (a small Llama trained on the Python "
                             "standard library's source, scored by perplexity) or a torchvision classification "
                             "model name, e.g. resnet18 (random init, never downloads weights)")
    parser.add_argument("--data", default=None,
                        help="ImageFolder root (with train/ and val/, or one folder per class, split 90/10); "
                             "default: pyprune's synthetic shapes dataset")
    parser.add_argument("--target-ratio", type=kept_ratio, default=None,
                        help="fraction of the channels every prunable unit keeps at the end (0, 1] (default 0.5)")
    parser.add_argument("--target-flops", type=budget_value, default=None, metavar="F",
                        help="instead of --target-ratio: prune to this fraction (0, 1] of the full model's FLOPs, or "
                             "to an absolute FLOPs count, taking channels where importance per FLOP is lowest "
                             "(docs/BUDGETS.md)")
    parser.add_argument("--target-params", type=budget_value, default=None, metavar="P",
                        help="instead of --target-ratio: a fraction (0, 1] of the full model's parameters or a count")
    parser.add_argument("--target-latency", type=kept_ratio, default=None, metavar="L",
                        help="instead of --target-ratio: a fraction (0, 1] of the full model's latency, measured on "
                             "the training device at each pruning step")
    parser.add_argument("--allocation", choices=("global", "uniform"), default=None,
                        help="how a --target-flops / --target-params / --target-latency budget is spread over the "
                             "units: uniform (one ratio for all, the default: global did not beat it in "
                             "benchmarks/RESULTS.md, 'Pruning algorithms at 50 %% FLOPs') or global (by importance "
                             "per cost; see docs/BUDGETS.md)")
    parser.add_argument("--floor", type=floor_value, default=None,
                        help="the fewest channels a unit keeps under a budget: auto (the default: a quarter of its "
                             "channels under global allocation, or half of its uniform count when less; none under "
                             "uniform) or a fraction (0, 1] of every unit's channels")
    parser.add_argument("--prune-times", type=int_at_least(1), default=None, help="pruning steps (default 4)")
    parser.add_argument("--step-freq", type=int_at_least(1), default=None,
                        help="training iterations between pruning steps (default: one epoch)")
    parser.add_argument("--unit-type", type=_unit_type, default=None,
                        help=f"channel importance: {', '.join(UNIT_TYPES)} (default l1; group-fisher has its own)")
    parser.add_argument("--calibration-batches", type=int_at_least(1), default=None, metavar="N",
                        help="--unit-type activation: training batches whose layer outputs score the channels before "
                             "each pruning step (default 8)")
    parser.add_argument("--algorithm", choices=("ite", "group-fisher"), default="ite",
                        help="ite: --prune-times pruning steps of --step-freq iterations to the target (default); "
                             "group-fisher: one channel, the globally least important by cost-normalised Fisher "
                             "information, every --gf-interval iterations until the --target-flops / "
                             "--target-params budget is met (default --target-flops 0.5), then finetuning")
    parser.add_argument("--gf-interval", type=int_at_least(1), default=None, metavar="N",
                        help="group-fisher: training iterations between two channel removals (default 10)")
    parser.add_argument("--gf-normalization", choices=("flops", "act"), default=None,
                        help="group-fisher: divide each channel's Fisher information by the FLOPs it saves or by "
                             "the size of its output activations (default act, as mmrazor's configs)")
    parser.add_argument("--gf-mutate-linear", action="store_true",
                        help="group-fisher: also prune channels that feed a linear layer (e.g. the classifier)")
    parser.add_argument("--epochs", type=int_at_least(0), default=None, help="training epochs before pruning")
    parser.add_argument("--finetune-epochs", type=int_at_least(0), default=None,
                        help="finetuning epochs after the last pruning step")
    parser.add_argument("--lr", type=_positive_float, default=None,
                        help="pretraining learning rate (default 0.1 with SGD; 3e-3 with AdamW for a language "
                             "model)")
    parser.add_argument("--weight-decay", type=_positive_float, default=5e-4)
    parser.add_argument("--batch-size", type=int_at_least(1), default=None, help="per-rank batch size")
    parser.add_argument("--image-size", type=int_at_least(8), default=None,
                        help="input resolution (default 32 on synthetic data, 224 with --data)")
    parser.add_argument("--train-samples", type=int_at_least(1), default=None,
                        help="synthetic train images (default 5000)")
    parser.add_argument("--val-samples", type=int_at_least(1), default=None,
                        help="synthetic val images (default 1000)")
    parser.add_argument("--workers", type=int_at_least(0), default=0, help="data loader worker processes")
    parser.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda or cuda:N")
    parser.add_argument("--output-dir", default="pyprune_output",
                        help="where the results go (created); one run at a time (a second run into it is refused)"
                             ", and a directory that holds a run, finished or not, is refused unless --resume "
                             "continues it or --overwrite replaces it")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an OUTPUT_DIR that holds an earlier run; its files are kept until this "
                             "run replaces them, but its summary.json goes when this run starts training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                        help="continue a stopped run (default: OUTPUT_DIR/checkpoint.pt); a checkpoint that cannot "
                             "be loaded or was made with other options changes no file")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="CPU threads per process (default: OMP_NUM_THREADS if set, else the usable cores divided "
                             "by the processes torchrun starts on this machine)")
    parser.add_argument("--max-iterations", type=int_at_least(1), default=None,
                        help="stop after this many iterations (checkpoint written; continue with --resume)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke run (16x16 images, 256 samples, few steps): seconds, for tests")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-compact", action="store_true",
                        help="train pruned layers in gather mode (full-size weights, gradients and momentum) instead "
                             "of compact training mode between pruning steps and while finetuning")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay each training step from a CUDA graph captured per subnet (pyprune.graphs); "
                             "needs a CUDA device, one process and --no-compact; pruning-phase steps of units that "
                             "learn importance from gradients (taylor) stay eager")
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                        help="train under torch.autocast in this dtype (fp16 with a GradScaler, CUDA only; bf16 on "
                             "CPU or CUDA); pruned layers gather their compact weights straight into it")
    parser.add_argument("--channels-last", action="store_true",
                        help="model and training batches in channels_last memory format (pruned convs gather "
                             "channels_last compact weights)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="pyprune", description="Structured channel pruning for PyTorch.")
    commands = parser.add_subparsers(dest="command", metavar="{prune,bench}", parser_class=OneLineArgumentParser)
    prune = commands.add_parser("prune", help="train -> iterative pruning -> finetune -> export -> verify",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prune_arguments(prune)
    commands.add_parser("bench", help="benchmarks (pyprune bench --help)", add_help=False)
    return parser


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    if len(text) > 1 and "Original Traceback" in text[1]:
        # A DataLoader worker's exception: the message is the worker's traceback; its last line says what failed.
        text = [text[-1].split(": ", 1)[-1]]
    return f"{type(error).__name__}: {text[0] if text else ''}" if not isinstance(error, ValueError) \
        else (text[0] if text else type(error).__name__)


def prune_main(argv: Sequence[str]) -> int:
    from .training.config import JobConfig
    parser = build_parser()
    args = parser.parse_args(["prune", *argv])
    try:
        config = JobConfig.from_arguments(args, ["prune", *argv])
    except ValueError as error:
        print(f"pyprune prune: error: {_one_line(error)}", file=sys.stderr)
        return 2
    from .training.job import run_prune_job
    from .training.run_dir import RunDirectoryError
    try:
        run_prune_job(config)
    except RunDirectoryError as error:  # refused before anything was written: a usage error
        print(f"pyprune prune: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyprune prune: interrupted (continue with --resume)", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the command line reports any failure as one line
        if os.environ.get("PYPRUNE_DEBUG"):
            traceback.print_exc()
        print(f"pyprune prune: error: {_one_line(error)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pyprune`` console script and of ``python -m pyprune``."""
    argv: List[str] = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench import main as bench_main  # imported lazily: the benchmarks pull in more
        return bench_main(argv[1:])
    if argv and argv[0] == "prune":
        return prune_main(argv[1:])
    parser = build_parser()
    if argv and argv[0] in ("-h", "--help"):
        parser.print_help(sys.stdout)
        return 0
    parser.print_help(sys.stderr if argv else sys.stdout)
    if argv:
        print(f"pyprune: error: unknown command {argv[0]!r}; use 'prune' or 'bench'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
