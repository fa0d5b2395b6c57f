"""Benchmark output: the run header, an aligned text table, CSV + JSON files and a PNG plot."""
import csv
import datetime
import json
import math
import os
import platform
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

Row = Dict[str, object]


def run_header(device: torch.device, **extra) -> Dict[str, object]:
    """What a reader needs to trust a table: device, torch version, date, threads, kernel backend availability."""
    from ... import kernels
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    header = {
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "extension_built": bool(getattr(kernels, "extension_available", lambda: False)()),
    }
    header.update(extra)
    return header


def format_header(header: Dict[str, object]) -> str:
    return "\n".join(f"# {key}: {value}" for key, value in header.items())


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return "-" if value is None else str(value)


def format_table(rows: Sequence[Row], columns: Sequence[str]) -> str:
    """A plain aligned table (also valid GitHub markdown) of ``columns`` for ``rows``."""
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    numeric = [all(isinstance(row.get(col), (int, float, type(None))) for row in rows) for col in columns]
    widths = [max([len(col)] + [len(line[i]) for line in cells]) for i, col in enumerate(columns)]
    lines = ["| " + " | ".join(col.ljust(w) for col, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(line, widths, numeric))
              + " |" for line in cells]
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[Row], columns: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({col: row.get(col) for col in columns})
    return path


def write_json(path: Path, header: Dict[str, object], rows: Sequence[Row]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"header": header, "rows": list(rows)}, handle, indent=1, default=str)
    return path


def plot_time_vs_ratio(path: Path, rows: Sequence[Row], *, panel_keys: Sequence[str], line_key: str,
                       title: str, value_key: str = "median_ms") -> Optional[Path]:
    """One panel per distinct ``panel_keys`` tuple: ``value_key`` against ``ratio``, one line per ``line_key``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [r for r in rows if isinstance(r.get("ratio"), float) and _finite(r.get(value_key))]
    panels: List[tuple] = sorted({tuple(r[k] for k in panel_keys) for r in numeric}, key=str)
    if not panels:
        return None
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        members = [r for r in numeric if tuple(r[k] for k in panel_keys) == panel]
        for line in sorted({r[line_key] for r in members}, key=str):
            points = sorted((r["ratio"], r[value_key]) for r in members if r[line_key] == line)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=str(line))
        ax.set_title(" / ".join(str(p) for p in panel), fontsize=9)
        ax.set_xlabel("channel ratio")
        ax.set_ylabel(value_key.replace("_", " "))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
