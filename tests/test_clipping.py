"""The clip modes of bp.clipped_grad against a reference built by JAX's own autodiff (jax.vmap of
jax.grad of the raw forward, one example at a time, then clipped and summed), in float64 to
1e-10: per-layer and automatic clipping on an MLP and a small CNN; the mask; microbatches equal
to the whole batch; the sensitivity each mode reports, and DP-SGD's noise scaled by it."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from bpjax import models, privacy

LOSS = bp.softmax_cross_entropy()


def _case(name):
    gen = np.random.default_rng(1)
    if name == "mlp":
        model = bp.sequential(bp.flatten(), bp.dense(16), bp.relu(), bp.dense(12), bp.tanh(), bp.dense(10))
    else:
        model = models.cnn(channels=6)
    x, y = jnp.asarray(gen.standard_normal((8, 40, 1))), jnp.asarray(gen.integers(0, 10, 8))
    params, state, _ = model.init(jax.random.PRNGKey(0), (40, 1))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    return model, params, state, x, y


def _per_example(model, params, state, x, y):
    """g_n, every leaf (N, ...), by jax.grad of the raw forward on example n alone."""
    def loss_one(p, x1, y1):
        out, _, _ = model.forward(p, state, x1[None], train=True)
        return LOSS.forward(out, y1[None])[0]
    return jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(params, x, y)


def _layers(tree):
    """The leaves of ``tree`` grouped by the layer (params dict) they belong to, in order."""
    groups = {}
    for path, a in jax.tree_util.tree_flatten_with_path(tree)[0]:
        groups.setdefault(path[:-1], []).append(a)
    return list(groups.values())


def _reference(pe, factors):
    """(1/N) Σ_n clip(g_n) with ``factors(pe) -> one (N,) factor per layer group``."""
    groups = jax.tree_util.tree_flatten_with_path(pe)[0]
    layer_of = {}
    for path, _ in groups:
        layer_of.setdefault(path[:-1], len(layer_of))
    fs = factors(pe)
    leaves = [jnp.mean(a * fs[layer_of[p[:-1]]].reshape((-1,) + (1,) * (a.ndim - 1)), 0) for p, a in groups]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(pe), leaves)


def _layer_norms(pe):
    return [jnp.sqrt(sum(jnp.sum(a.reshape(a.shape[0], -1) ** 2, 1) for a in g)) for g in _layers(pe)]


def _assert_tree_close(a, b, rtol=1e-10):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=rtol, atol=1e-12 * float(np.max(np.abs(v))))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_per_layer_and_automatic_clipping_equal_the_vmapped_reference(name):
    model, params, state, x, y = _case(name)
    pe = _per_example(model, params, state, x, y)
    norms = _layer_norms(pe)
    caps = [float(np.median(n)) for n in norms]               # about half of each layer's rows clipped
    per_layer = _reference(pe, lambda _: [jnp.minimum(1.0, c / n) for c, n in zip(caps, norms)])
    total = jnp.sqrt(sum(n ** 2 for n in norms))
    auto = _reference(pe, lambda _: [1 / (total + 0.01)] * len(norms))
    split = _reference(pe, lambda _: [jnp.minimum(1.0, 2.0 / math.sqrt(len(norms)) / n) for n in norms])

    f_layer = bp.clipped_grad(model, LOSS, caps, mode="per-layer")
    f_split = bp.clipped_grad(model, LOSS, 2.0, mode="per-layer")
    f_auto = bp.clipped_grad(model, LOSS, mode="automatic")
    (_, _), g_layer, got_norms = jax.jit(f_layer)(params, state, x, y)
    _assert_tree_close(g_layer, per_layer)
    np.testing.assert_allclose(got_norms, total, rtol=1e-10)
    _assert_tree_close(jax.jit(f_split)(params, state, x, y)[1], split)
    _assert_tree_close(jax.jit(f_auto)(params, state, x, y)[1], auto)
    assert f_layer.sensitivity == pytest.approx(math.sqrt(sum(c * c for c in caps)), rel=1e-15)
    assert f_split.sensitivity == 2.0 and f_auto.sensitivity == 1.0


def test_per_layer_thresholds_by_path_and_their_errors():
    model, params, state, x, y = _case("mlp")
    labels = ["sequential[1] (dense)", "sequential[3] (dense)", "sequential[5] (dense)"]
    by_index = jax.jit(bp.clipped_grad(model, LOSS, [0.3, 0.2, 0.1], mode="per-layer"))(params, state, x, y)[1]
    f = bp.clipped_grad(model, LOSS, dict(zip(labels, [0.3, 0.2, 0.1])), mode="per-layer")
    _assert_tree_close(jax.jit(f)(params, state, x, y)[1], by_index, rtol=1e-14)
    with pytest.raises(ValueError, match=r"expected 3 per-layer thresholds .* got 2"):
        bp.clipped_grad(model, LOSS, [0.3, 0.2], mode="per-layer")(params, state, x, y)
    with pytest.raises(ValueError, match="expected per-layer thresholds for exactly the layers"):
        bp.clipped_grad(model, LOSS, {"dense": 1.0}, mode="per-layer")(params, state, x, y)
    with pytest.raises(ValueError, match=r"expected clip_norm\[1\] > 0"):
        bp.clipped_grad(model, LOSS, [0.3, -1.0], mode="per-layer")
    with pytest.raises(ValueError, match="expected the clip mode to be one of flat, per-layer, automatic"):
        bp.clipped_grad(model, LOSS, 1.0, mode="layer")
    with pytest.raises(ValueError, match="expected microbatch to be an integer >= 1"):
        bp.clipped_grad(model, LOSS, 1.0, microbatch=0)


@pytest.mark.parametrize("mode, clip", [("flat", 0.5), ("per-layer", 0.5), ("automatic", None)])
def test_the_mask_zeroes_rows_and_microbatches_equal_the_whole_batch(mode, clip):
    """A masked row adds exactly nothing (the clipped grads of the other rows alone, scaled by
    their share); 4 microbatches of 2 give the whole batch's result to 1e-12."""
    model, params, state, x, y = _case("mlp")
    mask = np.asarray([True, False, True, True, False, True, True, False])
    kept = np.flatnonzero(mask)
    whole = bp.clipped_grad(model, LOSS, clip, mode=mode)
    chunked = bp.clipped_grad(model, LOSS, clip, mode=mode, microbatch=2)

    @jax.jit
    def run(params, x, y, mask):
        (v1, _), g1, n1 = whole(params, state, x, y, mask=mask)
        (v2, _), g2, n2 = chunked(params, state, x, y, mask=mask)
        (_, _), g3, _ = whole(params, state, x[kept], y[kept])       # only the kept rows
        return v1, g1, n1, v2, g2, n2, g3

    v1, g1, n1, v2, g2, n2, g3 = run(params, x, y, jnp.asarray(mask))
    keep = len(kept)
    assert np.all(np.asarray(n1)[~mask] == 0.0)
    _assert_tree_close(g1, jax.tree_util.tree_map(lambda a: a * keep / 8, g3), rtol=1e-12)
    _assert_tree_close(g2, g1, rtol=1e-12)
    np.testing.assert_allclose(n2, n1, rtol=1e-12)
    np.testing.assert_allclose(v2, v1, rtol=1e-12)


def test_the_noise_is_calibrated_to_the_sensitivity():
    """With one key, DP-SGD's noise (the grads minus the noiseless ones) is σ·S/B·z for the same z:
    per-layer thresholds with S = √(Σ C_l²) give noise S/C times the flat mode's."""
    model, params, state, x, y = _case("mlp")
    key = jax.random.PRNGKey(3)
    caps = (0.3, 0.4, 1.2)                                      # S = 1.3
    out = {}
    for mode, clip in [("flat", 1.0), ("per-layer", caps)]:
        noisy = privacy.dp_forward_backward(model, LOSS, clip, 2.0, mode=mode)
        clean = privacy.dp_forward_backward(model, LOSS, clip, 0.0, mode=mode)
        diff = jax.jit(lambda p: jax.tree_util.tree_map(jnp.subtract, noisy(p, state, x, y, key=key)[3],
                                                        clean(p, state, x, y, key=key)[3]))
        out[mode] = diff(params)
    _assert_tree_close(out["per-layer"], jax.tree_util.tree_map(lambda a: 1.3 * a, out["flat"]), rtol=1e-12)
    z = np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(out["flat"])]) / (2.0 * 1.0 / 8)
    assert 0.9 < np.std(z) < 1.1                                # σ·S/B with S = C = 1
