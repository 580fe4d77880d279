"""bpjax.models.generate: the key/value-cached decoder of a bp.gpt against its full forward, the
sampling filters, and the options' errors. One tiny model (V=23, D=16, 2 heads, 2 blocks,
max_len 16) whose compiled programs the tests share."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import init_params, normal, rng

import bpjax as bp
from bpjax.models import cached_logits, filter_logits, generate

V, D, HEADS, LAYERS, MAX_LEN = 23, 16, 2, 2, 16
MODEL = bp.gpt(V, dim=D, num_heads=HEADS, num_layers=LAYERS, max_len=MAX_LEN)


@pytest.fixture(scope="module")
def params():
    """Random non-degenerate params in float64 and float32; the table scaled so the logits
    spread over a few units (argmax is then far from ties)."""
    gen = rng("generate")
    p = init_params(MODEL, (MAX_LEN,), gen, jnp.float64)[0]
    p["tok"]["table"] = normal(gen, (V, D), jnp.float64, 0.5)
    p["pos"] = normal(gen, (MAX_LEN, D), jnp.float64, 0.3)
    return {jnp.float64: p, jnp.float32: jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), p)}


@pytest.fixture(scope="module")
def ids():
    return jnp.asarray(rng("generate-ids").integers(0, V, (2, MAX_LEN)), jnp.int32)


_forward = jax.jit(lambda p, x: MODEL.forward(p, (), x)[0])        # (N, T, V), one compile per dtype


@pytest.mark.parametrize("dtype,prefill", [(jnp.float64, 1), (jnp.float64, 5), (jnp.float32, 1)],
                         ids=["f64-prefill1", "f64-prefill5", "f32-prefill1"])
def test_cached_logits_equal_the_full_forward_at_every_position(params, ids, dtype, prefill):
    p = params[dtype]
    want = np.asarray(_forward(p, ids), np.float64)
    got = cached_logits(p, ids, num_heads=HEADS, prefill=prefill)
    assert got.shape == (2, MAX_LEN, V) and got.dtype == dtype
    tol = 1e-12 if dtype == jnp.float64 else 1e-5
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol * np.abs(want).max())


def _greedy_by_full_forward(p, prompt, steps):
    """Argmax of the full forward, re-run on the whole sequence for every new token (the
    sequence padded to max_len: the causal mask keeps the padding out of the logits read)."""
    buf = np.zeros((prompt.shape[0], MAX_LEN), np.int32)
    t0 = prompt.shape[1]
    buf[:, :t0] = prompt
    for t in range(t0, t0 + steps):
        buf[:, t] = np.argmax(np.asarray(_forward(p, jnp.asarray(buf)))[:, t - 1], axis=-1)
    return buf[:, :t0 + steps]


def test_greedy_equals_argmax_over_the_full_forward_and_top_k_1_and_a_tiny_nucleus_equal_greedy(params, ids):
    p = params[jnp.float64]
    prompt, steps = ids[:, :3], MAX_LEN - 3                            # up to the last position
    want = _greedy_by_full_forward(p, np.asarray(prompt), steps)
    greedy = generate(p, prompt, num_heads=HEADS, steps=steps, temperature=0.0)
    assert greedy.shape == (2, MAX_LEN) and greedy.dtype == jnp.int32
    np.testing.assert_array_equal(greedy, want)
    key = jax.random.PRNGKey(7)
    np.testing.assert_array_equal(generate(p, prompt, num_heads=HEADS, steps=steps, key=key, top_k=1), want)
    np.testing.assert_array_equal(generate(p, prompt, num_heads=HEADS, steps=steps, key=key, top_p=1e-9), want)


def test_sampling_is_reproducible_by_key_and_stays_in_the_vocabulary(params, ids):
    p = params[jnp.float32]
    prompt = ids[:, :4]
    a = generate(p, prompt, num_heads=HEADS, steps=8, key=jax.random.PRNGKey(1), top_k=5, top_p=0.9)
    b = generate(p, prompt, num_heads=HEADS, steps=8, key=jax.random.PRNGKey(1), top_k=5, top_p=0.9)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :4], prompt)
    assert a.shape == (2, 12) and int(a.min()) >= 0 and int(a.max()) < V


def test_top_p_and_top_k_keep_exactly_their_set_and_sampling_never_leaves_it():
    probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15], np.float32)      # ranked: 1, 3, 4, 2, 0
    logits = jnp.log(jnp.asarray(probs))

    def kept(**kw):
        return set(np.flatnonzero(np.isfinite(np.asarray(filter_logits(logits, **kw)))).tolist())

    assert kept(top_p=0.8) == {1, 3, 4}            # 0.5 + 0.2 = 0.7 < 0.8 ≤ 0.85 with token 4
    assert kept(top_p=0.45) == {1}                 # the top token alone already has 0.5
    assert kept(top_p=0.1) == {1}                  # the most likely token is always kept
    assert kept(top_p=1.0) == {0, 1, 2, 3, 4}
    assert kept(top_k=2) == {1, 3}
    assert kept(top_k=5) == {0, 1, 2, 3, 4}
    assert kept(top_k=3, top_p=0.6) == {1, 3}      # over the top 3 (mass 0.85): 0.5/0.85 < 0.6
    draws = jax.random.categorical(jax.random.PRNGKey(0), filter_logits(logits, top_p=0.8), shape=(4000,))
    assert set(np.unique(np.asarray(draws)).tolist()) == {1, 3, 4}
    batch = filter_logits(jnp.stack([logits, logits[::-1]]), top_k=1)     # row-wise on (N, V)
    assert [np.flatnonzero(np.isfinite(np.asarray(r))).tolist() for r in batch] == [[1], [3]]


@pytest.mark.parametrize("options,message", [
    ({"temperature": -0.5}, "generate: expected temperature >= 0 (0 is greedy), got -0.5"),
    ({"top_k": 0}, "generate: expected top_k to be None or an integer in [1, V=23], got 0"),
    ({"top_k": 24}, "generate: expected top_k to be None or an integer in [1, V=23], got 24"),
    ({"top_p": 0.0}, "generate: expected top_p to be None or in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "generate: expected top_p to be None or in (0, 1], got 1.5"),
    ({"steps": 13}, ("generate: expected T0 + steps <= max_len=16 (the rows of params['pos']), "
                     "got T0=4 + steps=13 = 17")),
    ({"steps": 0}, "generate: expected steps to be an integer > 0, got 0"),
    ({"key": None}, "generate: expected a PRNG key for temperature > 0, got key=None"),
], ids=["temperature", "top_k-0", "top_k-V+1", "top_p-0", "top_p-1.5", "steps-past-max_len", "steps-0", "no-key"])
def test_bad_options_say_which_what_was_expected_and_what_was_got(params, ids, options, message):
    kw = {"num_heads": HEADS, "steps": 4, "key": jax.random.PRNGKey(0)} | options
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(params[jnp.float32], ids[:, :4], **kw)


def test_cached_logits_errors(params, ids):
    with pytest.raises(ValueError, match=re.escape("cached_logits: expected prefill to be an integer in [1, T=16], got 0")):
        cached_logits(params[jnp.float32], ids, num_heads=HEADS, prefill=0)
    with pytest.raises(ValueError, match=re.escape("generate: expected num_heads to divide the model width D=16, got num_heads=3")):
        cached_logits(params[jnp.float32], ids, num_heads=3)


def test_generate_bench_tiny_runs_and_both_decoders_agree(capsys):
    """scripts/benchmarks/generate_bench.py at its tiny size: both decoders run and give the
    same greedy tokens."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "benchmarks" / "generate_bench.py"
    spec = importlib.util.spec_from_file_location("generate_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--sizes", "tiny", "--repeats", "1"])
    assert result["tiny"]["equal"] and result["tiny"]["cached_tokens_per_s"] > 0
    assert "speed-up" in capsys.readouterr().out
