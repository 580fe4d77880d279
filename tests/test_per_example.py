"""Per-example gradient norms from one backward (bp.per_example_grad_norms) against the norms of
the vmapped per-example gradients (bp.per_example_grads), in float64, to 1e-10: five models, and
every layer of the cross-check table."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from bpjax import models
from bpjax._per_example import FallbackWarning
from bpjax.check.cases import LAYER_CASES
from helpers import init_params, normal, rng

HERE = pathlib.Path(__file__).parent


def _reference_norms(grads):
    """‖g_n‖ from per-example gradients: every leaf (N, ...)."""
    leaves = [a.reshape(a.shape[0], -1) for a in jax.tree_util.tree_leaves(grads)]
    return jnp.sqrt(sum(jnp.sum(a * a, axis=1) for a in leaves))


def _both(model, loss):
    """One compiled function: (value, grads, norms) of per_example_grad_norms, value_and_grad's
    grads, and the reference norms."""
    ours = bp.per_example_grad_norms(model, loss)
    plain = bp.value_and_grad(model, loss)
    pe = bp.per_example_grads(model, loss)

    @jax.jit
    def f(params, state, x, target, key):
        (value, _), grads, norms = ours(params, state, x, target, key=key)
        _, ref_grads = plain(params, state, x, target, key=key)
        return value, grads, norms, ref_grads, _reference_norms(pe(params, state, x, target, key=key))

    return f


def _assert_norms(model, loss, params, state, x, target, key=None, what=""):
    value, grads, norms, ref_grads, ref = _both(model, loss)(params, state, x, target, key)
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    assert norms.shape == (n,), what
    np.testing.assert_allclose(norms, ref, rtol=1e-10, atol=1e-12 * (1 + float(jnp.max(ref))), err_msg=what)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15, err_msg=f"{what}: grads differ from value_and_grad's")


def _f64(tree):
    return bp.cast_floating(tree, jnp.float64)


def _model_case(name):
    gen = np.random.default_rng(0)
    if name == "mlp":
        model = bp.sequential(bp.flatten(), bp.dense(16), bp.relu(), bp.dense(12), bp.tanh(), bp.dense(10))
        x, y = gen.standard_normal((6, 40, 1)), gen.integers(0, 10, 6)
    elif name == "mnist1d_cnn":
        model = models.cnn(channels=6)
        x, y = gen.standard_normal((5, 40, 1)), gen.integers(0, 10, 5)
    elif name == "cnn2d":
        model = bp.sequential(bp.conv(4, 3), bp.relu(), bp.max_pool(2, strides=2), bp.conv(6, 3, strides=2),
                              bp.relu(), bp.flatten(), bp.dense(10))
        x, y = gen.standard_normal((4, 8, 8, 1)), gen.integers(0, 10, 4)
    elif name == "gru":
        model = models.gru(hidden=6)
        x, y = gen.standard_normal((4, 7, 1)), gen.integers(0, 10, 4)
    elif name == "branches":                                 # combinators: residual, parallel, concat
        block = bp.residual(bp.sequential(bp.layer_norm(), bp.dense(6), bp.relu()))
        model = bp.sequential(bp.dense(6), block, bp.parallel(bp.dense(4), bp.dense(2)), bp.concat(), bp.dense(3))
        x, y = gen.standard_normal((5, 4)), gen.integers(0, 3, 5)
    elif name == "combinator":                               # a user's layer with params of its own
        model = bp.sequential(bp.dense(4), bp.tanh(), _gain(bp.dense(3)))
        x, y = gen.standard_normal((5, 5)), gen.integers(0, 3, 5)
    else:                                                    # GPT: tied embedding, attention, layer_norm
        model = bp.gpt(11, dim=8, num_heads=2, num_layers=2, max_len=6)
        ids = gen.integers(0, 11, (3, 6))
        x, y = ids[:, :-1], ids[:, 1:]
        params, state, _ = model.init(jax.random.PRNGKey(0), x.shape[1:])
        return model, _f64(params), state, jnp.asarray(x), jnp.asarray(y)
    params, state, _ = model.init(jax.random.PRNGKey(0), x.shape[1:])
    return model, _f64(params), _f64(state), jnp.asarray(x, jnp.float64), jnp.asarray(y)


@pytest.mark.parametrize("name", ["mlp", "mnist1d_cnn", "cnn2d", "gru", "gpt"])
def test_models(name):
    """The networks' norms, with no layer taking the vmapped fallback (FallbackWarning)."""
    model, params, state, x, y = _model_case(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        _assert_norms(model, bp.softmax_cross_entropy(), params, state, x, y, what=name)


def test_chunked_loop_over_examples(monkeypatch):
    """conv and attention take their examples in chunks when the residuals are large: the loop
    (here one example at a time, then two at a time) gives the same norms."""
    from bpjax import _per_example
    model = bp.sequential(bp.conv(3, 3, activation="relu"), bp.conv(2, 3, strides=2), bp.flatten(), bp.dense(3))
    gen = np.random.default_rng(5)
    x, y = jnp.asarray(gen.standard_normal((4, 6, 6, 2))), jnp.asarray(gen.integers(0, 3, 4))
    params, state, _ = model.init(jax.random.PRNGKey(0), x.shape[1:])
    for budget in (1, 2 * 6 * 6 * 3 * 8 * 2):
        monkeypatch.setattr(_per_example, "CHUNK_BYTES", budget)
        monkeypatch.setattr(_per_example, "COLUMN_CHUNK_BYTES", budget)
        _assert_norms(model, bp.softmax_cross_entropy(), _f64(params), state, x, y, what=f"chunk budget {budget}")


#: Convolutions of every geometry the "columns" rule must rebuild: rank 1, 2, 3, stride,
#: dilation, groups, padding, no bias, the fused relu, and the transposed convolution.
CONV_GEOMETRIES = {
    "conv2d": (lambda: bp.conv(4, 3), (5, 6, 3)),
    "conv2d-s2-groups2-relu-valid": (lambda: bp.conv(4, (3, 2), strides=2, groups=2, activation="relu",
                                                     padding="VALID"), (7, 6, 4)),
    "conv1d-dilation2-pad1": (lambda: bp.conv(3, 3, dilation=2, padding=1), (9, 2)),
    "conv3d-nobias": (lambda: bp.conv(2, 2, use_bias=False), (3, 4, 3, 2)),
    "conv_transpose2d-s2": (lambda: bp.conv_transpose(3, 3, strides=2), (4, 5, 2)),
    "conv_transpose1d-s3-groups2-relu": (lambda: bp.conv_transpose(4, 2, strides=3, groups=2, activation="relu"),
                                         (5, 2)),
    "conv2d-wide-gram": (lambda: bp.conv(24, 1), (2, 2, 24)),   # T·(P+Q) < P·Q: the Gram form
}


@pytest.mark.parametrize("name", sorted(CONV_GEOMETRIES))
def test_conv_columns_rule_every_geometry(name):
    """The columns rule (no vmapped backward) gives every example's norm, and clipped_grad the
    clipped mean from the per-example gradients it kept, to 1e-10 of the vmapped reference."""
    make, shape = CONV_GEOMETRIES[name]
    model = bp.sequential(make(), bp.flatten(), bp.dense(3))
    loss = bp.softmax_cross_entropy()
    gen = np.random.default_rng(3)
    x, y = jnp.asarray(gen.standard_normal((6, *shape))), jnp.asarray(gen.integers(0, 3, 6))
    params, state, _ = model.init(jax.random.PRNGKey(0), shape)
    params = _f64(params)
    clip = 0.5

    @jax.jit
    def f(params, x, y):
        _, grads, norms = bp.per_example_grad_norms(model, loss)(params, state, x, y)
        _, clipped, _ = bp.clipped_grad(model, loss, clip)(params, state, x, y)
        _, plain = bp.value_and_grad(model, loss)(params, state, x, y)
        pe = bp.per_example_grads(model, loss)(params, state, x, y)
        return grads, norms, clipped, plain, pe

    grads, norms, clipped, plain, pe = f(params, x, y)
    ref = _reference_norms(pe)
    np.testing.assert_allclose(norms, ref, rtol=1e-10)
    scale = np.minimum(1.0, clip / np.asarray(ref))
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14, err_msg="grads differ from value_and_grad's")
    for a, g in zip(jax.tree_util.tree_leaves(clipped), jax.tree_util.tree_leaves(pe)):
        want = np.mean(np.asarray(g) * scale.reshape((-1,) + (1,) * (g.ndim - 1)), 0)
        np.testing.assert_allclose(a, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", ["causal", "lean", "masked"])
def test_attention_projections_rule(kind):
    """multi_head_attention's rule (its two projections by dense's rule, d[Q|K|V] from its own
    backward): causal, the lean backward, and a key mask; norms and clipped mean to 1e-10."""
    gen = np.random.default_rng(4)
    if kind == "masked":
        att = bp.multi_head_attention(2, masked=True)
        x = jnp.asarray(gen.standard_normal((5, 6, 8)))
        mask = jnp.asarray(gen.random((5, 6)) > 0.3).at[:, 0].set(True)
        model = bp.sequential(att, bp.flatten(), bp.dense(3))
        inputs, in_shape = (x, mask), ((6, 8), (6,))
    else:
        att = bp.multi_head_attention(2, causal=True, lean=kind == "lean", block_size=2)
        inputs = jnp.asarray(gen.standard_normal((5, 6, 8)))
        model = bp.sequential(att, bp.flatten(), bp.dense(3))
        in_shape = (6, 8)
    y = jnp.asarray(gen.integers(0, 3, 5))
    params, state, _ = model.init(jax.random.PRNGKey(0), in_shape)
    _assert_norms(model, bp.softmax_cross_entropy(), _f64(params), state, inputs, y, what=kind)


@pytest.mark.parametrize("kind", ["rnn", "lstm-sequences", "gru-masked"])
def test_recurrent_projections_rule(kind):
    """The recurrent layers' rule (W_x and W_h by dense's rule over the steps, from the
    backward's own reverse scan): exact, and the compiled program has no more loops than the
    plain step's (XLA computed the reverse scan once)."""
    gen = np.random.default_rng(6)
    layer = {"rnn": lambda: bp.rnn(5), "lstm-sequences": lambda: bp.lstm(3, return_sequences=True),
             "gru-masked": lambda: bp.gru(4, masked=True)}[kind]()
    x = jnp.asarray(gen.standard_normal((5, 6, 3)))
    inputs, in_shape = ((x, jnp.asarray(gen.random((5, 6)) > 0.3)), ((6, 3), (6,))) if "masked" in kind else (x, (6, 3))
    model = bp.sequential(layer, bp.flatten(), bp.dense(3))
    y = jnp.asarray(gen.integers(0, 3, 5))
    params, state, _ = model.init(jax.random.PRNGKey(0), in_shape)
    loss = bp.softmax_cross_entropy()
    _assert_norms(model, loss, _f64(params), state, inputs, y, what=kind)

    def loops(f):
        text = jax.jit(f).lower(_f64(params), state, inputs, y).compile().as_text()
        return len(re.findall(r"\) while\(", text))

    assert loops(bp.per_example_grad_norms(model, loss)) == loops(bp.value_and_grad(model, loss))


def test_conv_gradient_comes_from_the_per_example_products():
    """In the explicit form, per_example_grad_norms's compiled program has as many matrix
    products as the plain step's (the conv's own weight-gradient product is dropped for the sum
    of the dW_n its rule built), and clipped_grad's second pass adds one for the dense layer's
    replay and one weighted sum of the kept dW_n, not the conv's product again."""
    model = bp.sequential(bp.conv(8, 3, impl="columns"), bp.flatten(), bp.dense(3))
    loss = bp.softmax_cross_entropy()
    params, state, _ = model.init(jax.random.PRNGKey(0), (6, 6, 4))
    x, y = jnp.zeros((4, 6, 6, 4)), jnp.zeros((4,), jnp.int32)

    def products(f):
        text = jax.jit(f).lower(params, state, x, y).compile().as_text()
        return len(re.findall(r" dot\(", text)) + len(re.findall(r" convolution\(", text))

    plain = products(bp.value_and_grad(model, loss))
    assert products(bp.per_example_grad_norms(model, loss)) == plain
    assert products(bp.clipped_grad(model, loss, 1.0)) == plain + 2


def _dot_loss():
    """value = (1/N) Σ_n ⟨y_n, c_n⟩ for a fixed random c: a mean over examples with a random
    error dy = c/N at the output (never ones)."""

    def forward(pred, c):
        return jnp.sum(pred * c) / pred.shape[0], (c, jnp.zeros((pred.shape[0], 0), pred.dtype))

    def backward(res, dvalue=1.0):
        c, rows = res
        return dvalue * c / rows.shape[0]

    return bp.make_loss("dot", forward, backward)


#: Cases with a batch_norm: value_and_grad trains, and in training it mixes examples.
MIXING = {"batch_norm-train-4d", "batch_norm-eval", "add-resnet-projection"}


#: Checked, inside a model, by test_models and the tests below (and slow to compile again).
COVERED = {"dense", "conv", "gru", "gpt", "sequential", "residual", "dense-width10-padded"}


def _has_params(case):
    shapes = jax.eval_shape(lambda k: case.make().init(k, case.in_shape)[0], jax.random.PRNGKey(0))
    return bool(jax.tree_util.tree_leaves(shapes))


def _table_cases():
    """The table's cases of layers with params (a layer without has no gradient of its own: its
    part of every norm is 0, checked in test_a_layer_without_params_adds_nothing): every dense
    case (its rule has three forms) and the first case of every other export (the explicit rule
    is the same code for every conv variant). Kept few: each compiles both sides."""
    seen, out = set(COVERED), []
    for c in LAYER_CASES:
        if not _has_params(c) or (c.export in seen and c.export != "dense") or str(c) in COVERED:
            continue
        seen.add(c.export)
        out.append(c)
    return out


@pytest.mark.parametrize("case", _table_cases(), ids=str)
def test_table(case):
    """Every layer with params in the cross-check table: its per-example norms equal those of
    per_example_grads; a layer that mixes examples in training raises, naming it."""
    layer = case.make()
    gen = rng(f"{case}-per-example")
    params, state, out_shape = init_params(layer, case.in_shape, gen, jnp.float64)
    shape = (case.batch, *case.in_shape)
    if case.int_input is not None:
        x = jnp.asarray(gen.integers(0, case.int_input, shape))
    elif case.draw_x is not None:
        x = case.draw_x(gen, shape, jnp.float64)
    else:
        x = normal(gen, shape, jnp.float64, case.x_scale)
    target = normal(gen, (case.batch, *out_shape), jnp.float64)
    key = jax.random.PRNGKey(3) if case.needs_key else None
    if str(case) in MIXING:
        with pytest.raises(ValueError, match=r"per_example_grad_norms: .*batch_norm.* mixes examples"):
            jax.jit(bp.per_example_grad_norms(layer, _dot_loss()))(params, state, x, target, key=key)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)        # a built-in layer has a rule of its own
        _assert_norms(layer, _dot_loss(), params, state, x, target, key, what=str(case))


def test_a_layer_without_params_adds_nothing():
    model = bp.sequential(bp.dropout(0.5), bp.relu(), bp.max_pool(2), bp.flatten())
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 2)))
    (_, _), grads, norms = jax.jit(bp.per_example_grad_norms(model, _dot_loss()))(
        ((), (), (), ()), ((), (), (), ()), x, jnp.ones((3, 4)), key=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(norms, np.zeros(3))


def test_a_users_layer_takes_part():
    """A make_layer layer of the user's own (no rule): the explicit per-example rule."""

    def init(key, in_shape):
        return {"a": jnp.linspace(0.5, 1.5, in_shape[-1])}, (), in_shape

    def forward(params, state, x, *, key=None, train=True):
        return jnp.sin(x) * params["a"], state, (x,)

    def backward(params, res, dy):
        (x,) = res
        return {"a": jnp.sum(dy * jnp.sin(x), axis=0)}, dy * jnp.cos(x) * params["a"]

    mine = bp.make_layer("wave", init, forward, backward)
    model = bp.sequential(bp.dense(5), mine, bp.dense(3))
    params, state, _ = model.init(jax.random.PRNGKey(0), (4,))
    gen = np.random.default_rng(1)
    x, y = jnp.asarray(gen.standard_normal((5, 4))), jnp.asarray(gen.integers(0, 3, 5))
    with pytest.warns(UserWarning, match=r"per_example_grad_norms: sequential\[1\] \(wave\) has no per-example "
                                         r"rule of its own") as caught:
        _assert_norms(model, bp.softmax_cross_entropy(), _f64(params), state, x, y, what="user layer")
    assert len([w for w in caught if "has no per-example rule" in str(w.message)]) == 1   # only the user's layer


def _gain(inner):
    """A make_layer layer that calls ``inner`` and scales its output by a param of its own."""

    def init(key, in_shape):
        p, _, out = inner.init(key, in_shape)
        return {"inner": p, "g": jnp.asarray(1.5)}, (), out

    def forward(params, state, x, *, key=None, train=True):
        y, _, r = inner.forward(params["inner"], (), x)
        return params["g"] * y, state, (y, r)

    def backward(params, res, dy):
        y, r = res
        d_inner, dx = inner.backward(params["inner"], r, params["g"] * dy)
        return {"inner": d_inner, "g": jnp.sum(dy * y)}, dx

    return bp.make_layer("gain", init, forward, backward)


def test_a_users_combinator_with_params_of_its_own():
    """Its params are not just its layer's, so it is rerun per example as a whole."""
    model, params, state, x, y = _model_case("combinator")
    _assert_norms(model, bp.softmax_cross_entropy(), params, state, x, y, what="user combinator")


def test_the_rule_goes_with_the_layer_not_its_name_or_module(monkeypatch):
    """The rule that runs is the one the layer's factory named (make_layer's ``per_example``),
    whatever the layer is called and wherever its functions live: a user's layer called "dense",
    its functions claiming bpjax.layers.basic as their module, gets the rerun rule; bp.dense
    gets the dense rule, and so does the dense of a copy of bpjax/layers/basic.py loaded under
    another module name."""
    import importlib.util

    from bpjax import _per_example
    ran = []

    def spy(rule, what):
        def run(v, *args):
            ran.append((v.label, what))
            return rule(v, *args)
        return run

    monkeypatch.setitem(_per_example.LEAF_RULES, "dense", spy(_per_example.LEAF_RULES["dense"], "dense"))
    monkeypatch.setattr(_per_example, "_rerun", spy(_per_example._rerun, "rerun"))

    def init(key, in_shape):
        return {"w": jnp.linspace(-1.0, 1.0, in_shape[-1] * 3).reshape(in_shape[-1], 3)}, (), (3,)

    def forward(params, state, x, *, key=None, train=True):
        return x @ params["w"], state, (x,)

    def backward(params, res, dy):
        (x,) = res
        return {"w": x.T @ dy}, dy @ params["w"].T

    for f in (init, forward, backward):
        f.__module__ = "bpjax.layers.basic"
    mine = bp.make_layer("dense", init, forward, backward)
    spec = importlib.util.spec_from_file_location("bpjax.layers.moved_basic", HERE.parent / "bpjax" / "layers" / "basic.py")
    moved = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(moved)

    model = bp.sequential(bp.dense(4), bp.tanh(), mine, moved.dense(2))
    params, state, _ = model.init(jax.random.PRNGKey(0), (3,))
    gen = np.random.default_rng(2)
    x, y = jnp.asarray(gen.standard_normal((5, 3))), jnp.asarray(gen.integers(0, 2, 5))
    _assert_norms(model, bp.softmax_cross_entropy(), _f64(params), state, x, y, what="rule by layer")
    assert sorted(ran) == [("sequential[0] (dense)", "dense"), ("sequential[2] (dense)", "rerun"),
                           ("sequential[3] (dense)", "dense")]


def test_a_rule_that_does_not_exist_is_refused_by_name():
    layer = bp.make_layer("wave", lambda key, s: ({"a": jnp.ones(s[-1])}, (), s),
                          lambda p, s, x, *, key=None, train=True: (x * p["a"], s, (x,)),
                          lambda p, r, dy: ({"a": jnp.sum(dy * r[0], axis=0)}, dy * p["a"]), per_example="wavy")
    params, state, _ = layer.init(jax.random.PRNGKey(0), (3,))
    with pytest.raises(ValueError, match=r"per_example_grad_norms: wave: expected per_example to name one of "
                                         r"the rules \[.*'dense'.*\] or to be None, got 'wavy'"):
        bp.per_example_grad_norms(layer, _dot_loss())(params, state, jnp.ones((2, 3)), jnp.ones((2, 3)))


def test_batch_norm_in_training_is_refused_by_name():
    model = bp.sequential(bp.dense(4), bp.batch_norm(), bp.relu(), bp.dense(2))
    params, state, _ = model.init(jax.random.PRNGKey(0), (3,))
    x, y = jnp.ones((4, 3)), jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match=r"per_example_grad_norms: sequential\[1\] \(batch_norm\) mixes examples"):
        jax.jit(bp.per_example_grad_norms(model, bp.softmax_cross_entropy()))(params, state, x, y)


def test_bad_arguments_name_the_function():
    with pytest.raises(TypeError, match="per_example_grad_norms: expected model to be a bpjax.Layer"):
        bp.per_example_grad_norms(bp.dense, bp.softmax_cross_entropy())
    with pytest.raises(TypeError, match="gradient_flow: expected loss to be a bpjax.Loss"):
        bp.gradient_flow(bp.dense(3), bp.softmax_cross_entropy)


@pytest.mark.parametrize("name", ["mlp", "mnist1d_cnn", "branches", "combinator", "gpt", "gru"])
def test_clipped_grad_equals_the_vmapped_reference(name):
    """(1/N) Σ_n min(1, C/‖g_n‖) g_n from the rows of dy scaled, against per_example_grads: the
    weight products redone or the kept dW_n summed (mlp, cnn, branches, gru), or, for layers in
    a scan (gpt) or a layer with params of its own beside its sub-layer's (combinator), from what
    the first pass recorded at every leaf."""
    model, params, state, x, y = _model_case(name)
    loss = bp.softmax_cross_entropy()
    pe = jax.jit(bp.per_example_grads(model, loss))(params, state, x, y)
    ref_norms = _reference_norms(pe)
    clip = float(np.median(ref_norms))                     # about half the examples are clipped
    scale = np.minimum(1.0, clip / np.asarray(ref_norms))
    ref = jax.tree_util.tree_map(lambda a: np.mean(a * scale.reshape((-1,) + (1,) * (a.ndim - 1)), 0), pe)
    (_, _), grads, norms = jax.jit(bp.clipped_grad(model, loss, clip))(params, state, x, y)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-10)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * float(np.max(np.abs(b))))


@pytest.mark.parametrize("name", ["gpt", "combinator"])
def test_clipped_grad_takes_the_records_through_scans(monkeypatch, name):
    """A model whose layers run in a scan (the GPT's blocks) or with params of its own beside its
    layers' gets its second pass from what the first recorded at every leaf (_SlotReplay), not
    from a whole backward again: no leaf layer's backward runs on the error the second pass
    propagates (each takes its recorded one)."""
    from bpjax import _per_example
    used, ignored = [], []

    class Spy(_per_example._SlotReplay):
        def __init__(self, scale):
            used.append(True)
            super().__init__(scale)

        def layer_backward_checked(self, name, token, backward, finish, params, res, dy):
            if isinstance(res, _per_example._Slot) and res.record is not None:
                ignored.append(name)
            return super().layer_backward_checked(name, token, backward, finish, params, res, dy)

    monkeypatch.setattr(_per_example, "_SlotReplay", Spy)
    model, params, state, x, y = _model_case(name)
    jax.jit(bp.clipped_grad(model, bp.softmax_cross_entropy(), 1.0)).lower(params, state, x, y)
    assert used == [True]
    assert ("dense" in ignored) and (name != "gpt" or {"multi_head_attention", "layer_norm", "embedding"} <= set(ignored))


@pytest.mark.parametrize("clip", [0.0, -1.0, float("nan")])
def test_clipped_grad_refuses_a_bad_clip_norm(clip):
    with pytest.raises(ValueError, match="clipped_grad: expected"):
        bp.clipped_grad(bp.dense(2), bp.squared_error(), clip)


SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
import bpjax as bp
from bpjax import distributed as dist
assert jax.device_count() == 4
model = bp.sequential(bp.dense(8), bp.relu(), bp.residual(bp.sequential(bp.layer_norm(), bp.dense(8))), bp.dense(3))
params, state, _ = model.init(jax.random.PRNGKey(0), (5,))
gen = np.random.default_rng(0)
x, y = jnp.asarray(gen.standard_normal((8, 5))), jnp.asarray(gen.integers(0, 3, 8))
loss = bp.softmax_cross_entropy()
norms1 = jax.jit(bp.per_example_grad_norms(model, loss))(params, state, x, y)[2]
flow1 = jax.jit(bp.gradient_flow(model, loss))(params, state, x, y)[2]
mesh = dist.make_mesh(4)
xs, ys = dist.shard_batch(mesh, x, y)
(p, s), _ = dist.place(mesh, (params, state))
norms4 = jax.jit(bp.per_example_grad_norms(model, loss))(p, s, xs, ys)[2]
flow4 = jax.jit(bp.gradient_flow(model, loss))(p, s, xs, ys)[2]
assert len(norms4.sharding.device_set) == 4, norms4.sharding
np.testing.assert_allclose(norms4, norms1, rtol=1e-12)
assert flow1.keys() == flow4.keys()
for k in flow1:
    for q in flow1[k]:
        np.testing.assert_allclose(flow4[k][q], flow1[k][q], rtol=1e-12)
print("SHARDED OK")
"""


def test_sharded_over_four_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SHARDED OK" in proc.stdout
