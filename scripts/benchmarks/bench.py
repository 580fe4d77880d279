"""Benchmark one jitted training step: bpjax's hand-written backward against jax.value_and_grad
of the same loss, and PyTorch eager for the same model, on the CPU, or on the GPU
when JAX runs on one and torch sees CUDA.

Usage::

    python scripts/benchmarks/bench.py                          # every model; prints the table, writes nothing
    python scripts/benchmarks/bench.py --out BENCHMARKS.md      # ... and writes the full report there
    python scripts/benchmarks/bench.py --models mlp128,cnn2d    # a subset
    python scripts/benchmarks/bench.py --quick --out /tmp/b.md  # a smoke run: one short chunk per variant

Each step is forward, loss, backward and an Adam update (optax, or torch.optim.Adam). Method:
every variant is compiled and warmed up, then all variants run interleaved in one process, a
chunk of many steps each in turn, with a short pause before each chunk (idle worker threads
of one library slow the next); the time per step is the median over the chunks.

FLOPs are counted by hand, per model, from the matrix products and convolutions only
(elementwise work, the loss and the optimizer are left out): a product of an (M, K) and a
(K, N) matrix is 2·M·K·N; the forward's count F is summed layer by layer, and the backward
costs 2·F (dW and dx of every product), less the dx of the first layer, which nobody needs
(XLA drops it). A convolution counts every kernel tap at every output position, padded
cells included (2·N·∏O·∏K·C_in·C_out), as lax and PyTorch compute it. Two matmul peaks are
measured in the same run, once per round among the chunks: a jitted ``jnp.dot`` of two n × n
float32 matrices and the same in bfloat16 (n = 2048 on CPU, 8192 on a GPU or TPU, ``--peak-n``
overrides). ``of peak`` is against the peak of the compute dtype (``--dtype``); the other peak
is stated under the table.

torch is optional: without it the PyTorch column says why it is missing.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bpjax as bp
import bpjax.models

COLUMNS = ("model", "batch", "variant", "ms/step", "× jax.grad", "GFLOP/s", "of peak",
           "compile s", "temp MiB", "faults/step")
LR = 1e-3


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass
class Bench:
    """One benchmarked model: the bpjax layer, one batch of inputs, its FLOPs per training step,
    and (optionally) a builder of the same model in PyTorch."""
    name: str
    batch: int
    model: bp.Layer
    x: np.ndarray
    y: np.ndarray
    flops: float                      # per training step (forward + backward), by hand
    torch_model: Optional[Callable] = None   # () -> torch.nn.Module taking x in the same layout
    note: str = ""


def _mm(m, k, n):
    """FLOPs of an (m, k) @ (k, n) product."""
    return 2.0 * m * k * n


def _train_flops(layer_flops):
    """Forward F, backward dW for every layer and dx for all but the first: 3F − F_first."""
    return 3 * sum(layer_flops) - layer_flops[0]


def _labels(gen, shape, k=10):
    return gen.integers(0, k, shape).astype(np.int32)


def mlp(batch):
    dims = (784, 1024, 1024, 10)
    model = bp.sequential(bp.dense(1024), bp.relu(), bp.dense(1024), bp.relu(), bp.dense(10))
    gen = np.random.default_rng(0)
    flops = _train_flops([_mm(batch, a, b) for a, b in zip(dims[:-1], dims[1:])])

    def torch_model():
        import torch.nn as nn
        return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                             nn.Linear(1024, 10))

    return Bench(f"MLP 784-1024-1024-10", batch, model,
                 gen.standard_normal((batch, 784), np.float32), _labels(gen, batch), flops, torch_model)


def _conv_out(n, k, s, lo, hi):
    return (n + lo + hi - k) // s + 1


def cnn1d(batch=100):
    """bpjax.models.cnn: conv 5/2, conv 3/2, conv 3/2 (padding 1, 25 channels), dense 10."""
    model = bp.models.cnn(10)
    gen = np.random.default_rng(1)
    length, c_in, layer_flops = 40, 1, []
    for k in (5, 3, 3):
        length = _conv_out(length, k, 2, 1, 1)
        layer_flops.append(2.0 * batch * length * k * c_in * 25)
        c_in = 25
    layer_flops.append(_mm(batch, length * 25, 10))

    def torch_model():
        import torch.nn as nn

        class M(nn.Module):           # channels last in, as bpjax: (N, L, C) -> (N, C, L)
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(
                    nn.Conv1d(1, 25, 5, 2, 1), nn.ReLU(), nn.Conv1d(25, 25, 3, 2, 1), nn.ReLU(),
                    nn.Conv1d(25, 25, 3, 2, 1), nn.ReLU())
                self.fc = nn.Linear(125, 10)

            def forward(self, x):
                h = self.net(x.transpose(1, 2))                 # (N, 25, 5)
                return self.fc(h.transpose(1, 2).flatten(1))    # flatten channels last, as bpjax

        return M()

    return Bench("MNIST-1D CNN (models.cnn)", batch, model,
                 gen.standard_normal((batch, 40, 1), np.float32), _labels(gen, batch),
                 _train_flops(layer_flops), torch_model)


def cnn2d(batch=128, relu_layers=False, impl="auto"):
    """conv 3×3 32, ReLU, conv 3×3 64, ReLU ('SAME'), flatten, dense 10, on 28×28×1. Each ReLU
    is inside its conv layer (``activation='relu'``); jax.grad differentiates the same
    forward. With ``impl='auto'`` on CPU the first conv is by columns and the second has its
    forward and dx as lax convolutions routed to Eigen, dW by columns. ``relu_layers=True``:
    the same network with separate relu layers (``--models cnn2d,cnn2d_relu_layers``);
    ``impl='columns'``: both convs wholly by columns (``--models cnn2d,cnn2d_columns``)."""
    if relu_layers:
        model = bp.sequential(bp.conv(32, 3, padding="SAME", impl=impl), bp.relu(),
                              bp.conv(64, 3, padding="SAME", impl=impl), bp.relu(), bp.flatten(), bp.dense(10))
    else:
        model = bp.sequential(bp.conv(32, 3, padding="SAME", activation="relu", impl=impl),
                              bp.conv(64, 3, padding="SAME", activation="relu", impl=impl), bp.flatten(),
                              bp.dense(10))
    gen = np.random.default_rng(2)
    hw = 28 * 28
    layer_flops = [2.0 * batch * hw * 9 * 1 * 32, 2.0 * batch * hw * 9 * 32 * 64,
                   _mm(batch, hw * 64, 10)]

    def torch_model():
        import torch.nn as nn

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU())
                self.fc = nn.Linear(hw * 64, 10)

            def forward(self, x):                               # x (N, 28, 28, 1)
                h = self.net(x.permute(0, 3, 1, 2))
                return self.fc(h.flatten(1))

        return M()

    name = "2-D CNN 3×3 32-64, 28×28" + (", ReLU layers" if relu_layers else "") + (
        f", impl={impl}" if impl != "auto" else "")
    return Bench(name, batch, model,
                 gen.standard_normal((batch, 28, 28, 1), np.float32), _labels(gen, batch),
                 _train_flops(layer_flops), torch_model)


def gru(batch=100, t=40, d=32, h=128):
    """gru(128) over T = 40 steps of 32 features, the last hidden state to dense 10."""
    model = bp.sequential(bp.gru(h, return_sequences=False), bp.dense(10))
    gen = np.random.default_rng(3)
    # forward: x W_x (one product over all steps), T products h W_h, the dense; the backward of
    # x W_x needs no dx (the input), the recurrent products need both dW_h and dh
    f_x, f_h, f_out = _mm(batch * t, d, 3 * h), t * _mm(batch, h, 3 * h), _mm(batch, h, 10)
    flops = _train_flops([f_x, f_h, f_out])

    def torch_model():
        import torch.nn as nn

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = nn.GRU(d, h, batch_first=True)
                self.fc = nn.Linear(h, 10)

            def forward(self, x):
                _, hn = self.rnn(x)
                return self.fc(hn[0])

        return M()

    return Bench(f"GRU T={t}, 32→128", batch, model, gen.standard_normal((batch, t, d), np.float32),
                 _labels(gen, batch), flops, torch_model)


def gpt(batch=4, t=256, d=256, layers=4, heads=4, vocab=64):
    """bp.gpt: 4 pre-LN blocks, d = 256, 4 heads, T = 256, a 64-token vocabulary, tied unembedding."""
    model = bp.gpt(vocab, dim=d, num_heads=heads, num_layers=layers, max_len=t)
    gen = np.random.default_rng(4)
    nt = batch * t
    per_block = (_mm(nt, d, 3 * d) + 2 * batch * _mm(t, d, t) + _mm(nt, d, d)   # qkv, QKᵀ, PV, out
                 + _mm(nt, d, 4 * d) + _mm(nt, 4 * d, d))                        # MLP
    f = layers * per_block + _mm(nt, d, vocab)
    flops = 3 * f                     # the embedding lookup is no product: every product needs both

    def torch_model():
        import torch
        import torch.nn as nn

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.tok = nn.Embedding(vocab, d)
                self.pos = nn.Parameter(0.01 * torch.randn(t, d))
                layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                                   norm_first=True,
                                                   activation=nn.GELU(approximate="tanh"))
                self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
                self.ln_f = nn.LayerNorm(d)
                self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(t))

            def forward(self, ids):
                h = self.tok(ids) + self.pos[: ids.shape[1]]
                h = self.blocks(h, mask=self.mask, is_causal=True)
                return self.ln_f(h) @ self.tok.weight.T             # tied unembedding

        return M()

    x = gen.integers(0, vocab, (batch, t)).astype(np.int32)
    return Bench(f"GPT {layers}×d{d}, T={t}", batch, model, x, _labels(gen, (batch, t), vocab), flops,
                 torch_model, note="PyTorch: nn.TransformerEncoderLayer (norm_first, tanh GELU)")


def tiny(batch=8):
    """A 16-32-10 MLP: not benchmarked by default, it is the smoke test's model."""
    model = bp.sequential(bp.dense(32), bp.relu(), bp.dense(10))
    gen = np.random.default_rng(5)

    def torch_model():
        import torch.nn as nn
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))

    return Bench("tiny MLP 16-32-10", batch, model, gen.standard_normal((batch, 16), np.float32),
                 _labels(gen, batch), _train_flops([_mm(batch, 16, 32), _mm(batch, 32, 10)]), torch_model)


MODELS = {
    "mlp128": lambda: mlp(128), "mlp1024": lambda: mlp(1024), "cnn1d": cnn1d, "cnn2d": cnn2d,
    "gru": gru, "gpt": gpt,
}
DEFAULT = tuple(MODELS)
MODELS["tiny"] = tiny
MODELS["cnn2d_relu_layers"] = lambda: cnn2d(relu_layers=True)
MODELS["cnn2d_columns"] = lambda: cnn2d(impl="columns")


# ----------------------------------------------------------------------------- the variants


def _cast(tree, dtype):
    """Every floating leaf of ``tree`` as ``dtype`` (integer leaves, token ids, unchanged)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def jax_step(b: Bench, grad_fn, dtype=jnp.float32):
    """A jitted training step ``(params, opt_state) -> (params, opt_state, loss)`` with the
    batch as constants of the closure (the inputs stay on device), and its compile time and
    temporary memory. ``dtype`` is the compute dtype: params and Adam's state stay float32
    (master weights); the forward and backward run on copies cast to ``dtype``, and the
    gradients are cast back to float32 for the update (a no-op for float32)."""
    loss = bp.softmax_cross_entropy()
    vg = grad_fn(b.model, loss)
    opt = optax.adam(LR)
    params, state, _ = b.model.init(jax.random.PRNGKey(0), b.x.shape[1:])
    opt_state = opt.init(params)
    x, y = jnp.asarray(b.x), jnp.asarray(b.y)

    def step(params, opt_state, x, y):
        (value, _), grads = vg(_cast(params, dtype), state, _cast(x, dtype), y)
        grads = _cast(grads, jnp.float32)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, x, y).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    carry = [params, opt_state]

    def run(n):
        value = None
        for _ in range(n):
            carry[0], carry[1], value = compiled(carry[0], carry[1], x, y)
        jax.block_until_ready(value)

    run.carry = carry                                 # [params, opt_state] as they stand
    return run, compile_s, temp


def torch_device():
    """Where the PyTorch column runs: on the GPU when JAX runs on one and torch sees CUDA (JAX on a
    GPU against PyTorch on the CPU would compare devices, not steps), else on the CPU."""
    import torch
    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_step(b: Bench):
    import torch
    torch.manual_seed(0)
    device = torch_device()
    model = b.torch_model().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    x = torch.from_numpy(b.x).long() if b.x.dtype.kind == "i" else torch.from_numpy(b.x)
    x, y = x.to(device), torch.from_numpy(b.y).long().to(device)
    lossf = torch.nn.CrossEntropyLoss()

    def run(n):
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = lossf(out.reshape(-1, out.shape[-1]), y.reshape(-1))
            loss.backward()
            opt.step()
        loss.item()                                   # waits for the device

    return run


def matmul_peak(n=2048, reps=5, dtype=jnp.float32):
    """GFLOP/s of a jitted ``jnp.dot`` of two n × n matrices of ``dtype``: the best of ``reps``."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    f = jax.jit(jnp.dot)
    f(a, a).block_until_ready()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return _mm(n, n, n) / best / 1e9


# ----------------------------------------------------------------------------- measuring


def _chunk_steps(run, target_s):
    """Steps per chunk so that one chunk lasts about ``target_s`` (from one timed step)."""
    t0 = time.perf_counter()
    run(1)
    return max(1, int(target_s / max(time.perf_counter() - t0, 1e-6)))


PEAK_DTYPES = ("float32", "bfloat16")


def default_peak_n(backend=None):
    """The side of the peak's square matrices: 2048 on CPU, 8192 on an accelerator (a 2048³
    product is too short on a GPU to reach its peak)."""
    return 2048 if (backend or jax.default_backend()) == "cpu" else 8192


def measure(benches, *, use_torch, rounds, chunk_s, pause, warmup, peak_n=2048, dtype=jnp.float32,
            log=print):
    """Compile, warm up, then time all variants of all models interleaved, and the matmul peaks
    (float32 and bfloat16) once per round among them (after the same pause); returns the rows
    and the peaks, ``{dtype name: [GFLOP/s per round]}``."""
    rows, timers = [], []
    for b in benches:
        for variant, grad_fn in (("bpjax hand-written", bp.value_and_grad),
                                 ("jax.value_and_grad", bp.reference_value_and_grad)):
            run, compile_s, temp = jax_step(b, grad_fn, dtype)
            timers.append((b, variant, run, compile_s, temp))
            log(f"  compiled {b.name} / {variant}: {compile_s:.2f} s")
        if use_torch and b.torch_model is not None:
            timers.append((b, "PyTorch eager", torch_step(b), None, None))
    plan = []
    for b, variant, run, compile_s, temp in timers:
        for _ in range(warmup):
            run(1)
        plan.append((b, variant, run, compile_s, temp, _chunk_steps(run, chunk_s)))
    samples = {i: [] for i in range(len(plan))}
    faults = {i: [] for i in range(len(plan))}
    peaks = {name: [] for name in PEAK_DTYPES}
    for r in range(rounds):
        for name in PEAK_DTYPES:
            time.sleep(pause)
            peaks[name].append(matmul_peak(peak_n, dtype=jnp.dtype(name)))
        order = list(enumerate(plan))        # every other round in reverse: no variant always
                                             # follows the same neighbour
        for i, (b, variant, run, *_, n) in (order if r % 2 == 0 else order[::-1]):
            time.sleep(pause)
            f0, t0 = _minor_faults(), time.perf_counter()
            run(n)
            samples[i].append((time.perf_counter() - t0) / n)
            faults[i].append(None if f0 is None else (_minor_faults() - f0) / n)
        log(f"  round {r + 1}/{rounds} done")
    for i, (b, variant, run, compile_s, temp, n) in enumerate(plan):
        f = None if None in faults[i] else statistics.median(faults[i])
        rows.append(dict(bench=b, variant=variant, ms=1e3 * statistics.median(samples[i]),
                         compile_s=compile_s, temp=temp, faults=f, steps=n, chunks=len(samples[i])))
    return rows, peaks


def _minor_faults():
    """The process's minor page faults so far (None where ``resource`` is missing: Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def table(rows, peak):
    """The results as a Markdown table (one line per model and variant)."""
    ref = {(r["bench"].name, r["bench"].batch): r["ms"] for r in rows
           if r["variant"] == "jax.value_and_grad"}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        b = r["bench"]
        gflops = b.flops / (r["ms"] / 1e3) / 1e9
        cells = [b.name, str(b.batch), r["variant"], f"{r['ms']:.2f}",
                 f"{r['ms'] / ref[(b.name, b.batch)]:.2f}", f"{gflops:.1f}", f"{gflops / peak:.2f}",
                 "—" if r["compile_s"] is None else f"{r['compile_s']:.2f}",
                 "—" if r["temp"] is None else f"{r['temp'] / 2**20:.1f}",
                 "—" if r.get("faults") is None else f"{r['faults']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the report


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total():
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        return f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def _load():
    try:
        return "{:.2f}, {:.2f}, {:.2f} (1, 5, 15 min)".format(*os.getloadavg())
    except OSError:
        return "unknown"


def _versions(torch_version):
    import jaxlib
    return {"python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "optax": optax.__version__,
            "torch": torch_version or "not installed", "numpy": np.__version__}


def peak_summary(peaks, dtype, peak_n):
    """The lines that state both matmul peaks of the run: the compute dtype's, which ``of peak``
    is against, and the other one, with the factor that converts ``of peak`` to it."""
    med = {name: statistics.median(q) for name, q in peaks.items()}
    other = next(name for name in peaks if name != dtype)
    lines = [f"{name} matmul peak ({peak_n} × {peak_n} jnp.dot) per round: "
             f"{', '.join(f'{q:.1f}' for q in peaks[name])} GFLOP/s; median {med[name]:.1f}"
             for name in (dtype, other)]
    lines.append(f"of peak: against the {dtype} peak ({med[dtype]:.1f} GFLOP/s); against the {other} "
                 f"peak ({med[other]:.1f} GFLOP/s) multiply it by {med[dtype] / med[other]:.3g}")
    return lines


def report(table_md, *, command, peak, peaks, torch_version, torch_note, load_before, load_after,
           benches, notes="", dtype="float32", peak_n=2048):
    v = _versions(torch_version)
    other = next(name for name in peaks if name != dtype)
    other_peak = statistics.median(peaks[other])
    precision = ("float32 throughout" if dtype == "float32" else
                 f"{dtype} compute with float32 master weights (params and Adam's state in float32, "
                 f"cast to {dtype} for the forward and backward, gradients cast back)")
    flop_lines = "\n".join(f"- {b.name}, batch {b.batch}: {b.flops / 1e9:.3f} GFLOP per step"
                           + (f" ({b.note})" if b.note else "") for b in benches)
    return f"""# Benchmarks

One jitted training step (forward, softmax cross-entropy, backward, Adam update) per variant:
bpjax's hand-written backward (`bpjax.value_and_grad`), `jax.value_and_grad` of the same loss
(`bpjax.reference_value_and_grad`), and PyTorch eager. Precision: {precision}; JAX
backend: {jax.default_backend()} ({jax.devices()[0].device_kind}). `× jax.grad` is the step time
over `jax.value_and_grad`'s; `of peak` is GFLOP/s over the {dtype} matmul peak measured in the
same run (jitted `jnp.dot`, {peak_n} × {peak_n}, once per round among the chunks, after the same pause):
median **{peak:.1f} GFLOP/s** (rounds: {", ".join(f"{q:.1f}" for q in peaks[dtype])}). The {other} peak,
measured the same way in the same rounds: median **{other_peak:.1f} GFLOP/s** (rounds:
{", ".join(f"{q:.1f}" for q in peaks[other])}); a row's fraction of it is `of peak` × {peak / other_peak:.3g}.
Both peaks, like the steps, use JAX's default matmul precision (on a recent NVIDIA GPU, TF32
for float32). `temp MiB` is XLA's temporary
memory (`compiled.memory_analysis().temp_size_in_bytes`). `faults/step` is the process's
minor page faults per step (`getrusage`): XLA's CPU runtime takes fresh pages for a step's
temporaries at every execution, and each first touch of a 4 KiB page costs the kernel's
fault handling and zeroing. Medians over interleaved chunks of many steps, with a pause
before each chunk.

Written by `scripts/benchmarks/bench.py` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}.

```
{command}
```

{table_md}

{torch_note}

## Machine

- CPU: {_cpu_model()}, {os.cpu_count()} logical cores (`nproc`)
- memory: {_mem_total()}
- load average before the timed run: {load_before}; after: {load_after}
- versions: {", ".join(f"{k} {val}" for k, val in v.items())}

## FLOPs per step, counted by hand

Matrix products and convolutions only: an (M, K)·(K, N) product is 2·M·K·N; a convolution is
2·N·∏O·∏K·C_in·C_out (padded taps included); a training step is 3× the forward's products
less the dx of the first layer when its input is data (the GPT's first layer is a lookup).
The attention's QKᵀ and PV are counted over the full T × T (the causal mask does not skip work).

{flop_lines}
{notes}"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT),
                   help=f"comma-separated subset of {','.join(MODELS)} (default: {','.join(DEFAULT)})")
    p.add_argument("--quick", action="store_true", help="a smoke run: one short chunk, no pauses")
    p.add_argument("--no-torch", action="store_true", help="leave out the PyTorch column")
    p.add_argument("--rounds", type=int, default=5, help="chunks per variant (default 5)")
    p.add_argument("--chunk-seconds", type=float, default=0.6, help="length of one chunk")
    p.add_argument("--pause", type=float, default=0.5, help="seconds of pause before each chunk")
    p.add_argument("--out", default=None,
                   help="write the full report (table, peaks, machine, FLOPs) to this file, e.g. "
                        "BENCHMARKS.md; by default nothing is written, the table is only printed")
    p.add_argument("--peak-n", type=int, default=None,
                   help="side of the peaks' square matrices (default: 2048 on CPU, 8192 on a GPU "
                        "or TPU, 512 with --quick)")
    p.add_argument("--notes", default=None, help="a Markdown file appended to the report")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype; bfloat16 keeps float32 master weights (the PyTorch column "
                        "is float32 only, so it is left out)")
    args = p.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if args.quick:
        args.rounds, args.chunk_seconds, args.pause = 1, 0.0, 0.0

    torch_version, torch_note = None, ""
    if args.dtype != "float32":
        torch_note = f"PyTorch column skipped: it runs in float32 only, this run computes in {args.dtype}."
    elif not args.no_torch:
        try:
            import torch
            torch.set_num_threads(os.cpu_count() or 1)
            torch_version = torch.__version__
            torch_note = f"PyTorch eager {torch_version} ran on the {torch_device()} (float32)."
        except ImportError:
            torch_note = ("PyTorch column skipped: torch is not installed "
                          "(`pip install torch==2.13.0` for a CPU build).")
    else:
        torch_note = "PyTorch column skipped (--no-torch)."

    print(f"models: {names}; load average {_load()}")
    benches = [MODELS[m]() for m in names]
    load_before = _load()
    peak_n = args.peak_n or (512 if args.quick else default_peak_n())
    rows, peaks = measure(benches, use_torch=torch_version is not None, rounds=args.rounds,
                          chunk_s=args.chunk_seconds, pause=args.pause, warmup=1 if args.quick else 2,
                          peak_n=peak_n, dtype=jnp.dtype(args.dtype))
    peak = statistics.median(peaks[args.dtype])     # measured like the steps: median over rounds
    md = table(rows, peak)
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}); compute dtype {args.dtype}")
    print(md)
    print("\n".join(peak_summary(peaks, args.dtype, peak_n)))
    command = "python " + " ".join(["scripts/benchmarks/bench.py", *(argv if argv is not None else sys.argv[1:])])
    notes = ""
    if args.notes:
        with open(args.notes) as f:
            notes = "\n" + f.read()
    text = report(md, command=command, peak=peak, peaks=peaks, torch_version=torch_version, torch_note=torch_note,
                  load_before=load_before, load_after=_load(), benches=benches, notes=notes,
                  dtype=args.dtype, peak_n=peak_n)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    if torch_note:
        print(torch_note)
    return rows, md


if __name__ == "__main__":
    main()
