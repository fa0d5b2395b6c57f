#!/usr/bin/env bash
# The prepared GPU check (CUDA build, tests, kernel and model tables): one command, <= 6 minutes on one H100 /
# H200, nothing downloaded.
#
#   bash benchmarks/gpu_check.sh OUTDIR            # on the GPU machine, from anywhere (it cd's to the repository)
#   bash benchmarks/gpu_check.sh OUTDIR --cpu      # the same stages on the CPU at tiny sizes (< 2 min), to test
#   PYPRUNE_GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh OUTDIR      # the script itself without a GPU
#
# Stages, each under its own time limit (so one slow stage cannot eat the others') within a total budget:
#   env      device, driver, torch / CUDA versions                                  -> OUTDIR/env.txt
#   build    the extension against this machine's torch (system python3, no venv):
#            TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace, then import pyprune._C
#            (CPU mode: only checks that setup.py loads and the existing extension imports; the shared tree's
#            build is not replaced)
#   tests    the CUDA tests: -k "(cuda or CUDA or gpu) and not bad_arguments" (test_bad_arguments_* deselected:
#            on the torch 2.11 / g++ 13.3 GPU image any C++ exception from an extension kills the process); with
#            pytest-xdist when installed, so a crash costs one test, not the run     -> OUTDIR/cuda_tests.xml
#   kernels  the channel gather table (pyprune bench ops --parts gather)             -> OUTDIR/ops/
#   models   ours (eager, kept-slice SGD, graphed) vs dense (eager, graphed) vs mmrazor-ref, ResNet-18 / 50, b8, 0.5,
#            eval / train / switch (pyprune bench models)                           -> OUTDIR/models/
#            then the Llama (gather, compact, dense; mmrazor-ref is skipped for it), b8, 128 tokens, 0.5, when
#            transformers imports (else one "skipped" line)                           -> OUTDIR/models_llama/
#   formats  fp32 / bf16 autocast x contiguous / channels_last, ResNet-50 batch 64, train / eval, the same
#            backends (benchmarks/bench_formats.py)                                   -> OUTDIR/formats/
#   switch   mutator.set_choices host time, ResNet-18 / 50, Sequential and L1 units (benchmarks/bench_switch.py)
#                                                                                     -> OUTDIR/switch/
# Then OUTDIR/summary.json (per stage: status, exit code, seconds, limit) and OUTDIR/summary.md (every table).
# Logs: OUTDIR/logs/<stage>.log (stdout) and .err (stderr). Exit status: 0 when every stage passed.
#
# Knobs: PYPRUNE_PYTHON (default python3; CPU mode: .venv/bin/python when present), TORCH_CUDA_ARCH_LIST (9.0),
# MAX_JOBS (16), GPU_CHECK_BUDGET_S (total seconds; 340 on GPU, 115 on CPU).
set -u -o pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--cpu]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
CPU=${PYPRUNE_GPU_CHECK_CPU:-0}
for arg in "$@"; do
    case $arg in
        --cpu|--dry-run) CPU=1 ;;
        *) echo "gpu_check: unknown option $arg" >&2; usage ;;
    esac
done
case $OUT in -*) usage ;; esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT/logs" || { echo "gpu_check: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
cd "$REPO" || exit 2

if [ "$CPU" = 1 ]; then
    DEVICE=cpu
    PY=${PYPRUNE_PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
    BUDGET=${GPU_CHECK_BUDGET_S:-115}
else
    DEVICE=cuda
    PY=${PYPRUNE_PYTHON:-python3}
    BUDGET=${GPU_CHECK_BUDGET_S:-340}
fi
START=$(date +%s)
RESULTS="$OUT/logs/stages.tsv"
: > "$RESULTS"
FAILED=0

# run_stage NAME LIMIT_S SHOW CMD...   SHOW: "all" prints the stage's stdout as it runs, "tail" its last lines.
run_stage() {
    local name=$1 limit=$2 show=$3; shift 3
    local left=$(( BUDGET - ($(date +%s) - START) - 5 ))
    [ "$left" -lt "$limit" ] && limit=$left
    echo
    echo "=== [$name] limit ${limit}s: $*"
    if [ "$limit" -lt 10 ]; then
        echo "--- [$name] skipped: the total budget of ${BUDGET}s is spent"
        printf '%s\tskipped\t-\t0\t%s\n' "$name" "$limit" >> "$RESULTS"
        FAILED=1
        return 0
    fi
    local t0 rc status
    t0=$(date +%s)
    if [ "$show" = all ]; then
        timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" 2> "$OUT/logs/$name.err" \
            | tee "$OUT/logs/$name.log"
        rc=${PIPESTATUS[0]}
    else
        timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" > "$OUT/logs/$name.log" \
            2> "$OUT/logs/$name.err"
        rc=$?
        tail -n 15 "$OUT/logs/$name.log"
    fi
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    [ "$rc" = 0 ] || { FAILED=1; tail -n 5 "$OUT/logs/$name.err" | sed "s/^/[$name stderr] /"; }
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$limit" >> "$RESULTS"
    echo "--- [$name] $status (exit $rc) in $(( $(date +%s) - t0 ))s"
}

env_report() {
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    if git rev-parse --short HEAD > /dev/null 2>&1; then
        echo "git: $(git rev-parse --short HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ' (+ local changes)')"
    else
        echo "git: not a git checkout"
    fi
    if [ "$DEVICE" = cuda ]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || return 1
    fi
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
}

build() {
    if [ "$DEVICE" = cpu ]; then
        echo "CPU mode: the shared tree's extension is not rebuilt; checking that setup.py loads and _C imports"
        "$PY" setup.py --version || return 1
    else
        TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} "$PY" setup.py build_ext --inplace \
            || return 1
    fi
    "$PY" -c "import torch, pyprune._C, pyprune.kernels as k; print('extension:', k.extension_available(), '| backend:', k.backend())"
}

cuda_tests() {
    local parallel=()
    if [ "$DEVICE" = cuda ] && "$PY" -c "import xdist" 2> /dev/null; then
        parallel=(-n 8)
    fi
    "$PY" -m pytest tests -q -p no:cacheprovider -rfE "${parallel[@]}" --junitxml="$OUT/cuda_tests.xml" \
        -k "(cuda or CUDA or gpu) and not bad_arguments"
}

# models RESNET_ARGS... :: LLAMA_ARGS...   (arrays do not reach the child bash: the stage passes them as arguments)
models() {
    local resnet=() llama=() after=0 arg
    for arg in "$@"; do
        if [ "$arg" = "::" ]; then after=1; elif [ "$after" = 0 ]; then resnet+=("$arg"); else llama+=("$arg"); fi
    done
    "$PY" -m pyprune bench models "${resnet[@]}" --out "$OUT/models" || return 1
    if ! "$PY" -c "import transformers" 2> /dev/null; then
        echo "llama: skipped: transformers is not installed"
        return 0
    fi
    "$PY" -m pyprune bench models "${llama[@]}" --models llama \
        --backends pyprune-ext pyprune-compact dense mmrazor-ref --out "$OUT/models_llama"
}

export -f env_report build cuda_tests models  # stages run under timeout in a child bash
export DEVICE PY OUT

if [ "$DEVICE" = cuda ]; then
    OPS_ARGS=(--device cuda --parts gather --warmup 3 --reps 10)
    MODEL_ARGS=(--device cuda --models resnet18 resnet50 --batch-sizes 8 --ratios 0.5 --warmup 3 --reps 10
                --switch-subnets 4)
    LLAMA_ARGS=(--device cuda --batch-sizes 8 --seq-len 128 --ratios 0.5 --warmup 3 --reps 10 --switch-subnets 4)
    FORMAT_ARGS=(--device cuda --models resnet50 --batch 64 --warmup 2 --reps 5)
    SWITCH_ARGS=(--device cuda --models resnet18 resnet50 --units Sequential L1 --calls 200)
else
    OPS_ARGS=(--device cpu --parts gather --quick)
    MODEL_ARGS=(--device cpu --quick --ratios 0.5)
    LLAMA_ARGS=(--device cpu --quick --ratios 0.5)
    FORMAT_ARGS=(--device cpu --quick)
    SWITCH_ARGS=(--device cpu --models resnet18 --units Sequential --calls 20)
fi
BACKENDS=(--backends pyprune-ext pyprune-sliced dense mmrazor-ref pyprune-graph dense-graph)

echo "gpu_check: $DEVICE mode, python $PY, total budget ${BUDGET}s, output $OUT"
run_stage env 20 all env_report
cp "$OUT/logs/env.log" "$OUT/env.txt"
run_stage build 90 tail build
run_stage tests 75 tail cuda_tests
run_stage kernels 45 all "$PY" -m pyprune bench ops "${OPS_ARGS[@]}" --out "$OUT/ops"
run_stage models 95 all models "${MODEL_ARGS[@]}" "${BACKENDS[@]}" :: "${LLAMA_ARGS[@]}"
run_stage formats 55 all "$PY" benchmarks/bench_formats.py "${FORMAT_ARGS[@]}" --out "$OUT/formats"
run_stage switch 30 all "$PY" benchmarks/bench_switch.py "${SWITCH_ARGS[@]}" --out "$OUT/switch"

"$PY" - "$OUT" "$DEVICE" "$(( $(date +%s) - START ))" <<'PYTHON'
"""summary.json (per stage) and summary.md (env, test line, every table) from the stage logs."""
import json, sys
from pathlib import Path

out, device, total = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
stages = []
for line in (out / "logs" / "stages.tsv").read_text().splitlines():
    name, status, rc, seconds, limit = line.split("\t")
    stages.append({"stage": name, "status": status, "exit_code": None if rc == "-" else int(rc),
                   "seconds": int(seconds), "limit_s": int(limit)})
json.dump({"device_mode": device, "total_seconds": total, "stages": stages}, open(out / "summary.json", "w"),
          indent=1)

def tables(text):
    """Lines of markdown tables (and their headings) in a log."""
    keep = [l for l in text.splitlines() if l.startswith("|") or l.startswith("## ")]
    return "\n".join(keep)

md = [f"# GPU check ({device} mode), {total} s", "", "## stages", "", "| stage | status | exit | s | limit s |",
      "|---|---|---|---|---|"]
md += [f"| {s['stage']} | {s['status']} | {s['exit_code']} | {s['seconds']} | {s['limit_s']} |" for s in stages]
env = out / "env.txt"
md += ["", "## environment", "", "```", env.read_text().strip() if env.exists() else "(no env log)", "```"]
tests_log = out / "logs" / "tests.log"
if tests_log.exists():
    lines = [l for l in tests_log.read_text().splitlines() if l.strip()]
    md += ["", "## CUDA tests", "", "```", *(lines[-12:] if lines else ["(empty)"]), "```"]
for stage in ("kernels", "models", "formats", "switch"):
    log = out / "logs" / f"{stage}.log"
    if log.exists():
        md += ["", f"## {stage}", "", tables(log.read_text()) or "(no table: see logs)"]
(out / "summary.md").write_text("\n".join(md) + "\n")
print(f"\nwrote {out / 'summary.json'} and {out / 'summary.md'}")
for s in stages:
    print(f"  {s['stage']:8s} {s['status']:8s} exit {s['exit_code']}  {s['seconds']} s (limit {s['limit_s']} s)")
PYTHON

echo "gpu_check: done in $(( $(date +%s) - START ))s; $([ "$FAILED" = 0 ] && echo 'every stage passed' || echo 'SOME STAGES FAILED (see above)')"
exit "$FAILED"
