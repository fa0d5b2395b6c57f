"""``pyprune bench {ops,models,sweep}``: argument parsing, progress bars and writing the outputs."""
import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..cli import OneLineArgumentParser, int_at_least, kept_ratio
from . import model_bench
from . import kernel_bench as op_bench
from . import sweep as sweep_bench
from .language_models import LANGUAGE_MODELS
from .tables import (format_header, format_table, plot_time_vs_ratio, run_header, write_csv, write_json)


def _progress_iter(iterable, desc: str):
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, leave=False, file=sys.stderr)


def _progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=desc, file=sys.stderr)
    return bar, bar.update


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("pyprune bench: --device cuda requested but no CUDA device is available")
    return device


def _model_name(text: str) -> str:
    """A model ``bench models`` can build: ``tiny``, a language model (``llama``) or a torchvision classifier."""
    import torchvision
    if text == "tiny" or text in LANGUAGE_MODELS or text in torchvision.models.list_models(module=torchvision.models):
        return text
    raise argparse.ArgumentTypeError(f"unknown model {text!r}: use tiny, {', '.join(LANGUAGE_MODELS)} or a "
                                     f"torchvision classification model name "
                                     f"(e.g. {', '.join(model_bench.MODEL_NAMES)})")


def _compile_backend(text: str) -> str:
    import torch._dynamo
    known = torch._dynamo.list_backends(exclude_tags=())
    if text not in known:
        raise argparse.ArgumentTypeError(f"unknown torch.compile backend {text!r}; choose from {', '.join(known)}")
    return text


def build_parser() -> argparse.ArgumentParser:
    """Bad arguments -> one line on stderr (``pyprune bench models: error: ...``) and exit status 2."""
    parser = OneLineArgumentParser(prog="pyprune bench", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True, parser_class=OneLineArgumentParser)
    for name, helptext in (("ops", "channel gather and single dynamic layers"),
                           ("models", "whole torchvision models at several channel ratios")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--quick", action="store_true", help="tiny sizes, 1-2 repetitions: runs in seconds")
        p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
        p.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for CSV / JSON / PNG")
        p.add_argument("--warmup", type=int_at_least(0), default=None, help="untimed calls before timing")
        p.add_argument("--reps", type=int_at_least(1), default=None,
                       help="timed repetitions (the median is reported)")
        p.add_argument("--threads", type=int_at_least(1), default=None, help="torch.set_num_threads on CPU")
        p.add_argument("--note", default="", help="free text stored in the header (e.g. 'machine shared')")
    sub.choices["ops"].add_argument("--parts", nargs="+", choices=("gather", "layers"), default=("gather", "layers"),
                                    help="which op benchmarks to run (default both)")
    m = sub.choices["models"]
    m.add_argument("--models", nargs="+", type=_model_name, default=None,
                   help=f"{', '.join(model_bench.MODEL_NAMES)}, tiny, {', '.join(LANGUAGE_MODELS)} (a Llama-style "
                        f"causal LM on token ids) or another torchvision classifier")
    m.add_argument("--batch-sizes", nargs="+", type=int_at_least(1), default=None)
    m.add_argument("--ratios", nargs="+", type=kept_ratio, default=None, help="kept ratios, each in (0, 1]")
    m.add_argument("--image-size", type=int_at_least(8), default=None)
    m.add_argument("--seq-len", type=int_at_least(2), default=None,
                   help="tokens per sequence of a language model (default 128; 16 with --quick)")
    m.add_argument("--backends", nargs="+", default=None,
                   choices=model_bench.BACKENDS + model_bench.GRAPH_BACKENDS + model_bench.OPTIONAL_BACKENDS,
                   help="default: all of BACKENDS, plus pyprune-graph / dense-graph on CUDA (pyprune-batched: only "
                        "when named)")
    m.add_argument("--compile-models", nargs="*", type=_model_name, default=None,
                   help="models that also run under torch.compile (default: resnet18+50 on CUDA, resnet18 on CPU)")
    m.add_argument("--compile-batch-sizes", nargs="*", type=int_at_least(1), default=None,
                   help="batch sizes that run under torch.compile (default 8; an empty list means all)")
    m.add_argument("--compile-ratios", nargs="*", type=kept_ratio, default=None,
                   help="ratios that run under torch.compile (default: 1.0 0.5 on CUDA, 0.5 on CPU; empty = all)")
    m.add_argument("--compile-backend", type=_compile_backend, default=None,
                   help="torch.compile backend (default inductor)")
    m.add_argument("--switch-subnets", type=int_at_least(1), default=None,
                   help="random subnets in the switch workload")
    m.add_argument("--clock", choices=model_bench.CLOCKS, default=None,
                   help="eval / train timing: wall (default) or thread (the CPU time of the one thread, --threads 1: "
                        "what other processes on a shared machine take is not counted)")
    s = sub.add_parser("sweep", help="coverage: every model of a zoo parsed, pruned, exported, compared")
    s.add_argument("--zoo", choices=sorted(sweep_bench.zoos.ZOOS), default="torchvision-classifiers",
                   help="torchvision-classifiers (default: the 80 classifiers), torchvision (every task: "
                        "detection, segmentation, video, optical flow too), timm (the smallest model of every module), "
                        "transformers (a small config of every HF family)")
    s.add_argument("--models", nargs="+", default=None, help="default: every model of the zoo")
    s.add_argument("--ratio", type=float, default=0.5, help="kept ratio of every unit (default 0.5)")
    s.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for CSV / JSON")
    s.add_argument("--note", default="", help="free text stored in the header")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``pyprune bench``; returns the process exit status (1 when any row of the run errored)."""
    args = build_parser().parse_args(argv)
    if args.what == "sweep":
        return _run_sweep(args)
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = _run_ops(args, device) if args.what == "ops" else _run_models(args, device)
    errored = [row for row in rows if str(row.get("status", "ok")).startswith("error")]
    if errored:
        print(f"pyprune bench {args.what}: error: {len(errored)} of {len(rows)} rows failed, the first with "
              f"{errored[0]['status']!r} (status column of the CSV in {args.out})", file=sys.stderr)
        return 1
    return 0


def _run_ops(args, device: torch.device) -> List[Dict[str, object]]:
    """Run, write and print the op benchmarks; returns every result row."""
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    reps = args.reps if args.reps is not None else (2 if args.quick else 10)
    header = run_header(device, benchmark="ops", quick=args.quick, warmup=warmup, reps=reps, note=args.note)
    results = op_bench.run(device, quick=args.quick, warmup=warmup, reps=reps, progress=_progress_iter,
                           parts=args.parts)
    paths = {
        "gather_csv": write_csv(args.out / "ops_gather.csv", results["gather"], op_bench.GATHER_COLUMNS),
        "layers_csv": write_csv(args.out / "ops_layers.csv", results["layers"], op_bench.LAYER_COLUMNS),
        "json": write_json(args.out / "ops.json", header, [dict(r, table=t) for t, rows in results.items()
                                                           for r in rows]),
    }
    plot = plot_time_vs_ratio(args.out / "ops_layers.png", results["layers"], panel_keys=("layer", "workload"),
                              line_key="variant", title=f"dynamic layers on {header['device']}")
    if plot:
        paths["png"] = plot
    print(format_header(header))
    print("\n## channel gather (random 50 % of each dim)\n")
    print(format_table(results["gather"], op_bench.GATHER_COLUMNS))
    print("\n## dynamic layers (vs_dense = time / exported dense layer)\n")
    print(format_table(results["layers"], op_bench.LAYER_COLUMNS))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return [row for table in results.values() for row in table]


def _models_config(args, device: torch.device) -> model_bench.ModelBenchConfig:
    cfg = model_bench.quick_config(device) if args.quick else model_bench.default_config(device)
    overrides = {"models": args.models, "batch_sizes": args.batch_sizes, "ratios": args.ratios,
                 "image_size": args.image_size, "seq_len": args.seq_len, "warmup": args.warmup, "reps": args.reps,
                 "backends": args.backends, "compile_backend": args.compile_backend, "switch_subnets": args.switch_subnets, "clock": args.clock}
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    # For the three "where to compile" lists an explicit empty list means "everywhere".
    for key in ("compile_models", "compile_batch_sizes", "compile_ratios"):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg, key, value or None)
    try:
        model_bench.check_clock(cfg)
    except ValueError as error:
        build_parser().error(str(error))
    return cfg


def _run_models(args, device: torch.device) -> List[Dict[str, object]]:
    """Run, write and print the model benchmarks; returns the result rows."""
    cfg = _models_config(args, device)
    header = run_header(device, benchmark="models", quick=args.quick, image_size=cfg.image_size, seq_len=cfg.seq_len,
                        warmup=cfg.warmup, reps=cfg.reps, compile_backend=cfg.compile_backend,
                        compile_models=cfg.compile_models or "all",
                        compile_batch_sizes=cfg.compile_batch_sizes or "all",
                        compile_ratios=cfg.compile_ratios or "all", clock=cfg.clock, note=args.note)
    rows = model_bench.run(cfg, _progress_bar)
    targets = model_bench.evaluate_targets(rows)
    paths = {
        "csv": write_csv(args.out / "models.csv", rows, model_bench.MODEL_COLUMNS),
        "json": write_json(args.out / "models.json", header, rows + [dict(t, table="targets") for t in targets]),
    }
    plot = plot_time_vs_ratio(args.out / "models.png", rows, panel_keys=("model", "batch", "workload"),
                              line_key="backend", title=f"models on {header['device']} ({header['date']})")
    if plot:
        paths["png"] = plot
    print(format_header(header))
    print()
    print(format_table(rows, model_bench.MODEL_COLUMNS))
    print("\n## targets\n")
    print(format_table(targets, model_bench.TARGET_COLUMNS))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return rows


def _run_sweep(args) -> int:
    """One row per model; exit status 1 when any model failed."""
    if not 0.0 < args.ratio <= 1.0:
        raise SystemExit(f"pyprune bench sweep: --ratio must be in (0, 1], got {args.ratio}")
    names = args.models or sweep_bench.zoos.zoo_names(args.zoo)
    header = run_header(torch.device("cpu"), benchmark="sweep", zoo=args.zoo, ratio=args.ratio, note=args.note)
    rows = []
    for name in _progress_iter(names, "sweep"):
        rows.append(sweep_bench.sweep_model(name, args.ratio, args.zoo))
        write_csv(args.out / "sweep.csv", rows, sweep_bench.columns(args.zoo))  # a stopped sweep keeps its rows
    write_json(args.out / "sweep.json", header, rows)
    failed = [row for row in rows if row["status"] != "ok"]
    print(format_header(header))
    print()
    print(format_table(rows, sweep_bench.columns(args.zoo)))
    print(f"\n{len(rows) - len(failed)} of {len(rows)} models ok; wrote {args.out / 'sweep.csv'}")
    for row in failed:
        print(f"\n{row['model']}:\n{row['traceback']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
