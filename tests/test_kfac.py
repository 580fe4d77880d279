"""The K-FAC optimizer (bpjax.curvature.kfac): its update by hand, its schedule, its mapping of
the factors to the params, that it beats SGD on a small problem, and bpjax train --optimizer kfac."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bpjax as bp
from bpjax import cli
from bpjax.curvature import Kronecker, kfac
from bpjax.curvature.kfac_optimizer import damped_inverses

LAM = 0.05


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _plain(model, loss, example, **kw):
    """K-FAC as one bare preconditioned step: lr 1, no momentum, no clipping, plain damping."""
    return kfac(1.0, model=model, loss=loss, example=example, damping=LAM, damping_mode="plain", momentum=0.0,
                norm_constraint=None, **kw)


@pytest.fixture(scope="module")
def dense_problem():
    model, loss = bp.dense(3), bp.softmax_cross_entropy()
    params, state, _ = model.init(jax.random.PRNGKey(0), (4,))
    params = _f64(params)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 4), jnp.float64)
    y = jnp.arange(16) % 3
    return model, loss, params, state, x, y


def test_one_dense_layer_update_is_the_kronecker_solve_by_hand(dense_problem):
    model, loss, params, state, x, y = dense_problem
    key = jax.random.PRNGKey(2)
    opt = _plain(model, loss, (x[:2], y[:2]))
    value, _, _, grads, factors = opt.factors(params, state, x, y, key=key)
    updates, _ = opt.update(grads, opt.init(params), params, factors=factors)
    # by hand, in float64: A from the inputs, G the sampled GGN factor backward_quantities gives
    (_, _), ref_grads, per_layer = bp.backward_quantities(model, loss, ["kfac"])(params, state, x, y, key=key)
    g = per_layer["dense"]["kfac"]["w"].g
    a = np.asarray(x).T @ np.asarray(x) / x.shape[0]
    eye = lambda k: np.eye(k)                                                   # noqa: E731
    dw, db = np.asarray(ref_grads["w"]), np.asarray(ref_grads["b"])
    g_inv = np.linalg.inv(np.asarray(g) + LAM * eye(3))
    want_w = -np.linalg.inv(a + LAM * eye(4)) @ dw @ g_inv
    want_b = -(db @ g_inv) / (1 + LAM)                                           # the bias: a = [[1]]
    np.testing.assert_allclose(np.asarray(factors[1].a), a, rtol=1e-12, atol=1e-14)   # leaves: b, w
    np.testing.assert_allclose(np.asarray(updates["w"]), want_w, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(updates["b"]), want_b, rtol=1e-9, atol=1e-12)
    # π-corrected damping: A + π√λ I and G + √λ/π I, π² = (tr A / 4) / (tr G / 3)
    pi = np.sqrt((np.trace(a) / 4) / (np.trace(np.asarray(g)) / 3))
    a_inv, g_inv2 = damped_inverses(jnp.asarray(a), g, LAM, "pi")
    np.testing.assert_allclose(np.asarray(a_inv), np.linalg.inv(a + pi * np.sqrt(LAM) * eye(4)), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(g_inv2), np.linalg.inv(np.asarray(g) + np.sqrt(LAM) / pi * eye(3)),
                               rtol=1e-9)


def test_running_average_and_inverses_every_k_steps(dense_problem):
    model, loss, params, state, x, y = dense_problem
    opt = _plain(model, loss, (x[:2], y[:2]), ema=0.6, inverse_every=2)
    s = opt.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    rng = np.random.default_rng(0)
    avg_a = avg_g = None
    for t in range(5):
        m = rng.normal(size=(4, 4))
        fa, fg = m @ m.T + np.eye(4), np.diag(rng.uniform(1, 2, size=3))
        factors = (Kronecker(jnp.ones((1, 1)), jnp.asarray(fg)), Kronecker(jnp.asarray(fa), jnp.asarray(fg)))
        before = s
        _, s = opt.update(grads, s, params, factors=factors)
        rho = min(0.6, t / (t + 1))                                    # 0, 0.5, then 0.6
        avg_a = fa if t == 0 else rho * avg_a + (1 - rho) * fa
        avg_g = fg if t == 0 else rho * avg_g + (1 - rho) * fg
        np.testing.assert_allclose(np.asarray(s.a[1]), avg_a, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(s.g[1]), avg_g, rtol=1e-12)
        if t % 2 == 0:                                                  # recomputed from the new averages
            np.testing.assert_allclose(np.asarray(s.a_inv[1]), np.linalg.inv(avg_a + LAM * np.eye(4)), rtol=1e-9)
        else:                                                           # kept from the step before
            np.testing.assert_array_equal(np.asarray(s.a_inv[1]), np.asarray(before.a_inv[1]))
    assert int(s.count) == 5


def test_factors_land_on_their_params_through_the_combinators():
    """Each leaf's factors are backward_quantities' for the layer that owns it; the
    batch_norm's params have none (SGD), and say why."""
    model = bp.sequential(bp.dense(5), bp.relu(), bp.residual(bp.sequential(bp.dense(5), bp.tanh())),
                          bp.parallel(bp.dense(5), bp.identity()), bp.add(), bp.batch_norm(), bp.dense(3))
    loss = bp.softmax_cross_entropy()
    params, state, _ = model.init(jax.random.PRNGKey(0), (4,))
    x = jax.random.normal(jax.random.PRNGKey(1), (12, 4))
    y = jnp.arange(12) % 3
    key = jax.random.PRNGKey(3)
    opt = kfac(0.1, model=model, loss=loss, example=(x[:2], y[:2]))
    *_, factors = opt.factors(params, state, x, y, key=key)
    leaves = jax.tree_util.tree_leaves(params)
    index = {id(a): i for i, a in enumerate(leaves)}
    owner = {"sequential[0] (dense)": params[0], "sequential[2].residual[0].sequential[0] (dense)": params[2][0],
             "sequential[3].parallel[0] (dense)": params[3][0], "sequential[6] (dense)": params[6]}
    bq = bp.backward_quantities(model, loss, ["kfac"], train=False)   # batch_norm refused in training
    *_, per_layer = bq(params, state, x, y, key=key)
    seen = set()
    for path, p in owner.items():
        for name in ("w", "b"):
            i = index[id(p[name])]
            seen.add(i)
            got, want = factors[i], per_layer[path]["kfac"][name]
            assert got.a.shape == want.a.shape and got.g.shape == want.g.shape, path
            if name == "w" and path == "sequential[0] (dense)":        # before the batch_norm: same forward
                np.testing.assert_allclose(np.asarray(got.a), np.asarray(want.a), rtol=1e-6)
    for i, f in enumerate(factors):
        assert (f is not None) == (i in seen)
    why = {opt.factors.layout[i][0]: opt.factors.layout[i][3] for i in range(len(leaves)) if i not in seen}
    assert set(why) == {"sequential[5] (batch_norm)"}


def test_a_layer_it_cannot_map_is_named():
    model = bp.gpt(11, dim=8, num_heads=2, num_layers=1, max_len=4)
    params, state, _ = model.init(jax.random.PRNGKey(0), (4,))
    ids = jnp.zeros((2, 4), jnp.int32)
    opt = kfac(0.1, model=model, loss=bp.softmax_cross_entropy(), example=(ids, ids))
    with pytest.raises(ValueError, match=r"kfac: gpt"):
        opt.init(params)


def test_it_lowers_the_loss_faster_than_sgd():
    """A tanh MLP on a random teacher's labels, full batch, 40 steps from one init: K-FAC at
    its defaults' rule against SGD with momentum at a tuned rate."""
    kx, kt = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (256, 8))
    y = jnp.argmax(jnp.tanh(x @ jax.random.normal(kt, (8, 4))) @ jnp.ones((4, 4)) + x[:, :4], axis=-1)
    model, loss = bp.sequential(bp.dense(32), bp.tanh(), bp.dense(4)), bp.softmax_cross_entropy()
    params0, state, _ = model.init(jax.random.PRNGKey(1), (8,))
    vg = bp.value_and_grad(model, loss)

    def run_sgd(lr):
        opt = optax.sgd(lr, momentum=0.9)
        step = jax.jit(lambda p, s: (lambda v, g: (v, *opt.update(g, s, p)))(*(lambda r: (r[0][0], r[1]))(vg(p, state, x, y))))
        p, s = params0, opt.init(params0)
        for _ in range(40):
            _, u, s = step(p, s)
            p = optax.apply_updates(p, u)
        return float(vg(p, state, x, y)[0][0])

    opt = kfac(0.1, model=model, loss=loss, example=(x[:2], y[:2]))

    @jax.jit
    def kstep(p, s, t):
        _, _, _, g, f = opt.factors(p, state, x, y, key=jax.random.PRNGKey(t))
        u, s = opt.update(g, s, p, factors=f)
        return optax.apply_updates(p, u), s

    p, s = params0, opt.init(params0)
    for t in range(40):
        p, s = kstep(p, s, t)
    k_loss = float(vg(p, state, x, y)[0][0])
    sgd_loss = min(run_sgd(lr) for lr in (0.1, 0.3))
    assert k_loss < 0.8 * sgd_loss, (k_loss, sgd_loss)


def _train(tmp_path, name, *extra):
    argv = ["train", "--dataset", "xor", "--optimizer", "kfac", "--schedule", "constant", "--out",
            str(tmp_path / name), "--no-progress", "--no-plot", *extra]
    return cli.main(argv)


def test_the_command_trains_two_epochs_and_resumes(tmp_path, capsys):
    assert _train(tmp_path, "full", "--epochs", "2") == 0
    out = capsys.readouterr().out
    assert "kfac lr" in out, out
    assert _train(tmp_path, "half", "--epochs", "1") == 0
    assert _train(tmp_path, "half", "--epochs", "2", "--resume") == 0
    rows = [json.loads(line) for line in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    full = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    np.testing.assert_allclose(rows[-1]["train_loss"], full[-1]["train_loss"], rtol=1e-5)


def test_the_command_says_what_kfac_does_not_run_with(tmp_path, capsys):
    assert _train(tmp_path, "bf16", "--epochs", "1", "--dtype", "bfloat16") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--optimizer kfac runs in float32" in err, err
