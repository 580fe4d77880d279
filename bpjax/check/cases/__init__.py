"""The one table of cases: ``bpjax gradcheck``'s defaults and the tests' gradient cross-check.

Every layer and loss ``bpjax`` exports has cases here (``export`` names it), one file per family.
One case of each export is its ``default``: the small configuration ``bpjax gradcheck`` checks
when given no target, quick to run. The others (``crosscheck``) are the tests' cases, several
per export, one per option and formulation worth telling apart. A guard test fails when an
export lacks either.
"""
from __future__ import annotations

from . import basic, conv, losses, norm, seq
from .base import LayerCase, LossCase

#: Every case, the defaults with the rest, family by family.
TABLE = (*basic.CASES, *conv.CASES, *norm.CASES, *seq.CASES, *losses.CASES)

#: The cases the tests cross-check, in table order.
LAYER_CASES = tuple(c for c in TABLE if isinstance(c, LayerCase) and c.crosscheck)
LOSS_CASES = tuple(c for c in TABLE if isinstance(c, LossCase) and c.crosscheck)


def defaults() -> dict:
    """``bpjax gradcheck``'s default case of every export that has one, by export name."""
    return {c.export: c for c in TABLE if c.default}


__all__ = ["LayerCase", "LossCase", "TABLE", "LAYER_CASES", "LOSS_CASES", "defaults"]
