"""Is GPT-2 124M's training step ready for a GPU, checked on a CPU (issue 27, part 4)?

Two checks of the step ``scripts/examples/train_gpt.py`` runs (the hand-written backward, bfloat16
compute with float32 master weights, AdamW) on abstract inputs, so that no 124M arrays are made:

1. ``jax.export`` for CUDA: the step lowers for ``platforms=["cuda"]`` here, where no GPU is, and
   its StableHLO module is written; a lowering that needed a CPU-only kernel or a missing CUDA rule would fail here.
2. Memory: the step compiled for this CPU at batch B × T tokens, and ``memory_analysis()``'s
   arguments + outputs + temporaries (aliased donated buffers counted once) against the device's
   memory (``--device-gb``, 80 by default: an H100). If it does not fit, the batch is halved until it
   does, and the script says which batch fits. The CPU's program is not the GPU's (other fusions,
   other kernels), so this is an estimate of the GPU's need, not its measurement; gpu_check.sh
   measures the peak on the GPU itself.

    python scripts/benchmarks/gpt2_memory.py                  # 124M, batch 16 × 1024
    python scripts/benchmarks/gpt2_memory.py --tiny           # a tiny GPT, seconds (the test's)

Exit status 0 when the export passed and some batch fits, 1 otherwise.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import optax

import bpjax as bp

SIZES = {"124m": {"vocab": 50257, "layers": 12, "dim": 768, "heads": 12, "context": 1024, "batch": 16},
         "tiny": {"vocab": 97, "layers": 2, "dim": 32, "heads": 2, "context": 32, "batch": 4}}


def abstract_step(*, vocab, layers, dim, heads, context, batch, dtype=jnp.bfloat16):
    """The jitted training step and its abstract arguments ``(params, opt_state, x, y)``."""
    model = bp.gpt(vocab, dim=dim, num_heads=heads, num_layers=layers, max_len=context)
    loss = bp.softmax_cross_entropy()
    params = jax.eval_shape(lambda k: model.init(k, (context,))[0], jax.random.PRNGKey(0))
    opt = optax.adamw(6e-4, weight_decay=0.1)
    opt_state = jax.eval_shape(opt.init, params)
    grad_fn = bp.value_and_grad(model, loss, compute_dtype=dtype)

    def step(params, opt_state, x, y):
        (value, _), grads = grad_fn(params, (), x, y)              # the hand-written backward
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    ids = jax.ShapeDtypeStruct((batch, context), jnp.int32)
    return jax.jit(step, donate_argnums=(0, 1)), (params, opt_state, ids, ids)


def export_for_cuda(step, args) -> int:
    """The size in bytes of ``step``'s StableHLO module exported for CUDA (its bytecode: the full
    ``serialize()`` would need the flatbuffers package)."""
    exported = jax.export.export(step, platforms=["cuda"])(*args)
    assert exported.platforms == ("cuda",), exported.platforms
    return len(exported.mlir_module_serialized)


def compiled_bytes(step, args) -> dict:
    """``memory_analysis()`` of ``step`` compiled for this machine, in bytes."""
    m = step.lower(*args).compile().memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)
    return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes, "total": total}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny GPT instead of GPT-2 124M")
    p.add_argument("--batch", type=int, help="the batch to try first (default 16; tiny: 4)")
    p.add_argument("--context", type=int, help="tokens per sequence (default 1024; tiny: 32)")
    p.add_argument("--device-gb", type=float, default=80.0, help="the device's memory, GB (10^9 bytes)")
    a = p.parse_args(argv)
    sizes = dict(SIZES["tiny" if a.tiny else "124m"])
    for k in ("batch", "context"):
        if getattr(a, k) is not None:
            if getattr(a, k) < 1:
                p.error(f"expected --{k} to be a positive integer, got {getattr(a, k)}")
            sizes[k] = getattr(a, k)
    print(f"GPT: {sizes['layers']} blocks, dim {sizes['dim']}, {sizes['heads']} heads, vocabulary "
          f"{sizes['vocab']}, context {sizes['context']}; bfloat16 compute, float32 master weights, "
          f"AdamW; jax {jax.__version__}, compiled on {jax.default_backend()}", flush=True)

    t = time.perf_counter()
    step, args = abstract_step(**sizes)
    try:
        size = export_for_cuda(step, args)
        print(f"export for CUDA: ok, {size / 1e6:.2f} MB of StableHLO ({time.perf_counter() - t:.1f} s)")
        exported = True
    except Exception as e:  # noqa: BLE001 (the failure is the finding: said in one line)
        print(f"export for CUDA: FAILED, {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        exported = False

    limit = a.device_gb * 1e9
    batch, fits = sizes["batch"], None
    while batch >= 1:
        t = time.perf_counter()
        step, args = abstract_step(**{**sizes, "batch": batch})
        m = compiled_bytes(step, args)
        verdict = "fits" if m["total"] <= limit else "does not fit"
        print(f"batch {batch} × {sizes['context']}: {m['total'] / 1e9:.2f} GB (arguments "
              f"{m['arguments'] / 1e9:.2f}, outputs {m['outputs'] / 1e9:.2f}, aliased {m['aliased'] / 1e9:.2f}, "
              f"temporaries {m['temporaries'] / 1e9:.2f}): {verdict} in {a.device_gb:g} GB "
              f"(compiled in {time.perf_counter() - t:.1f} s)", flush=True)
        if m["total"] <= limit:
            fits = batch
            break
        batch //= 2
    if fits is None:
        print(f"memory: no batch fits in {a.device_gb:g} GB")
    elif fits != sizes["batch"]:
        print(f"memory: batch {sizes['batch']} does not fit in {a.device_gb:g} GB; batch {fits} does")
    else:
        print(f"memory: batch {fits} × {sizes['context']} fits in {a.device_gb:g} GB")
    return 0 if exported and fits is not None else 1


if __name__ == "__main__":
    sys.exit(main())
