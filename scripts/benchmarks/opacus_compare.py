"""DP-SGD steps side by side: bpjax (clipped_grad + noise) against Opacus on PyTorch, on the CPU.

The same two networks as ``scripts/benchmarks/bench.py`` (the MLP 784-1024-1024-10 at batch 256; the 2-D
CNN conv 3×3 32 ReLU, conv 3×3 64 ReLU, 'SAME', flatten, dense 10 on 28×28×1 at batch 128),
float32, one SGD step per call (learning rate 0.01), clip norm C = 1, noise multiplier σ = 1:

* bpjax, non-private: ``bp.value_and_grad`` + SGD, jitted;
* bpjax, DP-SGD: ``bp.clipped_grad`` + Gaussian noise σ·C/B + SGD, jitted;
* PyTorch, non-private: eager forward, backward, ``torch.optim.SGD``;
* Opacus, DP-SGD: ``GradSampleModule`` (per-sample gradients by hooks) + ``DPOptimizer``.

Time: median over ``--rounds`` rounds of ``--reps`` steps. Memory: bpjax, XLA's temporary
buffers of the compiled step (``memory_analysis()``); PyTorch, each variant runs in a fresh
process and reports its peak resident memory (``ru_maxrss``) after its steps, so the
difference between the two PyTorch rows is the cost of privacy (their common part, Python,
PyTorch and the model, ~0.3 GB, is in both).

    pip install torch opacus      # bench-only dependencies
    python scripts/benchmarks/opacus_compare.py
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np

MODELS = {"mlp": 256, "cnn2d": 128}


def _data(name, batch):
    gen = np.random.default_rng(0)
    shape = (batch, 784) if name == "mlp" else (batch, 28, 28, 1)
    return gen.standard_normal(shape).astype(np.float32), gen.integers(0, 10, batch)


def _timed(step, rounds, reps):
    step()                                                           # warm (and compile)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        times.append((time.perf_counter() - t0) / reps * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------- bpjax


def bpjax_rows(name, rounds, reps):
    import jax
    import jax.numpy as jnp
    import optax
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    import bpjax as bp
    batch = MODELS[name]
    if name == "mlp":
        model = bp.sequential(bp.dense(1024), bp.relu(), bp.dense(1024), bp.relu(), bp.dense(10))
    else:
        model = bp.sequential(bp.conv(32, 3, padding="SAME", activation="relu"),
                              bp.conv(64, 3, padding="SAME", activation="relu"), bp.flatten(), bp.dense(10))
    x, y = (jnp.asarray(a) for a in _data(name, batch))
    params, state, _ = model.init(jax.random.PRNGKey(0), x.shape[1:])
    loss, opt = bp.softmax_cross_entropy(), optax.sgd(0.01)
    opt_state = opt.init(params)
    plain, clipped = bp.value_and_grad(model, loss), bp.clipped_grad(model, loss, 1.0)

    def step_plain(params, opt_state, key):
        (_, _), g = plain(params, state, x, y)
        u, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, u), opt_state

    def step_dp(params, opt_state, key):
        (_, _), g, _ = clipped(params, state, x, y)
        leaves, tree = jax.tree_util.tree_flatten(g)
        keys = jax.random.split(key, len(leaves))
        g = tree.unflatten([a + (1.0 * 1.0 / batch) * jax.random.normal(k, a.shape, a.dtype)
                            for a, k in zip(leaves, keys)])
        u, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, u), opt_state

    rows = []
    for variant, f in (("bpjax", step_plain), ("bpjax DP-SGD (clipped_grad)", step_dp)):
        c = jax.jit(f).lower(params, opt_state, jax.random.PRNGKey(1)).compile()
        ms = _timed(lambda: jax.block_until_ready(c(params, opt_state, jax.random.PRNGKey(1))), rounds, reps)
        rows.append((name, batch, variant, ms, f"{c.memory_analysis().temp_size_in_bytes / 2**20:.1f} MiB temp"))
    return rows


# ----------------------------------------------------------------------------- PyTorch / Opacus


def _torch_child(name, dp, rounds, reps, queue):
    import torch
    torch.manual_seed(0)
    batch = MODELS[name]
    if name == "mlp":
        net = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                  torch.nn.ReLU(), torch.nn.Linear(1024, 10))
    else:
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                  torch.nn.Linear(28 * 28 * 64, 10))
    x, y = _data(name, batch)
    x = torch.from_numpy(x if name == "mlp" else np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(y)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    if dp:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
        net = GradSampleModule(net)
        opt = DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch)
    lossf = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        lossf(net(x), y).backward()
        opt.step()

    ms = _timed(step, rounds, reps)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # KiB -> MiB (Linux)
    queue.put((ms, rss, torch.__version__))


def torch_rows(name, rounds, reps):
    rows = []
    ctx = mp.get_context("spawn")
    for variant, dp in (("PyTorch eager", False), ("Opacus DP-SGD (GradSampleModule)", True)):
        q = ctx.Queue()
        p = ctx.Process(target=_torch_child, args=(name, dp, rounds, reps, q))
        p.start()
        ms, rss, version = q.get()
        p.join()
        rows.append((name, MODELS[name], variant, ms, f"{rss:.0f} MiB peak RSS"))
    return rows, version


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,cnn2d")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    if any(m not in MODELS for m in names) or args.rounds < 1 or args.reps < 1:
        print(f"opacus_compare.py: expected --models from {', '.join(MODELS)} and --rounds, --reps >= 1",
              file=sys.stderr)
        return 2
    try:
        import opacus
    except ImportError:
        print("opacus_compare.py: needs torch and opacus (pip install torch opacus)", file=sys.stderr)
        return 2
    import jax
    load = os.getloadavg()
    rows, tv = [], ""
    for m in names:
        rows += bpjax_rows(m, args.rounds, args.reps)
        r, tv = torch_rows(m, args.rounds, args.reps)
        rows += r
    print(f"JAX {jax.__version__}, PyTorch {tv}, Opacus {opacus.__version__}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs; load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"after {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| model | batch | variant | ms/step | × its non-private step | memory |")
    print("|---|---|---|---|---|---|")
    base = {}
    for name, batch, variant, ms, mem in rows:
        key = (name, variant.split()[0] in ("PyTorch", "Opacus"))
        base.setdefault(key, ms)
        print(f"| {name} | {batch} | {variant} | {ms:.1f} | {ms / base[key]:.2f} | {mem} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
