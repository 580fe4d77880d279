"""``bpjax audit``: one DP-SGD run with canaries, the accountant's ε beside an empirical lower bound
(:mod:`bpjax.privacy.audit`). Exit status 0: the bound does not exceed the accountant's ε; 1: it
does (the run leaks more than it claims); 2: a usage error."""
from __future__ import annotations

import sys

from ..datasets import DATASETS, load
from ..privacy import audit as _audit
from .train import _DefaultsOnce


def command(args) -> int:
    """Run ``bpjax audit`` with parsed ``args``; returns the exit status."""
    if args.dp_noise is not None and args.epsilon is not None:
        return _usage("expected --dp-noise or --epsilon, got both")
    noise = 1.0 if args.dp_noise is None and args.epsilon is None else args.dp_noise
    try:
        data = load(args.dataset)
    except ImportError as e:                    # an optional package (mnist1d, scikit-learn)
        return _usage(f"--dataset {args.dataset}: {e}")
    try:
        result = _audit.audit_dp_sgd(
            data, model=args.model, canaries=args.canaries, clip=args.dp_clip, noise=noise, epsilon=args.epsilon,
            delta=args.dp_delta, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            noise_divisor=args.break_noise, confidence=args.confidence, progress=not args.no_progress,
            log=lambda line: print(f"bpjax {line}", flush=True))
    except ValueError as e:
        return _usage(str(e))
    for line in _audit.describe(result):
        print(f"bpjax audit: {line}")
    return 1 if result.violated else 0


def _usage(text: str) -> int:
    for prefix in ("audit: ", "dp-sgd: "):
        text = text[len(prefix):] if text.startswith(prefix) else text
    print(f"bpjax audit: {text}", file=sys.stderr)
    return 2


def add_parser(subparsers) -> None:
    """``bpjax audit`` as a subcommand of the ``bpjax`` parser."""
    p = subparsers.add_parser(
        "audit", help="test DP-SGD's guarantee: an empirical lower bound on epsilon from one run with canaries",
        description="Train once with DP-SGD (bpjax.train.fit with dp=...) on a dataset plus M canaries, each put in "
                    "the training set with probability 1/2; score every canary from the params after each epoch, "
                    "guess which were in, and turn the correct guesses into a lower bound on epsilon (Steinke, Nasr "
                    "& Jagielski 2023, one training run). Prints the accountant's epsilon beside it. A bound above "
                    "the accountant's epsilon shows a bug (exit 1); one below it proves nothing.",
        formatter_class=_DefaultsOnce)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mnist1d",
                   help="a classification dataset, generated or shipped locally")
    p.add_argument("--model", choices=_audit.AUDIT_MODELS, default="logreg",
                   help="the model trained (a dense first layer, where each canary has a row of its own)")
    p.add_argument("--canaries", type=int, default=1000, metavar="M", help="canaries, each in with probability 1/2")
    p.add_argument("--epochs", type=int, default=5, help="epochs of DP-SGD")
    p.add_argument("--batch-size", type=int, default=100, help="examples per step")
    p.add_argument("--lr", type=float, default=0.5, help="learning rate of plain SGD")
    p.add_argument("--seed", type=int, default=0, help="seed of the canaries, init, data order and noise")
    p.add_argument("--dp-clip", type=float, default=1.0, metavar="C", help="clip each example's gradient to norm C")
    p.add_argument("--dp-noise", type=float, default=None, metavar="SIGMA",
                   help="noise multiplier: Gaussian noise of std SIGMA*C/batch (default: 1.0 unless --epsilon)")
    p.add_argument("--epsilon", type=float, default=None,
                   help="instead of --dp-noise: the smallest noise whose accountant's epsilon is at most this")
    p.add_argument("--dp-delta", type=float, default=1e-5, metavar="DELTA", help="delta of the claim and of the bound")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound")
    p.add_argument("--break-noise", type=float, default=1.0, metavar="K",
                   help="to test the audit: train with noise SIGMA/K while the accountant is told SIGMA "
                        "(a deliberately broken run; 1: an honest one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=command)

