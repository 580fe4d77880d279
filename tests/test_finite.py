"""The check mode names the first layer, forward or backward, where a NaN or an Inf appears."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from bpjax import _core
from helpers import init_params, rng


def _safe_abs() -> bp.Layer:
    """y = √(x²) = |x|, finite everywhere; its backward dx = dy·x/y is 0/0 = NaN at x = 0."""

    def init(key, in_shape):
        return (), (), in_shape

    def forward(params, state, x, *, key=None, train=True):
        y = jnp.sqrt(x * x)
        return y, state, (x, y)

    def backward(params, res, dy):
        x, y = res
        return (), dy * x / y

    return bp.make_layer("safe_abs", init, forward, backward)


def _log() -> bp.Layer:
    """y = log x: NaN in the forward for x < 0."""

    def init(key, in_shape):
        return (), (), in_shape

    def forward(params, state, x, *, key=None, train=True):
        return jnp.log(x), state, (x,)

    def backward(params, res, dy):
        return (), dy / res[0]

    return bp.make_layer("log", init, forward, backward)


NET = bp.sequential(bp.dense(4), bp.relu(), bp.residual(bp.sequential(bp.dense(4), bp.tanh())),
                    bp.dense(3), bp.log_softmax())
CHECKED = bp.debug_nans(NET, bp.softmax_cross_entropy())       # one compile, shared by the tests


def _net_inputs():
    gen = rng("finite")
    params, state, _ = init_params(NET, (5,), gen, jnp.float32)
    x = jnp.asarray(gen.standard_normal((2, 5)), jnp.float32)
    return params, state, x, jnp.array([0, 2])


def _raises(msg):
    return pytest.raises(FloatingPointError, match="^" + re.escape(msg) + "$")


def test_finite_run_matches_value_and_grad():
    params, state, x, t = _net_inputs()
    (value, _), grads = CHECKED(params, state, x, t)
    (ref_value, _), ref_grads = jax.jit(bp.value_and_grad(NET, bp.softmax_cross_entropy()))(params, state, x, t)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)
    assert not _core._HOOKS                     # off again afterwards


def test_nan_in_the_input_names_the_first_layer_under_jit():
    params, state, x, t = _net_inputs()
    with _raises("bpjax.check_finite: 1 NaN and 0 Inf in the forward of sequential[0] (dense): input x"):
        CHECKED(params, state, x.at[1, 2].set(jnp.nan), t)


def test_inf_in_params_names_the_nested_layer_and_the_leaf():
    params, state, x, t = _net_inputs()
    inner = params[2][0]
    bad = (*params[:2], ({"w": inner["w"].at[0, 0].set(jnp.inf), "b": inner["b"]}, ()), *params[3:])
    with _raises("bpjax.check_finite: 0 NaN and 1 Inf in the forward of "
                 "sequential[2].residual[0].sequential[0] (dense): params['w']"):
        CHECKED(bad, state, x, t)


def test_nan_made_in_a_forward_names_that_layer_eagerly_too():
    net = bp.sequential(bp.dense(3), _log(), bp.dense(2))
    params, state, _ = init_params(net, (3,), rng("log"), jnp.float64)
    x = jnp.asarray(rng("log-x").standard_normal((4, 3)))
    with _raises("bpjax.check_finite: 3 NaN and 0 Inf in the forward of sequential[1] (log): output y"):
        bp.check_finite(lambda p, x: net.forward(p, state, x)[0], jit=False)(params, x)


def test_nan_made_in_a_backward_names_that_layer_and_direction():
    net = bp.sequential(bp.dense(3), _safe_abs(), bp.dense(2))
    params, state, _ = init_params(net, (3,), rng("abs"), jnp.float32)
    params = ({"w": params[0]["w"], "b": jnp.zeros(3)}, (), params[2])
    x = jnp.zeros((2, 3))                                                 # dense(0) = b = 0: |0|
    (value, _), _ = bp.value_and_grad(net, bp.squared_error())(params, state, x, jnp.ones((2, 2)))
    assert np.isfinite(value)                                             # the forward is fine
    with _raises("bpjax.check_finite: 6 NaN and 0 Inf in the backward of sequential[1] (safe_abs): dx"):
        bp.debug_nans(net, bp.squared_error())(params, state, x, jnp.ones((2, 2)))


def test_nan_in_the_target_names_the_loss():
    _, _, x, _ = _net_inputs()
    net = bp.sequential(bp.dense(2))
    p, s, _ = init_params(net, (5,), rng("t"), jnp.float32)
    with _raises("bpjax.check_finite: 1 NaN and 0 Inf in the forward of mean_squared_error: value"):
        bp.debug_nans(net, bp.mean_squared_error())(p, s, x, jnp.ones((2, 2)).at[0, 0].set(jnp.nan))


def test_off_by_default():
    params, state, x, _ = _net_inputs()
    y, _, _ = NET.forward(params, state, x.at[0, 0].set(jnp.nan))     # no check, no error
    assert np.isnan(np.asarray(y)).any()
