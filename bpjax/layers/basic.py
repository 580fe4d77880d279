"""Dense layer and activations, each with its hand-written backward."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import erf

from .. import initializers
from .. import kernels
from .._checks import check_positive_int, check_real
from .._core import Layer, accumulation_dtype, make_layer, sum_acc

__all__ = [
    "dense", "identity", "relu", "leaky_relu", "elu", "sigmoid", "tanh", "softplus", "gelu",
    "silu", "softmax", "log_softmax",
]


# ----------------------------------------------------------------------------- dense


def dense(out_dim: int, *, use_bias: bool = True, w_init="glorot_uniform", b_init="zeros",
          param_dtype=jnp.float32) -> Layer:
    """Affine map over the last axis; any leading axes are batch axes.

    Forward::

        y = x W + b            x (..., D_in), W (D_in, D_out), b (D_out,), y (..., D_out)

    Backward, with M = the product of the leading axes::

        dW = xᵀ dy             (D_in, D_out)   x, dy flattened to (M, D_in), (M, D_out)
        db = Σ_rows dy         (D_out,)
        dx = dy Wᵀ             (..., D_in)

    dW and db are summed over the M rows in float32 for bfloat16 inputs (``accumulation_dtype``).

    Params: ``{"w": (D_in, D_out), "b": (D_out,)}`` (no ``"b"`` when ``use_bias=False``).
    ``w_init`` defaults to Glorot-uniform, ``b_init`` to zeros; see :mod:`bpjax.initializers`.
    """
    out_dim = check_positive_int("dense", "out_dim", out_dim)
    w_fn = initializers.get(w_init, "dense")
    b_fn = initializers.get(b_init, "dense")

    def init(key, in_shape):
        if in_shape[-1] < 1:
            raise ValueError(f"dense: expected at least one input feature, got in_shape={tuple(in_shape)}")
        kw, kb = jax.random.split(key)
        params = {"w": w_fn(kw, (in_shape[-1], out_dim), param_dtype)}
        if use_bias:
            params["b"] = b_fn(kb, (out_dim,), param_dtype)
        return params, (), (*in_shape[:-1], out_dim)

    def forward(params, state, x, *, key=None, train=True):
        y = kernels.matmul(x, params["w"])                          # (..., D_out) = x W
        if use_bias:
            y = y + params["b"]
        return y, state, (x,)

    def backward(params, res, dy):
        (x,) = res
        x2 = x.reshape(-1, x.shape[-1])                     # (M, D_in)
        dy2 = dy.reshape(-1, dy.shape[-1])                  # (M, D_out)
        dparams = {"w": kernels.matmul_tn(x2, dy2)}                 # (D_in, D_out) = x2ᵀ dy2, float32 sum
        if use_bias:
            dparams["b"] = sum_acc(dy2, axis=0)             # (D_out,)
        dx = dy @ params["w"].T                             # (..., D_in)
        return dparams, dx

    def check(params, state, x):
        d_in = params["w"].shape[0]
        if x.shape[-1] != d_in:
            raise ValueError(f"dense: expected x.shape[-1] == {d_in}, got x.shape={tuple(x.shape)}")

    return make_layer("dense", init, forward, backward, check=check, min_ndim=2,
                      meaning="(batch, ..., features)", per_example="dense")


# ----------------------------------------------------------------------------- activations


def _activation(name: str, f, df, *, saves: str) -> Layer:
    """An elementwise layer y = f(x) with dx = dy ⊙ f'(·); ``df`` takes the saved ``x`` or ``y``."""

    def init(key, in_shape):
        return (), (), in_shape

    def forward(params, state, x, *, key=None, train=True):
        y = f(x)
        return y, state, ((x if saves == "x" else y),)

    def backward(params, res, dy):
        (saved,) = res
        return (), dy * df(saved)

    return make_layer(name, init, forward, backward)


def identity() -> Layer:
    """y = x;  dx = dy.  Any shape (N, ...)."""
    return _activation("identity", lambda x: x, lambda x: jnp.ones((), x.dtype), saves="x")


def relu() -> Layer:
    """y = max(x, 0);  dx = dy ⊙ [x > 0]  (the derivative at 0 is taken as 0).  Shapes (N, ...)."""
    return _activation("relu", lambda x: jnp.maximum(x, 0),
                       lambda y: (y > 0).astype(y.dtype), saves="y")


def leaky_relu(negative_slope: float = 0.01) -> Layer:
    """y = x if x ≥ 0 else s·x;  dx = dy ⊙ (1 if x ≥ 0 else s).  Shapes (N, ...)."""
    s = check_real("leaky_relu", "negative_slope", negative_slope)
    return _activation("leaky_relu", lambda x: jnp.where(x >= 0, x, s * x),
                       lambda x: jnp.where(x >= 0, 1.0, s).astype(x.dtype), saves="x")


def elu(alpha: float = 1.0) -> Layer:
    """y = x if x > 0 else α(eˣ − 1);  dx = dy ⊙ (1 if x > 0 else y + α).  Shapes (N, ...)."""
    a = check_real("elu", "alpha", alpha)

    def f(x):
        return jnp.where(x > 0, x, a * jnp.expm1(jnp.minimum(x, 0)))

    def df(x):
        return jnp.where(x > 0, 1.0, a * jnp.exp(jnp.minimum(x, 0))).astype(x.dtype)

    return _activation("elu", f, df, saves="x")


def sigmoid() -> Layer:
    """y = σ(x) = 1 / (1 + e⁻ˣ);  dx = dy ⊙ y(1 − y).  Shapes (N, ...)."""
    return _activation("sigmoid", jax.nn.sigmoid, lambda y: y * (1 - y), saves="y")


def tanh() -> Layer:
    """y = tanh(x);  dx = dy ⊙ (1 − y²).  Shapes (N, ...)."""
    return _activation("tanh", jnp.tanh, lambda y: 1 - y * y, saves="y")


def softplus() -> Layer:
    """y = log(1 + eˣ), computed as max(x, 0) + log1p(e^{−|x|});  dx = dy ⊙ σ(x).  Shapes (N, ...)."""
    return _activation("softplus", lambda x: jnp.maximum(x, 0) + jnp.log1p(jnp.exp(-jnp.abs(x))),
                       jax.nn.sigmoid, saves="x")


def gelu(approximate: bool = False) -> Layer:
    """Gaussian error linear unit.  Shapes (N, ...).

    Exact (default)::

        y = x Φ(x),               Φ(x) = ½(1 + erf(x/√2)),  φ(x) = e^{−x²/2}/√(2π)
        dx = dy ⊙ (Φ(x) + x φ(x))

    Tanh approximation (``approximate=True``)::

        u = √(2/π)(x + 0.044715 x³),   y = ½ x (1 + tanh u)
        dx = dy ⊙ (½(1 + tanh u) + ½ x (1 − tanh² u) √(2/π)(1 + 3·0.044715 x²))
    """
    c = math.sqrt(2 / math.pi)
    k = 0.044715

    if approximate:
        def f(x):
            return 0.5 * x * (1 + jnp.tanh(c * (x + k * x**3)))

        def df(x):
            t = jnp.tanh(c * (x + k * x**3))
            # beyond |x| = 20, 1 − tanh²u is exactly 0 in float32 and float64: clipping x there
            # keeps x·(1 + 3k x²) finite (x² would overflow to inf, and 0·inf is NaN)
            xc = jnp.clip(x, -20.0, 20.0)
            return 0.5 * (1 + t) + 0.5 * xc * (1 - t * t) * c * (1 + 3 * k * xc * xc)
    else:
        def f(x):
            return 0.5 * x * (1 + erf(x / math.sqrt(2)))

        def df(x):
            cdf = 0.5 * (1 + erf(x / math.sqrt(2)))
            pdf = jnp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
            return cdf + x * pdf

    return _activation("gelu", f, df, saves="x")


def silu() -> Layer:
    """y = x σ(x) (swish);  dx = dy ⊙ σ(x)(1 + x(1 − σ(x))).  Shapes (N, ...)."""

    def df(x):
        s = jax.nn.sigmoid(x)
        return s * (1 + x * (1 - s))

    return _activation("silu", lambda x: x * jax.nn.sigmoid(x), df, saves="x")


def _check_classes(name):
    def check(params, state, x):
        if x.shape[-1] < 1:
            raise ValueError(f"{name}: expected x.shape[-1] >= 1 class, got x.shape={tuple(x.shape)}")
    return check


def softmax() -> Layer:
    """Softmax over the last axis.

    Forward::  y_i = e^{x_i} / Σ_j e^{x_j}          x, y (N, ..., K)
    Backward:: dx = y ⊙ (dy − Σ_j dy_j y_j)          (N, ..., K)  (the Jacobian-vector product)

    Both computed in float32 for bfloat16 x (``accumulation_dtype``), returned in x's dtype.
    """

    def init(key, in_shape):
        return (), (), in_shape

    def forward(params, state, x, *, key=None, train=True):
        y = jax.nn.softmax(x.astype(accumulation_dtype(x.dtype)), axis=-1).astype(x.dtype)
        return y, state, (y,)

    def backward(params, res, dy):
        (y,) = res
        acc = accumulation_dtype(y.dtype, dy.dtype)
        yf, dyf = y.astype(acc), dy.astype(acc)
        return (), (yf * (dyf - jnp.sum(dyf * yf, axis=-1, keepdims=True))).astype(y.dtype)

    return make_layer("softmax", init, forward, backward, check=_check_classes("softmax"), min_ndim=2,
                      meaning="(batch, ..., classes)")


def log_softmax() -> Layer:
    """Log-softmax over the last axis, stable for large inputs.

    Forward::  y = x − max x − log Σ_j e^{x_j − max x}     x, y (N, ..., K)
    Backward:: dx = dy − softmax(x) Σ_j dy_j = dy − eʸ Σ_j dy_j     (N, ..., K)

    Both computed in float32 for bfloat16 x (``accumulation_dtype``), returned in x's dtype.
    """

    def init(key, in_shape):
        return (), (), in_shape

    def forward(params, state, x, *, key=None, train=True):
        xf = x.astype(accumulation_dtype(x.dtype))
        shifted = xf - lax.stop_gradient(jnp.max(xf, axis=-1, keepdims=True))
        y = shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))
        return y.astype(x.dtype), state, (y.astype(x.dtype),)

    def backward(params, res, dy):
        (y,) = res
        acc = accumulation_dtype(y.dtype, dy.dtype)
        dyf = dy.astype(acc)
        return (), (dyf - jnp.exp(y.astype(acc)) * jnp.sum(dyf, axis=-1, keepdims=True)).astype(y.dtype)

    return make_layer("log_softmax", init, forward, backward, check=_check_classes("log_softmax"),
                      min_ndim=2, meaning="(batch, ..., classes)")
