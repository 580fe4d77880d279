"""``bpjax evaluate`` and ``bpjax predict``: a trained run folder's test metrics and its model's outputs."""
from __future__ import annotations

import sys

import numpy as np

from ..train.runs import RunError, load_run


def _run_error(command: str, e: Exception) -> int:
    """A run folder or input that cannot be used: one line on stderr, exit status 2."""
    text = str(e)
    for prefix in ("load_run: ", "predict: "):
        text = text[len(prefix):] if text.startswith(prefix) else text
    print(f"bpjax {command}: {text}", file=sys.stderr)
    return 2


def _evaluate(args) -> int:

    try:
        run = load_run(args.run_dir)
        metrics = run.evaluate(batch_size=args.batch_size)
    except (RunError, ValueError) as e:
        return _run_error("evaluate", e)
    info = run.info
    print(f"bpjax evaluate: {info['model']} on {info['dataset']} (test split), {run.directory}")
    print(" ".join(f"test_{k} {v!r}" for k, v in metrics.items()))   # repr: every digit, as in summary.json
    return 0


def _predict(args) -> int:

    try:
        run = load_run(args.run_dir)
    except RunError as e:
        return _run_error("predict", e)
    try:
        x = np.load(args.input, allow_pickle=False)
    except FileNotFoundError:
        return _run_error("predict", ValueError(f"expected INPUT to be a .npy file of inputs, got {args.input}, "
                                                f"which does not exist"))
    except (OSError, ValueError):
        return _run_error("predict", ValueError(f"expected INPUT to be a .npy file of inputs (numpy.save), got "
                                                f"{args.input}, which is not one"))
    if not isinstance(x, np.ndarray):
        return _run_error("predict", ValueError(f"expected INPUT to be a .npy file of one array, got {args.input}"))
    try:
        y = run.predict(x, batch_size=args.batch_size)
    except ValueError as e:
        return _run_error("predict", e)
    try:
        np.save(args.out, y)
    except OSError as e:
        return _run_error("predict", ValueError(f"expected --out to be a writable path, got {args.out} ({e.strerror})"))
    print(f"bpjax predict: {y.shape} {y.dtype} outputs of {run.info['model']} ({run.directory}) written to {args.out}")
    return 0


def add_evaluate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="the test metrics of a trained run (the ones in its summary.json)",
        description="Load the model of a bpjax train run folder (run.json and model/) and print its loss "
                    "(and accuracy) on the dataset's test split, in inference mode. Exit 2 on a run folder "
                    "that is missing, damaged or unfinished.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by bpjax train")
    p.add_argument("--batch-size", type=int, default=1000, help="examples per evaluation batch")
    p.set_defaults(run=_evaluate)


def add_predict_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="the outputs of a trained run's model on inputs from a .npy file",
        description="Load the model of a bpjax train run folder and write its outputs (inference mode, "
                    "train=False) on INPUT.npy, of shape (N, *in_shape), to --out as a .npy file. Exit 2 on a "
                    "run folder that is missing, damaged or unfinished, or on inputs of the wrong shape.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by bpjax train")
    p.add_argument("input", metavar="INPUT.npy", help="the inputs, (N, *in_shape)")
    p.add_argument("--out", required=True, metavar="OUTPUT.npy", help="where to write the outputs")
    p.add_argument("--batch-size", type=int, default=1000, help="rows per forward pass (bounds the memory)")
    p.set_defaults(run=_predict)
