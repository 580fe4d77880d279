"""bpjax.check_layer / check_model / check_loss: planted bugs are caught at the right leaf,
correct layers pass, and the hand-written gradients hold under jit, vmap and jax.checkpoint."""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bpjax as bp
from bpjax import cli
from helpers import assert_close, init_params, normal, rng

# ----------------------------------------------------------------------------- planted bugs
# Each is a raw bp.Layer / bp.Loss (not built with make_layer), as a user would write one.


def _dense_with(backward):
    good = bp.dense(4)
    return bp.Layer(good.init, good.forward, backward)


def missing_transpose():
    """dW = dyᵀ x instead of xᵀ dy: with D_in == D_out the shapes agree and only values differ."""
    good = bp.dense(4)

    def backward(params, res, dy):
        (x,) = res
        return {"w": dy.T @ x, "b": dy.sum(0)}, dy @ params["w"].T

    return bp.Layer(good.init, good.forward, backward)


def gated(drop_term: bool):
    """y = (x W) ⊙ x:  dW = xᵀ(dy ⊙ x),  dx = (dy ⊙ x) Wᵀ + dy ⊙ (x W)  (product rule)."""

    def init(key, in_shape):
        return {"w": jnp.zeros((in_shape[-1], in_shape[-1]))}, (), in_shape

    def forward(params, state, x, *, key=None, train=True):
        return (x @ params["w"]) * x, state, (x,)

    def backward(params, res, dy):
        (x,) = res
        dx = (dy * x) @ params["w"].T                                    # (N, D)
        if not drop_term:
            dx = dx + dy * (x @ params["w"])                             # the second term
        return {"w": x.T @ (dy * x)}, dx

    return bp.Layer(init, forward, backward)


def wrong_bias_axis():
    """db summed over the feature axis instead of the batch axis (batch == D_out: same shape)."""

    def backward(params, res, dy):
        (x,) = res
        return {"w": x.T @ dy, "b": dy.sum(axis=1)}, dy @ params["w"].T

    return _dense_with(backward)


def squared_error_without_1_over_n():
    good = bp.squared_error()

    def backward(res, dvalue=1.0):
        (r,) = res
        return r * dvalue                                                 # forgot / n

    return bp.Loss(good.forward, backward)


def softmax_dropping_dy_in_the_sum():
    """dx = y ⊙ (dy − Σ_j y_j) instead of y ⊙ (dy − Σ_j dy_j y_j): right when dy is all ones."""
    good = bp.softmax()

    def backward(params, res, dy):
        (y,) = res
        return (), y * (dy - jnp.sum(y, axis=-1, keepdims=True))

    return bp.Layer(good.init, good.forward, backward)


def _squarish_params(gen, d=4):
    return {"w": jnp.asarray(gen.standard_normal((d, d)) / 2), "b": jnp.asarray(0.5 + gen.uniform(size=d))}


def test_missing_transpose_points_at_dw():
    report = bp.check_layer(missing_transpose(), (4,), batch=3)
    assert report.failing == ("dparams['w']",), report
    assert {r.reference for r in report.rows if not r.ok} == {"vjp", "fd", "jvp"}
    assert "dparams['w']" in str(report) and "FAIL <--" in str(report)


def test_dropped_product_rule_term_points_at_dx():
    report = bp.check_layer(gated(drop_term=True), (3,), batch=2)
    assert report.failing == ("dx",), report
    assert 0.8 < report.row("dx", "fd").order < 1.2           # first-order remainder: wrong gradient
    good = bp.check_layer(gated(drop_term=False), (3,), batch=2)
    assert good.ok, good
    assert abs(good.row("dx", "fd").order - 2) < 0.2         # second order: right gradient


def test_wrong_bias_axis_points_at_db():
    report = bp.check_layer(wrong_bias_axis(), (5,), batch=4)
    assert report.failing == ("dparams['b']",), report


def test_wrong_bias_axis_with_another_shape_is_reported_not_raised():
    report = bp.check_layer(wrong_bias_axis(), (5,), batch=3, methods=("vjp",))
    assert report.failing == ("dparams['b']",)
    assert "shape (3,), expected (4,)" in str(report)


def test_missing_1_over_n_points_at_dpred():
    gen = rng("1/n")
    pred, target = normal(gen, (5, 3), jnp.float64), normal(gen, (5, 3), jnp.float64)
    report = bp.check_loss(squared_error_without_1_over_n(), pred, target)
    assert report.failing == ("dpred",), report
    assert bp.check_loss(bp.squared_error(), pred, target).ok


def test_bug_hidden_by_all_ones_cotangent_is_caught():
    layer = softmax_dropping_dy_in_the_sum()
    ones = jnp.ones((3, 5))
    assert bp.check_layer(layer, (5,), cotangent=ones, methods=("vjp",)).ok   # what a ones check says
    report = bp.check_layer(layer, (5,))                      # the default: a random cotangent
    assert report.failing == ("dx",), report


def test_assert_gradients_close_raises_with_the_table():
    with pytest.raises(AssertionError, match=r"(?s)dparams\['b'\].*FAIL <--"):
        bp.assert_gradients_close(wrong_bias_axis(), (5,), batch=4, methods=("vjp",))
    report = bp.assert_gradients_close(bp.dense(2), (3,), methods=("vjp",))
    with pytest.raises(TypeError, match="assert_gradients_close: expected no further arguments"):
        bp.assert_gradients_close(report, (3,))


# ----------------------------------------------------------------------------- correct layers


CORRECT = {
    "mlp": (lambda: bp.sequential(bp.dense(5), bp.tanh(), bp.dense(3), bp.softmax()), (4,)),
    "norm-residual": (lambda: bp.residual(bp.sequential(bp.layer_norm(), bp.dense(4), bp.gelu())), (4,)),
    "conv-pool": (lambda: bp.sequential(bp.conv(2, (2, 2)), bp.relu(), bp.global_avg_pool()), (4, 4, 2)),
}


@pytest.mark.parametrize("name,dtype", [("mlp", jnp.float64), ("mlp", jnp.float32),
                                        ("norm-residual", jnp.float64), ("norm-residual", jnp.float32),
                                        ("conv-pool", jnp.float32)],
                         ids=["mlp-f64", "mlp-f32", "norm-residual-f64", "norm-residual-f32", "conv-pool-f32"])
def test_correct_layers_pass(name, dtype):
    make, in_shape = CORRECT[name]
    report = bp.assert_gradients_close(make(), in_shape, batch=2, dtype=dtype)
    assert report.rows[0].rtol == bp.check.layer.TOLERANCES[jnp.dtype(dtype).name][report.rows[0].reference]


def test_bfloat16_uses_loose_tolerances():
    report = bp.check_layer(bp.sequential(bp.dense(4), bp.tanh()), (3,), dtype=jnp.bfloat16,
                            methods=("vjp", "jvp"))
    assert report.ok, report
    assert {r.rtol for r in report.rows} == {0.1}


def test_tolerances_can_be_overridden():
    report = bp.check_layer(bp.gelu(), (4,), rtol={"fd": 1e-30}, methods=("vjp", "fd"))
    assert not report.row("dx", "fd").ok and report.row("dx", "vjp").ok
    assert bp.check_layer(bp.gelu(), (4,), rtol={"fd": 1e-30}, atol=1e-6, methods=("fd",)).ok


def test_finite_differences_below_float64_warn():
    with pytest.warns(UserWarning, match="check_layer: finite differences in float32 are unreliable"):
        bp.check_layer(bp.tanh(), (3,), methods=("fd",), fd_dtype=jnp.float32)


def test_bad_arguments_raise_one_sentence():
    with pytest.raises(TypeError, match="check_layer: expected a bpjax.Layer, got function"):
        bp.check_layer(bp.relu, (3,))
    with pytest.raises(ValueError, match=r"check_layer: expected methods among \('vjp', 'fd', 'jvp'\), got"):
        bp.check_layer(bp.relu(), (3,), methods=("grad",))
    with pytest.raises(ValueError, match="check_layer: expected in_shape"):
        bp.check_layer(bp.relu())


def test_integer_inputs_and_tuple_inputs():
    ids = jnp.asarray(rng("ids").integers(0, 6, (3, 4)))
    report = bp.check_layer(bp.embedding(6, 2), x=ids, methods=("vjp",))
    assert [r.gradient for r in report.rows] == ["dparams['table']"] and report.ok
    report = bp.check_layer(bp.concat(), ((3,), (2,)), methods=("vjp",))
    assert [r.gradient for r in report.rows] == ["dx[0]", "dx[1]"] and report.ok


# ----------------------------------------------------------------------------- models, jit, vmap, checkpoint


def _mlp_problem(dtype=jnp.float64, batch=4):
    net = bp.sequential(bp.dense(5), bp.tanh(), bp.dense(3))
    gen = rng("mlp-problem")
    params, state, _ = init_params(net, (4,), gen, dtype)
    x = normal(gen, (batch, 4), dtype)
    labels = jnp.asarray(gen.integers(0, 3, (batch,)))
    return net, bp.softmax_cross_entropy(), params, state, x, labels


def test_check_model():
    net, loss, params, state, x, labels = _mlp_problem()
    report = bp.check_model(net, loss, params, state, x, labels)
    assert report.ok, report
    assert {r.gradient for r in report.rows} == {"dparams[0]['w']", "dparams[0]['b']", "dparams[2]['w']",
                                                 "dparams[2]['b']", "dx"}


def test_backward_without_jit():
    assert bp.check_layer(bp.dense(2), (3,), jit=False, methods=("vjp",)).ok
    report = bp.check_layer(wrong_bias_axis(), (5,), batch=4, jit=False, methods=("vjp",))
    assert report.failing == ("dparams['b']",)


def test_per_example_grads_equal_vmap_of_jax_grad():
    net, loss, params, state, x, labels = _mlp_problem()
    grads = jax.jit(bp.per_example_grads(net, loss))(params, state, x, labels)

    def one_loss(p, x1, t1):
        return loss.forward(net.forward(p, state, x1[None])[0], t1[None])[0]

    ref = jax.jit(jax.vmap(jax.grad(one_loss), in_axes=(None, 0, 0)))(params, x, labels)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert_close(grads, ref, jnp.float64, "per-example")
    # the mean of per-example gradients is the batch gradient (the loss is a mean)
    (_, _), batch_grads = jax.jit(bp.value_and_grad(net, loss))(params, state, x, labels)
    assert_close(jax.tree_util.tree_map(lambda g: g.mean(0), grads), batch_grads, jnp.float64, "mean")


def remat(layer):
    """``layer`` with its forward under ``jax.checkpoint``: autodiff rematerialises it."""

    def forward(params, state, x, *, key=None, train=True):
        return jax.checkpoint(lambda p, s, x: layer.forward(p, s, x, key=key, train=train))(params, state, x)

    return bp.Layer(layer.init, forward, layer.backward)


def test_gradients_through_jax_checkpoint():
    block = bp.sequential(bp.dense(4), bp.silu(), bp.dense(4))
    net = bp.sequential(bp.dense(4), remat(block), bp.tanh())
    gen = rng("remat")
    params, state, _ = init_params(net, (3,), gen, jnp.float64)
    x, target = normal(gen, (2, 3), jnp.float64), normal(gen, (2, 4), jnp.float64)
    report = bp.check_model(net, bp.squared_error(), params, state, x, target, methods=("vjp", "jvp"))
    bp.assert_gradients_close(report)
    # and the bridge: jax.grad through jax.checkpoint of a layer uses the hand-written backward
    bparams, _, _ = init_params(block, (4,), gen, jnp.float64)
    h, dy = normal(gen, (2, 4), jnp.float64), normal(gen, (2, 4), jnp.float64)
    got = jax.grad(lambda p: jnp.sum(jax.checkpoint(bp.as_jax_fn(block))(p, (), h) * dy))(bparams)
    _, _, res = block.forward(bparams, (), h)
    assert_close(got, block.backward(bparams, res, dy)[0], jnp.float64, "checkpoint")


# ----------------------------------------------------------------------------- property test

ACTIVATIONS = [bp.relu, bp.tanh, bp.sigmoid, bp.gelu, bp.silu, bp.elu, bp.softplus, lambda: bp.leaky_relu(0.1)]
LOSSES = ["squared_error", "mean_squared_error", "huber", "softmax_cross_entropy", "sigmoid_binary_cross_entropy"]


def _random_architecture_check(widths, acts, loss_name, batch, in_dim, seed):
    layers = []
    for w, a in zip(widths, acts):
        layers += [bp.dense(w), ACTIVATIONS[a]()]
    layers.append(bp.dense(max(widths[-1], 2) if loss_name == "softmax_cross_entropy" else widths[-1]))
    net, loss = bp.sequential(*layers), getattr(bp, loss_name)()
    gen = np.random.default_rng(seed)
    params, state, out_shape = init_params(net, (in_dim,), gen, jnp.float64)
    x = normal(gen, (batch, in_dim), jnp.float64)
    y_shape = (batch, *out_shape)
    if loss_name == "softmax_cross_entropy":
        target = jnp.asarray(gen.integers(0, out_shape[-1], y_shape[:-1]))
    elif loss_name == "sigmoid_binary_cross_entropy":
        target = jnp.asarray(gen.uniform(size=y_shape))
    else:
        target = normal(gen, y_shape, jnp.float64)
    report = bp.check_model(net, loss, params, state, x, target, seed=seed)
    bp.assert_gradients_close(report)


# Two halves (regression and classification losses) so that pytest-xdist runs them side by side.
_ARCH = dict(widths=st.lists(st.sampled_from([1, 2, 5]), min_size=1, max_size=3),
             acts=st.lists(st.integers(0, len(ACTIVATIONS) - 1), min_size=3, max_size=3),
             batch=st.sampled_from([1, 2, 3]), in_dim=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(loss_name=st.sampled_from(LOSSES[:3]), **_ARCH)
def test_random_regression_architectures_match_the_references(widths, acts, loss_name, batch, in_dim, seed):
    _random_architecture_check(widths, acts, loss_name, batch, in_dim, seed)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(loss_name=st.sampled_from(LOSSES[3:]), **_ARCH)
def test_random_classification_architectures_match_the_references(widths, acts, loss_name, batch, in_dim,
                                                                   seed):
    _random_architecture_check(widths, acts, loss_name, batch, in_dim, seed)


# ----------------------------------------------------------------------------- the checker's parts


def test_the_checker_is_in_parts_a_reader_can_hold():
    """The checker is a folder of parts (draw, references, finite differences, compare, report,
    one engine) so that each reads on its own; every front-end (check_layer, check_model,
    check_loss, check_vjp) hands its forward to the one engine."""
    import ast
    import pathlib

    package = pathlib.Path(bp.__file__).parent / "check"
    parts = ["draw", "refs", "fd", "compare", "report", "engine", "layer", "vjp"]
    for part in parts:
        tree = ast.parse((package / f"{part}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                doc = ast.get_docstring(node) is not None
                first = node.body[1] if doc and len(node.body) > 1 else node.body[0]
                assert node.end_lineno - first.lineno < 50, f"{part}.{node.name} is over 50 lines"
    calls = {"check_layer": "_run(", "check_model": "_run(", "check_loss": "_run(", "_check_at": "run("}
    sources = {p: (package / f"{p}.py").read_text() for p in ("layer", "vjp")}
    for fn, call in calls.items():
        src = sources["vjp" if fn == "_check_at" else "layer"]
        body = src[src.index(f"def {fn}("):]
        body = body[:body.index("\ndef ", 1)] if "\ndef " in body[1:] else body
        assert call in body, f"{fn} does not call the engine"


def test_a_function_target_without_args_shapes_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """``bpjax gradcheck mypkg.ops:softplus`` (no --args-shapes) called softplus() to build a layer
    and ended in a raw TypeError with exit 1, the code of a failed check."""
    (tmp_path / "trip_ops.py").write_text("import jax.numpy as jnp\n\ndef softplus(x):\n"
                                          "    return jnp.logaddexp(x, 0.0)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert cli.main(["gradcheck", "trip_ops:softplus"]) == 2
    finally:
        sys.modules.pop("trip_ops", None)
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith(
        "bpjax gradcheck: expected --args-shapes (one shape per argument) for trip_ops:softplus, "
        "a function of 1 argument, got none")
