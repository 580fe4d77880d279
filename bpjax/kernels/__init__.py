"""The one place a formulation is chosen: for the platform a program is lowered for.

A layer in ``bpjax.layers`` computes its equations plainly (``x @ w``, one
``lax.conv_general_dilated``, the jnp attention passes) and asks this module for the product,
convolution or attention it needs. Where another formulation is faster on one platform, the
choice is ``jax.lax.platform_dependent``: both are traced, and lowering keeps the branch of the
platform it lowers for. A step exported for CUDA or TPU from a CPU host (``jax.export``), or
jitted for a non-default device, holds that platform's formulation, never the CPU's.

* **matmul**, **matmul_tn**: on CPU, ``cpu_matmul`` (zero columns for a slow output width, a
  narrow weight gradient as (bᵀa)ᵀ); elsewhere the plain product.
* **conv_forward**, **conv_backward** (``impl="auto"``): on CPU, ``cpu_conv``'s columns and
  Eigen routing where they were measured faster; elsewhere the layer's plain pair.
  ``impl="lax"``, ``"routed"`` or ``"columns"`` ask for one formulation on every platform.
* **lean_attention_forward**, **lean_attention_backward**: ``impl="pallas"`` runs the
  flash-attention kernels, compiled (Triton) in a program lowered for CUDA and interpreted
  elsewhere; ``impl="auto"`` runs them for CUDA and the jnp lean passes elsewhere.

Each formulation is in the gradient cross-check table and tested against the plain one.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from .._core import accumulation_dtype
from . import cpu_conv, cpu_matmul, flash
from .flash_bridge import flash_attention

__all__ = ["matmul", "matmul_tn", "conv_forward", "conv_backward", "CONV_IMPLS", "attention_path",
           "lean_attention_forward", "lean_attention_backward", "ATTENTION_IMPLS"]


def _per_platform(what: str, default: Callable, cpu: Optional[Callable] = None, cuda: Optional[Callable] = None):
    """``default``, or a function that runs ``cpu``/``cuda`` in programs lowered for that platform
    (``jax.lax.platform_dependent``); with neither, ``default`` itself (nothing to choose). Each
    platform's branch runs under the name scope ``bpjax_<platform>_<what>``, so that a lowered
    or exported program shows which formulation it holds."""
    branches = {k: _scoped(f"bpjax_{k}_{what}", f) for k, f in (("cpu", cpu), ("cuda", cuda)) if f is not None}
    if not branches:
        return default
    return lambda *args: lax.platform_dependent(*args, default=default, **branches)


def _scoped(name: str, f: Callable) -> Callable:
    def run(*args):
        with jax.named_scope(name):
            return f(*args)
    return run


# ----------------------------------------------------------------------------- matrix products


def _plain_tn(a, b):
    return jnp.matmul(a.T, b, preferred_element_type=accumulation_dtype(a.dtype, b.dtype))   # (P, Q)


def matmul(x, w):
    """x w for x (..., K) and w (K, N): the forward product of a dense layer.     (..., N)"""
    plain = lambda x, w: x @ w                                                  # noqa: E731
    cpu = cpu_matmul.matmul if cpu_matmul.pads_columns(w.shape[-1]) else None
    return _per_platform("matmul", plain, cpu=cpu)(x, w)


def matmul_tn(a, b):
    """aᵀ b for a (M, P) and b (M, Q), contracting the long axis M: the weight-gradient product
    xᵀ dy of a dense layer or of a convolution's views, accumulated, and returned, in
    ``accumulation_dtype`` (float32 for bfloat16 inputs).                       (P, Q)"""
    cpu = cpu_matmul.matmul_tn if cpu_matmul.transposes_tn(a, b) else None
    return _per_platform("matmul_tn", _plain_tn, cpu=cpu)(a, b)


# ----------------------------------------------------------------------------- convolutions

#: ``impl`` of ``conv`` and ``conv_transpose``.
CONV_IMPLS = ("auto", "lax", "routed", "columns")


class _ConvPlan(NamedTuple):
    """What runs on CPU for ``impl="auto"``: the forward and dx by columns (with dz formed chunk
    by chunk), dW by columns, and the convolutions routed to Eigen where that helps."""
    columns: bool
    dw_by_columns: bool
    routed: bool


def _cpu_plan(x_shape, w_shape, dtype, g) -> Optional[_ConvPlan]:
    """The CPU formulations measured fastest for this convolution (None: the plain one). Columns
    take a plain convolution (one group, no input dilation) with 2 or 3 spatial axes: dW always,
    the forward and dx unless Eigen's convolution runs the forward faster."""
    eigen = cpu_conv.eigen_rows(x_shape, w_shape, dtype, g) > 0
    if len(x_shape) >= 4 and g.groups == 1 and all(u == 1 for u in g.in_dilation):
        return _ConvPlan(columns=not eigen, dw_by_columns=True, routed=True)
    return _ConvPlan(columns=False, dw_by_columns=False, routed=True) if eigen else None


def _plan(impl, x_shape, w_shape, dtype, g):
    """(the plan on every platform, the plan on CPU only) for ``impl``."""
    if impl == "lax":
        return None, None
    if impl == "columns":
        return _ConvPlan(True, True, False), None
    if impl == "routed":
        return _ConvPlan(False, False, True), None
    return None, _cpu_plan(x_shape, w_shape, dtype, g)


def conv_forward(plain: Callable, x, w, bias, *, g, out, activation, impl: str):
    """y = f(conv(x, W) + b): ``plain(x, w, bias)`` (the layer's own forward, one lax
    convolution) or the formulation ``impl`` and the platform choose.           (N, *O, C_out)"""

    def planned(plan):
        if plan is None:
            return plain
        if plan.columns:
            return lambda x, w, bias: cpu_conv.forward_by_columns(x, w, bias, out, activation, g)
        return lambda x, w, bias: plain(x, w, bias, conv=cpu_conv.conv)

    everywhere, on_cpu = _plan(impl, x.shape, w.shape, x.dtype, g)
    if everywhere is not None or on_cpu is None:
        return planned(everywhere)(x, w, bias)
    return _per_platform("conv_forward", plain, cpu=planned(on_cpu))(x, w, bias)


def conv_backward(plain: Callable, x, w, y, dy, *, g, kernel, activation, impl: str):
    """(dW, db, dx) of y = f(conv(x, W) + b): ``plain(x, w, y, dy)`` (the layer's own backward)
    or the formulation ``impl`` and the platform choose; ``y`` is the layer's output (None
    without an activation).        ((*K, C_in/G, C_out), (C_out,), (N, *spatial, C_in))"""
    opts = dict(strides=g.strides, pads=g.pads, in_dilation=g.in_dilation, dilation=g.dilation)

    def planned(plan):
        if plan is None:
            return plain
        if plan.columns:                                                      # dz chunk by chunk
            def by_columns(x, w, y, dy):
                dw, db = cpu_conv.dw_by_columns(x, dy, y, kernel, activation=activation, **opts)
                return dw, db, cpu_conv.dx_by_columns(dy, y, w, x.shape, activation=activation, **opts)
            return by_columns
        dw_db = (lambda x, dz: cpu_conv.dw_by_columns(x, dz, None, kernel, activation=None, **opts)
                 ) if plan.dw_by_columns else None
        return lambda x, w, y, dy: plain(x, w, y, dy, conv=cpu_conv.conv if plan.routed else None, dw_db=dw_db)

    everywhere, on_cpu = _plan(impl, x.shape, w.shape, x.dtype, g)
    if everywhere is not None or on_cpu is None:
        return planned(everywhere)(x, w, y, dy)
    return _per_platform("conv_backward", plain, cpu=planned(on_cpu))(x, w, y, dy)


# ----------------------------------------------------------------------------- attention

#: ``impl`` of ``multi_head_attention`` (and ``attention_impl`` of the blocks that hold one).
ATTENTION_IMPLS = ("jnp", "pallas", "auto")


def attention_path(impl: str, lean: bool, q, mask) -> str:
    """Which attention runs: ``"standard"`` or ``"lean"`` (the jnp passes, by ``lean``),
    ``"pallas"`` (the kernels, on every platform) or ``"auto"`` (the kernels in a program lowered
    for CUDA, the lean jnp passes elsewhere: both save O and L). ``impl="auto"`` falls back to
    the jnp passes for inputs the kernels' GPU lowering does not take (``flash.lowers``). The
    forward and the backward both ask, with the same arguments."""
    if impl == "pallas":
        return "pallas"
    if impl == "auto" and flash.lowers(q, mask):
        return "auto"
    return "lean" if lean else "standard"


def _flash_forward(causal, scale, blocks, interpret):
    return lambda q, k, v, mask: flash_attention(q, k, v, mask, causal, scale, blocks, interpret)


def _flash_backward(causal, scale, blocks, interpret):
    return lambda do, q, k, v, o, lse, mask: flash.flash_backward(
        do, q, k, v, o, lse, mask, causal=causal, scale=scale, blocks=blocks, interpret=interpret)


def _kernels(what, path, interpret, make, lean):
    """The kernels ``make(interpret)`` for ``path``: interpreted where asked (``interpret``), else
    compiled for CUDA and, elsewhere, interpreted ("pallas") or the jnp ``lean`` passes ("auto")."""
    if interpret is not None:
        return make(interpret) if path == "pallas" else _per_platform(what, lean, cuda=make(interpret))
    return _per_platform(what, make(True) if path == "pallas" else lean, cuda=make(False))


def lean_attention_forward(path: str, lean: Callable, q, k, v, mask, *, causal, scale, blocks, interpret):
    """(O, L) of the lean attention: ``lean(q, k, v, mask)`` (the layer's jnp passes) or the
    Pallas kernels, as ``path`` (see ``attention_path``) and the platform choose.
                                                                 ((N, h, T, d), (N, h, T))"""
    if path == "lean":
        return lean(q, k, v, mask)
    return _kernels("attention_forward", path, interpret, lambda i: _flash_forward(causal, scale, blocks, i),
                    lean)(q, k, v, mask)


def lean_attention_backward(path: str, lean: Callable, do, q, k, v, o, lse, mask, *, causal, scale, blocks,
                            interpret):
    """(dQ, dK, dV) of the lean attention: ``lean(do, q, k, v, o, lse, mask)`` or the Pallas
    kernels, as in ``lean_attention_forward``.                     3 × (N, h, T, d)"""
    if path == "lean":
        return lean(do, q, k, v, o, lse, mask)
    return _kernels("attention_backward", path, interpret, lambda i: _flash_backward(causal, scale, blocks, i),
                    lean)(do, q, k, v, o, lse, mask)
