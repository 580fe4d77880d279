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
import math

import jax
import jax.numpy as jnp
from jax import lax

from .. import initializers, kernels
from .._checks import check_positive_int
from .._core import Layer, accumulation_dtype, make_layer, sum_acc
from ._windows import (ACTIVATIONS, AXES, DIMENSION_NUMBERS, Geometry, check_padding, columns, conv_out_shape,
                       explicit_pads, kernel_offsets, pad_config, per_axis, plain_conv, positive_ints, promote,
                       spatial_rank, transpose_pads)

__all__ = ["conv", "conv_transpose"]

# dW by shifted views and matrix products from this many spatial axes on, by one lax
# convolution below it: the faster on CPU (BENCHMARKS.md, "2-D conv kernel gradient by shifted views")
_DW_BY_VIEWS_FROM_RANK = 2


# ----------------------------------------------------------------------------- the two gradients


@functools.partial(jax.jit, static_argnames=("x_shape", "g", "conv"))   # jit: one compile when eager
def _conv_dx(dy, w, x_shape, g: Geometry, conv=plain_conv):
    """dx of the generalised convolution: the transposed convolution of dy::

        dx = conv(dilate_s(dy), flip(W)ᵀ)  at stride u                     (N, *spatial, C_in)

    dy gets s − 1 zeros between neighbours (s: the forward's stride) and k' − 1 − lo zeros
    before (then as many after as make the output L long); W is flipped along its spatial
    axes and its channel axes are swapped within each group; u is the forward's input dilation.
    ``conv`` is the convolution that computes it (``plain_conv``, or a kernel's formulation).
    """
    strides, pads, in_dilation, dilation, groups = g
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
    return conv(dy, wt, Geometry(in_dilation, tuple(dx_pads), strides, dilation, groups))  # (N, *spatial, C_in)


@functools.partial(jax.jit, static_argnames=("kernel", "g"))
def _conv_dw(x, dy, kernel, g: Geometry):
    """dW of the generalised convolution, within each group::

        dW[κ, i, co] = Σ_n Σ_o xp[n, o·s + κ·d, g·C_in/G + i] · dy[n, o, co]   (*K, C_in/G, C_out)

    Two formulations, chosen by the number r of spatial axes (``_DW_BY_VIEWS_FROM_RANK``):

    * r = 1: one ``lax`` convolution (XLA's kernel-gradient convolution): x as the input with
      the roles of batch and channels swapped, dy as the kernel, dilated by s;
    * r ≥ 2: shifted views and matrix products: for each offset κ, the strided view
      xp[:, κ·d + o·s, :] flattened to (M, C_in), M = N·∏O, gives dW[κ] = viewᵀ · dy with dy
      flattened to (M, C_out), one offset after another in a ``lax.scan``.

    The views are the faster on CPU from r = 2 on (BENCHMARKS.md, "2-D conv kernel gradient by
    shifted views").

    Either way the sums over n and o are accumulated, and dW returned, in ``accumulation_dtype``
    (float32 for bfloat16 x and dy).
    """
    strides, pads, in_dilation, dilation, groups = g
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
                                      dimension_numbers=DIMENSION_NUMBERS[r], batch_group_count=groups,
                                      preferred_element_type=accumulation_dtype(x.dtype, dy.dtype))
        return jnp.transpose(dw, (*spatial, 0, r + 1))                       # (*K, C_in/G, C_out)
    c_in, c_out = x.shape[-1], dy.shape[-1]
    m = math.prod(dy.shape[:-1])
    cfg = pad_config(pads, in_dilation)
    dy2 = dy.reshape(m, groups, c_out // groups)                              # (M, G, C_out/G)
    # One offset at a time, in a scan rather than a Python loop: XLA then holds one view, not
    # all ∏K of them. The zero padding is done inside the loop with a fill XLA cannot prove
    # constant ([κ₀ < 0], always 0), so that it fuses pad and slice into one read of x instead
    # of hoisting a padded copy of x out of the loop. On the 2-D case of the docstring: 12 MiB
    # of temporaries (the Python loop over views: 112 MiB; autodiff: 37 MiB), the same speed.
    span = (x.shape[0], *((o - 1) * s + 1 for o, s in zip(out, strides)), x.shape[-1])
    kappas = jnp.asarray(list(kernel_offsets(kernel)), jnp.int32)                   # (∏K, r)

    def one_offset(_, kappa):
        zero = jnp.zeros((), jnp.int32)                                       # int32 also under x64
        xp = lax.pad(x, (kappa[0] < 0).astype(x.dtype), cfg)                  # (N, *padded, C_in)
        start = (zero, *(kappa * jnp.asarray(dilation, jnp.int32)), zero)
        v = lax.slice(lax.dynamic_slice(xp, start, span), (0,) * xp.ndim, span, (1, *strides, 1))
        if groups == 1:
            return None, kernels.matmul_tn(v.reshape(m, c_in), dy.reshape(m, c_out))  # (C_in, C_out)
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
# (≤ COLUMN_CHUNK_BYTES) stay in cache and the ∏K-fold copy of x is never held whole.
# Measured on the 2-core CPU of BENCHMARKS.md (float32, jitted, best of 8): a 3×3 conv,
# 32→64 channels, 28×28, batch 128, 'SAME': forward 75 ms against 112 for lax's convolution
# (XLA hands it to YNNPACK), dx 79 against 105, dW 89 against 106 for the shifted views
# (and 946 for XLA's kernel-gradient convolution). b = 2 (1.8 MiB of columns) was the best
# chunk there: b = 1 pays the loop's per-iteration cost 128 times (fwd 139 ms), b = 8 falls
# out of cache (88 ms), the whole batch at once writes 110 MiB of columns (131 ms).



# ----------------------------------------------------------------------------- the layers


def _conv_layer(name, out_channels, kernel_size, strides, padding, dilation, groups, use_bias,
                w_init, b_init, param_dtype, transpose, impl, activation) -> Layer:
    """conv (transpose=False) and conv_transpose (transpose=True): the same generalised
    convolution, with s = strides, u = 1 or s = 1, u = strides."""
    out_channels = check_positive_int(name, "out_channels", out_channels)
    kernel_size = positive_ints(name, "kernel_size", kernel_size)
    strides = positive_ints(name, "strides", strides)
    dilation = positive_ints(name, "dilation", dilation)
    padding = check_padding(name, padding)
    groups = check_positive_int(name, "groups", groups)
    if out_channels % groups:
        raise ValueError(f"{name}: expected out_channels divisible by groups={groups}, got {out_channels}")
    if impl not in kernels.CONV_IMPLS:
        raise ValueError(f"{name}: expected impl to be one of {kernels.CONV_IMPLS}, got {impl!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: expected activation to be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    f, df = ACTIVATIONS[activation]
    if impl == "columns" and groups != 1:
        raise ValueError(f"{name}: expected groups=1 with impl='columns', got groups={groups}")
    rank = spatial_rank(name, 3, kernel_size=kernel_size, strides=strides, dilation=dilation,
                         padding=padding if isinstance(padding, tuple) else None)
    w_fn = initializers.get(w_init, name)
    b_fn = initializers.get(b_init, name)

    def geometry(in_shape):
        """For one example's shape: the kernel's spatial shape, the generalised convolution's
        geometry (strides s, (lo, hi) padding, input dilation u, kernel dilation d, groups) and
        the output's spatial shape."""
        r = len(in_shape) - 1
        if not 1 <= r <= 3 or (rank is not None and r != rank):
            want = f"{rank + 1} axes ({AXES[rank]})" if rank else "2 to 4 axes (*spatial, channels)"
            raise ValueError(f"{name}: expected in_shape with {want}, got in_shape={tuple(in_shape)}")
        kernel, s, d = (per_axis(v, r) for v in (kernel_size, strides, dilation))
        k_eff = tuple(di * (k - 1) + 1 for k, di in zip(kernel, d))
        spatial = in_shape[:-1]
        if transpose:
            pads = transpose_pads(padding, spatial, k_eff, s)
            g = Geometry((1,) * r, tuple(pads), s, d, groups)
        else:
            pads = explicit_pads(padding, spatial, k_eff, s)
            g = Geometry(s, tuple(pads), (1,) * r, d, groups)
        out = conv_out_shape(spatial, kernel, g)
        if min(out) < 1:
            raise ValueError(f"{name}: expected the dilated kernel {k_eff} to fit in the padded input "
                             f"along every spatial axis, got spatial shape {tuple(spatial)} with "
                             f"padding {pads}{' of the stride-dilated input' if transpose else ''}")
        return kernel, g, out

    def init(key, in_shape):
        kernel, g, out = geometry(in_shape)
        c_in = in_shape[-1]
        if c_in < 1:
            raise ValueError(f"{name}: expected at least one input channel, got in_shape={tuple(in_shape)}")
        if c_in % groups:
            raise ValueError(f"{name}: expected input channels divisible by groups={groups}, "
                             f"got in_shape={tuple(in_shape)}")
        kw, kb = jax.random.split(key)
        params = {"w": w_fn(kw, (*kernel, c_in // groups, out_channels), param_dtype)}
        if use_bias:
            params["b"] = b_fn(kb, (out_channels,), param_dtype)
        return params, (), (*out, out_channels)

    def forward(params, state, x, *, key=None, train=True):
        kernel, g, out = geometry(x.shape[1:])
        xc, w = promote(x, params["w"])                                      # lax wants one dtype
        bias = params["b"] if use_bias else None

        def plain(xc, w, bias, conv=plain_conv):                              # y = f(conv(x, W) + b)
            z = conv(xc, w, g)                                                # (N, *out, C_out)
            return f(z if bias is None else z + bias)

        y = kernels.conv_forward(plain, xc, w, bias, g=g, out=out, activation=activation, impl=impl)
        return y, state, ((x, y) if df else (x,))

    def backward(params, res, dy):
        x, y = res if df else (res[0], None)          # (N, *spatial, C_in), y (N, *O, C_out)
        kernel, g, out = geometry(x.shape[1:])
        xc, w, dy = promote(x, params["w"], dy)

        def plain(xc, w, y, dy, conv=None, dw_db=None):
            dz = dy if df is None else dy * df(y)                             # dz = dy ⊙ f'(z)
            if dw_db is None:
                dw = _conv_dw(xc, dz, kernel, g)                              # (*K, C_in/G, C_out)
                db = sum_acc(dz, axis=tuple(range(dz.ndim - 1)))              # (C_out,)
            else:
                dw, db = dw_db(xc, dz)                                        # a kernel's formulation
            return dw, db, _conv_dx(dz, w, x.shape, g, conv or plain_conv)    # (N, *spatial, C_in)

        dw, db, dx = kernels.conv_backward(plain, xc, w, y, dy, g=g, kernel=kernel, activation=activation,
                                           impl=impl)
        dparams = {"w": dw}                                                   # (*K, C_in/G, C_out)
        if use_bias:
            dparams["b"] = db                                                 # (C_out,)
        return dparams, dx.astype(x.dtype)                                    # (N, *spatial, C_in)

    def example_rows(params, res, dy):
        """Each example's weight gradient as a sum of outer products over the output positions
        o, within each group g (``per_example="columns"``, bpjax/_per_example.py)::

            dW_n[..., g] = Σ_o cols[n, o, g]ᵀ dz[n, o, g],   db_n = Σ_o dz[n, o]
            cols[n, o, g] = the window o reads of group g's channels, κ-major   (N, ∏O, G, ∏K·C_in/G)
            dz[n, o, g]   = dy ⊙ f'(z) at o, group g's output channels           (N, ∏O, G, C_out/G)"""
        x, y = res if df else (res[0], None)
        kernel, g, out = geometry(x.shape[1:])
        xc, dz = promote(x, dy)
        if df is not None:
            dz = dz * df(y)
        cols = columns(xc, kernel, out, g.strides, g.pads, g.in_dilation, g.dilation)   # (N, *O, ∏K·C_in)
        n, t = x.shape[0], math.prod(out)
        cols = cols.reshape(n, t, math.prod(kernel), groups, -1).transpose(0, 1, 3, 2, 4)
        return cols.reshape(n, t, groups, -1), dz.reshape(n, t, groups, -1)

    def check(params, state, x):
        c_in = params["w"].shape[-2] * groups
        if x.shape[-1] != c_in:
            raise ValueError(f"{name}: expected x.shape[-1] == {c_in} input channels, "
                             f"got x.shape={tuple(x.shape)}")

    if rank is None:
        return make_layer(name, init, forward, backward, check=check, min_ndim=3,
                          meaning="(batch, *spatial, channels)", per_example="columns", curvature="conv",
                          example_rows=example_rows)
    return make_layer(name, init, forward, backward, check=check, ndim=rank + 2,
                      meaning=f"(batch, {AXES[rank]})", per_example="columns", curvature="conv",
                      example_rows=example_rows)


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
