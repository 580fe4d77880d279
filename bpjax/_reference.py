"""The autodiff reference: the same forward and loss, differentiated by ``jax.value_and_grad``."""
from __future__ import annotations

import jax

from ._core import Layer, Loss, check_model_and_loss

__all__ = ["reference_value_and_grad"]


def reference_value_and_grad(model: Layer, loss: Loss):
    """Same signature as :func:`bpjax.value_and_grad`, computed with ``jax.value_and_grad``.

    Returns ``f(params, state, x, target, *, key=None) -> ((value, new_state), grads)``. Only the
    forward passes of ``model`` and ``loss`` are used; this is what every check compares against.
    """
    check_model_and_loss("reference_value_and_grad", model, loss)

    def objective(params, state, x, target, key):
        y, new_state, _ = model.forward(params, state, x, key=key, train=True)
        value, _ = loss.forward(y, target)
        return value, new_state

    vg = jax.value_and_grad(objective, has_aux=True)

    def f(params, state, x, target, *, key=None):
        return vg(params, state, x, target, key)

    return f
