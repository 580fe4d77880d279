"""Convolution layers (``conv``, ``conv_transpose``), each with its hand-written backward.

Channels last, with 1, 2 or 3 spatial axes: x (N, L, C), (N, H, W, C) or (N, D, H, W, C).
Both layers are one *generalised* convolution (``lax.conv_general_dilated``)::

    y[n, o, co] = b[co] + Σ_κ Σ_ci xp[n, o·s + κ·d, ci] · W[κ, ci, co]

where o runs over the output positions and κ over the kernel offsets (both multi-indices over
the spatial axes, κ in row-major order), s is the stride, d the dilation of the kernel, and xp
is x dilated by ``u`` (u − 1 zeros between neighbours; u = 1 for ``conv``, u = the stride for
``conv_transpose``) and then zero-padded by (lo, hi) along each spatial axis. ``_conv_dx`` and
``_conv_dw`` below are the two halves of its backward; each layer says which s, u and padding.

Sizes, per spatial axis: the dilated kernel k' = d·(k − 1) + 1, the dilated input
L' = u·(L − 1) + 1, and the output O = ⌊(L' + lo + hi − k') / s⌋ + 1.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import initializers
from ._core import Layer, accumulation_dtype, check_positive_int, make_layer, matmul_tn, sum_acc

__all__ = ["conv", "conv_transpose"]

# channels-last layouts of x, W and y, by the number of spatial axes
_DIMENSION_NUMBERS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}
# dW by shifted views and matrix products from this many spatial axes on, by one lax
# convolution below it: the faster on CPU (measurements in _conv_dw's docstring)
_DW_BY_VIEWS_FROM_RANK = 2
_AXES = {1: "length, channels", 2: "height, width, channels", 3: "depth, height, width, channels"}


# ----------------------------------------------------------------------------- hyperparameters


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _positive_ints(name: str, arg: str, value):
    """An integer > 0, or a non-empty tuple of them (one per spatial axis)."""
    if isinstance(value, (tuple, list)) and value and all(_is_int(v) and v > 0 for v in value):
        return tuple(int(v) for v in value)
    if _is_int(value) and value > 0:
        return int(value)
    raise ValueError(f"{name}: expected {arg} to be an integer > 0 or a tuple of them, one per "
                     f"spatial axis, got {value!r}")


def _padding(name: str, padding):
    """``"SAME"``, ``"VALID"``, an integer p ≥ 0 (p on both sides of every axis) or a tuple of
    (lo, hi) pairs of integers ≥ 0, one per spatial axis."""
    if isinstance(padding, str) and padding.upper() in ("SAME", "VALID"):
        return padding.upper()
    if _is_int(padding) and padding >= 0:
        return int(padding)
    if (isinstance(padding, (tuple, list)) and padding
            and all(isinstance(p, (tuple, list)) and len(p) == 2 and all(_is_int(v) and v >= 0 for v in p)
                    for p in padding)):
        return tuple((int(lo), int(hi)) for lo, hi in padding)
    raise ValueError(f"{name}: expected padding to be 'SAME', 'VALID', an integer >= 0 or a tuple of "
                     f"(lo, hi) pairs of integers >= 0, one per spatial axis, got {padding!r}")


def _spatial_rank(name: str, max_rank, **args):
    """The number of spatial axes fixed by the tuple-valued ``args``, or None (then the input's)."""
    lengths = {arg: len(v) for arg, v in args.items() if isinstance(v, tuple)}
    got = ", ".join(f"{arg}={args[arg]!r}" for arg in lengths)
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{name}: expected one entry per spatial axis in every tuple, got {got}")
    rank = next(iter(lengths.values()), None)
    if rank is not None and max_rank is not None and rank > max_rank:
        raise ValueError(f"{name}: expected 1 to {max_rank} spatial axes, got {got}")
    return rank


def _per_axis(value, rank: int) -> tuple:
    """``value`` for each of ``rank`` spatial axes (an integer stands for every axis)."""
    return tuple(value) if isinstance(value, tuple) else (value,) * rank


def _same_pads(size: int, window: int, stride: int) -> tuple:
    """'SAME' (lax's rule): O = ⌈L/s⌉, the total padding split with the extra cell at the end."""
    total = max((-(-size // stride) - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def _explicit_pads(padding, spatial, windows, strides) -> tuple:
    """Per-axis (lo, hi) padding of the input for a window sliding with ``strides``."""
    if padding == "SAME":
        return tuple(_same_pads(n, k, s) for n, k, s in zip(spatial, windows, strides))
    if padding == "VALID":
        return ((0, 0),) * len(spatial)
    if isinstance(padding, tuple):
        return padding
    return ((padding, padding),) * len(spatial)


def _transpose_pads(padding, spatial, windows, strides) -> tuple:
    """Padding of the stride-dilated input of ``conv_transpose``, from the padding of the
    convolution it transposes (lax.conv_transpose's rule with ``use_consistent_padding=True``,
    which is PyTorch's): (lo, hi) becomes (k' − 1 − lo, k' − 1 − hi); 'SAME' gives O = s·L and
    'VALID' O = s·L + max(k' − s, 0)."""
    if isinstance(padding, str):
        pads = []
        for k, s in zip(windows, strides):
            total = k + s - 2 + (max(k - s, 0) if padding == "VALID" else 0)
            lo = k - 1 if padding == "VALID" or s > k - 1 else -(-total // 2)
            pads.append((lo, total - lo))
        return tuple(pads)
    return tuple((k - 1 - lo, k - 1 - hi)
                 for k, (lo, hi) in zip(windows, _explicit_pads(padding, spatial, windows, strides)))


def _promote(*arrays):
    """The arrays cast to their common dtype (``lax`` convolutions need one)."""
    dtype = jnp.result_type(*arrays)
    return tuple(a.astype(dtype) for a in arrays)


def _out_size(size, window, stride, lo, hi, in_dilation=1) -> int:
    return (in_dilation * (size - 1) + 1 + lo + hi - window) // stride + 1


# ----------------------------------------------------------------------------- shifted views


def _offsets(kernel):
    """Every kernel offset κ, in row-major order."""
    return itertools.product(*(range(k) for k in kernel))


def _view(xp, kappa, dilation, strides, out):
    """The shifted view xp[:, κ·d + o·s, :] over the output positions o: (N, *out, C)."""
    start = (0, *(k * d for k, d in zip(kappa, dilation)), 0)
    stop = (st + (o - 1) * s + 1 for st, o, s in zip(start[1:-1], out, strides))
    limit = (xp.shape[0], *stop, xp.shape[-1])
    return lax.slice(xp, start, limit, (1, *strides, 1))


def _place(v, kappa, dilation, strides, padded_spatial):
    """The adjoint of ``_view``: v (N, *out, C) put at positions κ·d + o·s of a zero array
    (N, *padded_spatial, C)."""
    cfg = [(0, 0, 0)]
    for k, d, s, o, size in zip(kappa, dilation, strides, v.shape[1:-1], padded_spatial):
        cfg.append((k * d, size - k * d - ((o - 1) * s + 1), s - 1))
    return lax.pad(v, jnp.zeros((), v.dtype), cfg + [(0, 0, 0)])


# ----------------------------------------------------------------------------- lax on CPU
#
# XLA's CPU backend (jaxlib 0.10) hands a 2-D convolution to YNNPACK, which ran the
# convolutions of BENCHMARKS.md's 2-D CNN at about 30 GFLOP/s, unless the convolution is
# outside what its YNNPACK support accepts; one such case is an output larger than the input.
# Those go to Eigen's convolution, which ran at 50–62 GFLOP/s. ``_lax_conv`` therefore gives a
# stride-1 2-D float32 convolution extra zero padding at the high end of its first spatial
# axis, so that its output has one row more than its input, and drops the extra rows. Best of
# 5, float32, jitted, 3×3 'SAME', measured with a scratch script (``python
# scripts/conv_formulations.py --batch B --size S --c-in I --c-out O`` prints the same
# comparison for one layer, with dW), YNNPACK / Eigen with the extra row / columns, in ms:
#
#     batch 128, 28×28, 32 → 32:   forward 60.2 / 32.5 / 75.0    dx 66.5 / 33.9 / 64.2
#     batch 128, 14×14, 64 → 128:  forward 111.0 / 57.4 / 77.4   dx 109.9 / 59.9 / 71.2
#     batch 32, 56×56, 64 → 64:    forward 220.7 / 114.8 / 232.5 dx 240.4 / 118.9 / 178.6
#     batch 128, 28×28, 3 → 32:    forward 7.0 / 11.0 / 8.5      dx 13.5 / 23.2 / 8.2
#
# Eigen falls behind with few channels, so the extra row is added only when C_in and C_out
# are both at least _EIGEN_MIN_CHANNELS. Eigen has no float64 convolution (XLA then emits a
# plain loop), nor one for base (input) dilation, kernel dilation or a kernel larger than
# the input, so those keep their usual path. Autodiff of the routed convolution as written
# could not drop the extra row: its kernel gradient would be a convolution with a kernel taller
# than its input, which neither library takes (4.7 s, not 0.3, for the 2-D CNN's step). So the
# routed convolution carries a ``jax.custom_jvp`` whose tangent is the plain convolution's (see
# "what autodiff sees" below): autodiff of a forward differentiates the plain convolution,
# while the forward itself, and the hand-written dx that also calls ``_lax_conv``, run routed.

_EIGEN_MIN_CHANNELS = 16


def _eigen_rows(lhs_shape, c_out, dtype, out, *, window_strides, lhs_dilation, rhs_dilation,
                groups=1) -> int:
    """How many extra output rows route a lax convolution of an (N, *spatial, C_in) input to
    Eigen on CPU (0: leave it as it is)."""
    spatial = lhs_shape[1:-1]
    if (jax.default_backend() != "cpu" or len(spatial) != 2 or dtype != jnp.float32 or groups != 1
            or min(lhs_shape[-1], c_out) < _EIGEN_MIN_CHANNELS or window_strides[0] != 1
            or any(v != 1 for v in (*lhs_dilation, *rhs_dilation))
            or any(o > n for o, n in zip(out, spatial))):      # an output larger already: Eigen
        return 0
    return spatial[0] + 1 - out[0]


def _lax_conv(lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation, groups, extra=None):
    """``lax.conv_general_dilated`` in the channels-last layouts, with ``extra`` more rows of
    zero padding at the high end of the first spatial axis (by default ``_eigen_rows``), whose
    output rows are dropped: the same result, run by Eigen rather than YNNPACK on CPU (see
    above).                                                                (N, *out, C_out)"""
    r = lhs.ndim - 2
    kernel = rhs.shape[:r]
    out = tuple(_out_size(n, d * (k - 1) + 1, s, lo, hi, u) for n, k, d, s, u, (lo, hi)
                in zip(lhs.shape[1:-1], kernel, rhs_dilation, window_strides, lhs_dilation, padding))
    if extra is None:
        extra = _eigen_rows(lhs.shape, rhs.shape[-1], lhs.dtype, out, window_strides=window_strides,
                            lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, groups=groups)
    geometry = _Geometry(tuple(window_strides), tuple(map(tuple, padding)), tuple(lhs_dilation),
                         tuple(rhs_dilation), groups)
    return _routed_conv(lhs, rhs, geometry, extra) if extra else _plain_conv(lhs, rhs, geometry)


class _Geometry(NamedTuple):
    """A convolution's per-axis strides s, (lo, hi) padding, input dilation u, kernel dilation d,
    and its feature groups: the arguments of ``lax.conv_general_dilated`` but for the layouts."""
    strides: tuple
    pads: tuple
    in_dilation: tuple
    dilation: tuple
    groups: int


def _plain_conv(x, w, g: _Geometry):
    """The generalised convolution as one ``lax.conv_general_dilated``.    (N, *O, C_out)"""
    return lax.conv_general_dilated(x, w, window_strides=g.strides, padding=g.pads,
                                    lhs_dilation=g.in_dilation, rhs_dilation=g.dilation,
                                    dimension_numbers=_DIMENSION_NUMBERS[x.ndim - 2],
                                    feature_group_count=g.groups)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _routed_conv(x, w, g: _Geometry, extra: int):
    """``_plain_conv`` with ``extra`` more rows of zero padding at the high end of the first
    spatial axis, whose output rows are dropped (stride 1 there: one output row per row).
    Differentiated as ``_plain_conv`` (``_plain_conv_jvp``)."""
    pads = ((g.pads[0][0], g.pads[0][1] + extra), *g.pads[1:])
    y = _plain_conv(x, w, g._replace(pads=pads))                           # (N, O + extra, ..., C_out)
    return y[:, :y.shape[1] - extra]                                       # (N, *O, C_out)


# ----------------------------------------------------------------------------- what autodiff sees
#
# The routed convolution and the forward by columns (below) compute the plain convolution
# another way, for speed on one backend. Reverse-mode autodiff of a forward (``bp.reference_value_and_grad``,
# ``bp.check_model``) must cost what it costs on the plain network, not what autodiff of the
# other formulation costs: the extra row (above) turns its kernel gradient into a naive loop, and
# the chunked columns into a reverse scan over chunks. Both therefore carry a ``jax.custom_jvp``
# whose tangent is the plain convolution's, linear in the tangents (dx, dW) of x and W::
#
#     ẏ = conv(ẋ, W) + conv(x, Ẇ)                                        (N, *O, C_out)
#
# (plus ḃ and the activation's f'(z) ⊙ for the columns); reverse mode transposes it into
# XLA's usual dx and dW convolutions, exactly what autodiff of the plain ``lax`` network runs.
# A tangent that is a symbolic zero (an input x that is data, not a parameter) drops its term,
# so no convolution of zeros is computed. The hand-written backward is unaffected: it never
# differentiates the forward, and the primal computation is the same program as before.


def _conv_tangent(x, w, dx, dw, g: _Geometry):
    """ẏ = conv(ẋ, W) + conv(x, Ẇ), leaving out the terms whose tangent is a symbolic zero;
    None when both are.                                                    (N, *O, C_out)"""
    terms = [_plain_conv(a, b, g) for a, b, t in ((dx, w, dx), (x, dw, dw)) if not _is_zero(t)]
    return sum(terms[1:], terms[0]) if terms else None


def _is_zero(t) -> bool:
    return t is None or isinstance(t, jax.custom_derivatives.SymbolicZero)


def _plain_conv_jvp(g, extra, primals, tangents):
    """The tangent rule of ``_routed_conv``: the plain convolution's."""
    x, w = primals
    y = _routed_conv(x, w, g, extra)
    dy = _conv_tangent(x, w, *tangents, g)
    return y, jnp.zeros_like(y) if dy is None else dy


_routed_conv.defjvp(_plain_conv_jvp, symbolic_zeros=True)


# ----------------------------------------------------------------------------- the two gradients


_GEOMETRY = ("strides", "pads", "in_dilation", "dilation", "groups")


@functools.partial(jax.jit, static_argnames=("x_shape", *_GEOMETRY))   # jit: one compile when eager
def _conv_dx(dy, w, x_shape, *, strides, pads, in_dilation, dilation, groups):
    """dx of the generalised convolution: the transposed convolution of dy::

        dx = conv(dilate_s(dy), flip(W)ᵀ)  at stride u                     (N, *spatial, C_in)

    dy gets s − 1 zeros between neighbours (s: the forward's stride) and k' − 1 − lo zeros
    before (then as many after as make the output L long); W is flipped along its spatial
    axes and its channel axes are swapped within each group; u is the forward's input dilation.
    """
    r = dy.ndim - 2
    kernel = w.shape[:r]
    c_in_g, c_out = w.shape[-2], w.shape[-1]
    wt = jnp.flip(w, axis=tuple(range(r)))                                   # (*K, C_in/G, C_out)
    wt = wt.reshape(*kernel, c_in_g, groups, c_out // groups)                 # (*K, C_in/G, G, C_out/G)
    wt = jnp.swapaxes(wt, -3, -1).reshape(*kernel, c_out // groups, groups * c_in_g)  # (*K, C_out/G, C_in)
    dx_pads = []
    for n, k, d, s, u, (lo, _), o in zip(x_shape[1:-1], kernel, dilation, strides, in_dilation, pads,
                                          dy.shape[1:-1]):
        k_eff, n_dil, o_dil = d * (k - 1) + 1, u * (n - 1) + 1, s * (o - 1) + 1
        before = k_eff - 1 - lo                                               # < 0 crops
        dx_pads.append((before, n_dil + k_eff - 1 - o_dil - before))
    return _lax_conv(dy, wt, window_strides=in_dilation, padding=dx_pads, lhs_dilation=strides,
                     rhs_dilation=dilation, groups=groups)                    # (N, *spatial, C_in)


@functools.partial(jax.jit, static_argnames=("kernel", *_GEOMETRY))
def _conv_dw(x, dy, kernel, *, strides, pads, in_dilation, dilation, groups):
    """dW of the generalised convolution, within each group::

        dW[κ, i, co] = Σ_n Σ_o xp[n, o·s + κ·d, g·C_in/G + i] · dy[n, o, co]   (*K, C_in/G, C_out)

    Two formulations, chosen by the number r of spatial axes (``_DW_BY_VIEWS_FROM_RANK``):

    * r = 1: one ``lax`` convolution (XLA's kernel-gradient convolution): x as the input with
      the roles of batch and channels swapped, dy as the kernel, dilated by s;
    * r ≥ 2: shifted views and matrix products: for each offset κ, the strided view
      xp[:, κ·d + o·s, :] flattened to (M, C_in), M = N·∏O, gives dW[κ] = viewᵀ · dy with dy
      flattened to (M, C_out), one offset after another in a ``lax.scan``.

    Measured on the 2-core CPU this was written on (float32, jitted, best of 10): a 3×3 conv,
    32→64 channels, 28×28, batch 128, 'SAME': forward 119 ms, autodiff (vjp) dW 1428 ms, the lax
    dW 1305 ms, the views 249 ms. A 1-D conv, kernel 5, 32→32 channels, length 40, batch 128:
    forward 1.9 ms, autodiff (vjp) dW 2.8 ms, the lax dW 3.8 ms, the views 4.9 ms. The lax dW falls
    behind in 2-D once N·∏O·C_out grows (14×14×32 channels, batch 128, and up); in 1-D it kept
    up at every size tried (up to length 2000).

    Either way the sums over n and o are accumulated, and dW returned, in ``accumulation_dtype``
    (float32 for bfloat16 x and dy).
    """
    r = x.ndim - 2
    out = dy.shape[1:-1]
    # pad the high end so that xp holds exactly the cells some window reads (less when the
    # stride skips the last cells): L' + lo + hi = s·(O − 1) + 1 + k' − 1
    pads = tuple((lo, s * (o - 1) + 1 + d * (k - 1) - (u * (n - 1) + 1) - lo)
                 for n, k, d, s, u, (lo, _), o in zip(x.shape[1:-1], kernel, dilation, strides,
                                                      in_dilation, pads, out))
    if r < _DW_BY_VIEWS_FROM_RANK:
        # Transposed here, so that XLA sees a convolution in the channels-last form it runs
        # fastest: x as (C_in, *L, N), batch C_in and features N; dy as a (*O, N, C_out) kernel.
        # XLA's CPU compiler makes the same transposes itself at the top level of a program,
        # but not inside a loop body (fit's chunk of steps), where the kernel-gradient layout
        # cost the MNIST-1D CNN's step 2-3x.
        spatial = tuple(range(1, r + 1))
        xt = jnp.transpose(x, (r + 1, *spatial, 0))                          # (C_in, *L, N)
        dyt = jnp.transpose(dy, (*spatial, 0, r + 1))                        # (*O, N, C_out)
        dw = lax.conv_general_dilated(xt, dyt, window_strides=dilation, padding=pads,
                                      lhs_dilation=in_dilation, rhs_dilation=strides,
                                      dimension_numbers=_DIMENSION_NUMBERS[r], batch_group_count=groups,
                                      preferred_element_type=accumulation_dtype(x.dtype, dy.dtype))
        return jnp.transpose(dw, (*spatial, 0, r + 1))                       # (*K, C_in/G, C_out)
    c_in, c_out = x.shape[-1], dy.shape[-1]
    m = math.prod(dy.shape[:-1])
    cfg = [(0, 0, 0), *((lo, hi, u - 1) for (lo, hi), u in zip(pads, in_dilation)), (0, 0, 0)]
    dy2 = dy.reshape(m, groups, c_out // groups)                              # (M, G, C_out/G)
    # One offset at a time, in a scan rather than a Python loop: XLA then holds one view, not
    # all ∏K of them. The zero padding is done inside the loop with a fill XLA cannot prove
    # constant ([κ₀ < 0], always 0), so that it fuses pad and slice into one read of x instead
    # of hoisting a padded copy of x out of the loop. On the 2-D case of the docstring: 12 MiB
    # of temporaries (the Python loop over views: 112 MiB; autodiff: 37 MiB), the same speed.
    span = (x.shape[0], *((o - 1) * s + 1 for o, s in zip(out, strides)), x.shape[-1])
    kappas = jnp.asarray(list(_offsets(kernel)), jnp.int32)                   # (∏K, r)

    def one_offset(_, kappa):
        zero = jnp.zeros((), jnp.int32)                                       # int32 also under x64
        xp = lax.pad(x, (kappa[0] < 0).astype(x.dtype), cfg)                  # (N, *padded, C_in)
        start = (zero, *(kappa * jnp.asarray(dilation, jnp.int32)), zero)
        v = lax.slice(lax.dynamic_slice(xp, start, span), (0,) * xp.ndim, span, (1, *strides, 1))
        if groups == 1:
            return None, matmul_tn(v.reshape(m, c_in), dy.reshape(m, c_out))  # (C_in, C_out)
        v = v.reshape(m, groups, c_in // groups)                              # (M, G, C_in/G)
        dw_k = jnp.einsum("mgi,mgo->igo", v, dy2, preferred_element_type=accumulation_dtype(v.dtype, dy2.dtype))
        return None, dw_k.reshape(c_in // groups, c_out)                     # (C_in/G, C_out)

    _, dw = lax.scan(one_offset, None, kappas)                                # (∏K, C_in/G, C_out)
    return dw.reshape(*kernel, c_in // groups, c_out)                         # (*K, C_in/G, C_out)


# ----------------------------------------------------------------------------- by columns (im2col)
#
# The same three maps as matrix products over "columns": for each output position o, the
# ∏K·C_in values the kernel reads, side by side (κ-major):
#
#     cols[n·o, (κ, ci)] = xp[n, o·s + κ·d, ci]                           (b·∏O, ∏K·C_in)
#     y  = cols · W                 W reshaped to (∏K·C_in, C_out)         (b·∏O, C_out)
#     dW = Σ_chunks colsᵀ · dy                                              (∏K·C_in, C_out)
#     dx = col2im(dy · Wᵀ)          each offset's block added back where its view was read
#
# b examples at a time (a lax.map or lax.scan over the batch), so that one chunk's columns
# (≤ _COLUMN_CHUNK_BYTES) stay in cache and the ∏K-fold copy of x is never held whole.
# Measured on the 2-core CPU of BENCHMARKS.md (float32, jitted, best of 8): a 3×3 conv,
# 32→64 channels, 28×28, batch 128, 'SAME': forward 75 ms against 112 for lax's convolution
# (XLA hands it to YNNPACK), dx 79 against 105, dW 89 against 106 for the shifted views
# (and 946 for XLA's kernel-gradient convolution). b = 2 (1.8 MiB of columns) was the best
# chunk there: b = 1 pays the loop's per-iteration cost 128 times (fwd 139 ms), b = 8 falls
# out of cache (88 ms), the whole batch at once writes 110 MiB of columns (131 ms).

_COLUMN_CHUNK_BYTES = 2 * 2**20
_IMPLS = ("auto", "lax", "columns")


def _chunk(n: int, per_example_bytes: int) -> int:
    """The largest divisor b of the batch n with b·per_example_bytes ≤ _COLUMN_CHUNK_BYTES
    (at least 1)."""
    cap = max(1, _COLUMN_CHUNK_BYTES // max(per_example_bytes, 1))
    return max(b for b in range(1, min(n, cap) + 1) if n % b == 0)


def _chunked(f, b: int, *arrays):
    """``f`` over chunks of ``b`` examples of each array in turn (``lax.map``), the chunks of
    its result joined back along the batch axis."""
    n = arrays[0].shape[0]
    ys = lax.map(lambda a: f(*a), tuple(a.reshape(n // b, b, *a.shape[1:]) for a in arrays))
    return ys.reshape(n, *ys.shape[2:])


def _pad_config(pads, in_dilation):
    """lax.pad's config for xp: (lo, hi) and u − 1 interior zeros on each spatial axis."""
    return [(0, 0, 0), *((lo, hi, u - 1) for (lo, hi), u in zip(pads, in_dilation)), (0, 0, 0)]


def _columns(x, kernel, out, *, strides, pads, in_dilation, dilation):
    """im2col: the ∏K shifted views of xp side by side.               (b·∏O, ∏K·C_in)"""
    xp = lax.pad(x, jnp.zeros((), x.dtype), _pad_config(pads, in_dilation))
    views = [_view(xp, kappa, dilation, strides, out) for kappa in _offsets(kernel)]
    return jnp.concatenate(views, axis=-1).reshape(-1, math.prod(kernel) * x.shape[-1])


_COLUMN_GEOMETRY = ("strides", "pads", "in_dilation", "dilation")

#: The activations a conv layer can apply to its output: y = f(z), and f'(z) from y.
_ACTIVATIONS = {
    None: (lambda z: z, None),
    "relu": (lambda z: jnp.maximum(z, 0), lambda y: (y > 0).astype(y.dtype)),
}


@functools.partial(jax.jit, static_argnames=("out", "activation", *_COLUMN_GEOMETRY))
def _conv_columns(x, w, bias, *, out, activation, strides, pads, in_dilation, dilation):
    """The forward by columns: y = f(cols · W + b), chunk by chunk, with the bias (or None)
    and the activation f (see ``_ACTIVATIONS``) applied to each chunk while it is in cache,
    so cols · W is never held whole.                                   (N, *O, C_out)"""
    r = x.ndim - 2
    kernel, c_out = w.shape[:r], w.shape[-1]
    wm = w.reshape(-1, c_out)                                                  # (∏K·C_in, C_out)
    b = _chunk(x.shape[0], math.prod(out) * wm.shape[0] * x.dtype.itemsize)
    f = _ACTIVATIONS[activation][0]

    def one(xb):
        cols = _columns(xb, kernel, out, strides=strides, pads=pads, in_dilation=in_dilation,
                        dilation=dilation)                                     # (b·∏O, ∏K·C_in)
        z = cols @ wm
        return f(z if bias is None else z + bias).reshape(b, *out, c_out)

    return _chunked(one, b, x)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _conv_by_columns(x, w, bias, out, activation, g: _Geometry):
    """``_conv_columns``, differentiated as the plain convolution (see "what autodiff sees")::

        ż = conv(ẋ, W) + conv(x, Ẇ) + ḃ,   ẏ = f'(z) ⊙ ż  with f'(z) from y (the backward's)
                                                                           (N, *O, C_out)"""
    return _conv_columns(x, w, bias, out=out, activation=activation, strides=g.strides, pads=g.pads,
                         in_dilation=g.in_dilation, dilation=g.dilation)


def _columns_jvp(out, activation, g, primals, tangents):
    x, w, bias = primals
    dx, dw, db = tangents
    y = _conv_by_columns(x, w, bias, out, activation, g)
    dz = _conv_tangent(x, w, dx, dw, g)
    if bias is not None and not _is_zero(db):
        dz = jnp.broadcast_to(db, y.shape) if dz is None else dz + db
    if dz is None:
        return y, jnp.zeros_like(y)
    df = _ACTIVATIONS[activation][1]
    return y, dz if df is None else dz * df(y)


_conv_by_columns.defjvp(_columns_jvp, symbolic_zeros=True)


def _error(dyb, yb, activation):
    """dz = dy ⊙ f'(z) for one chunk, f'(z) from the chunk yb = (y,) of the layer's output
    (yb = () and dz = dy without an activation): formed inside the column loops, so dz is
    never held whole."""
    return dyb * _ACTIVATIONS[activation][1](*yb) if yb else dyb


@functools.partial(jax.jit, static_argnames=("x_shape", "activation", *_COLUMN_GEOMETRY))
def _conv_dx_columns(dy, y, w, x_shape, *, activation, strides, pads, in_dilation, dilation):
    """dx by columns: dcols = dz · Wᵀ, each offset κ's block of C_in columns put back at the
    positions o·s + κ·d its view was read from and summed (col2im), then the padding undone
    (crop (lo, hi), keep every u-th cell).                             (N, *spatial, C_in)"""
    r = dy.ndim - 2
    kernel, c_in, c_out = w.shape[:r], w.shape[-2], w.shape[-1]
    out = dy.shape[1:-1]
    padded = tuple(u * (n - 1) + 1 + lo + hi for n, u, (lo, hi) in zip(x_shape[1:-1], in_dilation, pads))
    wt = w.reshape(-1, c_out).T                                                # (C_out, ∏K·C_in)
    b = _chunk(dy.shape[0], math.prod(out) * wt.shape[1] * dy.dtype.itemsize)

    def one(dyb, *yb):
        dz = _error(dyb, yb, activation)
        dcols = (dz.reshape(-1, c_out) @ wt).reshape(b, *out, math.prod(kernel), c_in)
        dxp = sum(_place(dcols[..., i, :], kappa, dilation, strides, padded)
                  for i, kappa in enumerate(_offsets(kernel)))                 # (b, *padded, C_in)
        dxp = lax.pad(dxp, jnp.zeros((), dxp.dtype), [(0, 0, 0), *((-lo, -hi, 0) for lo, hi in pads), (0, 0, 0)])
        return lax.slice(dxp, (0,) * dxp.ndim, dxp.shape, (1, *in_dilation, 1))  # (b, *spatial, C_in)

    return _chunked(one, b, dy, *([] if y is None else [y]))


@functools.partial(jax.jit, static_argnames=("kernel", "activation", *_COLUMN_GEOMETRY))
def _conv_dw_columns(x, dy, y, kernel, *, activation, strides, pads, in_dilation, dilation):
    """dW and db by columns: Σ over chunks of colsᵀ · dz and of dz, in a lax.scan whose running
    sums are float32 for bfloat16 (``accumulation_dtype``).   ((*K, C_in, C_out), (C_out,))"""
    out, c_in, c_out = dy.shape[1:-1], x.shape[-1], dy.shape[-1]
    rows = math.prod(kernel) * c_in
    b = _chunk(x.shape[0], math.prod(out) * rows * x.dtype.itemsize)
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


def _by_columns(impl: str, x_shape, c_out: int, dtype, g: dict, out, groups: int) -> tuple:
    """(forward and dx by columns, dW by columns). 'columns': all three; 'lax': none; 'auto':
    on CPU, for a plain convolution (groups = 1, no input dilation) with 2 or 3 spatial axes,
    dW by columns, and the forward and dx too unless ``_lax_conv`` sends the forward to Eigen
    (see its section): the formulations measured fastest there."""
    if impl != "auto":
        return (impl == "columns",) * 2
    if not (len(x_shape) >= 4 and groups == 1 and all(u == 1 for u in g["in_dilation"])
            and jax.default_backend() == "cpu"):
        return False, False
    eigen = _eigen_rows(x_shape, c_out, dtype, out, window_strides=g["strides"],
                        lhs_dilation=g["in_dilation"], rhs_dilation=g["dilation"]) > 0
    return not eigen, True


# ----------------------------------------------------------------------------- the layers


def _conv_layer(name, out_channels, kernel_size, strides, padding, dilation, groups, use_bias,
                w_init, b_init, param_dtype, transpose, impl, activation) -> Layer:
    """conv (transpose=False) and conv_transpose (transpose=True): the same generalised
    convolution, with s = strides, u = 1 or s = 1, u = strides."""
    out_channels = check_positive_int(name, "out_channels", out_channels)
    kernel_size = _positive_ints(name, "kernel_size", kernel_size)
    strides = _positive_ints(name, "strides", strides)
    dilation = _positive_ints(name, "dilation", dilation)
    padding = _padding(name, padding)
    groups = check_positive_int(name, "groups", groups)
    if out_channels % groups:
        raise ValueError(f"{name}: expected out_channels divisible by groups={groups}, got {out_channels}")
    if impl not in _IMPLS:
        raise ValueError(f"{name}: expected impl to be one of {_IMPLS}, got {impl!r}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{name}: expected activation to be one of {tuple(_ACTIVATIONS)}, got {activation!r}")
    f, df = _ACTIVATIONS[activation]
    if impl == "columns" and groups != 1:
        raise ValueError(f"{name}: expected groups=1 with impl='columns', got groups={groups}")
    rank = _spatial_rank(name, 3, kernel_size=kernel_size, strides=strides, dilation=dilation,
                         padding=padding if isinstance(padding, tuple) else None)
    w_fn = initializers.get(w_init, name)
    b_fn = initializers.get(b_init, name)

    def geometry(in_shape):
        """Per-axis sizes for one example's shape: kernel, strides s, input dilation u, kernel
        dilation d, (lo, hi) padding, output size."""
        r = len(in_shape) - 1
        if not 1 <= r <= 3 or (rank is not None and r != rank):
            want = f"{rank + 1} axes ({_AXES[rank]})" if rank else "2 to 4 axes (*spatial, channels)"
            raise ValueError(f"{name}: expected in_shape with {want}, got in_shape={tuple(in_shape)}")
        kernel, s, d = (_per_axis(v, r) for v in (kernel_size, strides, dilation))
        k_eff = tuple(di * (k - 1) + 1 for k, di in zip(kernel, d))
        spatial = in_shape[:-1]
        if transpose:
            pads = _transpose_pads(padding, spatial, k_eff, s)
            g = dict(kernel=kernel, strides=(1,) * r, in_dilation=s, dilation=d, pads=pads)
        else:
            pads = _explicit_pads(padding, spatial, k_eff, s)
            g = dict(kernel=kernel, strides=s, in_dilation=(1,) * r, dilation=d, pads=pads)
        out = tuple(_out_size(n, k, st, lo, hi, u) for n, k, st, u, (lo, hi)
                    in zip(spatial, k_eff, g["strides"], g["in_dilation"], pads))
        if min(out) < 1:
            raise ValueError(f"{name}: expected the dilated kernel {k_eff} to fit in the padded input "
                             f"along every spatial axis, got spatial shape {tuple(spatial)} with "
                             f"padding {pads}{' of the stride-dilated input' if transpose else ''}")
        return g, out

    def init(key, in_shape):
        g, out = geometry(in_shape)
        c_in = in_shape[-1]
        if c_in < 1:
            raise ValueError(f"{name}: expected at least one input channel, got in_shape={tuple(in_shape)}")
        if c_in % groups:
            raise ValueError(f"{name}: expected input channels divisible by groups={groups}, "
                             f"got in_shape={tuple(in_shape)}")
        kw, kb = jax.random.split(key)
        params = {"w": w_fn(kw, (*g["kernel"], c_in // groups, out_channels), param_dtype)}
        if use_bias:
            params["b"] = b_fn(kb, (out_channels,), param_dtype)
        return params, (), (*out, out_channels)

    def forward(params, state, x, *, key=None, train=True):
        g, out = geometry(x.shape[1:])
        xc, w = _promote(x, params["w"])                                      # lax wants one dtype
        bias = params["b"] if use_bias else None
        if _by_columns(impl, x.shape, out_channels, xc.dtype, g, out, groups)[0]:
            y = _conv_by_columns(xc, w, bias, out, activation,
                                 _Geometry(g["strides"], g["pads"], g["in_dilation"], g["dilation"], 1))
        else:
            z = _lax_conv(xc, w, window_strides=g["strides"], padding=g["pads"],
                          lhs_dilation=g["in_dilation"], rhs_dilation=g["dilation"],
                          groups=groups)                                      # (N, *out, C_out)
            y = f(z if bias is None else z + bias)
        return y, state, ((x, y) if df else (x,))

    def backward(params, res, dy):
        x, y = res if df else (res[0], None)          # (N, *spatial, C_in), y (N, *O, C_out)
        g, out = geometry(x.shape[1:])
        xc, w, dy = _promote(x, params["w"], dy)
        opts = dict(strides=g["strides"], pads=g["pads"], in_dilation=g["in_dilation"],
                    dilation=g["dilation"])
        fwd_dx_cols, dw_cols = _by_columns(impl, x.shape, out_channels, xc.dtype, g, out, groups)
        if fwd_dx_cols:                                                       # dz chunk by chunk
            dw, db = _conv_dw_columns(xc, dy, y, g["kernel"], activation=activation, **opts)
            dx = _conv_dx_columns(dy, y, w, x.shape, activation=activation, **opts)
        else:
            dz = dy if df is None else dy * df(y)                             # dz = dy ⊙ f'(z)
            if dw_cols:
                dw, db = _conv_dw_columns(xc, dz, None, g["kernel"], activation=None, **opts)
            else:
                dw = _conv_dw(xc, dz, g["kernel"], groups=groups, **opts)
                db = sum_acc(dz, axis=tuple(range(dz.ndim - 1)))
            dx = _conv_dx(dz, w, x.shape, groups=groups, **opts)
        dparams = {"w": dw}                                                   # (*K, C_in/G, C_out)
        if use_bias:
            dparams["b"] = db                                                 # (C_out,)
        return dparams, dx.astype(x.dtype)                                    # (N, *spatial, C_in)

    def check(params, state, x):
        c_in = params["w"].shape[-2] * groups
        if x.shape[-1] != c_in:
            raise ValueError(f"{name}: expected x.shape[-1] == {c_in} input channels, "
                             f"got x.shape={tuple(x.shape)}")

    if rank is None:
        return make_layer(name, init, forward, backward, check=check, min_ndim=3,
                          meaning="(batch, *spatial, channels)")
    return make_layer(name, init, forward, backward, check=check, ndim=rank + 2,
                      meaning=f"(batch, {_AXES[rank]})")


def conv(out_channels: int, kernel_size, *, strides=1, padding="SAME", dilation=1, groups: int = 1,
         use_bias: bool = True, w_init="he_normal", b_init="zeros", param_dtype=jnp.float32,
         impl: str = "auto", activation=None) -> Layer:
    """Convolution (cross-correlation, as in every deep-learning library), channels last.

    x (N, *spatial, C_in) with 1, 2 or 3 spatial axes: (N, L, C), (N, H, W, C) or
    (N, D, H, W, C). Any tuple among ``kernel_size``, ``strides``, ``dilation`` and
    ``padding`` fixes the number of spatial axes; with integers only, the input's is used.
    Params ``{"w": W (*K, C_in/G, C_out), "b": (C_out,)}`` (no ``"b"`` when
    ``use_bias=False``); W is He-normal (fan-in ∏K·C_in/G), b zeros. G = ``groups`` splits
    the channels into G groups; output channel co sees only the C_in/G input channels of its
    group g = co // (C_out/G).

    Forward, per spatial axis with stride s, dilation d and padding (lo, hi); o is the output
    position and κ the kernel offset (multi-indices), i < C_in/G::

        xp = x zero-padded by (lo, hi)                                     (N, *padded, C_in)
        y[n, o, co] = b[co] + Σ_κ Σ_i xp[n, o·s + κ·d, g·C_in/G + i] · W[κ, i, co]
                                                                           (N, *O, C_out)

    Sizes: k' = d·(k − 1) + 1 (the dilated kernel), O = ⌊(L + lo + hi − k')/s⌋ + 1.
    ``padding``: 'VALID' is (0, 0); 'SAME' gives O = ⌈L/s⌉ with a total padding of
    max((O − 1)·s + k' − L, 0), the odd cell at the end (lax's rule); an integer p is (p, p) on
    every axis; or one (lo, hi) pair per axis.

    Backward::

        db[co]       = Σ_n Σ_o dy[n, o, co]                                 (C_out,)
        dW[κ, i, co] = Σ_n Σ_o xp[n, o·s + κ·d, g·C_in/G + i] · dy[n, o, co]
                                                                           (*K, C_in/G, C_out)
        dx           = conv(dilate_s(dy), flip(W)ᵀ)                         (N, *spatial, C_in)

    dx is the transposed convolution of dy: dy with s − 1 zeros between neighbours and
    k' − 1 − lo zeros before, correlated with W flipped along its spatial axes and with its
    channel axes swapped (per group).
    db and dW are summed in float32 for bfloat16 (``accumulation_dtype``).

    ``impl`` picks how the three are computed. ``'lax'``: the forward and dx are ``lax``
    convolutions; dW is one ``lax`` convolution for 1 spatial axis, and a matrix product per
    kernel offset, of the shifted view xp[:, o·s + κ·d, :] and dy, for 2 or 3 (XLA's
    kernel-gradient convolution is several times slower there on CPU, see ``_conv_dw``).
    On CPU, a float32 2-D lax convolution at stride 1 with at least 16 channels in and out
    gets one extra output row, dropped again, which makes XLA run it with Eigen rather than
    YNNPACK, about twice as fast (see this module's "lax on CPU" section).
    Whatever ``impl`` picks, reverse-mode autodiff of the forward differentiates the plain
    convolution: the routed and column forwards carry a ``jax.custom_jvp`` with its tangent
    (see "what autodiff sees").
    ``'columns'`` (groups = 1 only): all three as matrix products over im2col columns
    (b·∏O, ∏K·C_in), a few examples at a time: y = cols·W, dW = Σ colsᵀ·dy, and dx the
    columns dy·Wᵀ added back where they were read. ``'auto'`` (the default), on CPU for 2 or
    3 spatial axes with groups = 1: dW by columns, and the forward and dx as lax's where
    they go to Eigen as above, by columns otherwise (the fastest measured there); ``'lax'``
    elsewhere.

    ``activation`` (None or ``'relu'``) applies f after the bias, y = f(z) with z the
    output above, the same function as a separate :func:`relu` layer. The layer then saves y,
    and its backward starts from the error before f::

        dz = dy ⊙ f'(z) = dy ⊙ [y > 0]                                      (N, *O, C_out)

    and computes db, dW and dx from dz in place of dy. By columns, f is applied to each chunk
    of z while it is in cache, and dz is formed chunk by chunk inside the dW and dx loops, so
    neither z nor dz is ever held whole (all by columns, the 2-D CNN step of BENCHMARKS.md
    needed 78 MiB of temporaries with ``activation='relu'`` against 113 MiB with separate
    relu layers).

    Raises ``ValueError`` for bad hyperparameters, for ``out_channels`` or the input channels
    not divisible by ``groups``, for a wrong rank or channel count, and (in ``init`` and
    ``forward``) for a dilated kernel larger than the padded input.
    """
    return _conv_layer("conv", out_channels, kernel_size, strides, padding, dilation, groups,
                       use_bias, w_init, b_init, param_dtype, transpose=False, impl=impl,
                       activation=activation)


def conv_transpose(out_channels: int, kernel_size, *, strides=1, padding="SAME", dilation=1,
                   groups: int = 1, use_bias: bool = True, w_init="he_normal", b_init="zeros",
                   param_dtype=jnp.float32, impl: str = "auto", activation=None) -> Layer:
    """Transposed convolution (“deconvolution”), channels last: a convolution of the input
    dilated by the stride, which upsamples by s.

    Shapes and params as :func:`conv`: x (N, *spatial, C_in), W (*K, C_in/G, C_out) He-normal,
    b (C_out,) zeros. The kernel is applied as it is, not flipped, with axes (in, out): flax's
    ``ConvTranspose`` and ``lax.conv_transpose(..., transpose_kernel=False)``. ``activation``
    and ``impl`` as in :func:`conv`.

    ``padding`` is the padding of the convolution this layer transposes: PyTorch's convention,
    and ``lax.conv_transpose(..., use_consistent_padding=True)``'s. With explicit padding,
    conv_transpose maps the output shape of ``conv`` (same kernel, strides, padding, dilation)
    back to its input shape, less the (L + lo + hi − k') mod s cells the stride dropped.
    Per axis, with k' = d·(k − 1) + 1::

        explicit (lo, hi), integer p = (p, p):  O = s·(L − 1) + k' − lo − hi
        'SAME':  O = s·L                        'VALID':  O = s·L + max(k' − s, 0)

    Forward: xd is x with s − 1 zeros between neighbours, padded by (P_lo, P_hi) =
    (k' − 1 − lo, k' − 1 − hi) (negative padding crops; 'SAME' and 'VALID' use
    lax.conv_transpose's (P_lo, P_hi)), o the output position, κ the kernel offset::

        y[n, o, co] = b[co] + Σ_κ Σ_i xd[n, o + κ·d, g·C_in/G + i] · W[κ, i, co]    (N, *O, C_out)

    Backward::

        db[co]       = Σ_n Σ_o dy[n, o, co]                                 (C_out,)
        dW[κ, i, co] = Σ_n Σ_o xd[n, o + κ·d, g·C_in/G + i] · dy[n, o, co]   (*K, C_in/G, C_out)
        dx           = conv(dy, flip(W)ᵀ) at stride s                        (N, *spatial, C_in)

    dx is an ordinary strided convolution of dy, padded by k' − 1 − P_lo (= lo for explicit
    padding) before, with W flipped along its spatial axes and its channel axes swapped (per
    group): the backward of ``conv_transpose`` is ``conv`` with the same stride and padding.
    dW is formulated as in :func:`conv`, with xd in place of xp; ``impl`` as in :func:`conv`
    ('auto' takes columns only at stride 1, where xd has no inserted zeros).
    """
    return _conv_layer("conv_transpose", out_channels, kernel_size, strides, padding, dilation,
                       groups, use_bias, w_init, b_init, param_dtype, transpose=True, impl=impl,
                       activation=activation)
