"""Every bad input to every exported layer and loss (recurrent and attention layers aside: see
their own tests) raises before any compute, with one message naming the layer, what it
expected and what it got. One case per message; the exact text is asserted.

The inputs are NumPy arrays and the params are zeros of the shapes ``init`` gives, computed
abstractly: the errors come before any compute, so the cases compile nothing.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp

F32, I32 = np.float32, np.int32
X = np.ones((4, 5), F32)
IMG = np.ones((2, 6, 6, 3), F32)
SEQ = np.ones((2, 8, 3), F32)
_KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)


def params_for(layer, in_shape):
    """Params and state of ``layer`` for ``in_shape``: zeros (ones for state), made on the host."""
    p, s = jax.eval_shape(lambda k: layer.init(k, in_shape)[:2], _KEY)
    return (jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), p),
            jax.tree_util.tree_map(lambda a: np.ones(a.shape, a.dtype), s))


def fwd(layer, in_shape, x, **kwargs):
    """``layer.forward`` with params made for ``in_shape``, on ``x``."""
    params, state = params_for(layer, in_shape)
    return layer.forward(params, state, x, **kwargs)


def with_params(layer, in_shape, x, edit, state_edit=None):
    """``layer.forward`` with params made for ``in_shape`` and then changed by ``edit``."""
    params, state = params_for(layer, in_shape)
    return layer.forward(edit(params), state if state_edit is None else state_edit(state), x)


def init(layer, in_shape):
    return layer.init(jax.random.PRNGKey(0), in_shape)


def floating(name, dtype, arg="x"):
    return (f"{name}: expected a floating-point {arg}, got dtype {dtype} "
            f"(cast it first, e.g. {arg}.astype(jnp.float32))")


def tree_msg(name, expected, got, what="params"):
    return f"{name}: the {what} tree does not fit the model.\n  expected: {expected}\n  got:      {got}"


ACTIVATIONS = ["identity", "relu", "leaky_relu", "elu", "sigmoid", "tanh", "softplus", "gelu", "silu",
               "softmax", "log_softmax", "dropout", "flatten"]
_make = {"dropout": lambda: bp.dropout(0.0)}


def _act(name):
    return _make.get(name, getattr(bp, name, None))()


# (id, thunk, exception, exact message)
CASES = []


def case(id, thunk, exc, msg):
    CASES.append(pytest.param(thunk, exc, msg, id=id))


# ----------------------------------------------------------------------------- elementwise layers

for _n in ACTIVATIONS:
    case(f"{_n}-int", lambda n=_n: fwd(_act(n), (5,), X.astype(I32)), TypeError, floating(_n, "int32"))
    case(f"{_n}-bool", lambda n=_n: fwd(_act(n), (5,), X > 0), TypeError, floating(_n, "bool"))
    case(f"{_n}-params", lambda n=_n: _act(n).forward({"w": np.ones(2, F32)}, (), X), TypeError,
         tree_msg(_n, "()", "{'w': float32[2]}"))
for _n in ACTIVATIONS[:9] + ["dropout", "flatten"]:
    case(f"{_n}-scalar", lambda n=_n: fwd(_act(n), (), np.ones((), F32)), ValueError,
         f"{_n}: expected x.ndim >= 1, got x.shape=()")
    case(f"{_n}-tuple", lambda n=_n: fwd(_act(n), (5,), (X, X)), TypeError,
         f"{_n}: expected x to be an array, got a tuple of 2 arrays (only the joins, concat() and add(), "
         "take one array per branch)")
for _n in ("softmax", "log_softmax"):
    case(f"{_n}-rank", lambda n=_n: fwd(_act(n), (5,), X[0]), ValueError,
         f"{_n}: expected x.ndim >= 2 (batch, ..., classes), got x.shape=(5,)")
    case(f"{_n}-no-classes", lambda n=_n: fwd(_act(n), (0,), np.ones((4, 0), F32)), ValueError,
         f"{_n}: expected x.shape[-1] >= 1 class, got x.shape=(4, 0)")
    case(f"{_n}-init-rank", lambda n=_n: init(_act(n), ()), ValueError,
         f"{_n}: expected in_shape with at least 1 axis (x: (batch, ..., classes)), got in_shape=()")
case("leaky_relu-slope-nan", lambda: bp.leaky_relu(float("nan")), ValueError,
     "leaky_relu: expected a finite negative_slope, got nan")
case("leaky_relu-slope-str", lambda: bp.leaky_relu("0.1"), TypeError,
     "leaky_relu: expected negative_slope to be a real number, got '0.1'")
case("elu-alpha-inf", lambda: bp.elu(float("inf")), ValueError, "elu: expected a finite alpha, got inf")
case("elu-alpha-none", lambda: bp.elu(None), TypeError, "elu: expected alpha to be a real number, got None")

# ----------------------------------------------------------------------------- dense

_DENSE_TREE = "{'b': float32[3], 'w': float32[5, 3]}"
case("dense-out_dim-0", lambda: bp.dense(0), ValueError, "dense: expected out_dim to be an integer > 0, got 0")
case("dense-out_dim-neg", lambda: bp.dense(-3), ValueError, "dense: expected out_dim to be an integer > 0, got -3")
case("dense-out_dim-float", lambda: bp.dense(2.5), ValueError,
     "dense: expected out_dim to be an integer > 0, got 2.5")
case("dense-initializer", lambda: bp.dense(3, w_init="kaiming"), ValueError,
     "dense: expected an initializer, one of ['glorot_normal', 'glorot_uniform', 'he_normal', 'he_uniform', "
     "'lecun_normal', 'lecun_uniform', 'ones', 'zeros'] or a callable (key, shape, dtype) -> array, got 'kaiming'")
case("dense-rank", lambda: fwd(bp.dense(3), (5,), X[0]), ValueError,
     "dense: expected x.ndim >= 2 (batch, ..., features), got x.shape=(5,)")
case("dense-features", lambda: fwd(bp.dense(3), (5,), np.ones((4, 6), F32)), ValueError,
     "dense: expected x.shape[-1] == 5, got x.shape=(4, 6)")
case("dense-features-jit", lambda: jax.jit(lambda x: fwd(bp.dense(3), (5,), x)[0])(np.ones((2, 7), F32)),
     ValueError, "dense: expected x.shape[-1] == 5, got x.shape=(2, 7)")
case("dense-int", lambda: fwd(bp.dense(3), (5,), X.astype(I32)), TypeError, floating("dense", "int32"))
case("dense-bool", lambda: fwd(bp.dense(3), (5,), X > 0), TypeError, floating("dense", "bool"))
case("dense-string", lambda: fwd(bp.dense(3), (5,), "x"), TypeError, "dense: expected x to be an array, got str")
case("dense-tuple", lambda: fwd(bp.dense(3), (5,), (X, X)), TypeError,
     "dense: expected x to be an array, got a tuple of 2 arrays (only the joins, concat() and add(), "
     "take one array per branch)")
case("dense-params-missing", lambda: with_params(bp.dense(3), (5,), X, lambda p: {"w": p["w"]}), TypeError,
     tree_msg("dense", _DENSE_TREE, "{'w': float32[5, 3]}"))
case("dense-params-extra", lambda: with_params(bp.dense(3), (5,), X, lambda p: dict(p, g=np.ones(3, F32))),
     TypeError, tree_msg("dense", _DENSE_TREE, "{'b': float32[3], 'g': float32[3], 'w': float32[5, 3]}"))
case("dense-params-shape", lambda: with_params(bp.dense(3), (5,), X, lambda p: dict(p, b=np.ones(4, F32))),
     ValueError, "dense: expected params['b'].shape == (3,), got (4,)")
case("dense-params-not-array", lambda: with_params(bp.dense(3), (5,), X, lambda p: dict(p, b=0.5)),
     ValueError, "dense: expected params['b'].shape == (3,), got float")
case("dense-params-int", lambda: with_params(bp.dense(3), (5,), X, lambda p: dict(p, w=p["w"].astype(I32))),
     TypeError, "dense: expected a floating-point params['w'], got dtype int32")
case("dense-init-rank", lambda: init(bp.dense(3), ()), ValueError,
     "dense: expected in_shape with at least 1 axis (x: (batch, ..., features)), got in_shape=()")
case("dense-init-negative", lambda: init(bp.dense(3), (-3,)), ValueError,
     "dense: expected in_shape to hold sizes >= 0, got in_shape=(-3,)")
case("dense-init-float", lambda: init(bp.dense(3), (2.5,)), TypeError,
     "dense: expected in_shape to be a tuple of integers (one example's shape, without the batch axis), "
     "got in_shape=(2.5,)")

# ----------------------------------------------------------------------------- combinators

_NET = bp.sequential(bp.dense(4), bp.relu(), bp.dense(2))
case("sequential-empty", lambda: bp.sequential(), ValueError, "sequential: expected at least one layer, got none")
case("sequential-not-a-layer", lambda: bp.sequential(bp.dense(2), bp.relu), TypeError,
     "sequential: expected a bpjax.Layer at position 1, got function (did you forget to call the factory, "
     "e.g. relu() rather than relu?)")
case("sequential-other-model",
     lambda: _NET.forward(params_for(bp.sequential(bp.dense(4), bp.dense(2)), (5,))[0], (), X), TypeError,
     tree_msg("sequential", "({'b': float32[4], 'w': float32[5, 4]}, (), {'b': float32[2], 'w': float32[4, 2]})",
              "({'b': float32[4], 'w': float32[5, 4]}, {'b': float32[2], 'w': float32[4, 2]})"))
case("sequential-first-layer-checks-x", lambda: fwd(_NET, (5,), X.astype(I32)), TypeError,
     floating("dense", "int32"))
case("residual-not-a-layer", lambda: bp.residual(bp.relu), TypeError,
     "residual: expected a bpjax.Layer, got function")
case("residual-shape-change", lambda: init(bp.residual(bp.dense(3)), (5,)), ValueError,
     "residual: expected the inner layer to keep the shape (5,), got out_shape=(3,)")
case("residual-shape-change-forward", lambda: bp.residual(bp.dense(3)).forward({}, (), X), ValueError,
     "residual: expected the inner layer to keep the shape (5,), got out_shape=(3,)")
case("parallel-empty", lambda: bp.parallel(), ValueError, "parallel: expected at least one layer, got none")
case("parallel-not-a-layer", lambda: bp.parallel(bp.dense(2), bp.relu), TypeError,
     "parallel: expected a bpjax.Layer at position 1, got function (did you forget to call the factory, "
     "e.g. relu() rather than relu?)")
case("concat-axis-0", lambda: bp.concat(axis=0), ValueError,
     "concat: expected axis to be an integer naming a non-batch axis (not 0), got axis=0")
case("concat-axis-out-of-range", lambda: fwd(bp.concat(axis=3), ((5,), (5,)), (X, X)), ValueError,
     "concat: expected axis to name a non-batch axis of inputs of rank 2, got axis=3")
case("concat-array", lambda: bp.concat().forward((), (), X), TypeError,
     "concat: expected x to be a non-empty tuple of arrays (one per branch), got an array of shape (4, 5)")
case("concat-empty-tuple", lambda: bp.concat().forward((), (), ()), TypeError,
     "concat: expected x to be a non-empty tuple of arrays (one per branch), got tuple ()")
case("concat-int", lambda: bp.concat().forward((), (), (X, X.astype(I32))), TypeError,
     floating("concat", "int32", "x[1]"))
case("concat-rank", lambda: bp.concat().forward((), (), (X, X[0])), ValueError,
     "concat: expected x[1].ndim >= 2 (batch, ...), got x[1].shape=(5,)")
case("concat-batch", lambda: bp.concat().forward((), (), (X, X[:1])), ValueError,
     "concat: expected every x[i] to have the same batch size, got shapes [(4, 5), (1, 5)]")
case("concat-ranks", lambda: bp.concat().forward((), (), (X, X[:, :, None])), ValueError,
     "concat: expected inputs of one rank, got in_shape=((5,), (5, 1))")
case("concat-other-axes", lambda: bp.concat(axis=1).forward((), (), (SEQ, SEQ[:, :, :2])), ValueError,
     "concat: expected the inputs to agree on every axis but axis=1, got in_shape=((8, 3), (8, 2))")
case("concat-init", lambda: init(bp.concat(), (3, 4)), TypeError,
     "concat: expected in_shape to be a non-empty tuple of shapes, one per input, got in_shape=(3, 4)")
case("add-shapes", lambda: bp.add().forward((), (), (X, X[:, :3])), ValueError,
     "add: expected inputs of one shape, got in_shape=((5,), (3,))")
case("add-array", lambda: bp.add().forward((), (), X), TypeError,
     "add: expected x to be a non-empty tuple of arrays (one per branch), got an array of shape (4, 5)")
case("add-bool", lambda: bp.add().forward((), (), (X, X > 0)), TypeError, floating("add", "bool", "x[1]"))

# ----------------------------------------------------------------------------- conv

for _n in ("conv", "conv_transpose"):
    _f = getattr(bp, _n)
    case(f"{_n}-out_channels", lambda f=_f: f(0, 3), ValueError,
         f"{_n}: expected out_channels to be an integer > 0, got 0")
    case(f"{_n}-kernel", lambda f=_f: f(4, (3, 0)), ValueError,
         f"{_n}: expected kernel_size to be an integer > 0 or a tuple of them, one per spatial axis, got (3, 0)")
    case(f"{_n}-strides", lambda f=_f: f(4, 3, strides=-1), ValueError,
         f"{_n}: expected strides to be an integer > 0 or a tuple of them, one per spatial axis, got -1")
    case(f"{_n}-dilation", lambda f=_f: f(4, 3, dilation=True), ValueError,
         f"{_n}: expected dilation to be an integer > 0 or a tuple of them, one per spatial axis, got True")
    case(f"{_n}-padding", lambda f=_f: f(4, 3, padding="FULL"), ValueError,
         f"{_n}: expected padding to be 'SAME', 'VALID', an integer >= 0 or a tuple of (lo, hi) pairs of "
         "integers >= 0, one per spatial axis, got 'FULL'")
    case(f"{_n}-groups", lambda f=_f: f(4, 3, groups=0), ValueError,
         f"{_n}: expected groups to be an integer > 0, got 0")
    case(f"{_n}-groups-out", lambda f=_f: f(6, 3, groups=4), ValueError,
         f"{_n}: expected out_channels divisible by groups=4, got 6")
    case(f"{_n}-impl", lambda f=_f: f(4, 3, impl="cudnn"), ValueError,
         f"{_n}: expected impl to be one of ('auto', 'lax', 'routed', 'columns'), got 'cudnn'")
    case(f"{_n}-impl-columns-groups", lambda f=_f: f(4, 3, groups=2, impl="columns"), ValueError,
         f"{_n}: expected groups=1 with impl='columns', got groups=2")
    case(f"{_n}-activation", lambda f=_f: f(4, 3, activation="gelu"), ValueError,
         f"{_n}: expected activation to be one of (None, 'relu'), got 'gelu'")
    case(f"{_n}-tuples", lambda f=_f: f(4, (3, 3), strides=(1, 1, 1)), ValueError,
         f"{_n}: expected one entry per spatial axis in every tuple, got kernel_size=(3, 3), strides=(1, 1, 1)")
    case(f"{_n}-4d", lambda f=_f: f(4, (1, 1, 1, 1)), ValueError,
         f"{_n}: expected 1 to 3 spatial axes, got kernel_size=(1, 1, 1, 1)")
    case(f"{_n}-rank", lambda f=_f: fwd(f(4, (3, 3)), (6, 6, 3), IMG[0]), ValueError,
         f"{_n}: expected x.ndim == 4 (batch, height, width, channels), got x.shape=(6, 6, 3)")
    case(f"{_n}-rank-any", lambda f=_f: fwd(f(4, 3), (5, 3), X), ValueError,
         f"{_n}: expected x.ndim >= 3 (batch, *spatial, channels), got x.shape=(4, 5)")
    case(f"{_n}-channels", lambda f=_f: fwd(f(4, 3), (8, 3), np.ones((2, 8, 4), F32)), ValueError,
         f"{_n}: expected x.shape[-1] == 3 input channels, got x.shape=(2, 8, 4)")
    case(f"{_n}-groups-in", lambda f=_f: init(f(4, 3, groups=2), (8, 3)), ValueError,
         f"{_n}: expected input channels divisible by groups=2, got in_shape=(8, 3)")
    case(f"{_n}-no-channels", lambda f=_f: init(f(4, 3), (8, 0)), ValueError,
         f"{_n}: expected at least one input channel, got in_shape=(8, 0)")
    case(f"{_n}-int", lambda f=_f: fwd(f(4, 3), (8, 3), SEQ.astype(I32)), TypeError, floating(_n, "int32"))
    case(f"{_n}-params-shape", lambda f=_f: with_params(f(4, 3), (8, 3), SEQ, lambda p: dict(p, w=p["w"][:2])),
         ValueError, f"{_n}: expected params['w'].shape == (3, 3, 4), got (2, 3, 4)")
    case(f"{_n}-init-rank", lambda f=_f: init(f(4, (3, 3)), (8, 3)), ValueError,
         f"{_n}: expected in_shape with 3 axes (x: (batch, height, width, channels)), got in_shape=(8, 3)")
case("conv-kernel-too-large", lambda: fwd(bp.conv(2, 5, padding="VALID"), (3, 1), np.ones((2, 3, 1), F32)),
     ValueError, "conv: expected the dilated kernel (5,) to fit in the padded input along every spatial axis, "
     "got spatial shape (3,) with padding ((0, 0),)")
case("conv-dilated-kernel-too-large", lambda: init(bp.conv(2, (3, 3), dilation=(1, 3), padding=1), (4, 4, 1)),
     ValueError, "conv: expected the dilated kernel (3, 7) to fit in the padded input along every spatial axis, "
     "got spatial shape (4, 4) with padding ((1, 1), (1, 1))")
case("conv_transpose-kernel-too-large", lambda: init(bp.conv_transpose(2, 2, padding=3), (2, 1)), ValueError,
     "conv_transpose: expected the dilated kernel (2,) to fit in the padded input along every spatial axis, "
     "got spatial shape (2,) with padding ((-2, -2),) of the stride-dilated input")

# ----------------------------------------------------------------------------- pooling

for _n in ("max_pool", "avg_pool"):
    _f = getattr(bp, _n)
    case(f"{_n}-window", lambda f=_f: f(0), ValueError,
         f"{_n}: expected window to be an integer > 0 or a tuple of them, one per spatial axis, got 0")
    case(f"{_n}-strides", lambda f=_f: f(2, strides=(1, 0)), ValueError,
         f"{_n}: expected strides to be an integer > 0 or a tuple of them, one per spatial axis, got (1, 0)")
    case(f"{_n}-padding", lambda f=_f: f(2, padding="full"), ValueError,
         f"{_n}: expected padding to be 'SAME', 'VALID', an integer >= 0 or a tuple of (lo, hi) pairs of "
         "integers >= 0, one per spatial axis, got 'full'")
    case(f"{_n}-tuples", lambda f=_f: f((2, 2), strides=(1,)), ValueError,
         f"{_n}: expected one entry per spatial axis in every tuple, got window=(2, 2), strides=(1,)")
    case(f"{_n}-padding-too-large", lambda f=_f: fwd(f(2, padding=2), (3, 1), np.ones((2, 3, 1), F32)), ValueError,
         f"{_n}: expected padding smaller than the window (2,) on each side, got padding ((2, 2),)")
    case(f"{_n}-window-too-large", lambda f=_f: init(f(4), (3, 3, 1)), ValueError,
         f"{_n}: expected the window (4, 4) to fit in the padded input along every spatial axis, "
         "got spatial shape (3, 3) with padding ((0, 0), (0, 0))")
    case(f"{_n}-rank", lambda f=_f: fwd(f((2,)), (6, 3), IMG), ValueError,
         f"{_n}: expected x.ndim == 3 (batch, length, channels), got x.shape=(2, 6, 6, 3)")
    case(f"{_n}-rank-any", lambda f=_f: f(2).forward((), (), X), ValueError,
         f"{_n}: expected x.ndim >= 3 (batch, *spatial, channels), got x.shape=(4, 5)")
    case(f"{_n}-empty", lambda f=_f: init(f(2, strides=1, padding=1), (0, 3)), ValueError,
         f"{_n}: expected every spatial axis to have at least one cell, got in_shape=(0, 3)")
    case(f"{_n}-no-channels", lambda f=_f: init(f(2), (4, 0)), ValueError,
         f"{_n}: expected at least one channel, got in_shape=(4, 0)")
    case(f"{_n}-int", lambda f=_f: fwd(f(2), (8, 3), SEQ.astype(I32)), TypeError, floating(_n, "int32"))
for _n in ("global_avg_pool", "global_max_pool"):
    _f = getattr(bp, _n)
    case(f"{_n}-rank", lambda f=_f: f().forward((), (), X), ValueError,
         f"{_n}: expected x.ndim >= 3 (batch, *spatial, channels), got x.shape=(4, 5)")
    case(f"{_n}-empty", lambda f=_f: fwd(f(), (0, 3), np.ones((2, 0, 3), F32)), ValueError,
         f"{_n}: expected every spatial axis to have at least one cell, got x.shape=(2, 0, 3)")
    case(f"{_n}-no-channels", lambda f=_f: fwd(f(), (3, 0), np.ones((2, 3, 0), F32)), ValueError,
         f"{_n}: expected at least one channel, got x.shape=(2, 3, 0)")
    case(f"{_n}-int", lambda f=_f: fwd(f(), (8, 3), SEQ.astype(I32)), TypeError, floating(_n, "int32"))
    case(f"{_n}-params", lambda f=_f: f().forward({"w": np.ones(2, F32)}, (), SEQ), TypeError,
         tree_msg(_n, "()", "{'w': float32[2]}"))

# ----------------------------------------------------------------------------- normalisation

for _n, _f in (("batch_norm", bp.batch_norm), ("layer_norm", bp.layer_norm), ("rms_norm", bp.rms_norm),
               ("group_norm", lambda **k: bp.group_norm(1, **k))):
    what = "channels" if _n in ("batch_norm", "group_norm") else "features"
    case(f"{_n}-eps-0", lambda f=_f: f(eps=0), ValueError, f"{_n}: expected eps > 0, got 0.0")
    case(f"{_n}-eps-inf", lambda f=_f: f(eps=float("inf")), ValueError, f"{_n}: expected a finite eps, got inf")
    case(f"{_n}-eps-str", lambda f=_f: f(eps="small"), TypeError,
         f"{_n}: expected eps to be a real number, got 'small'")
    case(f"{_n}-rank", lambda f=_f: fwd(f(), (5,), X[0]), ValueError,
         f"{_n}: expected x.ndim >= 2 (batch, ..., {what}), got x.shape=(5,)")
    case(f"{_n}-size", lambda f=_f: fwd(f(), (5,), np.ones((4, 6), F32)), ValueError,
         f"{_n}: expected x.shape[-1] == 5 ({what}), got x.shape=(4, 6)")
    case(f"{_n}-int", lambda f=_f: fwd(f(), (5,), X.astype(I32)), TypeError, floating(_n, "int32"))
    case(f"{_n}-params-shape",
         lambda f=_f: with_params(f(), (5,), X, lambda p: dict(p, scale=np.ones((5, 1), F32))),
         ValueError, f"{_n}: expected params['scale'].shape == (5,), got (5, 1)")
case("batch_norm-momentum", lambda: bp.batch_norm(momentum=1.5), ValueError,
     "batch_norm: expected momentum in [0, 1], got 1.5")
case("batch_norm-momentum-str", lambda: bp.batch_norm(momentum="fast"), TypeError,
     "batch_norm: expected momentum to be a real number, got 'fast'")
case("batch_norm-empty-batch", lambda: fwd(bp.batch_norm(), (5,), np.ones((0, 5), F32)), ValueError,
     "batch_norm: expected at least one row per channel, got x.shape=(0, 5)")
case("batch_norm-state-shape",
     lambda: with_params(bp.batch_norm(), (5,), X, lambda p: p, lambda s: dict(s, var=np.ones(4, F32))),
     ValueError, "batch_norm: expected state['var'].shape == (5,), got (4,)")
case("batch_norm-state-missing", lambda: with_params(bp.batch_norm(), (5,), X, lambda p: p, lambda s: ()),
     TypeError, tree_msg("batch_norm", "{'mean': float32[5], 'var': float32[5]}", "()", "state"))
case("batch_norm-state-int",
     lambda: with_params(bp.batch_norm(), (5,), X, lambda p: p, lambda s: dict(s, var=np.ones(5, I32))),
     TypeError, "batch_norm: expected a floating-point state['var'], got dtype int32")
case("group_norm-groups-0", lambda: bp.group_norm(0), ValueError,
     "group_norm: expected num_groups to be an integer > 0, got 0")
case("group_norm-no-channels", lambda: fwd(bp.group_norm(1), (0,), np.ones((4, 0), F32)), ValueError,
     "group_norm: expected at least one channel, got in_shape=(0,)")
case("dense-no-features", lambda: init(bp.dense(3), (0,)), ValueError,
     "dense: expected at least one input feature, got in_shape=(0,)")
case("group_norm-divisible", lambda: fwd(bp.group_norm(2), (3,), np.ones((4, 3), F32)), ValueError,
     "group_norm: expected the channel count divisible by num_groups=2, got in_shape=(3,)")

# ----------------------------------------------------------------------------- dropout, embedding, reshape

case("dropout-rate-negative", lambda: bp.dropout(-0.1), ValueError, "dropout: expected rate in [0, 1), got rate=-0.1")
case("dropout-rate-1", lambda: bp.dropout(1.0), ValueError, "dropout: expected rate in [0, 1), got rate=1.0")
case("dropout-rate-none", lambda: bp.dropout(None), TypeError, "dropout: expected rate to be a real number, got None")
case("dropout-rate-nan", lambda: bp.dropout(float("nan")), ValueError, "dropout: expected a finite rate, got nan")
case("dropout-no-key", lambda: fwd(bp.dropout(0.5), (5,), X), ValueError,
     "dropout: expected a PRNG key in training (forward(..., key=key)), got key=None")
case("dropout-int-key", lambda: fwd(bp.dropout(0.5), (5,), X, key=0), TypeError,
     "dropout: expected key to be one PRNG key (jax.random.key(0) or jax.random.PRNGKey(0)), got 0")
case("dropout-float-key", lambda: fwd(bp.dropout(0.5), (5,), X, key=np.ones(2)), TypeError,
     "dropout: expected key to be one PRNG key (jax.random.key(0) or jax.random.PRNGKey(0)), got float64[2]")
case("dropout-batch-of-keys", lambda: fwd(bp.dropout(0.5), (5,), X, key=np.zeros((3, 2), np.uint32)), TypeError,
     "dropout: expected key to be one PRNG key (jax.random.key(0) or jax.random.PRNGKey(0)), got uint32[3, 2]")
case("dropout-int-key-in-sequential", lambda: fwd(bp.sequential(bp.dense(3), bp.dropout(0.5)), (5,), X, key=0),
     TypeError, "sequential: expected key to be one PRNG key (jax.random.key(0) or jax.random.PRNGKey(0)), got 0")
case("dropout-raw-key-of-5-words", lambda: fwd(bp.dropout(0.5), (5,), X, key=np.zeros(5, np.uint32)), TypeError,
     "dropout: expected key to be one PRNG key (jax.random.key(0) or jax.random.PRNGKey(0)), got uint32[5]")
case("embedding-vocab", lambda: bp.embedding(0, 4), ValueError,
     "embedding: expected vocab_size to be an integer > 0, got 0")
case("embedding-dim", lambda: bp.embedding(10, -1), ValueError, "embedding: expected dim to be an integer > 0, got -1")
case("embedding-float-ids", lambda: fwd(bp.embedding(10, 4), (3,), np.ones((2, 3), F32)), TypeError,
     "embedding: expected integer indices, got dtype float32 (cast them first, e.g. ids.astype(jnp.int32))")
case("embedding-bool-ids", lambda: fwd(bp.embedding(10, 4), (3,), np.ones((2, 3), bool)), TypeError,
     "embedding: expected integer indices, got dtype bool (cast them first, e.g. ids.astype(jnp.int32))")
case("embedding-ids-too-large", lambda: fwd(bp.embedding(10, 4), (3,), np.array([[1, 10, 2]])), ValueError,
     "embedding: expected indices in [0, 10), got indices in [1, 10]")
case("embedding-ids-negative", lambda: fwd(bp.embedding(10, 4), (3,), np.array([[1, -1, 2]])), ValueError,
     "embedding: expected indices in [0, 10), got indices in [-1, 2]")
case("embedding-table-shape",
     lambda: with_params(bp.embedding(10, 4), (3,), np.zeros((2, 3), I32), lambda p: {"table": p["table"][:9]}),
     ValueError, "embedding: expected params['table'].shape == (10, 4), got (9, 4)")
case("reshape-shape-str", lambda: bp.reshape("ab"), TypeError,
     "reshape: expected shape to be a tuple of integers, got shape='ab'")
case("reshape-shape-float", lambda: bp.reshape((2, 1.5)), TypeError,
     "reshape: expected shape to be a tuple of integers, got shape=(2, 1.5)")
case("reshape-two-minus-ones", lambda: bp.reshape((-1, -1)), ValueError,
     "reshape: expected positive sizes and at most one -1, got shape=(-1, -1)")
case("reshape-zero", lambda: bp.reshape((0, 5)), ValueError,
     "reshape: expected positive sizes and at most one -1, got shape=(0, 5)")
case("reshape-size", lambda: fwd(bp.reshape((4,)), (5,), X), ValueError,
     "reshape: expected a shape of 5 elements per example (in_shape=(5,)), got shape=(4,)")

# ----------------------------------------------------------------------------- losses

P = np.ones((4, 3), F32)
for _n in ("squared_error", "mean_squared_error", "huber"):
    _f = getattr(bp, _n)
    case(f"{_n}-target-shape", lambda f=_f: f().forward(P, np.ones(4, F32)), ValueError,
         f"{_n}: expected target.shape == pred.shape == (4, 3), got target.shape=(4,)")
    case(f"{_n}-target-int", lambda f=_f: f().forward(P, P.astype(I32)), TypeError,
         f"{_n}: expected a floating-point target, got dtype int32 (cast it first, e.g. target.astype(jnp.float32))")
    case(f"{_n}-target-bool", lambda f=_f: f().forward(P, P > 0), TypeError,
         f"{_n}: expected a floating-point target, got dtype bool (cast it first, e.g. target.astype(jnp.float32))")
    case(f"{_n}-pred-int", lambda f=_f: f().forward(P.astype(I32), P), TypeError, floating(_n, "int32", "pred"))
    case(f"{_n}-pred-scalar", lambda f=_f: f().forward(np.float32(1.0), np.float32(1.0)), ValueError,
         f"{_n}: expected pred.ndim >= 1, got pred.shape=()")
    case(f"{_n}-pred-empty", lambda f=_f: f().forward(P[:0], P[:0]), ValueError,
         f"{_n}: expected a non-empty pred (a mean over no elements is NaN), got pred.shape=(0, 3)")
case("huber-delta-0", lambda: bp.huber(0.0), ValueError, "huber: expected delta > 0, got 0.0")
case("huber-delta-negative", lambda: bp.huber(-1), ValueError, "huber: expected delta > 0, got -1.0")
case("huber-delta-inf", lambda: bp.huber(float("inf")), ValueError, "huber: expected a finite delta, got inf")
case("huber-delta-str", lambda: bp.huber("1"), TypeError, "huber: expected delta to be a real number, got '1'")

_CE = "softmax_cross_entropy"
case("ce-smoothing-1", lambda: bp.softmax_cross_entropy(1.0), ValueError,
     f"{_CE}: expected 0 <= label_smoothing < 1, got 1.0")
case("ce-smoothing-negative", lambda: bp.softmax_cross_entropy(-0.1), ValueError,
     f"{_CE}: expected 0 <= label_smoothing < 1, got -0.1")
case("ce-smoothing-none", lambda: bp.softmax_cross_entropy(None), TypeError,
     f"{_CE}: expected label_smoothing to be a real number, got None")
case("ce-pred-int", lambda: bp.softmax_cross_entropy().forward(P.astype(I32), np.zeros(4, I32)), TypeError,
     floating(_CE, "int32", "pred"))
case("ce-no-class-axis", lambda: bp.softmax_cross_entropy().forward(P[:, 0], np.zeros(4, I32)), ValueError,
     f"{_CE}: expected pred.ndim >= 2 (batch, ..., classes), got pred.shape=(4,)")
case("ce-no-classes", lambda: bp.softmax_cross_entropy().forward(P[:, :0], np.zeros(4, I32)), ValueError,
     f"{_CE}: expected a non-empty pred (a mean over no elements is NaN), got pred.shape=(4, 0)")
case("ce-label-shape", lambda: bp.softmax_cross_entropy().forward(P, np.zeros((4, 1), I32)), ValueError,
     f"{_CE}: expected integer labels of shape (4,), got target.shape=(4, 1)")
case("ce-probability-shape", lambda: bp.softmax_cross_entropy().forward(P, np.ones((4, 2), F32)), ValueError,
     f"{_CE}: expected probability targets of shape (4, 3) or integer labels of shape (4,), got target.shape=(4, 2)")
case("ce-labels-too-large", lambda: bp.softmax_cross_entropy().forward(P, np.array([0, 1, 3, 2])), ValueError,
     f"{_CE}: expected labels in [0, 3), got labels in [0, 3]")
case("ce-labels-negative", lambda: bp.softmax_cross_entropy().forward(P, np.array([0, -1, 2, 2])), ValueError,
     f"{_CE}: expected labels in [0, 3), got labels in [-1, 2]")
case("ce-labels-bool", lambda: bp.softmax_cross_entropy().forward(P, np.ones(4, bool)), TypeError,
     f"{_CE}: expected integer labels or floating-point probabilities, got target dtype bool")
case("ce-probabilities-out-of-range", lambda: bp.softmax_cross_entropy().forward(P, P * 2), ValueError,
     f"{_CE}: expected probability targets in [0, 1], got values in [2.0, 2.0]")
case("ce-probabilities-not-normalised", lambda: bp.softmax_cross_entropy().forward(P, P / 2), ValueError,
     f"{_CE}: expected probability targets summing to 1 over the last axis, got sums in [1.5, 1.5]")
_BCE = "sigmoid_binary_cross_entropy"
case("bce-target-int", lambda: bp.sigmoid_binary_cross_entropy().forward(P, P.astype(I32)), TypeError,
     f"{_BCE}: expected floating-point targets in [0, 1], got dtype int32")
case("bce-target-bool", lambda: bp.sigmoid_binary_cross_entropy().forward(P, P > 0), TypeError,
     f"{_BCE}: expected floating-point targets in [0, 1], got dtype bool")
case("bce-target-shape", lambda: bp.sigmoid_binary_cross_entropy().forward(P, P[:, :1]), ValueError,
     f"{_BCE}: expected target.shape == pred.shape == (4, 3), got target.shape=(4, 1)")
case("bce-target-out-of-range", lambda: bp.sigmoid_binary_cross_entropy().forward(P, P - 1.5), ValueError,
     f"{_BCE}: expected targets in [0, 1], got values in [-0.5, -0.5]")
case("bce-pred-empty", lambda: bp.sigmoid_binary_cross_entropy().forward(P[:0], P[:0]), ValueError,
     f"{_BCE}: expected a non-empty pred (a mean over no elements is NaN), got pred.shape=(0, 3)")


@pytest.mark.parametrize("thunk,exc,msg", CASES)
def test_bad_input_raises_a_clear_error(thunk, exc, msg):
    # (jax appends a note on filtered frames to errors raised while it traces)
    with pytest.raises(exc, match="^" + re.escape(msg) + r"(\n-{20}\nFor simplicity, JAX .*)?$"):
        thunk()


def test_every_layer_and_loss_has_cases():
    """Every exported layer and loss (bar the recurrent and attention layers) has a case here."""
    from bpjax.layers import attention as _attention
    from bpjax.layers import recurrent as _recurrent
    skipped = set(_recurrent.__all__) | set(_attention.__all__)
    ids = [p.id for p in CASES]
    missing = [n for n in (*bp.LAYERS, *bp.LOSSES) if n not in skipped
               and not any(i.startswith(n + "-") for i in ids)
               and not (n == "softmax_cross_entropy" and any(i.startswith("ce-") for i in ids))
               and not (n == "sigmoid_binary_cross_entropy" and any(i.startswith("bce-") for i in ids))]
    assert not missing, missing
    assert len(ids) == len(set(ids))


def test_a_sequential_may_start_with_a_join():
    """A tuple reaches a first layer that is a join (it used to be stacked into one array)."""
    net = bp.sequential(bp.concat(), bp.dense(2))
    params, state = params_for(net, ((3,), (2,)))
    y, _, _ = net.forward(params, state, (np.ones((4, 3), F32), np.ones((4, 2), F32)))
    assert y.shape == (4, 2)
