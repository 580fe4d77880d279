"""Every hand-written backward equals jax.vjp of the same forward: one table, one test."""
from __future__ import annotations

import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from bpjax.check.cases import LAYER_CASES, LOSS_CASES, TABLE, LayerCase, LossCase
from helpers import assert_close, init_params, normal, rng

CASES = LAYER_CASES + LOSS_CASES


def _layer_inputs(case: LayerCase, dtype):
    layer = case.make()
    gen = rng(case)
    params, state, _ = init_params(layer, case.in_shape, gen, dtype)
    shape = (case.batch, *case.in_shape)
    if case.int_input is not None:
        x = jnp.asarray(gen.integers(0, case.int_input, shape))
    elif case.draw_x is not None:
        x = case.draw_x(gen, shape, dtype)
    else:
        x = normal(gen, shape, dtype, case.x_scale)
    key = jax.random.PRNGKey(3) if case.needs_key else None
    return layer, params, state, x, key, gen


def _check_layer(case, dtype, jit):
    layer, params, state, x, key, gen = _layer_inputs(case, dtype)
    wrap = jax.jit if jit else (lambda f: f)

    @wrap
    def manual(params, state, x, key, dy):
        y, _, res = layer.forward(params, state, x, key=key, train=case.train)
        return layer.backward(params, res, dy)

    @wrap
    def reference(params, state, x, key, dy):
        f = lambda p, x: layer.forward(p, state, x, key=key, train=case.train)[0]
        if case.int_input is not None:
            _, vjp = jax.vjp(lambda p: f(p, x), params)
            return vjp(dy)[0], None
        _, vjp = jax.vjp(f, params, x)
        return vjp(dy)

    y, _, _ = layer.forward(params, state, x, key=key, train=case.train)
    dy = normal(gen, y.shape, dtype)                  # a random cotangent, never ones
    dparams, dx = manual(params, state, x, key, dy)
    ref_dparams, ref_dx = reference(params, state, x, key, dy)

    chex.assert_trees_all_equal_shapes_and_dtypes(dparams, params)
    assert_close(dparams, ref_dparams, dtype, f"{case} dparams")
    if case.int_input is None:
        chex.assert_trees_all_equal_shapes_and_dtypes(dx, x)       # x may be a tuple (joins)
        assert_close(dx, ref_dx, dtype, f"{case} dx")


def _check_loss(case, dtype, jit):
    loss = case.make()
    gen = rng(case)
    shape = (case.batch, *case.pred_shape)
    pred = normal(gen, shape, dtype, case.pred_scale)
    target = case.target(gen, shape, dtype)
    dvalue = jnp.asarray(0.7312, dtype)                      # a random-looking cotangent, not 1
    wrap = jax.jit if jit else (lambda f: f)

    @wrap
    def manual(pred, target, dvalue):
        value, res = loss.forward(pred, target)
        return value, loss.backward(res, dvalue)

    @wrap
    def reference(pred, target, dvalue):
        value, vjp = jax.vjp(lambda p: loss.forward(p, target)[0], pred)
        return value, vjp(dvalue)[0]

    value, dpred = manual(pred, target, dvalue)
    ref_value, ref_dpred = reference(pred, target, dvalue)
    assert value.shape == () and np.isfinite(value)
    assert dpred.shape == pred.shape and dpred.dtype == pred.dtype
    assert_close(dpred, ref_dpred, dtype, f"{case} dpred")


# Jitted in float64 (tight) and float32 (float32 tolerances); eager in float64 too. An eager
# float32 run adds little (the same ops, unfused) and each eager op costs a compile here.
MODES = [(jnp.float64, True), (jnp.float32, True), (jnp.float64, False)]


@pytest.mark.parametrize("dtype,jit", MODES, ids=["f64-jit", "f32-jit", "f64-eager"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_matches_autodiff(case, dtype, jit):
    if isinstance(case, LayerCase):
        _check_layer(case, dtype, jit)
    else:
        _check_loss(case, dtype, jit)


UTILITIES = {"Layer", "Loss", "make_layer", "make_loss", "value_and_grad",
             "reference_value_and_grad", "as_jax_fn", "initializers",
             "check_layer", "check_model", "check_loss", "assert_gradients_close", "GradientReport",
             "per_example_grads", "check_finite", "debug_nans", "cast_floating", "load_run",
             "gradient_flow", "per_example_grad_norms", "clipped_grad", "check_vjp", "assert_vjp_close",
             "backward_quantities", "ggn_vector_product", "Kronecker",
             "compare_intermediates", "IntermediateTable", "identity_tap", "explain", "Explanation"}


def test_every_public_function_is_in_all():
    """``from bpjax import *`` and the docs' API list give what ``bpjax.<name>`` gives (clipped_grad was
    missing); the submodules and the LAYERS / LOSSES tuples are not functions to export."""
    public = {n for n, v in vars(bp).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert public - set(bp.__all__) == {"LAYERS", "LOSSES"}


def test_every_export_is_in_the_table():
    """Every export has cross-check cases and exactly one default case (bpjax gradcheck's)."""
    exports = set(bp.LAYERS) | set(bp.LOSSES)
    missing = exports - {c.export for c in CASES}
    assert not missing, f"exported but not cross-checked in bpjax/check/cases/: {sorted(missing)}"
    defaults = [c.export for c in TABLE if c.default]
    wrong = {e: defaults.count(e) for e in exports if defaults.count(e) != 1}
    assert not wrong, (f"default cases per export, expected 1 (default=True in bpjax/check/cases/, "
                       f"what bpjax gradcheck runs): {wrong}")
    unclassified = set(bp.__all__) - set(bp.LAYERS) - set(bp.LOSSES) - UTILITIES
    assert not unclassified, (f"new exports {sorted(unclassified)}: add them to bpjax.LAYERS/LOSSES "
                              "(and the table) or to UTILITIES here")
    for c in TABLE:
        if isinstance(c, LayerCase):
            assert c.export in bp.LAYERS and isinstance(c.make(), bp.Layer), c
        else:
            assert isinstance(c, LossCase) and c.export in bp.LOSSES and isinstance(c.make(), bp.Loss), c


def test_cross_check_catches_a_wrong_backward():
    """The comparison itself can fail: a dense layer whose dW misses a transpose-like error."""
    good = bp.dense(3)

    def bad_backward(params, res, dy):
        dparams, dx = good.backward(params, res, dy)
        return {"w": dparams["w"], "b": dparams["b"] * 2}, dx     # wrong bias reduction

    bad = bp.Layer(good.init, good.forward, bad_backward)
    case = LayerCase("dense", lambda: bad, (4,))
    with pytest.raises(AssertionError, match=r"dparams\['b'\]"):
        _check_layer(case, jnp.float64, False)
