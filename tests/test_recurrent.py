"""Recurrent layers: backpropagation through time over long sequences, masks and initial
states, bidirectional masking, and the errors. (Short sequences are in the cross-check table.)"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from helpers import assert_close, init_params, normal, rng


def _vjp_check(layer, xs, in_shape, dtype=jnp.float64, what=""):
    """The hand-written backward against jax.vjp of the same forward, both jitted; ``xs`` is an
    array or a tuple whose float entries get gradients (a mask gets ``None`` by hand)."""
    gen = rng(what)
    params, state, out_shape = init_params(layer, in_shape, gen, dtype)
    dy = normal(gen, (xs[0] if isinstance(xs, tuple) else xs).shape[:1] + out_shape, dtype)

    @jax.jit
    def both(params, xs, dy):
        y, _, res = layer.forward(params, state, xs)
        _, vjp = jax.vjp(lambda p, x: layer.forward(p, state, x)[0], params, xs)
        return y, layer.backward(params, res, dy), vjp(dy)

    y, (dparams, dx), (ref_dparams, ref_dx) = both(params, xs, dy)
    assert_close(dparams, ref_dparams, dtype, f"{what} dparams")
    if isinstance(xs, tuple):
        for i, (got, want, x) in enumerate(zip(dx, ref_dx, xs)):
            if jnp.issubdtype(x.dtype, jnp.floating) and got is not None:
                assert got.shape == x.shape
                assert_close(got, want, dtype, f"{what} dx[{i}]")
            else:
                assert got is None, f"{what} dx[{i}]: the mask has no gradient"
    else:
        assert_close(dx, ref_dx, dtype, f"{what} dx")
    return params, y


N, T, D, H = 3, 40, 3, 4
LENGTHS = np.array([40, 23, 1])                    # one full, one half, one single step


def _mask(lengths=LENGTHS, t=T):
    return jnp.asarray(np.arange(t)[None, :] < lengths[:, None])


@pytest.mark.parametrize("factory", [bp.gru, bp.lstm], ids=["gru", "lstm"])
def test_forty_steps_unmasked(factory):
    x = normal(rng("x40"), (N, T, D), jnp.float64)
    _vjp_check(factory(H), x, (T, D), what=f"{factory.__name__} T=40")


@pytest.mark.parametrize("factory", [bp.gru, bp.lstm], ids=["gru", "lstm"])
def test_forty_steps_masked_with_initial_state(factory):
    """Mask and initial state together; dh0 (and dc0) are checked too."""
    gen = rng("x40m")
    x = normal(gen, (N, T, D), jnp.float64)
    states = tuple(normal(gen, (N, H), jnp.float64) for _ in range(2 if factory is bp.lstm else 1))
    layer = factory(H, masked=True, initial_state=True, return_sequences=False)
    in_shape = ((T, D), (T,), *[(H,)] * len(states))
    _vjp_check(layer, (x, _mask(), *states), in_shape, what=f"{factory.__name__} masked T=40")


@pytest.mark.parametrize("factory", [bp.lstm], ids=["lstm"])
def test_padding_is_ignored(factory):
    """A padded sequence gives the outputs of the unpadded one, zeros on the padding, and the
    state after its last real step as the final state."""
    t, lengths = 6, np.array([6, 3])
    gen = rng("pad")
    x = normal(gen, (2, t, D), jnp.float32)
    seq, last = factory(H, masked=True), factory(H, masked=True, return_sequences=False)
    params, _, _ = init_params(seq, ((t, D), (t,)), gen, jnp.float32)
    y = seq.forward(params, (), (x, _mask(lengths, t)))[0]
    h = last.forward(params, (), (x, _mask(lengths, t)))[0]
    short = factory(H).forward(params, (), x[1:, :3])[0]                   # the 3 real steps alone
    np.testing.assert_allclose(y[1, :3], short[0], rtol=1e-6)
    np.testing.assert_array_equal(y[1, 3:], 0.0)
    np.testing.assert_allclose(h[1], short[0, -1], rtol=1e-6)
    np.testing.assert_allclose(h[0], y[0, -1], rtol=1e-6)


def test_bidirectional_masked_reverse_starts_at_the_last_real_step():
    t, lengths = 5, np.array([5, 2])
    gen = rng("bidi")
    x = normal(gen, (2, t, D), jnp.float64)
    layer = bp.bidirectional(bp.gru(H, masked=True))
    params, y = _vjp_check(layer, (x, _mask(lengths, t)), ((t, D), (t,)), what="bidirectional masked")
    rev = bp.gru(H).forward(params["reverse"], (), jnp.flip(x[1:, :2], axis=1))[0]   # 2 real steps, reversed
    np.testing.assert_allclose(y[1, :2, H:], jnp.flip(rev, axis=1)[0], rtol=1e-12)
    np.testing.assert_array_equal(y[1, 2:], 0.0)


def _params(layer, in_shape):
    return init_params(layer, in_shape, rng("err"), jnp.float32)[0]


@pytest.mark.parametrize("factory", [bp.rnn, bp.gru, bp.lstm])
def test_wrong_feature_size(factory):
    name = factory.__name__
    p = _params(factory(4), (5, 3))
    with pytest.raises(ValueError, match=re.escape(f"{name}: expected x.shape == (N, T, 3), got x.shape=(2, 5, 7)")):
        factory(4).forward(p, (), jnp.ones((2, 5, 7)))


def test_wrong_rank():
    p = _params(bp.gru(4), (5, 3))
    with pytest.raises(ValueError, match=re.escape("gru: expected x.ndim == 3 (batch, time, features), got x.shape=(2, 3)")):
        bp.gru(4).forward(p, (), jnp.ones((2, 3)))


def test_wrong_mask_and_initial_state_shapes():
    layer = bp.lstm(4, masked=True, initial_state=True)
    p = _params(layer, ((5, 3), (5,), (4,), (4,)))
    x, m, h = jnp.ones((2, 5, 3)), jnp.ones((2, 5), bool), jnp.ones((2, 4))
    with pytest.raises(ValueError, match=re.escape("lstm: expected mask.shape == (2, 5) (N, T), got mask.shape=(2, 6)")):
        layer.forward(p, (), (x, jnp.ones((2, 6), bool), h, h))
    with pytest.raises(ValueError, match=re.escape("lstm: expected c0.shape == (2, 4) (N, hidden_size), got c0.shape=(2, 5)")):
        layer.forward(p, (), (x, m, h, jnp.ones((2, 5))))
    with pytest.raises(ValueError, match=re.escape("lstm: expected x to be the tuple (x, mask, h0, c0), got a tuple of 3 arrays")):
        layer.forward(p, (), (x, m, h))


@pytest.mark.parametrize("factory", [bp.rnn, bp.gru, bp.lstm])
def test_bad_hidden_size(factory):
    with pytest.raises(ValueError, match=re.escape(f"{factory.__name__}: expected hidden_size to be an integer > 0, got 0")):
        factory(0)


def test_bidirectional_needs_a_layer():
    with pytest.raises(TypeError, match="bidirectional: expected a bpjax.Layer, got function"):
        bp.bidirectional(bp.gru)


def test_zero_time_steps_is_a_clear_error():
    """Found by tests/test_fuzz.py: T = 0 used to reach lax.scan and raise its raw error."""
    import re

    import jax
    import jax.numpy as jnp
    import pytest

    import bpjax as bp
    layer = bp.gru(3)
    params, state = jax.eval_shape(lambda k: layer.init(k, (0, 2))[:2], jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda a: jnp.ones(a.shape, a.dtype), params)
    with pytest.raises(ValueError, match=re.escape("gru: expected at least one time step, got x.shape=(2, 0, 2)")):
        layer.forward(params, state, jnp.ones((2, 0, 2)))
