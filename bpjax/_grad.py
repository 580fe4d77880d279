"""The whole classic algorithm in one function: forward, loss, error at the output, backward."""
from __future__ import annotations

from ._core import Layer, Loss

__all__ = ["value_and_grad", "forward_backward"]


def forward_backward(model: Layer, loss: Loss, *, train: bool = True):
    """One pass of the algorithm that also returns the network's output (for metrics).

    Returns ``f(params, state, x, target, *, key=None) -> (value, new_state, y, grads)``.
    """

    def f(params, state, x, target, *, key=None):
        y, new_state, res = model.forward(params, state, x, key=key, train=train)  # 1–2. forward
        value, loss_res = loss.forward(y, target)                                  # 3. compare
        dy = loss.backward(loss_res)                                               #    error at output
        grads, _ = model.backward(params, res, dy)                                 # 4. backward
        return value, new_state, y, grads

    return f


def value_and_grad(model: Layer, loss: Loss):
    """Loss and gradients of ``model`` under ``loss``, computed entirely by the hand-written passes.

    Returns ``f(params, state, x, target, *, key=None) -> ((value, new_state), grads)``; it
    mirrors JAX's own ``value_and_grad(..., has_aux=True)`` so the two swap, and it is jittable.
    ``grads`` has the structure, shapes and dtypes of ``params``. The steps, in
    :func:`forward_backward`::

        y, new_state, res = model.forward(params, state, x, key=key, train=True)  # forward
        value, loss_res = loss.forward(y, target)                                 # compare
        dy = loss.backward(loss_res)                                              # error at output
        grads, _ = model.backward(params, res, dy)                                # backward
    """
    step = forward_backward(model, loss)

    def f(params, state, x, target, *, key=None):
        value, new_state, _, grads = step(params, state, x, target, key=key)
        return (value, new_state), grads

    return f
