"""Mixed precision: the hand-written backward in bfloat16 against float32 autodiff.

The same one table of cases as tests/test_crosscheck.py (every cross-check case of
bpjax.check.cases, LAYER_CASES and LOSS_CASES; none is left out), run with params, x and dy in bfloat16 and jitted, against
jax.vjp of the forward on float32 copies of the *same* bfloat16 values (so rounding the inputs
is not counted, only what the bfloat16 forward and backward lose).

The comparison is per leaf, against the leaf's scale: max|got − want| ≤ TOL · max|want|.
bfloat16 keeps 8 significant bits, a unit roundoff u = 2⁻⁹ ≈ 0.002 for every stored
intermediate; a layer's forward and backward round a handful of them in a row, and the deepest
cases (transformer_block, gpt: a dozen layers each way) compound a few dozen. Measured over the
table (CPU): most leaves within 0.01 of their scale, gpt at most 0.013, and the worst,
bidirectional's reverse-direction bias gradient, 0.034 (its recurrence runs the state gradient
through tanh′ = 1 − h² of a bfloat16 h, which loses most of its digits where h nears ±1).
TOL = 0.05 covers that with room and is still ~25u: far below what a wrong backward gives (a
missing term or factor is O(1) of the scale), and below what a bfloat16 running sum loses
(test_float32_accumulation_matters: a bias gradient over 4096 rows summed in bfloat16 is off by
more than half). Where a ReLU decision flips between the two runs the cotangent is zeroed
(see _check_layer_bf16).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from bpjax import models
from bpjax._grad import cast_floating
from bpjax.check.cases import LAYER_CASES, LOSS_CASES, LayerCase
from helpers import normal, rng
from test_crosscheck import _layer_inputs

BF16 = jnp.bfloat16
TOL = 5e-2


def _pair(tree):
    """(tree in bfloat16, the same values in float32): the inputs of the check and its reference."""
    low = cast_floating(tree, BF16)
    return low, cast_floating(low, jnp.float32)


def _scale_error(got, want) -> float:
    """max|got − want| / max|want|, in float64 (0 for an all-zero want that got matches)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    return err / scale if scale > 0 else err


def assert_close_bf16(got, want, what, tol=TOL):
    flat_got, _ = jax.tree_util.tree_flatten_with_path(got)
    flat_want = jax.tree_util.tree_leaves(want)
    assert len(flat_got) == len(flat_want), f"{what}: {len(flat_got)} leaves, expected {len(flat_want)}"
    for (path, g), w in zip(flat_got, flat_want):
        e = _scale_error(g, w)
        assert e <= tol, f"{what}{jax.tree_util.keystr(path)}: error {e:.4f} of the scale > {tol}"


def _check_layer_bf16(case: LayerCase):
    layer, params, state, x, key, gen = _layer_inputs(case, jnp.float32)
    (p16, p32), (s16, s32), (x16, x32) = _pair(params), _pair(state), _pair(x)

    @jax.jit
    def both(p16, s16, x16, p32, s32, x32, dy32):
        """The bfloat16 forward and hand-written backward, and jax.vjp of the float32 forward."""
        f = lambda p, x: layer.forward(p, s32, x, key=key, train=case.train)[0]
        if case.int_input is not None:
            y32, vjp = jax.vjp(lambda p: f(p, x32), p32)
            vjp_ = lambda dy: (vjp(dy)[0], None)
        else:
            y32, vjp_ = jax.vjp(f, p32, x32)
        y16, _, res = layer.forward(p16, s16, x16, key=key, train=case.train)
        # A ReLU inside a layer (conv's activation='relu') decides from a pre-activation z that
        # bfloat16 rounds; where |z| is below that rounding (|z| ~ 1e-4 in two cases) the mask
        # flips, and that element's dy enters the gradients in one run and not the other: a
        # rounding of the forward, not of the backward under test. Such positions (exactly one
        # of the two outputs is 0) get dy = 0.
        dy32 = jnp.where((y16 == 0) != (y32 == 0), 0, dy32)
        return y16, layer.backward(p16, res, dy32.astype(BF16)), y32, vjp_(dy32)

    y_shape = jax.eval_shape(lambda: layer.forward(p32, s32, x32, key=key, train=case.train)[0]).shape
    _, dy32 = _pair(normal(gen, y_shape, jnp.float32))           # a random cotangent, never ones
    y, (dparams, dx), ref_y, (ref_dparams, ref_dx) = both(p16, s16, x16, p32, s32, x32, dy32)

    assert y.dtype == BF16, f"{case}: y is {y.dtype}, expected bfloat16"
    chex.assert_trees_all_equal_shapes_and_dtypes(dparams, p16)   # bfloat16, like the params
    assert_close_bf16(y, ref_y, f"{case} y")
    assert_close_bf16(dparams, ref_dparams, f"{case} dparams")
    if case.int_input is None:
        chex.assert_trees_all_equal_shapes_and_dtypes(dx, x16)
        assert_close_bf16(dx, ref_dx, f"{case} dx")


def _check_loss_bf16(case, target_dtype):
    loss = case.make()
    gen = rng(case)
    shape = (case.batch, *case.pred_shape)
    pred16, pred32 = _pair(normal(gen, shape, jnp.float32, case.pred_scale))
    target = case.target(gen, shape, jnp.float32)
    target16, target32 = _pair(target)
    target = target16 if target_dtype == BF16 else target32    # labels stay integers either way
    dvalue = jnp.asarray(0.7312, jnp.float32)

    @jax.jit
    def manual(pred, target):
        value, res = loss.forward(pred, target)
        return value, loss.backward(res, dvalue)

    @jax.jit
    def reference(pred, target):
        value, vjp = jax.vjp(lambda p: loss.forward(p, target)[0], pred)
        return value, vjp(dvalue)[0]

    value, dpred = manual(pred16, target)
    ref_value, ref_dpred = reference(pred32, target32)
    # the value is float32, computed from the bfloat16 predictions as float32 would: equal to
    # the float32 reference up to float32 rounding, not bfloat16's
    assert value.dtype == jnp.float32, f"{case}: loss value is {value.dtype}, expected float32"
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6, err_msg=f"{case} value")
    assert dpred.shape == pred16.shape and dpred.dtype == BF16, f"{case}: dpred is {dpred.dtype}"
    assert_close_bf16(dpred, ref_dpred, f"{case} dpred")


@pytest.mark.parametrize("case", LAYER_CASES, ids=str)
def test_bf16_backward_matches_f32_autodiff(case):
    _check_layer_bf16(case)


@pytest.mark.parametrize("target_dtype", [jnp.float32, BF16], ids=["target-f32", "target-bf16"])
@pytest.mark.parametrize("case", LOSS_CASES, ids=str)
def test_bf16_loss_matches_f32_autodiff(case, target_dtype):
    _check_loss_bf16(case, target_dtype)


def test_float32_accumulation_matters():
    """A dense layer's dW = xᵀdy and db = Σ dy over 4096 rows, in bfloat16: within TOL of float32
    because the sums accumulate in float32. The inputs have a positive mean (as a bias gradient
    often has), where a bfloat16 running sum stalls: once the sum passes 256·|term| each term is
    below half its spacing and is lost. The same sum run as a bfloat16 running sum is shown to
    fail the tolerance, so the test can tell the two apart."""
    gen = np.random.default_rng(0)
    m, d_in, d_out = 4096, 8, 4
    layer = bp.dense(d_out)
    x16, x32 = _pair(jnp.asarray(1.0 + 0.5 * gen.standard_normal((m, d_in)), jnp.float32))
    dy16, dy32 = _pair(jnp.asarray(1.0 + 0.5 * gen.standard_normal((m, d_out)), jnp.float32))
    w16, w32 = _pair(jnp.asarray(gen.standard_normal((d_in, d_out)) / 3, jnp.float32))
    b16, b32 = _pair(jnp.zeros((d_out,), jnp.float32))

    @jax.jit
    def grads(w, b, x, dy):
        _, _, res = layer.forward({"w": w, "b": b}, (), x)
        return layer.backward({"w": w, "b": b}, res, dy)[0]

    got, want = grads(w16, b16, x16, dy16), grads(w32, b32, x32, dy32)
    assert got["w"].dtype == got["b"].dtype == BF16
    assert_close_bf16(got, want, "dense over 4096 rows")
    assert _scale_error(got["b"], want["b"]) < 2**-8             # one rounding of the result

    def bf16_running_sum(dy):                                    # what a bfloat16 carry would do
        return jax.lax.scan(lambda s, row: (s + row, None), jnp.zeros((d_out,), BF16), dy)[0]

    assert _scale_error(jax.jit(bf16_running_sum)(dy16), want["b"]) > 0.5


def test_recurrent_dw_h_accumulates_over_many_steps():
    """The reverse scan's running dW_h over T = 256 steps is a float32 carry for bfloat16."""
    layer = bp.rnn(8)
    gen = np.random.default_rng(1)
    params, _, _ = layer.init(jax.random.PRNGKey(0), (256, 4))
    (p16, p32), (x16, x32) = _pair(params), _pair(jnp.asarray(gen.standard_normal((2, 256, 4)), jnp.float32))
    dy16, dy32 = _pair(jnp.asarray(1.0 + gen.standard_normal((2, 256, 8)), jnp.float32))

    @jax.jit
    def grads(p, x, dy):
        _, _, res = layer.forward(p, (), x)
        return layer.backward(p, res, dy)[0]

    got = grads(p16, x16, dy16)
    _, vjp = jax.vjp(lambda p: layer.forward(p, (), x32)[0], p32)
    assert_close_bf16(got, vjp(dy32)[0], "rnn over 256 steps")


def test_loss_value_from_bf16_logits_is_float32():
    logits = jnp.asarray(np.random.default_rng(2).standard_normal((64, 10)) * 3, BF16)
    labels = jnp.arange(64) % 10
    value, res = bp.softmax_cross_entropy().forward(logits, labels)
    assert value.dtype == jnp.float32
    assert bp.softmax_cross_entropy().backward(res, 1.0).dtype == BF16
    want = -jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[jnp.arange(64), labels])
    np.testing.assert_allclose(float(value), float(want), rtol=1e-6)


# ----------------------------------------------------------------------------- whole networks


NET_NORM_TOL, NET_MAX_TOL = 0.05, 0.1


def _network_grads(model, in_shape, x, target, key=0):
    params, state, _ = model.init(jax.random.PRNGKey(key), in_shape)
    loss = bp.softmax_cross_entropy()
    f32 = jax.jit(bp.value_and_grad(model, loss))
    bf16 = jax.jit(bp.value_and_grad(model, loss, compute_dtype=BF16))
    # the float32 run sees the same (bfloat16-rounded) params and inputs as the bfloat16 run
    params32, x32 = _pair(params)[1], _pair(x)[1]
    (v32, _), g32 = f32(params32, state, x32, target)
    (v16, _), g16 = bf16(params32, state, x32, target)
    return params32, (v32, g32), (v16, g16)


@pytest.mark.parametrize("which", ["cnn", "gpt"])
def test_network_bf16_gradients_match_float32(which):
    """A whole network trained through value_and_grad(compute_dtype=bfloat16): float32 loss and
    gradients (the master weights' dtype) within TOL of the float32 run's, leaf by leaf."""
    gen = np.random.default_rng(3)
    if which == "cnn":                                   # the MNIST-1D CNN: (N, 40, 1) signals
        model, in_shape = models.cnn(), (40, 1)
        x = jnp.asarray(gen.standard_normal((64, 40, 1)), jnp.float32)
        target = jnp.asarray(gen.integers(0, 10, 64))
    else:                                                # a small GPT: 2 blocks, T = 16
        model, in_shape = bp.gpt(32, dim=32, num_heads=4, num_layers=2, max_len=16), (16,)
        x = jnp.asarray(gen.integers(0, 32, (8, 16)))
        target = jnp.asarray(gen.integers(0, 32, (8, 16)))
    params, (v32, g32), (v16, g16) = _network_grads(model, in_shape, x, target)
    assert v16.dtype == jnp.float32
    chex.assert_trees_all_equal_shapes_and_dtypes(g16, params)   # float32, like the master weights
    np.testing.assert_allclose(float(v16), float(v32), rtol=1e-2)
    # Whole networks: separate ReLU layers flip on pre-activations that bfloat16 rounds across 0
    # (as in _check_layer_bf16, but here nothing can zero their cotangent), each moving a few
    # entries of dW by O(|dy|). So per leaf: the norm of the error within NET_NORM_TOL of the
    # gradient's norm, and no entry off by more than NET_MAX_TOL of the scale. Measured (CPU):
    # CNN at most 0.030 (norm, first conv's dW: the end of the backward chain) and 0.059 (max,
    # second conv's dW), GPT at most 0.012 and 0.016.
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(g16), jax.tree_util.tree_leaves(g32)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        norm_err = np.linalg.norm(g - w) / np.linalg.norm(w)
        where = f"{which} grads{jax.tree_util.keystr(path)}"
        assert norm_err <= NET_NORM_TOL, f"{where}: norm error {norm_err:.4f} > {NET_NORM_TOL}"
        assert_close_bf16(g, w, where, tol=NET_MAX_TOL)
