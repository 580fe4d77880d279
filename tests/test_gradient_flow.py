"""bp.gradient_flow: each leaf layer's ‖dy‖, ‖dx‖, ‖dθ‖, ‖θ‖ from one observed backward, equal to
the norms of the reference (autodiff) gradients; named by path inside combinators and scans;
under jit; and bpjax train --grad-flow."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

import bpjax as bp
from bpjax import cli


def _norm(tree):
    return float(np.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in jax.tree_util.tree_leaves(tree))))


def _net():
    block = bp.residual(bp.sequential(bp.layer_norm(), bp.dense(6), bp.gelu()))
    return bp.sequential(bp.dense(6), bp.tanh(), block, bp.parallel(bp.dense(4), bp.dense(2)), bp.concat(),
                         bp.dense(3))


#: Where each leaf layer's params sit in the net's params tree.
PATHS = {
    "sequential[0] (dense)": lambda p: p[0],
    "sequential[2].residual[0].sequential[0] (layer_norm)": lambda p: p[2][0],
    "sequential[2].residual[0].sequential[1] (dense)": lambda p: p[2][1],
    "sequential[3].parallel[0] (dense)": lambda p: p[3][0],
    "sequential[3].parallel[1] (dense)": lambda p: p[3][1],
    "sequential[5] (dense)": lambda p: p[5],
}


def _problem():
    model = _net()
    params, state, _ = model.init(jax.random.PRNGKey(0), (5,))
    params = bp.cast_floating(params, jnp.float64)
    gen = np.random.default_rng(0)
    return model, params, state, jnp.asarray(gen.standard_normal((7, 5))), jnp.asarray(gen.integers(0, 3, 7))


def test_dparams_norms_equal_the_reference_gradients():
    model, params, state, x, y = _problem()
    loss = bp.softmax_cross_entropy()
    (value, _), grads, flow = jax.jit(bp.gradient_flow(model, loss))(params, state, x, y)
    (ref_value, _), ref = jax.jit(bp.reference_value_and_grad(model, loss))(params, state, x, y)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    assert [k for k in flow if k in PATHS] == list(PATHS), list(flow)      # forward order, by path
    for label, where in PATHS.items():
        np.testing.assert_allclose(flow[label]["dparams"], _norm(where(ref)), rtol=1e-10, err_msg=label)
        np.testing.assert_allclose(flow[label]["params"], _norm(where(params)), rtol=1e-12, err_msg=label)
    # the error at the output is the loss's; the first layer's dx is the error at the input x
    assert "sequential[1] (tanh)" in flow and flow["sequential[1] (tanh)"]["dparams"] == 0
    dx_ref = jax.jit(jax.grad(lambda x: bp.reference_value_and_grad(model, loss)(params, state, x, y)[0][0]))(x)
    np.testing.assert_allclose(flow["sequential[0] (dense)"]["dx"], _norm(dx_ref), rtol=1e-10)
    # a layer's dy is the next layer's dx (sequential: dh_i flows from layer i+1 down to layer i)
    np.testing.assert_allclose(flow["sequential[0] (dense)"]["dy"], flow["sequential[1] (tanh)"]["dx"], rtol=1e-12)


def test_inside_the_gpt_scan_one_entry_per_block():
    model = bp.gpt(11, dim=8, num_heads=2, num_layers=2, max_len=6)
    params, state, _ = model.init(jax.random.PRNGKey(0), (5,))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 6)))
    (_, _), grads, flow = jax.jit(bp.gradient_flow(model, bp.softmax_cross_entropy()))(
        params, state, ids[:, :-1], ids[:, 1:])
    for layer in range(2):
        for i, name in enumerate(["layer_norm", "multi_head_attention", "layer_norm", "dense"]):
            label = f"gpt[1]{{{layer}}}.transformer_block[{i}] ({name})"
            assert label in flow, list(flow)
        att = flow[f"gpt[1]{{{layer}}}.transformer_block[1] (multi_head_attention)"]
        np.testing.assert_allclose(att["dparams"], _norm(jax.tree_util.tree_map(lambda a: a[layer],
                                                                                  grads["blocks"]["attn"])),
                                   rtol=1e-5)
    assert list(flow)[0] == "gpt[0] (embedding)" and list(flow)[-1] == "gpt[2] (layer_norm)"
    assert "dx" not in flow["gpt[0] (embedding)"]                           # ids have no gradient


def test_a_users_layer_is_observed():
    def init(key, in_shape):
        return {"a": jnp.full((in_shape[-1],), 2.0)}, (), in_shape

    def forward(params, state, x, *, key=None, train=True):
        return x * params["a"], state, (x,)

    def backward(params, res, dy):
        (x,) = res
        return {"a": jnp.sum(dy * x, axis=0)}, dy * params["a"]

    model = bp.sequential(bp.dense(3), bp.make_layer("scale", init, forward, backward))
    params, state, _ = model.init(jax.random.PRNGKey(0), (2,))
    _, grads, flow = bp.gradient_flow(model, bp.squared_error())(params, state, jnp.ones((4, 2)), jnp.zeros((4, 3)))
    np.testing.assert_allclose(flow["sequential[1] (scale)"]["dparams"], _norm(grads[1]), rtol=1e-6)
    np.testing.assert_allclose(flow["sequential[1] (scale)"]["dx"], flow["sequential[0] (dense)"]["dy"], rtol=1e-6)


def test_train_records_the_flow(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--model", "textbook_mlp", "--dataset", "xor", "--epochs", "2", "--grad-flow",
                     "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        keys = [k for k in row if k.startswith("grad_flow/")]
        assert "grad_flow/sequential[0] (dense)/dy" in keys and "grad_flow/sequential[4] (dense)/update_ratio" in keys
        assert all(np.isfinite(row[k]) and row[k] >= 0 for k in keys)
    assert (out / "gradflow.png").stat().st_size > 1000


def test_the_script_draws_the_figure(tmp_path, capsys):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "examples" / "gradient_flow.py"
    spec = importlib.util.spec_from_file_location("gradient_flow_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "flow.png"
    assert script.main(["--depth", "3", "--width", "8", "--epochs", "2", "--synthetic", "--out", str(out)]) == 0
    assert "sigmoid MLP: loss" in capsys.readouterr().out and out.stat().st_size > 1000
    assert script.main(["--depth", "0"]) == 2
