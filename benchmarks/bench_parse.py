"""Parse time: how long the tracer takes to turn a model into units (torchvision ResNet-50, timm base-size models).

    .venv/bin/python benchmarks/bench_parse.py [--models NAME ...] [--reps 3] [--affordable 20]
                                               [--units-out units.json] [--profile DIR] [--in-process]

For each model (weights not pretrained, batch 1 at its ``pretrained_cfg`` input size): the time of
``pyprune.tracing.trace_channel_units`` alone, and of the whole ``ChannelMutator.prepare_from_supernet`` (trace +
units + DynamicOps + the narrow check's half-width forward), each the median of ``--reps`` runs after one untimed
warm-up (a warm-up over ``--affordable`` CPU seconds is the one run timed, marked "1st run"); the peak resident
memory of the process doing it. Times are wall and CPU (user + system) seconds of the one-thread run: the machine
may be shared, and the CPU time is what the wall time would be on an idle core. Each model runs in its own child
process (so its memory is handed back before the next one and the peak is its own), unless ``--in-process``.
One more trace computes every conv / linear layer (the tracer
before :mod:`pyprune.tracing.layer_shapes`; ``--no-computed`` leaves it out): its CPU time, and whether it finds the
same specs. ``--units-out`` writes every model's unit names, widths and mutability and a digest of the traced specs, to compare
a tracer change against (``--compare`` with a file written before).
Prints a markdown table with the device, versions, date and load average.
"""
import argparse
import contextlib
import copy
import cProfile
import gc
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

# One thread: the machine is shared, and the target is stated for one core's worth of work.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TORCHVISION_MODELS = ("resnet50",)
TIMM_MODELS = (
    "vit_base_patch16_224", "deit_base_patch16_224", "beit_base_patch16_224", "eva02_base_patch14_224.mim_in22k",
    "swin_base_patch4_window7_224", "convnext_base", "convnextv2_base", "efficientnet_b3", "regnety_032",
    "resnet50d", "resnest50d", "cspresnet50", "densenet161", "xcit_small_12_p16_224", "cait_s24_224",
    "coat_lite_small", "maxvit_base_tf_224", "mobilevitv2_200", "levit_384", "pvt_v2_b3", "twins_svt_base",
    "efficientvit_b3", "hiera_base_224", "fastvit_sa36", "tresnet_l", "inception_v4", "nfnet_f0", "volo_d2_224",
    "poolformer_m36", "mambaout_base", "ese_vovnet39b", "dpn92", "xception65",
)
TARGET_S = {"resnet50": 0.2}  # every other model: DEFAULT_TARGET_S
DEFAULT_TARGET_S = 2.0


def build(name: str):
    """(model, input) for a torchvision or timm model name; random init, eval mode, batch 1."""
    import torch
    if name in TORCHVISION_MODELS:
        import torchvision
        model = getattr(torchvision.models, name)(weights=None)
        size = (3, 224, 224)
    else:
        import timm
        model = timm.create_model(name, pretrained=False)
        size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    return model.eval(), torch.randn(1, *size)


class Clock:
    """Wall and CPU seconds of this process (user + system) since it started: on a shared machine the CPU time of a
    one-thread run is what its wall time would be on an idle core."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self):
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def timed(fn, reps: int, affordable: float):
    """(median wall s, median CPU s, runs timed after the warm-up, last result) of ``fn()`` after one warm-up run; a
    warm-up taking more than ``affordable`` CPU seconds is the only run (its times are reported, runs timed 0)."""
    clock = Clock()
    result = fn()
    first = clock.stop()
    if first[1] > affordable or reps < 1:
        return first[0], first[1], 0, result
    times = []
    for _ in range(reps):
        clock = Clock()
        result = fn()
        times.append(clock.stop())
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times), reps, result


@contextlib.contextmanager
def _layers_computed():
    """The tracer with no layer skipped (``pyprune.tracing.layer_shapes.skipped_output`` always None)."""
    from pyprune.tracing import record, shape_pass
    saved = record.skipped_output, shape_pass.skipped_output
    record.skipped_output = shape_pass.skipped_output = lambda module, args, kwargs: None
    try:
        yield
    finally:
        record.skipped_output, shape_pass.skipped_output = saved


def measure(name: str, reps: int, affordable: float, profile_dir: str = None, compare_computed: bool = True) -> dict:
    """One model's row: trace and prepare times, unit counts and names, peak RSS of this process; with
    ``compare_computed``, also one trace computing every layer (CPU time, and whether its specs are the same)."""
    import torch
    from pyprune import ChannelMutator, L1MutableChannelUnit
    from pyprune.tracing import trace_channel_units

    torch.manual_seed(0)
    model, x = build(name)
    params = sum(p.numel() for p in model.parameters())

    def trace():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return trace_channel_units(model, x)

    def prepare():
        fresh = copy.deepcopy(model)  # prepare_from_supernet converts the model in place
        mutator = ChannelMutator(channel_unit_cfg=L1MutableChannelUnit, parse_cfg=dict(demo_input=x))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clock = Clock()
            mutator.prepare_from_supernet(fresh)
            seconds = clock.stop()
        units = [(u.name, u.num_channels, bool(u.is_mutable)) for u in mutator.units]
        del fresh, mutator
        return seconds, units

    if profile_dir:
        os.makedirs(profile_dir, exist_ok=True)
        safe = name.replace("/", "_")
        cProfile.runctx("trace()", globals(), {"trace": trace}, os.path.join(profile_dir, f"{safe}.trace.prof"))
        cProfile.runctx("prepare()", globals(), {"prepare": prepare},
                        os.path.join(profile_dir, f"{safe}.prepare.prof"))
    trace_s, trace_cpu_s, trace_reps, specs = timed(trace, reps, affordable)
    computed = None
    if compare_computed:  # the tracer as it was: every conv / linear layer computed in the shape pass / recording
        with _layers_computed():
            computed_s, computed_cpu_s, _, computed = timed(trace, 0, affordable)
    # prepare's own clock excludes the deepcopy of the model
    first_seconds, units = prepare()
    prepare_times = [first_seconds]
    if first_seconds[1] <= affordable:
        prepare_times = []
        for _ in range(reps):
            seconds, units = prepare()
            prepare_times.append(seconds)
    row = {
        "model": name, "input": list(x.shape[1:]), "params_M": round(params / 1e6, 1),
        "trace_s": round(trace_s, 3), "trace_cpu_s": round(trace_cpu_s, 3), "trace_reps": trace_reps,
        "prepare_s": round(statistics.median(t[0] for t in prepare_times), 3),
        "prepare_cpu_s": round(statistics.median(t[1] for t in prepare_times), 3), "prepare_reps": len(prepare_times) - (first_seconds[1] > affordable),
        "specs": len(specs), "units": len(units), "mutable": sum(m for _, _, m in units),
        "unit_list": units, "specs_sha1": hashlib.sha1(repr(specs).encode()).hexdigest(),
        "computed_cpu_s": None if computed is None else round(computed_cpu_s, 3),
        "same_as_computed": None if computed is None else repr(computed) == repr(specs),
        "peak_rss_MB": round(_peak_rss_mb(), 0),
    }
    del model, x, specs
    gc.collect()
    return row


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return peak / 1024 if platform.system() == "Linux" else peak / 2 ** 20


def _run_child(name: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", name, "--reps", str(args.reps),
               "--affordable", str(args.affordable)]
    if args.profile:
        command += ["--profile", args.profile]
    if args.no_computed:
        command += ["--no-computed"]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"model": name, "error": tail[:200]}
    return json.loads(lines[-1])


def _header(args, started: str) -> list:
    import torch
    import torchvision
    import timm
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = "?"
    return [
        f"# device: CPU ({platform.machine()}), {os.cpu_count()} cores, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS')}   torch {torch.__version__}   torchvision {torchvision.__version__}   "
        f"timm {timm.__version__}",
        f"# date: {started} UTC, commit {commit}, {args.jobs} model(s) at a time; batch 1 at each model's pretrained_cfg input size, weights not "
        f"pretrained; median of {args.reps} after one warm-up (a warm-up over {args.affordable:g} CPU s: the one run)",
    ]


def table(rows) -> list:
    """The markdown table; the target is judged on the trace's CPU time (its wall time on an idle core)."""
    lines = ["| model | input | params (M) | units (mutable / all) | trace CPU (s) | trace wall (s) | "
             "prepare CPU (s) | prepare wall (s) | peak RSS (MB) | trace target | every layer computed: CPU (s), "
             "same specs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | failed: {row['error']} | | | | | | | | | |")
            continue
        computed = "" if row.get("computed_cpu_s") is None else \
            f"{row['computed_cpu_s']:.2f}, {'yes' if row['same_as_computed'] else '**no**'}"
        target = TARGET_S.get(row["model"], DEFAULT_TARGET_S)
        ok = f"< {target:g} s" if row["trace_cpu_s"] < target else f"**over {target:g} s**"
        reps = "" if row["trace_reps"] else " (1st run)"
        size = "x".join(str(d) for d in row["input"][1:])
        lines.append(f"| {row['model']} | {size} | {row['params_M']} | {row['mutable']} / {row['units']} | "
                     f"{row['trace_cpu_s']:.2f}{reps} | {row['trace_s']:.2f} | {row['prepare_cpu_s']:.2f} | "
                     f"{row['prepare_s']:.2f} | {row['peak_rss_MB']:.0f} | {ok} | {computed} |")
    return lines


def _write_units(rows, path: str) -> None:
    with open(path, "w") as handle:
        json.dump({r["model"]: {"units": r["unit_list"], "specs_sha1": r["specs_sha1"]}
                   for r in rows if "unit_list" in r}, handle)


def compare(rows, path: str) -> list:
    """Models whose units (names, widths, mutability) or traced specs (every channel range: a digest of their
    repr) differ from those recorded in ``path`` (a ``--units-out`` file)."""
    with open(path) as handle:
        before = json.load(handle)
    changed = []
    for row in rows:
        old = before.get(row["model"])
        if old is not None and "unit_list" in row and (
                [list(u) for u in row["unit_list"]] != old["units"] or row["specs_sha1"] != old["specs_sha1"]):
            changed.append(row["model"])
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(TORCHVISION_MODELS + TIMM_MODELS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--affordable", type=float, default=20.0,
                        help="a warm-up taking more CPU seconds than this is the only timed run")
    parser.add_argument("--units-out", help="write {model: [[unit name, channels, mutable], ...]} to this JSON file")
    parser.add_argument("--compare", help="a --units-out file: fail if any model's units differ from it")
    parser.add_argument("--profile", help="write cProfile stats of one trace and one prepare per model here")
    parser.add_argument("--jobs", type=int, default=1, help="models measured at once, each in its own process")
    parser.add_argument("--in-process", action="store_true", help="no child processes (peak RSS is cumulative)")
    parser.add_argument("--no-computed", action="store_true",
                        help="skip the extra trace that computes every layer (the tracer before layer skipping)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.reps, args.affordable, args.profile, not args.no_computed)))
        return 0
    from tqdm import tqdm
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    load_before = os.getloadavg()
    rows = []
    if args.in_process:
        for name in tqdm(args.models, desc="parse", unit="model"):
            try:
                rows.append(measure(name, args.reps, args.affordable, args.profile, not args.no_computed))
            except Exception as error:  # noqa: BLE001 - one model's failure is a row, not the end of the run
                rows.append({"model": name, "error": f"{type(error).__name__}: {error}"[:200]})
            gc.collect()
            tqdm.write(table(rows[-1:])[-1])
    else:  # child processes, --jobs at a time (CPU times stay per process)
        with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(args.models), desc="parse", unit="model") as bar:
            for row in pool.map(lambda name: _run_child(name, args), args.models):
                rows.append(row)
                bar.update()
                tqdm.write(table(rows[-1:])[-1])  # each row as it comes: a long run shows progress
                if args.units_out:
                    _write_units(rows, args.units_out)
    if args.units_out:
        _write_units(rows, args.units_out)
    load_after = os.getloadavg()
    lines = _header(args, started)
    lines.append(f"# load average (1 / 5 / 15 min): {' '.join(f'{v:.1f}' for v in load_before)} at the start, "
                 f"{' '.join(f'{v:.1f}' for v in load_after)} at the end")
    print("\n".join(lines + [""] + table(rows)))
    if args.compare:
        changed = compare(rows, args.compare)
        if changed:
            print(f"units differ from {args.compare}: {changed}")
            return 1
        print(f"units identical to {args.compare} on every model measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
