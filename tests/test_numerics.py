"""Extreme values stay finite and match the reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from helpers import assert_close


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("target_kind", ["labels", "probs"])
def test_cross_entropy_with_huge_logits(dtype, target_kind):
    logits = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0], [2.0, 1e4, -1e4]], dtype)
    target = jnp.array([1, 1, 2]) if target_kind == "labels" else jax.nn.one_hot(jnp.array([1, 1, 2]), 3, dtype=dtype)
    loss = bp.softmax_cross_entropy(label_smoothing=0.1)
    value, res = loss.forward(logits, target)
    dlogits = loss.backward(res, jnp.asarray(0.9, dtype))
    ref_value, vjp = jax.vjp(lambda z: loss.forward(z, target)[0], logits)
    assert np.isfinite(value) and np.all(np.isfinite(dlogits))
    assert_close(value, ref_value, dtype, "value")
    assert_close(dlogits, vjp(jnp.asarray(0.9, dtype))[0], dtype, "dlogits")


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_binary_cross_entropy_with_huge_logits_and_hard_targets(dtype):
    logits = jnp.array([[1e4], [-1e4], [100.0], [-100.0], [0.5]], dtype)
    target = jnp.array([[0.0], [1.0], [1.0], [0.0], [1.0]], dtype)
    loss = bp.sigmoid_binary_cross_entropy()
    value, res = loss.forward(logits, target)
    dlogits = loss.backward(res)
    ref_value, vjp = jax.vjp(lambda z: loss.forward(z, target)[0], logits)
    assert np.isfinite(value) and np.all(np.isfinite(dlogits))
    assert_close(value, ref_value, dtype, "value")
    assert_close(dlogits, vjp(jnp.ones((), dtype))[0], dtype, "dlogits")


def test_sigmoid_and_log_softmax_extremes_are_finite():
    x = jnp.array([[-100.0, 100.0, -1e4, 1e4]])
    for layer in (bp.sigmoid(), bp.log_softmax(), bp.softplus(), bp.tanh(), bp.elu(), bp.gelu(), bp.silu()):
        y, _, res = layer.forward((), (), x)
        _, dx = layer.backward((), res, jnp.array([[0.3, -0.7, 1.1, 0.2]]))
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx)), layer
