"""Pooling layers (max, average, global max, global average), each with its hand-written backward.

Channels last, x (N, *spatial, C) with any number of spatial axes; a window slides over the
spatial axes of each channel separately. The backward passes of the windowed pools use the pair
of shifted views from ``_conv``: ``shifted_view`` reads, for one window offset κ, the cell at κ + o·s
of every output position o; ``place_view`` is its adjoint and writes such a view back into a zero
array. A backward is then a sum over κ of ``place_view``-d gradients, cropped to x.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._windows import (AXES, explicit_pads, kernel_offsets, check_padding, out_size, pad_config, per_axis, place_view, positive_ints,
                       spatial_rank, shifted_view)
from .._checks import shape_record
from .._core import Layer, make_layer

__all__ = ["max_pool", "avg_pool", "global_avg_pool", "global_max_pool"]


def _windows(name: str, window, strides, padding):
    """Check the hyperparameters; returns (rank or None, geometry(in_shape) -> (window, strides,
    pads, out)) with per-axis tuples for one example's shape."""
    window = positive_ints(name, "window", window)
    strides = window if strides is None else positive_ints(name, "strides", strides)
    padding = check_padding(name, padding)
    rank = spatial_rank(name, None, window=window, strides=strides,
                         padding=padding if isinstance(padding, tuple) else None)

    def geometry(in_shape):
        r = len(in_shape) - 1
        if r < 1 or (rank is not None and r != rank):
            want = f"{rank + 1} axes (*spatial, channels)" if rank else "at least 2 axes (*spatial, channels)"
            raise ValueError(f"{name}: expected in_shape with {want}, got in_shape={tuple(in_shape)}")
        w, s = per_axis(window, r), per_axis(strides, r)
        spatial = in_shape[:-1]
        _check_spatial(name, "in_shape", in_shape, spatial)
        pads = explicit_pads(padding, spatial, w, s)
        if any(lo >= k or hi >= k for k, (lo, hi) in zip(w, pads)):
            raise ValueError(f"{name}: expected padding smaller than the window {w} on each side, "
                             f"got padding {pads}")
        out = tuple(out_size(n, k, st, lo, hi) for n, k, st, (lo, hi) in zip(spatial, w, s, pads))
        if min(out) < 1:
            raise ValueError(f"{name}: expected the window {w} to fit in the padded input along every "
                             f"spatial axis, got spatial shape {tuple(spatial)} with padding {pads}")
        return w, s, pads, out

    return rank, geometry


def _check_spatial(name, arg, shape, spatial):
    """Raise if a spatial axis is empty (a window or a pool over no cells: −∞ or 0/0), or if
    there are no channels."""
    if min(spatial) < 1:
        raise ValueError(f"{name}: expected every spatial axis to have at least one cell, "
                         f"got {arg}={tuple(shape)}")
    if shape[-1] < 1:
        raise ValueError(f"{name}: expected at least one channel, got {arg}={tuple(shape)}")


def _pad(x, pads, value):
    """x padded with ``value`` by (lo, hi) along each spatial axis."""
    return lax.pad(x, jnp.asarray(value, x.dtype), pad_config(pads))


def _crop(xp, pads, spatial):
    """The inverse of ``_pad``: the cells of x inside the padded array."""
    start = (0, *(lo for lo, _ in pads), 0)
    return lax.slice(xp, start, (xp.shape[0], *(lo + n for (lo, _), n in zip(pads, spatial)), xp.shape[-1]))


def _make_pool(name, rank, init, forward, backward):
    if rank is None:
        return make_layer(name, init, forward, backward, min_ndim=3, meaning="(batch, *spatial, channels)")
    axes = AXES.get(rank, f"{rank} spatial axes, channels")
    return make_layer(name, init, forward, backward, ndim=rank + 2, meaning=f"(batch, {axes})")


# ----------------------------------------------------------------------------- windowed pools


def max_pool(window, strides=None, padding="VALID") -> Layer:
    """Max pooling over windows of the spatial axes, channels last.

    x (N, *spatial, C), y (N, *O, C). ``window`` and ``strides`` (default: the window, so
    windows do not overlap) are integers or one per spatial axis; ``padding`` is 'VALID',
    'SAME', an integer p or (lo, hi) pairs, each side smaller than the window. Padded cells
    are −∞: they never win. Per axis O = ⌊(L + lo + hi − k)/s⌋ + 1.

    Forward, with xp = x padded by −∞, o the output position, κ the offset in the window::

        y[n, o, c] = max_κ xp[n, o·s + κ, c]                                  (N, *O, C)

    Backward: each dy goes, whole, to the cell that won its window; overlapping windows add::

        κ*(n, o, c) = the first κ in row-major window order with the largest xp[n, o·s + κ, c]
        dxp[n, o·s + κ*, c] += dy[n, o, c],    dx = dxp cropped to x           (N, *spatial, C)

    κ* is found by a running maximum over the offsets of the saved x, not by comparing cells
    with the saved y: under ``jit`` XLA may recompute x inside the backward (e.g. a batch_norm
    before the pool) with other rounding than the forward's copy, and a cell that won by
    equality there could then fail to equal y, losing its window's gradient.

    Ties are broken deterministically: of several equal maxima in a window the first in
    row-major order (the lowest index along the first spatial axis, then the next, …) gets all
    of the gradient and the others get none. autodiff of ``lax.reduce_window`` may route
    ties differently.
    """
    name = "max_pool"
    rank, geometry = _windows(name, window, strides, padding)

    def init(key, in_shape):
        *_, out = geometry(in_shape)
        return (), (), (*out, in_shape[-1])

    def forward(params, state, x, *, key=None, train=True):
        w, s, pads, _ = geometry(x.shape[1:])
        # (a constant init value, so that jax sees the max-pool primitive and can differentiate it)
        y = lax.reduce_window(x, np.array(-np.inf, x.dtype), lax.max, (1, *w, 1), (1, *s, 1),
                              ((0, 0), *pads, (0, 0)))                        # (N, *O, C)
        return y, state, (x,)

    def backward(params, res, dy):
        (x,) = res                                                            # (N, *spatial, C)
        w, s, pads, out = geometry(x.shape[1:])
        ones, offsets = (1,) * len(w), list(kernel_offsets(w))
        xp = _pad(x, pads, -jnp.inf)                                          # (N, *padded, C)
        best = jnp.full(dy.shape, -jnp.inf, x.dtype)                          # (N, *O, C)
        winner = jnp.zeros(dy.shape, jnp.int32)                               # κ*'s index
        for i, kappa in enumerate(offsets):                                   # row-major order
            v = shifted_view(xp, kappa, ones, s, out)
            better = v > best                                                 # a tie keeps the first
            best, winner = jnp.where(better, v, best), jnp.where(better, i, winner)
        dxp = jnp.zeros_like(xp)
        for i, kappa in enumerate(offsets):
            dxp = dxp + place_view(jnp.where(winner == i, dy, 0), kappa, ones, s, xp.shape[1:-1])
        return (), _crop(dxp, pads, x.shape[1:-1])                            # (N, *spatial, C)

    return _make_pool(name, rank, init, forward, jax.jit(backward))   # jit: one compile when eager


def avg_pool(window, strides=None, padding="VALID") -> Layer:
    """Average pooling over windows of the spatial axes, channels last.

    x (N, *spatial, C), y (N, *O, C); ``window``, ``strides`` and ``padding`` as in
    :func:`max_pool`. Padded cells count as zeros: every window is divided by its full size
    K = ∏k (flax's ``avg_pool`` and PyTorch's ``count_include_pad=True``), so the layer is one
    linear map for every position.

    Forward, with xp = x zero-padded::

        y[n, o, c] = (1/K) Σ_κ xp[n, o·s + κ, c]                               (N, *O, C)

    Backward: each cell of a window receives dy / K; overlapping windows add::

        dxp[n, o·s + κ, c] += dy[n, o, c] / K   for every κ,   dx = dxp cropped to x
                                                                              (N, *spatial, C)
    """
    name = "avg_pool"
    rank, geometry = _windows(name, window, strides, padding)

    def init(key, in_shape):
        *_, out = geometry(in_shape)
        return (), (), (*out, in_shape[-1])

    def forward(params, state, x, *, key=None, train=True):
        w, s, pads, _ = geometry(x.shape[1:])
        total = lax.reduce_window(x, np.array(0, x.dtype), lax.add, (1, *w, 1), (1, *s, 1),
                                  ((0, 0), *pads, (0, 0)))                    # (N, *O, C)
        return total / math.prod(w), state, (shape_record(x),)               # (0, *spatial, C): x's shape

    def backward(params, res, dy):
        (like,) = res
        spatial = like.shape[1:-1]
        w, s, pads, _ = geometry(like.shape[1:])
        ones = (1,) * len(w)
        padded = tuple(n + lo + hi for n, (lo, hi) in zip(spatial, pads))
        share = dy / math.prod(w)                                             # (N, *O, C)
        dxp = sum(place_view(share, kappa, ones, s, padded) for kappa in kernel_offsets(w))  # (N, *padded, C)
        return (), _crop(dxp, pads, spatial)                                  # (N, *spatial, C)

    return _make_pool(name, rank, init, forward, jax.jit(backward))   # jit: one compile when eager


# ----------------------------------------------------------------------------- global pools


def _spatial_axes(x):
    return tuple(range(1, x.ndim - 1))


def global_avg_pool() -> Layer:
    """The mean over every spatial axis, channels last.

    Forward::   y[n, c] = (1/S) Σ_p x[n, p, c]        x (N, *spatial, C), S = ∏spatial, y (N, C)
    Backward::  dx[n, p, c] = dy[n, c] / S             (N, *spatial, C)
    """
    name = "global_avg_pool"

    def init(key, in_shape):
        return (), (), (in_shape[-1],)

    def forward(params, state, x, *, key=None, train=True):
        return jnp.mean(x, axis=_spatial_axes(x)), state, (shape_record(x),)  # (N, C)

    def backward(params, res, dy):
        (like,) = res                                                          # (0, *spatial, C)
        spatial = like.shape[1:-1]
        share = dy / math.prod(spatial)                                        # (N, C)
        dx = jnp.broadcast_to(share.reshape(dy.shape[0], *(1,) * len(spatial), dy.shape[-1]),
                              (dy.shape[0], *like.shape[1:]))                  # (N, *spatial, C)
        return (), dx

    def check(params, state, x):
        _check_spatial(name, "x.shape", x.shape, x.shape[1:-1])

    return make_layer(name, init, forward, backward, check=check, min_ndim=3,
                      meaning="(batch, *spatial, channels)")


def global_max_pool() -> Layer:
    """The maximum over every spatial axis, channels last.

    Forward::   y[n, c] = max_p x[n, p, c]             x (N, *spatial, C), y (N, C)
    Backward::  p*(n, c) = the first p in row-major order with x[n, p, c] = y[n, c]
                dx[n, p, c] = dy[n, c] if p = p*(n, c) else 0               (N, *spatial, C)

    Ties: the first maximum in row-major order over the spatial axes gets all of the gradient
    (``jnp.argmax`` of x flattened to (N, S, C) over S).
    """
    name = "global_max_pool"

    def init(key, in_shape):
        return (), (), (in_shape[-1],)

    def forward(params, state, x, *, key=None, train=True):
        return jnp.max(x, axis=_spatial_axes(x)), state, (x,)                 # (N, C)

    def backward(params, res, dy):
        (x,) = res                                                             # (N, *spatial, C)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])                          # (N, S, C)
        first = jnp.argmax(flat, axis=1)                                       # (N, C)
        wins = jnp.arange(flat.shape[1])[None, :, None] == first[:, None, :]   # (N, S, C)
        dx = jnp.where(wins, dy[:, None, :], 0).astype(dy.dtype)               # (N, S, C)
        return (), dx.reshape(x.shape)

    def check(params, state, x):
        _check_spatial(name, "x.shape", x.shape, x.shape[1:-1])

    return make_layer(name, init, forward, backward, check=check, min_ndim=3,
                      meaning="(batch, *spatial, channels)")
