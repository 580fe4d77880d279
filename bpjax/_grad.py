"""The whole classic algorithm in one function: forward, loss, error at the output, backward."""
from __future__ import annotations

from ._core import Layer, Loss

__all__ = ["value_and_grad"]


def value_and_grad(model: Layer, loss: Loss):
    """Loss and gradients of ``model`` under ``loss``, computed entirely by the hand-written passes.

    Returns ``f(params, state, x, target, *, key=None) -> ((value, new_state), grads)``; it
    mirrors JAX's own ``value_and_grad(..., has_aux=True)`` so the two swap, and it is jittable.
    ``grads`` has the structure, shapes and dtypes of ``params``.
    """

    def f(params, state, x, target, *, key=None):
        y, new_state, res = model.forward(params, state, x, key=key, train=True)  # 1–2. forward
        value, loss_res = loss.forward(y, target)                                 # 3. compare
        dy = loss.backward(loss_res)                                              #    error at output
        grads, _ = model.backward(params, res, dy)                                # 4. backward
        return (value, new_state), grads

    return f


