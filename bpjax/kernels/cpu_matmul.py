"""Matrix products formulated for XLA's CPU backend, whose matrix product (YNNPACK) runs some
shapes slowly: an output width N with a remainder N mod 16 of 9 to 15, and a narrow output
Q < P of a weight gradient aᵀb. BENCHMARKS.md ("Dense forward with 9 to 15 spare columns",
"Weight gradients with a narrow output") has the measurements. ``bpjax.kernels`` chooses them
for programs lowered for the CPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .._core import accumulation_dtype

#: Multiply-adds M·P·Q from which ``matmul_tn`` computes a narrow aᵀb as (bᵀa)ᵀ; below it, the
#: extra operation costs more than it saves.
TN_MIN_MACS = 2**19


def pads_columns(n: int) -> int:
    """How many zero columns make an output width ``n`` run fast (0: it already does)."""
    pad = -n % 16
    return pad if 0 < pad < 8 else 0


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x w for x (..., K) and w (K, N), with w padded by ``pads_columns(N)`` zero columns and
    the extra outputs dropped.                                                 (..., N)"""
    n = w.shape[-1]
    return (x @ jnp.pad(w, ((0, 0), (0, pads_columns(n)))))[..., :n]           # (..., N)


def transposes_tn(a: jax.Array, b: jax.Array) -> bool:
    """Whether ``matmul_tn`` computes aᵀb as (bᵀa)ᵀ: a narrow output (Q < P) of a large product."""
    return b.shape[-1] < a.shape[-1] and a.size * b.shape[-1] >= TN_MIN_MACS


def matmul_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """aᵀ b for a (M, P) and b (M, Q), contracting the long axis M, as (bᵀ a)ᵀ when
    ``transposes_tn``, with an optimisation barrier that keeps XLA from folding the transpose
    back into the product. Accumulated, and returned, in ``accumulation_dtype``.      (P, Q)"""
    acc = accumulation_dtype(a.dtype, b.dtype)
    if transposes_tn(a, b):
        return jax.lax.optimization_barrier(jnp.matmul(b.T, a, preferred_element_type=acc)).T  # (Q, P)ᵀ
    return jnp.matmul(a.T, b, preferred_element_type=acc)                        # (P, Q)
