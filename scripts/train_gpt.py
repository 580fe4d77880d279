"""Train a small character-level GPT with the hand-written backward pass.

The corpus is the Python standard library's own source (the ``*.py`` files of
``sysconfig.get_paths()["stdlib"]``, in name order): text on every machine, no download.
The last 10% is held out for validation. Gradients come from ``bp.value_and_grad``: the
forward keeps each layer's residuals, the loss gives the error at the output, and the
backward walks the layers in reverse. optax's Adam takes the steps.

    python scripts/train_gpt.py                        # defaults: about two minutes on 2 CPU cores
    python scripts/train_gpt.py --steps 5000 --dim 256 --layers 6 --heads 8 --context 256 \\
        --batch 64 --corpus-chars 20000000 --lean      # a bigger run, e.g. on a GPU
"""
from __future__ import annotations

import argparse
import pathlib
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bpjax as bp

ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))      # newline and printable ASCII


def load_corpus(max_chars: int) -> str:
    """Up to ``max_chars`` characters of standard-library source, tabs as spaces, other
    characters outside printable ASCII dropped."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    keep = set(ALPHABET)
    parts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
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


def batches(data: np.ndarray, batch: int, context: int, gen: np.random.Generator):
    """Random windows: inputs data[o : o+T] and labels data[o+1 : o+T+1], both (batch, T)."""
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


def train(*, steps=600, batch=32, context=64, dim=64, heads=4, layers=2, lr=3e-3,
          corpus_chars=1_000_000, eval_every=200, eval_batches=16,
          print_every=50, sample_chars=300, lean=False, seed=0, prompt="def ") -> dict:
    """Train and report; returns the final training and validation losses and the sample."""
    t_start = time.perf_counter()
    text = load_corpus(corpus_chars)
    vocab = {c: i for i, c in enumerate(ALPHABET)}
    data = np.array([vocab[c] for c in text], np.int32)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    print(f"corpus: {len(text):,} characters of Python stdlib source "
          f"({len(train_data):,} train, {len(val_data):,} validation), vocabulary {len(ALPHABET)}")

    model = bp.gpt(len(ALPHABET), dim=dim, num_heads=heads, num_layers=layers, max_len=context,
                   lean=lean)
    loss = bp.softmax_cross_entropy()
    params, state = init_on_host(model, (context,), seed), ()
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    print(f"model: {layers} blocks, dim {dim}, {heads} heads, context {context}, "
          f"{n_params:,} parameters{', lean attention backward' if lean else ''}")

    opt = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.1))   # lr decays to lr/10
    opt_state = opt.init(params)
    grad_fn = bp.value_and_grad(model, loss)                       # the hand-written backward

    @jax.jit
    def step(params, opt_state, x, y):
        (value, _), grads = grad_fn(params, state, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    @jax.jit
    def logits_fn(params, x):                                      # for validation and sampling
        return model.forward(params, state, x, train=False)[0]

    gen = np.random.default_rng(seed)
    val_gen = batches(val_data, batch, context, np.random.default_rng(seed + 1))
    val_set = [next(val_gen) for _ in range(eval_batches)]

    def validation():
        return float(np.mean([cross_entropy(logits_fn(params, x), y) for x, y in val_set]))

    train_batches = batches(train_data, batch, context, gen)
    running, val = [], float("nan")
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        x, y = next(train_batches)
        params, opt_state, value = step(params, opt_state, x, y)
        running.append(value)
        if i % print_every == 0 or i == steps:
            mean = float(np.mean(jax.device_get(running)))
            running = []
            print(f"step {i:5d}  train loss {mean:.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        if i % eval_every == 0 or i == steps:
            val = validation()
            print(f"step {i:5d}  validation loss {val:.3f}", flush=True)
    train_time = time.perf_counter() - t0

    out = sample(logits_fn, params, [vocab[c] for c in prompt], sample_chars, context, gen)
    text_out = prompt + "".join(ALPHABET[i] for i in out)
    print(f"\nsample (temperature 0.8, prompt {prompt!r}):\n{text_out}\n")
    total = time.perf_counter() - t_start
    print(f"final train loss {mean:.3f}, validation loss {val:.3f} (nats per character); "
          f"training {train_time:.0f} s, total {total:.0f} s")
    return {"train_loss": mean, "val_loss": val, "sample": text_out, "seconds": total}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=64, help="sequence length T (and max_len)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate, cosine-decayed to lr/10")
    p.add_argument("--corpus-chars", type=int, default=1_000_000)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--print-every", type=int, default=50)
    p.add_argument("--sample-chars", type=int, default=300)
    p.add_argument("--lean", action="store_true", help="the memory-lean (blockwise) attention backward")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    return train(**{k.replace("-", "_"): v for k, v in vars(args).items()})


if __name__ == "__main__":
    main()
