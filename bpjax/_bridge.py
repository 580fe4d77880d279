"""The bridge to ordinary JAX: a layer as a function ``jax.grad`` differentiates with our backward."""
from __future__ import annotations

import jax

from ._core import Layer

__all__ = ["as_jax_fn"]


def as_jax_fn(layer: Layer, *, train: bool = True, with_state: bool = False):
    """Return ``fn(params, x, state=(), key=None)`` whose derivative is ``layer.backward``.

    ``fn`` returns ``y`` (or ``(y, new_state)`` with ``with_state=True``). It is a
    ``jax.custom_vjp`` function: ``jax.grad``, ``jax.vjp`` and ``jax.test_util.check_grads(...,
    modes=["rev"])`` use the hand-written backward, so manual layers mix with ordinary JAX code.
    ``state`` and ``key`` get zero cotangents, and ``new_state`` (running statistics) is not
    differentiated: its cotangent is ignored, as if behind ``lax.stop_gradient``.
    """

    @jax.custom_vjp
    def apply(params, x, state, key):
        y, new_state, _ = layer.forward(params, state, x, key=key, train=train)
        return y, new_state

    def apply_fwd(params, x, state, key):
        y, new_state, res = layer.forward(params, state, x, key=key, train=train)
        return (y, new_state), (params, res, state)

    def apply_bwd(saved, cotangents):
        params, res, state = saved
        dy, _ = cotangents
        dparams, dx = layer.backward(params, res, dy)
        dstate = jax.tree_util.tree_map(lambda s: jax.numpy.zeros_like(s), state)
        return dparams, dx, dstate, None

    apply.defvjp(apply_fwd, apply_bwd)

    def fn(params, x, state=(), key=None):
        y, new_state = apply(params, x, state, key)
        return (y, new_state) if with_state else y

    return fn
