"""Combinators: layers built from layers. Their backward is the chain rule, walked in reverse."""
from __future__ import annotations

import jax

from ._core import Layer, make_layer

__all__ = ["sequential", "residual"]


def _split(key, n):
    return [None] * n if key is None else list(jax.random.split(key, n))


def sequential(*layers: Layer) -> Layer:
    """Layers applied one after another: the network of the classic algorithm.

    Forward::   h₀ = x,  h_i = f_i(h_{i−1}),  y = h_L      keeping every layer's residuals r_i
    Backward::  dh_L = dy,  (dθ_i, dh_{i−1}) = f_i.backward(θ_i, r_i, dh_i)  for i = L … 1

    Params, state and residuals are tuples with one entry per layer. A ``key`` is split once
    per layer.
    """
    if not layers:
        raise ValueError("sequential: expected at least one layer, got none")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"sequential: expected a bpjax.Layer at position {i}, got {type(layer).__name__}"
                            " (did you forget to call the factory, e.g. relu() rather than relu?)")
    n = len(layers)

    def init(key, in_shape):
        params, states, shape = [], [], in_shape
        for layer, k in zip(layers, jax.random.split(key, n)):
            p, s, shape = layer.init(k, shape)
            params.append(p)
            states.append(s)
        return tuple(params), tuple(states), shape

    def forward(params, state, x, *, key=None, train=True):
        new_states, residuals = [], []
        for layer, p, s, k in zip(layers, params, state, _split(key, n)):
            x, s, r = layer.forward(p, s, x, key=k, train=train)   # walk forward, keep residuals
            new_states.append(s)
            residuals.append(r)
        return x, tuple(new_states), tuple(residuals)

    def backward(params, res, dy):
        dparams = [None] * n
        for i in reversed(range(n)):                                 # walk back in reverse
            dparams[i], dy = layers[i].backward(params[i], res[i], dy)
        return tuple(dparams), dy

    return make_layer("sequential", init, forward, backward)


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
        return dparams, dy + dx_f

    return make_layer("residual", init, forward, backward)
