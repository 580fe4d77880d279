"""Convolutions formulated for XLA's CPU backend: the same maps as ``lax.conv_general_dilated``,
computed another way because XLA's CPU kernels run them faster so (BENCHMARKS.md, "2-D
convolutions on CPU", has the measurements; ``scripts/benchmarks/conv_formulations.py``
prints them for one layer). ``bpjax.kernels`` chooses them for programs lowered for the CPU.

Two formulations:

* **routed to Eigen**: a stride-1 2-D float32 convolution with at least
  :data:`EIGEN_MIN_CHANNELS` channels in and out gets extra zero rows at the high end of its
  first spatial axis, and the extra output rows are dropped. An output larger than its input is
  outside what XLA hands to YNNPACK, so Eigen runs it, faster for such channel counts.
* **by columns** (im2col): for each output position o, the ∏K·C_in values the kernel reads,
  side by side (κ-major)::

      cols[n·o, (κ, ci)] = xp[n, o·s + κ·d, ci]                           (b·∏O, ∏K·C_in)
      y  = f(cols · W + b)          W reshaped to (∏K·C_in, C_out)         (b·∏O, C_out)
      dW = Σ_chunks colsᵀ · dz                                              (∏K·C_in, C_out)
      dx = col2im(dz · Wᵀ)          each offset's block added back where its view was read

  b examples at a time (a ``lax.map`` or ``lax.scan`` over the batch), so that one chunk's
  columns (≤ :data:`COLUMN_CHUNK_BYTES`) stay in cache and the ∏K-fold copy of x is never
  held whole.

What autodiff sees: reverse-mode autodiff of a forward (``bp.reference_value_and_grad``,
``bp.check_model``) must cost what it costs on the plain network, not what autodiff of another
formulation costs (the extra rows turn its kernel gradient into a naive loop, the chunked
columns into a reverse scan). Both forwards therefore carry a ``jax.custom_jvp`` whose tangent
is the plain convolution's, linear in the tangents of x and W::

    ẏ = conv(ẋ, W) + conv(x, Ẇ)                                        (N, *O, C_out)

(plus ḃ and the activation's f'(z) ⊙ for the columns), which reverse mode transposes into
XLA's usual dx and dW convolutions. A tangent that is a symbolic zero (data, not a parameter)
drops its term.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from .._core import accumulation_dtype, sum_acc
from ..layers._windows import (ACTIVATIONS, Geometry, columns, conv_out_shape, kernel_offsets, pad_config, place_view,
                               plain_conv)
from .cpu_matmul import matmul_tn

#: Eigen's convolution falls behind YNNPACK's with fewer channels in or out than this.
EIGEN_MIN_CHANNELS = 16


def eigen_rows(x_shape, kernel, dtype, g: Geometry) -> int:
    """How many extra output rows route a convolution of an (N, *spatial, C_in) input by a
    (*K, C_in/G, C_out) kernel to Eigen (0: not one where Eigen is faster, or can run it)."""
    spatial = x_shape[1:-1]
    out = conv_out_shape(spatial, kernel[:-2], g)
    if (len(spatial) != 2 or dtype != jnp.float32 or g.groups != 1
            or min(x_shape[-1], kernel[-1]) < EIGEN_MIN_CHANNELS or g.strides[0] != 1
            or any(v != 1 for v in (*g.in_dilation, *g.dilation))
            or any(o > n for o, n in zip(out, spatial))):      # an output larger already: Eigen
        return 0
    return spatial[0] + 1 - out[0]


def conv(x, w, g: Geometry):
    """The plain convolution, routed to Eigen (``routed_conv``) where ``eigen_rows`` says that
    helps.                                                                 (N, *O, C_out)"""
    extra = eigen_rows(x.shape, w.shape, x.dtype, g)
    return routed_conv(x, w, g, extra) if extra else plain_conv(x, w, g)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def routed_conv(x, w, g: Geometry, extra: int):
    """``plain_conv`` with ``extra`` more rows of zero padding at the high end of the first
    spatial axis, whose output rows are dropped (stride 1 there: one output row per row).
    Differentiated as ``plain_conv`` (``_plain_conv_jvp``)."""
    pads = ((g.pads[0][0], g.pads[0][1] + extra), *g.pads[1:])
    y = plain_conv(x, w, g._replace(pads=pads))                           # (N, O + extra, ..., C_out)
    return y[:, :y.shape[1] - extra]                                       # (N, *O, C_out)


def _conv_tangent(x, w, dx, dw, g: Geometry):
    """ẏ = conv(ẋ, W) + conv(x, Ẇ), leaving out the terms whose tangent is a symbolic zero;
    None when both are.                                                    (N, *O, C_out)"""
    terms = [plain_conv(a, b, g) for a, b, t in ((dx, w, dx), (x, dw, dw)) if not _is_zero(t)]
    return sum(terms[1:], terms[0]) if terms else None


def _is_zero(t) -> bool:
    return t is None or isinstance(t, jax.custom_derivatives.SymbolicZero)


def _plain_conv_jvp(g, extra, primals, tangents):
    """The tangent rule of ``routed_conv``: the plain convolution's."""
    x, w = primals
    y = routed_conv(x, w, g, extra)
    dy = _conv_tangent(x, w, *tangents, g)
    return y, jnp.zeros_like(y) if dy is None else dy


routed_conv.defjvp(_plain_conv_jvp, symbolic_zeros=True)


#: Columns of one chunk of examples at most: they stay in cache.
COLUMN_CHUNK_BYTES = 2 * 2**20


def chunk_size(n: int, per_example_bytes: int) -> int:
    """The largest divisor b of the batch n with b·per_example_bytes ≤ COLUMN_CHUNK_BYTES
    (at least 1)."""
    cap = max(1, COLUMN_CHUNK_BYTES // max(per_example_bytes, 1))
    return max(b for b in range(1, min(n, cap) + 1) if n % b == 0)


def _chunked(f, b: int, *arrays):
    """``f`` over chunks of ``b`` examples of each array in turn (``lax.map``), the chunks of
    its result joined back along the batch axis."""
    n = arrays[0].shape[0]
    ys = lax.map(lambda a: f(*a), tuple(a.reshape(n // b, b, *a.shape[1:]) for a in arrays))
    return ys.reshape(n, *ys.shape[2:])


def _columns(x, kernel, out, *, strides, pads, in_dilation, dilation):
    """im2col, flattened over the examples and positions.              (b·∏O, ∏K·C_in)"""
    return columns(x, kernel, out, strides, pads, in_dilation, dilation).reshape(-1, math.prod(kernel) * x.shape[-1])


_COLUMN_GEOMETRY = ("strides", "pads", "in_dilation", "dilation")

@functools.partial(jax.jit, static_argnames=("out", "activation", *_COLUMN_GEOMETRY))
def _columns_forward(x, w, bias, *, out, activation, strides, pads, in_dilation, dilation):
    """The forward by columns: y = f(cols · W + b), chunk by chunk, with the bias (or None)
    and the activation f (see ``ACTIVATIONS``) applied to each chunk while it is in cache,
    so cols · W is never held whole.                                   (N, *O, C_out)"""
    r = x.ndim - 2
    kernel, c_out = w.shape[:r], w.shape[-1]
    wm = w.reshape(-1, c_out)                                                  # (∏K·C_in, C_out)
    b = chunk_size(x.shape[0], math.prod(out) * wm.shape[0] * x.dtype.itemsize)
    f = ACTIVATIONS[activation][0]

    def one(xb):
        cols = _columns(xb, kernel, out, strides=strides, pads=pads, in_dilation=in_dilation,
                        dilation=dilation)                                     # (b·∏O, ∏K·C_in)
        z = cols @ wm
        return f(z if bias is None else z + bias).reshape(b, *out, c_out)

    return _chunked(one, b, x)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def forward_by_columns(x, w, bias, out, activation, g: Geometry):
    """``_columns_forward``, differentiated as the plain convolution (see "what autodiff sees")::

        ż = conv(ẋ, W) + conv(x, Ẇ) + ḃ,   ẏ = f'(z) ⊙ ż  with f'(z) from y (the backward's)
                                                                           (N, *O, C_out)"""
    return _columns_forward(x, w, bias, out=out, activation=activation, strides=g.strides, pads=g.pads,
                         in_dilation=g.in_dilation, dilation=g.dilation)


def _columns_jvp(out, activation, g, primals, tangents):
    x, w, bias = primals
    dx, dw, db = tangents
    y = forward_by_columns(x, w, bias, out, activation, g)
    dz = _conv_tangent(x, w, dx, dw, g)
    if bias is not None and not _is_zero(db):
        dz = jnp.broadcast_to(db, y.shape) if dz is None else dz + db
    if dz is None:
        return y, jnp.zeros_like(y)
    df = ACTIVATIONS[activation][1]
    return y, dz if df is None else dz * df(y)


forward_by_columns.defjvp(_columns_jvp, symbolic_zeros=True)


def _error(dyb, yb, activation):
    """dz = dy ⊙ f'(z) for one chunk, f'(z) from the chunk yb = (y,) of the layer's output
    (yb = () and dz = dy without an activation): formed inside the column loops, so dz is
    never held whole."""
    return dyb * ACTIVATIONS[activation][1](*yb) if yb else dyb


@functools.partial(jax.jit, static_argnames=("x_shape", "activation", *_COLUMN_GEOMETRY))
def dx_by_columns(dy, y, w, x_shape, *, activation, strides, pads, in_dilation, dilation):
    """dx by columns: dcols = dz · Wᵀ, each offset κ's block of C_in columns put back at the
    positions o·s + κ·d its view was read from and summed (col2im), then the padding undone
    (crop (lo, hi), keep every u-th cell).                             (N, *spatial, C_in)"""
    r = dy.ndim - 2
    kernel, c_in, c_out = w.shape[:r], w.shape[-2], w.shape[-1]
    out = dy.shape[1:-1]
    padded = tuple(u * (n - 1) + 1 + lo + hi for n, u, (lo, hi) in zip(x_shape[1:-1], in_dilation, pads))
    wt = w.reshape(-1, c_out).T                                                # (C_out, ∏K·C_in)
    b = chunk_size(dy.shape[0], math.prod(out) * wt.shape[1] * dy.dtype.itemsize)

    def one(dyb, *yb):
        dz = _error(dyb, yb, activation)
        dcols = (dz.reshape(-1, c_out) @ wt).reshape(b, *out, math.prod(kernel), c_in)
        dxp = sum(place_view(dcols[..., i, :], kappa, dilation, strides, padded)
                  for i, kappa in enumerate(kernel_offsets(kernel)))                 # (b, *padded, C_in)
        dxp = lax.pad(dxp, jnp.zeros((), dxp.dtype), pad_config([(-lo, -hi) for lo, hi in pads]))
        return lax.slice(dxp, (0,) * dxp.ndim, dxp.shape, (1, *in_dilation, 1))  # (b, *spatial, C_in)

    return _chunked(one, b, dy, *([] if y is None else [y]))


@functools.partial(jax.jit, static_argnames=("kernel", "activation", *_COLUMN_GEOMETRY))
def dw_by_columns(x, dy, y, kernel, *, activation, strides, pads, in_dilation, dilation):
    """dW and db by columns: Σ over chunks of colsᵀ · dz and of dz, in a lax.scan whose running
    sums are float32 for bfloat16 (``accumulation_dtype``).   ((*K, C_in, C_out), (C_out,))"""
    out, c_in, c_out = dy.shape[1:-1], x.shape[-1], dy.shape[-1]
    rows = math.prod(kernel) * c_in
    b = chunk_size(x.shape[0], math.prod(out) * rows * x.dtype.itemsize)
    n = x.shape[0]

    def one(acc, chunk):
        xb, dyb, *yb = chunk
        dz = _error(dyb, yb, activation).reshape(-1, c_out)                  # (b·∏O, C_out)
        cols = _columns(xb, kernel, out, strides=strides, pads=pads, in_dilation=in_dilation,
                        dilation=dilation)                                     # (b·∏O, ∏K·C_in)
        return (acc[0] + matmul_tn(cols, dz), acc[1] + sum_acc(dz, axis=0)), None

    chunks = [a.reshape(n // b, b, *a.shape[1:]) for a in (x, dy, *([] if y is None else [y]))]
    dtype = accumulation_dtype(x.dtype, dy.dtype)
    (dw, db), _ = lax.scan(one, (jnp.zeros((rows, c_out), dtype), jnp.zeros((c_out,), dtype)), chunks)
    return dw.reshape(*kernel, c_in, c_out), db


