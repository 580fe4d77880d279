"""Reproduce the MNIST-1D paper's table (Greydanus & Kobak, "Scaling down deep learning") with
hand-written backprop, and go beyond it with a residual 1-D CNN.

Each model has its configuration below: the paper's models all train the same way (Adam,
learning rate 1e-2, batch 100, 6000 steps = 150 epochs of the 4000 training examples, no early
stopping, the final params evaluated once on the 1000 test examples). Each model runs for every
seed; the table gives mean ± std of the test accuracy and the wall-clock training time.

    python scripts/examples/mnist1d_table.py                          # all models, seeds 0 1 2
    python scripts/examples/mnist1d_table.py --models cnn --seeds 0   # one model, one seed
    python scripts/examples/mnist1d_table.py --write RESULTS.md       # also write the table there
    python scripts/examples/mnist1d_table.py --models resnet1d --write RESULTS.md   # replace that row only
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import sys
import time

import jax
import numpy as np
import optax

import bpjax as bp
from bpjax import datasets, models, train

PAPER = {"logreg": "32%", "mlp": "68%", "cnn": "94%", "gru": "91%", "resnet1d": "96% (human expert)"}

CONFIGS = {
    # name: (model factory, epochs, optimizer factory(total_steps))
    "logreg": (models.logreg, 150, lambda steps: optax.adam(1e-2)),
    "mlp": (models.mlp, 150, lambda steps: optax.adam(1e-2)),
    "cnn": (models.cnn, 150, lambda steps: optax.adam(1e-2)),
    "gru": (models.gru, 150, lambda steps: optax.adam(1e-2)),
    # ours: residual CNN, cosine-decayed AdamW
    "resnet1d": (models.resnet1d, 30,
                 lambda steps: optax.adamw(optax.cosine_decay_schedule(3e-3, steps), weight_decay=1e-4)),
}
BATCH = 100


def run(name, seed, data):
    make, epochs, make_opt = CONFIGS[name]
    steps = epochs * (data.x_train.shape[0] // BATCH)
    result = train.fit(make(10), bp.softmax_cross_entropy(), data, optimizer=make_opt(steps),
                       epochs=epochs, batch_size=BATCH, seed=seed, val_fraction=0.0, patience=None,
                       restore_best=False, progress=False, log=lambda s: None)
    return result.test["acc"], result.seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--write", default=None, help="write the table (markdown) to this file")
    args = p.parse_args(argv)

    data = datasets.mnist1d()
    rows = []
    for name in args.models:
        accs, secs = [], []
        for seed in args.seeds:
            acc, sec = run(name, seed, data)
            accs.append(acc)
            secs.append(sec)
            print(f"{name:9s} seed {seed}: test accuracy {acc:.4f} in {sec:.1f} s", flush=True)
        rows.append((name, np.mean(accs), np.std(accs), np.mean(secs), np.std(secs)))

    lines = ["| model | paper | bpjax, test accuracy (mean ± std) | training time per seed (s) |",
             "| --- | --- | --- | --- |"]
    for name, m, s, tm, ts in rows:
        lines.append(f"| {name} | {PAPER[name]} | {100 * m:.1f}% ± {100 * s:.1f} | {tm:.1f} ± {ts:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write(pathlib.Path(args.write), table, lines[2:], args.seeds, argv)


def write(path: pathlib.Path, table: str, rows, seeds, argv) -> None:
    """A new file with the table, or, in a file that has one, only the rows of the models run
    replaced (the rest of the file, notes included, stays)."""
    if path.exists() and "| model | paper |" in path.read_text():
        text = path.read_text()
        for row in rows:
            name = row.split("|")[1].strip()
            old = [line for line in text.splitlines() if line.startswith(f"| {name} |")]
            text = text.replace(old[0], row) if old else text
        path.write_text(text)
        return
    cmd = "python scripts/examples/mnist1d_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    info = (f"Seeds {seeds}; JAX {jax.__version__}, optax {optax.__version__}, "
            f"Python {platform.python_version()}, device {jax.devices()[0].device_kind} "
            f"({platform.machine()}, {jax.device_count()} device), {datetime.date.today()}.")
    path.write_text(f"# MNIST-1D with hand-written backprop\n\nCommand: `{cmd.strip()}`\n\n{info}\n\n{table}\n")


if __name__ == "__main__":
    main()
