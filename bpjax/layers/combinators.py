"""Combinators: layers built from layers. Their backward is the chain rule, walked in reverse."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .._checks import check_dx, input_record, shape_record
from .._core import Layer, check_is_layer, make_layer

__all__ = ["sequential", "residual", "parallel", "concat", "add"]


def _split(key, n):
    return [None] * n if key is None else list(jax.random.split(key, n))


def _check_layers(name, layers):
    if not layers:
        raise ValueError(f"{name}: expected at least one layer, got none")
    for i, layer in enumerate(layers):
        check_is_layer(name, None, layer, position=i)


def sequential(*layers: Layer) -> Layer:
    """Layers applied one after another: the network of the classic algorithm.

    Forward::   h₀ = x,  h_i = f_i(h_{i−1}),  y = h_L      keeping every layer's residuals r_i
    Backward::  dh_L = dy,  (dθ_i, dh_{i−1}) = f_i.backward(θ_i, r_i, dh_i)  for i = L … 1

    Params and state are tuples with one entry per layer; the residuals are that tuple of the
    layers' residuals and a zero-size record of each layer's input, against which each layer's
    ``dx`` is checked (a wrong shape is named where it happens, not in the layer below). A
    ``key`` is split once per layer. ``dx`` is ``None`` when the first layer takes integer ids
    (``embedding``).
    """
    _check_layers("sequential", layers)
    n = len(layers)

    def init(key, in_shape):
        params, states, shape = [], [], in_shape
        for layer, k in zip(layers, jax.random.split(key, n)):
            p, s, shape = layer.init(k, shape)
            params.append(p)
            states.append(s)
        return tuple(params), tuple(states), shape

    def forward(params, state, x, *, key=None, train=True):
        new_states, residuals, inputs = [], [], []
        for layer, p, s, k in zip(layers, params, state, _split(key, n)):
            inputs.append(input_record(x))                           # h_{i−1}'s shape and dtype, zero-size
            x, s, r = layer.forward(p, s, x, key=k, train=train)   # walk forward, keep residuals
            new_states.append(s)
            residuals.append(r)
        return x, tuple(new_states), (tuple(residuals), tuple(inputs))

    def backward(params, res, dy):
        residuals, inputs = res
        dparams = [None] * n
        for i in reversed(range(n)):                                 # walk back in reverse
            dparams[i], dy = layers[i].backward(params[i], residuals[i], dy)
            check_dx(f"sequential[{i}] ({layers[i].name})", dy, inputs[i])
        return tuple(dparams), dy

    # The first layer checks x's dtype: integer ids are right for an embedding, wrong for dense;
    # and whether x may be a tuple (a first layer that is a join).
    return make_layer("sequential", init, forward, backward, float_input=False, passes_tuples=True,
                      per_example="combinator")


def residual(layer: Layer) -> Layer:
    """A skip connection around ``layer`` (call it f).

    Forward::   y = x + f(x)                         x, y (N, ...)
    Backward::  (dθ, dx_f) = f.backward(θ, r, dy);   dx = dy + dx_f

    ``init`` raises ``ValueError`` if f changes the shape.
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"residual: expected a bpjax.Layer, got {type(layer).__name__}")

    def init(key, in_shape):
        params, state, out_shape = layer.init(key, in_shape)
        if tuple(out_shape) != tuple(in_shape):
            raise ValueError(f"residual: expected the inner layer to keep the shape {tuple(in_shape)}, "
                             f"got out_shape={tuple(out_shape)}")
        return params, state, in_shape

    def forward(params, state, x, *, key=None, train=True):
        fx, state, res = layer.forward(params, state, x, key=key, train=train)
        return x + fx, state, res

    def backward(params, res, dy):
        dparams, dx_f = layer.backward(params, res, dy)
        check_dx(f"residual ({layer.name})", dx_f, input_record(dy))   # dy + dx_f must not broadcast
        return dparams, dy + dx_f

    return make_layer("residual", init, forward, backward, per_example="combinator")


# ----------------------------------------------------------------------------- fan-out and joins


def parallel(*layers: Layer) -> Layer:
    """Fan-out: the same x to every branch; the output is the tuple of the branch outputs.

    Forward::   y = (f_1(x), …, f_B(x))                  x (N, ...), y_b (N, ...)_b
    Backward::  (dθ_b, dx_b) = f_b.backward(θ_b, r_b, dy_b)  for each branch b
                dx = Σ_b dx_b                            (N, ...)  (x was used B times)

    Params and state are tuples with one entry per branch, the residuals that tuple and a
    zero-size record of x (each branch's ``dx`` is checked against it); ``init`` returns a tuple
    of output shapes. A ``key`` is split once per branch. Join the branches with
    :func:`concat` or :func:`add`: ``sequential(parallel(a, b), concat())`` is an Inception
    block, ``sequential(parallel(f, shortcut), add())`` a ResNet block with a projection.
    """
    _check_layers("parallel", layers)
    n = len(layers)

    def init(key, in_shape):
        out = [layer.init(k, in_shape) for layer, k in zip(layers, jax.random.split(key, n))]
        return tuple(o[0] for o in out), tuple(o[1] for o in out), tuple(o[2] for o in out)

    def forward(params, state, x, *, key=None, train=True):
        out = [layer.forward(p, s, x, key=k, train=train)
               for layer, p, s, k in zip(layers, params, state, _split(key, n))]
        return tuple(o[0] for o in out), tuple(o[1] for o in out), (tuple(o[2] for o in out), input_record(x))

    def backward(params, res, dy):
        residuals, x_record = res
        grads = [layer.backward(p, r, d) for layer, p, r, d in zip(layers, params, residuals, dy)]
        for b, (layer, (_, dx_b)) in enumerate(zip(layers, grads)):
            check_dx(f"parallel[{b}] ({layer.name})", dx_b, x_record)
        dx = grads[0][1]
        for _, dx_b in grads[1:]:
            dx = dx + dx_b                                       # (N, ...)
        return tuple(g[0] for g in grads), dx

    return make_layer("parallel", init, forward, backward, per_example="combinator")


def concat(axis: int = -1) -> Layer:
    """Join: the concatenation of a tuple of arrays along ``axis`` (an axis of the full arrays,
    batch axis included; it may not be the batch axis).

    Forward::   y = concatenate((x_1, …, x_B), axis)     x_b (N, ..., K_b, ...), y (N, ..., ΣK_b, ...)
    Backward::  dx_b = dy[..., K_1+…+K_{b−1} : K_1+…+K_b, ...]   (the slice x_b filled), as x_b's dtype

    ``init(key, in_shape)`` takes a tuple of per-example shapes, one per input; they must
    agree on every axis but ``axis``.
    """
    name = "concat"
    if isinstance(axis, bool) or not isinstance(axis, int) or axis == 0:
        raise ValueError(f"{name}: expected axis to be an integer naming a non-batch axis (not 0), got axis={axis!r}")

    def example_axis(rank):
        """``axis`` as an axis of one example (rank ``rank``, without the batch axis)."""
        a = axis if axis > 0 else axis + rank + 1
        if not 1 <= a <= rank:
            raise ValueError(f"{name}: expected axis to name a non-batch axis of inputs of rank {rank + 1}, "
                             f"got axis={axis}")
        return a - 1

    def init(key, in_shape):
        ranks = {len(s) for s in in_shape}
        if len(ranks) > 1:
            raise ValueError(f"{name}: expected inputs of one rank, got in_shape={in_shape}")
        a = example_axis(ranks.pop())
        rest = {s[:a] + s[a + 1:] for s in in_shape}
        if len(rest) > 1:
            raise ValueError(f"{name}: expected the inputs to agree on every axis but axis={axis}, "
                             f"got in_shape={in_shape}")
        out = list(in_shape[0])
        out[a] = sum(s[a] for s in in_shape)
        return (), (), tuple(out)

    def forward(params, state, x, *, key=None, train=True):
        y = jnp.concatenate(x, axis=axis)                           # (N, ..., ΣK_b, ...)
        return y, state, tuple(shape_record(x_b) for x_b in x)      # (0, ..., K_b, ...): shapes only

    def backward(params, res, dy):
        a = example_axis(dy.ndim - 1) + 1                           # the axis in dy
        ends = [0]
        for like in res:
            ends.append(ends[-1] + like.shape[a])
        dx = tuple(jax.lax.slice_in_dim(dy, lo, hi, axis=a).astype(like.dtype)   # (N, ..., K_b, ...)
                   for lo, hi, like in zip(ends[:-1], ends[1:], res))
        return (), dx

    return make_layer(name, init, forward, backward, tuple_input=True, min_ndim=2,
                      meaning="(batch, ...)")


def add() -> Layer:
    """Join: the sum of a tuple of arrays of one shape.

    Forward::   y = x_1 + … + x_B                         x_b, y (N, ...)
    Backward::  dx_b = dy   for every b                   (N, ...), as x_b's dtype

    ``init(key, in_shape)`` takes a tuple of per-example shapes, all equal.
    """
    name = "add"

    def init(key, in_shape):
        if len(set(in_shape)) > 1:
            raise ValueError(f"{name}: expected inputs of one shape, got in_shape={in_shape}")
        return (), (), in_shape[0]

    def forward(params, state, x, *, key=None, train=True):
        y = x[0]
        for x_b in x[1:]:
            y = y + x_b                                             # (N, ...)
        return y, state, tuple(shape_record(x_b) for x_b in x)     # zero-size: the dtypes only

    def backward(params, res, dy):
        return (), tuple(dy.astype(like.dtype) for like in res)     # (N, ...) each

    return make_layer(name, init, forward, backward, tuple_input=True)
