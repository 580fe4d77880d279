"""Training: the textbook loop — forward, error, backward, update, repeat until the validation
error stops falling — as a trainer with checkpoints, metrics, a progress bar and a plot.

The main entry point is :func:`fit`::

    import optax, bpjax as bp
    from bpjax import datasets, models, train

    data = datasets.mnist1d()
    model = models.MODELS["cnn"](data.num_classes)
    result = train.fit(model, bp.softmax_cross_entropy(), data, optimizer=optax.adam(1e-2), epochs=20)

Everything runs on whatever device JAX defaults to (CPU, GPU, TPU). Data order, dropout keys
and the validation split are all derived from one seed, so a run is reproducible, and a run
resumed from a checkpoint reaches the same params as an uninterrupted one (bit for bit on CPU).

The parts: :mod:`.loop` (``fit`` and the compiled steps), :mod:`.evaluate`,
:mod:`.checkpoint`, :mod:`.metrics` (rows and the plot), :mod:`.recipes` (each model's default
options) and :mod:`.runs` (run folders, ``load_run``); DP-SGD's gradient, sampling and
accounting, which ``fit(..., dp=...)`` uses, are :mod:`bpjax.privacy`. The ``bpjax train``
command that drives them is :mod:`bpjax.cli.train`.
"""
from . import runs
from .checkpoint import TrainingError
from .evaluate import evaluate, make_eval_step
from .health import HealthRecorder, SanityResult, sanity_checks
from .loop import (DISPATCH_SECONDS, MAX_STEPS_PER_DISPATCH, FitResult, epoch_order, fit, make_poisson_chunk,
                   make_train_chunk, make_train_step, split_validation)
from .metrics import plot_history
from .recipes import DEFAULT_MODEL, RECIPES

__all__ = ["fit", "FitResult", "evaluate", "make_eval_step", "make_train_step", "make_train_chunk",
           "make_poisson_chunk", "epoch_order",
           "split_validation", "TrainingError", "plot_history", "runs", "DEFAULT_MODEL", "RECIPES",
           "DISPATCH_SECONDS", "MAX_STEPS_PER_DISPATCH",
           "sanity_checks", "SanityResult", "HealthRecorder"]
