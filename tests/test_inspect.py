"""bpjax train --inspect: the gradient noise scale B_simple and each layer's SNR against the
per-example gradients themselves (float64), the closing sentence, and the command's metrics and
figure."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np

import bpjax as bp
from bpjax import cli
from bpjax.train.inspect import Inspector, noise_scale


def _problem():
    gen = np.random.default_rng(0)
    model = bp.sequential(bp.dense(6), bp.tanh(), bp.dense(3))
    x, y = jnp.asarray(gen.standard_normal((16, 4))), jnp.asarray(gen.integers(0, 3, 16))
    params, state, _ = model.init(jax.random.PRNGKey(0), (4,))
    return model, bp.cast_floating(params, jnp.float64), state, x, y


def test_noise_scale_and_snr_equal_those_of_the_per_example_gradients():
    model, params, state, x, y = _problem()
    loss = bp.softmax_cross_entropy()
    row = Inspector(model, loss, x, y, batch_size=8)(1, params, state)
    g = bp.per_example_grads(model, loss)(params, state, x, y)           # (B, ...) per leaf
    b = x.shape[0]

    def stats(leaves):
        flat = np.concatenate([np.asarray(a).reshape(b, -1) for a in leaves], axis=1)   # (B, P)
        trace = float(np.sum(np.var(flat, axis=0, ddof=1)))                # unbiased tr Σ
        signal = float(np.sum(np.mean(flat, axis=0) ** 2)) - trace / b     # unbiased ‖G‖²
        return trace, signal

    trace, signal = stats(jax.tree_util.tree_leaves(g))
    np.testing.assert_allclose(row["inspect/trace_cov"], trace, rtol=1e-9)
    np.testing.assert_allclose(row["inspect/grad_sq"], signal, rtol=1e-9)
    np.testing.assert_allclose(row["inspect/b_simple"], trace / signal, rtol=1e-9)
    t0, s0 = stats(jax.tree_util.tree_leaves(g[0]))
    np.testing.assert_allclose(row["inspect/sequential[0] (dense)/snr"], max(s0, 0) / t0, rtol=1e-8)
    assert row["inspect/ggn_trace"] > 0


def test_a_signal_below_the_noise_is_not_a_number():
    trace, signal, b_simple = noise_scale(10.0, 0.5, 20)
    assert np.isclose(trace, 10.0 * 20 / 19) and np.isclose(signal, 0.5 - 10.0 / 19) and b_simple == math.inf
    assert noise_scale(4.0, 2.0, 2)[2] == math.inf           # ‖ḡ‖² − tr Σ/B = 2 − 8/2 < 0


def test_the_summary_says_what_the_batch_size_is():
    model, params, state, x, y = _problem()
    ins = Inspector(model, bp.softmax_cross_entropy(), x, y, batch_size=8)
    assert ins.summary() == "inspect: no epoch was inspected"
    ins.rows.append({"epoch": 3, "inspect/b_simple": 100.0})
    assert "B_simple ≈ 100 at epoch 3" in ins.summary() and "noise-dominated" in ins.summary()
    ins.rows.append({"epoch": 4, "inspect/b_simple": 2.0})
    assert "past the noise scale" in ins.summary()
    ins.rows.append({"epoch": 5, "inspect/b_simple": math.inf})
    assert "noise hides its signal" in ins.summary()


def test_train_inspect_records_and_draws(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--model", "textbook_mlp", "--dataset", "xor", "--epochs", "2", "--inspect",
                     "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "inspect: " in printed and "batch size" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert "inspect/b_simple" in row and row["inspect/trace_cov"] > 0 and row["inspect/ggn_trace"] > 0
        assert any(k.endswith("/snr") for k in row)
    assert (out / "inspect.png").stat().st_size > 1000
