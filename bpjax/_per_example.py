"""Per-example gradient norms from one backward pass, without per-example gradients.

The loss is a mean over the N examples, so the error reaching a layer is dy_n = (1/N) ∂ℓ_n/∂y_n
and example n's own gradient (what ``bpjax.per_example_grads`` gives, a batch of one) is
g_n = N · Σ_layers (that layer's part built from x_n and dy_n alone). A layer's part of
‖g_n‖² is computed from its x and dy, by a rule per kind of layer (below); the parts of
different layers add (their parameters differ); the norm is ‖g_n‖ = N·√(Σ parts).

Each layer's factory names its rule where it builds the layer, ``make_layer(...,
per_example="dense")`` (``bpjax/layers/``); the rule travels with the layer, so neither the
layer's name nor the module it is written in decides it: a user's own layer called ``dense``
gets the rule of None (a rerun), unless it names another. The rules, for example n (rows t = the
positions of one example: T = 1 for x (N, D))::

    "dense" (dense)
        dW_n = X_nᵀ DY_n, db_n = Σ_t dy_nt                      X_n (T, D_in), DY_n (T, D_out)
        ‖dW_n‖² = ‖x_n‖²·‖dy_n‖²                                   when T = 1
                = ⟨X_n X_nᵀ, DY_n DY_nᵀ⟩  (Gram, T²·(D_in+D_out) multiply-adds)
                or ‖X_nᵀ DY_n‖²           (explicit, T·D_in·D_out), whichever is cheaper;
        explicitly, the dW_n are built, and clipped_grad takes Σ_n c_n dW_n from them (when
        N·params ≤ EXAMPLE_BYTES)
    "embedding" (embedding)
        dT_n[v] = Σ_{t: id_t = v} dy_nt:  ‖dT_n‖² = Σ_{t,t'} [id_t = id_t'] ⟨dy_nt, dy_nt'⟩
    "norm" (layer_norm, rms_norm, group_norm)
        dγ_n = Σ_t dy_nt ⊙ x̂_nt,  dβ_n = Σ_t dy_nt               (x̂ from the layer's residuals)
    "gpt" (gpt)
        its embedding and blocks by their rules, plus what the GPT itself does with params: the
        positions P (dP_n = dh0_n), the tied unembedding dE_out,n = DZ_nᵀ Ĥ_n (Gram or
        explicit), and, since E is used twice, the cross term
        2⟨dE_in,n, dE_out,n⟩ = 2 Σ_{t,t'} DZ_n[t', id_t]·⟨ĥ_nt', dh0_nt⟩
    "combinator" (sequential, residual, parallel, bidirectional, transformer_block)
        the sum of its layers' parts (its params are exactly its layers' params)
    "columns" (conv, conv_transpose)
        dense's rule with the output positions o as rows: the layer's ``example_rows`` gives its
        im2col columns (the window each o reads, per group) and dz = dy ⊙ f'(z), so
        dW_n[g] = Σ_o cols_nogᵀ dz_nog, ‖dW_n‖² by the Gram or the explicit form, whichever is
        cheaper; the columns are built for a few examples at a time (``COLUMN_CHUNK_BYTES``).
        In the explicit form the dW_n are built anyway: their sum is the layer's gradient (its
        own weight-gradient products are dropped), and clipped_grad sums Σ_n c_n dW_n from them
    "projections" (multi_head_attention, rnn, gru, lstm)
        dense's rule for each weight, with the layer's ``example_rows`` giving its rows and
        errors by its backward's own operations (XLA computes them once): attention's W_o on
        (O_n, DY_n) and W_qkv on (X_n, d[Q|K|V]_n); a recurrent layer's W_x on (x_nt, dgx_nt)
        and W_h on (h_n,t−1, dgh_nt) over the steps t (one weight used at every step: the sum
        over t is inside each example's product). clipped_grad takes Σ_n c_n dW_n from the
        explicit dW_n; the layer's gradient, one product over (n, t) per weight, replaces its own
    "from_residuals" (a layer of the user's that names it)
        the explicit per-example gradient of that layer alone: its own hand-written backward on
        each example's residuals and dy, vmapped over the examples (its residuals all have the
        batch axis first; dx is unused and XLA drops it)
    None (any other layer)
        the same, with the layer's raw forward rerun on each example first, from the input kept
        for it (a user's make_layer layer, a combinator of the user's with params of its own). Correct for any layer that does not mix examples; its
        memory is N times that layer's params.
    "mixes_examples" (batch_norm)
        in training, ``ValueError`` naming the layer: it normalises with batch statistics, so
        one example's gradient depends on the others. (In evaluation mode, ``train=False``, it
        does not mix examples and the rule of None applies.)
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp

from . import _checks, _core
from ._grad import value_and_grad
from ._observe import (
    REPLACE_DPARAMS,
    Client,
    View,
    _Slot,
    flatten_entries,
    observe,
    param_size,
    paused,
    run_observed,
    slot_records,
    sq_norm,
    unslot,
    with_records,
)

__all__ = ["per_example_grad_norms", "clipped_grad"]


def _acc(*arrays):
    """The arrays in their accumulation dtype (float32 for bfloat16; float64 stays)."""
    dt = _core.accumulation_dtype(*(a.dtype for a in arrays))
    return tuple(a.astype(dt) for a in arrays)


def _rows(a, n):
    """(N, T, K): one example's positions as rows (T = 1 for (N, K))."""
    return a.reshape(n, -1, a.shape[-1])


def sq_outer(x, dy):
    """‖X_nᵀ DY_n‖² for every n, for X (N, T, P) and DY (N, T, Q): the Gram form
    Σ_{t,t'} (X Xᵀ)_tt' (DY DYᵀ)_tt' when T·(P+Q) < P·Q, else the explicit product.   (N,)"""
    x, dy = _acc(x, dy)
    t, p, q = x.shape[1], x.shape[2], dy.shape[2]
    if t == 1:
        return jnp.sum(x[:, 0] ** 2, -1) * jnp.sum(dy[:, 0] ** 2, -1)               # (N,)
    if t * (p + q) < p * q:
        gx = jnp.einsum("ntp,nsp->nts", x, x)                                        # (N, T, T)
        gy = jnp.einsum("ntq,nsq->nts", dy, dy)                                      # (N, T, T)
        return jnp.sum(gx * gy, axis=(1, 2))
    return jnp.sum(jnp.einsum("ntp,ntq->npq", x, dy) ** 2, axis=(1, 2))             # (N,)


def _sum_sq_rows(a, n):
    """‖Σ_t a_nt‖² for every n.                                                          (N,)"""
    (a,) = _acc(_rows(a, n))
    return jnp.sum(jnp.sum(a, axis=1) ** 2, axis=-1)


# ----------------------------------------------------------------------------- rules


def _dense(v: View, n: int):
    (x,) = v.res
    x, dy = _rows(x, n), _rows(v.dy, n)                                              # (N, T, P), (N, T, Q)
    t, p, q = x.shape[1], x.shape[2], dy.shape[2]
    if t == 1 or t * (p + q) < p * q:                  # the norm without the dW_n is the cheaper
        sq = sq_outer(x, dy)
        if "b" in v.params:
            sq = sq + _sum_sq_rows(v.dy, n)                                          # the bias part
        return sq
    x, dy = _acc(x, dy)
    ex = {"w": jnp.einsum("ntp,ntq->npq", x, dy)}                                    # (N, P, Q) dW_n
    if "b" in v.params:
        ex["b"] = jnp.sum(dy, axis=1)                                                # (N, Q) db_n
    sq = sum(jnp.sum(a.reshape(n, -1) ** 2, axis=1) for a in ex.values())
    return _explicit(v, n, sq, ex)


def _embedding(v: View, n: int):
    (ids,) = v.res
    ids = ids.reshape(n, -1)                                                         # (N, T)
    vocab = v.params["table"].shape[0]
    valid = (ids >= 0) & (ids < vocab)                                               # others: no gradient
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # (N, T, T)
    (dy,) = _acc(_rows(v.dy, n))                                                     # (N, T, D)
    return jnp.sum(jnp.einsum("ntd,nsd->nts", dy, dy) * same, axis=(1, 2))


def _norm_layer(v: View, n: int):
    xhat = v.res[0]
    xh, dy = _acc(_rows(xhat, n), _rows(v.dy, n))
    sq = jnp.sum(jnp.sum(dy * xh, axis=1) ** 2, axis=-1)                             # the scale part
    if "bias" in v.params:
        sq = sq + jnp.sum(jnp.sum(dy, axis=1) ** 2, axis=-1)
    return sq


def _gpt(v: View, n: int, subs_sq):
    """The GPT's own use of params: positions, tied unembedding and the cross term (module doc)."""
    tok = next((e for e in v.subs if "_ids" in e.values), None)                   # its embedding
    if tok is None or not isinstance(v.res, dict) or "hf" not in v.res:
        return None
    ids, dh0 = tok.values["_ids"].reshape(n, -1), _rows(tok.values["_dy"], n)       # (N, T), (N, T, D)
    dz, hf, dh0 = _acc(_rows(v.dy, n), _rows(v.res["hf"], n), dh0)                   # (N, T, V), (N, T, D)
    vocab = v.params["tok"]["table"].shape[0]
    pos = jnp.sum(dh0 ** 2, axis=(1, 2))                                             # dP_n = dh0_n
    out = sq_outer(hf, dz)                                                           # ‖DZ_nᵀ Ĥ_n‖²
    valid = (ids >= 0) & (ids < vocab)
    g = jnp.take_along_axis(dz, jnp.clip(ids, 0, vocab - 1)[:, None, :], axis=2)     # (N, T', T) DZ[t', id_t]
    m = jnp.einsum("nsd,ntd->nst", hf, dh0)                                          # (N, T', T) ⟨ĥ_t', dh0_t⟩
    cross = 2 * jnp.sum(g * m * valid[:, None, :], axis=(1, 2))
    return subs_sq + pos + out + cross


def column_examples(v: View, n: int):
    """Each example's share of a "columns" layer's dparams for the dy it got, every n: the tree of
    params with a leading axis N, from its im2col columns (no vmapped backward; the curvature
    quantities' per-example shares)."""
    return _columns(v, n, examples=True)


def _columns(v: View, n: int, *, examples: bool = False):
    """The "columns" rule (conv, conv_transpose; module doc): ‖dW_n‖² + ‖db_n‖² for every n,
    from the layer's ``example_rows`` (its im2col columns and dz), within each group, as dense's
    with the output positions as rows; the columns built for a few examples at a time
    (``COLUMN_CHUNK_BYTES``). Returns ``{"sq": (N,)}`` when the Gram form is the cheaper, else the
    explicit per-example gradients' norms and their sum, under ``REPLACE_DPARAMS`` (the layer's gradient, which
    then replaces its own: XLA drops the layer's weight-gradient products), and, when they take at
    most ``EXAMPLE_BYTES``, the per-example gradients themselves, ``"_examples"`` (N, ...) (from
    which clipped_grad sums Σ_n c_n g_n without another product)."""
    leaves, treedef = jax.tree_util.tree_flatten(v.res)
    for a in leaves:
        _batch_leading(v, a, n)
    x, w = leaves[0], v.params["w"]
    kernel, c_out = w.shape[:-2], w.shape[-1]
    groups = x.shape[-1] // w.shape[-2]
    t, p, q = math.prod(v.dy.shape[1:-1]), math.prod(kernel) * w.shape[-2], c_out // groups
    per_example = t * math.prod(kernel) * x.shape[-1] * x.dtype.itemsize                       # its columns
    rows = (leaves, v.dy)
    if t * (p + q) < p * q and not examples:                        # the Gram form: norms only

        def gram(inputs):
            cols, dz = v.example_rows(v.params, treedef.unflatten(inputs[0]), inputs[1])                 # (b, T, G, P), (b, T, G, Q)
            b = cols.shape[0]
            by_group = lambda a: a.transpose(0, 2, 1, 3).reshape(b * groups, t, a.shape[-1])  # noqa: E731
            sq = jnp.sum(sq_outer(by_group(cols), by_group(dz)).reshape(b, groups), axis=1)
            if "b" in v.params:
                (dz,) = _acc(dz)
                sq = sq + jnp.sum(jnp.sum(dz, axis=1) ** 2, axis=(1, 2))                      # the bias part
            return sq, None

        return {"sq": _in_chunks(gram, rows, n, per_example, v.params, budget=COLUMN_CHUNK_BYTES)[0]}

    def explicit(inputs):
        cols, dz = _acc(*v.example_rows(v.params, treedef.unflatten(inputs[0]), inputs[1]))              # (b, T, G, P), (b, T, G, Q)
        b = cols.shape[0]
        dw = jnp.einsum("ntgp,ntgq->ngpq", cols, dz)                                           # (b, G, P, Q) dW_n
        sq = jnp.sum(dw ** 2, axis=(1, 2, 3))
        dw = dw.reshape(b, groups, math.prod(kernel), w.shape[-2], q).transpose(0, 2, 3, 1, 4)
        ex = {"w": dw.reshape(b, *w.shape)}                                                    # (b, *K, C_in/G, C_out)
        if "b" in v.params:
            ex["b"] = jnp.sum(dz, axis=1).reshape(b, c_out)                                    # (b, C_out) db_n
            sq = sq + jnp.sum(ex["b"] ** 2, axis=1)
        return sq, ex

    sq, kept, total = _in_chunks(explicit, rows, n, per_example, v.params, keep=examples or _keeps(v, n),
                                 budget=COLUMN_CHUNK_BYTES)
    if examples:
        return kept
    return _explicit(v, n, sq, kept, total)


def _keeps(v: View, n: int) -> bool:
    """Whether the N per-example gradients of ``v``'s layer fit in ``EXAMPLE_BYTES``."""
    return n * param_size(v.params) * 4 <= EXAMPLE_BYTES


def _explicit(v: View, n: int, sq, examples, total=None) -> dict:
    """A rule's result from the explicit per-example gradients (N, ...) it built: the norms,
    their sum ``total`` in place of the layer's own gradient where given, and the g_n for
    clipped_grad when they fit. Only the convolutions give ``total``: their own weight gradient
    is a loop over chunks of columns, which the sum saves; a dense-like layer's is one large
    matrix product, which XLA runs faster than the sum of N smaller ones (the GPT on 2 threads:
    1.13× a plain step without the sum, 1.31× with it; BENCHMARKS.md)."""
    out = {"sq": sq} if total is None else {"sq": sq, REPLACE_DPARAMS: total}
    if examples is not None and _keeps(v, n):
        out["_examples"] = examples
    return out


def _projections(v: View, n: int):
    """The "projections" rule (multi_head_attention, rnn, gru, lstm; module doc): each weight
    of the layer's ``example_rows``, {weight: (rows in (N, T, P), errors (N, T, Q), its bias or
    None)}, by dense's rule; the dW_n are kept for clipped_grad when every weight takes the
    explicit form. The layer's gradient, Σ_{n,t} of the same rows, replaces its own: for a
    recurrent layer, whose own dW_h is summed inside its reverse scan, that leaves XLA two
    identical scans, which it computes once."""
    sq, ex, total = jnp.zeros((n,), jnp.float32), {}, {}
    for w, (rows, err, b) in v.example_rows(v.params, v.res, v.dy).items():
        x, dy = _acc(_rows(rows, n), _rows(err, n))                                  # (N, T, P), (N, T, Q)
        t, p, q = x.shape[1], x.shape[2], dy.shape[2]
        total[w] = jnp.einsum("ntp,ntq->pq", x, dy)                                  # (P, Q) dW
        if t == 1 or t * (p + q) < p * q:
            sq = sq + sq_outer(x, dy)
        else:
            ex[w] = jnp.einsum("ntp,ntq->npq", x, dy)                                # (N, P, Q) dW_n
        if b is not None:
            ex[b] = jnp.sum(dy, axis=1)                                              # (N, Q) db_n
            total[b] = jnp.sum(ex[b], axis=0)                                        # (Q,) db
    sq = sq + sum(jnp.sum(a.reshape(n, -1) ** 2, axis=1) for a in ex.values())
    out = _explicit(v, n, sq, ex if set(ex) == set(v.params) else None)          # g_n only if all explicit
    out[REPLACE_DPARAMS] = total
    return out


#: The rules of a leaf layer by the name its factory gives ``make_layer(..., per_example=...)``:
#: (view, N) -> (N,) squared norms.
LEAF_RULES = {"dense": _dense, "embedding": _embedding, "norm": _norm_layer, "columns": _columns,
              "projections": _projections}
#: The rules of a layer with params of its own beside its sub-layers': (view, N, the sum of
#: the sub-layers' parts) -> (N,), or None when the residuals are not the expected ones.
COMPOSITE_RULES = {"gpt": _gpt}
#: A leaf layer whose residuals all have the batch axis first: its own backward is vmapped over
#: them (``_from_residuals``, no forward rerun).
FROM_RESIDUALS = "from_residuals"
#: A layer whose params are exactly its sub-layers': its part is the sum of theirs.
COMBINATOR = "combinator"
#: A layer that mixes examples in training (batch statistics).
MIXES_EXAMPLES = "mixes_examples"
#: Every rule a layer may name.
RULES = {*LEAF_RULES, *COMPOSITE_RULES, FROM_RESIDUALS, COMBINATOR, MIXES_EXAMPLES}


# ----------------------------------------------------------------------------- the rules by the layer's own backward


def _from_residuals(v: View, n: int):
    """‖one example's gradient of this layer alone‖², for every example: the layer's own
    backward on example n's residuals and dy_n (a batch of one), mapped over the examples
    (vmapped in chunks, ``CHUNK_BYTES``). Only for layers whose every residual has the batch
    axis first (``FROM_RESIDUALS``); their dx is unused, and XLA drops it."""
    leaves, treedef = jax.tree_util.tree_flatten(v.res)
    mapped = [_batch_leading(v, a, n) for a in leaves]
    one = lambda a: a[None]                                                          # noqa: E731

    def examples(inputs):
        def example(inputs):
            rows, dy1 = inputs                                                       # example n's
            rows = iter(rows)
            res = treedef.unflatten([next(rows)[None] if m else a for a, m in zip(leaves, mapped)])
            dparams, _ = v.backward(v.params, res, jax.tree_util.tree_map(one, dy1))
            return sq_norm(dparams)
        return jax.vmap(example)(inputs), None

    rows = [a for a, m in zip(leaves, mapped) if m]
    return _in_chunks(examples, (rows, v.dy), n, sum(a.nbytes // n for a in rows), v.params)[0]


def _batch_leading(v: View, a, n: int) -> bool:
    """Whether residual ``a`` has the batch axis first (a 0-sized one: a shape record, False);
    ValueError naming the layer when it has neither."""
    if a.ndim and a.shape[0] in (n, 0):
        return a.shape[0] == n
    raise ValueError(f"per_example_grad_norms: {v.label}: expected every residual to have the "
                     f"batch axis ({n}) first, got one of shape {tuple(a.shape)}")


def _in_chunks(examples, rows, n: int, per_example_bytes: int, params, *, keep: bool = False,
               budget: Optional[int] = None):
    """``examples(rows of b examples) -> (sq (b,), a tree of (b, ...) or None)`` over all n, b
    examples at a time (b the largest divisor of n with b·``per_example_bytes`` ≤ ``budget``,
    by default ``CHUNK_BYTES``), each chunk sliced in place in a loop, so that what one chunk builds exists
    for b examples at a time. Returns ``(sq (N,), the trees joined (N, ...) when keep else None,
    their sum over the examples)``."""
    chunk = _divisor_at_most(n, (CHUNK_BYTES if budget is None else budget) // max(per_example_bytes, 1))
    total = lambda tree: jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), tree)  # noqa: E731
    if chunk == n:
        sq, tree = examples(rows)
        return sq, (tree if keep else None), total(tree)
    part = lambda i: jax.tree_util.tree_map(                                          # noqa: E731
        lambda a: jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk), rows)
    dtype = _core.accumulation_dtype(*(a.dtype for a in jax.tree_util.tree_leaves(params)))
    shapes = jax.eval_shape(examples, part(0))[1]
    zeros = lambda lead: jax.tree_util.tree_map(lambda s: jnp.zeros(lead + s.shape[1:], s.dtype), shapes)  # noqa: E731

    def body(i, out):                                 # examples [i·chunk, (i+1)·chunk)
        sq, kept, summed = out
        sq_i, tree = examples(part(i))
        sq = jax.lax.dynamic_update_slice_in_dim(sq, sq_i.astype(sq.dtype), i * chunk, 0)
        if keep:
            kept = jax.tree_util.tree_map(lambda k, a: jax.lax.dynamic_update_slice_in_dim(k, a, i * chunk, 0),
                                          kept, tree)
        else:
            summed = jax.tree_util.tree_map(jnp.add, summed, total(tree))
        return sq, kept, summed

    init = (jnp.zeros((n,), dtype), zeros((n,)) if keep else None, None if keep else zeros(()))
    sq, kept, summed = jax.lax.fori_loop(0, n // chunk, body, init)                   # (N,)
    return sq, kept, (total(kept) if keep else summed)


def _divisor_at_most(n: int, most: int) -> int:
    """The largest divisor of n that is at most ``most`` (at least 1)."""
    return max(d for d in range(1, max(1, min(n, most)) + 1) if n % d == 0)


#: Bytes of residuals (or of columns) taken at once by ``_from_residuals`` and ``_columns``: a
#: loop takes the examples in chunks of at most this much (a divisor of N), so that what one
#: example builds (a convolution's columns, attention's probabilities) exists for a chunk of
#: examples at a time, not all N.
CHUNK_BYTES = 2**22
#: Bytes of im2col columns the "columns" rule builds at once: smaller than ``CHUNK_BYTES``, as
#: one chunk's columns and products are fastest while they stay in cache (on the 2-core CPU of
#: BENCHMARKS.md, the 2-D CNN at b64: 1.08× a plain step at 1 MiB, 1.24× at 4, 1.57× at 32).
COLUMN_CHUNK_BYTES = 2**20
#: The most bytes (counted as float32) of per-example gradients the "columns" rule keeps for
#: clipped_grad, N times the layer's params: above it, clipped_grad's second pass redoes the
#: layer's weight-gradient products with the scaled dy instead.
EXAMPLE_BYTES = 2**26


def _rerun(v: View, n: int):
    """‖one example's gradient of this layer alone‖², for every example: the layer's raw
    forward and backward rerun on x_n (a batch of one), vmapped over the examples."""
    t = v.tape
    if t is None:
        raise ValueError(f"per_example_grad_norms: {v.label} has no rule and its input was not kept; "
                         "it cannot be split by example")
    one = lambda a: a[None]                                                          # noqa: E731

    def example(x1, dy1):
        with paused():
            _, _, res = t.forward(v.params, t.state, jax.tree_util.tree_map(one, x1), key=t.key, train=t.train)
            dparams, _ = v.backward(v.params, res, jax.tree_util.tree_map(one, dy1))
        return sq_norm(dparams)

    return jax.vmap(example)(t.x, v.dy)                                              # (N,)


class FallbackWarning(UserWarning):
    """A layer with params and no per-example rule of its own: its part of the norms came from
    its backward vmapped over the examples (``_from_residuals``, ``_rerun``)."""


def _warn_fallback(who: str, v: View, rerun: bool) -> None:
    how = "its forward rerun and its backward" if rerun else "its backward"
    warnings.warn(f"{who}: {v.label} has no per-example rule of its own (make_layer(..., per_example=...)), so its "
                  f"part of each example's norm comes from {how} vmapped over the examples, which costs about N "
                  "times that layer's gradient memory", FallbackWarning, stacklevel=2)


class _PerExample(Client):
    """Each layer's part of every example's squared gradient norm, ``values["sq"]`` (N,)."""

    def __init__(self, n: int, who: str = "per_example_grad_norms"):
        self.n, self.who = n, who
        self.pure = True                # every layer with params is a leaf used once (clipped_grad)
        self.leaf_sq: list = []         # (path, sq (N,)) of every leaf with params, in backward order
        self.leaf_examples: list = []   # and its per-example gradients (N, ...) where its rule kept them, or None

    def tape(self, name, per_example, params, leaf):
        if per_example is not None and per_example not in RULES:
            raise ValueError(f"per_example_grad_norms: {name}: expected per_example to name one of the rules "
                             f"{sorted(RULES)} or to be None, got {per_example!r}")
        if not jax.tree_util.tree_leaves(params):
            return False
        if not leaf:                    # a user's combinator may have params of its own: rerun it
            return per_example is None
        return per_example not in LEAF_RULES and per_example != FROM_RESIDUALS

    def measure(self, v: View) -> dict:
        rule = v.per_example
        if rule == MIXES_EXAMPLES and v.tape is not None and v.tape.train:
            raise ValueError(f"per_example_grad_norms: {v.label} mixes examples in training (it normalises "
                             "with batch statistics), so an example's gradient depends on the others; "
                             "use layer_norm or group_norm, or train=False")
        if not jax.tree_util.tree_leaves(v.params) and v.leaf:
            return {}
        if v.leaf:
            if rule in LEAF_RULES:
                out = LEAF_RULES[rule](v, self.n)
            elif rule == FROM_RESIDUALS:
                _warn_fallback(self.who, v, rerun=False)
                out = _from_residuals(v, self.n)
            else:
                _warn_fallback(self.who, v, rerun=True)
                out = _rerun(v, self.n)
            out = dict(out) if isinstance(out, dict) else {"sq": out}
            self.leaf_sq.append((v.label, out["sq"]))
            examples = out.pop("_examples", None)
            self.leaf_examples.append(examples)
            if self.slots and examples is not None:
                out["_examples"] = examples           # recorded for a second pass through scans
            if rule == "embedding":
                out.update(_ids=v.res[0], _dy=v.dy)   # for a composite that also uses the table (gpt)
            return out
        subs_sq = sum((e.values["sq"] for e in v.subs if "sq" in e.values), jnp.zeros((self.n,), jnp.float32))
        if param_size(v.params) != sum(e.size for e in v.subs):
            self.pure = False
        if rule in COMPOSITE_RULES:
            sq = COMPOSITE_RULES[rule](v, self.n, subs_sq)
            if sq is not None:
                return {"sq": sq}
        elif param_size(v.params) == sum(e.size for e in v.subs):
            return {"sq": subs_sq}                   # a combinator: its params are its layers'
        _warn_fallback(self.who, v, rerun=True)
        return {"sq": _rerun(v, self.n)}


def per_example_grad_norms(model, loss, *, compute_dtype: Optional[Any] = None):
    """The batch gradient and every example's own gradient norm, from one backward pass.

    Returns ``f(params, state, x, target, *, key=None) -> ((value, new_state), grads, norms)``:
    ``(value, new_state), grads`` are ``bp.value_and_grad``'s (a convolution's gradient summed
    from the per-example ones its rule built, equal up to rounding), and ``norms`` (N,)
    holds ‖g_n‖, the L2 norm over all params of example n's own gradient (the gradient of its
    loss alone, what :func:`bpjax.per_example_grads` gives for it), computed from each layer's
    x and dy by the rules of this module, without building the g_n. Jittable; works with a
    batch sharded over devices.

    Raises ``ValueError`` naming the layer for a model with ``batch_norm`` in training (it
    mixes examples). Warns (``FallbackWarning``, at trace time) naming each layer with params
    that has no rule of its own (a user's layer): its part comes from its backward vmapped
    over the examples. The loss must be a mean over examples (every bpjax loss is).
    """
    _core.check_model_and_loss("per_example_grad_norms", model, loss)
    vg = value_and_grad(model, loss, compute_dtype=compute_dtype)

    def f(params, state, x, target, *, key=None):
        n = jax.tree_util.tree_leaves(x)[0].shape[0]
        run = observe(vg, _PerExample(n))
        ((value, new_state), grads), entries = run(params, state, x, target, key=key)
        sq = sum((e.values["sq"] for e in entries if "sq" in e.values), jnp.zeros((n,), jnp.float32))
        return (value, new_state), grads, n * jnp.sqrt(sq)

    return f


# ----------------------------------------------------------------------------- clipping

#: The clip modes of :func:`clipped_grad` (and ``bpjax train --dp-clip-mode``).
CLIP_MODES = ("flat", "per-layer", "automatic")
#: γ of automatic clipping, g_n/(‖g_n‖ + γ): small beside the norms it divides by, it only keeps
#: an example with a near-zero gradient from being scaled up without bound (Bu et al. 2022 use 0.01).
AUTO_GAMMA = 0.01


def check_clip(who: str, clip, mode: str = "flat", gamma: float = AUTO_GAMMA, option: str = "clip_norm"):
    """``(clip, sensitivity)``: ``clip`` checked for ``mode`` and made hashable (a float, a
    tuple of L floats, or a tuple of (layer path, float) pairs from a mapping), and the L2
    sensitivity of the clipped sum Σ_n clip(g_n) (what one example added or removed moves it by at
    most, what DP-SGD's noise is calibrated to): C (flat), √(Σ_l C_l²) (per-layer; C for the
    equal split C_l = C/√L), C (automatic, each term's norm is C·‖g_n‖/(‖g_n‖+γ) < C; 1 as Bu
    et al. take C = 1). Or ``ValueError`` naming ``option``."""
    if mode not in CLIP_MODES:
        raise ValueError(f"{who}: expected the clip mode to be one of {', '.join(CLIP_MODES)}, got {mode!r}")

    def positive(c, what=option):
        c = _checks.check_real(who, what, c)
        if not c > 0:
            raise ValueError(f"{who}: expected {what} > 0, got {c!r}")
        return c

    if mode == "automatic":
        g = _checks.check_real(who, "gamma", gamma)
        if not g > 0:
            raise ValueError(f"{who}: expected gamma > 0 (automatic clipping), got {gamma!r}")
    if mode == "per-layer" and isinstance(clip, Mapping):
        pairs = tuple((str(k), positive(v, f"{option}[{k!r}]")) for k, v in clip.items())
        if not pairs:
            raise ValueError(f"{who}: expected a threshold for every layer with params, got an empty mapping")
        return pairs, math.sqrt(sum(c * c for _, c in pairs))
    if mode == "per-layer" and isinstance(clip, (list, tuple)) and clip and isinstance(clip[0], (list, tuple)):
        return check_clip(who, dict(clip), mode, gamma, option)                      # pairs again
    if mode == "per-layer" and isinstance(clip, (list, tuple)):
        cs = tuple(positive(c, f"{option}[{i}]") for i, c in enumerate(clip))
        if not cs:
            raise ValueError(f"{who}: expected a threshold for every layer with params, got an empty sequence")
        return cs, math.sqrt(sum(c * c for c in cs))
    c = positive(clip)
    return c, c


def _check_microbatch(who: str, microbatch, option: str = "microbatch"):
    if microbatch is not None and (isinstance(microbatch, bool) or int(microbatch) != microbatch or microbatch < 1):
        raise ValueError(f"{who}: expected {option} to be an integer >= 1 or None, got {microbatch!r}")
    return None if microbatch is None else int(microbatch)


def clipped_grad(model, loss, clip_norm=None, *, mode: str = "flat", gamma: float = AUTO_GAMMA,
                 microbatch: Optional[int] = None):
    """The mean of the per-example gradients, each clipped (DP-SGD's gradient, before the
    noise), without per-example gradients.

    Returns ``f(params, state, x, target, *, key=None, mask=None) -> ((value, new_state), grads,
    norms)``, and ``f.sensitivity``, the L2 sensitivity S of the clipped sum (:func:`check_clip`):
    DP-SGD's noise on the sum has std σ·S. With g_n example n's gradient, g_{n,l} its part in
    layer l (the L leaf layers with params, in forward order), C = ``clip_norm``::

        norms_n = ‖g_n‖                                    (N,)  as per_example_grad_norms
        grads   = (1/N) Σ_n clip(g_n)                      the params' tree
        "flat"       clip(g_n) = min(1, C/‖g_n‖) g_n                              S = C
        "per-layer"  clip(g_n)_l = min(1, C_l/‖g_{n,l}‖) g_{n,l}                  S = √(Σ_l C_l²)
                     C_l: ``clip_norm`` a float C split equally, C_l = C/√L (S = C); a sequence of
                     L floats in forward order; or a mapping {layer path: C_l}, every layer's
        "automatic"  clip(g_n) = C g_n / (‖g_n‖ + γ)  (Bu et al. 2022; C = 1 by default)  S = C

    Automatic clipping has no threshold to tune: every example's gradient is normalised, C only
    rescales (like the learning rate), γ = ``gamma`` (default 0.01) keeps a near-zero gradient
    from being blown up. ``mask`` (N,) bool: a row outside it adds exactly nothing and its norm
    is returned as 0 (padded batches). ``microbatch`` = m: the batch is taken m rows at a time in a
    ``lax.scan`` (m must divide N), the clipped sums added, so only m rows' backward exists at
    once; the result equals the unchunked one up to rounding (microbatch i's layers get key
    ``fold_in(key, i)``, so dropout draws differ).

    One forward and one backward through the chain per (micro)batch (Book-Keeping, Bu et al.
    2023): the backward, observed, gives the norms, and each layer's per-example gradients where
    its rule builds them (dense over positions, conv, attention's projections); then, with
    c_n = the clip factor of example n, each leaf layer with params gets Σ_n c_n g_n: from its
    kept g_n (a weighted sum, no product), or from its own backward on its recorded error scaled
    row by row, dy_n ← c_n·dy_n (its weight products once more; its dx is not recomputed). For
    layers inside a scan (the GPT's blocks) or a model with params of its own beside its layers'
    (the GPT's positions and tied table) the records travel with the residuals to every step
    (``_SlotReplay``); only a scan inside a scan's body falls back to a whole second backward on
    the scaled error. Right for any model that does not mix examples (``batch_norm`` in
    training is refused, naming it); per-layer clipping also needs every layer with params to
    be a leaf used once, outside a scan (else ValueError).
    """
    _core.check_model_and_loss("clipped_grad", model, loss)
    if clip_norm is None and mode == "automatic":
        clip_norm = 1.0
    if clip_norm is None:
        raise ValueError(f"clipped_grad: expected clip_norm with mode {mode!r}, got None")
    c, sensitivity = check_clip("clipped_grad", clip_norm, mode, gamma)
    clipped = _clipped(model, loss, c, mode=mode, gamma=gamma,
                       microbatch=_check_microbatch("clipped_grad", microbatch))

    def f(params, state, x, target, *, key=None, mask=None):
        value, new_state, _, grads, norms = clipped(params, state, x, target, key, mask)
        return (value, new_state), grads, norms

    f.sensitivity = sensitivity
    return f


def _clipped(model, loss, c, *, mode: str = "flat", gamma: float = AUTO_GAMMA, microbatch: Optional[int] = None):
    """``f(params, state, x, target, key, mask=None) -> (value, new_state, y, clipped grads,
    norms)`` (``c`` as :func:`check_clip` returns it). With ``mask`` (N,) bool (DP-SGD's padded
    batches, :mod:`bpjax.privacy`) the clip factor of a row outside it is 0, so that its gradient
    adds exactly nothing, and its norm is returned as 0: grads = (1/N) Σ_{n in mask} clip(g_n).
    With ``microbatch`` = m, the same from N/m batches of m in a ``lax.scan``."""

    def passes(params, state, x, target, key):
        y, new_state, res = model.forward(params, state, x, key=key, train=True)       # forward
        value, loss_res = loss.forward(y, target)
        dy = loss.backward(loss_res)                                                   # (N, ...) = ∂ℓ_n/∂y / N
        model.backward(params, res, dy)                                                # observed: the norms
        return value, new_state, y, res, dy

    def factor(norms, cap):
        """Each row's clip factor from its norm (N,), the threshold ``cap``."""
        tiny = jnp.finfo(norms.dtype).tiny
        if mode == "automatic":
            return cap / (norms + gamma)
        return jnp.minimum(1.0, cap / jnp.maximum(norms, tiny))

    def one(params, state, x, target, key, mask=None):
        n = jax.tree_util.tree_leaves(x)[0].shape[0]
        client = _PerExample(n, "clipped_grad")
        client.slots = True                           # for a model with scans or params of its own
        (value, new_state, y, res, dy), hook = run_observed(passes, client, params, state, x, target, key)
        sq = sum((e.values["sq"] for e in hook.entries if "sq" in e.values), jnp.zeros((n,), jnp.float32))
        norms = n * jnp.sqrt(sq)                                                       # (N,)
        keep = (lambda a: a) if mask is None else (lambda a: jnp.where(mask, a, 0.0))  # padded rows: nothing
        per_leaf = None
        if mode == "per-layer":
            per_leaf = [keep(factor(n * jnp.sqrt(s), cap)) for s, cap in _layer_caps(c, client, hook)]
            scale = None
        else:
            scale = keep(factor(norms, c))                                             # (N,)
        norms = keep(norms)
        if client.pure and not hook.carried:          # only the weight products, redone
            _core._HOOKS.append(_Replay(hook.log, scale, per_leaf, client.leaf_examples))
            try:
                grads, _ = model.backward(params, res, dy)
            finally:
                _core._HOOKS.pop()
        elif mode != "per-layer" and _recorded(hook, res) is not None:
            _core._HOOKS.append(_SlotReplay(scale))   # scans, params of its own: from the records
            try:
                grads, _ = model.backward(params, _recorded(hook, res), _rows_scaled(dy, scale))
            finally:
                _core._HOOKS.pop()
        else:                                         # the whole backward again, dy's rows scaled
            (grads, _), _ = observe(model.backward, Client())(params, res, _rows_scaled(dy, scale))
        return value, new_state, y, _core.cast_like(grads, params), norms

    if microbatch is None:
        return one

    def f(params, state, x, target, key, mask=None):
        n = jax.tree_util.tree_leaves(x)[0].shape[0]
        m = microbatch
        if m >= n:
            return one(params, state, x, target, key, mask)
        if n % m:
            raise ValueError(f"clipped_grad: expected the microbatch ({m}) to divide the batch ({n} rows)")
        k = n // m
        split = lambda a: a.reshape((k, m) + a.shape[1:])                             # noqa: E731  (k, m, ...)
        xs = jax.tree_util.tree_map(split, (x, target, mask))

        def body(carry, inputs):
            total, state = carry
            i, (xb, tb, mb) = inputs
            kb = None if key is None else jax.random.fold_in(key, i)
            value, state, y, grads, norms = one(params, state, xb, tb, kb, mb)
            # grads = (1/m) Σ_{n in microbatch i} clip(g_n)
            return (jax.tree_util.tree_map(jnp.add, total, grads), state), (value, y, norms)

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        (total, new_state), (values, ys, norms) = jax.lax.scan(body, (zeros, state), (jnp.arange(k), xs))
        grads = jax.tree_util.tree_map(lambda t: t * (m / n), total)                 # (1/N) Σ_n clip(g_n)
        merge = lambda a: a.reshape((n,) + a.shape[2:])                               # noqa: E731
        return jnp.mean(values), new_state, jax.tree_util.tree_map(merge, ys), grads, norms.reshape(n)

    return f


def _layer_caps(c, client, hook):
    """[(sq (N,), C_l)] for every leaf layer with params, in the order of its backward (the
    replay's), from ``c``: a float C (C_l = C/√L), L floats in forward order, or (path, C_l)
    pairs naming every layer; ValueError when the model does not allow per-layer clipping."""
    if not client.pure or hook.carried:
        raise ValueError("clipped_grad: per-layer clipping needs every layer with params to be a leaf layer used "
                         "once outside a scan (a layer with params of its own beside its sub-layers', or one "
                         "stacked by a scan, has no per-layer dy to scale)")
    labels = [e.label for e in flatten_entries(hook.entries) if "sq" in e.values]   # forward order
    if isinstance(c, float):
        caps = dict.fromkeys(labels, c / math.sqrt(len(labels)))
    elif c and isinstance(c[0], tuple):
        caps = dict(c)
        if set(caps) != set(labels):
            raise ValueError(f"clipped_grad: expected per-layer thresholds for exactly the layers {labels}, "
                             f"got {sorted(caps)}")
    else:
        if len(c) != len(labels):
            raise ValueError(f"clipped_grad: expected {len(labels)} per-layer thresholds (one per layer with "
                             f"params: {labels}), got {len(c)}")
        caps = dict(zip(labels, c))
    return [(sq, caps[label]) for label, sq in client.leaf_sq]


def _rows_scaled(tree, scale):
    """Every array of ``tree`` (N, ...) with row n multiplied by scale[n]."""
    return jax.tree_util.tree_map(
        lambda a: a * scale.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype), tree)


def _recorded(hook, res):
    """The residuals with every leaf's record of the first pass (``with_records``), or None
    when some could not be recorded (a scan in a scan, a layer whose backward did not run)."""
    records = slot_records(hook)
    if records is None:
        return None
    try:
        return with_records(res, records)
    except KeyError:
        return None


class _SlotReplay:
    """The hook of clipped_grad's second pass for a model the first pass could not replay leaf
    by leaf (layers in a scan, the GPT's own params): the model's backward runs again on the
    scaled error, dy_n ← c_n·dy_n, but each leaf layer with params takes what the first pass
    recorded for it from its residuals (``_Slot``, at every step of a scan): Σ_n c_n g_n from its
    kept per-example gradients, or its backward on c ⊙ (its recorded dy) for its dparams, and
    c ⊙ (its recorded dx) as the dx it sends on. The backward being linear in dy, row by row,
    that is what the whole backward would give, and the dx chain is not computed again (the
    errors reaching those layers are unused, and XLA drops them); what remains is each layer's
    weight products, or none, and the code between the layers (additions, the GPT's own products)."""

    def __init__(self, scale):
        self.scale = scale

    def layer_forward(self, name, token, forward, params, state, x, *, key, train):
        return forward(params, state, x, key=key, train=train)

    def layer_backward_checked(self, name, token, backward, finish, params, res, dy):
        record = res.record if isinstance(res, _Slot) else None
        if record is None:
            return finish(params, backward(params, unslot(res), dy))
        if "_examples" in record:
            dparams = jax.tree_util.tree_map(lambda g: jnp.tensordot(self.scale.astype(g.dtype), g, axes=1),
                                             record["_examples"])
        else:
            dparams, _ = backward(params, unslot(res), _rows_scaled(record["_dy"], self.scale))
        return finish(params, (dparams, _rows_scaled(record["_dx"], self.scale)))

    def loss_forward(self, name, forward, pred, target):
        return forward(pred, target)

    def loss_backward(self, name, backward, res, dvalue):
        return backward(res, dvalue)


class _Replay:
    """The hook of clipped_grad's second pass, when every layer with params is a leaf used once
    and none ran in a scan: each leaf's backward gets the dy it got in the first pass, rows
    scaled, and only its dparams are kept; the dx it returns is the first pass's, so the dx
    chain is not computed again (XLA drops the unused dx products). A leaf whose rule kept its
    per-example gradients g_n (a convolution's, ``_columns``) gets Σ_n scale_n g_n from them
    instead, without a product. Combinators run their own backward (additions, slices) on those."""

    def __init__(self, log, scale, per_leaf=None, examples=()):
        self.log, self.scale, self.i = log, scale, 0
        self.per_leaf = None if per_leaf is None else iter(per_leaf)   # per-layer clipping: a scale per leaf
        self.examples = iter(examples)  # per leaf with params: its per-example gradients (N, ...), or None

    def layer_forward(self, name, token, forward, params, state, x, *, key, train):
        return forward(params, state, x, key=key, train=train)

    def layer_backward_checked(self, name, token, backward, finish, params, res, dy):
        record = self.log[self.i]
        self.i += 1
        if record["token"] is not token:
            raise RuntimeError(f"clipped_grad: the second backward reached {name} out of the first's order")
        res = unslot(res)
        if not record["leaf"]:
            return finish(params, backward(params, res, dy))
        if not jax.tree_util.tree_leaves(params):
            return finish(params, (params, record["dx"]))
        scale = self.scale if self.per_leaf is None else next(self.per_leaf)
        examples = next(self.examples, None)
        if examples is not None:        # Σ_n scale_n g_n from the first pass's g_n: no product redone
            dparams = jax.tree_util.tree_map(lambda g: jnp.tensordot(scale.astype(g.dtype), g, axes=1), examples)
        else:
            dparams, _ = backward(params, res, _rows_scaled(record["dy"], scale))
        return finish(params, (dparams, record["dx"]))

    def loss_forward(self, name, forward, pred, target):
        return forward(pred, target)

    def loss_backward(self, name, backward, res, dvalue):
        return backward(res, dvalue)
