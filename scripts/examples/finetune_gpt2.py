"""Fine-tune a Hugging Face GPT-2 on a text file with the hand-written backward pass.

    python scripts/examples/finetune_gpt2.py --from gpt2/ --text corpus.txt --out runs/ft
    python scripts/examples/finetune_gpt2.py --from gpt2/ --text corpus.txt --out runs/ft --resume
    python scripts/examples/finetune_gpt2.py --from gpt2/ --text corpus.txt --out runs/ft --steps 200 \\
        --batch-tokens 8192 --micro-batch 8 --context 256 --dtype bfloat16 --eval-every 20

The folder (``--from``) is what ``transformers`` saves: ``config.json``, ``model.safetensors``
and the tokenizer (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``, read by the
``tokenizers`` package). The text is tokenized once; its last ``--val-fraction`` is held out.

One optimizer step, as the algorithm goes:
  1. ``accum = batch_tokens / (micro_batch · context)`` micro-batches of windows are drawn on the
     device from a PRNG key carried in the step (the host only dispatches steps);
  2. each goes forward through the GPT and the mean next-token cross-entropy compares it with
     the text shifted by one;
  3. the error at the logits goes back through the blocks by their hand-written backward
     (``bp.value_and_grad``), in ``--dtype`` (bfloat16: float32 master weights);
  4. the micro-batches' gradients are averaged (a ``lax.scan``: one compiled step whatever the
     accumulation), clipped to global norm ``--clip``;
  5. AdamW (decoupled weight decay on the matrices only, not biases, layer norms or positions)
     steps with a linear warm-up and a cosine decay to lr/10.

The run folder (``--out``) is a ``bpjax train`` run folder: ``run.json`` names the run's defining
arguments, ``checkpoints/`` holds the whole state (params, AdamW's moments, the key, the step)
every ``--checkpoint-every`` steps, ``metrics.jsonl`` and ``curves.png`` the losses. A folder
holding a run is continued only with ``--resume`` and the same arguments (the run then goes on
bit for bit as if never stopped) or cleared with ``--overwrite``; runs never mix. At the end the
params are written as a Hugging Face folder (``--save``, default ``OUT/hf``) that transformers
loads. Tokens/s and MFU (``train_gpt.flops_per_step`` against a matmul peak measured in the same
process) are printed every ``--print-every`` steps, the validation loss every ``--eval-every``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import bpjax as bp
from bpjax.models import gpt2_from_pretrained, gpt2_tokenizer, save_gpt2_pretrained
from bpjax.train import runs
from bpjax.train.checkpoint import TrainingError, _Checkpointer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_gpt import draw_windows, flops_per_step, param_count

DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
#: The arguments a resumed run must share with the run in its folder.
DEFINING = ("from_folder", "text", "steps", "batch_tokens", "micro_batch", "context", "lr", "warmup",
            "weight_decay", "clip", "dtype", "val_fraction", "seed")
NAME = "finetune_gpt2"


class Stop(ValueError):
    """A bad option or run folder: one line, printed without a traceback."""


def tokenize(folder, text_path) -> np.ndarray:
    """The text file's token ids (S,) int32, by the folder's tokenizer."""
    path = pathlib.Path(text_path)
    if not path.is_file():
        raise Stop(f"{NAME}: expected --text to be a text file, got {path}, which "
                   f"{'is a folder' if path.is_dir() else 'does not exist'}")
    try:
        tok = gpt2_tokenizer(folder)
    except (ImportError, FileNotFoundError) as e:
        raise Stop(f"{NAME}: --from: {e}") from None
    return np.asarray(tok.encode(path.read_text(encoding="utf-8", errors="replace")).ids, np.int32)


def accumulation(batch_tokens: int, micro_batch: int, context: int) -> int:
    """How many micro-batches make one step's ``batch_tokens``."""
    per_micro = micro_batch * context
    if batch_tokens < per_micro or batch_tokens % per_micro:
        raise Stop(f"{NAME}: expected --batch-tokens a multiple of --micro-batch × --context = {per_micro}, "
                   f"got {batch_tokens}")
    return batch_tokens // per_micro


def optimizer(*, steps, lr, warmup, weight_decay, clip):
    """AdamW with warm-up and cosine decay to lr/10; weight decay on matrices only (ndim ≥ 2, the
    position table excepted), as GPT-2 fine-tunes usually do."""
    warmup = min(warmup, steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), steps, end_value=lr / 10)
    mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and "'pos'" not in jax.tree_util.keystr(path), params)
    adamw = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=mask)
    return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip else adamw


def make_step(model, opt, *, accum, micro_batch, context, compute_dtype):
    """The jitted step ``(params, opt_state, key, data) -> (params, opt_state, key, loss)``:
    ``accum`` micro-batches drawn from ``key``, their gradients averaged, one AdamW update."""
    grad_fn = bp.value_and_grad(model, bp.softmax_cross_entropy(), compute_dtype=compute_dtype)

    def step(params, opt_state, key, data):
        key, *subs = jax.random.split(key, accum + 1)

        def micro(total, sub):
            x, y = draw_windows(data, sub, micro_batch, context)       # (b, T), (b, T) on the device
            (value, _), grads = grad_fn(params, (), x, y)               # the hand-written backward
            grads = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), grads)
            return jax.tree_util.tree_map(jnp.add, total, (value.astype(jnp.float32), grads)), None

        zero = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, params))
        (value, grads), _ = lax.scan(micro, zero, jnp.stack(subs))
        value, grads = value / accum, jax.tree_util.tree_map(lambda g: g / accum, grads)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, value

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval(model, val, *, micro_batch, context, batches, seed, compute_dtype):
    """A function of params giving the mean loss over ``batches`` fixed windows of ``val``."""
    loss = bp.softmax_cross_entropy()
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), batches)
    val = jnp.asarray(val)

    @jax.jit
    def evaluate(params):
        p = bp.cast_floating(params, compute_dtype)

        def one(total, k):
            x, y = draw_windows(val, k, micro_batch, context)
            return total + loss.forward(model.forward(p, (), x, train=False)[0], y)[0], None

        return lax.scan(one, jnp.zeros((), jnp.float32), keys)[0] / batches

    return evaluate


def prepare(out: pathlib.Path, args: dict, *, resume: bool, overwrite: bool) -> bool:
    """Make the run folder ready; True when a run there is continued. Refuses (one line) to mix
    runs: a folder holding one goes on only with --resume and its arguments, or is cleared with
    --overwrite."""
    if resume and overwrite:
        raise Stop(f"{NAME}: expected --resume or --overwrite, got both")
    if out.exists() and not out.is_dir():
        raise Stop(f"{NAME}: expected --out to be a folder, got {out}, which is a file")
    if overwrite:
        try:
            runs.remove_run(out)
        except runs.RunError as e:
            raise Stop(f"{NAME}: {e}") from None
    held = runs.holds_run(out)
    if held and not resume:
        raise Stop(f"{NAME}: {out} already holds a run; pass --resume to continue it or --overwrite to "
                   "replace it (or choose another --out)")
    if held:
        try:
            stored = json.loads((out / runs.RUN_FILE).read_text()).get("arguments", {})
        except (OSError, json.JSONDecodeError) as e:
            raise Stop(f"{NAME}: --resume expected {out / runs.RUN_FILE} describing the run, got {e}") from None
        differ = [f"--{k.replace('_', '-')} {args[k]!r} (the run has {stored.get(k)!r})"
                  for k in DEFINING if stored.get(k) != args[k]]
        if differ:
            raise Stop(f"{NAME}: --resume expected the arguments of the run in {out}, got " + "; ".join(differ))
    out.mkdir(parents=True, exist_ok=True)
    return held


def read_metrics(path: pathlib.Path, *, upto: int) -> list:
    """The records of ``metrics.jsonl`` up to step ``upto`` (those of a checkpointed step)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] <= upto]


def write_metrics(path: pathlib.Path, records: list, mode: str = "w") -> None:
    with open(path, mode) as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def plot(path, history):
    """The training and validation losses against the step, into ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history["step"], history["train_loss"], label="train (the step's batch)")
    if history["val_step"]:
        ax.plot(history["val_step"], history["val_loss"], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finetune(*, from_folder, text, out, steps=200, batch_tokens=8192, micro_batch=8, context=256, lr=1e-4,
             warmup=20, weight_decay=0.1, clip=1.0, dtype="float32", val_fraction=0.1, eval_every=20,
             eval_batches=4, print_every=10, checkpoint_every=50, save=None, curve=None, seed=0,
             resume=False, overwrite=False, peak_n=None) -> dict:
    """Fine-tune and report; returns the losses, the throughput and where the model was saved."""
    args = {k: v for k, v in locals().items() if k in DEFINING}
    args["from_folder"], args["text"] = str(pathlib.Path(from_folder).absolute()), str(pathlib.Path(text).absolute())
    if dtype not in DTYPES:
        raise Stop(f"{NAME}: expected --dtype in {sorted(DTYPES)}, got {dtype!r}")
    for name, v in (("steps", steps), ("micro_batch", micro_batch), ("context", context)):
        if v < 1:
            raise Stop(f"{NAME}: expected --{name.replace('_', '-')} ≥ 1, got {v}")
    if not 0 < val_fraction < 1:
        raise Stop(f"{NAME}: expected 0 < --val-fraction < 1, got {val_fraction}")
    accum = accumulation(batch_tokens, micro_batch, context)
    out = pathlib.Path(out)
    save = pathlib.Path(save) if save else out / "hf"
    try:
        model, params, config = gpt2_from_pretrained(from_folder)
    except (OSError, ValueError, ImportError) as e:
        raise Stop(f"{NAME}: --from: {e}") from None
    if context > params["pos"].shape[0]:
        raise Stop(f"{NAME}: expected --context ≤ the model's {params['pos'].shape[0]} positions, got {context}")
    ids = tokenize(from_folder, text)
    split = int((1 - val_fraction) * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    for part, a in (("training", train_ids), ("validation", val_ids)):
        if len(a) < context + 2:
            raise Stop(f"{NAME}: expected the {part} part of --text to hold more than --context + 1 = {context + 1} "
                       f"tokens, got {len(a)} (a longer text, a shorter --context, or another --val-fraction)")
    continued = prepare(out, args, resume=resume, overwrite=overwrite)
    if not continued:
        runs.write_info(out, {"kind": NAME, "arguments": args, "model": "gpt2", "model_args": config,
                              "dataset": args["text"], "in_shape": [context], "x_dtype": "int32",
                              "loss": "softmax_cross_entropy"})
    compute_dtype = DTYPES[dtype]
    n_params = param_count(params)
    print(f"{NAME}: {config.get('n_layer')} blocks, width {config.get('n_embd')}, {n_params:,} parameters from "
          f"{from_folder}; {len(ids):,} tokens ({len(train_ids):,} train, {len(val_ids):,} validation); "
          f"{accum} × {micro_batch} windows of {context} = {batch_tokens:,} tokens per step; compute {dtype}, "
          "float32 master weights and AdamW state", flush=True)

    opt = optimizer(steps=steps, lr=lr, warmup=warmup, weight_decay=weight_decay, clip=clip)
    step = make_step(model, opt, accum=accum, micro_batch=micro_batch, context=context, compute_dtype=compute_dtype)
    evaluate = make_eval(model, val_ids, micro_batch=micro_batch, context=context, batches=eval_batches,
                         seed=seed, compute_dtype=compute_dtype)
    state = {"params": params, "opt_state": opt.init(params), "key": jax.random.PRNGKey(seed),
             "step": np.int64(0)}
    checkpoints = _Checkpointer(out / "checkpoints")
    metrics = out / "metrics.jsonl"
    done = checkpoints.latest() if continued else None
    if done is not None:
        state = checkpoints.restore(done, state)
        print(f"{NAME}: resuming {out} at step {done} of {steps}", flush=True)
    records = read_metrics(metrics, upto=done or 0)     # what ran after the checkpoint runs again, the same
    write_metrics(metrics, records)

    from bench import matmul_peak  # scripts/benchmarks/ (train_gpt put it on the path)
    if peak_n is None:
        peak_n = 1024 if jax.default_backend() == "cpu" else 8192
    peak = matmul_peak(n=peak_n, dtype=compute_dtype or jnp.float32) * 1e9
    step_flops = flops_per_step(param_count(params, flops=True), layers=config["n_layer"], context=context,
                                dim=config["n_embd"], batch=accum * micro_batch)

    data = jax.device_put(train_ids)
    p, o, key = state["params"], state["opt_state"], state["key"]
    windows, pending, clock, clock_step, t0 = [], [], None, 0, time.perf_counter()
    for i in range(int(state["step"]) + 1, steps + 1):
        p, o, key, value = step(p, o, key, data)
        pending.append({"step": i, "train_loss": value})
        if clock is None:                           # the first step compiled: time from here
            jax.block_until_ready(value)
            clock, clock_step = time.perf_counter(), i
        if i % print_every == 0 or i == steps:
            jax.block_until_ready(value)
            now = time.perf_counter()
            rate = ""
            if i > clock_step:
                tps = (i - clock_step) * batch_tokens / (now - clock)
                mfu = step_flops * (i - clock_step) / (now - clock) / peak
                windows.append((tps, mfu))
                rate = f"  {tps:,.0f} tokens/s  MFU {100 * mfu:.1f}%"
            print(f"step {i:5d}  train loss {float(value):.4f}{rate}  ({now - t0:.0f} s)", flush=True)
            clock, clock_step = time.perf_counter(), i
        if eval_every and (i % eval_every == 0 or i == steps):
            paused = time.perf_counter()
            pending[-1]["val_loss"] = float(evaluate(p))
            print(f"step {i:5d}  validation loss {pending[-1]['val_loss']:.4f}", flush=True)
            clock += time.perf_counter() - paused              # validation is not timed
        if i % checkpoint_every == 0 or i == steps:
            paused = time.perf_counter()
            checkpoints.save(i, {"params": p, "opt_state": o, "key": key, "step": np.int64(i)})
            pending = [{k: float(v) if k != "step" else v for k, v in r.items()} for r in jax.device_get(pending)]
            records += pending
            write_metrics(metrics, pending, mode="a")
            pending = []
            clock += time.perf_counter() - paused              # nor is the checkpoint
    history = {"step": [r["step"] for r in records], "train_loss": [r["train_loss"] for r in records],
               "val_step": [r["step"] for r in records if "val_loss" in r],
               "val_loss": [r["val_loss"] for r in records if "val_loss" in r]}
    plot(out / "curves.png", history)
    if curve:
        pathlib.Path(curve).write_text(json.dumps(history, indent=1) + "\n")
    try:
        save_gpt2_pretrained(save, p, config=config, overwrite=True)
    except (OSError, ValueError) as e:
        raise Stop(f"{NAME}: --save: {e}") from None
    tps = statistics.median(w[0] for w in windows) if windows else float("nan")
    mfu = statistics.median(w[1] for w in windows) if windows else float("nan")
    stats = jax.devices()[0].memory_stats() or {}
    peak_mem = stats.get("peak_bytes_in_use")
    final_train = history["train_loss"][-1] if history["train_loss"] else float("nan")
    final_val = history["val_loss"][-1] if history["val_loss"] else float("nan")
    print(f"final train loss {final_train:.4f}, validation loss {final_val:.4f}; throughput {tps:,.0f} tokens/s, "
          f"MFU {100 * mfu:.1f}% of a measured {peak / 1e12:.4g} TFLOP/s ({dtype} {peak_n}² matmul, "
          f"{jax.devices()[0].device_kind}); peak device memory "
          f"{'n/a' if peak_mem is None else f'{peak_mem / 2**30:.2f} GiB'}; saved to {save}")
    return {"train_loss": final_train, "val_loss": final_val, "tokens_per_s": tps, "mfu": mfu, "params": p,
            "history": history, "saved": save, "peak_memory_bytes": peak_mem}


def parse(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--from", dest="from_folder", required=True, metavar="FOLDER",
                   help="a Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer)")
    p.add_argument("--text", required=True, metavar="FILE", help="the text to fine-tune on (UTF-8)")
    p.add_argument("--out", default="runs/finetune-gpt2", metavar="RUN_DIR", help="the run folder")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per optimizer step")
    p.add_argument("--micro-batch", type=int, default=8, help="windows per forward/backward")
    p.add_argument("--context", type=int, default=256, help="window length T, in tokens")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps (at most a tenth of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: none)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype")
    p.add_argument("--val-fraction", type=float, default=0.1, help="the text's tail held out")
    p.add_argument("--eval-every", type=int, default=20, help="0: no validation")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--print-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--save", metavar="HF_OUT", help="where to write the Hugging Face folder (default OUT/hf)")
    p.add_argument("--curve", metavar="FILE", help="also write the losses as JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-n", type=int, help="matrix side of the matmul-peak measurement")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    return vars(p.parse_args(argv))


def main(argv=None) -> int:
    try:
        finetune(**parse(argv))
    except (Stop, TrainingError) as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
