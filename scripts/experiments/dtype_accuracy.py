"""Does bfloat16 compute cost accuracy? ``bpjax train`` with its defaults, in float32 and in
bfloat16 (float32 master weights), seed by seed, and the test accuracies side by side.

    python scripts/experiments/dtype_accuracy.py                    # seeds 0 1 2, the paper's CNN (--model cnn)
    python scripts/experiments/dtype_accuracy.py --seeds 0 1 2 3 4 5 6 7 8 9
    python scripts/experiments/dtype_accuracy.py --model mlp --seeds 0

Each run is ``bpjax train --seed S --dtype D`` into a fresh temporary folder; the accuracy is
the one ``summary.json`` records (the params of the best validation epoch, on the test split).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import pathlib
import statistics
import sys
import tempfile

from bpjax import cli

DTYPES = ("float32", "bfloat16")


def run(model: str, seed: int, dtype: str, extra) -> dict:
    """``bpjax train`` once, quietly; its summary."""
    with tempfile.TemporaryDirectory() as out:
        argv = ["train", "--model", model, "--seed", str(seed), "--dtype", dtype, "--out", out,
                "--no-progress", "--no-plot", *extra]
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(argv)
        if code != 0:
            raise SystemExit(f"dtype_accuracy: bpjax {' '.join(argv)} exited with {code}")
        return json.loads((pathlib.Path(out) / "summary.json").read_text())


def table(rows) -> str:
    lines = ["| seed | float32 test acc | bfloat16 test acc | bfloat16 − float32 (points) |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {100 * r['float32']:.1f}% | {100 * r['bfloat16']:.1f}% | "
                     f"{100 * (r['bfloat16'] - r['float32']):+.1f} |")
    diffs = [100 * (r["bfloat16"] - r["float32"]) for r in rows]
    mean = lambda xs: statistics.mean(xs)                                         # noqa: E731
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0                  # noqa: E731
    f32, bf16 = [100 * r["float32"] for r in rows], [100 * r["bfloat16"] for r in rows]
    lines.append(f"| mean ± std | {mean(f32):.1f}% ± {sd(f32):.1f} | {mean(bf16):.1f}% ± {sd(bf16):.1f} | "
                 f"{mean(diffs):+.2f} ± {sd(diffs):.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cnn", help="a bpjax train model (default: cnn, the paper's CNN, as in RESULTS.md)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--dataset", default=None, help="pass --dataset to bpjax train (default: its own, mnist1d)")
    p.add_argument("--epochs", type=int, default=None, help="pass --epochs to bpjax train (default: its own)")
    args = p.parse_args(argv)
    extra = (["--epochs", str(args.epochs)] if args.epochs else []) + \
        (["--dataset", args.dataset] if args.dataset else [])
    rows = []
    for seed in args.seeds:
        row = {"seed": seed}
        for dtype in DTYPES:
            row[dtype] = run(args.model, seed, dtype, extra)["test_acc"]
        rows.append(row)
        print(f"seed {seed}: float32 {row['float32']:.4f}, bfloat16 {row['bfloat16']:.4f}", flush=True)
    print(table(rows))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
