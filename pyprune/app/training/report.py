"""The main job's per-step metrics: a printed table, CSV and JSON files (written atomically), and a PNG plot.

The metric is the task's: ``accuracy`` (image classification; rows also hold ``acc_pruned``, measured right after
a pruning step) or ``perplexity`` (language models; ``ppl_pruned``).
"""
import csv
import json
import math
from typing import Dict, List, Sequence

from ...utils.files import atomic_write

COLUMNS = ("step", "phase", "iteration", "kept_ratio", "params", "params_kept", "flops", "flops_kept",
           "acc_pruned", "accuracy", "wall_s")
_WIDTHS = {"step": 4, "phase": 10, "iteration": 9, "kept_ratio": 10, "params": 11, "params_kept": 11,
           "flops": 13, "flops_kept": 10, "acc_pruned": 10, "accuracy": 8, "ppl_pruned": 10, "perplexity": 10,
           "wall_s": 8}
_PRUNED_KEYS = {"accuracy": "acc_pruned", "perplexity": "ppl_pruned"}


def pruned_key(metric: str) -> str:
    """The row key of ``metric`` measured right after a pruning step (``acc_pruned`` / ``ppl_pruned``)."""
    if metric not in _PRUNED_KEYS:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(_PRUNED_KEYS)}")
    return _PRUNED_KEYS[metric]


def columns(metric: str = "accuracy") -> tuple:
    """The table / CSV columns for ``metric``."""
    names = {"acc_pruned": pruned_key(metric), "accuracy": metric}
    return tuple(names.get(c, c) for c in COLUMNS)


def _cell(column: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = "-"
    elif column in ("params", "flops"):
        text = f"{int(value):,}"
    elif column in ("params_kept", "flops_kept", "acc_pruned", "accuracy"):
        text = f"{value:.1%}"
    elif column in ("ppl_pruned", "perplexity"):
        text = f"{value:.3g}" if value >= 1000 else f"{value:.2f}"
    elif column == "kept_ratio":
        text = f"{value:.3f}"
    elif column == "wall_s":
        text = f"{value:.1f}"
    else:
        text = str(value)
    return text.rjust(_WIDTHS[column])


def table_header(metric: str = "accuracy") -> str:
    return " ".join(c.rjust(_WIDTHS[c]) for c in columns(metric))


def table_row(row: Dict, metric: str = "accuracy") -> str:
    return " ".join(_cell(c, row.get(c)) for c in columns(metric))


def write_csv(rows: Sequence[Dict], path: str, metric: str = "accuracy") -> None:
    names = columns(metric)
    with atomic_write(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(names))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in names})


def write_json(data, path: str) -> None:
    with atomic_write(path, "w") as handle:
        json.dump(data, handle, indent=1)


def plot_metrics(rows: List[Dict], path: str, title: str = "", metric: str = "accuracy") -> None:
    """The metric (accuracy, or perplexity on a log scale), kept params and kept FLOPs against the pruning step
    (one panel each), as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(len(rows)))
    labels = [f"{r['step']}\n{r['phase']}" if r["phase"] != "prune" else str(r["step"]) for r in rows]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = ((metric, f"val {metric}", "tab:blue"), ("params", "parameters", "tab:green"),
              ("flops", "FLOPs (one image)" if metric == "accuracy" else "FLOPs (one sequence)", "tab:red"))
    for axis, (key, name, colour) in zip(axes, panels):
        values = [r.get(key) for r in rows]
        axis.plot(steps, values, marker="o", color=colour)
        if key == metric:
            pruned = [r.get(pruned_key(metric)) for r in rows]
            if any(v is not None for v in pruned):
                axis.plot(steps, [float("nan") if v is None else v for v in pruned], marker="x", linestyle=":",
                          color="tab:orange", label="right after pruning")
                axis.legend(fontsize=8)
            if metric == "accuracy":
                axis.set_ylim(0, 1.02)
            else:  # perplexity right after pruning can be orders of magnitude above the trained one
                axis.set_yscale("log")
        axis.set_title(name)
        axis.set_xticks(steps)
        axis.set_xticklabels(labels, fontsize=7)
        axis.set_xlabel("pruning step")
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    with atomic_write(path, "wb") as handle:  # like every output: whole or not at all, a full disk named
        figure.savefig(handle, format="png", dpi=110)
    plt.close(figure)
