"""Backpropagation explained, number by number: :func:`explain` records one pass of the classic
algorithm (:mod:`.record`); :mod:`.text` prints it with each equation (:mod:`.formulas`) beside its
numbers, and :mod:`.page` draws it as one self-contained HTML page (``bpjax explain``)."""
from .record import Explanation, LayerStep, explain

__all__ = ["Explanation", "LayerStep", "explain"]
