"""``fit`` and the compiled steps it runs: chunks of training steps on the device between host-side
progress, checks, signals and checkpoints (see :mod:`bpjax.train`)."""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import distributed as dist
from .._core import Layer, Loss, check_model_and_loss
from .._grad import forward_backward
from ..privacy import (NOT_A_GUARANTEE, SAMPLING_STREAM, check_dpsgd, default_physical_batch, dp_epsilon,
                       dp_forward_backward, poisson_dp_grad, poisson_sample)
from ..datasets import Dataset
from ..layers.losses import check_labels
from .checkpoint import TrainingError, _Checkpointer
from .evaluate import _correct, evaluate, make_eval_step
from .metrics import _read_history, _rewrite_rows, _write_row, plot_history

__all__ = ["fit", "FitResult", "make_train_step", "make_train_chunk", "make_poisson_chunk", "epoch_order",
           "split_validation"]


@dataclasses.dataclass
class FitResult:
    params: Any
    state: Any
    history: List[Dict[str, float]]     # one row per epoch
    test: Dict[str, float]              # loss (and accuracy) on the test split
    best_epoch: int
    stopped_early: bool
    seconds: float
    interrupted_by: Optional[str] = None   # "SIGINT"/"SIGTERM" when a signal stopped the run
    already_ended: bool = False            # resumed a run that had ended: nothing trained or written
    dp_physical_batch: Optional[int] = None    # Poisson-sampled DP-SGD: the rows of a physical batch


def _step_fn(model: Layer, loss: Loss, optimizer: optax.GradientTransformation, *,
             classification: bool = True, compute_dtype=None, dp=None):
    """The pure training step: the hand-written forward and backward, then an optax update.

    ``step(params, state, opt_state, x, y, key, step_num) -> (params, state, opt_state, loss,
    correct)``; the layers' randomness (dropout) uses ``fold_in(key, step_num)``. With
    ``compute_dtype`` the forward and backward run in it on cast copies and ``params`` stay the
    (float32) master weights (:func:`bpjax._grad.forward_backward`). With ``dp = (C, σ)`` (or
    ``(C, σ, clip mode, microbatch)``) the gradient is DP-SGD's: per-example clipped to C,
    averaged, plus Gaussian noise of standard deviation σ·S/B on the batch of B, S the clipped
    sum's sensitivity (:func:`bpjax.privacy.dp_forward_backward`). An optimizer with a
    ``factors`` step (:func:`bpjax.curvature.kfac`) runs that step in place of the plain
    forward and backward and gets its factors in ``update(..., factors=...)``.
    """
    factors = getattr(optimizer, "factors", None)          # K-FAC (bpjax.curvature.kfac): its factor step
    if factors is not None and (dp is not None or compute_dtype is not None):
        raise ValueError("fit: expected no DP-SGD and no compute_dtype with the K-FAC optimizer")
    if factors is not None:
        fb = factors
    elif dp is None:
        fb = forward_backward(model, loss, compute_dtype=compute_dtype)
    else:
        fb = dp_forward_backward(model, loss, dp[0], dp[1], **_dp_modes(dp))

    def step(params, state, opt_state, x, y, key, step_num):
        value, state, out, grads, *extra = fb(params, state, x, y, key=jax.random.fold_in(key, step_num))
        kw = {"factors": extra[0]} if factors is not None else {}
        updates, opt_state = optimizer.update(grads, opt_state, params, **kw)
        params = optax.apply_updates(params, updates)
        correct = _correct(out, y) if classification else jnp.zeros((), jnp.int32)
        return params, state, opt_state, value, correct

    return step


def _dp_modes(dp: tuple) -> dict:
    """The clip mode and microbatch of ``dp = (C, σ[, mode, microbatch])`` as keywords."""
    return dict(zip(("mode", "microbatch"), dp[2:]))


def _dp_key(dp) -> tuple:
    """A :class:`bpjax.privacy.DPSGD`'s part that the compiled step depends on: ``(C, σ)``, the
    cache key as before, or ``(C, σ, clip mode, microbatch)`` when those are not the defaults."""
    modes = (dp.clip_mode, dp.microbatch)
    return (dp.clip, dp.noise) if modes == ("flat", None) else (dp.clip, dp.noise, *modes)


def make_train_step(model: Layer, loss: Loss, optimizer: optax.GradientTransformation, *,
                    classification: bool = True, donate: bool = True, shardings=None, compute_dtype=None):
    """One jitted step, called once per batch (:func:`fit` runs many per call instead).

    ``step(params, state, opt_state, x, y, key, step_num) -> (params, state, opt_state, loss,
    correct)``, as :func:`_step_fn`. ``params``, ``state`` and ``opt_state`` are donated, so
    their buffers are reused.
    """
    step = _step_fn(model, loss, optimizer, classification=classification, compute_dtype=compute_dtype)
    donate_argnums = (0, 1, 2) if donate else ()
    if shardings is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    # On a mesh: params/state/opt_state keep their placement; the batch is split over "data".
    p_sh, s_sh, o_sh, batch_sh, rep = shardings
    return jax.jit(step, donate_argnums=donate_argnums,
                   in_shardings=(p_sh, s_sh, o_sh, batch_sh, batch_sh, rep, rep),
                   out_shardings=(p_sh, s_sh, o_sh, rep, rep))


@functools.lru_cache(maxsize=16)
def make_train_chunk(model: Layer, loss: Loss, optimizer: optax.GradientTransformation, *,
                     batch_size: int, max_steps: int, classification: bool = True, mesh=None,
                     fsdp: bool = False, compute_dtype=None, dp=None):
    """Many training steps in one dispatch: the loop :func:`fit` runs, on the device.

    ``chunk(carry, x_all, y_all, order, first, count, key, step0) -> (carry, losses, corrects)``
    with ``carry = (params, state, opt_state)`` (donated). It runs steps ``first .. first+count-1``
    of an epoch whose example order is ``order`` (n,): step i takes the examples
    ``order[i·B : (i+1)·B]`` of the whole training split ``x_all``, ``y_all``, which stay on the
    device, and runs :func:`_step_fn` with ``step_num = step0 + i - first``. ``count`` is a traced
    number up to ``max_steps``, so one compile serves every chunk; ``losses`` and ``corrects``
    are (max_steps,), their first ``count`` entries filled.

    On a ``mesh`` each batch is split over ``"data"`` and params/opt_state stay replicated or
    FSDP-sharded. The result is cached: ``fit`` calls with the same model, loss, optimizer and
    configuration share one compiled loop. ``dp = (C, σ)``: DP-SGD steps (:func:`_step_fn`).
    """
    step = _step_fn(model, loss, optimizer, classification=classification, compute_dtype=compute_dtype, dp=dp)
    constrain = _constrainer(mesh, fsdp)

    def chunk(carry, x_all, y_all, order, first, count, key, step0):
        losses = jnp.zeros((max_steps,), jnp.result_type(float))
        corrects = jnp.zeros((max_steps,), jnp.int32)

        def body(i, c):
            (params, state, opt_state), losses, corrects = c
            idx = jax.lax.dynamic_slice_in_dim(order, (first + i) * batch_size, batch_size)
            xb, yb = constrain(jnp.take(x_all, idx, axis=0), "batch"), constrain(jnp.take(y_all, idx, axis=0), "batch")
            params, state, opt_state, value, correct = step(params, state, opt_state, xb, yb, key, step0 + i)
            carry = (constrain(params, "params"), constrain(state, "state"), constrain(opt_state, "params"))
            return carry, losses.at[i].set(value.astype(losses.dtype)), corrects.at[i].set(correct.astype(corrects.dtype))

        return jax.lax.fori_loop(0, count, body, (carry, losses, corrects))

    return jax.jit(chunk, donate_argnums=(0,))


def _constrainer(mesh, fsdp: bool):
    """``constrain(tree, kind)``: keep the placement fit gave on a mesh: batches split over
    "data", params and optimizer state replicated or FSDP-sharded, layer state replicated (no
    mesh: the tree as it is)."""
    if mesh is None:
        return lambda tree, kind: tree                                # noqa: E731

    def constrain(tree, kind):
        if kind == "params" and fsdp:
            return jax.lax.with_sharding_constraint(tree, dist.fsdp_sharding(mesh, tree))
        sh = dist.batch_sharding(mesh) if kind == "batch" else dist.replicated(mesh)
        return jax.lax.with_sharding_constraint(tree, jax.tree_util.tree_map(lambda _: sh, tree))

    return constrain


def _masked_correct(logits, labels, mask):
    """The correct predictions among the rows of ``mask`` (N,)."""
    hit = jnp.argmax(logits, axis=-1) == labels
    return jnp.sum(hit & mask.reshape((-1,) + (1,) * (hit.ndim - 1)))


@functools.lru_cache(maxsize=16)
def make_poisson_chunk(model: Layer, loss: Loss, optimizer: optax.GradientTransformation, *, n: int,
                       batch_size: int, physical: int, max_steps: int, dp: tuple, classification: bool = True,
                       mesh=None, fsdp: bool = False):
    """Many DP-SGD steps on Poisson-sampled batches in one dispatch (``fit``'s default under DP).

    ``chunk(carry, x_all, y_all, sample_key, first, count, key, step0) -> (carry, losses,
    corrects, sizes)``, as :func:`make_train_chunk`'s, but step s = ``step0 + i`` draws its own
    batch: each of the ``n`` examples with probability q = ``batch_size``/n under
    ``fold_in(sample_key, s)`` (:func:`bpjax.privacy.poisson_sample`), taken ``physical`` rows
    at a time, then one DP-SGD update with ``dp = (C, σ)``, normalised by the expected batch
    (:func:`bpjax.privacy.poisson_dp_grad`). ``losses[i]`` is the mean loss over the step's
    ``sizes[i]`` examples (0 for an empty batch), ``corrects[i]`` the correct ones among them;
    ``first`` is unused (the batch depends on the step number alone).
    """
    constrain = _constrainer(mesh, fsdp)
    rate = batch_size / n
    grad = poisson_dp_grad(model, loss, dp[0], dp[1], expected_batch=batch_size, physical=physical, **_dp_modes(dp),
                           metric=_masked_correct if classification else None,
                           place=lambda xb, yb: (constrain(xb, "batch"), constrain(yb, "batch")))

    def chunk(carry, x_all, y_all, sample_key, first, count, key, step0):
        losses = jnp.zeros((max_steps,), jnp.result_type(float))
        corrects = jnp.zeros((max_steps,), jnp.int32)
        sizes = jnp.zeros((max_steps,), jnp.int32)

        def body(i, c):
            (params, state, opt_state), losses, corrects, sizes = c
            s = step0 + i
            indices, size = poisson_sample(jax.random.fold_in(sample_key, s), n, rate, physical)
            grads, state, (loss_sum, correct) = grad(params, state, x_all, y_all, indices, size,
                                                     key=jax.random.fold_in(key, s))
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            carry = (constrain(params, "params"), constrain(state, "state"), constrain(opt_state, "params"))
            value = loss_sum / jnp.maximum(size, 1)
            return (carry, losses.at[i].set(value.astype(losses.dtype)), corrects.at[i].set(correct),
                    sizes.at[i].set(size))

        return jax.lax.fori_loop(0, count, body, (carry, losses, corrects, sizes))

    return jax.jit(chunk, donate_argnums=(0,))


def epoch_order(data_key, epoch: int, n: int) -> np.ndarray:
    """The order of the ``n`` training examples in ``epoch``: a permutation under
    ``fold_in(data_key, epoch)``, so it depends on the key and the epoch only."""
    return np.asarray(jax.random.permutation(jax.random.fold_in(data_key, epoch), n))


def split_validation(data: Dataset, fraction: float, seed: int):
    """A fixed held-out split of the training set: ``(x_train, y_train, x_val, y_val)``."""
    n = data.x_train.shape[0]
    n_val = int(round(fraction * n))
    if n_val == 0:
        return data.x_train, data.y_train, data.x_test, data.y_test
    order = np.random.default_rng(seed).permutation(n)
    val, tr = order[:n_val], order[n_val:]
    return data.x_train[tr], data.y_train[tr], data.x_train[val], data.y_train[val]


class _Signals:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and stops at the next step."""

    def __init__(self):
        self.caught = None
        self.old = {}

    def __enter__(self):
        def handler(signum, frame):
            self.caught = signum
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, handler)
        except ValueError:        # not the main thread: leave signals alone
            self.old = {}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def fit(model: Layer, loss: Loss, data: Dataset, *,
        optimizer: Optional[optax.GradientTransformation] = None,
        epochs: int = 20, batch_size: int = 128, seed: int = 0,
        val_fraction: float = 0.1, patience: Optional[int] = 10, min_delta: float = 0.0,
        restore_best: bool = True, checkpoint_dir=None, resume: bool = False,
        metrics_path=None, plot_path=None, progress: bool = True,
        log: Callable[[str], None] = print, stop_after_epoch: Optional[int] = None,
        mesh=None, fsdp: bool = False, compute_dtype=None,
        steps_per_dispatch: Optional[int] = None,
        epoch_hook: Optional[Callable[..., Dict[str, float]]] = None,
        step_hook: Optional[tuple] = None,
        dp: Optional[tuple] = None) -> FitResult:
    """Train ``model`` under ``loss`` on ``data`` with the hand-written backward.

    The training split goes onto the device once; each epoch's order is drawn there, and many
    steps run per dispatch (:func:`make_train_chunk`, a loop on the device), so the host only
    wakes between chunks of steps to update the progress bar, look for a non-finite loss and
    for SIGINT/SIGTERM.

    Args:
      optimizer: an optax transformation (default ``optax.adam(1e-3)``), or
        :func:`bpjax.curvature.kfac` (K-FAC: each step also computes its factors); learning-rate schedules
        and weight decay come from optax (e.g. ``optax.adamw(optax.cosine_decay_schedule(...))``).
      epochs: the most epochs to run. Each epoch shuffles the training split under
        ``fold_in(data_key, epoch)`` and takes full batches of ``batch_size``.
      val_fraction: the held-out part of the training set that early stopping watches (a fixed
        split under ``seed``); with 0 the test split is used instead.
      patience, min_delta: stop when the validation error has not fallen by more than
        ``min_delta`` for ``patience`` epochs (``None``: never stop early). The error is the
        classification error (1 − accuracy) for classification and the loss for regression.
      restore_best: return the params of the epoch with the lowest validation error (of the
        epochs with the same error, the one with the lowest validation loss).
      checkpoint_dir: save the whole run state (params, optimizer state, layer state, epoch,
        data-order key, early-stopping state) there after every epoch, with Orbax (named by the
        global step). SIGINT and SIGTERM stop the run at the end of the current chunk of steps
        and save it first; resuming then continues mid-epoch with the same data order (that
        epoch's ``train_loss`` row averages only the batches run after the resume). Where in
        the epoch an interrupt lands depends on the chunk size, not the result: a resumed run
        reaches the same params bit for bit.
      resume: continue from the latest checkpoint in ``checkpoint_dir``. A run that had ended
        (its early stop fired under ``patience``, or all its ``epochs`` ran) trains nothing and
        writes nothing: the result says ``already_ended``.
      metrics_path: append one row per epoch (``.jsonl``, or ``.csv`` by suffix).
      plot_path: save a PNG of the loss and accuracy curves.
      progress: show a tqdm progress bar with the running loss and accuracy.
      stop_after_epoch: stop (as if interrupted) after this epoch: for tests of resuming.
      mesh: a :func:`bpjax.distributed.make_mesh` mesh: each batch is split over its ``"data"``
        axis and XLA all-reduces the gradients; ``batch_size`` must divide evenly.
      fsdp: with a mesh, shard params and optimizer state over ``"data"`` instead of
        replicating them (FSDP-style memory savings).
      compute_dtype: e.g. ``jnp.bfloat16``: the forward and backward run in it, while params,
        optimizer state and the loss stay float32 (master weights).
      steps_per_dispatch: steps per chunk. ``None`` (default) sizes chunks to about
        ``DISPATCH_SECONDS`` each from the measured step time (one step per chunk until it is
        known), within an epoch.
      epoch_hook: ``epoch_hook(epoch, params, state) -> dict``, called once before training
        (its result ignored) and after every epoch; what it returns joins that epoch's metrics
        row (``bpjax train --grad-flow``: :class:`bpjax._observe.FlowRecorder`).
      step_hook: ``(K, hook)``: ``hook(step, params, state)`` after every K-th step (counted over
        the whole run, from 1), with the params and state after it; chunks of steps end there.
      dp: DP-SGD, as a :class:`bpjax.privacy.DPSGD` or a tuple ``(C, σ, δ)`` (the defaults for
        the rest; ``bpjax train --dp-clip C --dp-noise σ --dp-delta δ``). Each step's gradient is
        the sum of the per-example gradients clipped to norm C plus Gaussian noise of standard
        deviation σ·S, from its own key, divided by B; S is the clipped sum's sensitivity, C but
        for per-layer thresholds C_l, √(Σ_l C_l²) (``clip_mode`` "flat", "per-layer" or
        "automatic", :func:`bpjax.clipped_grad`; ``microbatch``: rows per backward). By default (``sampling="poisson"``) each
        step's batch is Poisson-sampled: every training example joins it on its own with
        probability q = B/n (``batch_size`` is the expected batch B, and an epoch is n // B
        steps), under a key from the data key and the step number, so a resumed run draws the
        same batches. It runs in physical batches of P rows (``physical_batch``, default
        :func:`bpjax.privacy.default_physical_batch`), the rows past the sample masked out; a
        larger batch is several physical batches accumulated into one step (one noise draw, one
        update). The sum is divided by the expected B, as Opacus does. ``sampling="shuffle"``
        cuts the epoch's shuffled order into batches of B instead (``fit`` logs that ε is then
        not a guarantee). Every metrics row has ``epsilon`` at δ after the steps so far, for
        Poisson sampling at rate q, by ``dp-accounting``'s ``accountant`` ("rdp" or "pld"), and
        names the sampling and the accountant (``dp_sampling``, ``dp_accountant``).

    Returns:
      A :class:`FitResult` with the final (or best) params and state, the history, the test
      metrics, the best epoch and whether early stopping fired.

    Raises:
      TrainingError: a non-finite loss (the message names the step; the last good checkpoint is
        kept), or a checkpoint that does not fit the model.
    """
    check_model_and_loss("fit", model, loss)
    optimizer = optimizer or optax.adam(1e-3)
    dp = None if dp is None else check_dpsgd(dp)
    if data.num_classes is not None:
        _check_dataset_labels(model, data)
    ckpt = _Checkpointer(checkpoint_dir) if checkpoint_dir else None
    metrics_path = pathlib.Path(metrics_path) if metrics_path else None
    run, history, k_dropout = _start_or_resume(model, optimizer, data, seed, ckpt, resume, metrics_path, log)
    t = _prepare(model, loss, optimizer, data, run, seed=seed, val_fraction=val_fraction, batch_size=batch_size,
                 mesh=mesh, fsdp=fsdp, compute_dtype=compute_dtype, steps_per_dispatch=steps_per_dispatch,
                 dp=dp, k_dropout=k_dropout, ckpt=ckpt, metrics_path=metrics_path, log=log)
    t0 = time.perf_counter()
    ended = _ended(run, epochs, patience, min_delta, log)
    if ended:
        carry, stopped_early, caught = t.carry, ended == "early", None
    else:
        carry, stopped_early, caught = _train_epochs(
            t, run, history, epochs=epochs, patience=patience, min_delta=min_delta,
            stop_after_epoch=stop_after_epoch, epoch_hook=epoch_hook, step_hook=step_hook, dp=dp, progress=progress,
            t0=t0)

    params, state = carry[0], carry[1]
    if restore_best and int(run["best_epoch"]) > 0:
        params, state = run["best_params"], run["best_state"]
    test = evaluate(model, loss, params, state, data.x_test, data.y_test, classification=t.classification,
                    eval_step=t.eval_step)
    seconds = time.perf_counter() - t0
    if plot_path and history and not (ended and pathlib.Path(plot_path).exists()):
        plot_history(history, plot_path, title=f"{data.name}")
    return FitResult(params, state, history, test, int(run["best_epoch"]), stopped_early, seconds,
                     signal.Signals(caught).name if caught else None, already_ended=bool(ended),
                     dp_physical_batch=t.physical)


@dataclasses.dataclass
class _Training:
    """What the epochs of one :func:`fit` share: the model and loss, the data on the device, the
    compiled chunk and eval step, and where rows and checkpoints go."""
    model: Layer
    loss: Loss
    carry: tuple                       # (params, state, opt_state), placed on the device
    x_dev: Any
    y_dev: Any
    x_val: np.ndarray
    y_val: np.ndarray
    n: int
    batch_size: int
    steps_per_epoch: int
    classification: bool
    chunk: Callable
    order_fn: Callable                 # (data_key, epoch) -> the epoch's order, or the sampling key
    eval_step: Callable
    pacer: "_Pacer"
    k_dropout: Any
    ckpt: Optional["_Checkpointer"]
    metrics_path: Optional[pathlib.Path]
    log: Callable[[str], None]
    physical: Optional[int] = None     # Poisson-sampled DP-SGD: rows per physical batch


def _prepare(model, loss, optimizer, data, run, *, seed, val_fraction, batch_size, mesh, fsdp, compute_dtype,
             steps_per_dispatch, dp, k_dropout, ckpt, metrics_path, log) -> _Training:
    """Split off the validation set, put the run and the training split on the device, and
    compile (or fetch from the caches) the chunk of steps, the epoch order and the eval step."""
    classification = data.num_classes is not None
    x_tr, y_tr, x_val, y_val = split_validation(data, val_fraction, seed)
    n = x_tr.shape[0]
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size
    if mesh is not None:
        dist.check_batch(mesh, batch_size)
    max_steps = min(steps_per_epoch, MAX_STEPS_PER_DISPATCH)
    physical = None
    if dp is not None and compute_dtype is not None:
        raise ValueError("fit: expected compute_dtype=None with dp (DP-SGD runs in the params' dtype), "
                         f"got compute_dtype={jnp.dtype(compute_dtype).name}")
    if dp is not None and getattr(optimizer, "factors", None) is not None:
        raise ValueError("fit: expected no DP-SGD with the K-FAC optimizer (its factors are not private)")
    if dp is not None and dp.sampling == "poisson":
        devices = 1 if mesh is None else mesh.shape[dist.AXIS]
        physical = dp.physical_batch or default_physical_batch(n, batch_size / n, devices)
        if mesh is not None:
            dist.check_batch(mesh, physical, "physical batch")
        if dp.microbatch is not None and physical % dp.microbatch:
            raise ValueError(f"fit: expected the DP-SGD microbatch to divide the physical batch {physical}, "
                             f"got {dp.microbatch}")
        chunk = make_poisson_chunk(model, loss, optimizer, n=n, batch_size=batch_size, physical=physical,
                                   max_steps=max_steps, dp=_dp_key(dp), classification=classification,
                                   mesh=mesh, fsdp=fsdp)
        order_fn = _sampling_key_fn(mesh)
        log(f"fit: DP-SGD batches: each of the {n} training examples joins each step with probability "
            f"q = {batch_size}/{n} = {batch_size / n:.4g} (Poisson), in physical batches of {physical} rows")
    else:
        if dp is not None and dp.microbatch is not None and batch_size % dp.microbatch:
            raise ValueError(f"fit: expected the DP-SGD microbatch to divide the batch size {batch_size}, "
                             f"got {dp.microbatch}")
        chunk = make_train_chunk(model, loss, optimizer, batch_size=batch_size, max_steps=max_steps,
                                 classification=classification, mesh=mesh, fsdp=fsdp, compute_dtype=compute_dtype,
                                 **({} if dp is None else {"dp": _dp_key(dp)}))
        order_fn = _order_fn(n, mesh)                                                        # without DP
        if dp is not None:
            log(f"fit: {NOT_A_GUARANTEE}")
    return _Training(model, loss, _place_carry(run, mesh, fsdp), _place_data(mesh, x_tr), _place_data(mesh, y_tr),
                     x_val, y_val, n, batch_size, steps_per_epoch, classification, chunk, order_fn,
                     make_eval_step(model, loss, classification=classification),
                     _Pacer(steps_per_dispatch, max_steps), k_dropout, ckpt, metrics_path, log, physical)


def _train_epochs(t: _Training, run, history, *, epochs, patience, min_delta, stop_after_epoch, epoch_hook,
                  step_hook, dp, progress, t0):
    """The epochs: each runs its chunks of steps, then records its row, keeps the best params,
    checkpoints and decides whether to stop. Returns ``(carry, stopped_early, signal caught)``."""
    carry, start_epoch = t.carry, int(run["epoch"])
    bar_cls = _tqdm() if progress else None
    if epoch_hook is not None:
        epoch_hook(start_epoch, carry[0], carry[1])
    with _Signals() as signals:
        for epoch in range(start_epoch + 1, epochs + 1):
            first = int(run["batch"]) if epoch == start_epoch + 1 else 0   # mid-epoch resume
            bar = bar_cls(total=t.steps_per_epoch, initial=first, desc=f"epoch {epoch}/{epochs}",
                          leave=False, file=sys.stderr) if bar_cls else None
            carry, done, losses, corrects, sizes = _run_epoch(
                t.chunk, carry, t.x_dev, t.y_dev, t.order_fn(run["data_key"], epoch), first, t.steps_per_epoch,
                epoch, key_dropout=t.k_dropout, pacer=t.pacer, bar=bar, signals=signals,
                batch_size=t.batch_size, classification=t.classification, ckpt=t.ckpt, step_hook=step_hook)
            if done < t.steps_per_epoch:                                   # interrupted mid-epoch
                _save_mid_epoch(run, carry, epoch, done, t.steps_per_epoch, t.ckpt, signals, t.log)
                return carry, False, signals.caught
            _end_epoch(t, run, history, carry, epoch, losses, corrects, sizes, t0, min_delta, epoch_hook, dp)
            reason = _stop_reason(run, epoch, signals, patience, min_delta, stop_after_epoch, t.log)
            if reason:
                return carry, reason == "early", signals.caught
    return carry, False, signals.caught


def _end_epoch(t: _Training, run, history, carry, epoch, losses, corrects, sizes, t0, min_delta, epoch_hook, dp):
    """The epoch's metrics row (validation, the hook's, ε under DP), written and logged; the
    best params kept; the checkpoint saved."""
    params, state, opt_state = carry
    row = _epoch_row(t.model, t.loss, params, state, t.x_val, t.y_val, t.eval_step, t.classification,
                     epoch, t.steps_per_epoch, t.batch_size, losses, corrects, sizes, t0)
    if epoch_hook is not None:
        row.update(epoch_hook(epoch, params, state))
    if dp is not None:            # accounted as Poisson sampling at rate B/n: what ran, unless "shuffle"
        row["epsilon"] = dp_epsilon(dp.noise, t.batch_size / t.n, epoch * t.steps_per_epoch, dp.delta,
                                    accountant=dp.accountant)
        row.update(dp_sampling=dp.sampling, dp_accountant=dp.accountant)
    history.append(row)
    if t.metrics_path:
        _write_row(t.metrics_path, row)
    t.log(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                   if not k.startswith("grad_flow/") and k.count("/") < 2))       # per-layer rows: the file only
    error = 1.0 - row["val_acc"] if t.classification else row["val_loss"]
    _update_best(run, error, row["val_loss"], min_delta, epoch, params, state, opt_state)
    if t.ckpt:
        t.ckpt.save(epoch * t.steps_per_epoch, run)


def _ended(run, epochs, patience, min_delta, log) -> Optional[str]:
    """Why a resumed run has nothing left to train, saying so: "early" (its early stop had fired,
    or fires under this ``patience``) or "epochs" (all ``epochs`` ran); ``None`` to train."""
    done = int(run["epoch"])
    if done == 0 or int(run["batch"]):                 # a fresh run, or one stopped mid-epoch
        return None
    if patience is not None and int(run["since_best"]) >= patience:
        log(f"the run had ended: early stop after epoch {done}, the validation error had not fallen by more "
            f"than {min_delta:g} for {patience} epochs (best: epoch {int(run['best_epoch'])}); nothing to train")
        return "early"
    if done >= epochs:
        log(f"the run had ended: {done} epochs run, of epochs={epochs}; nothing to train")
        return "epochs"
    return None


def _stop_reason(run, epoch, signals, patience, min_delta, stop_after_epoch, log) -> Optional[str]:
    """Why the run stops after ``epoch`` ("signal", "early", "limit"), saying so; ``None`` to go on."""
    if _stop_requested(signals):
        log(f"{signal.Signals(signals.caught).name} received: stopping after epoch {epoch} "
            f"(checkpoint saved); resume to continue")
        return "signal"
    if patience is not None and int(run["since_best"]) >= patience:
        log(f"early stop after epoch {epoch}: the validation error has not fallen by more than "
            f"{min_delta:g} for {patience} epochs (best: epoch {int(run['best_epoch'])})")
        return "early"
    if stop_after_epoch is not None and epoch >= stop_after_epoch:
        return "limit"
    return None


def _check_dataset_labels(model: Layer, data: Dataset) -> None:
    """Once, before training: every label of both splits is an integer class the model's
    output can score (under ``jit`` an out-of-range label gives a NaN or a wrong loss)."""
    widths = []
    jax.eval_shape(lambda key: widths.append(model.init(key, data.in_shape)[2]), jax.random.PRNGKey(0))
    num_classes = int(widths[0][-1])
    check_labels(data.y_train, num_classes, "fit (training split)", num_examples=len(data.x_train))
    check_labels(data.y_test, num_classes, "fit (test split)", num_examples=len(data.x_test))


#: The chunk length ``fit`` aims at when it sizes chunks itself: long enough that the host's
#: work between chunks is noise, short enough for a lively progress bar and a prompt stop.
DISPATCH_SECONDS = 0.25


#: The most steps in one chunk (the length of its per-step loss buffer).
MAX_STEPS_PER_DISPATCH = 4096


class _Pacer:
    """How many steps the next chunk runs: ``fixed`` if given, else about ``DISPATCH_SECONDS``
    worth at the step time measured on the last chunk (compiles make the first look slow, so it
    starts with one step)."""

    def __init__(self, fixed: Optional[int], most: int):
        if fixed is not None and fixed < 1:
            raise ValueError(f"fit: expected steps_per_dispatch >= 1 or None, got {fixed}")
        self.fixed, self.most, self.per_step = fixed, most, None

    def next(self, remaining: int) -> int:
        if self.fixed is not None:
            want = self.fixed
        elif self.per_step is None:
            want = 1
        else:
            want = int(DISPATCH_SECONDS / max(self.per_step, 1e-7))
        return max(1, min(want, self.most, remaining))

    def measured(self, count: int, seconds: float):
        self.per_step = seconds / count


def _run_epoch(chunk, carry, x_dev, y_dev, order, first, steps_per_epoch, epoch, *,
               key_dropout, pacer, bar, signals, batch_size, classification, ckpt, step_hook=None):
    """Chunks of steps ``first ..`` of one epoch, until its end or a signal. Returns the carry,
    the number of the epoch's steps done, and the per-step losses, correct counts and batch
    sizes (host; the sizes ``None`` for fixed batches of ``batch_size``)."""
    losses, corrects, sizes, i = [], [], [], first
    every, hook = step_hook if step_hook else (0, None)
    while i < steps_per_epoch:
        step0 = (epoch - 1) * steps_per_epoch + i
        left = steps_per_epoch - i if not every else min(steps_per_epoch - i, every - step0 % every)
        count = _same_count_everywhere(pacer.next(left))
        t = time.perf_counter()
        carry, chunk_losses, chunk_correct, *chunk_sizes = chunk(carry, x_dev, y_dev, order, np.int32(i),
                                                                 np.int32(count), key_dropout, np.int32(step0))
        chunk_losses = np.asarray(jax.device_get(chunk_losses)[:count], np.float64)   # waits for the chunk
        pacer.measured(count, time.perf_counter() - t)
        _check_finite(chunk_losses, step0, epoch, i, ckpt)
        losses.append(chunk_losses)
        corrects.append(np.asarray(jax.device_get(chunk_correct)[:count]))
        if chunk_sizes:                                                # Poisson-sampled batches
            sizes.append(np.asarray(jax.device_get(chunk_sizes[0])[:count]))
        i += count
        if hook is not None and (step0 + count) % every == 0:
            hook(step0 + count, carry[0], carry[1])
        if bar:
            bar.update(count)
            post = {"loss": f"{chunk_losses[-1]:.4f}"}
            if classification:
                post["acc"] = f"{float(corrects[-1][-1]) / max(sizes[-1][-1] if sizes else batch_size, 1):.3f}"
            bar.set_postfix(post)
        if _stop_requested(signals) and i < steps_per_epoch:
            break
    if bar:
        bar.close()
    return carry, i, np.concatenate(losses) if losses else np.zeros(0), \
        np.concatenate(corrects) if corrects else np.zeros(0, np.int64), \
        (np.concatenate(sizes) if sizes else None)


def _same_count_everywhere(count: int) -> int:
    """Process 0's chunk length, on every process: they must all run the same steps, and each
    pacer measures its own process's time (as it is, in a single process)."""
    if jax.process_count() == 1:
        return count
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.int32(count)))


def _stop_requested(signals) -> Optional[int]:
    """The signal that stops the run, or ``None``; across processes, one caught by any of them,
    so that they all stop at the same step."""
    if jax.process_count() == 1:
        return signals.caught
    from jax.experimental import multihost_utils
    agreed = int(np.max(multihost_utils.process_allgather(np.int32(signals.caught or 0)))) or None
    signals.caught = signals.caught or agreed
    return agreed


def _save_mid_epoch(run, carry, epoch, done, steps_per_epoch, ckpt, signals, log):
    """A signal stopped the run after ``done`` steps of ``epoch``: record where, and save."""
    params, state, opt_state = carry
    global_step = (epoch - 1) * steps_per_epoch + done
    run.update(params=params, state=state, opt_state=opt_state, epoch=np.int64(epoch - 1), batch=np.int64(done))
    where = "no checkpoint_dir, nothing saved"
    if ckpt:
        ckpt.save(global_step, run)
        where = f"saved {ckpt.directory / str(global_step)}"
    log(f"{signal.Signals(signals.caught).name} received at epoch {epoch}, batch {done}: {where}; "
        f"resume to continue")


def _check_finite(losses, step0, epoch, first, ckpt):
    if np.all(np.isfinite(losses)):
        return
    bad = int(np.argmax(~np.isfinite(losses)))
    if ckpt is None:
        kept = "the last good checkpoint was not written (no checkpoint_dir)"
    elif ckpt.latest() is None:
        kept = "no checkpoint had been written yet"
    else:
        kept = f"the last good checkpoint is kept in {ckpt.directory}"
    raise TrainingError(f"fit: the loss became {losses[bad]} at step {step0 + bad + 1} (epoch {epoch}, batch "
                        f"{first + bad + 1}); {kept}")


def _epoch_row(model, loss, params, state, x_val, y_val, eval_step, classification, epoch,
               steps_per_epoch, batch_size, losses, corrects, sizes, t0) -> Dict[str, float]:
    """The metrics row of a finished epoch: the training loss (and accuracy) averaged over the
    epoch's batches (over its examples, for Poisson batches of ``sizes``), and the validation
    loss (and accuracy)."""
    val = evaluate(model, loss, params, state, x_val, y_val, classification=classification,
                   eval_step=eval_step)
    if sizes is None:
        train_loss, examples = float(losses.mean()), len(corrects) * batch_size
    else:
        examples = int(np.sum(sizes))
        train_loss = float(np.sum(losses * sizes)) / max(examples, 1)
    row = {"epoch": epoch, "step": epoch * steps_per_epoch, "train_loss": train_loss}
    if classification:
        row["train_acc"] = float(np.sum(corrects)) / max(examples, 1)
    row["val_loss"] = val["loss"]
    if classification:
        row["val_acc"] = val["acc"]
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _update_best(run, error, val_loss, min_delta, epoch, params, state, opt_state):
    """Record the finished epoch in the run state, and it as the best when the error fell by more
    than ``min_delta`` (which early stopping counts as progress) or stayed the same at a lower
    validation loss (a tie of accuracies, broken by the loss: not progress, but better params)."""
    run.update(params=params, state=state, opt_state=opt_state, epoch=np.int64(epoch), batch=np.int64(0))
    fell = error < float(run["best_val"]) - min_delta
    run["since_best"] = np.int64(0 if fell else int(run["since_best"]) + 1)
    if fell or (error == float(run["best_val"]) and val_loss < float(run["best_loss"])):
        run.update(best_val=np.float64(error), best_loss=np.float64(val_loss), best_epoch=np.int64(epoch),
                   best_params=_copy(params), best_state=_copy(state))


def _start_or_resume(model, optimizer, data, seed, ckpt, resume, metrics_path, log):
    """The run state (params, optimizer state, data-order key, early-stopping state) fresh from
    ``seed``, or restored from the latest checkpoint; the history rows up to it; and the
    dropout key (derived from ``seed`` alone)."""
    k_init, data_key, k_dropout = jax.random.split(jax.random.PRNGKey(seed), 3)
    params, state, _ = model.init(k_init, data.in_shape)
    run = {"params": params, "state": state, "opt_state": optimizer.init(params),
           "epoch": np.int64(0),        # completed epochs
           "batch": np.int64(0),        # completed batches of the epoch after them (an interrupt)
           "data_key": data_key, "best_val": np.float64(np.inf), "best_loss": np.float64(np.inf),
           "since_best": np.int64(0), "best_epoch": np.int64(0), "best_params": _copy(params),
           "best_state": _copy(state)}
    history: List[Dict[str, float]] = []
    if resume and ckpt and ckpt.latest() is not None:
        run = ckpt.restore(ckpt.latest(), run)
        rows = _read_history(metrics_path, np.inf)
        history = [r for r in rows if r["epoch"] <= int(run["epoch"])]
        if len(history) < len(rows):                # rows of epochs after the checkpoint (killed between)
            _rewrite_rows(metrics_path, history)
        log(f"resumed from {ckpt.directory / str(ckpt.latest())}: epoch {int(run['epoch'])} done"
            + (f", {int(run['batch'])} batches of epoch {int(run['epoch']) + 1}" if int(run["batch"]) else ""))
    elif metrics_path and metrics_path.exists():
        metrics_path.unlink()
    if metrics_path:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
    return run, history, k_dropout


def _place_carry(run, mesh, fsdp):
    """``(params, state, opt_state)`` on the device(s): as they are on one device; on a mesh,
    params and optimizer state replicated or FSDP-sharded, layer state replicated."""
    if mesh is None:
        return run["params"], run["state"], run["opt_state"]
    params, _ = dist.place(mesh, run["params"], fsdp=fsdp)
    opt_state, _ = dist.place(mesh, run["opt_state"], fsdp=fsdp)
    state, _ = dist.place(mesh, run["state"])
    return params, state, opt_state


def _place_data(mesh, a: np.ndarray):
    """A whole host array on the device once (on a mesh: a copy on every device, built from the
    host array each process holds, so it also works across processes)."""
    if mesh is None:
        return jnp.asarray(a)
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, dist.replicated(mesh), lambda index: a[index])


@functools.lru_cache(maxsize=16)
def _order_fn(n: int, mesh):
    """``order(data_key, epoch)``: :func:`epoch_order` computed on the device (replicated on a mesh)."""
    def order(data_key, epoch):
        return jax.random.permutation(jax.random.fold_in(data_key, epoch), n)

    if mesh is None:
        return jax.jit(order)
    return jax.jit(order, out_shardings=dist.replicated(mesh))


@functools.lru_cache(maxsize=16)
def _sampling_key_fn(mesh):
    """``key(data_key, epoch)``: the Poisson sampler's key, ``fold_in(data_key, SAMPLING_STREAM)``,
    the same every epoch (each step folds its number in; replicated on a mesh)."""
    def key(data_key, epoch):
        return jax.random.fold_in(data_key, SAMPLING_STREAM)

    if mesh is None:
        return jax.jit(key)
    return jax.jit(key, out_shardings=dist.replicated(mesh))


def _copy(tree):
    """A copy that survives the step donating (and so deleting) the original buffers."""
    return jax.tree_util.tree_map(jnp.copy, tree)


def _tqdm():
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm
