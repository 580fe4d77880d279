"""Per-example gradient norms from one backward, against the plain step and the vmapped ones.

For each model (``scripts/benchmarks/bench.py``'s definitions: the MLP 784-1024-1024-10 at batch 256, the
2-D CNN at batch 128, or 64 as issue 24's targets (``cnn2d_b64``), and the GPT at batch 4 × 256 tokens), three jitted functions of
(params, state, x, y), in one process, on the same inputs:

* ``value_and_grad``: ``bp.value_and_grad``, the plain training gradient;
* ``norms+grads``: ``bp.per_example_grad_norms``, the same gradient and every example's norm;
* ``vmapped``: ``bp.per_example_grads`` (each example's whole gradient, vmapped) and the norms
  of those, as jax_privacy computes them;
* ``clipped_grad (DP-SGD)``: ``bp.clipped_grad`` (C = 1), DP-SGD's clipped mean gradient (the
  noise, one normal draw per parameter, left out): an observed backward for the norms, then
  a second backward with the rows of dy scaled.

Time: the median of ``--rounds`` rounds, each the mean of ``--reps`` calls, the three variants
interleaved round by round (a busy machine slows them alike). Memory: the XLA temporary
buffers of the compiled function, ``compiled.memory_analysis().temp_size_in_bytes``.

    python scripts/benchmarks/per_example_bench.py                   # all three, prints a Markdown table
    python scripts/benchmarks/per_example_bench.py --models mlp --rounds 3
"""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
import bpjax as bp  # noqa: E402
import bench  # noqa: E402  (scripts/benchmarks/bench.py: the model definitions)

MODELS = {"mlp": lambda: bench.mlp(256), "cnn2d": lambda: bench.cnn2d(128), "cnn2d_b64": lambda: bench.cnn2d(64),
          "gpt": bench.gpt}


def variants(model, loss):
    plain = bp.value_and_grad(model, loss)
    ours = bp.per_example_grad_norms(model, loss)
    pe = bp.per_example_grads(model, loss)

    def vmapped(params, state, x, y):
        (value, new_state), grads = plain(params, state, x, y)
        g = pe(params, state, x, y)
        sq = sum(jnp.sum(a.reshape(a.shape[0], -1) ** 2, axis=1) for a in jax.tree_util.tree_leaves(g))
        return (value, new_state), grads, jnp.sqrt(sq)

    clipped = bp.clipped_grad(model, loss, 1.0)
    return {"value_and_grad": plain, "norms+grads": ours, "vmapped per_example_grads": vmapped,
            "clipped_grad (DP-SGD)": clipped}


def measure(name, rounds, reps):
    b = MODELS[name]()
    loss = bp.softmax_cross_entropy()
    params, state, _ = b.model.init(jax.random.PRNGKey(0), b.x.shape[1:])
    x, y = jnp.asarray(b.x), jnp.asarray(b.y)
    compiled, rows = {}, {}
    for v, f in variants(b.model, loss).items():
        t0 = time.perf_counter()
        c = jax.jit(f).lower(params, state, x, y).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(c(params, state, x, y))                 # warm
        compiled[v] = c
        rows[v] = {"temp": c.memory_analysis().temp_size_in_bytes / 2**20, "compile": compile_s, "times": []}
    for _ in range(rounds):
        for v, c in compiled.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                out = c(params, state, x, y)
            jax.block_until_ready(out)
            rows[v]["times"].append((time.perf_counter() - t0) / reps * 1e3)
    ours = compiled["norms+grads"](params, state, x, y)[2]
    ref = compiled["vmapped per_example_grads"](params, state, x, y)[2]
    agree = float(jnp.max(jnp.abs(ours - ref) / jnp.maximum(jnp.abs(ref), 1e-30)))
    return b, rows, agree


def table(results) -> str:
    lines = ["| model | batch | variant | ms/step | × value_and_grad | temp MiB | × value_and_grad | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for b, rows, agree in results:
        base_t = statistics.median(rows["value_and_grad"]["times"])
        base_m = rows["value_and_grad"]["temp"]
        for v, r in rows.items():
            t = statistics.median(r["times"])
            lines.append(f"| {b.name} | {b.batch} | {v} | {t:.1f} | {t / base_t:.2f} | {r['temp']:.1f} | "
                         f"{r['temp'] / max(base_m, 1e-9):.2f} | {r['compile']:.1f} |")
    lines.append("")
    lines.append("Largest relative difference of the norms from the vmapped ones (float32): "
                 + ", ".join(f"{b.name} {agree:.1e}" for b, _, agree in results))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,cnn2d,gpt", help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    bad = [m for m in names if m not in MODELS]
    if bad or args.rounds < 1 or args.reps < 1:
        print(f"per_example_bench.py: expected --models from {', '.join(MODELS)} and --rounds, --reps >= 1, "
              f"got {args.models!r}", file=sys.stderr)
        return 2
    load = os.getloadavg()
    print(f"{datetime.date.today()}, JAX {jax.__version__}, Python {platform.python_version()}, "
          f"{jax.devices()[0].device_kind} ({os.cpu_count()} CPUs), load average before "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    results = [measure(m, args.rounds, args.reps) for m in names]
    print(table(results))
    load = os.getloadavg()
    print(f"load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
