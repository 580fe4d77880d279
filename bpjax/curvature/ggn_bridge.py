"""The GGN-vector product G v = Jᵀ H J v, matrix-free, from the hand-written backward.

The backward of the model is the map dy ↦ dθ = Jᵀ dy, linear in dy (its residuals fixed). Its
transpose is therefore the forward-mode map v ↦ J v, and ``jax.linear_transpose`` builds that
transpose from the hand-written backward itself, without differentiating anything: this module
is the one place of ``bpjax.curvature`` allowed to call it (a bridge, by the project's rule that
JAX's transformations of derivatives live only in modules named so; ``tests/test_rules.py``).

    u  = J v              linear_transpose(dy ↦ backward(θ, res, dy))(v)     (N, ...) like y
    Hu = H u              the loss's Hessian at y, example by example (``loss_hessian``)
    Gv = Jᵀ H u           the backward of Hu                                  θ's tree
"""
from __future__ import annotations

import jax

from .. import _core
from .loss_hessian import check_loss_known, hessian_product

__all__ = ["ggn_vector_product"]


def ggn_vector_product(model, loss, *, train: bool = True):
    """``f(params, state, x, target, v, *, key=None) -> Gv``: the GGN of the batch loss L
    (G = Σ_n J_nᵀ H_n J_n, H_n = ∂²L/∂y_n²) times ``v``, a tree like ``params``; one forward,
    the transpose of the backward (J v), and one backward. Jittable."""
    _core.check_model_and_loss("ggn_vector_product", model, loss)
    check_loss_known("ggn_vector_product", loss)

    def f(params, state, x, target, v, *, key=None):
        y, _, res = model.forward(params, state, x, key=key, train=train)
        _, loss_res = loss.forward(y, target)

        def backward(dy):                                      # dy ↦ Jᵀ dy, linear
            return model.backward(params, res, dy)[0]

        (jv,) = jax.linear_transpose(backward, y)(_core.cast_like(v, params))   # (N, ...) J v
        hjv = hessian_product(loss, y, loss_res, jv)
        return _core.cast_like(backward(hjv), params)

    return f
