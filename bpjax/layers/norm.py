"""Normalisation layers (batch, layer, RMS and group norm), each with its hand-written backward.

All four standardise ``x`` over some axes and then scale it. Batch, layer and group norm share
one derivation: with ``x̂ = (x − μ)·rstd``, ``rstd = 1/√(σ² + ε)`` and μ, σ² the mean and the
(biased) variance over ``M`` entries, the gradient of the standardisation is::

    dx = rstd · (dx̂ − mean(dx̂) − x̂ ⊙ mean(dx̂ ⊙ x̂))       means over the same M entries

that is ``(1/M)·rstd·(M·dx̂ − Σ dx̂ − x̂·Σ(dx̂·x̂))``. ``_standardize`` and
``_standardize_backward`` below are that pair; each layer says over which axes.

Mixed precision: for bfloat16 x the statistics (μ, σ², rstd), the backward's two means and the
parameter gradients Σ_rows are computed in float32 (``accumulation_dtype``); x̂, y and dx are
stored and returned in x's dtype. For float32 and float64 nothing changes.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from .._checks import check_positive_int, check_real
from .._core import Layer, accumulation_dtype, make_layer

__all__ = ["batch_norm", "layer_norm", "rms_norm", "group_norm"]


# ----------------------------------------------------------------------------- shared


def _mean(a, axes, axis_name=None):
    """Mean over ``axes`` (kept as size-1 axes), and over devices when ``axis_name`` is set."""
    m = jnp.mean(a, axis=axes, keepdims=True)
    return m if axis_name is None else lax.pmean(m, axis_name)


def _wide(*arrays):
    """The arrays in their accumulation dtype (float32 for bfloat16; unchanged otherwise)."""
    acc = accumulation_dtype(*(a.dtype for a in arrays))
    return tuple(a.astype(acc) for a in arrays)


def _sum_rows(dy, xhat=None):
    """dβ = Σ_rows dy, or dγ = Σ_rows dy ⊙ x̂ (over every axis but the last), summed in float32
    for bfloat16."""
    if xhat is None:
        (d,) = _wide(dy)
        return jnp.sum(d, axis=_rows(dy))
    d, xh = _wide(dy, xhat)
    return jnp.sum(d * xh, axis=_rows(dy))


def _standardize(x, axes, eps, axis_name=None):
    """x̂ = (x − μ)·rstd with μ, σ² (biased) over ``axes``; returns x̂ (x's dtype) and μ, σ², rstd
    (float32 for bfloat16 x)."""
    (xf,) = _wide(x)
    mu = _mean(xf, axes, axis_name)
    xc = xf - mu
    var = _mean(xc * xc, axes, axis_name)          # two passes: no cancellation in E[x²] − μ²
    rstd = lax.rsqrt(var + eps)
    return (xc * rstd).astype(x.dtype), mu, var, rstd


def _standardize_backward(dxhat, xhat, rstd, axes, axis_name=None):
    """dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)), means over ``axes`` (and devices); computed
    in float32 for bfloat16, returned in dx̂'s dtype."""
    d, xh = _wide(dxhat, xhat)
    return (rstd * (d - _mean(d, axes, axis_name) - xh * _mean(d * xh, axes, axis_name))).astype(dxhat.dtype)


def _check_eps(name, eps):
    eps = check_real(name, "eps", eps)
    if not eps > 0:
        raise ValueError(f"{name}: expected eps > 0, got {eps!r}")
    return eps


def _check_channels(name, what, n, x):
    if x.shape[-1] != n:
        raise ValueError(f"{name}: expected x.shape[-1] == {n} ({what}), got x.shape={tuple(x.shape)}")


def _rows(x):
    """Every axis but the last: the axes the parameter gradients sum over."""
    return tuple(range(x.ndim - 1))


# ----------------------------------------------------------------------------- batch norm


def batch_norm(momentum: float = 0.9, eps: float = 1e-5, *, axis_name=None,
               param_dtype=jnp.float32) -> Layer:
    """Batch normalisation, channels last: statistics over every axis but the last.

    x (N, ..., C); the M = N·… entries of each channel are its rows. Params
    ``{"scale": γ (C,), "bias": β (C,)}`` (init 1, 0); state ``{"mean": (C,), "var": (C,)}``,
    the running averages (init 0, 1).

    Forward, training (``train=True``)::

        μ = (1/M) Σ_rows x            σ² = (1/M) Σ_rows (x − μ)²            (C,)
        rstd = 1/√(σ² + ε)            x̂ = (x − μ) ⊙ rstd                    (N, ..., C)
        y = γ ⊙ x̂ + β                                                       (N, ..., C)

    and the state update (σ² is the *biased* batch variance, the one the forward used)::

        mean ← momentum·mean + (1 − momentum)·μ
        var  ← momentum·var  + (1 − momentum)·σ²

    Backward, training (μ and σ² depend on x: the full batch-statistics formula)::

        dγ = Σ_rows dy ⊙ x̂            dβ = Σ_rows dy                         (C,)
        dx̂ = dy ⊙ γ                                                          (N, ..., C)
        dx = (rstd/M) ⊙ (M·dx̂ − Σ_rows dx̂ − x̂ ⊙ Σ_rows(dx̂ ⊙ x̂))              (N, ..., C)

    Evaluation (``train=False``) normalises with the running averages and leaves the state
    unchanged; the layer is then affine in x::

        x̂ = (x − mean) / √(var + ε),   y = γ ⊙ x̂ + β
        dγ, dβ as above,   dx = dy ⊙ γ / √(var + ε)

    A batch of one row (M = 1) in training: σ² = 0, so x̂ = 0, y = β and dx = 0, all finite
    (rstd = 1/√ε); the state still moves towards μ = x and σ² = 0. M counts every row, so a
    single image of H·W > 1 pixels is a real batch.

    ``axis_name``: run the layer under ``jax.vmap``, ``shard_map`` or ``pmap`` over a split of
    the batch, with that axis name, and μ, σ² and the two backward means (Σ_rows dx̂ and
    Σ_rows dx̂ ⊙ x̂, over M) are ``lax.pmean``-ed over it: every device normalises with the
    global batch's statistics, so y, dx and the state equal those of one device seeing the
    whole batch (for shards of equal size). dγ and dβ stay this device's partial sums, like
    every other layer's dparams; sum them over devices with the rest of the gradient.
    """
    name = "batch_norm"
    momentum = check_real(name, "momentum", momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{name}: expected momentum in [0, 1], got {momentum!r}")
    eps = _check_eps(name, eps)

    def init(key, in_shape):
        c = in_shape[-1]
        params = {"scale": jnp.ones((c,), param_dtype), "bias": jnp.zeros((c,), param_dtype)}
        state = {"mean": jnp.zeros((c,), param_dtype), "var": jnp.ones((c,), param_dtype)}
        return params, state, in_shape

    def forward(params, state, x, *, key=None, train=True):
        if train:
            rows = _rows(x)
            xhat, mu, var, rstd = _standardize(x, rows, eps, axis_name)   # (N, ..., C), (1, ..., 1, C)
            new_state = {k: (momentum * state[k] + (1 - momentum) * s.reshape(-1)).astype(state[k].dtype)
                         for k, s in (("mean", mu), ("var", var))}
            res = {"xhat": xhat, "batch_rstd": rstd}
        else:
            xf, mean, var = _wide(x, state["mean"], state["var"])
            rstd = lax.rsqrt(var + eps)                                    # (C,)
            xhat = ((xf - mean) * rstd).astype(x.dtype)                    # (N, ..., C)
            new_state = state
            res = {"xhat": xhat, "running_rstd": rstd}
        y = params["scale"] * xhat + params["bias"]                        # (N, ..., C)
        return y, new_state, res

    def backward(params, res, dy):
        xhat = res["xhat"]
        rows = _rows(dy)
        dparams = {"scale": _sum_rows(dy, xhat),                           # (C,)
                   "bias": _sum_rows(dy)}                                  # (C,)
        dxhat = dy * params["scale"]                                       # (N, ..., C)
        if "running_rstd" in res:                                          # evaluation: affine
            dx = (dxhat * res["running_rstd"]).astype(dy.dtype)            # (N, ..., C)
        else:
            dx = _standardize_backward(dxhat, xhat, res["batch_rstd"], rows, axis_name)  # (N, ..., C)
        return dparams, dx

    def check(params, state, x):
        _check_channels(name, "channels", params["scale"].shape[0], x)
        if x.size == 0 and x.shape[-1] > 0:      # training statistics of no rows would be NaN
            raise ValueError(f"{name}: expected at least one row per channel, got x.shape={tuple(x.shape)}")

    return make_layer(name, init, forward, backward, check=check, min_ndim=2,
                      meaning="(batch, ..., channels)", per_example="mixes_examples")


# ----------------------------------------------------------------------------- layer norm


def layer_norm(eps: float = 1e-5, *, param_dtype=jnp.float32) -> Layer:
    """Layer normalisation over the last axis (D features), per row.

    Params ``{"scale": γ (D,), "bias": β (D,)}`` (init 1, 0).

    Forward::

        μ = (1/D) Σ_j x_j             σ² = (1/D) Σ_j (x_j − μ)²            (N, ..., 1)
        rstd = 1/√(σ² + ε)            x̂ = (x − μ) ⊙ rstd                    (N, ..., D)
        y = γ ⊙ x̂ + β                                                       (N, ..., D)

    Backward::

        dγ = Σ_rows dy ⊙ x̂            dβ = Σ_rows dy                         (D,)
        dx̂ = dy ⊙ γ                                                          (N, ..., D)
        dx = rstd ⊙ (dx̂ − mean_j dx̂ − x̂ ⊙ mean_j(dx̂ ⊙ x̂))                    (N, ..., D)

    A constant row has σ² = 0: x̂ = 0, y = β, dx = rstd·(dx̂ − mean_j dx̂), all finite.
    """
    name = "layer_norm"
    eps = _check_eps(name, eps)

    def init(key, in_shape):
        d = in_shape[-1]
        return {"scale": jnp.ones((d,), param_dtype), "bias": jnp.zeros((d,), param_dtype)}, (), in_shape

    def forward(params, state, x, *, key=None, train=True):
        xhat, _, _, rstd = _standardize(x, (-1,), eps)                     # (N, ..., D), (N, ..., 1)
        y = params["scale"] * xhat + params["bias"]                        # (N, ..., D)
        return y, state, (xhat, rstd)

    def backward(params, res, dy):
        xhat, rstd = res
        dparams = {"scale": _sum_rows(dy, xhat),                           # (D,)
                   "bias": _sum_rows(dy)}                                  # (D,)
        dxhat = dy * params["scale"]                                       # (N, ..., D)
        return dparams, _standardize_backward(dxhat, xhat, rstd, (-1,))    # (N, ..., D)

    def check(params, state, x):
        _check_channels(name, "features", params["scale"].shape[0], x)

    return make_layer(name, init, forward, backward, check=check, min_ndim=2,
                      meaning="(batch, ..., features)", per_example="norm")


# ----------------------------------------------------------------------------- RMS norm


def rms_norm(eps: float = 1e-6, *, param_dtype=jnp.float32) -> Layer:
    """Root-mean-square normalisation over the last axis (D features): no centring, no bias.

    Params ``{"scale": γ (D,)}`` (init 1).

    Forward::

        rstd = 1/√((1/D) Σ_j x_j² + ε)                                      (N, ..., 1)
        x̂ = x ⊙ rstd,    y = γ ⊙ x̂                                          (N, ..., D)

    Backward (∂rstd/∂x_j = −rstd³ x_j / D)::

        dγ = Σ_rows dy ⊙ x̂                                                  (D,)
        dx̂ = dy ⊙ γ                                                          (N, ..., D)
        dx = rstd ⊙ (dx̂ − x̂ ⊙ mean_j(dx̂ ⊙ x̂))                                (N, ..., D)

    A zero row gives y = 0 and finite gradients (rstd = 1/√ε).
    """
    name = "rms_norm"
    eps = _check_eps(name, eps)

    def init(key, in_shape):
        return {"scale": jnp.ones((in_shape[-1],), param_dtype)}, (), in_shape

    def forward(params, state, x, *, key=None, train=True):
        (xf,) = _wide(x)                                                   # float32 for bfloat16
        rstd = lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps) # (N, ..., 1)
        xhat = (xf * rstd).astype(x.dtype)                                 # (N, ..., D)
        return params["scale"] * xhat, state, (xhat, rstd)

    def backward(params, res, dy):
        xhat, rstd = res
        dparams = {"scale": _sum_rows(dy, xhat)}                           # (D,)
        d, xh = _wide(dy * params["scale"], xhat)                          # dx̂ (N, ..., D)
        dx = rstd * (d - xh * jnp.mean(d * xh, axis=-1, keepdims=True))    # (N, ..., D)
        return dparams, dx.astype(dy.dtype)

    def check(params, state, x):
        _check_channels(name, "features", params["scale"].shape[0], x)

    return make_layer(name, init, forward, backward, check=check, min_ndim=2,
                      meaning="(batch, ..., features)", per_example="norm")


# ----------------------------------------------------------------------------- group norm


def group_norm(num_groups: int, eps: float = 1e-5, *, param_dtype=jnp.float32) -> Layer:
    """Group normalisation, channels last: the C channels form G groups of C/G; statistics per
    example and group, over the spatial axes and the channels of the group.

    x (N, ..., C), seen as (N, S, G, C/G) with S the product of the spatial axes (S = 1 for
    x (N, C)); M = S·C/G entries per (example, group). Params ``{"scale": γ (C,), "bias": β (C,)}``
    (init 1, 0), per channel.

    Forward::

        μ, σ² = mean and biased variance over (S, C/G)                      (N, 1, G, 1)
        x̂ = (x − μ) ⊙ rstd,   rstd = 1/√(σ² + ε)                            (N, S, G, C/G)
        y = γ ⊙ x̂ + β                                                       (N, ..., C)

    Backward::

        dγ = Σ_rows dy ⊙ x̂            dβ = Σ_rows dy                         (C,)
        dx̂ = dy ⊙ γ, seen as (N, S, G, C/G)
        dx = rstd ⊙ (dx̂ − mean_(S,C/G) dx̂ − x̂ ⊙ mean_(S,C/G)(dx̂ ⊙ x̂))        (N, ..., C)

    G = 1 is layer norm over all of an example's axes; G = C is instance norm.
    """
    name = "group_norm"
    groups = check_positive_int(name, "num_groups", num_groups)
    eps = _check_eps(name, eps)
    axes = (1, 3)                                                          # S and C/G

    def grouped(a):
        return a.reshape(a.shape[0], -1, groups, a.shape[-1] // groups)    # (N, S, G, C/G)

    def init(key, in_shape):
        c = in_shape[-1]
        if c < 1:
            raise ValueError(f"{name}: expected at least one channel, got in_shape={tuple(in_shape)}")
        if c % groups:
            raise ValueError(f"{name}: expected the channel count divisible by num_groups={groups}, "
                             f"got in_shape={tuple(in_shape)}")
        return {"scale": jnp.ones((c,), param_dtype), "bias": jnp.zeros((c,), param_dtype)}, (), in_shape

    def forward(params, state, x, *, key=None, train=True):
        xhat, _, _, rstd = _standardize(grouped(x), axes, eps)             # (N, S, G, C/G), (N, 1, G, 1)
        xhat = xhat.reshape(x.shape)                                       # (N, ..., C)
        y = params["scale"] * xhat + params["bias"]                        # (N, ..., C)
        return y, state, (xhat, rstd)

    def backward(params, res, dy):
        xhat, rstd = res
        dparams = {"scale": _sum_rows(dy, xhat),                           # (C,)
                   "bias": _sum_rows(dy)}                                  # (C,)
        dxhat = grouped(dy * params["scale"])                              # (N, S, G, C/G)
        dx = _standardize_backward(dxhat, grouped(xhat), rstd, axes)       # (N, S, G, C/G)
        return dparams, dx.reshape(dy.shape)                               # (N, ..., C)

    def check(params, state, x):
        _check_channels(name, "channels", params["scale"].shape[0], x)

    return make_layer(name, init, forward, backward, check=check, min_ndim=2,
                      meaning="(batch, ..., channels)", per_example="norm")
