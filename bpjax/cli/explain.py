"""``bpjax explain``: one pass of backpropagation printed number by number (:mod:`bpjax.explain`).

By default the tutorial's own network, a 2-4-1 sigmoid network on the four XOR points with the
textbook squared error; ``--dataset`` (and ``--model``) take the first ``--examples`` training
examples of a dataset and the model ``bpjax train`` would train on it, under its loss.
``--html FILE`` also writes the self-contained page. Exit status 0, or 2 on a usage error
(one line)."""
from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp

from .. import datasets as _datasets
from ..explain import explain
from ..explain.page import write_page
from ..explain.text import MAX_VALUES, format_explanation
from ..layers import basic as B
from ..layers.combinators import sequential
from ..layers.losses import softmax_cross_entropy, squared_error
from ..models import MODELS
from ..train.recipes import DEFAULT_MODEL
from .train import _DefaultsOnce


def tutorial_problem():
    """The tutorial's network and data: XOR's four points and targets (n, 1), a 2-4-1 sigmoid
    network and the squared error E = (1/n) Σ ½‖y − y′‖²."""
    x = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], jnp.float32)
    y = jnp.array([[0.0], [1.0], [1.0], [0.0]], jnp.float32)
    return sequential(B.dense(4), B.sigmoid(), B.dense(1), B.sigmoid()), squared_error(), x, y


def _problem(args):
    """(model, loss, x, target, in_shape) for the options, or a usage message (str)."""
    if args.dataset is None:
        if args.model is not None:
            return "--model needs --dataset (the tutorial's network has its own data)"
        model, loss, x, y = tutorial_problem()
        return model, loss, x, y, x.shape[1:]
    try:
        data = _datasets.load(args.dataset)
    except ImportError as e:
        return f"--dataset {args.dataset}: {e}"
    name = args.model or DEFAULT_MODEL.get(args.dataset, "mlp")
    outputs = data.num_classes or int(jnp.asarray(data.y_train).reshape(len(data.y_train), -1).shape[1])
    model = MODELS[name](outputs)
    loss = squared_error() if data.num_classes is None else softmax_cross_entropy()
    k = min(args.examples, len(data.x_train))
    y = jnp.asarray(data.y_train[:k])
    if data.num_classes is None and y.ndim == 1:
        y = y[:, None]
    return model, loss, jnp.asarray(data.x_train[:k]), y, data.in_shape


def command(args) -> int:
    """Run ``bpjax explain`` with parsed ``args``; returns the exit status."""
    if args.examples < 1:
        return _usage(f"--examples: expected a whole number ≥ 1, got {args.examples}")
    if args.steps < 0:
        return _usage(f"--steps: expected a whole number ≥ 0, got {args.steps}")
    if args.values < 0:
        return _usage(f"--values: expected a whole number ≥ 0, got {args.values}")
    html = pathlib.Path(args.html) if args.html else None
    if html is not None and html.exists() and not args.force:
        return _usage(f"--html {html}: the file exists; pass --force to replace it")
    if html is not None and not html.parent.is_dir():
        return _usage(f"--html {html}: expected a file in an existing folder, got no folder {html.parent}")
    problem = _problem(args)
    if isinstance(problem, str):
        return _usage(problem)
    model, loss, x, y, in_shape = problem
    try:
        params, state, _ = model.init(jax.random.PRNGKey(args.seed), tuple(in_shape))
        rec = explain(model, loss, params, state, x, y, lr=args.lr, steps=args.steps)
    except ValueError as e:
        return _usage(str(e))
    print(format_explanation(rec, max_values=args.values))
    if html is not None:
        write_page(rec, html)
        print(f"bpjax explain: wrote {html} (one self-contained page; open it in a browser)")
    return 0


def _usage(text: str) -> int:
    text = text.removeprefix("explain: ")
    print(f"bpjax explain: {text}", file=sys.stderr)
    return 2


def add_parser(subparsers) -> None:
    """``bpjax explain`` as a subcommand of the ``bpjax`` parser."""
    p = subparsers.add_parser(
        "explain", help="one pass of backpropagation, number by number, with each equation beside its numbers",
        description="Run one pass of the classic algorithm (forward, the loss, the error at the output, the error "
                    "propagated back layer by layer with every weight's gradient, the update) and print every "
                    "intermediate with its equation. By default: the tutorial's 2-4-1 sigmoid network on XOR with "
                    "the squared error. The gradients are the hand-written backward that training runs.",
        formatter_class=_DefaultsOnce)
    p.add_argument("--dataset", choices=sorted(_datasets.DATASETS), default=None,
                   help="explain a batch of this dataset instead of the tutorial's XOR (with the loss bpjax train uses)")
    p.add_argument("--model", choices=sorted(MODELS), default=None,
                   help="with --dataset: the model (default: the one bpjax train trains on it)")
    p.add_argument("--examples", type=int, default=8, help="with --dataset: the batch, its first N training examples")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    p.add_argument("--lr", type=float, default=0.5, help="η of the update θ ← θ − η ∂E/∂θ")
    p.add_argument("--steps", type=int, default=100,
                   help="further steps of gradient descent on the batch, for the loss curve")
    p.add_argument("--values", type=int, default=MAX_VALUES,
                   help="print arrays of at most this many entries whole (larger: shape, norm, range)")
    p.add_argument("--html", default=None, metavar="FILE", help="also write the record as one self-contained page")
    p.add_argument("--force", action="store_true", help="with --html: replace FILE when it exists")
    p.set_defaults(run=command)
