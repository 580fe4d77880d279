"""The case types of the cross-check table (tests/table.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import bpjax as bp


@dataclass(frozen=True)
class LayerCase:
    export: str                     # the bpjax name this case exercises
    make: Callable[[], bp.Layer]
    in_shape: Tuple[int, ...]       # one example, without the batch axis
    batch: int = 4
    id: str = ""                    # distinguishes several cases of one export
    x_scale: float = 1.0
    needs_key: bool = False         # forward draws randomness (dropout)
    train: bool = True
    int_input: Optional[int] = None  # inputs are integer ids in [0, int_input) (embedding)
    draw_x: Optional[Callable] = None  # custom input: draw_x(gen, shape, dtype)

    def __str__(self):
        return f"{self.export}{'-' + self.id if self.id else ''}"


@dataclass(frozen=True)
class LossCase:
    export: str
    make: Callable[[], bp.Loss]
    pred_shape: Tuple[int, ...]     # including the batch axis
    target: Callable                # target(gen, pred_shape, dtype) -> array
    id: str = ""
    pred_scale: float = 1.0

    def __str__(self):
        return f"{self.export}{'-' + self.id if self.id else ''}"
