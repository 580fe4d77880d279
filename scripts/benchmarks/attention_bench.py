"""Attention forward + backward: bpjax's Pallas kernels against bpjax's jnp lean
path, autodiff of plain attention and ``jax.nn.dot_product_attention`` (cuDNN where it runs),
in TFLOP/s and XLA's temporary memory.

    python scripts/benchmarks/attention_bench.py              # GPU sizes: T = 1024, 2048, 4096, 12 heads of 64, bf16, causal
    python scripts/benchmarks/attention_bench.py --tiny       # a CPU smoke run in seconds (Pallas interpreted); no timing means anything

Each variant is one jitted function of (q, k, v, dO) returning (dQ, dK, dV) (the attention
alone: no projections); it is compiled once (``lower().compile()``), run ``--warmup`` times,
then timed ``--reps`` times, blocking on every result; the table gives the median. FLOPs, by
hand, per batch and head: the forward's two products Q Kᵀ and P V, 2·2·T²·d, the backward's
four (dV, dP, dQ, dK), 4·2·T²·d: 12·T²·d in all, halved when causal (the blocks above the
diagonal are skipped). Recomputation (the flash backward computes S again) is not counted:
every variant is credited with the same FLOPs. Memory: ``compiled.memory_analysis()``'s
temporary bytes (what XLA allocates beyond arguments and outputs), and that per head and per
query row, which stays flat as T grows where memory is O(T) per head. Each variant's dQ, dK, dV
are compared with the float32 autodiff of plain attention (max |error| / max |reference|).

Variants (rows): ``pallas BqxBk`` (bpjax/kernels/flash.py, one row per ``--blocks`` entry),
``jnp lean`` (bpjax/layers/attention.py's blockwise forward and backward, key block
``--lean-block``), ``autodiff plain`` (jax.vjp of softmax(Q Kᵀ/√d) V with the (T × T) matrix),
``dot_product_attention cudnn`` and ``… xla`` (jax.vjp of ``jax.nn.dot_product_attention``; a
variant that does not run here says why in its row). The last line compares Pallas with the
jnp lean path at the T nearest 2048 (the target on an H100: ≥ 2×).
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bpjax.layers import attention as _attention
from bpjax.kernels import flash as _flash

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def attention_flops(n, h, t, d, causal):
    """Forward + backward FLOPs of attention, by hand (see the module docstring)."""
    return 12.0 * n * h * t * t * d * (0.5 if causal else 1.0)


def _plain(q, k, v, causal, scale):
    """softmax(Q Kᵀ · scale) V, the (T × T) matrix materialised: (N, h, T, d)."""
    t = q.shape[2]
    return _attention._attention_forward(q, k, v, _attention._allowed(None, causal, t, t), scale,
                                         user_mask=False)[0]


def variants(args, causal, scale):
    """name -> f(q, k, v, do) -> (dq, dk, dv), all in the (N, h, T, d) layout."""
    out = {}
    interpret = jax.default_backend() != "gpu"                  # this script runs where it is timed
    for bq, bk in args.blocks:
        def pallas(q, k, v, do, blocks=(bq, bk)):
            o, lse = _flash.flash_forward(q, k, v, None, causal=causal, scale=scale, blocks=blocks,
                                          interpret=interpret)
            return _flash.flash_backward(do, q, k, v, o, lse, None, causal=causal, scale=scale,
                                         blocks=blocks, interpret=interpret)
        out[f"pallas {bq}x{bk}"] = pallas

    def lean(q, k, v, do):
        block = min(args.lean_block, q.shape[2])
        o, lse = _attention._lean_forward(q, k, v, None, causal, scale, block)
        return _attention._lean_backward(do, q, k, v, o, lse, None, causal, scale, block)

    def autodiff(q, k, v, do):
        return jax.vjp(lambda q, k, v: _plain(q, k, v, causal, scale), q, k, v)[1](do)

    def dpa(implementation):
        def f(q, k, v, do):                      # jax.nn's layout is (N, T, h, d)
            swap = lambda a: a.transpose(0, 2, 1, 3)                           # noqa: E731
            fwd = lambda q, k, v: jax.nn.dot_product_attention(                # noqa: E731
                q, k, v, is_causal=causal, scale=scale, implementation=implementation)
            grads = jax.vjp(fwd, swap(q), swap(k), swap(v))[1](swap(do))
            return tuple(swap(g) for g in grads)
        return f

    out["jnp lean"] = lean
    out["autodiff plain"] = autodiff
    out["dot_product_attention cudnn"] = dpa("cudnn")
    out["dot_product_attention xla"] = dpa("xla")
    return out


def measure(f, args_, warmup, reps):
    """(compiled function's median seconds, temp bytes, outputs)."""
    compiled = jax.jit(f).lower(*args_).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(compiled(*args_))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args_))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), temp, out


def _rel_err(got, want):
    got, want = (np.asarray(a, np.float32) for a in (got, want))
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def run(args) -> list:
    """Every variant at every T; returns rows (T, name, ms, TFLOP/s, temp MiB, bytes per head
    per row, max rel. error) with None where a variant failed (and its error as the name)."""
    dtype = DTYPES[args.dtype]
    causal = not args.no_causal
    scale = 1.0 / math.sqrt(args.head_size)
    rows = []
    for t in args.t:
        gen = np.random.default_rng(t)
        shape = (args.batch, args.heads, t, args.head_size)
        q, k, v, do = (jnp.asarray(gen.standard_normal(shape), dtype) for _ in range(4))
        f32 = [a.astype(jnp.float32) for a in (q, k, v, do)]
        ref = jax.jit(lambda q, k, v, do: jax.vjp(lambda q, k, v: _plain(q, k, v, causal, scale),
                                                  q, k, v)[1](do))(*f32)
        flops = attention_flops(args.batch, args.heads, t, args.head_size, causal)
        for name, f in variants(args, causal, scale).items():
            try:
                sec, temp, grads = measure(f, (q, k, v, do), args.warmup, args.reps)
            except Exception as e:                 # a variant this machine cannot run
                why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:90] if str(e).strip() else ''}"
                rows.append((t, name, None, None, None, None, why))
                print(f"T={t} {name}: did not run ({why})", flush=True)
                continue
            err = max(_rel_err(g, r) for g, r in zip(grads, ref))
            row = (t, name, 1e3 * sec, flops / sec / 1e12, temp / 2**20,
                   temp / (args.batch * args.heads * t), err)
            rows.append(row)
            print(f"T={t} {name}: {row[2]:.3f} ms, {row[3]:.3g} TFLOP/s, temp {row[4]:.1f} MiB, "
                  f"max rel. error {err:.1e}", flush=True)
    return rows


def report(args, rows) -> str:
    causal = "causal" if not args.no_causal else "not causal"
    dev = jax.devices()[0]
    lines = [f"attention forward + backward: N={args.batch}, {args.heads} heads of {args.head_size}, "
             f"{args.dtype}, {causal}; {jax.default_backend()} {dev.device_kind}; jax {jax.__version__}, "
             f"python {platform.python_version()}; median of {args.reps} runs"
             + ("; Pallas interpreted (not on a GPU): timings mean nothing" if jax.default_backend() != "gpu" else ""),
             "",
             "| T | variant | ms | TFLOP/s | temp MiB | temp bytes / (head·row) | max rel. error |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for t, name, ms, tflops, mib, per_row, err in rows:
        if ms is None:
            lines.append(f"| {t} | {name} | – | – | – | – | did not run: {err} |")
        else:
            lines.append(f"| {t} | {name} | {ms:.3f} | {tflops:.3g} | {mib:.1f} | {per_row:.0f} | {err:.1e} |")
    lines.append("")
    lines.append(_verdict(args, rows))
    return "\n".join(lines)


def _verdict(args, rows) -> str:
    """Pallas (its fastest blocks) against the jnp lean path at the T nearest 2048."""
    t = min(args.t, key=lambda t: abs(t - 2048))
    ms = {name: m for tt, name, m, *_ in rows if tt == t and m is not None}
    pallas = {n: m for n, m in ms.items() if n.startswith("pallas")}
    if not pallas or "jnp lean" not in ms:
        return f"pallas vs jnp lean at T={t}: not measured (a variant did not run)"
    best = min(pallas, key=pallas.get)
    return (f"pallas vs jnp lean at T={t}: {ms['jnp lean'] / pallas[best]:.2f}x the lean path's speed "
            f"({best}, {pallas[best]:.3f} against {ms['jnp lean']:.3f} ms; the H100 target is ≥ 2x)")


def _blocks(text):
    try:
        pairs = [tuple(int(b) for b in item.split("x")) for item in text.split(",")]
        return [_flash.check_blocks("attention_bench", p) for p in pairs]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected blocks like 64x64,128x64 ({e})") from None


def options(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--t", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096],
                   help="sequence lengths, comma-separated")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--blocks", type=_blocks, default=[(64, 64), (128, 64)],
                   help="Pallas (query, key) blocks, one row each: 64x64,128x64")
    p.add_argument("--lean-block", type=int, default=128, help="the jnp lean path's key block")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke sizes: T=40, N=1, 2 heads of 16, float32, blocks 16x16, one run")
    p.add_argument("--out", help="also write the report (markdown) to this file")
    args = p.parse_args(argv)
    if args.tiny:
        args.t, args.batch, args.heads, args.head_size = [40], 1, 2, 16
        args.dtype, args.blocks, args.lean_block, args.warmup, args.reps = "float32", [(16, 16)], 16, 0, 1
    return args


def main(argv=None):
    args = options(argv)
    rows = run(args)
    text = report(args, rows)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return rows


if __name__ == "__main__":
    main()
