"""bp.backward_quantities and bp.ggn_vector_product against autodiff, in float64, to 1e-10.

The reference is built here from JAX autodiff of the network's forward: J = jacrev of the
output y (N, E) with respect to all params flattened, H = hessian of the loss in y, and
G = Jᵀ H J (its diagonal, its per-example diagonals, its blocks). Per-example gradients are
vmapped jax.grad of one example's loss. Every layer with params appears once in backward_quantities'
dict, in forward order, which is the order in which ravel_pytree flattens the params: the
quantities of all layers, flattened and joined, are compared with the reference's, flattened.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import bpjax as bp
from bpjax import models
from bpjax.curvature import loss_hessian
from helpers import init_params, rng

TOL = 1e-10
ALL_EXACT = ["batch_grad", "batch_l2", "sum_grad_squared", "variance", "diag_ggn", "batch_diag_ggn"]


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _joined(q, name, batch=False):
    """One quantity of every layer, flattened and joined in forward order (per example: (N, P))."""
    parts = []
    for v in q.values():
        for a in jax.tree_util.tree_leaves(v[name]):
            parts.append(a.reshape(a.shape[0], -1) if batch else a.reshape(-1))
    return jnp.concatenate(parts, axis=-1)


def _reference(model, loss, params, state, x, target, train=True):
    """Autodiff's per-example gradients (N, P), G (P, P) and the per-example GGNs (N, P, P)."""
    flat, unravel = ravel_pytree(params)

    def out(theta):
        return model.forward(unravel(theta), state, x, train=train)[0]

    y = out(flat)
    n, e = y.shape[0], y[0].size
    jac = jax.jacrev(out)(flat).reshape(n, e, -1)                                    # (N, E, P)
    hess = jax.hessian(lambda y: loss.forward(y, target)[0])(y).reshape(n, e, n, e)
    blocks = jnp.stack([hess[i, :, i, :] for i in range(n)])                        # (N, E, E)
    off = hess.reshape(n * e, n * e) - jax.scipy.linalg.block_diag(*blocks)
    assert float(jnp.max(jnp.abs(off))) == 0.0                                      # H is per example
    ggn_n = jnp.einsum("nep,nef,nfq->npq", jac, blocks, jac)

    def one_loss(theta, x1, t1):
        y1 = model.forward(unravel(theta), state, x1[None], train=train)[0]
        return loss.forward(y1, t1[None])[0]

    grads_n = jax.vmap(jax.grad(one_loss), in_axes=(None, 0, 0))(flat, x, target)  # (N, P)
    return grads_n, ggn_n, unravel


def _check_exact(model, loss, params, state, x, target, quantities=ALL_EXACT, train=True):
    f = jax.jit(lambda p, s, x, t: bp.backward_quantities(model, loss, quantities, train=train)(p, s, x, t))
    (value, _), grads, q = f(params, state, x, target)
    grads_n, ggn_n, _ = _reference(model, loss, params, state, x, target, train)
    n = grads_n.shape[0]
    assert _rel(ravel_pytree(grads)[0], jnp.mean(grads_n, 0)) < TOL
    diag_n = jnp.diagonal(ggn_n, axis1=1, axis2=2)                                   # (N, P)
    want = {"batch_grad": grads_n, "sum_grad_squared": jnp.sum(grads_n ** 2, 0),
            "variance": jnp.var(grads_n, axis=0), "diag_ggn": jnp.sum(diag_n, 0), "batch_diag_ggn": diag_n}
    for name in quantities:
        if name == "batch_l2":
            got = jnp.stack([v["batch_l2"] for v in q.values()], 1)                     # (N, layers)
            ref = jnp.stack([jnp.sum(a.reshape(n, -1) ** 2, 1) for a in _split(q, grads_n)], 1)
            assert _rel(got, ref) < TOL, name
        else:
            got = _joined(q, name, batch=name.startswith("batch"))
            assert _rel(got, want[name]) < TOL, name
    return q, ggn_n


def _split(q, grads_n):
    """The reference's (N, P) per-example gradients cut into the layers of ``q``."""
    sizes = [sum(a[0].size for a in jax.tree_util.tree_leaves(v["batch_grad"])) for v in q.values()]
    return jnp.split(grads_n, np.cumsum(sizes)[:-1], axis=1)


def _labels(gen, n, k, shape=()):
    return jnp.asarray(gen.integers(0, k, (n, *shape)))


# ----------------------------------------------------------------------------- the networks


def mlp():
    return bp.sequential(bp.dense(4), bp.tanh(), bp.dense(3)), (3,), (3,)


def cnn1d():
    return models.cnn(num_classes=3, channels=2), (12, 1), (3,)


def cnn2d():
    return bp.sequential(bp.conv(2, 3), bp.relu(), bp.conv(2, 2, strides=2, padding="VALID"), bp.relu(),
                         bp.flatten(), bp.dense(3)), (4, 4, 1), (3,)


def gru():
    return models.gru(num_classes=3, hidden=3), (3, 2), (3,)


def ln_residual():
    return bp.sequential(bp.dense(4), bp.residual(bp.sequential(bp.layer_norm(), bp.dense(4), bp.tanh())),
                         bp.rms_norm(), bp.dense(3)), (3,), (3,)


@pytest.mark.parametrize("make", [mlp, cnn1d, cnn2d, gru, ln_residual])
def test_exact_quantities_match_autodiff(make):
    model, in_shape, _ = make()
    gen = rng(make.__name__)
    params, state, _ = init_params(model, in_shape, gen, jnp.float64)
    x = jnp.asarray(gen.standard_normal((3, *in_shape)))
    _check_exact(model, bp.softmax_cross_entropy(), params, state, x, _labels(gen, 3, 3))


def test_tiny_gpt_with_tied_embedding():
    """One entry for the GPT (its tied table counts both uses), checked whole against autodiff."""
    model = bp.gpt(3, dim=2, num_heads=1, num_layers=1, max_len=2, mlp_ratio=1)
    gen = rng("gpt")
    params, state, _ = init_params(model, (2,), gen, jnp.float64)
    ids = jnp.asarray(gen.integers(0, 3, (2, 2)))
    q, _ = _check_exact(model, bp.softmax_cross_entropy(), params, state, ids, _labels(gen, 2, 3, (2,)),
                        ["batch_grad", "diag_ggn"])
    assert list(q) == ["gpt"]
    with pytest.raises(ValueError, match=r"kfac: gpt: no Kronecker factors: its token table is used twice"):
        jax.eval_shape(bp.backward_quantities(model, bp.softmax_cross_entropy(), ["kflr"]), params, state, ids, ids)


@pytest.mark.parametrize("loss", [bp.squared_error(), bp.mean_squared_error(), bp.huber(0.5),
                                  bp.sigmoid_binary_cross_entropy()], ids=lambda l: l.name)
def test_every_loss_with_a_known_hessian(loss):
    model, in_shape, out = mlp()
    gen = rng(loss.name)
    params, state, _ = init_params(model, in_shape, gen, jnp.float64)
    x = jnp.asarray(gen.standard_normal((3, *in_shape)))
    target = jnp.asarray(gen.uniform(size=(3, *out)))
    _check_exact(model, loss, params, state, x, target, ["diag_ggn", "batch_diag_ggn"])


def test_norm_layers_in_evaluation_mode_and_batch_norm_refused_in_training():
    model = bp.sequential(bp.dense(4), bp.batch_norm(), bp.group_norm(2), bp.relu(), bp.dense(3))
    gen = rng("norms")
    params, state, _ = init_params(model, (3,), gen, jnp.float64)
    x, t = jnp.asarray(gen.standard_normal((3, 3))), _labels(gen, 3, 3)
    _check_exact(model, bp.softmax_cross_entropy(), params, state, x, t, ["batch_grad", "diag_ggn"], train=False)
    with pytest.raises(ValueError, match=r"sequential\[1\] \(batch_norm\) mixes examples in training"):
        jax.eval_shape(bp.backward_quantities(model, bp.softmax_cross_entropy(), ["diag_ggn"]), params, state, x, t)


def test_ggn_vector_product_matches_autodiff():
    model, in_shape, _ = cnn1d()
    gen = rng("gvp")
    params, state, _ = init_params(model, in_shape, gen, jnp.float64)
    x, t = jnp.asarray(gen.standard_normal((2, *in_shape))), _labels(gen, 2, 3)
    flat, unravel = ravel_pytree(params)
    v = jnp.asarray(gen.standard_normal(flat.shape))
    gv = jax.jit(bp.ggn_vector_product(model, bp.softmax_cross_entropy()))(params, state, x, t, unravel(v))
    _, ggn_n, _ = _reference(model, bp.softmax_cross_entropy(), params, state, x, t)
    assert _rel(ravel_pytree(gv)[0], jnp.sum(ggn_n, 0) @ v) < TOL


# ----------------------------------------------------------------------------- Kronecker factors


def _block(ggn, params, index):
    """The rows/columns of G that belong to the leaf ``index`` of ravel_pytree's order."""
    sizes = [a.size for a in jax.tree_util.tree_leaves(params)]
    lo = int(np.sum(sizes[:index]))
    return ggn[lo:lo + sizes[index], lo:lo + sizes[index]]


def test_kflr_of_a_deep_linear_network_is_its_exact_ggn_block():
    """With no nonlinearity and squared error, every example's output-error factor is the same,
    so kron(a, g) is the GGN block itself (Martens & Grosse 2015); g is also the bias's block."""
    model = bp.sequential(bp.dense(3), bp.dense(2))
    gen = rng("linear")
    params, state, _ = init_params(model, (4,), gen, jnp.float64)
    x, t = jnp.asarray(gen.standard_normal((5, 4))), jnp.asarray(gen.standard_normal((5, 2)))
    _, _, q = bp.backward_quantities(model, bp.squared_error(), ["kflr"])(params, state, x, t)
    _, ggn_n, _ = _reference(model, bp.squared_error(), params, state, x, t)
    ggn = jnp.sum(ggn_n, 0)
    for i, v in enumerate(q.values()):                      # leaves per layer: b, w
        assert _rel(v["kflr"]["b"].dense(), _block(ggn, params, 2 * i)) < TOL
        assert _rel(v["kflr"]["w"].dense(), _block(ggn, params, 2 * i + 1)) < TOL


def _patches(x, kernel, strides, padding):
    """(N, ∏O, ∏K·C_in) by lax's own patch extraction, reordered to W's (κ, c_in) order."""
    r = x.ndim - 2
    dn = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}[r]
    p = jax.lax.conv_general_dilated_patches(x, kernel, strides, padding, dimension_numbers=dn)
    c = x.shape[-1]
    p = p.reshape(*p.shape[:-1], c, int(np.prod(kernel)))                         # (…, C_in, ∏K) lax's order
    return jnp.swapaxes(p, -1, -2).reshape(x.shape[0], -1, c * int(np.prod(kernel)))


@pytest.mark.parametrize("variant", ["expand", "reduce"])
def test_kflr_factors_of_dense_and_conv(variant):
    """a: from the layer's inputs (a conv's patches by lax's patch extraction); g: for the reduce
    variant, and for a dense layer used once per example, the exact GGN block of its bias; for
    expand, the sum over positions of the exact error factors, a block of G over the positions
    (here from a network whose first layer is the conv: G of a bias added at every position)."""
    model = bp.sequential(bp.conv(2, 3, strides=2, padding=1), bp.tanh(), bp.flatten(), bp.dense(3))
    gen = rng(variant)
    params, state, _ = init_params(model, (7, 2), gen, jnp.float64)
    x, t = jnp.asarray(gen.standard_normal((3, 7, 2))), _labels(gen, 3, 3)
    _, _, q = bp.backward_quantities(model, bp.softmax_cross_entropy(), ["kflr"], kronecker=variant)(
        params, state, x, t)
    conv, dense = (v["kflr"] for v in q.values())
    patches = _patches(x, (3,), (2,), [(1, 1)])                                    # (N, O, K·C_in)
    if variant == "reduce":
        mean = jnp.mean(patches, 1)
        a_conv = mean.T @ mean / 3
    else:
        a_conv = jnp.einsum("nop,noq->pq", patches, patches) / patches[:, :, 0].size
    assert _rel(conv["w"].a, a_conv) < TOL
    h = jnp.tanh(jax.lax.conv_general_dilated(x, params[0]["w"], (2,), [(1, 1)],
                                              dimension_numbers=("NWC", "WIO", "NWC")) + params[0]["b"])
    h = h.reshape(3, -1)
    assert _rel(dense["w"].a, h.T @ h / 3) < TOL
    _, ggn_n, _ = _reference(model, bp.softmax_cross_entropy(), params, state, x, t)
    ggn = jnp.sum(ggn_n, 0)
    assert _rel(dense["b"].g, _block(ggn, params, 2)) < TOL and _rel(dense["w"].g, dense["b"].g) < TOL
    if variant == "reduce":
        assert _rel(conv["b"].g, _block(ggn, params, 0)) < TOL
    else:
        assert _rel(conv["w"].g, _expand_error_factor(model, params, state, x, t)) < TOL


def _expand_error_factor(model, params, state, x, t):
    """Σ_n Σ_o J_noᵀ H_n J_no with J_no the Jacobian of y_n in a bias added at output position o
    of the first layer only (autodiff of the forward with that bias as a (O, C) input)."""
    y0 = bp.conv(2, 3, strides=2, padding=1).forward(params[0], (), x)[0]           # (N, O, C)

    def out(eps):
        h = y0 + eps[None]
        for layer, p in zip((bp.tanh(), bp.flatten(), bp.dense(3)), params[1:]):
            h = layer.forward(p, (), h)[0]
        return h

    eps = jnp.zeros(y0.shape[1:])
    jac = jax.jacrev(out)(eps).reshape(x.shape[0], 3, -1, y0.shape[-1])             # (N, K, O, C)
    y = out(eps)
    hess = jax.hessian(lambda y: bp.softmax_cross_entropy().forward(y, t)[0])(y)    # (N, K, N, K)
    blocks = jnp.stack([hess[i, :, i, :] for i in range(x.shape[0])])
    return jnp.einsum("nkoc,nkl,nlod->cd", jac, blocks, jac)


def test_kronecker_refuses_layers_without_a_rule_by_name():
    model, in_shape, _ = gru()
    gen = rng("refuse")
    params, state, _ = init_params(model, in_shape, gen, jnp.float64)
    x, t = jnp.asarray(gen.standard_normal((2, *in_shape))), _labels(gen, 2, 3)
    with pytest.raises(ValueError, match=r"sequential\[0\] \(gru\): no Kronecker factors: its weights act "
                                         r"through a recurrence"):
        jax.eval_shape(bp.backward_quantities(model, bp.softmax_cross_entropy(), ["kflr"]), params, state, x, t)


# ----------------------------------------------------------------------------- Monte Carlo


def _mc_setup():
    model, in_shape, _ = mlp()
    gen = rng("mc")
    params, state, _ = init_params(model, in_shape, gen, jnp.float64)
    x = jnp.asarray(3 * gen.standard_normal((3, *in_shape)))
    return model, params, state, x, _labels(gen, 3, 3)


def _mc_error(model, params, state, x, t) -> tuple:
    """Relative errors of diag_ggn_mc and of kfac's g (4000 samples) against the exact ones."""
    f = bp.backward_quantities(model, bp.softmax_cross_entropy(), ["diag_ggn", "diag_ggn_mc", "kflr", "kfac"],
                               mc_samples=4000)
    _, _, q = jax.jit(f)(params, state, x, t, key=jax.random.PRNGKey(0))
    diag = _rel(_joined(q, "diag_ggn_mc"), _joined(q, "diag_ggn"))
    last = list(q.values())[-1]
    return diag, _rel(last["kfac"]["w"].g, last["kflr"]["w"].g)


def test_monte_carlo_quantities_are_right_in_expectation_and_a_wrong_sampler_fails(monkeypatch):
    """4000 samples: a relative error of about 1/√4000 ≈ 2%; 10% passes the right sampler, and
    fails labels drawn uniformly rather than from the model's predictive distribution."""
    model, params, state, x, t = _mc_setup()
    diag, kfac = _mc_error(model, params, state, x, t)
    assert diag < 0.1 and kfac < 0.1, (diag, kfac)

    def uniform(loss, y, res, key):
        p, scale = loss_hessian._softmax_parts(y, res)
        draw = jax.random.randint(key, (p.shape[0],), 0, p.shape[-1])
        return (jnp.sqrt(scale) * (p - jax.nn.one_hot(draw, p.shape[-1], dtype=p.dtype))).reshape(y.shape)

    monkeypatch.setattr(loss_hessian, "_one_sample", uniform)
    diag, kfac = _mc_error(model, params, state, x, t)
    assert diag > 0.1 and kfac > 0.1, (diag, kfac)


def test_bad_arguments_are_refused():
    model, _, _ = mlp()
    with pytest.raises(ValueError, match="expected quantities among"):
        bp.backward_quantities(model, bp.softmax_cross_entropy(), ["diag_hessian"])
    with pytest.raises(ValueError, match="expected kronecker to be one of"):
        bp.backward_quantities(model, bp.softmax_cross_entropy(), ["kfac"], kronecker="both")
    gen = rng("key")
    params, state, _ = init_params(model, (3,), gen, jnp.float64)
    with pytest.raises(ValueError, match="expected key= to draw the sampled cotangents of diag_ggn_mc"):
        jax.eval_shape(bp.backward_quantities(model, bp.softmax_cross_entropy(), ["diag_ggn_mc"]),
                       params, state, jnp.ones((2, 3)), jnp.array([0, 1]))
