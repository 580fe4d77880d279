"""How much memory the memory-lean attention backward saves: XLA's temporary bytes for one
jitted forward + backward of ``multi_head_attention`` (causal, float32), standard against lean
(which recomputes the probabilities blockwise from the per-row logsumexp instead of saving the
(T × T) matrix) against ``jax.vjp`` of the standard forward.

    python scripts/benchmarks/attention_memory.py                # N=2, T=1024, D=256, 4 heads
    python scripts/benchmarks/attention_memory.py --t 4096 --n 1 --d 64
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import bpjax as bp


def temp_mib(f, *args):
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--t", type=int, default=1024)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--block", type=int, default=128)
    a = p.parse_args(argv)
    std = bp.multi_head_attention(a.heads, causal=True)
    lean = bp.multi_head_attention(a.heads, causal=True, lean=True, block_size=a.block)
    params, _, _ = jax.eval_shape(lambda k: std.init(k, (a.t, a.d)), jax.random.PRNGKey(0))
    x = jax.ShapeDtypeStruct((a.n, a.t, a.d), jnp.float32)

    def by_hand(layer):
        def f(params, x, dy):
            y, _, res = layer.forward(params, (), x)
            return layer.backward(params, res, dy)
        return f

    def autodiff(params, x, dy):
        _, vjp = jax.vjp(lambda p, x: std.forward(p, (), x)[0], params, x)
        return vjp(dy)

    rows = [("hand-written, lean", temp_mib(by_hand(lean), params, x, x)),
            ("hand-written, standard", temp_mib(by_hand(std), params, x, x)),
            ("jax.vjp of the standard forward", temp_mib(autodiff, params, x, x))]
    p_mib = a.n * a.heads * a.t * a.t * 4 / 2**20
    print(f"multi_head_attention, causal, float32, N={a.n}, T={a.t}, D={a.d}, {a.heads} heads, "
          f"block {a.block}; one (N, h, T, T) probability matrix is {p_mib:.1f} MiB")
    print("| forward + backward | XLA temp (MiB) | vs jax.vjp |\n| --- | --- | --- |")
    for name, mib in rows:
        print(f"| {name} | {mib:.2f} | {mib / rows[2][1]:.2f}× |")


if __name__ == "__main__":
    main()
