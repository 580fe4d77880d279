"""What data-parallel and FSDP-style training cost in communication and save in memory.

Run with forced host devices (timings across them would mean nothing on 2 cores, so none are
taken); it reads the compiled training step of the MNIST-1D CNN and of the 784-1024-1024-10 MLP:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python scripts/benchmarks/dist_report.py

It prints, per model and strategy, the collectives in the compiled step's HLO (count and bytes
per step) and the per-device bytes of params and optimizer state.
"""
from __future__ import annotations

import argparse
import re

import jax
import numpy as np
import optax

import bpjax as bp
from bpjax import distributed as dist, models, train

DTYPE_BYTES = {"f32": 4, "f64": 8, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s64": 8, "pred": 1}
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _bytes(shape_text):
    total = 0
    for dt, dims in re.findall(r"(f32|f64|bf16|f16|s32|u32|s64|pred)\[([0-9,]*)\]", shape_text):
        total += DTYPE_BYTES[dt] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def collectives(hlo: str):
    found = {}
    for line in hlo.splitlines():
        if " = " not in line:
            continue
        result_and_op = line.split(" = ", 1)[1]
        for kind in KINDS:
            for op in (f" {kind}(", f" {kind}-start("):
                if op in result_and_op:                      # "<result shape> all-reduce(...)"
                    n, b = found.get(kind, (0, 0))
                    found[kind] = (n + 1, b + _bytes(result_and_op.split(op)[0]))
    return found


def per_device_bytes(tree):
    first = jax.devices()[0]
    return sum(s.data.nbytes for a in jax.tree_util.tree_leaves(tree) for s in a.addressable_shards
               if s.device == first)


def report(name, model, in_shape, batch, n_devices):
    loss, opt = bp.softmax_cross_entropy(), optax.adam(1e-3)
    params, state, _ = model.init(jax.random.PRNGKey(0), in_shape)
    rows = []
    for fsdp in (False, True):
        mesh = dist.make_mesh(n_devices)
        p, p_sh = dist.place(mesh, params, fsdp=fsdp)
        o, o_sh = dist.place(mesh, opt.init(params), fsdp=fsdp)
        s, s_sh = dist.place(mesh, state)
        step = train.make_train_step(model, loss, opt, donate=False, shardings=(
            p_sh, s_sh, o_sh, dist.batch_sharding(mesh), dist.replicated(mesh)))
        x = jax.ShapeDtypeStruct((batch, *in_shape), np.float32, sharding=dist.batch_sharding(mesh))
        y = jax.ShapeDtypeStruct((batch,), np.int32, sharding=dist.batch_sharding(mesh))
        hlo = step.lower(p, s, o, x, y, jax.random.PRNGKey(0), 0).compile().as_text()
        coll = collectives(hlo)
        text = ", ".join(f"{k} ×{n} ({b / 1024:.1f} KiB)" for k, (n, b) in sorted(coll.items())) or "none"
        rows.append((name, n_devices, "FSDP" if fsdp else "replicated", text,
                     per_device_bytes(p) / 1024, per_device_bytes(o) / 1024))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.parse_args(argv)
    n = jax.device_count()
    rows = report("MNIST-1D CNN, batch 100", models.cnn(10), (40, 1), 100 if 100 % n == 0 else 4 * n, n)
    mlp = bp.sequential(bp.dense(1024), bp.relu(), bp.dense(1024), bp.relu(), bp.dense(10))
    rows += report("MLP 784-1024-1024-10, batch 128", mlp, (784,), 128, n)
    print(f"JAX {jax.__version__}, {n} x {jax.devices()[0].platform} devices\n")
    print("| model | devices | params | collectives in one compiled step (count, bytes) | "
          "params per device (KiB) | optimizer state per device (KiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:.1f} |")


if __name__ == "__main__":
    main()
