"""Train a GPT, character- or byte-level, with the hand-written backward pass.

The corpus is the Python standard library's own source (the ``*.py`` files of
``sysconfig.get_paths()["stdlib"]``, in name order, then those of its subpackages): text on
every machine, no download. The last 10% is held out for validation. Gradients come from
``bp.value_and_grad``: the forward keeps each layer's residuals, the loss gives the error at the
output, and the backward walks the layers in reverse. optax's Adam takes the steps.

    python scripts/examples/train_gpt.py                        # --preset tiny: about half a minute on 2 CPU cores
    python scripts/examples/train_gpt.py --preset gpt2-small --dtype bfloat16     # GPT-2 small, on a GPU
    python scripts/examples/train_gpt.py --preset gpt2-small --dtype bfloat16 --steps 30 --batch 8 \\
        --print-every 10 --eval-every 0 --sample-chars 0                 # a throughput check

Presets (``PRESETS``; explicit flags override them): ``tiny`` is 2 blocks of width 64 over a
vocabulary of 96 characters (newline and printable ASCII); ``gpt2-small`` is GPT-2 small's shape,
12 blocks, width 768, 12 heads, context 1024, over the corpus as UTF-8 bytes (vocabulary 256),
86,039,040 parameters. ``--dtype bfloat16`` computes the forward and backward in bfloat16 from
float32 master weights (``bp.value_and_grad(..., compute_dtype=jnp.bfloat16)``); the parameters
and Adam's moments stay float32.

The training corpus sits on the device once; each jitted step draws its own (batch, T) windows
from a PRNG key (:func:`draw_windows`), so the host only dispatches steps.

Throughput. Every ``--print-every`` steps the script prints tokens/s and the model FLOPs
utilisation (MFU) of the steps since the last print; the first step (compilation), any profiled
steps, validation and sampling are outside the timed windows, and the clock is read after
blocking on the step's results. FLOPs per step, the PaLM paper's appendix formula::

    FLOPs/step = (6·N + 12·L·T·D) · B·T

with N the parameters that multiply activations: every parameter but the position table, the
tied token table counted once (it is the unembedding matrix; its lookup costs nothing), and
12·L·T·D the attention's score (Q Kᵀ) and value (A V) products, forward and backward, counted in
full although causal masking could skip half. The peak is ``bench.matmul_peak`` measured in the
same run in the compute dtype (a jitted ``jnp.dot`` of two n × n matrices, n = ``--peak-n``).
The run ends with one summary line: the median tokens/s and MFU over the timed windows and the
peak used; ``train()`` returns them as ``tokens_per_s``, ``mfu`` and ``peak_flops``.
``--profile DIR`` traces a few steps after the warm-up with ``jax.profiler`` into DIR and prints
the most expensive XLA operations (``profile_step.op_table``).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import bpjax as bp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))  # bench, profile_step

ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))      # newline and printable ASCII

PRESETS = {
    "tiny": dict(steps=600, batch=32, context=64, dim=64, heads=4, layers=2, lr=3e-3, warmup=0,
                 corpus_chars=1_000_000, vocab="chars", eval_every=200, eval_batches=16,
                 print_every=50, sample_chars=300),
    "gpt2-small": dict(steps=5000, batch=16, context=1024, dim=768, heads=12, layers=12, lr=6e-4,
                       warmup=200, corpus_chars=20_000_000, vocab="bytes", eval_every=500,
                       eval_batches=8, print_every=10, sample_chars=300),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def config(preset: str = "tiny", **overrides) -> dict:
    """The keyword arguments of :func:`train` for ``preset``, ``overrides`` (those not None)
    replacing its values."""
    if preset not in PRESETS:
        raise ValueError(f"train_gpt: expected preset in {sorted(PRESETS)}, got {preset!r}")
    unknown = set(overrides) - set(train.__kwdefaults__)
    if unknown:
        raise TypeError(f"train_gpt: unknown options {sorted(unknown)}")
    return {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}


def stdlib_files() -> list:
    """The standard library's ``*.py`` files: the top level in name order, then the subpackages
    (site-packages left out)."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    deeper = [p for p in stdlib.rglob("*.py") if p.parent != stdlib
              and not {"site-packages", "dist-packages"} & set(p.relative_to(stdlib).parts)]
    return sorted(stdlib.glob("*.py")) + sorted(deeper)


def load_corpus(max_chars: int) -> str:
    """Up to ``max_chars`` characters of standard-library source, tabs as spaces, other
    characters outside printable ASCII dropped."""
    keep = set(ALPHABET)
    parts, size = [], 0
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8", errors="replace").replace("\t", "    ")
        except OSError:
            continue
        text = "".join(c for c in text if c in keep)
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "".join(parts)[:max_chars]


def load_bytes(max_bytes: int) -> bytes:
    """Up to ``max_bytes`` bytes of standard-library source, as the files hold them."""
    parts, size = [], 0
    for path in stdlib_files():
        try:
            parts.append(path.read_bytes())
        except OSError:
            continue
        size += len(parts[-1])
        if size >= max_bytes:
            break
    return b"".join(parts)[:max_bytes]


def param_count(params, *, flops: bool = False) -> int:
    """Number of parameters in ``params`` (arrays or shape structs); ``flops=True`` leaves out
    the position table, which multiplies nothing (see the module docstring)."""
    if flops:
        params = {k: v for k, v in params.items() if k != "pos"}
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def flops_per_step(n_params: int, *, layers: int, context: int, dim: int, batch: int) -> float:
    """Training FLOPs of one step (forward and backward), PaLM's formula:
    (6·N + 12·L·T·D) per token, B·T tokens."""
    return (6.0 * n_params + 12.0 * layers * context * dim) * batch * context


def build(*, vocab_size, dim, heads, layers, context, lean=False, attention_impl="jnp"):
    """The GPT and its parameters' shapes (``jax.eval_shape`` of ``init``: nothing computed)."""
    model = bp.gpt(vocab_size, dim=dim, num_heads=heads, num_layers=layers, max_len=context,
                   lean=lean, attention_impl=attention_impl)
    shapes = jax.eval_shape(lambda k: model.init(k, (context,))[0], jax.random.PRNGKey(0))
    return model, shapes


def init_on_host(model, in_shape, seed: int):
    """``model.init``'s parameter tree, drawn with NumPy from the same distributions.

    ``jax.random`` compiles slowly on small CPUs (seconds per call), so the script draws on
    the host: token table N(0, 0.02²), positions N(0, 0.01²), dense weights Glorot-uniform,
    biases 0, layer-norm scales 1, as ``bp.gpt`` does."""
    gen = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda k: model.init(k, in_shape)[0], jax.random.PRNGKey(0))

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['table']"):
            a = 0.02 * gen.standard_normal(s.shape)
        elif name.endswith("['pos']"):
            a = 0.01 * gen.standard_normal(s.shape)
        elif name.endswith("['scale']"):                           # layer norms
            a = np.ones(s.shape)
        elif name.endswith(("['w']", "['w_qkv']", "['w_o']")):    # dense weights (L, D_in, D_out)
            limit = np.sqrt(6 / sum(s.shape[-2:]))
            a = gen.uniform(-limit, limit, s.shape)
        else:                                                      # biases
            a = np.zeros(s.shape)
        return jnp.asarray(a, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def draw_windows(data, key, batch: int, context: int):
    """``batch`` random windows of the corpus ``data`` (S,), on the device, inside jit: inputs
    data[o : o+T] and labels data[o+1 : o+T+1], both (batch, T), for offsets o drawn uniformly
    from [0, S − T − 1)."""
    offsets = jax.random.randint(key, (batch,), 0, data.shape[0] - context - 1)   # (B,)
    windows = jax.vmap(lambda o: lax.dynamic_slice(data, (o,), (context + 1,)))(offsets)  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


def batches(data: np.ndarray, batch: int, context: int, gen: np.random.Generator):
    """Random windows on the host (for validation): inputs data[o : o+T] and labels
    data[o+1 : o+T+1], both (batch, T)."""
    while True:
        offsets = gen.integers(0, len(data) - context - 1, batch)
        idx = offsets[:, None] + np.arange(context)[None, :]
        yield jnp.asarray(data[idx]), jnp.asarray(data[idx + 1])


def cross_entropy(logits, labels) -> float:
    """Mean −log p(label) over all positions, on the host: logits (N, T, V), labels (N, T)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, np.asarray(labels)[..., None], -1).mean())


def sample(logits_fn, params, prompt_ids, length, context, gen, temperature=0.8):
    """Generate ``length`` characters after ``prompt_ids``, one at a time, from a window of the
    last ``context`` characters, zero-padded to a fixed (1, context) (causal: position i's
    logits ignore what follows it, padding included)."""
    ids = list(prompt_ids)
    for _ in range(length):
        window = ids[-context:]
        padded = np.zeros((1, context), np.int32)
        padded[0, :len(window)] = window
        logits = np.asarray(logits_fn(params, jnp.asarray(padded))[0, len(window) - 1], np.float64) / temperature
        p = np.exp(logits - logits.max())
        ids.append(int(gen.choice(len(p), p=p / p.sum())))
    return ids[len(prompt_ids):]


def train(*, steps=600, batch=32, context=64, dim=64, heads=4, layers=2, lr=3e-3, warmup=0,
          corpus_chars=1_000_000, vocab="chars", dtype="float32", eval_every=200, eval_batches=16,
          print_every=50, sample_chars=300, lean=False, attention_impl="jnp", seed=0, prompt="def ",
          peak_n=None, profile=None, profile_steps=3, profile_top=20) -> dict:
    """Train and report; returns the final training and validation losses, the sample, and the
    throughput: ``tokens_per_s`` and ``mfu`` (medians over the timed windows), ``peak_flops``.

    ``vocab``: ``"chars"`` (96 characters) or ``"bytes"`` (256). ``dtype``: the compute dtype,
    ``"float32"`` or ``"bfloat16"``. ``eval_every=0``: no validation; ``sample_chars=0``: no
    sample. ``attention_impl``: the attention's ``impl`` ("jnp", "pallas", "auto"). ``peak_n``:
    the side of the matrices of the peak measurement (default 1024 on CPU, 8192 elsewhere).
    ``profile``: a directory for a trace of ``profile_steps`` steps."""
    t_start = time.perf_counter()
    if vocab == "chars":
        text = load_corpus(corpus_chars)
        table = {c: i for i, c in enumerate(ALPHABET)}
        data = np.array([table[c] for c in text], np.int32)
        vocab_size, unit = len(ALPHABET), "characters"
        encode = lambda s: [table[c] for c in s]                            # noqa: E731
        decode = lambda ids: "".join(ALPHABET[i] for i in ids)              # noqa: E731
        vocab_note = f"vocabulary {vocab_size} (newline and printable ASCII)"
    elif vocab == "bytes":
        data = np.frombuffer(load_bytes(corpus_chars), np.uint8).astype(np.int32)
        vocab_size, unit = 256, "bytes"
        encode = lambda s: list(s.encode())                                 # noqa: E731
        decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")   # noqa: E731
        vocab_note = f"vocabulary {vocab_size} (bytes of UTF-8)"
    else:
        raise ValueError(f"train_gpt: expected vocab 'chars' or 'bytes', got {vocab!r}")
    if dtype not in DTYPES:
        raise ValueError(f"train_gpt: expected dtype in {sorted(DTYPES)}, got {dtype!r}")
    compute_dtype = DTYPES[dtype]
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    print(f"corpus: {len(data):,} {unit} of Python stdlib source "
          f"({len(train_data):,} train, {len(val_data):,} validation), {vocab_note}")

    model, _ = build(vocab_size=vocab_size, dim=dim, heads=heads, layers=layers, context=context,
                     lean=lean, attention_impl=attention_impl)
    loss = bp.softmax_cross_entropy()
    params, state = init_on_host(model, (context,), seed), ()
    n_params, n_flops = param_count(params), param_count(params, flops=True)
    impl_note = "" if attention_impl == "jnp" else f", attention impl={attention_impl}"
    print(f"model: {layers} blocks, dim {dim}, {heads} heads, context {context}, vocabulary "
          f"{vocab_size}, {n_params:,} parameters{', lean attention backward' if lean else ''}{impl_note}; "
          f"compute {dtype}, float32 master weights and Adam state")

    step_flops = flops_per_step(n_flops, layers=layers, context=context, dim=dim, batch=batch)
    from bench import matmul_peak                   # scripts/benchmarks/ is on sys.path (above)
    if peak_n is None:
        peak_n = 1024 if jax.default_backend() == "cpu" else 8192
    peak = matmul_peak(n=peak_n, dtype=compute_dtype) * 1e9        # it returns GFLOP/s
    print(f"FLOPs per step {step_flops:.4g} = (6·N + 12·L·T·D)·B·T, N = {n_flops:,} (all but the "
          f"position table); peak {peak / 1e12:.4g} TFLOP/s ({dtype} {peak_n}² matmul, "
          f"{jax.devices()[0].device_kind})", flush=True)

    warmup = min(warmup, steps // 10)                              # a short run warms up less
    schedule = (optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr / 10)
                if warmup else optax.cosine_decay_schedule(lr, steps, alpha=0.1))   # to lr/10
    opt = optax.adam(schedule)
    opt_state = opt.init(params)
    grad_fn = bp.value_and_grad(model, loss, compute_dtype=None if dtype == "float32" else compute_dtype)

    def step(params, opt_state, key, data):
        key, sub = jax.random.split(key)
        x, y = draw_windows(data, sub, batch, context)             # (B, T), (B, T)
        (value, _), grads = grad_fn(params, state, x, y)           # the hand-written backward
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, value

    step = jax.jit(step, donate_argnums=(0, 1))

    @jax.jit
    def logits_fn(params, x):                                      # for validation and sampling
        p = bp.cast_floating(params, None if dtype == "float32" else compute_dtype)
        return model.forward(p, state, x, train=False)[0]

    gen = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    train_dev = jax.device_put(train_data)                         # on the device, once
    val_set = []
    if eval_every:
        val_gen = batches(val_data, batch, context, np.random.default_rng(seed + 1))
        val_set = [next(val_gen) for _ in range(eval_batches)]

    def validation():
        return float(np.mean([cross_entropy(logits_fn(params, x), y) for x, y in val_set]))

    def run_step(params, opt_state, key):
        return step(params, opt_state, key, train_dev)

    running, val, windows = [], float("nan"), []
    t0 = time.perf_counter()
    params, opt_state, key, value = run_step(params, opt_state, key)     # step 1: compiles
    running.append(value)
    jax.block_until_ready((params, value))
    done = 1
    if profile and steps > 1:
        from profile_step import op_table
        k = min(profile_steps, steps - 1)
        with jax.profiler.trace(profile, create_perfetto_trace=True):
            for _ in range(k):
                params, opt_state, key, value = run_step(params, opt_state, key)
                running.append(value)
            jax.block_until_ready((params, value))
        done += k
        rows = op_table(profile, steps=k, top=None, xla_only=True)
        print(f"profile: {k} steps traced into {profile}; {sum(r[0] for r in rows):.3f} ms per step "
              f"in {len(rows)} XLA operations, the most expensive:")
        for ms, n, name in rows[:profile_top]:
            print(f"{ms:9.3f} ms/step  ×{n:5.0f}  {name}")
    clock, clock_step = time.perf_counter(), done                  # timed from here
    mean = float("nan")
    for i in range(done + 1, steps + 1):
        params, opt_state, key, value = run_step(params, opt_state, key)
        running.append(value)
        if i % print_every == 0 or i == steps:
            jax.block_until_ready((params, value))
            now = time.perf_counter()
            mean = float(np.mean(jax.device_get(running)))
            running = []
            rate = ""
            if i > clock_step:
                tokens_per_s = (i - clock_step) * batch * context / (now - clock)
                mfu = step_flops * (i - clock_step) / (now - clock) / peak
                windows.append((tokens_per_s, mfu))
                rate = f"  {tokens_per_s:,.0f} tokens/s  MFU {100 * mfu:.1f}%"
            print(f"step {i:5d}  train loss {mean:.3f}{rate}  ({now - t0:.0f} s)", flush=True)
            clock, clock_step = time.perf_counter(), i
        if eval_every and (i % eval_every == 0 or i == steps):
            jax.block_until_ready(params)
            paused = time.perf_counter() - clock                   # validation is not timed
            val = validation()
            print(f"step {i:5d}  validation loss {val:.3f}", flush=True)
            clock = time.perf_counter() - paused
    if running:                                                    # steps == done: no timed step
        mean = float(np.mean(jax.device_get(running)))
    train_time = time.perf_counter() - t0

    text_out = ""
    if sample_chars:
        out = sample(logits_fn, params, encode(prompt), sample_chars, context, gen)
        text_out = prompt + decode(out)
        print(f"\nsample (temperature 0.8, prompt {prompt!r}):\n{text_out}\n")
    total = time.perf_counter() - t_start
    tokens_per_s = statistics.median(w[0] for w in windows) if windows else float("nan")
    mfu = statistics.median(w[1] for w in windows) if windows else float("nan")
    print(f"final train loss {mean:.3f}, validation loss {val:.3f} (nats per {unit[:-1]}); "
          f"training {train_time:.0f} s, total {total:.0f} s")
    print(f"throughput: {tokens_per_s:,.0f} tokens/s, MFU {100 * mfu:.1f}% (medians over "
          f"{len(windows)} windows) of a measured peak {peak / 1e12:.4g} TFLOP/s ({dtype})")
    stats = jax.devices()[0].memory_stats() or {}          # None on CPU; a dict on GPU/TPU
    peak_mem = stats.get("peak_bytes_in_use")
    print(f"peak device memory: {'n/a' if peak_mem is None else f'{peak_mem / 2**30:.2f} GiB'}")
    return {"train_loss": mean, "val_loss": val, "sample": text_out, "seconds": total,
            "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_flops": peak,
            "flops_per_step": step_flops, "params": n_params, "peak_memory_bytes": peak_mem}


def options(argv=None) -> dict:
    """The keyword arguments of :func:`train` for a command line: a preset's values, overridden
    by the flags given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="the run's sizes; the flags below override its values")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--context", type=int, help="sequence length T (and max_len)")
    p.add_argument("--dim", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate, cosine-decayed to lr/10")
    p.add_argument("--warmup", type=int, help="steps of linear learning-rate warm-up (at most a tenth of the steps)")
    p.add_argument("--corpus-chars", type=int, help="corpus size, in characters or bytes")
    p.add_argument("--vocab", choices=("chars", "bytes"))
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="compute dtype; params and Adam state stay float32")
    p.add_argument("--eval-every", type=int, help="0: no validation")
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--print-every", type=int)
    p.add_argument("--sample-chars", type=int, help="0: no sample")
    p.add_argument("--lean", action="store_true", help="the memory-lean (blockwise) attention backward")
    p.add_argument("--attention-impl", choices=("jnp", "pallas", "auto"),
                   help="the attention's formulation (multi_head_attention's impl; default jnp): "
                   "pallas = the flash-attention kernels, interpreted (slow) off a GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-n", type=int, help="matrix side of the matmul-peak measurement "
                   "(default 1024 on CPU, 8192 on an accelerator)")
    p.add_argument("--profile", metavar="DIR", help="trace a few steps after the warm-up into DIR "
                   "and print the most expensive XLA operations")
    p.add_argument("--profile-steps", type=int, default=3)
    args = vars(p.parse_args(argv))
    return config(args.pop("preset"), **args)


def main(argv=None):
    return train(**options(argv))


if __name__ == "__main__":
    main()
