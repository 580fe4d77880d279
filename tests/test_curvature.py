"""bp.backward_quantities and bp.ggn_vector_product against autodiff, in float64, to 1e-10.

The reference is built here from JAX autodiff of the network's forward: J = jacrev of the
output y (N, E) with respect to all params flattened, H = hessian of the loss in y, and
G = Jᵀ H J (its diagonal, its per-example diagonals, its blocks). Per-example gradients are
vmapped jax.grad of one example's loss. Every layer with params appears once in backward_quantities'
dict, in forward order, which is the order in which ravel_pytree flattens the params: the
quantities of all layers, flattened and joined, are compared with the reference's, flattened.

Cheap by construction: tiny shapes, and per network one jitted function computing every
quantity, the GGN-vector product and the autodiff reference together (one compile), cached
and shared by the tests that read it. Nothing runs op by op.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

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
ALL_EXACT = ("batch_grad", "batch_l2", "sum_grad_squared", "variance", "diag_ggn", "batch_diag_ggn")
#: What the loss cases, the norms and the GPT compute: the quantities that depend on the loss's
#: Hessian (their per-example split is the one the first-order quantities use, with another dy).
SECOND_ORDER = ("diag_ggn", "batch_diag_ggn")


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _joined(q, name, batch=False, xp=np):
    """One quantity of every layer, flattened and joined in forward order (per example: (N, P));
    with NumPy (``xp``) on the host, jax.numpy under jit."""
    parts = []
    for v in q.values():
        for a in jax.tree_util.tree_leaves(v[name]):
            parts.append(a.reshape(a.shape[0], -1) if batch else a.reshape(-1))
    return xp.concatenate(parts, axis=-1)


def _reference(model, loss, params, state, x, target, train=True) -> dict:
    """Autodiff's per-example gradients ``grads_n`` (N, P) and GGNs ``ggn_n`` (N, P, P), and
    ``off``, max |H| off the per-example blocks (zero: H is per example). Traced (under jit).

    No layer here mixes examples, so J_n, the rows of J that belong to y_n, is also the Jacobian
    of example n alone: g_n = J_nᵀ ∂ℓ_n/∂y_n with ℓ_n the loss of example n alone."""
    flat, unravel = ravel_pytree(params)

    def out(theta):
        return model.forward(unravel(theta), state, x, train=train)[0]

    y = out(flat)
    n, e = y.shape[0], y[0].size
    jac = jax.jacrev(out)(flat).reshape(n, e, -1)                                    # (N, E, P)
    hess = jax.hessian(lambda y: loss.forward(y, target)[0])(y).reshape(n, e, n, e)
    idx = jnp.arange(n)
    blocks = hess[idx, :, idx, :]                                                    # (N, E, E)
    off = jnp.max(jnp.abs(hess * (1 - jnp.eye(n, dtype=hess.dtype))[:, None, :, None]))
    one = jax.vmap(jax.grad(lambda y1, t1: loss.forward(y1[None], t1[None])[0]))(y, target)  # (N, ...) ∂ℓ_n/∂y_n
    grads_n = jnp.einsum("nep,ne->np", jac, one.reshape(n, e))                      # (N, P)
    return {"grads_n": grads_n, "ggn_n": jnp.einsum("nep,nef,nfq->npq", jac, blocks, jac), "off": off}


def _targets(gen, loss, y_shape):
    """Labels (N, ...) for softmax cross-entropy, values in [0, 1) like y for the others."""
    if loss.name == "softmax_cross_entropy":
        return gen.integers(0, y_shape[-1], y_shape[:-1])
    return gen.uniform(size=y_shape)


def _block(ggn, params, index):
    """The rows/columns of G that belong to the leaf ``index`` of ravel_pytree's order."""
    sizes = [a.size for a in jax.tree_util.tree_leaves(params)]
    lo = int(np.sum(sizes[:index]))
    return ggn[lo:lo + sizes[index], lo:lo + sizes[index]]


# ----------------------------------------------------------------------------- the networks


def mlp():
    return bp.sequential(bp.dense(4), bp.tanh(), bp.dense(3)), (3,)


class Case(NamedTuple):
    """A network (``make() -> (model, one example's input shape)``), its loss, and how it runs."""

    make: Callable
    loss: Callable = bp.softmax_cross_entropy
    train: bool = True
    vocab: int = 0                  # integer inputs in [0, vocab) (0: float inputs)
    quantities: tuple = ALL_EXACT
    batch: int = 3
    gvp: bool = False               # check ggn_vector_product too (each loss, and the MLP and CNN)


CASES = {
    "mlp": Case(mlp, gvp=True),
    "cnn1d": Case(lambda: (models.cnn(num_classes=3, channels=2), (8, 1)), gvp=True),
    "cnn2d": Case(lambda: (bp.sequential(bp.conv(2, 3), bp.relu(), bp.conv(2, 2, strides=2, padding="VALID"),
                                         bp.relu(), bp.flatten(), bp.dense(3)), (4, 4, 1))),
    "gru": Case(lambda: (models.gru(num_classes=3, hidden=2), (3, 2))),
    "norms": Case(lambda: (bp.sequential(bp.dense(4), bp.residual(bp.sequential(bp.layer_norm(), bp.dense(4),
                                                                                 bp.tanh())),
                                         bp.rms_norm(), bp.batch_norm(), bp.group_norm(2), bp.dense(3)), (3,)),
                  train=False, quantities=SECOND_ORDER),
    "gpt": Case(lambda: (bp.gpt(3, dim=2, num_heads=1, num_layers=1, max_len=2, mlp_ratio=1), (2,)), vocab=3,
                batch=2, quantities=SECOND_ORDER),
    "squared_error": Case(mlp, bp.squared_error, quantities=SECOND_ORDER, gvp=True),
    "mean_squared_error": Case(mlp, bp.mean_squared_error, quantities=SECOND_ORDER, gvp=True),
    "huber": Case(mlp, lambda: bp.huber(0.5), quantities=SECOND_ORDER, gvp=True),
    "sigmoid_binary_cross_entropy": Case(mlp, bp.sigmoid_binary_cross_entropy, quantities=SECOND_ORDER, gvp=True),
    "deep_linear": Case(lambda: (bp.sequential(bp.dense(3), bp.dense(2)), (4,)), bp.squared_error,
                        quantities=("batch_grad", "kflr"), batch=4),
}


@functools.lru_cache(maxsize=None)
def _data(name):
    """``(model, loss, params, state, x, target)`` of one case, drawn on the host in float64 (x and
    target stay NumPy arrays: jnp.asarray would compile a program per shape)."""
    case = CASES[name]
    model, in_shape = case.make()
    loss = case.loss()
    gen = rng(name)
    params, state, out_shape = init_params(model, in_shape, gen, jnp.float64)
    if case.vocab:
        x = gen.integers(0, case.vocab, (case.batch, *in_shape))
    else:
        x = gen.standard_normal((case.batch, *in_shape))
    return model, loss, params, state, x, _targets(gen, loss, (case.batch, *out_shape))


@functools.lru_cache(maxsize=None)
def _computed(name) -> dict:
    """One compile per case: backward_quantities' ``grads`` and ``q``, ``gv`` = G v for a random
    ``v`` (P,), and the autodiff reference (``_reference``), all from one jitted function."""
    case = CASES[name]
    model, loss, params, state, x, t = _data(name)
    v = rng(name + "v").standard_normal(sum(a.size for a in jax.tree_util.tree_leaves(params)))
    quantities = bp.backward_quantities(model, loss, case.quantities, train=case.train)
    gvp = bp.ggn_vector_product(model, loss, train=case.train)

    def everything(params, state, x, t, v):
        _, grads, q = quantities(params, state, x, t)
        gv = ravel_pytree(gvp(params, state, x, t, ravel_pytree(params)[1](v)))[0] if case.gvp else None
        return dict(grads=ravel_pytree(grads)[0], q=q, gv=gv, **_reference(model, loss, params, state, x, t,
                                                                            case.train))

    return jax.device_get({**jax.jit(everything)(params, state, x, t, v), "v": v})


@pytest.mark.parametrize("name", CASES)
def test_every_quantity_and_the_ggn_vector_product_match_autodiff(name):
    """Every first-order quantity, diag_ggn, batch_diag_ggn and G v, for every kind of network
    (MLP, MNIST-1D CNN, 2-D CNN, GRU, residual + every norm layer in eval, a GPT with its
    tied table) and every loss with a known Hessian."""
    r = _computed(name)
    q, grads_n, ggn_n = r["q"], r["grads_n"], r["ggn_n"]
    assert float(r["off"]) == 0.0                                                  # H is per example
    n = grads_n.shape[0]
    diag_n = np.diagonal(ggn_n, axis1=1, axis2=2)                                    # (N, P)
    want = {"batch_grad": grads_n, "sum_grad_squared": np.sum(grads_n ** 2, 0),
            "variance": np.var(grads_n, axis=0), "diag_ggn": np.sum(diag_n, 0), "batch_diag_ggn": diag_n}
    if "batch_l2" in CASES[name].quantities:
        sizes = [sum(a[0].size for a in jax.tree_util.tree_leaves(v["batch_grad"])) for v in q.values()]
        per_layer = np.split(grads_n, np.cumsum(sizes)[:-1], axis=1)                 # (N, P_layer) each
        want["batch_l2"] = np.stack([np.sum(g ** 2, 1) for g in per_layer], 1)       # (N, layers)
    errors = {"grads": _rel(r["grads"], np.mean(grads_n, 0))}
    if CASES[name].gvp:
        errors["gv"] = _rel(r["gv"], np.sum(ggn_n, 0) @ r["v"])
    for quantity in CASES[name].quantities:
        if quantity == "batch_l2":
            errors[quantity] = _rel(np.stack([v["batch_l2"] for v in q.values()], 1), want[quantity])
        elif quantity in want:
            errors[quantity] = _rel(_joined(q, quantity, batch=quantity.startswith("batch")), want[quantity])
    assert max(errors.values()) < TOL, errors
    if name == "gpt":
        assert list(q) == ["gpt"]           # one entry: its tied table counts both uses
    assert n == CASES[name].batch


# ----------------------------------------------------------------------------- Kronecker factors


def test_kflr_of_a_deep_linear_network_is_its_exact_ggn_block():
    """With no nonlinearity and squared error, every example's output-error factor is the same,
    so kron(a, g) is the GGN block itself (Martens & Grosse 2015); g is also the bias's block."""
    r = _computed("deep_linear")
    params = _data("deep_linear")[2]
    ggn = np.sum(r["ggn_n"], 0)
    for i, v in enumerate(r["q"].values()):                    # leaves per layer: b, w
        assert _rel(np.kron(v["kflr"]["b"].a, v["kflr"]["b"].g), _block(ggn, params, 2 * i)) < TOL
        assert _rel(np.kron(v["kflr"]["w"].a, v["kflr"]["w"].g), _block(ggn, params, 2 * i + 1)) < TOL


#: The first layer whose factors are checked, its input (one example), and its input's kind.
FIRST = {
    "conv": (lambda: bp.conv(2, 3, strides=2, padding=1), (5, 2), 0),
    "conv_transpose": (lambda: bp.conv_transpose(2, 3, strides=2, padding=1), (3, 2), 0),
    "embedding": (lambda: bp.embedding(5, 2), (3,), 5),
}


@functools.lru_cache(maxsize=None)
def _kronecker(kind) -> dict:
    """For ``[first, tanh, flatten, dense(3)]``, in one compile: kflr in both variants (an
    embedding: expand only), the first layer's patches p_no by autodiff (``w``'s Jacobian of its
    output channel 0: y_no0 = p_no · W[:, 0] + b_0), the dense layer's input h, and the exact
    error factors of ``_error_factors``."""
    make_first, in_shape, vocab = FIRST[kind]
    layers = (make_first(), bp.tanh(), bp.flatten(), bp.dense(3))
    model, loss = bp.sequential(*layers), bp.softmax_cross_entropy()
    gen = rng(kind)
    params, state, out_shape = init_params(model, in_shape, gen, jnp.float64)
    n = 3
    x = gen.integers(0, vocab, (n, *in_shape)) if vocab else gen.standard_normal((n, *in_shape))
    t = _targets(gen, loss, (n, *out_shape))
    variants = ("expand",) if kind == "embedding" else ("expand", "reduce")

    def everything(params, x, t):
        out = {v: bp.backward_quantities(model, loss, ["kflr"], kronecker=v)(params, state, x, t)[2]
               for v in variants}
        y0 = layers[0].forward(params[0], (), x)[0]                                  # (N, *O, C)
        out["h"] = layers[2].forward((), (), layers[1].forward((), (), y0)[0])[0]       # (N, D) the dense's x
        out.update(_error_factors(layers, loss, params, y0, t))
        if not vocab:
            w = params[0]["w"]
            jac = jax.jacrev(lambda w: layers[0].forward({**params[0], "w": w}, (), x)[0][..., 0])(w)
            out["patches"] = jac[..., 0].reshape(n, -1, int(np.prod(w.shape[:-1])))   # (N, ∏O, ∏K·C_in)
        return out

    return jax.device_get({**jax.jit(everything)(params, x, t), "x": x, "n": n})


def _error_factors(layers, loss, params, y0, t) -> dict:
    """Exact GGN blocks in a bias ε_o (∏O, C) added at output position o of the first layer only,
    J_no = ∂y_n/∂ε_o by autodiff of the rest of the network, H_n the loss Hessian's blocks::

        "positions"    Σ_n Σ_o J_noᵀ H_n J_no                 the expand variant's g  (C, C)
        "first_bias"   Σ_n (Σ_o J_no)ᵀ H_n (Σ_o J_no)         the first layer's bias block (C, C)
        "dense_bias"   Σ_n H_n                                the last dense's bias block: ∂y/∂b = I
    """
    n, c = y0.shape[0], y0.shape[-1]

    def out(eps):
        h = y0 + eps.reshape(y0.shape[1:])[None]
        for layer, p in zip(layers[1:], params[1:]):
            h = layer.forward(p, (), h)[0]
        return h

    eps = jnp.zeros((y0[0].size // c, c))
    y = out(eps)
    jac = jax.jacrev(out)(eps).reshape(n, y.shape[-1], -1, c)                        # (N, K, O, C)
    idx = jnp.arange(n)
    blocks = jax.hessian(lambda y: loss.forward(y, t)[0])(y)[idx, :, idx, :]        # (N, K, K)
    bias = jnp.sum(jac, 2)                                                           # (N, K, C)
    return {"positions": jnp.einsum("nkoc,nkl,nlod->cd", jac, blocks, jac),
            "first_bias": jnp.einsum("nkc,nkl,nld->cd", bias, blocks, bias), "dense_bias": jnp.sum(blocks, 0)}


@pytest.mark.parametrize("kind", FIRST)
def test_kflr_factors_of_conv_conv_transpose_embedding_and_dense(kind):
    """The first layer's a: the mean of p pᵀ over examples and positions (expand) or of the
    per-example mean patch (reduce), the patches by autodiff; an embedding's: how often each
    id occurs, over N·T. Its g: for expand, the sum over positions of the exact error factors;
    for reduce, the exact GGN block of its bias. The dense layer (used once per example):
    a = h hᵀ/N, g = its bias's block (``_error_factors``)."""
    r = _kronecker(kind)
    n = r["n"]
    first, dense = (v["kflr"] for v in r["expand"].values())
    if kind == "embedding":
        ids = np.asarray(r["x"]).reshape(-1)
        assert first["table"].a.shape == (5,)
        assert _rel(first["table"].a, np.bincount(ids, minlength=5) / ids.size) < TOL
    else:
        p = r["patches"]
        assert _rel(first["w"].a, np.einsum("nop,noq->pq", p, p) / (p.shape[0] * p.shape[1])) < TOL
        reduced = list(r["reduce"].values())[0]["kflr"]
        mean = np.mean(p, 1)
        assert _rel(reduced["w"].a, mean.T @ mean / n) < TOL
        assert _rel(reduced["w"].g, r["first_bias"]) < TOL and _rel(reduced["b"].g, r["first_bias"]) < TOL
        assert _rel(first["b"].a, np.ones((1, 1))) < TOL
    assert _rel(first["table" if kind == "embedding" else "w"].g, r["positions"]) < TOL
    h = r["h"]
    assert _rel(dense["w"].a, h.T @ h / n) < TOL
    assert _rel(dense["b"].g, r["dense_bias"]) < TOL and _rel(dense["w"].g, r["dense_bias"]) < TOL


# ----------------------------------------------------------------------------- Monte Carlo

MC_SAMPLES = 512
#: |mean − exact| / (its standard error) above which an MC estimate is wrong. Over the K draws
#: the mean of K independent unbiased estimates is close to normal with standard error σ/√K
#: (σ from the draws themselves): P(|z| > 5) ≈ 6e-7 per statistic, ≈ 3e-5 over the ~50 here.
Z_MAX = 5.0


def _uniform_sampler(loss, y, res, key):
    """The wrong sampler: labels drawn uniformly, not from the model's predictive distribution."""
    p, scale = loss_hessian._softmax_parts(y, res)
    draw = jax.random.randint(key, (p.shape[0],), 0, p.shape[-1])
    return (jnp.sqrt(scale) * (p - jax.nn.one_hot(draw, p.shape[-1], dtype=p.dtype))).reshape(y.shape)


def _mc_stats(q, diag, kron):
    """diag_ggn's (or its MC estimate's) entries and every layer's kron g, joined.           (S,)"""
    return jnp.concatenate([_joined(q, diag, xp=jnp)] + [v[kron]["w"].g.reshape(-1) for v in q.values()])


def _mc_data():
    model, loss, params, state, x, t = _data("mlp")
    return model, loss, params, state, 3 * x, t                  # a peaked predictive distribution


@functools.lru_cache(maxsize=None)
def _mc_exact():
    model, loss, params, state, x, t = _mc_data()
    f = bp.backward_quantities(model, loss, ["diag_ggn", "kflr"])
    return np.asarray(jax.jit(lambda *a: _mc_stats(f(*a)[2], "diag_ggn", "kflr"))(params, state, x, t))


def _mc_z():
    """max |z| over the statistics: K one-sample estimates of diag_ggn_mc and every layer's kfac
    g (vmapped over the keys, one compile), their mean against diag_ggn and kflr's g."""
    model, loss, params, state, x, t = _mc_data()
    f = bp.backward_quantities(model, loss, ["diag_ggn_mc", "kfac"], mc_samples=1)

    def draws(params, state, x, t, key):                                            # (K, S)
        keys = jax.random.split(key, MC_SAMPLES)
        return jax.vmap(lambda k: _mc_stats(f(params, state, x, t, key=k)[2], "diag_ggn_mc", "kfac"))(keys)

    d = np.asarray(jax.jit(draws)(params, state, x, t, jax.random.PRNGKey(0)))
    err = np.std(d, axis=0) / np.sqrt(MC_SAMPLES)
    return float(np.max(np.abs(np.mean(d, axis=0) - _mc_exact()) / err))


def test_monte_carlo_quantities_are_right_in_expectation_and_a_wrong_sampler_fails(monkeypatch):
    """diag_ggn_mc and kfac's g are unbiased: their mean over K draws is within Z_MAX standard
    errors of diag_ggn and kflr's g; labels drawn uniformly are many standard errors off."""
    z = _mc_z()
    assert z < Z_MAX, z
    monkeypatch.setattr(loss_hessian, "_one_sample", _uniform_sampler)
    z = _mc_z()
    assert z > 2 * Z_MAX, z


# ----------------------------------------------------------------------------- refusals


def _shapes(quantities, name, **kw):
    """backward_quantities traced, not compiled, on the case ``name`` (its refusals are raised while tracing)."""
    model, loss, params, state, x, t = _data(name)
    return jax.eval_shape(bp.backward_quantities(model, loss, quantities, **kw), params, state, x, t)


def test_kronecker_refuses_layers_without_a_rule_by_name():
    with pytest.raises(ValueError, match=r"sequential\[0\] \(gru\): no Kronecker factors: its weights act "
                                         r"through a recurrence"):
        _shapes(["kflr"], "gru")
    with pytest.raises(ValueError, match=r"kfac: gpt: no Kronecker factors: its token table is used twice"):
        _shapes(["kflr"], "gpt")
    model = bp.sequential(bp.multi_head_attention(1), bp.flatten(), bp.dense(3))
    params, state, _ = init_params(model, (2, 2), rng("attention"), jnp.float64)
    with pytest.raises(ValueError, match=r"sequential\[0\] \(multi_head_attention\): no Kronecker factors: its "
                                         r"projections' inputs"):
        jax.eval_shape(bp.backward_quantities(model, bp.softmax_cross_entropy(), ["kflr"]),
                       params, state, np.ones((2, 2, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"sequential\[3\] \(batch_norm\) mixes examples in training"):
        _shapes(["diag_ggn"], "norms")
    gen = rng("fused")
    for layer, why in ((bp.conv(2, 3, activation="relu"), "a fused activation"),
                       (bp.conv(2, 3, groups=2), "with groups > 1")):
        model = bp.sequential(layer, bp.flatten(), bp.dense(3))
        params, state, _ = init_params(model, (3, 2), gen, jnp.float64)
        with pytest.raises(ValueError, match=rf"sequential\[0\] \(conv\): {why}"):
            jax.eval_shape(bp.backward_quantities(model, bp.softmax_cross_entropy(), ["kfac"]),
                           params, state, jnp.ones((2, 3, 2)), jnp.array([0, 1]), key=jax.random.PRNGKey(0))
    model = bp.sequential(bp.embedding(5, 2), bp.flatten(), bp.dense(3))
    params, state, _ = init_params(model, (2,), gen, jnp.float64)
    with pytest.raises(ValueError, match=r"sequential\[0\] \(embedding\): the reduce variant's factor a"):
        jax.eval_shape(bp.backward_quantities(model, bp.softmax_cross_entropy(), ["kflr"], kronecker="reduce"),
                       params, state, jnp.ones((2, 2), jnp.int32), jnp.array([0, 1]))


def _linear(name):
    """A user's layer y = x W, made with make_layer and named ``name``, naming no rule."""

    def init(key, in_shape):
        return {"w": jnp.zeros((in_shape[-1], 3))}, (), (*in_shape[:-1], 3)

    def forward(params, state, x, *, key=None, train=True):
        return x @ params["w"], state, (x,)                                          # (N, 3)

    def backward(params, res, dy):
        (x,) = res
        return {"w": x.T @ dy}, dy @ params["w"].T                                   # (D, 3), (N, D)

    return bp.make_layer(name, init, forward, backward)


@pytest.mark.parametrize("name", ["dense", "conv", "gru"])
def test_the_rules_go_with_the_layer_and_the_loss_not_with_their_names(name):
    """A layer of one's own named like a built-in one gets no Kronecker rule of it (the rule is
    the one its factory names, make_layer(..., per_example=, curvature=)), and a loss named like
    a built-in one no Hessian (make_loss(..., hessian=)): both refused, by name."""
    model = bp.sequential(_linear(name))
    params, state, _ = init_params(model, (2,), rng(name), jnp.float64)
    x, t = np.ones((2, 2)), np.zeros((2, 3))
    with pytest.raises(ValueError, match=rf"kfac: sequential\[0\] \({name}\): no Kronecker factors: its "
                                         r"factory names no Kronecker rule"):
        jax.eval_shape(bp.backward_quantities(model, bp.squared_error(), ["kflr"]), params, state, x, t)
    builtin = bp.squared_error()
    for own in (bp.make_loss("squared_error", builtin.forward, builtin.backward),
                bp.Loss(builtin.forward, builtin.backward, "squared_error")):
        with pytest.raises(ValueError, match=r"expected a loss whose Hessian .* got 'squared_error' with hessian=None"):
            bp.backward_quantities(model, own, ["diag_ggn"])
        with pytest.raises(ValueError, match=r"got 'squared_error' with hessian=None"):
            bp.ggn_vector_product(model, own)
    assert builtin.hessian == "squared_error" and bp.Loss(builtin.forward, builtin.backward).hessian is None


def test_bad_arguments_are_refused():
    model, _ = mlp()
    with pytest.raises(ValueError, match="expected quantities among"):
        bp.backward_quantities(model, bp.softmax_cross_entropy(), ["diag_hessian"])
    with pytest.raises(ValueError, match="expected kronecker to be one of"):
        bp.backward_quantities(model, bp.softmax_cross_entropy(), ["kfac"], kronecker="both")
    with pytest.raises(ValueError, match="expected key= to draw the sampled cotangents of diag_ggn_mc"):
        _shapes(["diag_ggn_mc"], "mlp")


@pytest.mark.parametrize("name", ["mlp", "cnn2d", "norms"])
def test_the_sums_without_the_per_example_gradients_equal_the_checked_ones(name):
    """Asked without batch_grad and batch_diag_ggn, the first-order sums and diag_ggn of a dense
    layer on rows come from (x²)ᵀ(dy²) and ‖x_n‖²‖dy_n‖² (no g_n built): equal to the values the
    test above checks against autodiff."""
    model, loss, params, state, x, t = _data(name)
    asked = ["variance", "sum_grad_squared", "batch_l2", "diag_ggn"]
    _, _, q = jax.jit(bp.backward_quantities(model, loss, asked, train=CASES[name].train))(params, state, x, t)
    checked = _computed(name)["q"]
    for label in checked:
        for quantity in asked:
            if quantity in checked[label]:
                for a, b in zip(jax.tree_util.tree_leaves(q[label][quantity]),
                                jax.tree_util.tree_leaves(checked[label][quantity])):
                    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14, err_msg=f"{name} {label} {quantity}")
