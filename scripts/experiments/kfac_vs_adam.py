"""K-FAC against Adam on MNIST-1D (issue 25): epochs and wall time to a fixed test accuracy.

Each run is ``bpjax train``'s: the model's recipe (``RECIPES``; Adam, or AdamW for resnet1d),
or the same recipe with ``--optimizer kfac`` (``KFAC_RECIPE``'s step size), built by the
command's own ``apply_recipe`` and ``make_optimizer``, trained by ``fit``. After every epoch
the test accuracy is measured (its time is not counted); the run stops at the first epoch that
reaches the last target. Time is wall time from the call of ``fit`` (the split, the init and the
compile included) to the end of that epoch.

``--optimizers kfac-jax`` puts DeepMind's kfac-jax beside them, where it can train the same network:
the MLP and the CNN, written in plain JAX (the CNN's 1-D convolutions as 2-D ones of height 1, the
kind kfac-jax's pattern matcher registers) with the same initial params as bpjax's model. kfac-jax
is not an optax transformation, so it runs in this script's own loop: the same training split and
batch size, a fresh shuffle per epoch, every full batch a step, no early stopping, at its adaptive
settings (Martens & Grosse's learning rate and momentum from the quadratic model, adaptive damping
from 1.0, no weight decay). It is a bench-only peer: ``pip install kfac-jax`` (its release 0.0.8 fails
on jax 0.10; its GitHub main of 2026-08-19 runs).

    python scripts/experiments/kfac_vs_adam.py --models mlp cnn resnet1d --seeds 0 1 2
    python scripts/experiments/kfac_vs_adam.py --models mlp cnn --optimizers kfac-jax
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import bpjax as bp
from bpjax.cli.train import add_arguments, apply_recipe, make_optimizer
from bpjax.datasets import load
from bpjax.models import MODELS
from bpjax.train import fit
from bpjax.train.evaluate import evaluate, make_eval_step
from bpjax.train.loop import split_validation

#: The test accuracies timed, per model; a run stops at the epoch that reaches the last.
TARGETS = {"mlp": (0.55, 0.60), "cnn": (0.85, 0.90), "resnet1d": (0.96, 0.98)}


class _Reached(Exception):
    pass


def run(model_name: str, optimizer: str, seed: int, data) -> dict:
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--model", model_name, "--seed", str(seed)] + (["--optimizer", optimizer] if optimizer else []))
    apply_recipe(args)
    model, loss = MODELS[model_name](10), bp.softmax_cross_entropy()
    n_train = int(round(data.x_train.shape[0] * (1 - args.val_fraction)))
    total = args.epochs * max(n_train // args.batch_size, 1)
    opt = make_optimizer(args.optimizer, args.lr, args.schedule, args.weight_decay, total, model=model, loss=loss,
                         example=(data.x_train[:2], data.y_train[:2]))
    targets = TARGETS[model_name]
    out = {"model": model_name, "optimizer": args.optimizer, "seed": seed, "lr": args.lr,
           "reached": {f"{t:g}": None for t in targets}, "curve": []}
    clock = {"eval": 0.0}
    eval_step = make_eval_step(model, loss)

    def hook(epoch, params, state):
        if epoch == 0:
            return {}
        t = time.perf_counter()
        elapsed = t - start - clock["eval"]                 # training so far, the earlier evaluations left out
        acc = float(evaluate(model, loss, params, state, data.x_test, data.y_test, eval_step=eval_step)["acc"])
        clock["eval"] += time.perf_counter() - t
        out["curve"].append(round(acc, 4))
        for t in targets:
            if acc >= t and out["reached"][f"{t:g}"] is None:
                out["reached"][f"{t:g}"] = [epoch, round(elapsed, 2)]     # epochs, seconds
        if acc >= targets[-1]:
            raise _Reached
        return {"test_acc": acc}

    start = time.perf_counter()
    try:
        fit(model, loss, data, optimizer=opt, epochs=args.epochs, batch_size=args.batch_size, seed=seed,
            val_fraction=args.val_fraction, patience=args.patience or None, progress=False, log=lambda *a: None,
            epoch_hook=hook)
    except _Reached:
        pass
    return out


def _mlp_forward(p, x):
    """bpjax's ``mlp`` in plain JAX, on its params: flatten, (dense, ReLU) × 2, dense."""
    h = x.reshape(x.shape[0], -1)
    for i in (1, 3):
        h = jax.nn.relu(h @ p[i]["w"] + p[i]["b"])
    return h @ p[5]["w"] + p[5]["b"]


def _cnn_forward(p, x):
    """bpjax's ``cnn`` in plain JAX, on its params: three stride-2 convolutions (padding 1) with
    ReLU, flatten, dense. Each 1-D convolution is a 2-D one over (1, L)."""
    h = x[:, None]                                                       # (N, 1, L, C)
    for i in (0, 2, 4):
        h = jax.lax.conv_general_dilated(h, p[i]["w"][None], (1, 2), ((0, 0), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(h + p[i]["b"])
    return h.reshape(h.shape[0], -1) @ p[7]["w"] + p[7]["b"]


PLAIN_FORWARDS = {"mlp": _mlp_forward, "cnn": _cnn_forward}


def run_kfac_jax(model_name: str, seed: int, data, epochs: int = 40, batch_size: int = 100,
                 initial_damping: float = 1.0) -> dict:
    """The same network trained by kfac-jax's optimizer at its adaptive settings (see the module's
    docstring); the record as :func:`run`'s."""
    import kfac_jax  # a bench-only peer

    if model_name not in PLAIN_FORWARDS:
        raise SystemExit(f"kfac_vs_adam: kfac-jax runs on {sorted(PLAIN_FORWARDS)}, got --models {model_name}")
    forward = PLAIN_FORWARDS[model_name]
    model = MODELS[model_name](10)
    x_tr, y_tr, _, _ = split_validation(data, 0.1, seed)
    targets = TARGETS[model_name]
    out = {"model": model_name, "optimizer": "kfac-jax", "seed": seed, "lr": "adaptive", "damping": initial_damping,
           "reached": {f"{t:g}": None for t in targets}, "curve": []}

    def loss_fn(p, batch):
        xb, yb = batch
        logits = forward(p, xb)
        kfac_jax.register_softmax_cross_entropy_loss(logits, yb)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, yb[:, None], -1)[:, 0])

    start = time.perf_counter()
    key = jax.random.key(seed)
    params, _, _ = model.init(key, data.x_train.shape[1:])
    opt = kfac_jax.Optimizer(value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0,
                             use_adaptive_learning_rate=True, use_adaptive_momentum=True,
                             use_adaptive_damping=True, initial_damping=initial_damping, num_burnin_steps=0,
                             multi_device=False)
    n_steps = x_tr.shape[0] // batch_size
    batch = (jnp.asarray(x_tr[:batch_size]), jnp.asarray(y_tr[:batch_size]))
    state = opt.init(params, jax.random.fold_in(key, 1), batch)
    accuracy = jax.jit(lambda p, x, y: jnp.mean(jnp.argmax(forward(p, x), -1) == y))
    x_te, y_te = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    eval_time, step = 0.0, 0
    rng = np.random.default_rng(seed)
    for epoch in range(1, epochs + 1):
        order = rng.permutation(x_tr.shape[0])
        for b in range(n_steps):
            idx = order[b * batch_size:(b + 1) * batch_size]
            params, state, _ = opt.step(params, state, jax.random.fold_in(key, 2 + step),
                                        batch=(jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx])), global_step_int=step)
            step += 1
        t = time.perf_counter()
        elapsed = t - start - eval_time
        acc = float(accuracy(params, x_te, y_te))
        eval_time += time.perf_counter() - t
        out["curve"].append(round(acc, 4))
        for target in targets:
            if acc >= target and out["reached"][f"{target:g}"] is None:
                out["reached"][f"{target:g}"] = [epoch, round(elapsed, 2)]
        if acc >= targets[-1]:
            break
    return out


def _warm_up(data) -> None:
    """One epoch of the logistic regression, untimed: JAX's one-time start-up (its first compile)
    is then no run's."""
    model, loss = MODELS["logreg"](10), bp.softmax_cross_entropy()
    fit(model, loss, data, epochs=1, batch_size=100, progress=False, log=lambda *a: None)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(TARGETS))
    p.add_argument("--optimizers", nargs="+", default=["default", "kfac"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--kfac-jax-damping", type=float, default=1.0, help="kfac-jax's initial damping")
    a = p.parse_args()
    data = load("mnist1d")
    _warm_up(data)
    for m in a.models:
        for o in a.optimizers:
            for s in a.seeds:
                r = (run_kfac_jax(m, s, data, initial_damping=a.kfac_jax_damping) if o == "kfac-jax" else
                     run(m, None if o == "default" else o, s, data))
                print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
