"""Normalisation, dropout, embedding, reshaping and fan-out/join: what the cross-check table
cannot see (running statistics, evaluation mode, degenerate batches, randomness, errors)."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from helpers import assert_close, init_params, normal, rng

F64 = jnp.float64


def _np(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


# ----------------------------------------------------------------------------- batch norm


def test_batch_norm_running_statistics_and_evaluation_follow_the_formulas():
    """Three training steps move the state by mean ← m·mean + (1−m)·μ, var ← m·var + (1−m)·σ²
    (biased σ²); evaluation normalises with the state, leaves it alone and is affine."""
    m, eps = 0.8, 1e-3
    bn = bp.batch_norm(momentum=m, eps=eps)
    gen = rng("bn-running")
    params, state, _ = init_params(bn, (3, 2), gen, F64)

    @jax.jit
    def train_step(params, state, x):
        return bn.forward(params, state, x, train=True)[1]

    @jax.jit
    def evaluate(params, state, x, dy):
        y, new_state, res = bn.forward(params, state, x, train=False)
        return y, new_state, bn.backward(params, res, dy)

    want = _np(state)
    for _ in range(3):
        x = normal(gen, (4, 3, 2), F64, 2.0) + 1.0
        state = train_step(params, state, x)
        xs = np.asarray(x).reshape(-1, 2)
        want = {"mean": m * want["mean"] + (1 - m) * xs.mean(0),
                "var": m * want["var"] + (1 - m) * xs.var(0)}          # np.var: biased
        assert_close(state, want, F64, "running statistics")

    x, dy = normal(gen, (5, 3, 2), F64), normal(gen, (5, 3, 2), F64)
    y, same_state, (dparams, dx) = evaluate(params, state, x, dy)
    chex.assert_trees_all_equal(same_state, state)
    s, b = np.asarray(params["scale"]), np.asarray(params["bias"])
    rstd = 1 / np.sqrt(want["var"] + eps)
    xhat = (np.asarray(x) - want["mean"]) * rstd
    dy_ = np.asarray(dy)
    assert_close(y, s * xhat + b, F64, "eval y")
    assert_close(dx, dy_ * s * rstd, F64, "eval dx")
    assert_close(dparams, {"bias": dy_.sum((0, 1)), "scale": (dy_ * xhat).sum((0, 1))}, F64, "eval dparams")


def test_batch_norm_batch_of_one_is_finite():
    """M = 1: σ² = 0, so y = β, dx = 0, dγ = 0, dβ = Σ dy, and the state moves towards (x, 0)."""
    bn = bp.batch_norm(momentum=0.9)
    gen = rng("bn-batch1")
    params, state, _ = init_params(bn, (5,), gen, F64)
    x, dy = normal(gen, (1, 5), F64), normal(gen, (1, 5), F64)

    @jax.jit
    def run(params, state, x, dy):
        y, new_state, res = bn.forward(params, state, x)
        _, vjp = jax.vjp(lambda p, x: bn.forward(p, state, x)[0], params, x)
        return y, new_state, bn.backward(params, res, dy), vjp(dy)

    y, new_state, (dparams, dx), (ref_dparams, ref_dx) = run(params, state, x, dy)
    np.testing.assert_array_equal(y, np.broadcast_to(params["bias"], (1, 5)))
    np.testing.assert_array_equal(dx, 0)
    np.testing.assert_array_equal(dparams["scale"], 0)
    assert_close(dparams, ref_dparams, F64, "dparams")
    assert_close(dx, ref_dx, F64, "dx")
    assert_close(new_state, {"mean": 0.9 * np.asarray(state["mean"]) + 0.1 * np.asarray(x[0]),
                             "var": 0.9 * np.asarray(state["var"])}, F64, "state")


def test_batch_norm_axis_name_equals_one_big_batch():
    """Under jax.vmap(axis_name="d") over 4 shards, y, dx and the state equal one batch of 4·3
    examples; dγ, dβ are per-shard partial sums that add up to the big batch's."""
    bn, bn_sync = bp.batch_norm(0.7), bp.batch_norm(0.7, axis_name="d")
    gen = rng("bn-sync")
    params, state, _ = init_params(bn, (2, 3), gen, F64)
    x, dy = normal(gen, (12, 2, 3), F64), normal(gen, (12, 2, 3), F64)

    def step(layer, x, dy):
        y, new_state, res = layer.forward(params, state, x)
        return y, new_state, layer.backward(params, res, dy)

    @jax.jit
    def both(x, dy):
        big = step(bn, x, dy)
        split = lambda a: a.reshape(4, 3, *a.shape[1:])
        shards = jax.vmap(lambda x, dy: step(bn_sync, x, dy), axis_name="d")(split(x), split(dy))
        return big, shards

    (y, new_state, (dparams, dx)), (ys, states, (dparams_s, dxs)) = both(x, dy)
    assert_close(ys.reshape(y.shape), y, F64, "y")
    assert_close(dxs.reshape(dx.shape), dx, F64, "dx")
    for d in range(4):
        assert_close(jax.tree_util.tree_map(lambda s: s[d], states), new_state, F64, f"state[{d}]")
    assert_close(jax.tree_util.tree_map(lambda g: g.sum(0), dparams_s), dparams, F64, "dparams")


# ----------------------------------------------------------------------------- layer and RMS norm


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_layer_norm_and_rms_norm_of_constant_rows_are_finite(dtype):
    """σ² = 0 on a constant row: layer_norm gives y = β there, and every output and gradient is
    finite; a zero row does the same for rms_norm (y = 0)."""
    ln, rms = bp.layer_norm(), bp.rms_norm()
    gen = rng("constant-rows")
    p_ln, _, _ = init_params(ln, (4,), gen, dtype)
    p_rms, _, _ = init_params(rms, (4,), gen, dtype)
    x = jnp.asarray(np.stack([np.full(4, 0.0), np.full(4, 0.1), np.full(4, -1e3),
                              gen.standard_normal(4)]), dtype)
    dy = normal(gen, x.shape, dtype)

    @jax.jit
    def run(p_ln, p_rms, x, dy):
        out = {}
        for name, layer, p in (("ln", ln, p_ln), ("rms", rms, p_rms)):
            y, _, res = layer.forward(p, (), x)
            _, vjp = jax.vjp(lambda p, x: layer.forward(p, (), x)[0], p, x)
            out[name] = (y, layer.backward(p, res, dy), vjp(dy))
        return out

    out = run(p_ln, p_rms, x, dy)
    for name, (y, grads, ref) in out.items():
        for leaf in jax.tree_util.tree_leaves((y, grads)):
            assert np.all(np.isfinite(leaf)), name
        assert_close(grads, ref, dtype, name)
    y_ln = out["ln"][0]
    np.testing.assert_allclose(y_ln[:3], np.broadcast_to(p_ln["bias"], (3, 4)), atol=1e-3)
    np.testing.assert_array_equal(out["rms"][0][0], 0)


# ----------------------------------------------------------------------------- dropout


def test_dropout_mask_comes_from_the_key_and_keeps_the_right_fraction():
    rate = 0.3
    layer = bp.dropout(rate)
    x = jnp.ones((100, 100), jnp.float32)
    dy = normal(rng("dropout"), x.shape, jnp.float32)

    @jax.jit
    def run(key):
        y, _, res = layer.forward((), (), x, key=key)
        expected = jax.random.bernoulli(key, 1 - rate, x.shape) / jnp.float32(1 - rate)
        return y, expected, layer.backward((), res, dy)[1]

    k1, k2 = jax.random.PRNGKey(11), jax.random.PRNGKey(12)
    y1, expected, dx = run(k1)
    y1_again, _, _ = run(k1)
    y2, _, _ = run(k2)
    np.testing.assert_array_equal(y1, expected)                 # the mask is bernoulli(key, 1 − p)
    np.testing.assert_array_equal(y1, y1_again)                 # reproducible from the key
    assert np.any(np.asarray(y1) != np.asarray(y2))             # another key, another mask
    np.testing.assert_allclose(np.unique(y1), [0.0, 1 / (1 - rate)], rtol=1e-6)
    kept = float(np.mean(np.asarray(y1) != 0))
    assert abs(kept - (1 - rate)) < 4.5 * np.sqrt(rate * (1 - rate) / x.size), kept
    np.testing.assert_array_equal(dx, np.asarray(dy) * np.asarray(y1))   # dx = dy ⊙ m


def test_dropout_is_the_identity_in_evaluation_and_at_rate_zero():
    x = normal(rng("dropout-eval"), (3, 4), jnp.float32)
    for layer, train in ((bp.dropout(0.5), False), (bp.dropout(0.0), True)):
        y, _, res = layer.forward((), (), x, train=train)             # no key needed
        assert y is x and res == ()
        assert layer.backward((), res, x)[1] is x


# ----------------------------------------------------------------------------- embedding


def test_embedding_backward_scatter_adds_repeated_ids():
    layer = bp.embedding(5, 3)
    gen = rng("embedding")
    params, _, out_shape = init_params(layer, (4,), gen, F64)
    assert out_shape == (4, 3)
    ids = jnp.asarray([[0, 3, 3, 1], [3, 0, 4, 4]])
    dy = normal(gen, (2, 4, 3), F64)
    y, _, res = layer.forward(params, (), ids)
    np.testing.assert_array_equal(y, np.asarray(params["table"])[np.asarray(ids)])
    dparams, dx = layer.backward(params, res, dy)
    want = np.zeros((5, 3))
    np.add.at(want, np.asarray(ids), np.asarray(dy))
    assert dx is None
    assert_close(dparams["table"], want, F64, "dtable")


# ----------------------------------------------------------------------------- fan-out and joins


def test_parallel_alone_returns_a_tuple_and_sums_the_branch_gradients():
    layer = bp.parallel(bp.dense(3), bp.tanh(), bp.sequential(bp.dense(2), bp.relu()))
    _, _, out_shape = layer.init(jax.random.PRNGKey(0), (4,))
    assert out_shape == ((3,), (4,), (2,))
    gen = rng("parallel")
    params = tuple(init_params(b, (4,), gen, F64)[0] for b in
                   (bp.dense(3), bp.tanh(), bp.sequential(bp.dense(2), bp.relu())))
    x = normal(gen, (5, 4), F64)
    dy = (normal(gen, (5, 3), F64), normal(gen, (5, 4), F64), normal(gen, (5, 2), F64))

    @jax.jit
    def run(params, x, dy):
        ys, _, res = layer.forward(params, (), x)
        _, vjp = jax.vjp(lambda p, x: layer.forward(p, (), x)[0], params, x)
        return ys, layer.backward(params, res, dy), vjp(dy)

    ys, grads, ref = run(params, x, dy)
    assert isinstance(ys, tuple) and [y.shape for y in ys] == [(5, 3), (5, 4), (5, 2)]
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, (params, x))
    assert_close(grads, ref, F64, "parallel")


def test_network_with_embedding_batch_norm_and_a_join_matches_the_reference():
    """value_and_grad end to end: integer ids in, running statistics out, a fan-out and a join."""
    net = bp.sequential(bp.embedding(11, 4), bp.flatten(), bp.batch_norm(),
                        bp.parallel(bp.dense(5), bp.sequential(bp.dense(5), bp.relu())), bp.add(),
                        bp.reshape((5, 1)), bp.layer_norm(), bp.flatten(), bp.dense(3))
    loss = bp.softmax_cross_entropy()
    gen = rng("network")
    params, state, out_shape = init_params(net, (3,), gen, F64)
    assert out_shape == (3,)
    ids = jnp.asarray(gen.integers(0, 11, (6, 3)))
    labels = jnp.asarray(gen.integers(0, 3, (6,)))
    (value, new_state), grads = jax.jit(bp.value_and_grad(net, loss))(params, state, ids, labels)
    (ref_value, ref_state), ref_grads = jax.jit(bp.reference_value_and_grad(net, loss))(
        params, state, ids, labels)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
    assert_close(value, ref_value, F64, "value")
    assert_close(new_state, ref_state, F64, "state")
    assert_close(grads, ref_grads, F64, "grads")


# ----------------------------------------------------------------------------- errors


def _forward(layer, x, in_shape=None, **kw):
    """Run ``layer.forward`` with params built for ``in_shape`` (default: x's own shape)."""
    shape = in_shape if in_shape is not None else tuple(x.shape[1:])
    params, state, _ = jax.eval_shape(lambda k: layer.init(k, shape), jax.random.PRNGKey(0))
    zeros = lambda t: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), t)
    return layer.forward(zeros(params), zeros(state), x, **kw)


X = jnp.ones((2, 5), jnp.float32)
IDS = jnp.asarray([[1, 2], [0, 3]])

ERRORS = {
    "batch_norm-rank": (lambda: _forward(bp.batch_norm(), jnp.ones((4,)), in_shape=(4,)), ValueError,
                        r"batch_norm: expected x.ndim >= 2 \(batch, ..., channels\), got x.shape=\(4,\)"),
    "batch_norm-channels": (lambda: _forward(bp.batch_norm(), X, in_shape=(4,)), ValueError,
                            r"batch_norm: expected x.shape\[-1\] == 4 \(channels\), got x.shape=\(2, 5\)"),
    "batch_norm-momentum": (lambda: bp.batch_norm(momentum=1.5), ValueError,
                            r"batch_norm: expected momentum in \[0, 1\], got 1.5"),
    "layer_norm-features": (lambda: _forward(bp.layer_norm(), X, in_shape=(3,)), ValueError,
                            r"layer_norm: expected x.shape\[-1\] == 3 \(features\), got x.shape=\(2, 5\)"),
    "layer_norm-eps": (lambda: bp.layer_norm(eps=0), ValueError, r"layer_norm: expected eps > 0, got 0.0"),
    "rms_norm-rank": (lambda: _forward(bp.rms_norm(), jnp.ones((3,)), in_shape=(3,)), ValueError,
                      r"rms_norm: expected x.ndim >= 2"),
    "group_norm-divisible": (lambda: _forward(bp.group_norm(2), X), ValueError,
                             r"group_norm: expected the channel count divisible by num_groups=2, "
                             r"got in_shape=\(5,\)"),
    "group_norm-groups": (lambda: bp.group_norm(0), ValueError,
                          r"group_norm: expected num_groups to be an integer > 0, got 0"),
    "dropout-key": (lambda: bp.dropout(0.5).forward((), (), X), ValueError,
                    r"dropout: expected a PRNG key in training \(forward\(..., key=key\)\), got key=None"),
    "dropout-rate-1": (lambda: bp.dropout(1.0), ValueError, r"dropout: expected rate in \[0, 1\), got rate=1.0"),
    "dropout-rate-neg": (lambda: bp.dropout(-0.1), ValueError, r"dropout: expected rate in \[0, 1\), got rate=-0.1"),
    "embedding-float": (lambda: _forward(bp.embedding(5, 2), IDS.astype(jnp.float32)), TypeError,
                        r"embedding: expected integer indices, got dtype float32 \(cast them first"),
    "embedding-bool": (lambda: _forward(bp.embedding(5, 2), IDS > 1), TypeError,
                       r"embedding: expected integer indices, got dtype bool"),
    "embedding-range": (lambda: _forward(bp.embedding(3, 2), IDS), ValueError,
                        r"embedding: expected indices in \[0, 3\), got indices in \[0, 3\]"),
    "reshape-size": (lambda: _forward(bp.reshape((4, -1)), X), ValueError,
                     r"reshape: expected a shape of 5 elements per example \(in_shape=\(5,\)\), got shape=\(4, -1\)"),
    "reshape-two-unknowns": (lambda: bp.reshape((-1, -1)), ValueError,
                             r"reshape: expected positive sizes and at most one -1, got shape=\(-1, -1\)"),
    "parallel-not-a-layer": (lambda: bp.parallel(bp.dense(2), bp.relu), TypeError,
                             r"parallel: expected a bpjax.Layer at position 1, got function"),
    "concat-not-a-tuple": (lambda: bp.concat().forward((), (), X), TypeError,
                           r"concat: expected x to be a non-empty tuple of arrays \(one per branch\), "
                           r"got an array of shape \(2, 5\)"),
    "concat-int": (lambda: bp.concat().forward((), (), (X, IDS)), TypeError,
                   r"concat: expected a floating-point x\[1\], got dtype int"),
    "concat-batch": (lambda: bp.concat().forward((), (), (X, X[:1])), ValueError,
                     r"concat: expected every x\[i\] to have the same batch size, got shapes \[\(2, 5\), \(1, 5\)\]"),
    "concat-shapes": (lambda: bp.concat().forward((), (), (X, X[:, :, None])), ValueError,
                      r"concat: expected inputs of one rank, got in_shape=\(\(5,\), \(5, 1\)\)"),
    "concat-axis": (lambda: bp.concat(axis=0), ValueError, r"concat: expected axis to be an integer naming"),
    "concat-init": (lambda: bp.concat().init(jax.random.PRNGKey(0), (3, 4)), TypeError,
                    r"concat: expected in_shape to be a non-empty tuple of shapes, one per input, got in_shape=\(3, 4\)"),
    "add-shapes": (lambda: bp.add().forward((), (), (X, X[:, :3])), ValueError,
                   r"add: expected inputs of one shape, got in_shape=\(\(5,\), \(3,\)\)"),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_error_messages(name):
    fn, exc, pattern = ERRORS[name]
    with pytest.raises(exc, match=pattern):
        fn()
