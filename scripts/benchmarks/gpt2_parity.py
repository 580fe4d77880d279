"""bp.gpt against Hugging Face's GPT2LMHeadModel on the same random weights, the llm.c way.

transformers builds a GPT-2 with random weights (non-trivial layer-norm scales and biases, every
bias nonzero), dropout 0 and eval mode, and saves it with ``save_pretrained``; bpjax loads that
folder with :func:`bpjax.models.gpt2_from_pretrained`. On one batch of random ids both compute:

* the logits (N, T, V);
* the mean next-token loss: torch's cross-entropy of the logits shifted by one, what HF's
  ``labels=ids`` computes (it casts the logits to float32 first, so in float64 we take the
  cross-entropy ourselves; in float32 HF's own ``labels=`` loss is used), against
  ``bp.softmax_cross_entropy()`` of ``model(ids[:, :-1])`` and ``ids[:, 1:]``: both the mean
  over the N·(T−1) predictions;
* the gradient of every tensor, by HF's name (ours from the hand-written backward,
  ``bp.value_and_grad``; the tied ``wte`` gets the sum of its two uses on both sides);
* the losses of ``--steps`` AdamW steps on that batch: ``torch.optim.AdamW`` against
  ``optax.adamw`` with the same lr, betas, eps and weight decay (both decay p by lr·wd·p from the
  pre-step p and add eps to √v̂, so the two updates are the same formula).

Each quantity's difference is ``max|ours − HF| / max|HF|`` (over the tensor, so entries near zero
do not blow it up); the pass mark is ``--tol``: 1e-4 in float32 (the default), 1e-10 in
float64. JAX's float32 matmuls run at "highest" precision (no TF32 on GPUs).

    python scripts/benchmarks/gpt2_parity.py            # 124M sizes (12 × 768, 12 heads, V 50257), 2 × 64 tokens
    python scripts/benchmarks/gpt2_parity.py --tiny     # a 2-layer toy, seconds
    python scripts/benchmarks/gpt2_parity.py --tiny --dtype float64

Exit status: 0 all within tolerance, 1 some not, 3 torch or transformers not installed (it
says so and compares nothing).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

MISSING = 3                                                       # the exit status without torch/transformers
SIZES = {"full": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024},
         "tiny": {"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 101, "n_positions": 24}}
ADAMW = {"lr": 1e-3, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def hf_model(sizes, dtype: str, seed: int):
    """A transformers GPT2LMHeadModel with random weights, no dropout, in eval mode."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(**sizes, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                        layer_norm_epsilon=1e-5, bos_token_id=sizes["vocab_size"] - 1, eos_token_id=sizes["vocab_size"] - 1)
    config._attn_implementation = "eager"
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.1 * torch.randn_like(p))            # non-trivial layer-norm scales
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn_like(p))               # and nonzero biases everywhere
            else:
                p.copy_(0.02 * torch.randn_like(p))
    return model.to(getattr(torch, dtype)).eval()


def rel(ours, theirs) -> float:
    """max|ours − theirs| / max|theirs|, in float64."""
    a, b = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def compare(hf, folder, ids: np.ndarray, *, dtype: str, steps: int = 5) -> dict:
    """Every quantity's max relative difference, by name: "logits", "loss", "grad <HF name>" …,
    "adamw loss <k>". ``hf`` is saved into ``folder`` and bp.gpt loaded from it."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch

    import bpjax as bp
    from bpjax.models import gpt2_from_pretrained
    from bpjax.models.gpt2 import gpt2_state_dict

    hf.save_pretrained(folder)
    model, params, _ = gpt2_from_pretrained(folder, dtype=jnp.dtype(dtype))
    out = {}
    tids = torch.from_numpy(ids.astype(np.int64))
    x, labels = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])

    logits, _, _ = jax.jit(model.forward)(params, (), jnp.asarray(ids))
    def hf_loss():
        if dtype == "float32":
            return hf(tids, labels=tids)
        res = hf(tids)                                            # the shift labels= does, in float64
        v = res.logits.shape[-1]
        res.loss = torch.nn.functional.cross_entropy(res.logits[:, :-1].reshape(-1, v), tids[:, 1:].reshape(-1))
        return res

    hf.zero_grad()
    res = hf_loss()
    res.loss.backward()
    out["logits"] = rel(logits, res.logits.detach().numpy())

    grad_fn = jax.jit(bp.value_and_grad(model, bp.softmax_cross_entropy()))
    (loss, _), grads = grad_fn(params, (), x, labels)
    out["loss"] = rel(loss, res.loss.item())
    ours = gpt2_state_dict(grads)
    theirs = {n: p.grad.numpy() for n, p in hf.named_parameters()}
    if set(ours) != set(theirs):
        raise AssertionError(f"compare: expected the same tensor names, got ours only {sorted(set(ours) - set(theirs))}, "
                             f"HF's only {sorted(set(theirs) - set(ours))}")
    for n, g in theirs.items():
        out[f"grad {n}"] = rel(ours[n], g)

    h = ADAMW
    opt = optax.adamw(h["lr"], b1=h["b1"], b2=h["b2"], eps=h["eps"], weight_decay=h["weight_decay"])
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state):
        (loss, _), g = grad_fn(params, (), x, labels)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    topt = torch.optim.AdamW(hf.parameters(), lr=h["lr"], betas=(h["b1"], h["b2"]), eps=h["eps"],
                             weight_decay=h["weight_decay"])
    for k in range(steps):
        params, opt_state, loss = step(params, opt_state)
        topt.zero_grad()
        tloss = hf_loss().loss
        tloss.backward()
        topt.step()
        out[f"adamw loss {k}"] = rel(loss, tloss.item())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy model instead of the 124M sizes")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 64; 16 with --tiny)")
    ap.add_argument("--steps", type=int, default=5, help="AdamW steps")
    ap.add_argument("--tol", type=float, default=None, help="max relative difference (default 1e-4 float32, 1e-10 float64)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"gpt2_parity: SKIPPED, needs torch and transformers (pip install torch transformers): {e}")
        return MISSING

    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")   # no TF32 on GPUs
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tol = args.tol if args.tol is not None else (1e-10 if args.dtype == "float64" else 1e-4)
    sizes = SIZES["tiny" if args.tiny else "full"]
    seq = args.seq or (16 if args.tiny else 64)
    ids = np.random.default_rng(args.seed).integers(0, sizes["vocab_size"], (args.batch, seq))
    t0 = time.perf_counter()
    hf = hf_model(sizes, args.dtype, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        diffs = compare(hf, folder, ids, dtype=args.dtype, steps=args.steps)
    grads = {k: v for k, v in diffs.items() if k.startswith("grad ")}
    print(f"gpt2_parity: bp.gpt vs transformers {transformers.__version__} GPT2LMHeadModel, "
          f"{sizes}, {args.dtype}, ids {ids.shape}, {jax.default_backend()}, tolerance {tol:g} "
          f"(max|ours − HF| / max|HF|)")
    rows = [(k, v) for k, v in diffs.items() if not k.startswith("grad ")]
    worst = max(grads, key=grads.get)
    rows.insert(2, (f"grad, worst of {len(grads)} tensors ({worst.removeprefix('grad ')})", grads[worst]))
    for k, v in rows:
        print(f"  {k:<60s} {v:.3e}  {'ok' if v <= tol else 'FAIL'}")
    bad = sorted(k for k, v in diffs.items() if not v <= tol)
    print(f"gpt2_parity: {'PASS' if not bad else 'FAIL: ' + ', '.join(bad)} ({time.perf_counter() - t0:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
