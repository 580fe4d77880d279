"""as_jax_fn: a layer that jax.grad differentiates with the hand-written backward."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import bpjax as bp
from helpers import init_params, normal, rng

LAYERS = {
    "dense": (lambda: bp.dense(3), (4,)),
    "mlp": (lambda: bp.sequential(bp.dense(5), bp.tanh(), bp.dense(2), bp.log_softmax()), (3,)),
    "residual": (lambda: bp.residual(bp.sequential(bp.dense(4), bp.gelu())), (4,)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_check_grads_rev_float64(name):
    make, in_shape = LAYERS[name]
    layer = make()
    gen = rng(name)
    params, state, _ = init_params(layer, in_shape, gen, jnp.float64)
    x = normal(gen, (3, *in_shape), jnp.float64)
    fn = bp.as_jax_fn(layer)
    check_grads(fn, (params, state, x), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_bridge_uses_the_hand_written_backward():
    """A deliberately wrong backward shows up in jax.grad: the bridge really calls it."""
    good = bp.dense(2)
    scaled = bp.Layer(good.init, good.forward,
                      lambda p, r, dy: good.backward(p, r, 3.0 * dy))
    params, _, _ = init_params(good, (3,), rng("scaled"), jnp.float32)
    x = jnp.ones((2, 3)) * jnp.arange(3.0)
    g_good = jax.grad(lambda p: bp.as_jax_fn(good)(p, (), x).sum())(params)
    g_scaled = jax.grad(lambda p: bp.as_jax_fn(scaled)(p, (), x).sum())(params)
    np.testing.assert_allclose(g_scaled["w"], 3 * g_good["w"], rtol=1e-6)


def test_bridge_mixes_with_plain_jax_under_jit():
    layer = bp.sequential(bp.dense(4), bp.relu(), bp.dense(1))
    params, _, _ = init_params(layer, (2,), rng("mix"), jnp.float64)
    x = normal(rng("mix-x"), (5, 2), jnp.float64)
    fn = bp.as_jax_fn(layer)

    def plain(p):
        y, _, _ = layer.forward(p, (), x)
        return jnp.sum(jnp.sin(y) ** 2)

    g = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(fn(p, (), x)) ** 2)))(params)
    ref = jax.grad(plain)(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), g, ref)


def test_with_state_returns_new_state():
    fn = bp.as_jax_fn(bp.tanh(), with_state=True)
    y, state = fn((), (), jnp.ones((2, 3)))
    assert state == () and y.shape == (2, 3)


def test_the_order_is_that_of_layer_forward_and_the_old_one_warns():
    """fn(params, state, x) like layer.forward; fn(params, x) from bpjax 0.1 gives the same y and
    a DeprecationWarning (it was the only bpjax function with x before state)."""
    layer = bp.dense(2)
    params, _, _ = init_params(layer, (3,), rng("order"), jnp.float32)
    x = normal(rng("order-x"), (4, 3), jnp.float32)
    fn = bp.as_jax_fn(layer)
    assert "fn(params, state, x, *, key=None)" in fn.__doc__ and "fn(params, state, x" in bp.as_jax_fn.__doc__
    y = fn(params, (), x)
    np.testing.assert_array_equal(y, layer.forward(params, (), x)[0])
    for old in (lambda: fn(params, x), lambda: fn(params, x, ()), lambda: fn(params, x, state=())):
        with pytest.warns(DeprecationWarning, match=r"call fn\(params, state, x, key=key\)"):
            np.testing.assert_array_equal(old(), y)
