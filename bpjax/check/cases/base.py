"""The case types of the table: how to build one layer or loss and what to feed it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from bpjax._core import Layer, Loss


@dataclass(frozen=True)
class LayerCase:
    """One layer, built by ``make()`` and fed a batch of ``batch`` examples of ``in_shape``.

    ``in_shape`` is one example's shape, or a tuple of shapes for a layer taking a tuple of
    inputs. ``default`` marks the configuration ``bpjax gradcheck`` runs for the export when
    given no target (one per export); ``crosscheck`` says whether the tests' cross-check runs
    the case (tests/test_crosscheck.py, test_bf16.py).
    """

    export: str                        # the bpjax name this case exercises
    make: Callable[[], Layer]
    in_shape: Tuple                    # one example, without the batch axis
    batch: int = 4
    id: str = ""                       # distinguishes several cases of one export
    x_scale: float = 1.0
    needs_key: bool = False            # forward draws randomness (dropout)
    train: bool = True
    int_input: Optional[int] = None    # inputs are integer ids in [0, int_input) (embedding)
    draw_x: Optional[Callable] = None  # custom input: draw_x(gen, (batch, *in_shape), dtype)
    default: bool = False
    crosscheck: bool = True

    def __str__(self):
        return f"{self.export}{'-' + self.id if self.id else ''}"


@dataclass(frozen=True)
class LossCase:
    """One loss, built by ``make()``, at predictions of ``(batch, *pred_shape)`` and targets drawn
    by ``target(gen, (batch, *pred_shape), dtype)`` (a drawer of :mod:`bpjax.check.draw`).
    ``default`` and ``crosscheck`` as for :class:`LayerCase`."""

    export: str
    make: Callable[[], Loss]
    pred_shape: Tuple[int, ...]        # one example, without the batch axis
    target: Callable
    batch: int = 4
    id: str = ""
    pred_scale: float = 1.0
    default: bool = False
    crosscheck: bool = True

    def __str__(self):
        return f"{self.export}{'-' + self.id if self.id else ''}"
