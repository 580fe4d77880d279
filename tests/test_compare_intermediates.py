"""bp.compare_intermediates: each row's verdict (exact, approx, FAIL, wrong shape, not checked),
in float64 and float32, and its refusals. The backprop-ninja page's blocks (its solution passing,
its planted mistake failing on exactly the rows it names) run in tests/test_site.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp


def forward(params, x, y, tap=bp.identity_tap):
    h = tap("h", x @ params["w"])                                 # (N, 2)
    loss = tap("loss", 0.5 * jnp.mean(jnp.sum((h - y) ** 2, axis=-1)))
    return loss, {"h": h}


def problem(dtype):
    kx, kw, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (5, 3), dtype)
    params = {"w": jax.random.normal(kw, (3, 2), dtype)}
    y = jax.random.normal(ky, (5, 2), dtype)
    _, inter = forward(params, x, y)
    dh = (inter["h"] - y) / x.shape[0]                            # ∂E/∂h of the textbook loss
    return params, x, y, {"loss": jnp.ones((), dtype), "h": dh, "w": x.T @ dh}


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_a_right_backward_passes_every_row_and_each_kind_of_mistake_fails_its_row(dtype):
    params, x, y, grads = problem(dtype)
    table = bp.compare_intermediates(forward, params, x, y, grads=grads)
    assert table.ok and [r.name for r in table.rows] == ["h", "loss", "w"], str(table)
    assert table.dtype == jnp.dtype(dtype).name

    wrong = bp.compare_intermediates(forward, params, x, y, grads={**grads, "w": 2 * grads["w"]})
    assert wrong.failing == ("w",) and wrong.row("w").status == "FAIL" and "w" in str(wrong)

    transposed = bp.compare_intermediates(forward, params, x, y, grads={**grads, "w": grads["w"].T})
    assert transposed.row("w").status == "wrong shape" and not transposed.ok
    broadcast = bp.compare_intermediates(forward, params, x, y, grads={**grads, "w": grads["w"][:1]})
    assert broadcast.row("w").status == "wrong shape"          # never accepted by broadcasting

    missing = bp.compare_intermediates(forward, params, x, y, grads={"loss": grads["loss"], "w": grads["w"]})
    assert missing.row("h").status == "not checked" and not missing.ok and "1 not ok: h" in str(missing)


def test_bad_arguments_are_refused_in_one_sentence():
    params, x, y, grads = problem(jnp.float64)
    with pytest.raises(TypeError, match="expected forward to be a function"):
        bp.compare_intermediates(None, params, x, y, grads=grads)
    with pytest.raises(ValueError, match="got unknown \\['hh'\\]"):
        bp.compare_intermediates(forward, params, x, y, grads={**grads, "hh": grads["h"]})
    with pytest.raises(TypeError, match="expected grads to be a dict"):
        bp.compare_intermediates(forward, params, x, y, grads=[1.0])

    def twice(params, x, y, tap=bp.identity_tap):
        tap("h", x)
        return tap("h", x).sum() * np.float64(1.0), {}

    with pytest.raises(ValueError, match="expected each tap name once"):
        bp.compare_intermediates(twice, params, x, y, grads={})
