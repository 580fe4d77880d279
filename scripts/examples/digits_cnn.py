"""A small CNN (conv, batch_norm, relu, pool, dense) trained with the hand-written backward on
scikit-learn's 8×8 digits, which ship with scikit-learn (no download).

    python scripts/examples/digits_cnn.py                 # seed 0, 30 epochs
    python scripts/examples/digits_cnn.py --seeds 0 1 2   # mean ± std over seeds
"""
from __future__ import annotations

import argparse

import numpy as np
import optax

import bpjax as bp
from bpjax import datasets, models, train


def run(seed: int, epochs: int, progress: bool):
    data = datasets.digits()
    steps = epochs * int(0.9 * data.x_train.shape[0]) // 64
    result = train.fit(models.digits_cnn(10), bp.softmax_cross_entropy(), data,
                       optimizer=optax.adam(optax.cosine_decay_schedule(3e-3, steps)),
                       epochs=epochs, batch_size=64, seed=seed, patience=None, progress=progress,
                       log=lambda s: None)
    last = result.history[-1]
    print(f"seed {seed}: {data.x_train.shape[0]} train / {data.x_test.shape[0]} test images, "
          f"{epochs} epochs in {result.seconds:.1f} s; final validation accuracy {last['val_acc']:.4f}, "
          f"test accuracy {result.test['acc']:.4f} (params of the best validation epoch, "
          f"{result.best_epoch})", flush=True)
    return result.test["acc"], result.seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    accs, secs = zip(*(run(s, args.epochs, not args.no_progress) for s in args.seeds))
    if len(accs) > 1:
        print(f"test accuracy {100 * np.mean(accs):.1f}% ± {100 * np.std(accs):.1f} over seeds {args.seeds}, "
              f"{np.mean(secs):.1f} s per run")
    return accs


if __name__ == "__main__":
    main()
