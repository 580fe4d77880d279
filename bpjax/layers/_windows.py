"""What the convolutions and the pools share: their hyperparameters, the padding and output size
of a window sliding over the spatial axes, the shifted views a window reads, and the plain
convolution itself (``lax.conv_general_dilated`` in the channels-last layouts).

Sizes, per spatial axis: the dilated window k' = d·(k − 1) + 1, the dilated input
L' = u·(L − 1) + 1, and the output O = ⌊(L' + lo + hi − k') / s⌋ + 1.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

DIMENSION_NUMBERS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}
AXES = {1: "length, channels", 2: "height, width, channels", 3: "depth, height, width, channels"}


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def positive_ints(name: str, arg: str, value):
    """An integer > 0, or a non-empty tuple of them (one per spatial axis)."""
    if isinstance(value, (tuple, list)) and value and all(is_int(v) and v > 0 for v in value):
        return tuple(int(v) for v in value)
    if is_int(value) and value > 0:
        return int(value)
    raise ValueError(f"{name}: expected {arg} to be an integer > 0 or a tuple of them, one per "
                     f"spatial axis, got {value!r}")


def check_padding(name: str, padding):
    """``"SAME"``, ``"VALID"``, an integer p ≥ 0 (p on both sides of every axis) or a tuple of
    (lo, hi) pairs of integers ≥ 0, one per spatial axis."""
    if isinstance(padding, str) and padding.upper() in ("SAME", "VALID"):
        return padding.upper()
    if is_int(padding) and padding >= 0:
        return int(padding)
    if (isinstance(padding, (tuple, list)) and padding
            and all(isinstance(p, (tuple, list)) and len(p) == 2 and all(is_int(v) and v >= 0 for v in p)
                    for p in padding)):
        return tuple((int(lo), int(hi)) for lo, hi in padding)
    raise ValueError(f"{name}: expected padding to be 'SAME', 'VALID', an integer >= 0 or a tuple of "
                     f"(lo, hi) pairs of integers >= 0, one per spatial axis, got {padding!r}")


def spatial_rank(name: str, max_rank, **args):
    """The number of spatial axes fixed by the tuple-valued ``args``, or None (then the input's)."""
    lengths = {arg: len(v) for arg, v in args.items() if isinstance(v, tuple)}
    got = ", ".join(f"{arg}={args[arg]!r}" for arg in lengths)
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{name}: expected one entry per spatial axis in every tuple, got {got}")
    rank = next(iter(lengths.values()), None)
    if rank is not None and max_rank is not None and rank > max_rank:
        raise ValueError(f"{name}: expected 1 to {max_rank} spatial axes, got {got}")
    return rank


def per_axis(value, rank: int) -> tuple:
    """``value`` for each of ``rank`` spatial axes (an integer stands for every axis)."""
    return tuple(value) if isinstance(value, tuple) else (value,) * rank


def same_pads(size: int, window: int, stride: int) -> tuple:
    """'SAME' (lax's rule): O = ⌈L/s⌉, the total padding split with the extra cell at the end."""
    total = max((-(-size // stride) - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def explicit_pads(padding, spatial, windows, strides) -> tuple:
    """Per-axis (lo, hi) padding of the input for a window sliding with ``strides``."""
    if padding == "SAME":
        return tuple(same_pads(n, k, s) for n, k, s in zip(spatial, windows, strides))
    if padding == "VALID":
        return ((0, 0),) * len(spatial)
    if isinstance(padding, tuple):
        return padding
    return ((padding, padding),) * len(spatial)


def transpose_pads(padding, spatial, windows, strides) -> tuple:
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
                 for k, (lo, hi) in zip(windows, explicit_pads(padding, spatial, windows, strides)))


def promote(*arrays):
    """The arrays cast to their common dtype (``lax`` convolutions need one)."""
    dtype = jnp.result_type(*arrays)
    return tuple(a.astype(dtype) for a in arrays)


def out_size(size, window, stride, lo, hi, in_dilation=1) -> int:
    """O = ⌊(u·(L − 1) + 1 + lo + hi − k') / s⌋ + 1 for a window of (dilated) size k'."""
    return (in_dilation * (size - 1) + 1 + lo + hi - window) // stride + 1


def conv_out_shape(spatial, kernel, g: "Geometry") -> tuple:
    """The output's spatial shape of the convolution ``g`` of an input of ``spatial`` shape by a
    kernel of spatial shape ``kernel``."""
    return tuple(out_size(n, d * (k - 1) + 1, s, lo, hi, u)
                 for n, k, d, s, u, (lo, hi) in zip(spatial, kernel, g.dilation, g.strides, g.in_dilation, g.pads))


def kernel_offsets(kernel):
    """Every kernel offset κ, in row-major order."""
    return itertools.product(*(range(k) for k in kernel))


def shifted_view(xp, kappa, dilation, strides, out):
    """The shifted view xp[:, κ·d + o·s, :] over the output positions o: (N, *out, C)."""
    start = (0, *(k * d for k, d in zip(kappa, dilation)), 0)
    stop = (st + (o - 1) * s + 1 for st, o, s in zip(start[1:-1], out, strides))
    limit = (xp.shape[0], *stop, xp.shape[-1])
    return lax.slice(xp, start, limit, (1, *strides, 1))


def columns(x, kernel, out, strides, pads, in_dilation, dilation):
    """im2col: the ∏K shifted views of xp (x padded by ``pads``, dilated by ``in_dilation``) side
    by side, κ-major: cols[n, o, (κ, ci)] = xp[n, o·s + κ·d, ci].     (N, *out, ∏K·C_in)"""
    xp = lax.pad(x, jnp.zeros((), x.dtype), pad_config(pads, in_dilation))
    return jnp.concatenate([shifted_view(xp, kappa, dilation, strides, out) for kappa in kernel_offsets(kernel)],
                           axis=-1)


def place_view(v, kappa, dilation, strides, padded_spatial):
    """The adjoint of ``shifted_view``: v (N, *out, C) put at positions κ·d + o·s of a zero array
    (N, *padded_spatial, C)."""
    pads = [(k * d, size - k * d - ((o - 1) * s + 1))
            for k, d, s, o, size in zip(kappa, dilation, strides, v.shape[1:-1], padded_spatial)]
    return lax.pad(v, jnp.zeros((), v.dtype), pad_config(pads, strides))


class Geometry(NamedTuple):
    """A convolution's per-axis strides s, (lo, hi) padding, input dilation u, kernel dilation d,
    and its feature groups: the arguments of ``lax.conv_general_dilated`` but for the layouts."""
    strides: tuple
    pads: tuple
    in_dilation: tuple
    dilation: tuple
    groups: int


def plain_conv(x, w, g: Geometry):
    """The generalised convolution as one ``lax.conv_general_dilated``.    (N, *O, C_out)"""
    return lax.conv_general_dilated(x, w, window_strides=g.strides, padding=g.pads,
                                    lhs_dilation=g.in_dilation, rhs_dilation=g.dilation,
                                    dimension_numbers=DIMENSION_NUMBERS[x.ndim - 2],
                                    feature_group_count=g.groups)


def pad_config(pads, in_dilation=None) -> list:
    """lax.pad's config for an array (N, *spatial, C): on each spatial axis (lo, hi) cells
    before and after (negative: cropped) and, with an input dilation u, u − 1 between
    neighbours; nothing on the batch and channel axes."""
    interior = (0,) * len(pads) if in_dilation is None else tuple(u - 1 for u in in_dilation)
    return [(0, 0, 0), *((lo, hi, i) for (lo, hi), i in zip(pads, interior)), (0, 0, 0)]


#: The activations a conv layer can apply to its output: y = f(z), and f'(z) from y.
ACTIVATIONS = {
    None: (lambda z: z, None),
    "relu": (lambda z: jnp.maximum(z, 0), lambda y: (y > 0).astype(y.dtype)),
}


