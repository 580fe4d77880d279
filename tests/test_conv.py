"""Convolution and pooling beyond the cross-check table: the max-pool tie rule, shapes, padding
conventions, and the error messages for bad hyperparameters and bad input."""
from __future__ import annotations

import inspect
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import bpjax as bp
from bpjax.check import cases
from helpers import init_params, normal, rng

CONV_CASES = [c for c in cases.conv.CASES if c.crosscheck]

# ----------------------------------------------------------------------------- max-pool ties


def _pool_grad(layer, x, dy):
    x = jnp.asarray(x, jnp.float64)
    y, _, res = layer.forward((), (), x)
    _, dx = layer.backward((), res, jnp.asarray(dy, jnp.float64))
    return np.asarray(y), np.asarray(dx)


@pytest.mark.parametrize("layer,x,dy,want_y,want_dx", [
    # one 2x2 window with two maxima: the first in row-major order, (0, 1), gets all of dy
    (bp.max_pool(2), [[1, 2], [2, 0]], [[5]], [[2]], [[0, 5], [0, 0]]),
    # overlapping 2x2 windows at stride 1; both pick x[0, 1], which receives the sum
    (bp.max_pool(2, strides=1), [[1, 4, 4], [4, 4, 0]], [[1, 10]], [[4, 4]], [[0, 11, 0], [0, 0, 0]]),
], ids=["2d-one-window", "2d-overlapping"])
def test_max_pool_ties_go_to_the_first_maximum_in_row_major_order(layer, x, dy, want_y, want_dx):
    x = np.asarray(x, float)[None, :, :, None]                    # (1, H, W, 1)
    dy = np.asarray(dy, float)[None, :, :, None]
    y, dx = _pool_grad(layer, x, dy)
    np.testing.assert_array_equal(y[0, :, :, 0], want_y)
    np.testing.assert_array_equal(dx[0, :, :, 0], want_dx)


def test_max_pool_ties_1d_with_padding_and_channels():
    # windows of 2 at stride 1 over [3, 3, 1, 3] (channel 0) and [0, 5, 5, 5] (channel 1)
    x = np.array([[3, 0], [3, 5], [1, 5], [3, 5]], float)[None]   # (1, 4, 2)
    dy = np.array([[1, 2], [10, 20], [100, 200]], float)[None]     # (1, 3, 2)
    _, dx = _pool_grad(bp.max_pool(2, strides=1), x, dy)
    np.testing.assert_array_equal(dx[0], [[1, 0], [10, 2 + 20], [0, 200], [100, 0]])
    # padded cells are -inf and never win, even against a tie of real cells: [-inf, 2, 2], [2, 2, -inf]
    _, dx = _pool_grad(bp.max_pool(3, strides=1, padding=1), np.full((1, 2, 1), 2.0), [[[1.0], [10.0]]])
    np.testing.assert_array_equal(dx[0, :, 0], [11, 0])


def test_max_pool_tie_rule_is_the_same_under_jit():
    layer = bp.max_pool((2, 2), strides=1)
    x = jnp.asarray(rng("ties").integers(0, 2, (2, 4, 3, 2)), jnp.float32)   # many ties
    y, _, res = layer.forward((), (), x)
    dy = normal(rng("ties-dy"), y.shape, jnp.float32)
    eager = layer.backward((), res, dy)[1]
    jitted = jax.jit(lambda x, dy: layer.backward((), layer.forward((), (), x)[2], dy)[1])(x, dy)
    np.testing.assert_array_equal(eager, jitted)


def test_global_max_pool_ties_go_to_the_first_spatial_position():
    x = np.zeros((1, 2, 2, 2))
    x[0, :, :, 0] = 7.0                                            # channel 0: all four tie
    x[0, :, :, 1] = [[0, 7], [7, 1]]                               # channel 1: (0, 1) and (1, 0) tie
    _, dx = _pool_grad(bp.global_max_pool(), x, [[3.0, 5.0]])
    np.testing.assert_array_equal(dx[0, :, :, 0], [[3, 0], [0, 0]])
    np.testing.assert_array_equal(dx[0, :, :, 1], [[0, 5], [0, 0]])


# ----------------------------------------------------------------------------- shapes and conventions


@pytest.mark.parametrize("case", [c for c in CONV_CASES], ids=str)
def test_init_out_shape_is_the_forward_output_shape(case):
    layer = case.make()
    params, state, out_shape = init_params(layer, case.in_shape, rng(case), jnp.float32)
    x = jax.ShapeDtypeStruct((case.batch, *case.in_shape), jnp.float32)
    y = jax.eval_shape(lambda p, x: layer.forward(p, state, x)[0], params, x)   # no compile
    assert y.shape == (case.batch, *out_shape)


@pytest.mark.parametrize("kernel,strides,padding,dilation,length,back", [
    (3, 1, "SAME", 1, 9, 9), (3, 2, "SAME", 1, 9, 10),            # 'SAME': s·O
    (4, 2, "VALID", 1, 10, 10), (2, 3, "VALID", 1, 7, 6),         # 'VALID': s·O + max(k' − s, 0)
    (3, 2, 1, 2, 11, 11), (2, 1, 3, 1, 5, 5),                     # explicit: L, less what
    (3, 3, ((2, 1),), 1, 10, 9),                                  # the stride dropped
])
def test_conv_transpose_maps_conv_output_shape_back(kernel, strides, padding, dilation, length, back):
    """conv_transpose's padding is that of the conv it transposes: with the same options and
    explicit padding it maps conv's output length O back to the input length L, less the
    (L + lo + hi − k') mod s cells the stride dropped; 'SAME' and 'VALID' are lax's."""
    opts = dict(strides=strides, padding=padding, dilation=dilation)
    gen = rng("shapes")
    out = init_params(bp.conv(2, kernel, **opts), (length, 3), gen, jnp.float32)[2]
    assert init_params(bp.conv_transpose(3, kernel, **opts), out, gen, jnp.float32)[2] == (back, 3)


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 1), (0, 1))])
def test_conv_transpose_equals_lax_conv_transpose_with_consistent_padding(padding):
    layer = bp.conv_transpose(3, (3, 2), strides=(2, 3), padding=padding, dilation=(1, 2), use_bias=False)
    gen = rng(f"ct-{padding}")
    params, _, out_shape = init_params(layer, (4, 3, 2), gen, jnp.float64)
    x = normal(gen, (1, 4, 3, 2), jnp.float64)
    want = lax.conv_transpose(x, params["w"], (2, 3), padding, rhs_dilation=(1, 2),
                              dimension_numbers=("NHWC", "HWIO", "NHWC"), use_consistent_padding=True)
    got = layer.forward(params, (), x)[0]
    assert got.shape == want.shape == (1, *out_shape)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_conv_same_padding_is_lax_same_padding():
    layer = bp.conv(3, (3, 2), strides=(2, 3), dilation=(2, 1), padding="SAME", use_bias=False)
    gen = rng("same")
    params, _, _ = init_params(layer, (7, 8, 2), gen, jnp.float64)
    x = normal(gen, (1, 7, 8, 2), jnp.float64)
    want = lax.conv_general_dilated(x, params["w"], (2, 3), "SAME", rhs_dilation=(2, 1),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(layer.forward(params, (), x)[0], want, rtol=1e-12, atol=1e-12)


def test_conv_default_init_is_he_normal_and_zero_bias():
    """The draw itself is He-normal's (tests/test_rules.py checks its scale); drawing here would
    compile jax.random, slow on this machine, so the shapes come from eval_shape."""
    for factory in (bp.conv, bp.conv_transpose):
        sig = inspect.signature(factory).parameters
        assert sig["w_init"].default == "he_normal" and sig["b_init"].default == "zeros"
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    params, state = jax.eval_shape(lambda k: bp.conv(64, (3, 3), groups=2).init(k, (8, 8, 32))[:2], key)
    assert params["w"].shape == (3, 3, 16, 64) and params["w"].dtype == jnp.float32   # fan-in 3·3·16
    assert params["b"].shape == (64,) and state == ()


# ----------------------------------------------------------------------------- error messages


def _conv_params(layer, in_shape):
    return init_params(layer, in_shape, rng("err"), jnp.float32)[0]


def test_conv_wrong_rank():
    layer = bp.conv(4, (3, 3))
    params = _conv_params(layer, (28, 28, 1))
    msg = "conv: expected x.ndim == 4 (batch, height, width, channels), got x.shape=(28, 28, 1)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        layer.forward(params, (), jnp.ones((28, 28, 1)))
    msg = "conv: expected x.ndim >= 3 (batch, *spatial, channels), got x.shape=(5, 3)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        bp.conv(4, 3).forward(params, (), jnp.ones((5, 3)))
    msg = "max_pool: expected x.ndim == 3 (batch, length, channels), got x.shape=(2, 6, 6, 1)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        bp.max_pool((2,)).forward((), (), jnp.ones((2, 6, 6, 1)))
    msg = "global_avg_pool: expected x.ndim >= 3 (batch, *spatial, channels), got x.shape=(4, 3)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        bp.global_avg_pool().forward((), (), jnp.ones((4, 3)))


def test_conv_wrong_channel_count_also_under_jit():
    layer = bp.conv(4, (3, 3))
    params = _conv_params(layer, (28, 28, 3))
    msg = "conv: expected x.shape[-1] == 3 input channels, got x.shape=(8, 28, 28, 4)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        layer.forward(params, (), jnp.ones((8, 28, 28, 4)))
    with pytest.raises(ValueError, match=re.escape(msg)):
        jax.jit(lambda p, x: layer.forward(p, (), x)[0])(params, jnp.ones((8, 28, 28, 4)))
    layer = bp.conv_transpose(4, 3, groups=2)
    params = _conv_params(layer, (6, 4))
    msg = "conv_transpose: expected x.shape[-1] == 4 input channels, got x.shape=(2, 6, 6)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        layer.forward(params, (), jnp.ones((2, 6, 6)))


@pytest.mark.parametrize("make,msg", [
    (lambda: bp.conv(0, 3), "conv: expected out_channels to be an integer > 0, got 0"),
    (lambda: bp.conv(2.5, 3), "conv: expected out_channels to be an integer > 0, got 2.5"),
    (lambda: bp.conv(4, 0), "conv: expected kernel_size to be an integer > 0 or a tuple of them, one per "
                            "spatial axis, got 0"),
    (lambda: bp.conv(4, (3, 0)), "conv: expected kernel_size to be an integer > 0 or a tuple of them"),
    (lambda: bp.conv(4, 3, strides=-1), "conv: expected strides to be an integer > 0"),
    (lambda: bp.conv(4, 3, dilation=True), "conv: expected dilation to be an integer > 0"),
    (lambda: bp.conv(4, 3, padding="FULL"),
     "conv: expected padding to be 'SAME', 'VALID', an integer >= 0 or a tuple of (lo, hi) pairs of "
     "integers >= 0, one per spatial axis, got 'FULL'"),
    (lambda: bp.conv(4, 3, padding=-1), "conv: expected padding to be 'SAME', 'VALID'"),
    (lambda: bp.conv(4, 3, padding=((1,),)), "conv: expected padding to be 'SAME', 'VALID'"),
    (lambda: bp.conv(4, 3, groups=0), "conv: expected groups to be an integer > 0, got 0"),
    (lambda: bp.conv(6, 3, groups=4), "conv: expected out_channels divisible by groups=4, got 6"),
    (lambda: bp.conv(4, (3, 3), strides=(1, 1, 1)),
     "conv: expected one entry per spatial axis in every tuple, got kernel_size=(3, 3), strides=(1, 1, 1)"),
    (lambda: bp.conv(4, (3, 3), padding=((1, 1),)),
     "conv: expected one entry per spatial axis in every tuple, got kernel_size=(3, 3), padding=((1, 1),)"),
    (lambda: bp.conv(4, (1, 1, 1, 1)), "conv: expected 1 to 3 spatial axes, got kernel_size=(1, 1, 1, 1)"),
    (lambda: bp.conv(4, 3, w_init="kaiming"), "conv: expected an initializer"),
    (lambda: bp.conv_transpose(0, 3), "conv_transpose: expected out_channels to be an integer > 0, got 0"),
    (lambda: bp.conv_transpose(3, 3, groups=2),
     "conv_transpose: expected out_channels divisible by groups=2, got 3"),
    (lambda: bp.max_pool(0), "max_pool: expected window to be an integer > 0"),
    (lambda: bp.avg_pool(2, strides=(1, 0)), "avg_pool: expected strides to be an integer > 0"),
    (lambda: bp.avg_pool((2, 2), padding="full"), "avg_pool: expected padding to be 'SAME', 'VALID'"),
    (lambda: bp.max_pool((2, 2), strides=(1,)),
     "max_pool: expected one entry per spatial axis in every tuple, got window=(2, 2), strides=(1,)"),
])
def test_bad_hyperparameters_raise_at_construction(make, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        make()


@pytest.mark.parametrize("layer,x_shape,msg", [
    (bp.conv(2, 5, padding="VALID"), (2, 3, 1),
     "conv: expected the dilated kernel (5,) to fit in the padded input along every spatial axis, "
     "got spatial shape (3,) with padding ((0, 0),)"),
    (bp.conv(2, (3, 3), dilation=(1, 3), padding=1), (2, 4, 4, 1),
     "conv: expected the dilated kernel (3, 7) to fit in the padded input along every spatial axis, "
     "got spatial shape (4, 4) with padding ((1, 1), (1, 1))"),
    (bp.conv_transpose(2, 2, padding=3), (2, 2, 1),
     "conv_transpose: expected the dilated kernel (2,) to fit in the padded input along every spatial axis, "
     "got spatial shape (2,) with padding ((-2, -2),) of the stride-dilated input"),
    (bp.max_pool(4), (2, 3, 3, 1),
     "max_pool: expected the window (4, 4) to fit in the padded input along every spatial axis, "
     "got spatial shape (3, 3) with padding ((0, 0), (0, 0))"),
    (bp.avg_pool(2, padding=2), (2, 3, 1),
     "avg_pool: expected padding smaller than the window (2,) on each side, got padding ((2, 2),)"),
], ids=["conv-valid", "conv-dilated", "conv_transpose", "max_pool", "avg_pool-padding"])
def test_window_larger_than_the_padded_input_raises_in_init_and_forward(layer, x_shape, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        layer.init(jax.random.PRNGKey(0), x_shape[1:])
    with pytest.raises(ValueError, match=re.escape(msg)):
        jax.jit(lambda x: layer.forward({"w": jnp.ones((2, 1, 2))}, (), x)[0])(jnp.ones(x_shape))


def test_input_channels_not_divisible_by_groups():
    msg = "conv: expected input channels divisible by groups=2, got in_shape=(8, 3)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        bp.conv(4, 3, groups=2).init(jax.random.PRNGKey(0), (8, 3))
    with pytest.raises(ValueError, match=re.escape(msg)):
        bp.conv(4, 3, groups=2).forward({"w": jnp.ones((3, 1, 4)), "b": jnp.ones(4)}, (), jnp.ones((2, 8, 3)))


# ----------------------------------------------------------------------------- formulations


@pytest.mark.parametrize("chunk_examples", [1, 2, 6])
@pytest.mark.parametrize("make, in_shape", [
    (lambda impl: bp.conv(5, (3, 3), strides=(2, 1), padding="SAME", impl=impl), (7, 6, 3)),
    (lambda impl: bp.conv_transpose(4, (2, 3), strides=2, padding=((1, 0), (2, 1)), impl=impl), (4, 5, 3)),
    (lambda impl: bp.conv(2, (2, 2, 2), dilation=(1, 2, 1), padding="VALID", impl=impl), (3, 5, 4, 3)),
    (lambda impl: bp.conv(5, (3, 3), activation="relu", impl=impl), (7, 6, 3)),  # y and dz per chunk
], ids=["2d-stride21", "transpose-2d-pairs", "3d-dilation", "2d-relu"])
def test_columns_over_several_chunks_equal_lax(monkeypatch, make, in_shape, chunk_examples):
    """The batch of 6 split into chunks of 1, 2 or 6 examples (the chunk budget set to that
    many examples' columns): forward, dW, db and dx by columns equal lax's, in float64."""
    from bpjax.kernels import cpu_conv
    lax_layer, col_layer = make("lax"), make("columns")
    gen = rng(f"columns-chunks-{in_shape}-{chunk_examples}")
    params, *_ = init_params(lax_layer, in_shape, gen, jnp.float64)
    x = normal(gen, (6, *in_shape), jnp.float64)
    y, _, res = lax_layer.forward(params, (), x)
    one_example = math.prod(y.shape[1:-1]) * math.prod(params["w"].shape[:-1]) * 8   # bytes of columns
    monkeypatch.setattr(cpu_conv, "COLUMN_CHUNK_BYTES", chunk_examples * one_example)
    assert cpu_conv.chunk_size(6, one_example) == chunk_examples
    jax.clear_caches()                                         # the budget is read at trace time
    dy = normal(gen, y.shape, jnp.float64)
    y_col, _, res_col = col_layer.forward(params, (), x)
    np.testing.assert_allclose(y_col, y, rtol=1e-12, atol=1e-12)
    for got, want in zip(jax.tree.leaves(col_layer.backward(params, res_col, dy)),
                         jax.tree.leaves(lax_layer.backward(params, res, dy))):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _plan(impl, in_shape, c_out, dtype=jnp.float32, strides=1, in_dilation=1, dilation=1, groups=1):
    """(forward and dx by columns, dW by columns) that bpjax.kernels chooses for a 3×3 'SAME' conv
    of one example's shape in_shape: the plan on every platform for an explicit impl, the plan
    of a program lowered for the CPU for impl='auto' (elsewhere auto is the plain pair)."""
    from bpjax.kernels import _plan
    from bpjax.layers._windows import Geometry
    r = len(in_shape) - 1
    g = Geometry((strides,) * r, ((1, 1),) * r, (in_dilation,) * r, (dilation,) * r, groups)
    w_shape = (*(3,) * r, in_shape[-1] // groups, c_out)
    everywhere, on_cpu = _plan(impl, (8, *in_shape), w_shape, jnp.dtype(dtype), g)
    assert everywhere is None or on_cpu is None
    plan = everywhere or on_cpu
    return (plan.columns, plan.dw_by_columns) if plan else (False, False)


def test_auto_picks_columns_or_eigen_on_cpu_for_plain_2d_and_3d_convs_only():
    """(forward and dx by columns, dW by columns) for each kind of layer, in a program lowered
    for the CPU (the choice no longer depends on the machine that traces it)."""
    cpu = True
    assert _plan("auto", (6, 6, 3), 8) == (cpu, cpu)                  # few channels: all columns
    assert _plan("auto", (6, 6, 16), 16) == (False, cpu)              # Eigen forward and dx on CPU
    assert _plan("auto", (6, 6, 16), 16, jnp.float64) == (cpu, cpu)   # Eigen has no float64 conv
    assert _plan("auto", (6, 6, 16), 16, strides=2) == (cpu, cpu)     # strided: columns
    assert _plan("auto", (6, 6, 16), 16, dilation=2) == (cpu, cpu)
    assert _plan("auto", (4, 6, 6, 16), 16) == (cpu, cpu)             # 3-D: columns
    assert _plan("auto", (6, 16), 16) == (False, False)               # 1 spatial axis: lax
    assert _plan("auto", (6, 6, 4), 4, groups=2) == (False, False)    # groups: lax
    assert _plan("auto", (6, 6, 4), 4, in_dilation=2) == (False, False)  # strided conv_transpose
    assert _plan("columns", (6, 4), 4) == (True, True) and _plan("lax", (6, 6, 4), 4) == (False, False)
    assert _plan("routed", (6, 6, 16), 16) == (False, False)          # lax's convolution, routed


@pytest.mark.parametrize("extra", [1, 3])
@pytest.mark.parametrize("strides, padding, lhs_dilation, rhs_dilation", [
    ((1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1)),
    ((1, 2), ((2, 0), (0, 1)), (1, 1), (1, 2)),
    ((1, 1), ((1, 1), (1, 1)), (2, 1), (1, 1)),
], ids=["same", "pairs-stride12-dilation12", "lhs-dilation"])
def test_lax_conv_extra_rows_change_nothing(extra, strides, padding, lhs_dilation, rhs_dilation):
    """routed_conv, with extra rows of padding at the high end (the Eigen routing), their output
    rows dropped, equals lax's convolution (float64, to 1e-12)."""
    from bpjax.kernels.cpu_conv import routed_conv
    from bpjax.layers._windows import DIMENSION_NUMBERS, Geometry
    gen = rng(f"lax-conv-extra-{extra}-{strides}-{padding}")
    x, w = normal(gen, (2, 5, 6, 3), jnp.float64), normal(gen, (3, 2, 3, 4), jnp.float64)
    kw = dict(window_strides=strides, padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation)
    want = lax.conv_general_dilated(x, w, **kw, dimension_numbers=DIMENSION_NUMBERS[2])
    g = Geometry(strides, padding, lhs_dilation, rhs_dilation, 1)
    got = jax.jit(lambda x, w: routed_conv(x, w, g, extra))(x, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_float32_2d_conv_with_16_channels_gets_the_extra_row_on_cpu():
    """The routing happens where it should: the lowered forward of a stride-1 'SAME' 3×3 conv,
    16 → 16 channels, float32, pads its rows by (1, 2) on CPU; with 8 channels it is columns."""
    def conv_pads(c, dtype):
        layer = bp.conv(c, 3, activation="relu")
        params, *_ = layer.init(jax.random.PRNGKey(0), (6, 6, c))
        params = jax.tree.map(lambda a: a.astype(dtype), params)
        text = jax.jit(lambda p, x: layer.forward(p, (), x)[0]).lower(params, jnp.ones((2, 6, 6, c), dtype)).as_text()
        return [line for line in text.splitlines() if "convolution" in line]
    routed = conv_pads(16, jnp.float32)
    if jax.default_backend() == "cpu":
        assert len(routed) == 1 and "[1, 2], [1, 1]" in routed[0], routed
        assert conv_pads(8, jnp.float32) == [] and conv_pads(16, jnp.float64) == []   # by columns
    else:
        assert len(routed) == 1 and "[1, 1], [1, 1]" in routed[0], routed
