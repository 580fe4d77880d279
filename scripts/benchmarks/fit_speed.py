"""How busy ``fit`` keeps the device: its steady-state time per training step against a bare
Python loop over the same jitted step, and against the host-fed loop ``fit`` ran before it kept
the data on the device, on the MNIST-1D CNN.

    python scripts/benchmarks/fit_speed.py                                   # batch 32 and 1024, MNIST-1D
    python scripts/benchmarks/fit_speed.py --batch-sizes 32 --repeats 5 --out fit_speed.json
    python scripts/benchmarks/fit_speed.py --synthetic --tiny                # a smoke run, no mnist1d needed

The three loops, each over the same data, model, loss (softmax cross-entropy) and Adam:

- **bare**: ``make_train_step``'s jitted step called once per batch, with every batch of the
  epoch already on the device: the least a Python loop can do per step.
- **host-fed**: the loop ``fit`` ran before it kept the data on the device: each batch gathered on the host with
  NumPy from the epoch's order and sent with the step, its loss and correct count kept.
- **fit**: :func:`bpjax.train.fit` itself (data on the device, chunks of steps per dispatch,
  validation after every epoch), with no checkpoints, metrics file or progress bar.

Steady state: each loop first runs one epoch (compiling), then the time of ``--epochs`` more
is divided by their steps; for ``fit`` the first epoch's end is read off its history. Each
loop runs ``--repeats`` times, interleaved, and the median is reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bpjax as bp
from bpjax import datasets, models, train

LR = 1e-3


def load(synthetic: bool, tiny: bool) -> datasets.Dataset:
    """MNIST-1D, or random data of its shape (4000 train, 1000 test, (40, 1), 10 classes)."""
    if not synthetic:
        return datasets.mnist1d()
    gen = np.random.default_rng(0)
    n, m = (400, 100) if tiny else (4000, 1000)
    return datasets.Dataset(gen.standard_normal((n, 40, 1)).astype(np.float32), gen.integers(0, 10, n),
                            gen.standard_normal((m, 40, 1)).astype(np.float32), gen.integers(0, 10, m),
                            10, "synthetic MNIST-1D shape")


def _fresh(model, data):
    params, state, _ = model.init(jax.random.PRNGKey(0), data.in_shape)
    return params, state


def bare_loop(model, loss, data, batch, epochs):
    """Seconds per step of the jitted step called per batch, batches pre-placed on the device."""
    opt = optax.adam(LR)
    step = train.make_train_step(model, loss, opt)
    x_tr, y_tr, _, _ = train.split_validation(data, 0.1, 0)
    steps = x_tr.shape[0] // batch
    key = jax.random.PRNGKey(1)

    def epoch_batches(e):
        order = train.epoch_order(key, e, x_tr.shape[0])
        return [(jnp.asarray(x_tr[order[i * batch:(i + 1) * batch]]), jnp.asarray(y_tr[order[i * batch:(i + 1) * batch]]))
                for i in range(steps)]

    params, state = _fresh(model, data)
    carry = (params, state, opt.init(params))
    batches = [epoch_batches(e) for e in range(1, epochs + 2)]
    jax.block_until_ready(batches)

    def run(epoch_list, carry, step0):
        for bs in epoch_list:
            for x, y in bs:
                *carry, value, _ = step(*carry, x, y, key, step0)
                step0 += 1
        jax.block_until_ready(carry)
        return tuple(carry), step0

    carry, s = run(batches[:1], carry, 0)                        # compile and warm up
    t = time.perf_counter()
    run(batches[1:], carry, s)
    return (time.perf_counter() - t) / (epochs * steps)


def host_fed_loop(model, loss, data, batch, epochs):
    """Seconds per step of the loop ``fit`` ran before it kept the data on the device (NumPy gather per step)."""
    opt = optax.adam(LR)
    step = train.make_train_step(model, loss, opt)
    x_tr, y_tr, _, _ = train.split_validation(data, 0.1, 0)
    n, key = x_tr.shape[0], jax.random.PRNGKey(1)
    steps = n // batch
    params, state = _fresh(model, data)
    carry = (params, state, opt.init(params))

    def run(first_epoch, last_epoch, carry):
        for e in range(first_epoch, last_epoch + 1):
            order = train.epoch_order(key, e, n)
            losses, corrects = [], []
            for i in range(steps):
                idx = order[i * batch:(i + 1) * batch]
                *carry, value, correct = step(*carry, x_tr[idx], y_tr[idx], key, (e - 1) * steps + i)
                losses.append(value)
                corrects.append(correct)
            np.asarray(jax.device_get(losses))
        return tuple(carry)

    carry = run(1, 1, carry)
    t = time.perf_counter()
    run(2, epochs + 1, carry)
    return (time.perf_counter() - t) / (epochs * steps)


def fit_loop(model, loss, data, batch, epochs):
    """Seconds per step of ``fit`` in its steady state (after its first epoch)."""
    result = train.fit(model, loss, data, optimizer=optax.adam(LR), epochs=epochs + 1, batch_size=batch,
                       patience=None, progress=False, log=lambda s: None)
    steps = (int(round(data.x_train.shape[0] * 0.9))) // batch
    seconds = [r["seconds"] for r in result.history]
    return (seconds[-1] - seconds[0]) / (epochs * steps)


LOOPS = {"bare": bare_loop, "host-fed": host_fed_loop, "fit": fit_loop}


def measure(data, batch_sizes, epochs, repeats):
    rows = []
    for batch in batch_sizes:
        model, loss = models.cnn(data.num_classes), bp.softmax_cross_entropy()
        times = {name: [] for name in LOOPS}
        for _ in range(repeats):
            for name, loop in LOOPS.items():
                times[name].append(loop(model, loss, data, batch, epochs))
        med = {name: statistics.median(ts) for name, ts in times.items()}
        rows.append({"batch": batch, **{f"{k}_ms_per_step": 1e3 * v for k, v in med.items()},
                     **{f"{k}_steps_per_s": 1.0 / v for k, v in med.items()},
                     "fit_over_bare": med["fit"] / med["bare"],
                     "fit_speedup_over_host_fed": med["host-fed"] / med["fit"],
                     "runs_ms": {k: [round(1e3 * t, 4) for t in v] for k, v in times.items()}})
    return rows


def table(rows) -> str:
    lines = ["| batch | bare ms/step | host-fed ms/step | fit ms/step | fit ÷ bare | fit steps/s ÷ host-fed's |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['bare_ms_per_step']:.3f} | {r['host-fed_ms_per_step']:.3f} | "
                     f"{r['fit_ms_per_step']:.3f} | {r['fit_over_bare']:.2f}× | "
                     f"{r['fit_speedup_over_host_fed']:.2f}× |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch-sizes", default="32,1024", help="comma-separated batch sizes")
    p.add_argument("--epochs", type=int, default=3, help="steady-state epochs timed per loop")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    p.add_argument("--synthetic", action="store_true", help="random data of MNIST-1D's shape (no mnist1d)")
    p.add_argument("--tiny", action="store_true", help="a smoke run: 400 synthetic examples, 1 epoch, 1 repeat")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch-sizes: expected comma-separated integers, got {args.batch_sizes!r}")
    if args.tiny:
        args.synthetic, args.epochs, args.repeats = True, 1, 1
        batch_sizes = [min(b, 64) for b in batch_sizes]
    data = load(args.synthetic, args.tiny)
    print(f"fit_speed: MNIST-1D CNN on {data.name} ({data.x_train.shape[0]} train), device "
          f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{args.epochs} epochs x {args.repeats} repeats", flush=True)
    rows = measure(data, batch_sizes, args.epochs, args.repeats)
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                       "jax": jax.__version__, "data": data.name, "epochs": args.epochs,
                       "repeats": args.repeats, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
