"""Each example's share of one layer's gradient, for any cotangent dy at the layer's output.

A hand-written backward sums the weight gradient over the batch: dθ = Σ_n (example n's share,
built from x_n and dy_n alone). The curvature quantities need the shares themselves, for dy
the loss's error (the per-example gradients) and for dy a column of the loss Hessian's factor
(the per-example GGN columns J_nᵀ s_n). Both come from the layer's own backward, two ways:

    residuals   the layer's backward on example n's residuals and dy_n (a batch of one),
                vmapped over n: for the layers whose residuals all have the batch axis first
                (their factories name the per-example rules "dense", "embedding", "norm",
                "from_residuals"); or, for "columns" (conv), its per-example products over its
                im2col columns; for "projections" (attention, the recurrent layers), X_nᵀ E_n
                from the rows and errors of each weight the layer gives
    rerun       the layer's raw forward rerun on x_n (kept for it by ``bpjax.observe``'s tape),
                then its backward, vmapped over n: every other layer (a user's make_layer
                layer; a layer with params of its own beside its sub-layers', the GPT). A layer that draws random numbers
                (dropout) draws them anew for the batch of one.

``batch_norm`` in training mixes examples (its batch statistics): refused, naming it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .._observe import View, paused
from .._per_example import column_examples

__all__ = ["FROM_RESIDUALS", "FROM_ROWS", "per_example_dparams", "needs_tape"]

#: The per-example rules (``make_layer(..., per_example=...)``) whose residuals have the batch axis first.
FROM_RESIDUALS = ("dense", "embedding", "norm", "columns", "from_residuals")
#: The rule whose layers give their weights' rows and errors (``example_rows``): attention, the
#: recurrent layers (whose residuals are time-major).
FROM_ROWS = ("projections",)


def needs_tape(per_example, params, leaf: bool) -> bool:
    """Whether a layer's input must be kept for a rerun: it has params and no rule by residuals
    (a combinator's params are its layers', which report themselves)."""
    if not jax.tree_util.tree_leaves(params):
        return False
    if not leaf:
        return per_example != "combinator"
    return per_example not in FROM_RESIDUALS + FROM_ROWS


def per_example_dparams(where: str, v: View, n: int):
    """Example n's share of ``v``'s dparams for the dy it got, every n: the tree of params
    with a leading axis N (``Σ_n`` of it is the layer's dparams)."""
    if v.per_example == "mixes_examples" and v.tape is not None and v.tape.train:
        raise ValueError(f"{where}: {v.label} mixes examples in training (it normalises with batch "
                         "statistics), so it has no per-example Jacobian; use train=False, layer_norm or group_norm")
    if v.leaf and v.per_example == "columns":
        return column_examples(v, n)                 # from its im2col columns
    if v.leaf and v.per_example in FROM_RESIDUALS:
        return _from_residuals(where, v, n)
    if v.leaf and v.per_example in FROM_ROWS:
        return _from_rows(v, n)
    return _rerun(where, v, n)


def _from_rows(v: View, n: int):
    """Each example's share from the layer's rows and errors of its weights (``example_rows``,
    for this dy): dW_n = X_nᵀ E_n and db_n = Σ_t E_nt.                              (N, ...)"""
    out = {}
    for w, (rows, err, b) in v.example_rows(v.params, v.res, v.dy).items():
        x, e = rows.reshape(n, -1, rows.shape[-1]), err.reshape(n, -1, err.shape[-1])   # (N, T, P), (N, T, Q)
        out[w] = jnp.einsum("ntp,ntq->npq", x, e)
        if b is not None:
            out[b] = jnp.sum(e, axis=1)
    return out


def _from_residuals(where: str, v: View, n: int):
    """The layer's backward on each example's residual rows and dy row, vmapped.   (N, ...)"""
    leaves, treedef = jax.tree_util.tree_flatten(v.res)
    mapped = [bool(a.ndim) and a.shape[0] == n for a in leaves]
    if not any(mapped):
        raise ValueError(f"{where}: {v.label}: expected residuals with the batch axis ({n}) first")

    def example(rows, dy1):
        rows = iter(rows)
        res = treedef.unflatten([next(rows)[None] if m else a for a, m in zip(leaves, mapped)])
        dparams, _ = v.backward(v.params, res, dy1[None])
        return dparams

    return jax.vmap(example)([a for a, m in zip(leaves, mapped) if m], v.dy)


def _rerun(where: str, v: View, n: int):
    """The layer's raw forward on x_n and its backward on dy_n, vmapped.            (N, ...)"""
    t = v.tape
    if t is None:
        raise ValueError(f"{where}: {v.label} has no per-example rule and its input was not kept")
    one = lambda a: a[None]                                                          # noqa: E731

    def example(x1, dy1):
        with paused():
            _, _, res = t.forward(v.params, t.state, jax.tree_util.tree_map(one, x1), key=t.key, train=t.train)
            dparams, _ = v.backward(v.params, res, jax.tree_util.tree_map(one, dy1))
        return dparams

    return jax.vmap(example)(t.x, v.dy)
