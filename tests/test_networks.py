"""Whole networks: bpjax.value_and_grad equals reference_value_and_grad (jax.value_and_grad)."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bpjax as bp
from helpers import assert_close, init_params, normal, rng

NETWORKS = {
    # the textbook network: sigmoid hidden layers, squared error
    "textbook-sigmoid": (lambda: bp.sequential(bp.dense(4), bp.sigmoid(), bp.dense(2), bp.sigmoid()),
                         (3,), bp.squared_error, "float"),
    "depth1-linear": (lambda: bp.sequential(bp.dense(2)), (5,), bp.mean_squared_error, "float"),
    "depth3-relu-ce": (lambda: bp.sequential(bp.dense(8), bp.relu(), bp.dense(8), bp.relu(), bp.dense(4)),
                       (6,), bp.softmax_cross_entropy, "labels"),
    "depth4-mixed-huber": (lambda: bp.sequential(bp.dense(6), bp.tanh(), bp.dense(6), bp.gelu(True),
                                                 bp.residual(bp.sequential(bp.dense(6), bp.silu())),
                                                 bp.dense(6), bp.elu(), bp.dense(3)),
                           (4,), lambda: bp.huber(0.5), "float"),
    "width1-bce": (lambda: bp.sequential(bp.dense(1), bp.softplus(), bp.dense(5), bp.leaky_relu(0.1),
                                         bp.dense(2)), (3,), bp.sigmoid_binary_cross_entropy, "binary"),
    "log-softmax-head": (lambda: bp.sequential(bp.dense(5), bp.log_softmax(), bp.dense(3)),
                         (4,), bp.squared_error, "float"),
    # a norm before a max pool: under jit XLA recomputes the normalised x inside the pool's
    # backward, with other rounding than the forward's copy (a backward that compared cells with
    # the saved y lost windows here, 54% off in float64 for resnet1d)
    "norm-maxpool": (lambda: bp.sequential(bp.conv(6, 3, use_bias=False), bp.batch_norm(), bp.relu(), bp.max_pool(2),
                                           bp.layer_norm(), bp.max_pool(3, strides=2, padding=1),
                                           bp.flatten(), bp.dense(3)),
                     (24, 2), bp.softmax_cross_entropy, "labels"),
    "resnet1d": (lambda: __import__("bpjax.models").models.resnet1d(4, channels=6), (40, 1),
                 bp.softmax_cross_entropy, "labels"),
}


def _problem(name, dtype, batch=5):
    make_net, in_shape, make_loss, kind = NETWORKS[name]
    net, loss = make_net(), make_loss()
    gen = rng(name)
    params, state, out_shape = init_params(net, in_shape, gen, dtype)
    x = normal(gen, (batch, *in_shape), dtype)
    y_shape = (batch, *out_shape)
    if kind == "labels":
        target = jnp.asarray(gen.integers(0, out_shape[-1], y_shape[:-1]))
    elif kind == "binary":
        target = jnp.asarray(gen.uniform(size=y_shape) > 0.5, dtype)
    else:
        target = normal(gen, y_shape, dtype)
    return net, loss, params, state, x, target


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_network_gradients_equal_reference(name, dtype):
    net, loss, params, state, x, target = _problem(name, dtype)
    (value, _), grads = jax.jit(bp.value_and_grad(net, loss))(params, state, x, target)
    (ref_value, _), ref_grads = jax.jit(bp.reference_value_and_grad(net, loss))(params, state, x, target)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
    assert_close(value, ref_value, dtype, "value")
    assert_close(grads, ref_grads, dtype, name)


@pytest.mark.parametrize("batch", [1, 7])
def test_batch_sizes(batch):
    net, loss, params, state, x, target = _problem("depth3-relu-ce", jnp.float64, batch=batch)
    (_, _), grads = jax.jit(bp.value_and_grad(net, loss))(params, state, x, target)
    (_, _), ref = jax.jit(bp.reference_value_and_grad(net, loss))(params, state, x, target)
    assert_close(grads, ref, jnp.float64, f"batch={batch}")


def test_value_and_grad_swaps_with_jax_value_and_grad():
    """Same signature and output structure as jax.value_and_grad(..., has_aux=True)."""
    net, loss, params, state, x, target = _problem("textbook-sigmoid", jnp.float64)
    out = bp.value_and_grad(net, loss)(params, state, x, target, key=jax.random.PRNGKey(0))
    ref = bp.reference_value_and_grad(net, loss)(params, state, x, target, key=jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(ref)


def test_textbook_loss_value_and_output_error():
    """E = (1/n) Σ ½‖y − y'‖² and dE/dy = (y − y')/n, checked by hand on numbers."""
    y = jnp.array([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]])
    t = jnp.array([[0.0, 2.0], [1.5, 1.0], [1.0, 0.0]])
    value, res = bp.squared_error().forward(y, t)
    np.testing.assert_allclose(value, (0.5 * (1 + 0) + 0.5 * (1 + 4) + 0.5 * (4 + 0)) / 3)
    np.testing.assert_allclose(bp.squared_error().backward(res), (y - t) / 3)


def test_training_with_optax_lowers_the_loss():
    net, loss, params, state, x, target = _problem("depth3-relu-ce", jnp.float32, batch=16)
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)
    vg = bp.value_and_grad(net, loss)

    @jax.jit
    def step(params, opt_state):
        (value, _), grads = vg(params, state, x, target)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    first = None
    for _ in range(50):
        params, opt_state, value = step(params, opt_state)
        first = value if first is None else first
    assert float(value) < 0.5 * float(first)
