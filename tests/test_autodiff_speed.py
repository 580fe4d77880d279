"""Autodiff of bpjax's forwards stays what autodiff of the plain network is, so that checking a
model with autodiff costs what it costs on the plain network.

scripts/benchmarks/autodiff_speed.py times it; these tests hold what needs no clock: the plain-lax twins
compute the bpjax forwards, autodiff of a bpjax forward equals autodiff of its twin and the
hand-written backward, and the jaxpr of autodiff of a routed 2-D convolution holds no
convolution with a kernel taller than its input (the naive loop the extra row used to cause).
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from bpjax.kernels import cpu_conv
from bpjax.layers._windows import Geometry

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script():
    name = "autodiff_speed_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "benchmarks" / "autodiff_speed.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


S = _script()
NETS = S.networks(quick=True)          # small shapes; the 2-D CNN still routes its second conv


def _setup(name):
    net = NETS[name]()
    params, state = S.init(net)
    return net, params, state, jnp.asarray(net.x), jnp.asarray(net.y)


def _close(got, want, what, tol=2e-5):
    """Every leaf within tol of the largest entry of ``want`` (float32: a bias before a batch
    norm has a gradient of rounding noise only, so a per-leaf relative error means nothing)."""
    scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
    assert jax.tree.structure(got) == jax.tree.structure(want), what
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        err = float(jnp.max(jnp.abs(g - w)))
        assert err <= tol * scale, f"{what} {jax.tree_util.keystr(path)}: max error {err:.2e}, scale {scale:.2e}"


def test_twins_compute_the_bpjax_forwards():
    for name in NETS:
        net, params, state, x, _ = _setup(name)
        y = jax.jit(lambda p, s, x: net.model.forward(p, s, x)[0])(params, state, x)
        _close(net.twin(params, x), y, f"{name} logits", tol=1e-5)


# the networks whose forwards use a formulation for one backend (routed and column 2-D convs),
# and two without; the GRU and GPT forwards have none (their gradients are cross-checked in
# test_recurrent.py and test_attention.py)
@pytest.mark.parametrize("name", ["cnn2d", "digits_cnn", "cnn", "mlp", "resnet1d"])
def test_autodiff_of_the_forward_equals_the_twin_and_the_hand_written_backward(name):
    net, params, state, x, y = _setup(name)
    v = S.variants(net)
    loss_a, grads_a = jax.jit(v["a"])(params, state, x, y)                # jax.grad of bpjax's forward
    loss_b, grads_b = jax.jit(v["b"])(params, state, x, y)                # jax.grad of the plain twin
    loss_c, grads_c = jax.jit(v["c"])(params, state, x, y)                # hand-written
    np.testing.assert_allclose([loss_a, loss_c], [loss_b, loss_b], rtol=1e-5)
    _close(grads_a, grads_b, f"{name}: autodiff of bpjax vs of the twin")
    _close(grads_c, grads_a, f"{name}: hand-written vs autodiff")


# ----------------------------------------------------------------------------- the jaxpr


def _convs(jaxpr):
    """Every conv_general_dilated equation in ``jaxpr`` and in the jaxprs nested in it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            found.append(eqn)
        for value in eqn.params.values():
            for v in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(v, "jaxpr", v)
                if hasattr(inner, "eqns"):
                    found += _convs(inner)
    return found


def _kernel_taller_than_input(eqn) -> bool:
    """Whether the (dilated) kernel of a convolution is larger than its (dilated) input along
    some spatial axis: the case neither YNNPACK nor Eigen takes, run by XLA as a naive loop."""
    dn = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    for i, (la, ra) in enumerate(zip(dn.lhs_spec[2:], dn.rhs_spec[2:])):
        n = eqn.params["lhs_dilation"][i] * (lhs[la] - 1) + 1
        k = eqn.params["rhs_dilation"][i] * (rhs[ra] - 1) + 1
        if k > n:
            return True
    return False


def _routed_layer():
    layer = bp.conv(16, 3, padding="SAME", activation="relu")                # 16 → 16: routed to Eigen
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 6, 16)), jnp.float32)
    params, _, _ = layer.init(jax.random.PRNGKey(0), x.shape[1:])
    return layer, params, x


def test_the_routed_conv_is_routed_in_a_program_for_the_cpu_only():
    """The traced forward holds both formulations; lowering keeps the platform's: the extra row
    for the CPU, the plain convolution for CUDA and TPU (exported from this machine)."""
    from jax import export
    layer, params, x = _routed_layer()
    g = Geometry((1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 1)
    assert cpu_conv.eigen_rows(x.shape, params["w"].shape, x.dtype, g) == 1
    forward = jax.jit(lambda p, x: layer.forward(p, (), x)[0])
    pads = {platform: [line for line in export.export(forward, platforms=[platform])(params, x).mlir_module()
                       .splitlines() if "stablehlo.convolution" in line] for platform in ("cpu", "cuda", "tpu")}
    assert len(pads["cpu"]) == 1 and "pad = [[1, 2], [1, 1]]" in pads["cpu"][0], pads["cpu"]   # the extra row
    for platform in ("cuda", "tpu"):
        assert len(pads[platform]) == 1 and "pad = [[1, 1], [1, 1]]" in pads[platform][0], pads[platform]


@pytest.mark.parametrize("impl", ["auto", "lax", "routed", "columns"])
def test_autodiff_of_a_2d_conv_forward_has_no_kernel_taller_than_its_input(impl):
    layer = bp.conv(16, 3, padding="SAME", activation="relu", impl=impl)
    _, params, x = _routed_layer()

    def loss(p, x):
        return jnp.sum(layer.forward(p, (), x)[0] ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x).jaxpr
    convs = _convs(jaxpr)
    assert len(convs) >= 2                                          # dW and dx (and the forward)
    assert not [e for e in convs if _kernel_taller_than_input(e)]


def test_the_check_itself_finds_the_taller_kernel():
    """Autodiff straight through the extra row (no custom_jvp) gives the pathological dW."""
    _, params, x = _routed_layer()
    g = Geometry((1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 1)

    def routed_without_custom_jvp(w):
        return jnp.sum(cpu_conv.routed_conv.fun(x, w, g, 1) ** 2)  # the undecorated primal

    convs = _convs(jax.make_jaxpr(jax.grad(routed_without_custom_jvp))(params["w"]).jaxpr)
    assert [e for e in convs if _kernel_taller_than_input(e)]


def test_autodiff_of_the_columns_forward_does_not_loop_over_chunks():
    """The forward by columns is a lax.map over chunks of the batch; autodiff sees the plain
    convolution, so no scan or while loop is left outside the custom_jvp's primal."""
    layer = bp.conv(8, 3, padding="SAME", impl="columns")
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 5, 5, 3)), jnp.float32)
    params, _, _ = layer.init(jax.random.PRNGKey(0), x.shape[1:])
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(layer.forward(p, (), x)[0] ** 2)))(params).jaxpr

    def loops(jaxpr):
        n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("scan", "while"):
                n += 1
            if eqn.primitive.name.startswith("custom_jvp"):
                continue                                            # the primal: columns, chunked
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    n += loops(inner)
        return n

    assert loops(jaxpr) == 0


def test_forward_mode_and_second_order_still_work():
    """The tangent rule is a plain convolution, so jvp (and grad of grad) go through it."""
    layer, params, x = _routed_layer()
    f = lambda w: jnp.sum(layer.forward({**params, "w": w}, (), x)[0] ** 2)
    w = params["w"]
    dw = jnp.asarray(np.random.default_rng(2).standard_normal(w.shape), jnp.float32)
    _, tangent = jax.jvp(f, (w,), (dw,))
    assert np.isclose(float(tangent), float(jnp.vdot(jax.grad(f)(w), dw)), rtol=1e-4)
    hvp = jax.grad(lambda w: jnp.vdot(jax.grad(f)(w), dw))(w)
    assert hvp.shape == w.shape and bool(jnp.all(jnp.isfinite(hvp)))
