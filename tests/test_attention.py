"""Attention, the transformer block and the GPT-style model: causal masking, masks, the
memory-lean backward, the whole language model against jax.grad, the errors, and the
train_gpt.py worked example. (Each layer alone is in the cross-check table.)"""
from __future__ import annotations

import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from helpers import assert_close, init_params, normal, rng

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _hand_vjp(layer, params, x, dy):
    y, _, res = layer.forward(params, (), x)
    return layer.backward(params, res, dy)


# ----------------------------------------------------------------------------- causal masking


@pytest.mark.parametrize("lean", [False, True], ids=["standard", "lean"])
def test_causal_gradient_never_flows_from_later_to_earlier_positions(lean):
    """∂y_i/∂x_j = 0 exactly for j > i: with dy nonzero at position i only, dx vanishes after i."""
    t, d = 6, 8
    layer = bp.multi_head_attention(2, causal=True, lean=lean, block_size=4)
    gen = rng("causal")
    params, _, _ = init_params(layer, (t, d), gen, jnp.float64)
    x = normal(gen, (2, t, d), jnp.float64)
    dys = jnp.zeros((t, 2, t, d), jnp.float64)
    dys = dys.at[jnp.arange(t), :, jnp.arange(t)].set(normal(gen, (t, 2, d), jnp.float64))
    # one backward per output position i: dy has a random row at position i, zeros elsewhere
    _, dx = jax.jit(jax.vmap(lambda dy: _hand_vjp(layer, params, x, dy)))(dys)   # (i, N, T, D)
    dx = np.asarray(dx)
    for i in range(t):
        assert np.all(dx[i, :, i + 1:] == 0.0), f"position {i} got gradient from later positions"
        assert np.all(np.abs(dx[i, :, : i + 1]).sum(-1) > 0), f"position {i}: no gradient to earlier positions"


def test_gpt_logits_and_gradients_never_look_ahead():
    """Changing token j changes no logit before j; and the loss at position i sends no gradient
    to the position embeddings after i, through the whole model's hand-written backward."""
    t, v = 6, 11
    model = bp.gpt(v, dim=8, num_heads=2, num_layers=1, max_len=t)
    gen = rng("gpt-causal")
    params, _, _ = init_params(model, (t,), gen, jnp.float64)
    ids = jnp.asarray(gen.integers(0, v, (2, t)))
    fwd = jax.jit(lambda p, ids: model.forward(p, (), ids)[0])
    z = fwd(params, ids)
    z2 = fwd(params, ids.at[:, 3].set((ids[:, 3] + 1) % v))
    np.testing.assert_array_equal(z[:, :3], z2[:, :3])
    assert np.all(np.asarray(z[:, 3:] != z2[:, 3:]).any(-1))
    i = 2
    dz = jnp.zeros(z.shape, z.dtype).at[:, i].set(normal(gen, (2, v), jnp.float64))
    dparams, _ = jax.jit(lambda p, ids, dz: _hand_vjp(model, p, ids, dz))(params, ids, dz)
    d_pos = np.asarray(dparams["pos"])
    assert np.all(d_pos[i + 1:] == 0.0) and np.all(np.abs(d_pos[: i + 1]).sum(-1) > 0)


# ----------------------------------------------------------------------------- masks, lean


@pytest.mark.parametrize("mask_kind", ["keys", "pairs"])
def test_masked_attention_matches_autodiff_and_lean_matches_standard(mask_kind):
    """Masked causal inputs, (N, T) or (N, T, T), T not a multiple of the block: the lean
    backward equals jax.vjp, and the lean layer gives the standard layer's output and
    gradients (so the standard one is checked too). One query row has no allowed key."""
    t, d = 7, 8
    gen = rng(f"mask-{mask_kind}")
    x = normal(gen, (3, t, d), jnp.float64)
    if mask_kind == "keys":
        mask = jnp.asarray(np.arange(t)[None, :] < np.array([7, 4, 1])[:, None])
    else:
        mask = jnp.asarray(gen.uniform(size=(3, t, t)) < 0.6).at[1, 2].set(False)   # a row with no key
    layer = bp.multi_head_attention(2, causal=True, masked=True, lean=True, block_size=3)
    standard = bp.multi_head_attention(2, causal=True, masked=True)
    params, _, _ = init_params(layer, ((t, d), (t,)), gen, jnp.float64)
    dy = normal(gen, x.shape, jnp.float64)

    @jax.jit
    def run(params, x, mask, dy):
        y, (dp, (dx, dmask)) = layer.forward(params, (), (x, mask))[0], _hand_vjp(layer, params, (x, mask), dy)
        _, vjp = jax.vjp(lambda p, x: layer.forward(p, (), (x, mask))[0], params, x)
        y_std = standard.forward(params, (), (x, mask))[0]
        return y, dp, dx, dmask, vjp(dy), y_std, _hand_vjp(standard, params, (x, mask), dy)

    y, dp, dx, dmask, (ref_dp, ref_dx), y_std, (std_dp, (std_dx, _)) = run(params, x, mask, dy)
    assert dmask is None
    assert_close(dp, ref_dp, jnp.float64, "dparams")
    assert_close(dx, ref_dx, jnp.float64, "dx")
    assert_close(y, y_std, jnp.float64, "y lean vs standard")
    assert_close((dp, dx), (std_dp, std_dx), jnp.float64, "grads lean vs standard")
    assert np.all(np.isfinite(np.asarray(y)))


def test_lean_backward_saves_the_t_by_t_matrix():
    """Compiled temp memory of forward + backward (T = 256): the lean backward needs less than
    half of what the standard one and jax.vjp need. (README figures: T = 1024.)"""
    n, t, d, heads = 1, 256, 16, 2
    gen = rng("memory")
    std = bp.multi_head_attention(heads, causal=True)
    lean = bp.multi_head_attention(heads, causal=True, lean=True, block_size=32)
    params, _, _ = init_params(std, (t, d), gen, jnp.float32)
    x = normal(gen, (n, t, d), jnp.float32)

    def temp(f):
        return jax.jit(f).lower(params, x, x).compile().memory_analysis().temp_size_in_bytes

    def autodiff(p, x, dy):
        return jax.vjp(lambda p, x: std.forward(p, (), x)[0], p, x)[1](dy)

    t_std = temp(lambda p, x, dy: _hand_vjp(std, p, x, dy))
    t_lean = temp(lambda p, x, dy: _hand_vjp(lean, p, x, dy))
    t_auto = temp(autodiff)
    p_bytes = n * heads * t * t * 4
    assert t_std >= p_bytes and t_auto >= p_bytes
    assert t_lean < t_std / 2 and t_lean < t_auto / 2 and t_lean < p_bytes, (t_lean, t_std, t_auto)


# ----------------------------------------------------------------------------- the whole model


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_gpt_gradients_equal_jax_grad(dtype):
    """bp.value_and_grad (hand-written, tied embedding) against jax.value_and_grad on the whole
    language model with its softmax cross-entropy: f64 within rtol 1e-9."""
    t, v = 6, 13
    model = bp.gpt(v, dim=8, num_heads=2, num_layers=2, max_len=8)
    loss = bp.softmax_cross_entropy()
    gen = rng("gpt-whole")
    params, state, _ = init_params(model, (t,), gen, dtype)
    params["tok"]["table"] = normal(gen, (v, 8), dtype, 0.5)     # logits of a useful size
    ids = jnp.asarray(gen.integers(0, v, (3, t + 1)))
    x, labels = ids[:, :-1], ids[:, 1:]

    @jax.jit
    def both(params, x, labels):
        return (bp.value_and_grad(model, loss)(params, state, x, labels),
                bp.reference_value_and_grad(model, loss)(params, state, x, labels))

    ((value, _), grads), ((ref_value, _), ref_grads) = both(params, x, labels)
    rtol = 1e-9 if dtype == jnp.float64 else 1e-5
    np.testing.assert_allclose(value, ref_value, rtol=rtol)
    ref_leaves = jax.tree_util.tree_leaves(ref_grads)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), ref_leaves):
        assert g.dtype == dtype
        r = np.asarray(r, np.float64)
        np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol * np.abs(r).max(),
                                   err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- errors


def _params(layer, in_shape):
    return init_params(layer, in_shape, rng("err"), jnp.float32)[0]


def test_attention_errors():
    layer = bp.multi_head_attention(2)
    p = _params(layer, (5, 8))
    with pytest.raises(ValueError, match=re.escape("multi_head_attention: expected x.shape == (N, T, 8), got x.shape=(2, 5, 6)")):
        layer.forward(p, (), jnp.ones((2, 5, 6)))
    with pytest.raises(ValueError, match=re.escape("multi_head_attention: expected x.ndim == 3 (batch, time, features), got x.shape=(2, 8)")):
        layer.forward(p, (), jnp.ones((2, 8)))
    with pytest.raises(ValueError, match=re.escape("multi_head_attention: expected the model dim x.shape[-1] divisible by num_heads=3, got in_shape=(5, 8)")):
        bp.multi_head_attention(3).forward(p, (), jnp.ones((2, 5, 8)))
    with pytest.raises(ValueError, match=re.escape("multi_head_attention: expected num_heads to be an integer > 0, got 0")):
        bp.multi_head_attention(0)
    masked = bp.multi_head_attention(2, masked=True)
    with pytest.raises(ValueError, match=re.escape("multi_head_attention: expected mask.shape == (2, 5) (keys) or (2, 5, 5) (query, key), got mask.shape=(2, 4)")):
        masked.forward(p, (), (jnp.ones((2, 5, 8)), jnp.ones((2, 4), bool)))


def test_transformer_and_gpt_errors():
    block = bp.transformer_block(2)
    p = _params(block, (5, 8))
    with pytest.raises(ValueError, match=re.escape("transformer_block: expected x.shape == (N, T, 8), got x.shape=(2, 5, 4)")):
        block.forward(p, (), jnp.ones((2, 5, 4)))
    with pytest.raises(ValueError, match=re.escape("transformer_block: expected the model dim x.shape[-1] divisible by num_heads=3, got in_shape=(5, 8)")):
        bp.transformer_block(3).forward(p, (), jnp.ones((2, 5, 8)))
    with pytest.raises(ValueError, match=re.escape("gpt: expected dim divisible by num_heads, got dim=8, num_heads=3")):
        bp.gpt(10, dim=8, num_heads=3, num_layers=1, max_len=4)
    model = bp.gpt(10, dim=8, num_heads=2, num_layers=1, max_len=4)
    gp = _params(model, (4,))
    with pytest.raises(ValueError, match=re.escape("gpt: expected at most max_len=4 positions, got ids.shape=(2, 5)")):
        model.forward(gp, (), jnp.zeros((2, 5), jnp.int32))
    with pytest.raises(TypeError, match="gpt: expected integer token ids, got dtype float32"):
        model.forward(gp, (), jnp.zeros((2, 4), jnp.float32))


# ----------------------------------------------------------------------------- worked example


def test_train_gpt_runs(capsys):
    """Tiny settings; batch 1 so that validation and sampling share one compiled forward."""
    spec = importlib.util.spec_from_file_location("train_gpt", ROOT / "scripts" / "examples" / "train_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--steps", "4", "--batch", "1", "--context", "8", "--dim", "8", "--heads", "2",
                          "--layers", "1", "--corpus-chars", "20000", "--print-every", "2",
                          "--eval-every", "4", "--eval-batches", "2", "--sample-chars", "5"])
    out = capsys.readouterr().out
    assert "step     2  train loss" in out and "step     4  validation loss" in out
    assert "sample (temperature 0.8" in out and "final train loss" in out
    assert np.isfinite(result["train_loss"]) and np.isfinite(result["val_loss"])
    assert len(result["sample"]) == len("def ") + 5
