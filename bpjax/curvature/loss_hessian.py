"""The loss's Hessian with respect to the network's output, as the backward needs it.

The GGN is G = Σ_n J_nᵀ H_n J_n, with H_n = ∂²L/∂y_n² the Hessian of the batch loss L (a mean,
as every bpjax loss is) with respect to example n's output y_n. Its quantities never form H_n:
they backpropagate the columns of a symmetric factor S_n (H_n = S_n S_nᵀ), or of a sampled one
(E[s sᵀ] = H_n), as cotangents through the network's own backward. Per loss, for y (N, ...)::

    softmax_cross_entropy   rows r (all axes but the last), R rows, p = softmax(z_r), τ = Σ_k t_k
        H_r = (τ/R) (diag p − p pᵀ),      S_r[:, k] = √(τ/R) √p_k (e_k − p)        (K columns)
        sample ŷ ~ Cat(p):                s_r = √(τ/R) (p − e_ŷ)
    squared_error           H_n = (1/N) I,     S_n = I/√N;   sample ŷ ~ N(y, I): s = (y − ŷ)/√N
    mean_squared_error      H = (2/S) I (S = y.size),        sample s = √(2/S) ε, ε ~ N(0, I)
    sigmoid_binary_cross_entropy  H = diag(σ(z)(1 − σ(z)))/S, sample ŷ ~ Bernoulli(σ(z)): s = (σ − ŷ)/√S
    huber                   H = diag([|r| ≤ δ])/S,           sample s = √h ⊙ ε, ε ~ N(0, I)
                            (no predictive distribution: the Gaussian ε only gives E[s sᵀ] = H)

τ = 1 for integer labels (label smoothing does not change H: smoothed targets still sum to 1);
for probability targets it assumes rows summing to one, as the loss checks. Huber's indicator
[|r| ≤ δ] is read off its own backward: dL/dy = clip(r, −δ, δ)/S equals r/S exactly there.

The factor is keyed by the rule the loss's factory names (``make_loss(..., hessian=...)``,
``Loss.hessian``), never by the loss's name: a loss that names no rule known here is refused,
naming it (a loss of your own called ``squared_error`` included).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .._checks import num_rows

__all__ = ["LOSSES", "factor_columns", "sampled_columns", "hessian_product", "check_loss_known"]

#: The rules (``make_loss(..., hessian=...)``) whose output Hessian this module knows.
LOSSES = ("softmax_cross_entropy", "squared_error", "mean_squared_error", "sigmoid_binary_cross_entropy", "huber")


def check_loss_known(where: str, loss) -> None:
    """``ValueError`` naming ``loss`` unless the Hessian rule its factory named is known here."""
    rule = getattr(loss, "hessian", None)
    if rule not in LOSSES:
        raise ValueError(f"{where}: expected a loss whose Hessian with respect to the output is known "
                         f"(make_loss(..., hessian=...) one of {', '.join(LOSSES)}), got {loss.name!r} "
                         f"with hessian={rule!r}")


def _diagonal(loss, y, res) -> jax.Array:
    """h, the diagonal of H for the elementwise losses, shaped like y."""
    s = y.size
    if loss.hessian == "squared_error":
        return jnp.full(y.shape, 1.0 / y.shape[0], y.dtype)
    if loss.hessian == "mean_squared_error":
        return jnp.full(y.shape, 2.0 / s, y.dtype)
    if loss.hessian == "sigmoid_binary_cross_entropy":
        sig = jax.nn.sigmoid(res[0])
        return sig * (1 - sig) / s
    (r,) = res                                                         # huber: inside δ where clip(r) = r
    return (loss.backward(res, 1.0) == r * (1.0 / s)).astype(y.dtype) / s


def _softmax_parts(y, res):
    """p (R, K) and τ/R (R, 1) of softmax_cross_entropy, rows flattened."""
    logp, target = res
    k = y.shape[-1]
    p = jnp.exp(logp.reshape(-1, k))                                   # (R, K)
    if jnp.issubdtype(target.dtype, jnp.integer):
        tau = jnp.ones((p.shape[0], 1), p.dtype)
    else:
        tau = jnp.sum(target.reshape(-1, k), axis=-1, keepdims=True).astype(p.dtype)
    return p, tau / num_rows(y.shape, trailing=1)


def factor_columns(loss, y, res) -> jax.Array:
    """The columns of S_n for every example, as cotangents: (C, N, *y.shape[1:]), with
    Σ_c s_c s_cᵀ = H_n for each n. C = the positions of one example times K for softmax
    cross-entropy, the elements of one example's output for the elementwise losses."""
    n, per = y.shape[0], y.shape[1:]
    if loss.hessian == "softmax_cross_entropy":
        k = per[-1]
        positions = math.prod(per[:-1])
        p, scale = _softmax_parts(y, res)                               # (R, K), (R, 1)
        s = jnp.sqrt(scale)[:, :, None] * jnp.sqrt(p)[:, :, None] * (jnp.eye(k, dtype=p.dtype) - p[:, None, :])
        s = s.reshape(n, positions, k, k)                               # (N, P, K columns, K)
        cols = jnp.einsum("pq,nqck->pcnqk", jnp.eye(positions, dtype=p.dtype), s)  # (P, K, N, P, K)
        return cols.reshape(positions * k, n, *per).astype(y.dtype)
    h = jnp.sqrt(_diagonal(loss, y, res)).reshape(n, -1)                 # (N, E)
    e = h.shape[1]
    cols = jnp.einsum("ce,ne->cne", jnp.eye(e, dtype=h.dtype), h)       # (E, N, E)
    return cols.reshape(e, n, *per).astype(y.dtype)


def sampled_columns(loss, y, res, key, samples: int) -> jax.Array:
    """``samples`` cotangents drawn so that (1/samples)·Σ E[s sᵀ] = H_n, each scaled by
    1/√samples (so that Σ over them estimates H): (samples, N, *y.shape[1:])."""
    keys = jax.random.split(key, samples)
    return jax.vmap(lambda k: _one_sample(loss, y, res, k))(keys) / jnp.sqrt(samples).astype(y.dtype)


def _one_sample(loss, y, res, key) -> jax.Array:
    """One cotangent s with E[s sᵀ] = H_n for every example (module doc), shaped like y."""
    if loss.hessian == "softmax_cross_entropy":
        p, scale = _softmax_parts(y, res)                               # (R, K), (R, 1)
        draw = jax.random.categorical(key, jnp.log(p), axis=-1)         # (R,) ŷ ~ Cat(p)
        s = jnp.sqrt(scale) * (p - jax.nn.one_hot(draw, p.shape[-1], dtype=p.dtype))
        return s.reshape(y.shape).astype(y.dtype)
    if loss.hessian == "sigmoid_binary_cross_entropy":
        sig = jax.nn.sigmoid(res[0])
        draw = jax.random.bernoulli(key, sig).astype(sig.dtype)         # ŷ ~ Bernoulli(σ(z))
        return ((sig - draw) / jnp.sqrt(y.size)).astype(y.dtype)
    eps = jax.random.normal(key, y.shape, y.dtype)                      # ŷ − y ~ N(0, I)
    return jnp.sqrt(_diagonal(loss, y, res)) * eps


def hessian_product(loss, y, res, u) -> jax.Array:
    """H u for a tangent u at the output, shaped like y: example by example, H_n u_n."""
    if loss.hessian == "softmax_cross_entropy":
        p, scale = _softmax_parts(y, res)                               # (R, K), (R, 1)
        u2 = u.reshape(p.shape)
        hu = scale * (p * u2 - p * jnp.sum(p * u2, axis=-1, keepdims=True))
        return hu.reshape(y.shape).astype(y.dtype)
    return _diagonal(loss, y, res) * u
