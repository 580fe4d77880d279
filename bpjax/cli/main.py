"""The ``bpjax`` command.

``bpjax gradcheck`` checks every built-in layer and loss (or the ones named, or a user's
``module:factory``) with :func:`bpjax.check_layer` / :func:`bpjax.check_loss`, prints the
table and exits non-zero on any failure::

    bpjax gradcheck                                  # every export of bpjax.LAYERS and bpjax.LOSSES
    bpjax gradcheck dense layer_norm -v              # some of them, with their full tables
    bpjax gradcheck mypkg.layers:my_layer --in-shape 5
    bpjax gradcheck mypkg.ops:my_custom_vjp_fn --args-shapes 3,4 4   # any JAX function: bp.check_vjp
    python -m bpjax gradcheck ...                    # the same

Exit status: 0 all passed, 1 some gradient failed, 2 a usage error (a bad target, or an
export with no entry in the table of default cases). Subcommands are argparse subparsers: each
module of this package (``train``, ``runs``, ``gradcheck``) has an ``add_*parser(subparsers)``,
listed in :data:`SUBCOMMANDS`.

``bpjax explain`` prints one pass of backpropagation number by number (``--html FILE``: as a page).

``bpjax train`` writes a run folder (:mod:`bpjax.train.runs`); ``bpjax evaluate RUN_DIR`` prints its
model's test metrics and ``bpjax predict RUN_DIR INPUT.npy --out OUTPUT.npy`` writes its outputs
(exit 2, one line, on a folder that is missing, damaged or unfinished). ``bpjax --version``.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from .. import __version__
from .audit import add_parser as add_audit_parser
from .explain import add_parser as add_explain_parser
from .gradcheck import add_parser as add_gradcheck_parser
from .runs import add_evaluate_parser, add_predict_parser
from .train import add_parser as add_train_parser

#: The subcommands: each adds its parser and sets ``run`` (args -> exit status).
SUBCOMMANDS = [add_train_parser, add_evaluate_parser, add_predict_parser, add_gradcheck_parser, add_audit_parser,
               add_explain_parser]


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(prog="bpjax", description="bpjax: backpropagation written by hand, on JAX.")
    parser.add_argument("--version", action="version", version=f"bpjax {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``bpjax`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
