"""The formulations of ``bp.conv`` timed map by map: the forward, dx and dW of one 2-D
convolution by ``lax`` (``impl="lax"``: lax's convolutions as XLA hands them to YNNPACK on CPU,
the shifted-view dW), with the extra output row that routes them to Eigen on CPU
(``impl="routed"``: float32, at least 16 channels in and out, see bpjax/kernels/cpu_conv.py),
by columns (``impl="columns"``: im2col matrix products, a few examples at a time), and as
``impl="auto"`` picks for the platform.

    python scripts/benchmarks/conv_formulations.py                          # 3×3, 32→64, 28×28, batch 128
    python scripts/benchmarks/conv_formulations.py --c-in 1 --c-out 32      # the 2-D CNN's first layer

Best of ``--reps`` jitted calls each, float32; compare within one run only.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import bpjax as bp


def best_ms(f, *args, reps=8):
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--c-in", type=int, default=32)
    p.add_argument("--c-out", type=int, default=64)
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--reps", type=int, default=8)
    args = p.parse_args(argv)
    gen = np.random.default_rng(0)
    in_shape = (args.size, args.size, args.c_in)
    x = jnp.asarray(gen.standard_normal((args.batch, *in_shape)), jnp.float32)
    rows = []
    for impl in ("lax", "routed", "columns", "auto"):
        layer = bp.conv(args.c_out, args.kernel, padding="SAME", impl=impl)
        params, _, out_shape = layer.init(jax.random.PRNGKey(0), in_shape)
        dy = jnp.asarray(gen.standard_normal((args.batch, *out_shape)), jnp.float32)
        _, _, res = layer.forward(params, (), x)
        fwd = best_ms(lambda p, x: layer.forward(p, (), x)[0], params, x, reps=args.reps)
        dw = best_ms(lambda p, r, d: layer.backward(p, r, d)[0], params, res, dy, reps=args.reps)
        dx = best_ms(lambda p, r, d: layer.backward(p, r, d)[1], params, res, dy, reps=args.reps)
        rows.append((impl, fwd, dw, dx))
    flop = 2.0 * args.batch * args.size ** 2 * args.kernel ** 2 * args.c_in * args.c_out / 1e9
    print(f"conv {args.kernel}×{args.kernel}, {args.c_in}→{args.c_out}, {args.size}×{args.size}, "
          f"batch {args.batch}: {flop:.2f} GFLOP per map")
    print("| impl | forward ms | dW (+db) ms | dx ms |\n|---|---|---|---|")
    for impl, fwd, dw, dx in rows:
        print(f"| {impl} | {fwd:.1f} | {dw:.1f} | {dx:.1f} |")
    return rows


if __name__ == "__main__":
    main()
