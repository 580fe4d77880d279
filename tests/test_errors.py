"""Bad input raises at trace time, naming the layer, what it expected and what it got."""
from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from bpjax.layers.losses import check_labels
from helpers import init_params, rng


def _dense_params(in_dim=5, out_dim=3):
    params, _, _ = init_params(bp.dense(out_dim), (in_dim,), rng("err"), jnp.float32)
    return params


def test_dense_wrong_feature_size():
    with pytest.raises(ValueError, match=re.escape("dense: expected x.shape[-1] == 5, got x.shape=(4, 6)")):
        bp.dense(3).forward(_dense_params(), (), jnp.ones((4, 6)))


def test_dense_wrong_feature_size_under_jit_is_a_trace_time_error():
    f = jax.jit(lambda p, x: bp.dense(3).forward(p, (), x)[0])
    with pytest.raises(ValueError, match=re.escape("dense: expected x.shape[-1] == 5, got x.shape=(2, 7)")):
        f(_dense_params(), jnp.ones((2, 7)))


def test_dense_wrong_rank():
    with pytest.raises(ValueError, match=re.escape("dense: expected x.ndim >= 2 (batch, ..., features), got x.shape=(5,)")):
        bp.dense(3).forward(_dense_params(), (), jnp.ones(5))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_dense_integer_or_boolean_input(dtype):
    with pytest.raises(TypeError, match=r"dense: expected a floating-point x, got dtype (int32|bool)"):
        bp.dense(3).forward(_dense_params(), (), jnp.ones((4, 5), dtype))


@pytest.mark.parametrize("out_dim", [0, -2, 2.5, True])
def test_dense_bad_out_dim(out_dim):
    with pytest.raises(ValueError, match=re.escape(f"dense: expected out_dim to be an integer > 0, got {out_dim!r}")):
        bp.dense(out_dim)


def test_params_missing_leaf_shows_both_structures():
    params = {"w": _dense_params()["w"]}
    with pytest.raises(TypeError) as e:
        bp.dense(3).forward(params, (), jnp.ones((4, 5)))
    msg = str(e.value)
    assert msg.startswith("dense: the params tree does not fit the model.")
    assert "expected: {'b': float32[3], 'w': float32[5, 3]}" in msg
    assert "got:      {'w': float32[5, 3]}" in msg


def test_params_extra_leaf():
    params = dict(_dense_params(), gamma=jnp.ones(3))
    with pytest.raises(TypeError, match=r"dense: the params tree does not fit the model\.\n  expected: .*\n  got: .*'gamma'"):
        bp.dense(3).forward(params, (), jnp.ones((4, 5)))


def test_params_wrong_leaf_shape():
    params = dict(_dense_params(), b=jnp.ones(4))
    with pytest.raises(ValueError, match=re.escape("dense: expected params['b'].shape == (3,), got (4,)")):
        bp.dense(3).forward(params, (), jnp.ones((4, 5)))


def test_sequential_params_for_another_model():
    net = bp.sequential(bp.dense(4), bp.relu(), bp.dense(2))
    other = bp.sequential(bp.dense(4), bp.dense(2))
    params, _, _ = init_params(other, (3,), rng("other"), jnp.float32)
    with pytest.raises(TypeError, match=r"sequential: the params tree does not fit the model\.\n  expected: \(\{.*\}, \(\), \{.*\}\)\n  got: "):
        net.forward(params, (), jnp.ones((2, 3)))


def test_value_and_grad_checks_the_tree_too():
    net = bp.sequential(bp.dense(4), bp.relu(), bp.dense(2))
    params, state, _ = init_params(net, (3,), rng("vg"), jnp.float32)
    bad = (params[0], (), {"w": params[2]["w"]})
    with pytest.raises(TypeError, match="sequential: the params tree does not fit the model"):
        jax.jit(bp.value_and_grad(net, bp.squared_error()))(bad, state, jnp.ones((2, 3)), jnp.ones((2, 2)))


def test_sequential_needs_layers():
    with pytest.raises(ValueError, match="sequential: expected at least one layer, got none"):
        bp.sequential()
    with pytest.raises(TypeError, match=r"sequential: expected a bpjax.Layer at position 1, got function \(did you forget"):
        bp.sequential(bp.dense(2), bp.relu)


def test_residual_rejects_a_shape_change():
    with pytest.raises(ValueError, match=re.escape("residual: expected the inner layer to keep the shape (5,), got out_shape=(3,)")):
        bp.residual(bp.dense(3)).init(jax.random.PRNGKey(0), (5,))


def test_softmax_needs_a_class_axis():
    with pytest.raises(ValueError, match=re.escape("softmax: expected x.ndim >= 2 (batch, ..., classes), got x.shape=(5,)")):
        bp.softmax().forward((), (), jnp.ones(5))


def test_unknown_initializer():
    with pytest.raises(ValueError, match=r"dense: expected an initializer, one of \[.*'he_normal'.*\] or a callable .*, got 'kaiming'"):
        bp.dense(3, w_init="kaiming")


@pytest.mark.parametrize("make", [bp.squared_error, bp.mean_squared_error, bp.huber])
def test_target_shape_must_match_prediction(make):
    name = make.__name__
    with pytest.raises(ValueError, match=re.escape(f"{name}: expected target.shape == pred.shape == (4, 2), got target.shape=(4,)")):
        make().forward(jnp.ones((4, 2)), jnp.ones(4))


def test_loss_needs_float_predictions():
    with pytest.raises(TypeError, match="squared_error: expected a floating-point pred, got dtype int32"):
        bp.squared_error().forward(jnp.ones((4, 2), jnp.int32), jnp.ones((4, 2)))


def test_cross_entropy_label_shape():
    with pytest.raises(ValueError, match=re.escape("softmax_cross_entropy: expected integer labels of shape (4,), got target.shape=(4, 1)")):
        bp.softmax_cross_entropy().forward(jnp.ones((4, 3)), jnp.zeros((4, 1), jnp.int32))


def test_cross_entropy_probability_shape():
    with pytest.raises(ValueError, match=re.escape("softmax_cross_entropy: expected probability targets of shape (4, 3) or integer labels of shape (4,), got target.shape=(4, 2)")):
        bp.softmax_cross_entropy().forward(jnp.ones((4, 3)), jnp.ones((4, 2)))


@pytest.mark.parametrize("labels,seen", [([0, 1, 3, 2], "[0, 3]"), ([0, -1, 2, 2], "[-1, 2]")])
def test_cross_entropy_labels_out_of_range(labels, seen):
    with pytest.raises(ValueError, match=re.escape(f"softmax_cross_entropy: expected labels in [0, 3), got labels in {seen}")):
        bp.softmax_cross_entropy().forward(jnp.ones((4, 3)), jnp.array(labels))


def test_cross_entropy_boolean_labels():
    with pytest.raises(TypeError, match="softmax_cross_entropy: expected integer labels or floating-point probabilities, got target dtype bool"):
        bp.softmax_cross_entropy().forward(jnp.ones((4, 3)), jnp.ones(4, bool))


def test_cross_entropy_needs_a_class_axis():
    with pytest.raises(ValueError, match=re.escape("softmax_cross_entropy: expected pred.ndim >= 2 (batch, ..., classes), got pred.shape=(4,)")):
        bp.softmax_cross_entropy().forward(jnp.ones(4), jnp.zeros(4, jnp.int32))


def test_binary_cross_entropy_integer_targets():
    with pytest.raises(TypeError, match="sigmoid_binary_cross_entropy: expected floating-point targets in \\[0, 1\\], got dtype int32"):
        bp.sigmoid_binary_cross_entropy().forward(jnp.ones((4, 1)), jnp.ones((4, 1), jnp.int32))


@pytest.mark.parametrize("make,msg", [
    (lambda: bp.huber(0.0), "huber: expected delta > 0, got 0.0"),
    (lambda: bp.softmax_cross_entropy(1.0), "softmax_cross_entropy: expected 0 <= label_smoothing < 1, got 1.0"),
])
def test_bad_loss_hyperparameters(make, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        make()


# ----------------------------------------------------------------------------- issue 16 §4


def test_sequential_wrong_input_width_names_x_and_both_shapes():
    net = bp.sequential(bp.dense(16), bp.relu(), bp.dense(3))
    params, state, _ = init_params(net, (4,), rng("x-width"), jnp.float32)
    msg = ("sequential: expected x.shape[1:] == (4,) (the input shape its params were initialised for), "
           "got x.shape=(2, 5)")
    with pytest.raises(ValueError, match=re.escape(msg)):
        net.forward(params, state, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=re.escape(msg)):
        jax.jit(bp.value_and_grad(net, bp.squared_error()))(params, state, jnp.ones((2, 5)), jnp.ones((2, 3)))


def test_cnn_wrong_image_shape_names_x_not_the_last_dense_layer():
    net = bp.sequential(bp.conv(4, 3), bp.relu(), bp.flatten(), bp.dense(3))
    params, state, _ = init_params(net, (8, 8, 1), rng("x-image"), jnp.float32)
    with pytest.raises(ValueError, match=re.escape(
            "sequential: expected x.shape[1:] == (8, 8, 1) (the input shape its params were initialised for), "
            "got x.shape=(2, 10, 10, 3)")):
        net.forward(params, state, jnp.ones((2, 10, 10, 3)))


def test_strided_network_names_the_range_of_input_shapes_it_fits():
    net = bp.sequential(bp.conv(4, 3, strides=2), bp.flatten(), bp.dense(3))
    params, state, _ = init_params(net, (9, 2), rng("x-range"), jnp.float32)
    with pytest.raises(ValueError, match=re.escape(
            "sequential: expected x.shape[1:] between (9, 2) and (10, 2) (the input shapes its params fit), "
            "got x.shape=(2, 12, 2)")):
        net.forward(params, state, jnp.ones((2, 12, 2)))


def test_sequential_wrong_params_still_names_the_params():
    net = bp.sequential(bp.dense(16), bp.relu(), bp.dense(3))
    params, state, _ = init_params(bp.sequential(bp.dense(8), bp.relu(), bp.dense(3)), (4,), rng("p"), jnp.float32)
    with pytest.raises(ValueError, match=re.escape("sequential: expected params[0]['b'].shape == (16,), got (8,)")):
        net.forward(params, state, jnp.ones((2, 4)))


_UNCALLED_LOSS = ("expected loss to be a bpjax.Loss, got function softmax_cross_entropy (did you forget to call "
                  "the factory, e.g. softmax_cross_entropy() rather than softmax_cross_entropy?)")


@pytest.mark.parametrize("name,make", [
    ("value_and_grad", bp.value_and_grad),
    ("forward_backward", bp._grad.forward_backward),
    ("reference_value_and_grad", bp.reference_value_and_grad),
    ("debug_nans", bp.debug_nans),
    ("per_example_grads", bp.per_example_grads),
    ("fit", lambda model, loss: bp._core.check_model_and_loss("fit", model, loss)),
])
def test_uncalled_loss_factory(name, make):
    with pytest.raises(TypeError, match=re.escape(f"{name}: {_UNCALLED_LOSS}")):
        make(bp.dense(3), bp.softmax_cross_entropy)


def test_uncalled_loss_factory_in_the_gradient_checks():
    x = jnp.ones((2, 3))
    with pytest.raises(TypeError, match=re.escape(
            "check_loss: expected a bpjax.Loss, got function huber (did you forget to call the factory, "
            "e.g. huber() rather than huber?)")):
        bp.check_loss(bp.huber, x, x)
    with pytest.raises(TypeError, match=re.escape(f"check_model: {_UNCALLED_LOSS}")):
        bp.check_model(bp.dense(3), bp.softmax_cross_entropy, {}, (), x, jnp.zeros(2, jnp.int32))


def test_uncalled_layer_factory_as_the_model():
    with pytest.raises(TypeError, match=re.escape(
            "value_and_grad: expected model to be a bpjax.Layer, got function dense (did you forget to call "
            "the factory, e.g. dense(...) rather than dense?)")):
        bp.value_and_grad(bp.dense, bp.squared_error())


@pytest.mark.parametrize("kind", ["loss", "model"])
def test_a_plain_function_is_pointed_to_make_loss_or_make_layer(kind):
    """``lambda y, t: ...`` is not an uncalled factory: the hint says what a loss (layer) is."""
    plain = lambda y, t: jnp.mean((y - t) ** 2)          # noqa: E731
    args = (bp.dense(3), plain) if kind == "loss" else (jnp.tanh, bp.squared_error())
    what = ("loss to be a bpjax.Loss, got function <lambda> (a plain function is not a loss: a bpjax.Loss "
            "carries its hand-written backward; build one with bp.make_loss(name, forward, backward)"
            if kind == "loss" else
            "model to be a bpjax.Layer, got PjitFunction tanh (a plain function is not a layer: a bpjax.Layer "
            "carries its hand-written backward; build one with bp.make_layer(name, init, forward, backward)")
    with pytest.raises(TypeError, match=re.escape(f"value_and_grad: expected {what}")):
        bp.value_and_grad(*args)


def test_a_loss_where_a_layer_goes_and_back():
    with pytest.raises(TypeError, match=re.escape("value_and_grad: expected loss to be a bpjax.Loss, got Layer")):
        bp.value_and_grad(bp.dense(3), bp.relu())


def _user_dense(backward_out):
    """A user's layer (make_layer) whose backward returns ``backward_out(dparams, dx)``."""
    inner = bp.dense(3)

    def backward(params, res, dy):
        return backward_out(*inner.backward(params, res, dy))

    return bp.make_layer("my_dense", inner.init, lambda p, s, x, key=None, train=True: inner.forward(p, s, x),
                         backward)


_WRONG_DPARAMS = ("my_dense: expected backward to return dparams with the tree structure of params, got another tree.\n"
                  "  expected: {'b': float32[3], 'w': float32[4, 3]}\n"
                  "  got:      {'w': float32[4, 3]}")


def test_wrong_dparams_structure_names_the_layer_and_both_trees():
    layer = _user_dense(lambda dparams, dx: ({"w": dparams["w"]}, dx))
    params, state, _ = init_params(layer, (4,), rng("dparams"), jnp.float32)
    x = jnp.ones((2, 4))
    _, _, res = layer.forward(params, state, x)
    with pytest.raises(TypeError, match=re.escape(_WRONG_DPARAMS)):
        layer.backward(params, res, jnp.ones((2, 3)))
    with pytest.raises(TypeError, match=re.escape(_WRONG_DPARAMS)):
        bp.check_layer(layer, (4,), dtype=jnp.float32)


def test_backward_must_return_a_pair():
    layer = _user_dense(lambda dparams, dx: dparams)
    params, state, _ = init_params(layer, (4,), rng("pair"), jnp.float32)
    _, _, res = layer.forward(params, state, jnp.ones((2, 4)))
    with pytest.raises(TypeError, match=re.escape(
            "my_dense: expected backward to return a pair (dparams, dx), got {'b': float32[3], 'w': float32[4, 3]}")):
        layer.backward(params, res, jnp.ones((2, 3)))


@pytest.mark.parametrize("labels,msg", [
    (np.array([0, 1, 10, 2]), "fit: expected labels in [0, 10), got labels in [0, 10] (1 of 4 out of range, the first at index 2)"),
    (np.array([[0, 1], [2, -1]]), "fit: expected labels in [0, 10), got labels in [-1, 2] (1 of 4 out of range, the first at index (1, 1))"),
    (np.array([0.0, 1.0]), "fit: expected integer class labels, got labels of dtype float64"),
    (np.array(3), "fit: expected labels with one label per example (shape (N,)), got labels.shape=()"),
])
def test_check_labels_on_the_host(labels, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        check_labels(labels, 10, "fit")


def test_check_labels_one_per_example():
    with pytest.raises(ValueError, match=re.escape("fit: expected one label per example (3 labels), got labels.shape=(2,)")):
        check_labels(np.array([0, 1]), 10, "fit", num_examples=3)
    check_labels(np.array([0, 9]), 10, "fit", num_examples=2)           # valid: no error


def _labels_problem():
    net = bp.sequential(bp.dense(3))
    params, state, _ = init_params(net, (4,), rng("labels"), jnp.float32)
    return net, params, state, jnp.ones((2, 4))


@pytest.mark.parametrize("labels,seen", [([0, 3], "[0, 3]"), ([-1, 2], "[-1, 2]")])
def test_out_of_range_labels_under_jit_in_check_mode(labels, seen):
    net, params, state, x = _labels_problem()
    msg = ("bpjax.check_finite: labels out of range in the forward of softmax_cross_entropy: "
           f"expected labels in [0, 3), got labels in {seen}")
    with pytest.raises(ValueError, match=re.escape(msg)):
        bp.debug_nans(net, bp.softmax_cross_entropy())(params, state, x, jnp.array(labels))
    step = jax.jit(lambda p, x, y: bp.value_and_grad(net, bp.softmax_cross_entropy())(p, state, x, y))
    with pytest.raises(ValueError, match=re.escape(msg)):               # a user's own jitted step
        bp.check_finite(step)(params, x, jnp.array(labels))
    (value, _), _ = bp.debug_nans(net, bp.softmax_cross_entropy())(params, state, x, jnp.array([0, 2]))
    assert jnp.isfinite(value)


def _plain_dense():
    """A plain bp.Layer of module-level functions (not built by a factory)."""
    inner = bp.dense(3)

    def _init(key, in_shape):
        return inner.init(key, in_shape)

    def _forward(params, state, x, *, key=None, train=True):
        return inner.forward(params, state, x)

    def _backward(params, res, dy):
        return inner.backward(params, res, dy)

    for f in (_init, _forward, _backward):
        f.__qualname__ = f.__name__
    return bp.Layer(_init, _forward, _backward)


def test_gradcheck_title_of_a_plain_layer_and_the_fd_precision_used():
    with warnings.catch_warnings(), jax.enable_x64(False):
        warnings.simplefilter("error", UserWarning)      # no float64-truncation warning with x64 off
        report = bp.check_layer(_plain_dense(), (4,), dtype=jnp.float32)
    assert report.title == "check_layer(Layer)", report.title
    assert report.fd_dtype == "float64"
    assert "  fd  = central differences in float64, 3 random directions per leaf" in str(report)
    with pytest.warns(UserWarning, match="finite differences in float32 are unreliable"):
        report = bp.check_layer(bp.dense(3), (4,), dtype=jnp.float32, fd_dtype=jnp.float32, methods=("fd",))
    assert report.title == "check_layer(dense)"
    assert "  fd  = central differences in float32, 3 random directions per leaf" in str(report)


def test_check_model_says_why_it_ran_below_float64_with_x64_on():
    net = bp.sequential(bp.dense(3))
    with jax.enable_x64(True):
        params, state, _ = net.init(jax.random.PRNGKey(0), (4,))          # init makes float32 params
        report = bp.check_model(net, bp.squared_error(), params, state, jnp.ones((2, 4)), jnp.ones((2, 3)),
                                methods=("vjp",))
    assert report.details.startswith(
        "float32 (x64 is on, but params are float32: cast with bp.cast_floating(tree, jnp.float64) to check "
        "in float64) · x float64[2, 4]"), report.details
    assert report.title == "check_model(sequential, squared_error)"


@pytest.mark.parametrize("dtype", ["int8", "bool", "complex64", "floaty"])
def test_gradcheck_cli_rejects_a_dtype_it_cannot_check(dtype, capsys):
    from bpjax import cli
    assert cli.main(["gradcheck", "dense", "--dtype", dtype]) == 2
    assert capsys.readouterr().err.strip() == (
        f"bpjax gradcheck: expected --dtype float64, float32, float16 or bfloat16, got {dtype!r}")


# ----------------------------------------------------------------------------- a custom backward's shapes


def _scale_layer(bad: str):
    """y = a ⊙ x, whose backward returns dparams['a'] per example (``bad="dparams"``: (N, D) for
    params of shape (D,)) or dx summed over features (``bad="dx"``: (N, 1) for x of shape (N, D))."""
    def init(key, in_shape):
        return {"a": jnp.linspace(0.5, 1.5, in_shape[-1])}, (), in_shape

    def forward(params, state, x, *, key=None, train=True):
        return x * params["a"], state, (x, params["a"])

    def backward(params, res, dy):
        x, a = res
        da = dy * x if bad == "dparams" else jnp.sum(dy * x, axis=0)
        dx = jnp.sum(dy * a, axis=1, keepdims=True) if bad == "dx" else dy * a
        return {"a": da}, dx

    return bp.make_layer("scale", init, forward, backward)


_BAD_BACKWARD = {
    "dparams": (ValueError, "scale: expected backward's dparams['a'].shape == (4,), got (6, 4)"),
    "dx": (ValueError, "sequential[1] (scale): expected backward to return dx.shape == (6, 4) "
                       "(the shape of its input x), got (6, 1)"),
}


@pytest.mark.parametrize("bad", sorted(_BAD_BACKWARD))
def test_a_wrong_shaped_gradient_is_named_where_it_happens_under_jit(bad):
    """The README promises dparams of params' shapes: a per-example (N, D) gradient for params
    (D,) was accepted and broadcast the params by the next optimizer step; a wrong dx ended in an
    XLA error of the layer below."""
    net = bp.sequential(bp.dense(4), _scale_layer(bad), bp.dense(2))
    params, state, _ = net.init(jax.random.PRNGKey(0), (3,))
    f = jax.jit(bp.value_and_grad(net, bp.softmax_cross_entropy()))
    error, message = _BAD_BACKWARD[bad]
    with pytest.raises(error, match=re.escape(message)):
        f(params, state, jnp.ones((6, 3)), jnp.zeros(6, jnp.int32))


def test_a_wrong_dx_dtype_is_named():
    def init(key, in_shape):
        return (), (), in_shape

    half = bp.make_layer("half", init, lambda p, s, x, *, key=None, train=True: (x / 2, s, ()),
                         lambda p, res, dy: ((), (dy / 2).astype(jnp.float16)))
    net = bp.sequential(bp.dense(3), half)
    params, state, _ = net.init(jax.random.PRNGKey(0), (2,))
    _, _, res = net.forward(params, state, jnp.ones((4, 2), jnp.float32))
    with pytest.raises(TypeError, match=re.escape("sequential[1] (half): expected backward to return dx of dtype "
                                                  "float32 (the dtype of its input x), got float16")):
        net.backward(params, res, jnp.ones((4, 3), jnp.float32))


@pytest.mark.parametrize("wrap", ["residual", "parallel"])
def test_the_other_combinators_check_dx(wrap):
    """residual's dy + dx_f would broadcast a (N, 1) dx silently; parallel sums the branches' dx."""
    layer = _scale_layer("dx")
    net = bp.residual(layer) if wrap == "residual" else bp.sequential(bp.parallel(layer, bp.dense(4)), bp.add())
    params, state, _ = net.init(jax.random.PRNGKey(0), (4,))
    _, _, res = net.forward(params, state, jnp.ones((6, 4)))
    where = "residual (scale)" if wrap == "residual" else "parallel[0] (scale)"
    with pytest.raises(ValueError, match=re.escape(f"{where}: expected backward to return dx.shape == (6, 4)")):
        net.backward(params, res, jnp.ones((6, 4)))


def test_check_layer_reports_a_wrong_shaped_gradient_and_names_one_inside():
    """The layer checked gets a failed row (its other leaves still compared); a layer inside it is
    named by the error of its combinator."""
    report = bp.check_layer(_scale_layer("dparams"), (4,), batch=3)
    assert not report.ok and "shape (3, 4), expected (4,)" in str(report)
    with pytest.raises(ValueError, match=re.escape("sequential[1] (scale): expected backward to return dx.shape")):
        bp.check_layer(bp.sequential(bp.dense(4), _scale_layer("dx")), (3,), batch=3)
