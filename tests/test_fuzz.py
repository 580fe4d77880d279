"""Property-based tests: hypothesis draws shapes, values and hyperparameters for every layer and
loss (the recurrent and attention layers with fewer examples: each compiles a scan). Each
example ends one of two ways:

* a bpjax error: ``ValueError`` or ``TypeError`` whose message starts with the name of a layer
  or loss (``"dense: expected ..."``), raised before any compute; or
* outputs and hand-written gradients that are finite and equal to ``jax.vjp`` of the same
  forward, in float64.

Never a NaN or an Inf from finite inputs, never a raw JAX or XLA error. The data is drawn on
the host from a seed hypothesis draws, and each valid example is one ``jit`` (forward, backward
and the reference together): compiles are the cost here. ``FUZZ_EXAMPLES=200`` runs more.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import bpjax as bp

N = int(os.environ.get("FUZZ_EXAMPLES", "0"))
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
RTOL = 1e-8
_KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)


def fuzz(examples):
    return settings(max_examples=N or examples, **SETTINGS)


# ----------------------------------------------------------------------------- the property


def _bpjax_error(e, names):
    """A bpjax error: ValueError/TypeError whose message starts with one of ``names``."""
    assert isinstance(e, (ValueError, TypeError)) and str(e).startswith(tuple(f"{n}:" for n in names)), (
        f"not a bpjax error from {names}: {type(e).__name__}: {e}")


def _assert_close(got, want, what, floor=0.0):
    """Close to ``want`` relative to its largest entry, or to ``floor`` (the size of a gradient
    that is ~0 only by cancellation: layer_norm's dx over 2 features is rounding noise)."""
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert np.all(np.isfinite(g)), f"{what}{jax.tree_util.keystr(path)}: non-finite {g}"
        scale = float(np.max(np.abs(w))) if w.size else 0.0
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=RTOL * max(scale, floor, 1e-300),
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


def _host_tree(tree, gen, state=False):
    def fill(a):
        if not np.issubdtype(a.dtype, np.floating):
            return np.zeros(a.shape, a.dtype)
        if state:
            return 0.5 + gen.uniform(size=a.shape)
        return gen.standard_normal(a.shape) / np.sqrt(max(a.shape[0], 1) if len(a.shape) > 1 else 1)
    return jax.tree_util.tree_map(fill, tree)


def check_layer(make, names, x_shape, seed, *, scale=1.0, x_dtype=np.float64, int_high=None,
                train=True, with_key=False, params_shape=None, constant_rows=False, in_range=False):
    """The property for one layer. ``make`` builds it (may raise); params are random host values
    for ``x_shape[1:]`` (or ``params_shape``); x is N(0, scale²) (integers below ``int_high``)."""
    gen = np.random.default_rng(seed)
    try:
        layer = make()
        in_shape = tuple(x_shape[1:]) if params_shape is None else params_shape
        p, s = jax.eval_shape(lambda k: layer.init(k, in_shape)[:2], _KEY)
        params, state = _host_tree(p, gen), _host_tree(s, gen, state=True)
        if int_high is not None:
            lo, hi = (0, int_high) if in_range and gen.uniform() < 0.75 else (-2, int_high + 2)
            x = gen.integers(lo, hi, x_shape) if hi > lo else np.zeros(x_shape, np.int64)
        else:
            x = (scale * gen.standard_normal(x_shape)).astype(x_dtype)
            if constant_rows and x.ndim:
                x = np.broadcast_to(x[..., :1], x.shape).copy()
        key = jax.random.PRNGKey(seed % 1000) if with_key else None
        fwd = lambda p, x: layer.forward(p, state, x, key=key, train=train)   # noqa: E731
        y_shape = jax.eval_shape(lambda p, x: fwd(p, x)[0], params, x)         # the checks, no compute
    except (ValueError, TypeError) as e:
        _bpjax_error(e, names)
        event("bpjax error" + (": " + str(e)[:70] if os.environ.get("FUZZ_VERBOSE") else ""))
        return "error"
    dy = jax.tree_util.tree_map(lambda a: gen.standard_normal(a.shape).astype(a.dtype), y_shape)
    int_x = not np.issubdtype(np.asarray(x).dtype, np.floating)

    @jax.jit
    def run(params, x, dy):
        y, _, res = fwd(params, x)
        dparams, dx = layer.backward(params, res, dy)
        if int_x:
            _, vjp = jax.vjp(lambda p: fwd(p, x)[0], params)
            return y, dparams, dx, (vjp(dy)[0], None)
        _, vjp = jax.vjp(lambda p, x: fwd(p, x)[0], params, x)
        return y, dparams, dx, vjp(dy)

    y, dparams, dx, (ref_dparams, ref_dx) = run(params, x, dy)
    for leaf in jax.tree_util.tree_leaves(y):
        assert np.all(np.isfinite(leaf)), f"non-finite output {leaf}"
    floor = max((float(np.max(np.abs(a))) for a in jax.tree_util.tree_leaves(dy) if a.size), default=0.0)
    _assert_close(dparams, ref_dparams, "dparams", floor)
    if not int_x:
        _assert_close(dx, ref_dx, "dx", floor / max(scale, 1.0))
    event("gradients checked")
    return "ok"


# ----------------------------------------------------------------------------- strategies

def mostly(valid, *invalid):
    """``valid`` about seven times in eight, else one of the ``invalid`` values (several
    parameters compound: about half of the examples end in a bpjax error)."""
    if not invalid:
        return valid
    return st.integers(0, 7).flatmap(lambda i: valid if i < 7 else st.sampled_from(invalid))


dims = mostly(st.integers(1, 4), 0)
scales = st.sampled_from([1e-3, 1.0, 30.0, 1e3])
seeds = st.integers(0, 2**31 - 1)
reals = mostly(st.floats(0.01, 0.9), float("nan"), float("inf"), -1.0, 0.0, 1.0, "0.5")
float_dtypes = mostly(st.just(np.float64), np.int32, np.bool_)


def shapes(min_rank=0, max_rank=4, dim=dims):
    return st.lists(dim, min_size=min_rank, max_size=max_rank).map(tuple)


def batched(min_rank=0, max_rank=3):
    """Shapes with a batch axis of 1 to 3 first (sometimes no batch axis at all)."""
    with_batch = st.tuples(st.integers(1, 3)).flatmap(lambda b: shapes(min_rank, max_rank).map(lambda s: b + s))
    return mostly(with_batch, (), (3,), (0, 2))


ELEMENTWISE = {
    "identity": st.just(bp.identity), "relu": st.just(bp.relu), "sigmoid": st.just(bp.sigmoid),
    "tanh": st.just(bp.tanh), "softplus": st.just(bp.softplus), "silu": st.just(bp.silu),
    "softmax": st.just(bp.softmax), "log_softmax": st.just(bp.log_softmax), "flatten": st.just(bp.flatten),
    "gelu": st.booleans().map(lambda a: lambda: bp.gelu(approximate=a)),
    "leaky_relu": reals.map(lambda s: lambda: bp.leaky_relu(s)),
    "elu": reals.map(lambda a: lambda: bp.elu(a)),
    "dropout": reals.map(lambda r: lambda: bp.dropout(r)),
    "reshape": mostly(st.sampled_from([(-1,), (-1, 1), (1, -1)]), (0,), (-1, -1), (5, 7), "ab").map(
        lambda s: lambda: bp.reshape(s)),
}


@fuzz(25)
@given(name=st.sampled_from(sorted(ELEMENTWISE)), data=st.data(), x_shape=batched(0, 3), scale=scales,
       seed=seeds, train=st.booleans(), with_key=mostly(st.just(True), False), x_dtype=float_dtypes)
def test_fuzz_elementwise_and_reshaping_layers(name, data, x_shape, scale, seed, train, with_key, x_dtype):
    make = data.draw(ELEMENTWISE[name])
    check_layer(make, [name], x_shape, seed, scale=scale, x_dtype=x_dtype, train=train, with_key=with_key)


@fuzz(15)
@given(out_dim=mostly(st.integers(1, 4), 0, -1, 2.5), use_bias=st.booleans(), x_shape=batched(1, 3), seed=seeds,
       scale=scales, other_in=mostly(st.none(), 2, 7), x_dtype=float_dtypes)
def test_fuzz_dense(out_dim, use_bias, x_shape, seed, scale, other_in, x_dtype):
    params_shape = None if other_in is None or len(x_shape) < 2 else (*x_shape[1:-1], other_in)
    check_layer(lambda: bp.dense(out_dim, use_bias=use_bias), ["dense"], x_shape, seed, scale=scale,
                x_dtype=x_dtype, params_shape=params_shape)


paddings = mostly(st.one_of(st.sampled_from(["SAME", "VALID", "same"]), st.integers(0, 2),
                            st.tuples(st.integers(0, 2), st.integers(0, 2)).map(lambda p: (p,))),
                  "FULL", -1, ((1,),), ((1, 1), (0, 0)))
ints_or_tuples = mostly(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3))), 0, (1, 0), (2, 2), True)


@fuzz(25)
@given(transpose=st.booleans(), out=mostly(st.sampled_from([2, 4]), 0, 3), kernel=ints_or_tuples,
       strides=ints_or_tuples, dilation=mostly(st.just(1), 2, (1, 2)), padding=paddings,
       groups=mostly(st.sampled_from([1, 2]), 0), spatial=mostly(st.tuples(st.integers(3, 7)), (0,), (2, 2), (1,)),
       c_in=mostly(st.sampled_from([2, 4]), 0, 3), batch=st.integers(1, 2), seed=seeds)
def test_fuzz_conv(transpose, out, kernel, strides, dilation, padding, groups, spatial, c_in, batch, seed):
    name = "conv_transpose" if transpose else "conv"
    make = lambda: getattr(bp, name)(out, kernel, strides=strides, padding=padding,  # noqa: E731
                                     dilation=dilation, groups=groups)
    check_layer(make, [name], (batch, *spatial, c_in), seed)


@fuzz(20)
@given(kind=st.sampled_from(["max_pool", "avg_pool", "global_avg_pool", "global_max_pool"]),
       window=ints_or_tuples, strides=st.one_of(st.none(), ints_or_tuples), padding=paddings,
       x_shape=st.tuples(st.integers(1, 2)).flatmap(lambda b: shapes(2, 3, mostly(st.integers(1, 5), 0)).map(
           lambda s: b + s)),
       seed=seeds, scale=scales)
def test_fuzz_pools(kind, window, strides, padding, x_shape, seed, scale):
    f = getattr(bp, kind)
    make = (lambda: f()) if kind.startswith("global") else (lambda: f(window, strides, padding))
    check_layer(make, [kind], x_shape, seed, scale=scale)


epsilons = mostly(st.sampled_from([1e-5, 1e-12, 1.0]), 0.0, -1e-6, float("inf"))
NORMS = {
    "batch_norm": st.tuples(reals, epsilons).map(lambda a: lambda: bp.batch_norm(momentum=a[0], eps=a[1])),
    "layer_norm": epsilons.map(lambda e: lambda: bp.layer_norm(e)),
    "rms_norm": epsilons.map(lambda e: lambda: bp.rms_norm(e)),
    "group_norm": st.tuples(mostly(st.sampled_from([1, 2]), 0, 3), epsilons).map(
        lambda a: lambda: bp.group_norm(a[0], a[1])),
}


@fuzz(25)
@given(name=st.sampled_from(sorted(NORMS)), data=st.data(), x_shape=batched(0, 3), seed=seeds, scale=scales,
       train=st.booleans(), constant_rows=st.booleans())
def test_fuzz_norms(name, data, x_shape, seed, scale, train, constant_rows):
    check_layer(data.draw(NORMS[name]), [name], x_shape, seed, scale=scale, train=train,
                constant_rows=constant_rows)


@fuzz(20)
@given(vocab=mostly(st.integers(1, 6), 0), dim=mostly(st.integers(1, 3), -1), x_shape=batched(0, 2), seed=seeds,
       float_ids=mostly(st.just(False), True))
def test_fuzz_embedding(vocab, dim, x_shape, seed, float_ids):
    check_layer(lambda: bp.embedding(vocab, dim), ["embedding"], x_shape, seed,
                int_high=None if float_ids else max(vocab, 0), in_range=True)


BLOCKS = [lambda: bp.dense(3), bp.relu, bp.tanh, bp.layer_norm, lambda: bp.dense(2), bp.log_softmax]


@fuzz(12)
@given(kind=st.sampled_from(["sequential", "residual", "parallel-concat", "parallel-add"]),
       picks=st.lists(st.integers(0, len(BLOCKS) - 1), min_size=1, max_size=3), axis=mostly(st.just(-1), 0, 1, 3),
       x_shape=batched(1, 2), seed=seeds, scale=scales)
def test_fuzz_combinators(kind, picks, axis, x_shape, seed, scale):
    def make():
        inner = [BLOCKS[i]() for i in picks]
        if kind == "sequential":
            return bp.sequential(*inner)
        if kind == "residual":
            return bp.residual(bp.sequential(*inner))
        return bp.sequential(bp.parallel(*inner), bp.concat(axis) if kind == "parallel-concat" else bp.add())
    names = ["sequential", "residual", "parallel", "concat", "add", "dense", "relu", "tanh", "layer_norm",
             "log_softmax"]
    check_layer(make, names, x_shape, seed, scale=scale)


# ----------------------------------------------------------------------------- losses

LOSSES = {
    "squared_error": st.just(bp.squared_error), "mean_squared_error": st.just(bp.mean_squared_error),
    "huber": reals.map(lambda d: lambda: bp.huber(d)),
    "softmax_cross_entropy": reals.map(lambda e: lambda: bp.softmax_cross_entropy(e)),
    "sigmoid_binary_cross_entropy": st.just(bp.sigmoid_binary_cross_entropy),
}


@fuzz(25)
@given(name=st.sampled_from(sorted(LOSSES)), data=st.data(), pred_shape=mostly(shapes(1, 3), (), (0, 3), (2, 0)),
       target_kind=mostly(st.sampled_from(["same", "labels", "unit", "probs"]), "other-shape", "int", "bool",
                          "labels-out-of-range"),
       seed=seeds, scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]))
def test_fuzz_losses(name, data, pred_shape, target_kind, seed, scale):
    gen = np.random.default_rng(seed)
    pred = scale * gen.standard_normal(pred_shape)
    k = pred_shape[-1] if pred_shape else 1
    target = {
        "same": lambda: gen.standard_normal(pred_shape),
        "unit": lambda: gen.uniform(size=pred_shape),
        "probs": lambda: (lambda u: u / u.sum(-1, keepdims=True))(gen.uniform(0.01, 1, pred_shape)),
        "labels": lambda: gen.integers(0, k, pred_shape[:-1]) if k else np.zeros(pred_shape[:-1], int),
        "labels-out-of-range": lambda: gen.integers(-1, k + 1, pred_shape[:-1]),
        "other-shape": lambda: gen.standard_normal((*pred_shape, 2)),
        "int": lambda: gen.integers(0, 2, pred_shape),
        "bool": lambda: gen.integers(0, 2, pred_shape).astype(bool),
    }[target_kind]()
    dvalue = 0.7
    try:
        loss = data.draw(LOSSES[name])()
        jax.eval_shape(lambda p: loss.forward(p, target)[0], pred)             # the checks, no compute
    except (ValueError, TypeError) as e:
        _bpjax_error(e, [name])
        event("bpjax error" + (": " + str(e)[:70] if os.environ.get("FUZZ_VERBOSE") else ""))
        return

    @jax.jit
    def run(pred):
        value, res = loss.forward(pred, target)
        ref, vjp = jax.vjp(lambda p: loss.forward(p, target)[0], pred)
        return value, loss.backward(res, dvalue), ref, vjp(jnp.asarray(dvalue, pred.dtype))[0]

    value, dpred, ref, ref_dpred = run(pred)
    assert np.isfinite(value), value
    _assert_close(value, ref, "value")
    if name == "sigmoid_binary_cross_entropy":             # (no logit exactly 0 here: N(0, 1)·scale)
        assert not np.any(pred == 0)
    _assert_close(dpred, ref_dpred, "dpred")
    event("gradients checked")


RECURRENT = {
    "rnn": lambda h, seq: bp.rnn(h, return_sequences=seq),
    "gru": lambda h, seq: bp.gru(h, return_sequences=seq),
    "lstm": lambda h, seq: bp.lstm(h, return_sequences=seq),
    "bidirectional": lambda h, seq: bp.bidirectional(bp.gru(h, return_sequences=seq)),
}


@given(name=st.sampled_from(sorted(RECURRENT)), hidden=mostly(st.integers(1, 3), 0, -1),
       seq=st.booleans(), x_shape=mostly(st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 3)),
                                         (2, 3), (2, 0, 2)), seed=seeds, scale=scales)
@fuzz(8)
def test_fuzz_recurrent(name, hidden, seq, x_shape, seed, scale):
    names = [name, "gru", "bidirectional"]
    check_layer(lambda: RECURRENT[name](hidden, seq), names, x_shape, seed, scale=min(scale, 30.0))


@given(kind=st.sampled_from(["multi_head_attention", "transformer_block"]),
       heads=mostly(st.sampled_from([1, 2]), 0, 3), causal=st.booleans(), lean=st.booleans(),
       x_shape=mostly(st.tuples(st.integers(1, 2), st.integers(1, 5), st.sampled_from([2, 4])),
                      (2, 4), (1, 3, 0)), seed=seeds)
@fuzz(8)
def test_fuzz_attention(kind, heads, causal, lean, x_shape, seed):
    def make():
        if kind == "multi_head_attention":
            return bp.multi_head_attention(heads, causal=causal, lean=lean, block_size=2)
        return bp.transformer_block(heads, causal=causal, lean=lean, block_size=2)
    check_layer(make, [kind, "multi_head_attention", "layer_norm", "dense"], x_shape, seed)


@given(vocab=mostly(st.integers(2, 5), 0), heads=mostly(st.just(2), 0, 3),
       x_shape=mostly(st.tuples(st.integers(1, 2), st.integers(1, 4)), (3,), (2, 6)), seed=seeds)
@fuzz(6)
def test_fuzz_gpt(vocab, heads, x_shape, seed):
    make = lambda: bp.gpt(vocab, dim=4, num_heads=heads, num_layers=1, max_len=4)   # noqa: E731
    check_layer(make, ["gpt", "embedding", "multi_head_attention", "transformer_block"], x_shape, seed,
                int_high=vocab, in_range=True)


def test_the_property_rejects_a_raw_error():
    """The property itself: a raw JAX error does not pass as a bpjax error."""
    with pytest.raises(AssertionError, match="not a bpjax error"):
        _bpjax_error(ValueError("zero-size array to reduction operation max which has no identity"), ["dense"])
