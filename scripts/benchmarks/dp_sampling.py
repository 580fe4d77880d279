"""What Poisson sampling costs DP-SGD: one epoch of ``fit``'s compiled steps on Poisson-sampled
batches (padded to physical batches of P rows, a larger batch summed into one step) against the
same steps on fixed batches cut from a shuffled order, on the MNIST-1D CNN.

    python scripts/benchmarks/dp_sampling.py                       # batch 100, P default and 100
    python scripts/benchmarks/dp_sampling.py --physical 100,112 --repeats 9
    python scripts/benchmarks/dp_sampling.py --synthetic           # no mnist1d needed

Each variant is the chunk ``fit`` runs (``make_poisson_chunk`` or ``make_train_chunk(dp=...)``)
over a whole epoch of n // B steps, compiled once, then timed ``--repeats`` times, interleaved
with the other variants, from the same params; the median is reported, with the mean rows a
step computes (P·⌈|S|/P⌉ for Poisson, B for shuffled) over the timed epoch.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bpjax as bp
from bpjax import datasets, models, privacy, train
from bpjax.train import loop


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--physical", default="default,100", help="physical batch sizes, comma-separated ('default')")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--synthetic", action="store_true", help="random data of MNIST-1D's shape")
    args = p.parse_args(argv)

    if args.synthetic:
        gen = np.random.default_rng(0)
        data = datasets.Dataset(gen.standard_normal((4000, 40, 1)).astype(np.float32), gen.integers(0, 10, 4000),
                                gen.standard_normal((100, 40, 1)).astype(np.float32), gen.integers(0, 10, 100), 10,
                                "synthetic")
    else:
        data = datasets.mnist1d()
    x_tr, y_tr, _, _ = train.split_validation(data, 0.1, 0)
    n, b = x_tr.shape[0], args.batch_size
    steps = n // b
    model, loss, opt = models.cnn(10), bp.softmax_cross_entropy(), optax.adam(1e-2)
    k_init, data_key, k_dropout = jax.random.split(jax.random.PRNGKey(0), 3)
    params, state, _ = model.init(k_init, data.in_shape)
    x_dev, y_dev = jnp.asarray(x_tr), jnp.asarray(y_tr)
    dp = (1.0, 1.0)

    variants = {"shuffled, B rows a step": (
        loop.make_train_chunk(model, loss, opt, batch_size=b, max_steps=steps, dp=dp),
        jax.random.permutation(jax.random.fold_in(data_key, 1), n), None)}
    for phys in args.physical.split(","):
        size = privacy.default_physical_batch(n, b / n) if phys == "default" else int(phys)
        variants[f"Poisson, P = {size}{' (default)' if phys == 'default' else ''}"] = (
            loop.make_poisson_chunk(model, loss, opt, n=n, batch_size=b, physical=size, max_steps=steps, dp=dp),
            jax.random.fold_in(data_key, privacy.SAMPLING_STREAM), size)

    def epoch(chunk, order):
        carry = jax.tree_util.tree_map(jnp.copy, (params, state, opt.init(params)))
        t = time.perf_counter()
        out = chunk(carry, x_dev, y_dev, order, np.int32(0), np.int32(steps), k_dropout, np.int32(0))
        jax.block_until_ready(out)
        return time.perf_counter() - t, out

    times, rows = {k: [] for k in variants}, {}
    for name, (chunk, order, size) in variants.items():
        _, out = epoch(chunk, order)                                                  # compile
        sizes = np.asarray(out[3]) if size else np.full(steps, b)
        rows[name] = float(np.mean(-(-sizes // size) * size)) if size else float(b)
    for _ in range(args.repeats):
        for name, (chunk, order, _) in variants.items():
            times[name].append(epoch(chunk, order)[0])

    print(f"MNIST-1D CNN, n = {n}, expected batch B = {b}, {steps} steps an epoch, C = 1, sigma = 1; "
          f"median of {args.repeats}; jax {jax.__version__}")
    print("| batches | rows computed a step | s/epoch | × shuffled |\n|---|---|---|---|")
    base = statistics.median(times["shuffled, B rows a step"])
    for name in variants:
        med = statistics.median(times[name])
        print(f"| {name} | {rows[name]:.1f} | {med:.3f} | {med / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
