"""K-FAC against Adam on MNIST-1D (issue 25): epochs and wall time to a fixed test accuracy.

Each run is ``bpjax train``'s: the model's recipe (``RECIPES``; Adam, or AdamW for resnet1d),
or the same recipe with ``--optimizer kfac`` (``KFAC_RECIPE``'s step size), built by the
command's own ``apply_recipe`` and ``make_optimizer``, trained by ``fit``. After every epoch
the test accuracy is measured (its time is not counted); the run stops at the first epoch that
reaches the last target. Time is wall time from the call of ``fit`` (the split, the init and the
compile included) to the end of that epoch.

    python scripts/experiments/kfac_vs_adam.py --models mlp cnn resnet1d --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import time

import bpjax as bp
from bpjax.cli.train import add_arguments, apply_recipe, make_optimizer
from bpjax.datasets import load
from bpjax.models import MODELS
from bpjax.train import fit
from bpjax.train.evaluate import evaluate, make_eval_step

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
    a = p.parse_args()
    data = load("mnist1d")
    _warm_up(data)
    for m in a.models:
        for o in a.optimizers:
            for s in a.seeds:
                r = run(m, None if o == "default" else o, s, data)
                print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
