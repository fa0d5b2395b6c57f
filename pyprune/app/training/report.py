"""The main job's per-step metrics: a printed table, CSV and JSON files (written atomically), and a PNG plot."""
import csv
import json
import math
from typing import Dict, List, Sequence

from ...utils.files import atomic_write

COLUMNS = ("step", "phase", "iteration", "kept_ratio", "params", "params_kept", "flops", "flops_kept",
           "acc_pruned", "accuracy", "wall_s")
_WIDTHS = {"step": 4, "phase": 10, "iteration": 9, "kept_ratio": 10, "params": 11, "params_kept": 11,
           "flops": 13, "flops_kept": 10, "acc_pruned": 10, "accuracy": 8, "wall_s": 8}


def _cell(column: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = "-"
    elif column in ("params", "flops"):
        text = f"{int(value):,}"
    elif column in ("params_kept", "flops_kept", "acc_pruned", "accuracy"):
        text = f"{value:.1%}"
    elif column == "kept_ratio":
        text = f"{value:.3f}"
    elif column == "wall_s":
        text = f"{value:.1f}"
    else:
        text = str(value)
    return text.rjust(_WIDTHS[column])


def table_header() -> str:
    return " ".join(c.rjust(_WIDTHS[c]) for c in COLUMNS)


def table_row(row: Dict) -> str:
    return " ".join(_cell(c, row.get(c)) for c in COLUMNS)


def write_csv(rows: Sequence[Dict], path: str) -> None:
    with atomic_write(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in COLUMNS})


def write_json(data, path: str) -> None:
    with atomic_write(path, "w") as handle:
        json.dump(data, handle, indent=1)


def plot_metrics(rows: List[Dict], path: str, title: str = "") -> None:
    """Accuracy, kept params and kept FLOPs against the pruning step (one panel each), as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(len(rows)))
    labels = [f"{r['step']}\n{r['phase']}" if r["phase"] != "prune" else str(r["step"]) for r in rows]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("accuracy", "val accuracy", "tab:blue"), ("params", "parameters", "tab:green"),
              ("flops", "FLOPs (one image)", "tab:red"))
    for axis, (key, name, colour) in zip(axes, panels):
        values = [r.get(key) for r in rows]
        axis.plot(steps, values, marker="o", color=colour)
        if key == "accuracy":
            pruned = [r.get("acc_pruned") for r in rows]
            if any(v is not None for v in pruned):
                axis.plot(steps, [float("nan") if v is None else v for v in pruned], marker="x", linestyle=":",
                          color="tab:orange", label="right after pruning")
                axis.legend(fontsize=8)
            axis.set_ylim(0, 1.02)
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
