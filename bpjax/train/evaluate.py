"""Evaluation of a trained model: the jitted eval step and the metrics over a dataset in batches."""
from __future__ import annotations

import functools
from typing import Dict

import jax
import jax.numpy as jnp

from .._core import Layer, Loss


def _correct(logits, labels):
    return jnp.sum(jnp.argmax(logits, axis=-1) == labels)


@functools.lru_cache(maxsize=16)
def make_eval_step(model: Layer, loss: Loss, *, classification: bool = True):
    """A jitted ``(params, state, x, y) -> (summed loss, correct)`` in evaluation mode (cached:
    one per model, loss and kind of task)."""

    def batch(params, state, xb, yb):
        out, _, _ = model.forward(params, state, xb, train=False)
        value, _ = loss.forward(out, yb)
        return value * xb.shape[0], (_correct(out, yb) if classification else 0)

    return jax.jit(batch)


def evaluate(model: Layer, loss: Loss, params, state, x, y, *, batch_size: int = 1000,
             classification: bool = True, eval_step=None) -> Dict[str, float]:
    """Loss (and accuracy) of the model in evaluation mode (``train=False``) over ``(x, y)``.

    Pass ``eval_step`` (from :func:`make_eval_step`) when calling repeatedly, to compile once.
    """
    batch = eval_step or make_eval_step(model, loss, classification=classification)
    total, correct, n = 0.0, 0, x.shape[0]
    for i in range(0, n, batch_size):
        v, c = batch(params, state, x[i:i + batch_size], y[i:i + batch_size])
        total += float(v)
        correct += int(c)
    out = {"loss": total / n}
    if classification:
        out["acc"] = correct / n
    return out
