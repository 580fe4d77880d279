"""Autodiff of bpjax's forwards against autodiff of the same networks in plain ``lax``/``jnp``

``bp.reference_value_and_grad`` and ``bp.check_model`` differentiate bpjax's forwards with
``jax.value_and_grad``. Where a forward uses a formulation chosen for one backend (a 2-D
convolution routed to Eigen with an extra output row, a convolution by im2col columns), autodiff
must still cost what it costs on the plain network. For each network this script times, in one
process, one jitted loss-and-gradient evaluation:

* (a) ``jax.value_and_grad`` of the bpjax forward (``bp.reference_value_and_grad``);
* (b) ``jax.value_and_grad`` of the *twin*: the same network written with plain ``lax``/``jnp``
  ops (``lax.conv_general_dilated``, ``x @ w``, ``lax.reduce_window``, ``lax.scan``, ...), on the
  same params, inputs and labels, with the softmax cross-entropy written in ``jnp``;
* (c) bpjax's hand-written backward (``bp.value_and_grad``),

and prints a markdown table with a/b (target: ≤ 1.3) and c/b. No optimizer update: the three
return the loss and the gradients of every parameter. Each variant is compiled and warmed up,
then the three run interleaved, a chunk of steps each in turn, for ``--rounds`` rounds; the time
per step is the median over the rounds.

Usage::

    python scripts/benchmarks/autodiff_speed.py                      # every network (about 2 minutes on 2 cores)
    python scripts/benchmarks/autodiff_speed.py --models cnn2d,gpt   # a subset
    python scripts/benchmarks/autodiff_speed.py --quick              # small shapes, one round: a smoke test

The twins are also what tests/test_autodiff_speed.py holds against the bpjax forwards.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import bpjax as bp
import bpjax.models

HERE = pathlib.Path(__file__).resolve().parent


def _bench():
    """scripts/benchmarks/bench.py, for the benchmarked networks (2-D CNN, GRU, GPT, MLP) as defined there."""
    spec = importlib.util.spec_from_file_location("_bench_models", HERE / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)            # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- plain lax/jnp parts


_DN = {3: ("NWC", "WIO", "NWC"), 4: ("NHWC", "HWIO", "NHWC")}


def dense(p, x):
    return x @ p["w"] + p["b"]                                                  # (N, D_out)


def relu(x):
    return jnp.maximum(x, 0)


def conv(p, x, strides=1, padding="SAME"):
    """lax.conv_general_dilated, channels last; ``padding`` 'SAME'/'VALID' or an integer p."""
    r = x.ndim - 2
    pads = padding if isinstance(padding, str) else [(padding, padding)] * r
    y = lax.conv_general_dilated(x, p["w"], (strides,) * r, pads, dimension_numbers=_DN[x.ndim])
    return y + p["b"] if "b" in p else y                                        # (N, *O, C_out)


def batch_norm(p, x, eps=1e-5):
    """Training mode: the batch's mean and biased variance over every axis but the last."""
    axes = tuple(range(x.ndim - 1))
    mu = jnp.mean(x, axis=axes)
    var = jnp.mean((x - mu) ** 2, axis=axes)
    return (x - mu) * lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def layer_norm(p, x, eps=1e-5):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) * lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def max_pool(x, k):
    r = x.ndim - 2
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *(k,) * r, 1), (1, *(k,) * r, 1), "VALID")


def gelu_tanh(x):
    return 0.5 * x * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def cross_entropy(logits, y):
    """Mean softmax cross-entropy over every row (integer labels)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))


# ----------------------------------------------------------------------------- the twins
#
# Each takes the bpjax model's params (the same pytree) and x, and returns the logits.


def mlp_twin(params, x):
    h = relu(dense(params[0], x))
    h = relu(dense(params[2], h))
    return dense(params[4], h)


def cnn_twin(params, x):
    """bpjax.models.cnn: three convs (stride 2, padding 1) with ReLU, flatten, dense."""
    for i in (0, 2, 4):
        x = relu(conv(params[i], x, strides=2, padding=1))
    return dense(params[7], x.reshape(x.shape[0], -1))


def resnet1d_twin(params, x):
    """bpjax.models.resnet1d: stem conv-BN-ReLU, residual blocks each followed by ReLU and a
    stride-2 max pool, global average pool, dense."""
    h = relu(batch_norm(params[1], conv(params[0], x)))
    for i in range(3, len(params) - 2, 3):
        b = params[i]
        f = relu(batch_norm(b[1], conv(b[0], h)))
        f = batch_norm(b[4], conv(b[3], f))
        h = max_pool(relu(h + f), 2)
    return dense(params[-1], jnp.mean(h, axis=1))


def digits_cnn_twin(params, x):
    """bpjax.models.digits_cnn: (conv-BN-ReLU-pool) twice, flatten, dense."""
    h = max_pool(relu(batch_norm(params[1], conv(params[0], x))), 2)
    h = max_pool(relu(batch_norm(params[5], conv(params[4], h))), 2)
    return dense(params[9], h.reshape(h.shape[0], -1))


def cnn2d_twin(params, x):
    """scripts/benchmarks/bench.py's 2-D CNN: conv 3×3 with ReLU twice ('SAME'), flatten, dense."""
    h = relu(conv(params[0], x))
    h = relu(conv(params[1], h))
    return dense(params[3], h.reshape(h.shape[0], -1))


def gru_twin(params, x):
    """scripts/benchmarks/bench.py's GRU (torch.nn.GRU's equations, gates [r | z | n]), last state, dense."""
    p = params[0]
    hidden = p["w_h"].shape[0]
    gx = jnp.swapaxes(x @ p["w_x"] + p["b"], 0, 1)                           # (T, N, 3H)

    def step(h, gx_t):
        gh = h @ p["w_h"] + p["b_h"]
        r = jax.nn.sigmoid(gx_t[:, :hidden] + gh[:, :hidden])
        z = jax.nn.sigmoid(gx_t[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
        n = jnp.tanh(gx_t[:, 2 * hidden:] + r * gh[:, 2 * hidden:])
        return (1 - z) * n + z * h, None

    h, _ = lax.scan(step, jnp.zeros((x.shape[0], hidden), x.dtype), gx)
    return dense(params[1], h)


def _attention(p, x, heads):
    n, t, d = x.shape
    qkv = x @ p["w_qkv"] + p["b_qkv"]                                           # (N, T, 3D)
    q, k, v = (a.reshape(n, t, heads, d // heads).transpose(0, 2, 1, 3) for a in jnp.split(qkv, 3, -1))
    s = jnp.einsum("nhqd,nhkd->nhqk", q, k) / math.sqrt(d // heads)            # (N, h, T, T)
    causal = jnp.tril(jnp.ones((t, t), bool))
    s = jnp.where(causal, s, jnp.finfo(s.dtype).min)
    o = jnp.einsum("nhqk,nhkd->nhqd", jax.nn.softmax(s, axis=-1), v)
    return o.transpose(0, 2, 1, 3).reshape(n, t, d) @ p["w_o"] + p["b_o"]


def gpt_twin(params, ids, heads=4):
    """bp.gpt: token and position embeddings, pre-LN blocks (a lax.scan over the stacked
    params), final layer norm, tied unembedding."""
    h = params["tok"]["table"][ids] + params["pos"][:ids.shape[1]]             # (N, T, D)

    def block(h, p):
        h = h + _attention(p["attn"], layer_norm(p["ln1"], h), heads)
        b = gelu_tanh(dense(p["fc"], layer_norm(p["ln2"], h)))
        return h + dense(p["proj"], b), None

    h, _ = lax.scan(block, h, params["blocks"])
    return layer_norm(params["ln_f"], h) @ params["tok"]["table"].T            # (N, T, V)


# ----------------------------------------------------------------------------- the networks


class Net(NamedTuple):
    name: str
    model: bp.Layer
    twin: Callable                       # (params, x) -> logits
    x: np.ndarray
    y: np.ndarray


def _labels(gen, shape, k=10):
    return gen.integers(0, k, shape).astype(np.int32)


def networks(quick=False):
    """name -> () -> Net; ``quick``: small shapes (a smoke test, not a measurement)."""
    bench = _bench()
    gen = np.random.default_rng(0)

    def from_bench(b, twin):
        return Net(b.name, b.model, twin, b.x, b.y)

    def mnist1d(name, model, twin, batch):
        return Net(name, model, twin, gen.standard_normal((batch, 40, 1), np.float32), _labels(gen, batch))

    q = quick
    return {
        "mlp": lambda: from_bench(bench.mlp(8 if q else 128), mlp_twin),
        "cnn": lambda: mnist1d("MNIST-1D CNN (models.cnn)", bp.models.cnn(10), cnn_twin, 4 if q else 100),
        "resnet1d": lambda: mnist1d("resnet1d (models.resnet1d)", bp.models.resnet1d(10), resnet1d_twin,
                                    4 if q else 100),
        "digits_cnn": lambda: Net("digits_cnn (models.digits_cnn)", bp.models.digits_cnn(10), digits_cnn_twin,
                                  gen.standard_normal((4 if q else 64, 8, 8, 1), np.float32),
                                  _labels(gen, 4 if q else 64)),
        "cnn2d": lambda: from_bench(bench.cnn2d(2 if q else 128), cnn2d_twin),
        "gru": lambda: from_bench(bench.gru(4 if q else 100, t=4 if q else 40), gru_twin),
        "gpt": lambda: from_bench(bench.gpt(1 if q else 4, t=16 if q else 256, d=32 if q else 256), gpt_twin),
    }


# ----------------------------------------------------------------------------- the three variants


def init(net: Net, seed: int = 0):
    """(params, state) of the model's shapes and dtypes (``jax.eval_shape`` of its init), drawn
    with numpy: a matrix or kernel W ~ N(0, 1/fan-in), fan-in the product of all but its last
    axis; a vector 1 + N(0, 0.1²) (batch-norm scales and variances near 1, biases non-zero).
    The model's own init is the same work in jax.random, whose compiles took 4–6 s per network
    here; any non-degenerate values serve to time and to compare."""
    gen = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: net.model.init(key, net.x.shape[1:])[:2], jax.random.PRNGKey(0))

    def draw(a):
        if a.ndim >= 2:
            v = gen.standard_normal(a.shape) / math.sqrt(math.prod(a.shape[:-1]))
        else:
            v = 1 + 0.1 * gen.standard_normal(a.shape)
        return jnp.asarray(v, a.dtype)

    return jax.tree.map(draw, shapes)


def variants(net: Net):
    """The three jittable ``f(params, state, x, y) -> (loss, grads)``."""
    loss = bp.softmax_cross_entropy()
    ref = bp.reference_value_and_grad(net.model, loss)
    hand = bp.value_and_grad(net.model, loss)
    twin = jax.value_and_grad(lambda p, x, y: cross_entropy(net.twin(p, x), y))
    return {
        "a": lambda p, s, x, y: (lambda r: (r[0][0], r[1]))(ref(p, s, x, y)),
        "b": lambda p, s, x, y: twin(p, x, y),
        "c": lambda p, s, x, y: (lambda r: (r[0][0], r[1]))(hand(p, s, x, y)),
    }


def time_network(net: Net, rounds: int, chunk_s: float):
    """Compile the three variants, then time them interleaved: ({variant: ms/step}, {variant: compile s})."""
    params, state = init(net)
    args = (params, state, jnp.asarray(net.x), jnp.asarray(net.y))
    compiled, compile_s, steps = {}, {}, {}
    for k, f in variants(net).items():
        t0 = time.perf_counter()
        compiled[k] = jax.jit(f).lower(*args).compile()
        compile_s[k] = time.perf_counter() - t0
        jax.block_until_ready(compiled[k](*args))                              # warm up
        t0 = time.perf_counter()
        jax.block_until_ready(compiled[k](*args))
        steps[k] = max(1, int(chunk_s / max(time.perf_counter() - t0, 1e-6)))
    times = {k: [] for k in compiled}
    for _ in range(rounds):
        for k, c in compiled.items():
            time.sleep(0.02)
            t0 = time.perf_counter()
            for _ in range(steps[k]):
                out = c(*args)
            jax.block_until_ready(out)
            times[k].append(1e3 * (time.perf_counter() - t0) / steps[k])
    return {k: statistics.median(v) for k, v in times.items()}, compile_s


def table(rows):
    lines = ["| network | batch | (a) jax.grad of bpjax forward, ms | (b) jax.grad of plain-lax twin, ms "
             "| a/b | (c) bpjax hand-written, ms | c/b |", "|---|---|---|---|---|---|---|"]
    for name, batch, ms in rows:
        lines.append(f"| {name} | {batch} | {ms['a']:.2f} | {ms['b']:.2f} | {ms['a'] / ms['b']:.2f} "
                     f"| {ms['c']:.2f} | {ms['c'] / ms['b']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=None, help="comma-separated subset of: mlp, cnn, resnet1d, "
                   "digits_cnn, cnn2d, gru, gpt (default: all)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; 1 with --quick)")
    p.add_argument("--chunk-s", type=float, default=None,
                   help="seconds of steps per variant per round (default 0.25; 0 with --quick: one step)")
    p.add_argument("--quick", action="store_true", help="small shapes, one round: a smoke test")
    args = p.parse_args(argv)
    nets = networks(args.quick)
    names = list(nets) if args.models is None else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in nets]
    if unknown or not names:
        print(f"autodiff_speed: expected --models from {', '.join(nets)}, got {args.models!r}", file=sys.stderr)
        raise SystemExit(2)
    rounds = args.rounds or (1 if args.quick else 5)
    chunk_s = args.chunk_s if args.chunk_s is not None else (0.0 if args.quick else 0.25)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, JAX {jax.__version__} "
          f"({jax.default_backend()}), Python {platform.python_version()}, {platform.machine()}, "
          f"{rounds} round(s){' (--quick: small shapes)' if args.quick else ''}", flush=True)
    rows = []
    for name in names:
        net = nets[name]()
        ms, _ = time_network(net, rounds, chunk_s)
        rows.append((net.name, net.x.shape[0], ms))
        print(f"  {net.name}: a {ms['a']:.2f} ms, b {ms['b']:.2f} ms, c {ms['c']:.2f} ms", file=sys.stderr,
              flush=True)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
