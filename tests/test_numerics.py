"""Extreme values stay finite and match the reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from helpers import assert_close


def _loss_matches_reference(loss, logits, target, dvalue, dtype):
    """Value and hand-written dlogits are finite and equal the ``jax.vjp`` reference; returns the value."""
    dvalue = jnp.asarray(dvalue, dtype)
    value, res = loss.forward(logits, target)
    dlogits = loss.backward(res, dvalue)
    ref_value, vjp = jax.vjp(lambda z: loss.forward(z, target)[0], logits)
    assert np.isfinite(value) and np.all(np.isfinite(dlogits))
    assert_close(value, ref_value, dtype, "value")
    assert_close(dlogits, vjp(dvalue)[0], dtype, "dlogits")
    return value


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("target_kind", ["labels", "probs"])
def test_cross_entropy_with_huge_logits(dtype, target_kind):
    logits = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0], [2.0, 1e4, -1e4]], dtype)
    target = jnp.array([1, 1, 2]) if target_kind == "labels" else jax.nn.one_hot(jnp.array([1, 1, 2]), 3, dtype=dtype)
    loss = bp.softmax_cross_entropy(label_smoothing=0.1)
    value = _loss_matches_reference(loss, logits, target, 0.9, dtype)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_binary_cross_entropy_with_huge_logits_and_hard_targets(dtype):
    logits = jnp.array([[1e4], [-1e4], [100.0], [-100.0], [0.5]], dtype)
    target = jnp.array([[0.0], [1.0], [1.0], [0.0], [1.0]], dtype)
    loss = bp.sigmoid_binary_cross_entropy()
    value = _loss_matches_reference(loss, logits, target, 1.0, dtype)


def test_sigmoid_and_log_softmax_extremes_are_finite():
    x = jnp.array([[-100.0, 100.0, -1e4, 1e4]])
    for layer in (bp.sigmoid(), bp.log_softmax(), bp.softplus(), bp.tanh(), bp.elu(), bp.gelu(), bp.silu()):
        y, _, res = layer.forward((), (), x)
        _, dx = layer.backward((), res, jnp.array([[0.3, -0.7, 1.1, 0.2]]))
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx)), layer


# Layer norm over constant rows and batch norm over a batch of one: tests/test_norm.py.

# (no exact 0: at a kink of the formula, jax.vjp takes half of each side where min/max tie, e.g.
# elu's min(x, 0) at x = 0, while the hand-written derivative is the true one; tested below)
EXTREME = [[-100.0, 100.0, -1e4, 1e4, 0.25], [-1e4, -1e4 - 1.0, -1e4 - 50.0, -2e4, -1e4 + 3.0],
           [-1e30, -1e30, 0.25, -1e30, -5.0], [30.0, -30.0, 88.0, -88.0, 1e-30]]
ELEMENTWISE = {"sigmoid": bp.sigmoid, "tanh": bp.tanh, "softplus": bp.softplus, "elu": bp.elu,
               "gelu": bp.gelu, "silu": bp.silu,
               "relu": bp.relu, "leaky_relu": bp.leaky_relu, "softmax": bp.softmax, "log_softmax": bp.log_softmax}


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_activations_at_extremes_match_the_reference(dtype):
    """sigmoid at ±100 and ±1e4, log_softmax of rows of very negative values (−1e4 … −1e30),
    every activation there: y and dx finite and equal to jax.vjp of the same forward."""
    x = jnp.asarray(EXTREME, dtype)
    dy = jnp.asarray(np.random.default_rng(9).standard_normal(x.shape), dtype)
    layers = {name: make() for name, make in ELEMENTWISE.items()}

    @jax.jit
    def run(x, dy):
        out = {}
        for name, layer in layers.items():
            y, _, res = layer.forward((), (), x)
            _, dx = layer.backward((), res, dy)
            _, vjp = jax.vjp(lambda x: layer.forward((), (), x)[0], x)
            out[name] = (y, dx, vjp(dy)[0])
        return out

    for name, (y, dx, ref_dx) in run(x, dy).items():
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx)), name
        assert_close(dx, ref_dx, dtype, f"{name} dx")
    y, dx, _ = run(x, dy)["sigmoid"]
    np.testing.assert_array_equal(np.asarray(y)[0, :4], [0.0, 1.0, 0.0, 1.0] if dtype == jnp.float32
                                  else np.asarray(jax.nn.sigmoid(x[0, :4])))
    logp = np.asarray(run(x, dy)["log_softmax"][0], np.float64)
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, rtol=1e-6)      # still a distribution


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_cross_entropy_of_very_negative_logits(dtype):
    """Logits far below 0 (every class unlikely, shifted by −1e4 … −1e30): loss and dlogits
    finite and equal to the reference; shifting all logits of a row changes nothing."""
    logits = jnp.asarray(EXTREME[1:3], dtype)
    loss = bp.softmax_cross_entropy()
    target = jnp.array([4, 2])
    value = _loss_matches_reference(loss, logits, target, 0.6, dtype)
    shifted, _ = loss.forward(logits - logits.max(-1, keepdims=True), target)
    assert_close(value, shifted, dtype, "shift invariance")


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_binary_cross_entropy_with_exact_zero_and_one_targets(dtype):
    """Targets exactly 0 and 1 (and ½) at logits from −1e4 to 1e4: the loss is 0 where the logit
    agrees with a hard target, finite everywhere, and the gradient equals the reference."""
    z = jnp.asarray([-1e4, -100.0, -3.0, 0.25, 3.0, 100.0, 1e4], dtype)
    logits = jnp.stack([z, z, z], axis=1)                               # (7, 3)
    target = jnp.broadcast_to(jnp.asarray([0.0, 1.0, 0.5], dtype), logits.shape)
    loss = bp.sigmoid_binary_cross_entropy()
    value = _loss_matches_reference(loss, logits, target, 1.3, dtype)
    hard, _ = loss.forward(jnp.asarray([[-1e4, 1e4]], dtype), jnp.asarray([[0.0, 1.0]], dtype))
    assert float(hard) == 0.0                                           # −1e4 with t=0, +1e4 with t=1


@pytest.mark.parametrize("big", [1e4, 1e30])   # 1e30: x² overflows float32; the backward clips it
def test_gelu_tanh_at_extremes(big):
    x = jnp.asarray([[-big, big, 0.25]], jnp.float32)
    layer = bp.gelu(approximate=True)
    y, _, res = layer.forward((), (), x)
    _, dx = layer.backward((), res, jnp.ones_like(x))
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    np.testing.assert_allclose(dx[0, :2], [0.0, 1.0])


def test_kinks_of_the_formula_get_the_true_derivative():
    """At 0, where the formulas have max/min/|·| kinks but the functions are smooth, the
    hand-written derivative is the true one: σ(0) − t for binary cross-entropy, 1 for elu."""
    t = jnp.asarray([[0.0, 1.0, 0.5]])
    bce = bp.sigmoid_binary_cross_entropy()
    _, res = bce.forward(jnp.zeros((1, 3)), t)
    np.testing.assert_allclose(bce.backward(res), (0.5 - np.asarray(t)) / 3)
    elu = bp.elu()
    _, _, res = elu.forward((), (), jnp.zeros((1, 2)))
    np.testing.assert_array_equal(elu.backward((), res, jnp.asarray([[0.7, -1.2]]))[1], [[0.7, -1.2]])


def test_cross_entropy_gradient_is_exact_for_unnormalised_targets_under_jit():
    """Under jit the row-sum check cannot see the values; the backward p·Σt − t is still exact."""
    loss = bp.softmax_cross_entropy(label_smoothing=0.1)
    z = jnp.asarray([[0.3, -1.2, 2.0], [1.5, 0.1, -0.4]])
    t = jnp.asarray([[0.2, 0.9, 0.4], [0.0, 0.3, 0.1]])            # rows sum to 1.5 and 0.4

    @jax.jit
    def both(z, t):
        _, res = loss.forward(z, t)
        _, vjp = jax.vjp(lambda z: loss.forward(z, t)[0], z)
        return loss.backward(res, 0.7), vjp(jnp.asarray(0.7, z.dtype))[0]

    mine, ref = both(z, t)
    np.testing.assert_allclose(mine, ref, rtol=1e-10)


@pytest.mark.parametrize("m, p, q", [(128, 1024, 4), (100, 125, 10), (64, 8, 32)],
                         ids=["narrow-large-transposed", "narrow-small-direct", "wide-direct"])
def test_matmul_tn_equals_xT_dy_in_each_form(m, p, q):
    """bpjax.kernels.matmul_tn, the weight-gradient product, equals aᵀb (float64, jitted) whether
    it takes the (bᵀa)ᵀ form (on CPU: narrow output, M·P·Q ≥ TN_MIN_MACS) or the direct one."""
    from bpjax.kernels import matmul_tn
    from bpjax.kernels.cpu_matmul import TN_MIN_MACS
    transposed = q < p and m * p * q >= TN_MIN_MACS
    assert transposed == (m * p * q == 2**19)                    # the first case is the form's edge
    gen = np.random.default_rng(m + p + q)
    a, b = (jnp.asarray(gen.standard_normal(s), jnp.float64) for s in ((m, p), (m, q)))
    hlo = jax.jit(matmul_tn).lower(a, b).as_text()
    assert ("optimization_barrier" in hlo) == (transposed and jax.default_backend() == "cpu")
    np.testing.assert_allclose(jax.jit(matmul_tn)(a, b), np.asarray(a).T @ np.asarray(b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [10, 15, 16, 20, 30])
def test_matmul_equals_x_w_padded_or_not(n):
    """bpjax.kernels.matmul, the dense forward, equals x w (float64, jitted), whether it pads w
    to the next multiple of 16 columns (on CPU for n mod 16 in 9..15) or not."""
    from bpjax.kernels import matmul
    gen = np.random.default_rng(n)
    x, w = (jnp.asarray(gen.standard_normal(s), jnp.float64) for s in ((3, 7, 33), (33, n)))
    hlo = jax.jit(matmul).lower(x, w).as_text()
    assert ("pad" in hlo) == (jax.default_backend() == "cpu" and n % 16 > 8)
    got = jax.jit(matmul)(x, w)
    assert got.shape == (3, 7, n)
    np.testing.assert_allclose(got, np.asarray(x) @ np.asarray(w), rtol=1e-12, atol=1e-12)
