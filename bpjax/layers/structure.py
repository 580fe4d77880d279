"""Dropout, embedding lookup, flatten and reshape, each with its hand-written backward."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .. import initializers
from .._checks import check_positive_int, check_real, concrete, shape_record
from .._core import Layer, accumulation_dtype, make_layer

__all__ = ["dropout", "embedding", "flatten", "reshape"]


# ----------------------------------------------------------------------------- dropout


def dropout(rate: float) -> Layer:
    """Inverted dropout: each entry is zeroed with probability p = ``rate`` and the survivors
    are scaled by 1/(1 − p), so that E[y] = x and evaluation needs no rescaling.

    Forward, training (``train=True``), with the mask drawn from the explicit ``key``::

        keep = jax.random.bernoulli(key, 1 − p, x.shape)                    (N, ...)  bool
        m = keep / (1 − p)                                                   (N, ...)
        y = x ⊙ m                                                            (N, ...)

    Backward (the mask is saved in the residuals)::

        dx = dy ⊙ m                                                          (N, ...)

    The same key gives the same mask. In evaluation (``train=False``), and for p = 0, the layer
    is the identity (y = x, dx = dy) and needs no key. A missing key in training raises
    ``ValueError``. ``rate`` must lie in [0, 1).
    """
    name = "dropout"
    p = check_real(name, "rate", rate)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name}: expected rate in [0, 1), got rate={rate!r}")

    def init(key, in_shape):
        return (), (), in_shape

    def forward(params, state, x, *, key=None, train=True):
        if not train or p == 0.0:
            return x, state, ()                                    # the identity: nothing to save
        if key is None:
            raise ValueError(f"{name}: expected a PRNG key in training (forward(..., key=key)), got key=None")
        keep = jax.random.bernoulli(key, 1.0 - p, x.shape)         # (N, ...)
        m = keep.astype(x.dtype) / jnp.asarray(1.0 - p, x.dtype)   # (N, ...)
        return x * m, state, (m,)

    def backward(params, res, dy):
        if not res:                                                # evaluation or p = 0
            return (), dy
        (m,) = res
        return (), dy * m                                          # (N, ...)

    return make_layer(name, init, forward, backward)


# ----------------------------------------------------------------------------- embedding


def embedding(vocab_size: int, dim: int, *, table_init=jax.nn.initializers.normal(1.0),
              param_dtype=jnp.float32) -> Layer:
    """A lookup table: integer ids pick rows of T.

    Forward::

        y[n, …] = T[ids[n, …]]        ids (N, ...) integer in [0, V),  T (V, D),  y (N, ..., D)

    Backward: each row of T receives the sum of the dy at the positions that looked it up
    (a scatter-add); integer indices have no gradient, so ``dx`` is ``None``::

        dT = zeros(V, D).at[ids].add(dy)          dT[v] = Σ_{positions with ids = v} dy   (V, D)
        dx = None

    The scatter-add sums in float32 for bfloat16 (``accumulation_dtype``).
    Params ``{"table": (V, D)}``, initialised N(0, 1) (``table_init``). Float or bool ids raise
    ``TypeError``; ids outside [0, V) raise ``ValueError`` when their values are known (outside
    ``jit``). Under ``jit`` such ids give a zero row and no gradient.
    """
    name = "embedding"
    vocab_size = check_positive_int(name, "vocab_size", vocab_size)
    dim = check_positive_int(name, "dim", dim)
    t_fn = initializers.get(table_init, name)

    def init(key, in_shape):
        return {"table": t_fn(key, (vocab_size, dim), param_dtype)}, (), (*in_shape, dim)

    def forward(params, state, x, *, key=None, train=True):
        y = params["table"].at[x].get(mode="fill", fill_value=0)   # (N, ..., D)
        return y, state, (x,)

    def backward(params, res, dy):
        (ids,) = res
        acc = accumulation_dtype(params["table"].dtype, dy.dtype)   # float32 sums for bfloat16
        dtable = jnp.zeros_like(params["table"], dtype=acc).at[ids].add(dy.astype(acc), mode="drop")  # (V, D)
        return {"table": dtable}, None

    def check(params, state, x):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name}: expected integer indices, got dtype {jnp.dtype(x.dtype).name} "
                            "(cast them first, e.g. ids.astype(jnp.int32))")
        ids = concrete(x)                                          # values are only known outside jit
        if ids is not None and ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= vocab_size:
                raise ValueError(f"{name}: expected indices in [0, {vocab_size}), got indices in [{lo}, {hi}]")

    return make_layer(name, init, forward, backward, check=check, float_input=False,
                      meaning="(batch, ...) of integer ids", per_example="embedding")


# ----------------------------------------------------------------------------- flatten, reshape


def _reshape_layer(name: str, resolve) -> Layer:
    """y = x.reshape(N, *resolve(x.shape[1:])),  dx = dy.reshape(x.shape)."""

    def init(key, in_shape):
        return (), (), resolve(in_shape)

    def forward(params, state, x, *, key=None, train=True):
        y = x.reshape(x.shape[0], *resolve(tuple(x.shape[1:])))   # (N, *out_shape)
        return y, state, (shape_record(x),)                       # (0, *in_shape): x's shape only

    def backward(params, res, dy):
        (like,) = res
        return (), dy.reshape(dy.shape[0], *like.shape[1:])      # (N, *in_shape)

    return make_layer(name, init, forward, backward)


def flatten() -> Layer:
    """Every axis but the batch axis into one.

    Forward::   y = x.reshape(N, D)       x (N, d₁, …, d_k),  D = d₁⋯d_k,  y (N, D)
    Backward::  dx = dy.reshape(N, d₁, …, d_k)

    x (N,) becomes (N, 1).
    """
    return _reshape_layer("flatten", lambda in_shape: (math.prod(in_shape),))


def reshape(shape) -> Layer:
    """Each example to ``shape`` (the batch axis is kept; one entry may be -1, inferred).

    Forward::   y = x.reshape(N, *shape)       x (N, ...),  y (N, *shape)
    Backward::  dx = dy.reshape(x.shape)

    ``shape`` must hold as many elements as one example; ``init`` and ``forward`` raise
    ``ValueError`` otherwise.
    """
    name = "reshape"
    try:
        target = tuple(int(d) for d in shape)
        if isinstance(shape, (str, bytes)) or any(isinstance(d, bool) or int(d) != d for d in shape):
            raise TypeError
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected shape to be a tuple of integers, got shape={shape!r}") from None
    if any(d <= 0 and d != -1 for d in target) or target.count(-1) > 1:
        raise ValueError(f"{name}: expected positive sizes and at most one -1, got shape={target}")

    def resolve(in_shape):
        size = math.prod(in_shape)
        known = math.prod(d for d in target if d != -1)
        out = tuple(size // known if d == -1 else d for d in target)
        if math.prod(out) != size:
            raise ValueError(f"{name}: expected a shape of {size} elements per example (in_shape={tuple(in_shape)}), "
                             f"got shape={target}")
        return out

    return _reshape_layer(name, resolve)
