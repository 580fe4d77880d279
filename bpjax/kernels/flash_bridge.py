"""Autodiff of the Pallas attention forward, for the checks: ``pallas_call`` has no reverse-mode
rule, so ``jax.vjp`` of a layer built with ``multi_head_attention(..., impl="pallas")`` would
fail. :func:`flash_attention` runs the kernel forward and tells JAX that its derivative is that
of :func:`attention_reference`, the plain jnp attention: autodiff of the layer is then autodiff
of the plain forward (what every check compares the hand-written backward with), at the plain
forward's cost. The layer's own backward never comes here: it calls
``bpjax._flash.flash_backward``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .._core import accumulation_dtype
from .flash import flash_forward

__all__ = ["attention_reference", "flash_attention"]


def attention_reference(q, k, v, mask, *, causal, scale):
    """Plain attention, everything materialised: q, k, v (N, h, T, d), mask None or (N, 1, 1, T).

    Returns O = softmax(S) V (N, h, T, d) in q's dtype and L = log Σ_k e^{S} (N, h, T) in the
    accumulation dtype, with S = Q Kᵀ · scale masked; a row with no allowed key gets O = 0 and
    L = +∞, as the kernel gives."""
    acc = accumulation_dtype(q.dtype)
    t = q.shape[2]
    s = jnp.einsum("nhqd,nhkd->nhqk", q, k, preferred_element_type=acc) * scale   # (N, h, T, T)
    allowed = jnp.ones((t, t), bool) if mask is None else mask
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((t, t), bool))
    s = jnp.where(allowed, s, jnp.finfo(acc).min)
    has_key = jnp.any(allowed, axis=-1)                            # (·, ·, T, 1|…)
    p = jnp.where(has_key[..., None], jax.nn.softmax(s, axis=-1), 0)
    o = jnp.einsum("nhqk,nhkd->nhqd", p.astype(v.dtype), v, preferred_element_type=acc)
    lse = jnp.where(has_key, jax.nn.logsumexp(s, axis=-1), jnp.inf)
    return o.astype(q.dtype), jnp.broadcast_to(lse, q.shape[:3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def flash_attention(q, k, v, mask, causal, scale, blocks, interpret):
    """``bpjax._flash.flash_forward``'s (O, L), differentiable as :func:`attention_reference`."""
    return flash_forward(q, k, v, mask, causal=causal, scale=scale, blocks=blocks, interpret=interpret)


def _forward(q, k, v, mask, causal, scale, blocks, interpret):
    out = flash_attention(q, k, v, mask, causal, scale, blocks, interpret)
    return out, (q, k, v, mask)


def _backward(causal, scale, blocks, interpret, saved, cotangents):
    q, k, v, mask = saved
    _, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, mask, causal=causal, scale=scale),
                     q, k, v)
    return (*vjp(cotangents), None)


flash_attention.defvjp(_forward, _backward)
