"""Greedy decoding speed of a ``bp.gpt``: the key/value-cached decoder (bpjax.models.generate)
against re-running the full jitted forward for every new token, same prompt, same lengths.

The baseline keeps a fixed (N, T0 + steps) buffer of ids and, in one jitted ``lax.fori_loop``,
runs ``model.forward`` over all of it per step and takes the argmax at the last filled position
(the causal mask keeps the unfilled tail out of it): each token costs T0 + steps positions, where
the cached decoder's costs one. Both are compiled before timing; tokens/s counts N × steps new
tokens per run, the best of ``--repeats`` runs. The two outputs are compared too (float32 argmax
may differ on a near-tie).

    python scripts/benchmarks/generate_bench.py                   # tiny and mid
    python scripts/benchmarks/generate_bench.py --sizes tiny --repeats 1
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import bpjax as bp
from bpjax.models import generate

#: name -> (V, D, heads, layers, max_len, N, T0, steps)
SIZES = {"tiny": (23, 16, 2, 2, 16, 4, 4, 12),
         "mid": (256, 256, 4, 4, 256, 4, 16, 200)}


def full_forward_greedy(model, t_final):
    """A jitted greedy decoder without a cache: the whole (N, t_final) buffer through the model
    for every token."""
    @jax.jit
    def run(params, prompt):
        n, t0 = prompt.shape
        buf = jnp.zeros((n, t_final), jnp.int32).at[:, :t0].set(prompt)

        def step(t, buf):                                              # fill position t
            logits = model.forward(params, (), buf)[0]                 # (N, t_final, V)
            nxt = jnp.argmax(lax.dynamic_index_in_dim(logits, t - 1, 1, keepdims=False), axis=-1)
            return lax.dynamic_update_slice_in_dim(buf, nxt.astype(jnp.int32)[:, None], t, 1)

        return lax.fori_loop(t0, t_final, step, buf)
    return run


def best_time(f, repeats):
    out = jax.block_until_ready(f())                                   # compiled (and warm) first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f())
        times.append(time.perf_counter() - start)
    return min(times), out


def bench(name, repeats):
    vocab, dim, heads, layers, max_len, n, t0, steps = SIZES[name]
    model = bp.gpt(vocab, dim=dim, num_heads=heads, num_layers=layers, max_len=max_len)
    params = model.init(jax.random.PRNGKey(0), (max_len,))[0]
    prompt = jax.random.randint(jax.random.PRNGKey(1), (n, t0), 0, vocab, dtype=jnp.int32)
    naive = full_forward_greedy(model, t0 + steps)
    t_cached, cached_out = best_time(
        lambda: generate(params, prompt, num_heads=heads, steps=steps, temperature=0.0), repeats)
    t_full, full_out = best_time(lambda: naive(params, prompt), repeats)
    tokens = n * steps
    agree = bool(np.array_equal(np.asarray(cached_out), np.asarray(full_out)))
    print(f"{name:5s} V={vocab} D={dim} heads={heads} layers={layers} max_len={max_len} "
          f"N={n} T0={t0} steps={steps}")
    print(f"      cached decoder  {tokens / t_cached:10.1f} tokens/s  ({t_cached:.3f} s)")
    print(f"      full forward    {tokens / t_full:10.1f} tokens/s  ({t_full:.3f} s)")
    print(f"      speed-up        {t_full / t_cached:10.1f}x     outputs equal: {agree}")
    return {"cached_tokens_per_s": tokens / t_cached, "full_tokens_per_s": tokens / t_full,
            "speedup": t_full / t_cached, "equal": agree}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "mid"])
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, float32, greedy")
    return {name: bench(name, a.repeats) for name in a.sizes}


if __name__ == "__main__":
    main()
