"""Losses, each with its hand-written derivative: the error at the output of the network.

Mixed precision: every loss computes its value in ``accumulation_dtype`` (float32 for bfloat16
predictions, the dtype itself for float32 and float64), so the mean over the batch and the
log-sum-exp keep float32's precision, and returns the error at the output in the predictions'
dtype, so the backward of the network runs in that dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import _core
from .._checks import check_real, concrete, num_rows
from .._core import Loss, accumulation_dtype, make_loss

__all__ = ["squared_error", "mean_squared_error", "softmax_cross_entropy",
           "sigmoid_binary_cross_entropy", "huber"]


def check_labels(y, num_classes: int, where: str, *, num_examples=None) -> None:
    """Raise ``ValueError`` unless ``y`` holds class labels for ``num_classes`` classes.

    A host-side check of a whole dataset's labels, run once before training (under ``jit``
    the loss cannot see the values: an out-of-range label gives a NaN or a silently wrong
    loss). ``y`` must have an integer dtype, at least one axis (one label per example on the
    first: ``(N,)``, or ``(N, T)`` for a sequence) and, with ``num_examples``, ``N`` rows;
    every value must lie in ``[0, num_classes)``. ``where`` names the caller (``"fit"``).
    """
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: expected integer class labels, got labels of dtype {y.dtype.name}")
    if y.ndim == 0:
        raise ValueError(f"{where}: expected labels with one label per example (shape (N,)), "
                         f"got labels.shape={tuple(y.shape)}")
    if num_examples is not None and y.shape[0] != num_examples:
        raise ValueError(f"{where}: expected one label per example ({num_examples} labels), "
                         f"got labels.shape={tuple(y.shape)}")
    if y.size:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            bad = np.flatnonzero((y < 0) | (y >= num_classes))
            first = np.unravel_index(bad[0], y.shape)
            at = first[0] if y.ndim == 1 else tuple(int(i) for i in first)
            raise ValueError(f"{where}: expected labels in [0, {num_classes}), got labels in [{lo}, {hi}] "
                             f"({bad.size} of {y.size} out of range, the first at index {at})")


def _in_unit_interval(name, what, target):
    """Raise if ``target``'s values are known (outside jit) and some lie outside [0, 1]."""
    t = concrete(target)
    if t is not None and t.size:
        lo, hi = float(t.min()), float(t.max())
        if not (0.0 <= lo and hi <= 1.0):            # (NaN fails too)
            raise ValueError(f"{name}: expected {what} in [0, 1], got values in [{lo}, {hi}]")


def _same_shape(name):
    def check(pred, target):
        if not jnp.issubdtype(target.dtype, jnp.floating):
            raise TypeError(f"{name}: expected a floating-point target, got dtype {jnp.dtype(target.dtype).name} "
                            "(cast it first, e.g. target.astype(jnp.float32))")
        if tuple(target.shape) != tuple(pred.shape):
            raise ValueError(f"{name}: expected target.shape == pred.shape == {tuple(pred.shape)}, "
                             f"got target.shape={tuple(target.shape)}")
    return check


def _residual(pred, target):
    """r = y − y' in the accumulation dtype of both (float32 for bfloat16 predictions)."""
    acc = accumulation_dtype(pred.dtype, target.dtype)
    return pred.astype(acc) - target.astype(acc)


def squared_error() -> Loss:
    """The textbook loss: half the squared Euclidean distance, averaged over the n examples.

    Forward::   E = (1/n) Σ_i ½‖y_i − y'_i‖²       y, y' (n, ...);  E scalar
    Backward::  dE/dy = dE · (y − y') / n            (n, ...)
    """

    def forward(pred, target):
        r = _residual(pred, target)                         # (n, ...) in float32 for bfloat16
        return 0.5 * jnp.sum(r * r) / pred.shape[0], (r.astype(pred.dtype),)

    def backward(res, dvalue):
        (r,) = res
        return (r * (dvalue / r.shape[0])).astype(r.dtype)

    return make_loss("squared_error", forward, backward, check=_same_shape("squared_error"), hessian="squared_error")


def mean_squared_error() -> Loss:
    """Mean of the squared error over every element.

    Forward::   L = (1/S) Σ (y − y')²       S = y.size
    Backward::  dL/dy = dL · 2(y − y') / S
    """

    def forward(pred, target):
        r = _residual(pred, target)
        return jnp.mean(r * r), (r.astype(pred.dtype),)

    def backward(res, dvalue):
        (r,) = res
        return (r * (2 * dvalue / r.size)).astype(r.dtype)

    return make_loss("mean_squared_error", forward, backward, check=_same_shape("mean_squared_error"),
                     hessian="mean_squared_error")


def huber(delta: float = 1.0) -> Loss:
    """Huber loss, mean over every element (quadratic near 0, linear beyond ``delta``).

    Forward::   r = y − y',  ℓ(r) = ½r² if |r| ≤ δ else δ(|r| − ½δ),  L = (1/S) Σ ℓ(r)
    Backward::  dL/dy = dL · clip(r, −δ, δ) / S
    """
    delta = check_real("huber", "delta", delta)
    if not delta > 0:
        raise ValueError(f"huber: expected delta > 0, got {delta!r}")

    def forward(pred, target):
        r = _residual(pred, target)
        a = jnp.abs(r)
        quad = jnp.minimum(a, delta)
        return jnp.mean(0.5 * quad * quad + delta * (a - quad)), (r.astype(pred.dtype),)

    def backward(res, dvalue):
        (r,) = res
        return (jnp.clip(r, -delta, delta) * (dvalue / r.size)).astype(r.dtype)

    return make_loss("huber", forward, backward, check=_same_shape("huber"), hessian="huber")


def softmax_cross_entropy(label_smoothing: float = 0.0) -> Loss:
    """Softmax cross-entropy over the last (class) axis, averaged over all other axes.

    Targets are integer labels of shape ``pred.shape[:-1]`` or probabilities (one-hot or soft)
    of shape ``pred.shape``. With smoothing ε the target is t = (1 − ε) t + ε/K.

    Forward::   log p = z − logsumexp(z)   (stable for large logits)
                L = −(1/n) Σ_rows Σ_k t_k log p_k          z (..., K), n = rows
    Backward::  dL/dz = dL · (p Σ_k t_k − t) / n             (..., K)   (= p − t for rows summing to 1)

    log p, L and dL/dz are computed in float32 for bfloat16 logits; log p is saved, and dL/dz
    returned, in the logits' dtype.
    """
    eps = check_real("softmax_cross_entropy", "label_smoothing", label_smoothing)
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"softmax_cross_entropy: expected 0 <= label_smoothing < 1, got {label_smoothing!r}")

    def forward(logits, target):
        k = logits.shape[-1]
        acc = accumulation_dtype(logits.dtype)
        logp = jax.nn.log_softmax(logits.astype(acc), axis=-1)            # (..., K)
        if jnp.issubdtype(target.dtype, jnp.integer):
            picked = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
            per_row = -(1 - eps) * picked - (eps / k) * jnp.sum(logp, axis=-1)
        else:
            t = (1 - eps) * target.astype(accumulation_dtype(acc, target.dtype)) + eps / k
            per_row = -jnp.sum(t * logp, axis=-1)
        return jnp.mean(per_row), (logp.astype(logits.dtype), target)

    def backward(res, dvalue):
        logp, target = res
        k = logp.shape[-1]
        acc = accumulation_dtype(logp.dtype)
        p = jnp.exp(logp.astype(acc))                                   # (..., K)
        if jnp.issubdtype(target.dtype, jnp.integer):
            t = (1 - eps) * (target[..., None] == jnp.arange(k)).astype(acc) + eps / k
            dz = p - t                                                  # Σ_k t_k = 1
        else:
            t = (1 - eps) * target.astype(accumulation_dtype(acc, target.dtype)) + eps / k
            dz = p * jnp.sum(t, axis=-1, keepdims=True) - t             # exact for any row sum
        return (dz * (dvalue / num_rows(logp.shape, trailing=1))).astype(logp.dtype)

    def check(pred, target):
        name = "softmax_cross_entropy"
        if pred.ndim < 2:
            raise ValueError(f"{name}: expected pred.ndim >= 2 (batch, ..., classes), got pred.shape={tuple(pred.shape)}")
        if jnp.issubdtype(target.dtype, jnp.integer):
            if tuple(target.shape) != tuple(pred.shape[:-1]):
                raise ValueError(f"{name}: expected integer labels of shape {tuple(pred.shape[:-1])}, "
                                 f"got target.shape={tuple(target.shape)}")
            labels = concrete(target)          # values are only known outside jit
            if labels is not None and labels.size:
                lo, hi = int(labels.min()), int(labels.max())
                if lo < 0 or hi >= pred.shape[-1]:
                    raise ValueError(f"{name}: expected labels in [0, {pred.shape[-1]}), "
                                     f"got labels in [{lo}, {hi}]")
            elif labels is None and _core._HOOKS and hasattr(_core._HOOKS[-1], "labels"):
                _core._HOOKS[-1].labels(name, target, pred.shape[-1])   # check mode: checked under jit
        elif jnp.issubdtype(target.dtype, jnp.floating):
            if tuple(target.shape) == tuple(pred.shape[:-1]):      # labels' shape: the dtype is wrong
                raise ValueError(f"{name}: expected integer labels for targets of shape {tuple(target.shape)} "
                                 f"(probabilities have shape {tuple(pred.shape)}), got dtype "
                                 f"{jnp.dtype(target.dtype).name}")
            if tuple(target.shape) != tuple(pred.shape):
                raise ValueError(f"{name}: expected probability targets of shape {tuple(pred.shape)} or integer "
                                 f"labels of shape {tuple(pred.shape[:-1])}, got target.shape={tuple(target.shape)}")
            _in_unit_interval(name, "probability targets", target)
            t = concrete(target)             # dL/dz = p − t holds for rows of t that sum to 1
            if t is not None and t.size:
                sums = t.sum(axis=-1)
                if not np.allclose(sums, 1.0, rtol=0, atol=1e-3):
                    raise ValueError(f"{name}: expected probability targets summing to 1 over the last axis, "
                                     f"got sums in [{float(sums.min())}, {float(sums.max())}]")
        else:
            raise TypeError(f"{name}: expected integer labels or floating-point probabilities, "
                            f"got target dtype {jnp.dtype(target.dtype).name}")

    return make_loss("softmax_cross_entropy", forward, backward, check=check, hessian="softmax_cross_entropy")


def _widened(pred, target):
    """pred and target in their accumulation dtype (float32 for bfloat16)."""
    acc = accumulation_dtype(pred.dtype, target.dtype)
    return pred.astype(acc), target.astype(acc)


def sigmoid_binary_cross_entropy() -> Loss:
    """Binary cross-entropy on logits, mean over every element (each is one binary example).

    Forward::   ℓ = max(z, 0) − z t + log(1 + e^{−|z|})     (= −t log σ(z) − (1−t) log(1−σ(z)))
                L = (1/S) Σ ℓ                               z, t (N, ...), t ∈ [0, 1]
    Backward::  dL/dz = dL · (σ(z) − t) / S

    Both computed in float32 for bfloat16 logits; dL/dz returned in the logits' dtype.
    """
    name = "sigmoid_binary_cross_entropy"

    def forward(logits, target):
        z, t = _widened(logits, target)
        loss = jnp.maximum(z, 0) - z * t + jnp.log1p(jnp.exp(-jnp.abs(z)))
        return jnp.mean(loss), (logits, target)

    def backward(res, dvalue):
        logits, target = res
        z, t = _widened(logits, target)
        return ((jax.nn.sigmoid(z) - t) * (dvalue / logits.size)).astype(logits.dtype)

    def check(pred, target):
        if not jnp.issubdtype(target.dtype, jnp.floating):
            raise TypeError(f"{name}: expected floating-point targets in [0, 1], "
                            f"got dtype {jnp.dtype(target.dtype).name}")
        _same_shape(name)(pred, target)
        _in_unit_interval(name, "targets", target)

    return make_loss(name, forward, backward, check=check, hessian="sigmoid_binary_cross_entropy")
