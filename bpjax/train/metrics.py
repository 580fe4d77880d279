"""The metrics of a run, one row per epoch (JSON lines or CSV), and the PNG of its curves."""
from __future__ import annotations

import json
import pathlib
from typing import Dict, List, Optional

import numpy as np


def _write_row(path: pathlib.Path, row: Dict[str, float]):
    if path.suffix == ".csv":
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a") as f:
            if new:
                f.write(",".join(row) + "\n")
            f.write(",".join(f"{v}" for v in row.values()) + "\n")
    else:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _rewrite_rows(path: pathlib.Path, rows: List[Dict[str, float]]):
    if path.exists():
        path.unlink()
    for row in rows:
        _write_row(path, row)


def plot_history(history: List[Dict[str, float]], path, *, title: str = ""):
    """Save a PNG of the loss and accuracy curves (train and validation) per epoch."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install matplotlib "
                          "(or pip install 'bpjax[train]')") from e
    epochs = [r["epoch"] for r in history]
    has_acc = "train_acc" in history[0]
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5, 3.6))
    axes = np.atleast_1d(axes)
    axes[0].plot(epochs, [r["train_loss"] for r in history], label="train")
    axes[0].plot(epochs, [r["val_loss"] for r in history], label="validation")
    axes[0].set_xlabel("epoch"), axes[0].set_ylabel("loss")
    axes[0].legend()
    if has_acc:
        axes[1].plot(epochs, [r["train_acc"] for r in history], label="train")
        axes[1].plot(epochs, [r["val_acc"] for r in history], label="validation")
        axes[1].set_xlabel("epoch"), axes[1].set_ylabel("accuracy"), axes[1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _read_history(path: Optional[pathlib.Path], upto_epoch: int) -> List[Dict[str, float]]:
    """Rows of an earlier run's metrics file up to ``upto_epoch`` (rows after it are dropped)."""
    if path is None or not path.exists():
        return []
    rows = []
    if path.suffix == ".csv":
        lines = path.read_text().splitlines()
        head = lines[0].split(",") if lines else []
        for line in lines[1:]:
            rows.append({k: _csv_value(k, v) for k, v in zip(head, line.split(","))})
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def _csv_value(key: str, text: str):
    """A CSV cell as the row had it: int (epoch, step), float, or a word (DP-SGD's ``dp_sampling``)."""
    if key in ("epoch", "step"):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text
