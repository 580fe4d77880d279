"""The whole classic algorithm in one function: forward, loss, error at the output, backward."""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from ._core import Layer, Loss, cast_like, check_model_and_loss

__all__ = ["value_and_grad", "forward_backward", "cast_floating"]


def cast_floating(tree: Any, dtype) -> Any:
    """Every floating array of ``tree`` as ``dtype``; integer leaves (token ids, labels, counters)
    and leaves that are not arrays unchanged. ``dtype=None`` returns ``tree`` as it is."""
    if dtype is None:
        return tree
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if is_floating(a) else a, tree)


def is_floating(a) -> bool:
    """Whether ``a`` is an array of a floating-point dtype."""
    return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)


def forward_backward(model: Layer, loss: Loss, *, train: bool = True, compute_dtype=None):
    """One pass of the algorithm that also returns the network's output (for metrics).

    Returns ``f(params, state, x, target, *, key=None) -> (value, new_state, y, grads)``.

    ``compute_dtype`` (e.g. ``jnp.bfloat16``): mixed precision. The forward and backward run on
    copies of the floating params, state and x cast to it; the loss value comes back as float32
    (the losses compute it in float32), and ``grads`` and ``new_state`` come back in the dtypes of
    ``params`` and ``state``, so float32 params stay the master weights an optimizer updates.
    """
    check_model_and_loss("forward_backward", model, loss)

    def f(params, state, x, target, *, key=None):
        p, s, xc = (cast_floating(params, compute_dtype), cast_floating(state, compute_dtype),
                    cast_floating(x, compute_dtype))
        y, new_state, res = model.forward(p, s, xc, key=key, train=train)          # 1–2. forward
        value, loss_res = loss.forward(y, target)                                  # 3. compare
        dy = loss.backward(loss_res)                                               #    error at output
        grads, _ = model.backward(p, res, dy)                                      # 4. backward
        if compute_dtype is not None:
            value = value.astype(jnp.promote_types(value.dtype, jnp.float32))
            grads, new_state = cast_like(grads, params), cast_like(new_state, state)
        return value, new_state, y, grads

    return f


def value_and_grad(model: Layer, loss: Loss, *, compute_dtype: Optional[Any] = None):
    """Loss and gradients of ``model`` under ``loss``, computed entirely by the hand-written passes.

    Returns ``f(params, state, x, target, *, key=None) -> ((value, new_state), grads)``; it
    mirrors JAX's own ``value_and_grad(..., has_aux=True)`` so the two swap, and it is jittable.
    ``grads`` has the structure, shapes and dtypes of ``params``. The steps, in
    :func:`forward_backward`::

        y, new_state, res = model.forward(params, state, x, key=key, train=True)  # forward
        value, loss_res = loss.forward(y, target)                                 # compare
        dy = loss.backward(loss_res)                                              # error at output
        grads, _ = model.backward(params, res, dy)                                # backward

    ``compute_dtype=jnp.bfloat16`` runs the forward and backward in bfloat16 with ``params`` as
    float32 master weights (see :func:`forward_backward`).

    Example (run as a doctest by ``tests/test_docs.py``):

    >>> import jax, jax.numpy as jnp, bpjax as bp
    >>> net = bp.sequential(bp.dense(3), bp.relu(), bp.dense(2))
    >>> params, state, _ = net.init(jax.random.PRNGKey(0), (4,))
    >>> x, labels = jnp.ones((5, 4)), jnp.array([0, 1, 0, 1, 1])
    >>> (value, state), grads = bp.value_and_grad(net, bp.softmax_cross_entropy())(params, state, x, labels)
    >>> jax.tree_util.tree_map(jnp.shape, grads)
    ({'b': (3,), 'w': (4, 3)}, (), {'b': (2,), 'w': (3, 2)})
    >>> (ref, _), ref_grads = bp.reference_value_and_grad(net, bp.softmax_cross_entropy())(
    ...     params, state, x, labels)
    >>> bool(jnp.allclose(value, ref)) and all(jax.tree_util.tree_leaves(
    ...     jax.tree_util.tree_map(lambda a, b: jnp.allclose(a, b, atol=1e-6), grads, ref_grads)))
    True
    """
    check_model_and_loss("value_and_grad", model, loss)
    step = forward_backward(model, loss, compute_dtype=compute_dtype)

    def f(params, state, x, target, *, key=None):
        value, new_state, _, grads = step(params, state, x, target, key=key)
        return (value, new_state), grads

    return f
