"""``bpjax train``: its options, each model's recipe, the run folder, and the one-sentence summary."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import signal
import sys
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import __version__
from .. import distributed as dist
from .._observe import FlowRecorder
from ..datasets import DATASETS, Dataset, load
from ..layers import losses as _losses
from ..models import MODELS, fitting, output_shape
from .._per_example import AUTO_GAMMA
from ..privacy import ACCOUNTANTS, NOT_A_GUARANTEE, SAMPLERS, check_dpsgd, dp_epsilon, dp_noise_for
from ..train import FitResult, TrainingError, fit, runs
from ..train.checkpoint import _to_save
from ..curvature import kfac
from ..train.recipes import DEFAULT_MODEL, KFAC_RECIPE, RECIPES


def add_arguments(p) -> None:
    """The options of ``bpjax train`` (added to an argparse parser)."""

    p.add_argument("--model", choices=sorted(MODELS), default=None,
                   help="model (default: the dataset's, see DEFAULT_MODEL: resnet1d for mnist1d)")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mnist1d",
                   help="dataset, generated or shipped locally, never downloaded")
    recipe = "(default: the model's recipe, see RECIPES)"
    p.add_argument("--epochs", type=int, default=None, help=f"most epochs {recipe}")
    p.add_argument("--batch-size", type=int, default=None, help=f"examples per step {recipe}")
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd", "kfac"], default=None,
                   help=f"optax optimizer, or kfac: K-FAC from the hand-written backward's Kronecker factors "
                        f"(bpjax.curvature.kfac; its lr and weight decay from KFAC_RECIPE) {recipe}")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate {recipe}")
    p.add_argument("--schedule", choices=["constant", "cosine"], default=None,
                   help=f"learning-rate schedule from optax (cosine: decay to 0 over the run) {recipe}")
    p.add_argument("--weight-decay", type=float, default=None, help=f"decoupled weight decay (adamw) {recipe}")
    p.add_argument("--patience", type=int, default=None,
                   help="stop when the validation error (1 - accuracy, or the loss for regression) "
                        f"has not fallen for this many epochs; 0: never {recipe}")
    p.add_argument("--min-delta", type=float, default=0.0, help="least fall of the error that counts")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="held-out part of the training set that early stopping watches")
    p.add_argument("--seed", type=int, default=0, help="seed of init, data order, split and dropout")
    p.add_argument("--devices", type=int, default=None,
                   help="data-parallel over this many devices (a mesh over a 'data' axis); with "
                        "--coordinator: the devices of every process together (default: all of them)")
    p.add_argument("--fsdp", action="store_true", help="with --devices: shard params and optimizer state")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of the forward and backward; params, optimizer state and the "
                        "loss stay float32 (master weights)")
    p.add_argument("--out", default=None, help="run directory (default: runs/MODEL-DATASET-sSEED)")
    p.add_argument("--metrics-format", choices=["jsonl", "csv"], default="jsonl", help="metrics file format")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint; refused unless the arguments "
                        "that define the run (in its run.json) are the same")
    p.add_argument("--overwrite", action="store_true",
                   help="remove the run in --out (what bpjax train wrote there) and start a new one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="no PNG of the curves")
    p.add_argument("--grad-flow", action="store_true",
                   help="every epoch, each layer's ‖dy‖, ‖dx‖, ‖dθ‖, ‖θ‖ and update-to-weight ratio on a fixed "
                        "batch, in the metrics and in gradflow.png")
    p.add_argument("--inspect", action="store_true",
                   help="every epoch, the gradient noise scale B_simple, each layer's gradient signal-to-noise "
                        "ratio and the GGN's trace on a fixed batch, in the metrics and in inspect.png")
    p.add_argument("--health", action="store_true",
                   help="every epoch, each layer's activation mean, std and saturation, gradient mean and std "
                        "and update-to-data ratio on a fixed batch, in health.json and health.png")
    p.add_argument("--health-every", type=int, default=None, metavar="K",
                   help="with --health: a record every K steps instead of every epoch (K = 1: the exact "
                        "per-step update-to-data ratio); implies --health")
    p.add_argument("--sanity", action=argparse.BooleanOptionalAction, default=os.environ.get("BPJAX_SANITY") != "0",
                   help="before training: the initial loss against log C, and overfitting 16 examples "
                        "(bpjax.train.health.sanity_checks); one line each, a warning when off (default: on; "
                        "off where BPJAX_SANITY=0, as the test suite sets it)")
    p.add_argument("--dp-clip", type=float, default=None, metavar="C",
                   help="DP-SGD: clip each example's gradient to norm C (needs --dp-noise or --dp-epsilon)")
    p.add_argument("--dp-noise", type=float, default=None, metavar="SIGMA",
                   help="DP-SGD: Gaussian noise of std SIGMA*C on the sum of the clipped gradients, divided "
                        "by --batch-size")
    p.add_argument("--dp-epsilon", type=float, default=None, metavar="EPSILON",
                   help="DP-SGD, instead of --dp-noise: the epsilon the whole run may spend at --dp-delta; "
                        "SIGMA is then the least (to 0.1%%) whose epsilon by --dp-accountant after --epochs "
                        "epochs at rate batch/n is at most EPSILON, printed and kept in summary.json")
    p.add_argument("--dp-delta", type=float, default=None, metavar="DELTA",
                   help="DP-SGD: report epsilon at this delta every epoch (default: 1e-5)")
    p.add_argument("--dp-sampling", choices=SAMPLERS, default=None,
                   help="DP-SGD's batches: poisson (each example joins each step with probability "
                        "batch/n, what epsilon is accounted for) or shuffle (each epoch's shuffled order cut "
                        "into batches; epsilon is then not a guarantee) (default: poisson)")
    p.add_argument("--dp-accountant", choices=ACCOUNTANTS, default=None,
                   help="DP-SGD: dp-accounting's accountant for epsilon (default: rdp)")
    p.add_argument("--dp-physical-batch", type=int, default=None, metavar="P",
                   help="DP-SGD with Poisson sampling: rows per physical batch; a larger sampled batch is "
                        "split and accumulated into one step (default: batch + 3 standard deviations of "
                        "the batch size)")
    p.add_argument("--dp-clip-mode", default=None, metavar="MODE",
                   help="DP-SGD's clipping: flat (each example's gradient to norm C), per-layer (each layer's "
                        "part to C/sqrt(L), L the layers with params) or automatic (g/(|g|+0.01), times C) "
                        "(default: flat); the noise std is SIGMA*C in each")
    p.add_argument("--dp-microbatch", default=None, metavar="M",
                   help="DP-SGD: take each (physical) batch M rows at a time, summing the clipped gradients; "
                        "bounds memory, same gradient (default: the whole batch)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="train over several processes: process 0's address and a free port (every process "
                        "gets the same); then only process 0 prints and writes metrics, plot and summary")
    p.add_argument("--num-processes", type=int, default=1, help="with --coordinator: how many processes")
    p.add_argument("--process-id", type=int, default=0,
                   help="with --coordinator: this process's index, 0 .. --num-processes - 1 (0 coordinates)")
    p.add_argument("--init-timeout", type=float, default=60.0,
                   help="with --coordinator: seconds to wait for every process before exiting with an error")


def apply_recipe(args) -> None:
    """Fill the options left unset in ``args`` (``None``) from :data:`DEFAULT_MODEL` and
    :data:`RECIPES`, in place."""
    if args.model is None:
        args.model = DEFAULT_MODEL.get(args.dataset, "mlp")
    recipe = RECIPES.get(args.model, RECIPES["*"])
    if args.optimizer == "kfac":                       # the model's recipe, K-FAC's step size
        recipe = {**recipe, **KFAC_RECIPE}
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def make_optimizer(name: str, lr: float, schedule: str, weight_decay: float, total_steps: int, *,
                   model=None, loss=None, example=None):
    """An optax optimizer with an optax schedule; nothing here re-implements either. ``kfac``
    needs the ``model``, the ``loss`` and an ``example`` ``(x, target)`` of a few rows."""
    rate = optax.cosine_decay_schedule(lr, max(total_steps, 1)) if schedule == "cosine" else lr
    if name == "kfac":
        return kfac(rate, model=model, loss=loss, example=example, weight_decay=weight_decay)
    if name == "adamw" or weight_decay:
        return optax.adamw(rate, weight_decay=weight_decay)
    if name == "sgd":
        return optax.sgd(rate, momentum=0.9)
    return optax.adam(rate)


def _kfac_problem(args, dp) -> Optional[str]:
    """The one line that says why ``--optimizer kfac`` cannot run with these options, or None."""
    if args.optimizer != "kfac":
        return None
    clash = [o for o, on in (("DP-SGD (--dp-*)", dp is not None), ("--dtype bfloat16", args.dtype != "float32"),
                             ("--devices", args.devices not in (None, 1))) if on]
    if clash:
        return f"bpjax train: --optimizer kfac runs in float32 on one device without DP-SGD, got {', '.join(clash)}"
    return None


def command(args) -> int:
    """Run ``bpjax train`` with parsed ``args``; returns the exit code."""

    started = time.perf_counter()
    apply_recipe(args)
    try:
        main = _join_processes(args)            # before anything touches a device
        mesh = _mesh_from_args(args)
    except ValueError as e:
        print(e if str(e).startswith("bpjax train:") else f"bpjax train: {e}", file=sys.stderr)
        return 2
    say = print if main else (lambda *a, **k: None)                            # noqa: E731
    if getattr(args, "health_every", None) is not None and args.health_every < 1:
        print(f"bpjax train: --health-every: expected a whole number of steps ≥ 1, got {args.health_every}",
              file=sys.stderr)
        return 2
    try:
        dp = _dp_from_args(args)
    except ValueError as e:
        print(f"bpjax train: {e}", file=sys.stderr)
        return 2
    problem = _missing_packages(args, dp) or _kfac_problem(args, dp)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    out = pathlib.Path(args.out or f"runs/{args.model}-{args.dataset}-s{args.seed}")
    try:
        data = load(args.dataset)
    except ImportError as e:                    # an optional package (mnist1d, scikit-learn)
        print(f"bpjax train: --dataset {args.dataset}: {e}", file=sys.stderr)
        return 2
    if dp is not None and getattr(args, "dp_epsilon", None) is not None:
        try:
            dp = _calibrate_noise(args, data, dp, say)
        except ValueError as e:
            print(e if str(e).startswith("bpjax train:") else f"bpjax train: {e}", file=sys.stderr)
            return 2
    model_args = {"num_classes": data.num_classes or 1}
    problem = _model_fits(args.model, args.dataset, data, model_args["num_classes"])
    if problem:
        print(problem, file=sys.stderr)
        return 2
    loss = _losses.squared_error() if data.num_classes is None else _losses.softmax_cross_entropy()
    model = MODELS[args.model](**model_args)
    held_run, created = runs.holds_run(out), not out.exists()
    nothing_to_resume = main and args.resume and not held_run
    fresh = main and not (args.resume and held_run)         # a new run (of this process) from here on
    problem = _prepare_run_dir(out, args) if main else None
    if _agree_to_stop(problem is not None):                 # every process stops, or none
        if problem:
            print(problem, file=sys.stderr)
        return 2
    if nothing_to_resume:
        say(f"bpjax train: --resume: {out} holds no run yet; starting one")
    if fresh:                                               # a resumed run keeps its run.json, the same
        runs.write_info(out, {**run_arguments(args), "model_args": model_args, "in_shape": list(data.in_shape),
                              "x_dtype": str(data.x_train.dtype), "loss": loss_name(data)})
    n_train = int(round(data.x_train.shape[0] * (1 - args.val_fraction)))
    total_steps = args.epochs * max(n_train // args.batch_size, 1)
    optimizer = make_optimizer(args.optimizer, args.lr, args.schedule, args.weight_decay, total_steps, model=model,
                               loss=loss, example=(data.x_train[:2], data.y_train[:2]))
    _announce(args, data, out, dp, say)
    metrics = out / f"metrics.{args.metrics_format}"
    inspector = _inspector(args, model, loss, data, out, main)
    health = _health_hook(args, model, loss, data, out, main)
    if main and fresh and getattr(args, "sanity", False):
        _sanity(args, model, loss, data, say)
    try:
        result = fit(model, loss, data, optimizer=optimizer, epochs=args.epochs,
                     batch_size=args.batch_size, seed=args.seed, val_fraction=args.val_fraction,
                     patience=args.patience or None, min_delta=args.min_delta,
                     checkpoint_dir=out / "checkpoints", resume=args.resume,
                     metrics_path=metrics if main else None,
                     plot_path=None if args.no_plot or not main else out / "curves.png",
                     progress=main and not args.no_progress, log=say, mesh=mesh, fsdp=args.fsdp,
                     compute_dtype=None if args.dtype == "float32" else jnp.dtype(args.dtype),
                     epoch_hook=_epoch_hooks(_grad_flow_hook(args, model, loss, data, out, main), inspector, health),
                     step_hook=(health.every, health.at_step) if health is not None and health.every else None,
                     dp=dp)
    except TrainingError as e:
        _forget_a_failed_start(out, fresh, created)
        print(f"bpjax train: {e}", file=sys.stderr)
        return 1
    except ValueError as e:                     # the data or the options do not fit the model
        _forget_a_failed_start(out, fresh, created)
        print(f"bpjax train: {e}", file=sys.stderr)
        return 2
    except BaseException:
        _forget_a_failed_start(out, fresh, created)
        raise
    if result.interrupted_by:
        say(f"bpjax train: stopped by {result.interrupted_by}; run again with --resume to continue")
        return 128 + int(getattr(signal, result.interrupted_by))
    if _agree_to_stop(main and result.already_ended and (out / runs.MODEL_DIR).is_dir()
                      and (out / "summary.json").is_file()):           # a finished run: nothing to do
        say(already_ended_line(result, out))
        return 0
    runs.save_model(out, result.params, result.state, to_save=_to_save)      # every process: orbax coordinates
    if not main:
        return 0
    _write_summary(args, result, out, dp)
    if dp is not None and dp.sampling == "shuffle":
        print(f"bpjax train: {NOT_A_GUARANTEE}")
    if inspector is not None:
        print(inspector.summary())
    print(final_line(args, result, out, time.perf_counter() - started))
    return 0


def _missing_packages(args, dp) -> Optional[str]:
    """The one line naming the packages of the ``train`` extra that this run needs and cannot
    import, or ``None``: checked before anything is written, so that a run never fails for one
    half-way. (The datasets' own packages, mnist1d and scikit-learn, are named by their loaders.)"""
    needed = [("orbax.checkpoint", "orbax-checkpoint", "the checkpoints need")]
    if not args.no_plot:
        needed.append(("matplotlib", "matplotlib", "the plot needs"))
    if dp is not None:
        needed.append(("dp_accounting", "dp-accounting", "DP-SGD's epsilon needs"))
    missing = [(package, who) for module, package, who in needed if not _importable(module)]
    if not missing:
        return None
    return (f"bpjax train: {' and '.join(f'{who} {package}' for package, who in missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install "
            f"{' '.join(package for package, _ in missing)} (or pip install 'bpjax[train]'"
            f"{'; --no-plot does without matplotlib' if 'matplotlib' in dict(missing) else ''})")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _forget_a_failed_start(out: pathlib.Path, ours: bool, created: bool) -> None:
    """After a new run (``ours``: not a resumed one) failed before its first checkpoint: remove
    what it wrote, and the folder if it made it, so that the next try is not refused as a second
    run. A run with a checkpoint is kept, to be resumed."""
    ckpts = out / "checkpoints"
    if not ours or (ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())):
        return
    runs.remove_run(out)
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _announce(args, data: Dataset, out: pathlib.Path, dp, say) -> None:
    """The lines ``bpjax train`` starts with: what trains on what, how, and where it writes."""
    processes = f" x{jax.device_count()} ({jax.process_count()} processes)" if jax.process_count() > 1 else ""
    say(f"bpjax train: {args.model} on {args.dataset} ({data.x_train.shape[0]} train, "
        f"{data.x_test.shape[0]} test), {args.epochs} epochs of batch {args.batch_size}, "
        f"{args.optimizer} lr {args.lr:g} ({args.schedule}), {args.dtype}, device {jax.devices()[0].platform}"
        f"{processes}, writing to {out}")
    if dp is not None:
        batches = (f"Poisson-sampled, {args.batch_size} examples expected" if dp.sampling == "poisson" else
                   f"each epoch's shuffled order cut into {args.batch_size}")
        clipped = {"flat": f"clipped to {dp.clip:g}",
                   "per-layer": f"clipped layer by layer to {dp.clip:g}/√L (L layers with params)",
                   "automatic": f"normalised, g/(‖g‖+{AUTO_GAMMA:g}), times {dp.clip:g}"}[dp.clip_mode]
        micro = "" if dp.microbatch is None else f", {dp.microbatch} rows per backward"
        say(f"bpjax train: DP-SGD: each example's gradient {clipped}{micro}, noise std {dp.noise:g}·"
            f"{dp.clip:g} on the sum, divided by {args.batch_size}; batches: {batches} (--dp-sampling "
            f"{dp.sampling}); epsilon at delta {dp.delta:g} by dp-accounting ({dp.accountant.upper()}) for "
            f"Poisson sampling at rate batch/n")


def _calibrate_noise(args, data: Dataset, dp, say):
    """``--dp-epsilon``: the least σ (to 0.1%) whose ε at δ, by the run's accountant, after all
    of its steps (``--epochs`` of n // batch, n the training split that ``fit`` samples from, at
    rate batch/n) is at most the target; kept in ``args`` (``dp_calibrated_noise``) for run.json,
    printed, and returned as the run's :class:`bpjax.privacy.DPSGD`."""
    n = data.x_train.shape[0]
    n_val = int(round(args.val_fraction * n))          # as fit's split_validation cuts it
    n = n - n_val if n_val else n
    batch = min(args.batch_size, n)
    rate, steps = batch / n, args.epochs * (n // batch)
    sigma = dp_noise_for(args.dp_epsilon, rate, steps, dp.delta, accountant=dp.accountant, who="--dp-epsilon")
    args.dp_calibrated_noise = sigma
    spent = dp_epsilon(sigma, rate, steps, dp.delta, accountant=dp.accountant)
    say(f"bpjax train: --dp-epsilon {args.dp_epsilon:g}: noise multiplier {sigma:.4g}, the least (to 0.1%) whose "
        f"epsilon at delta {dp.delta:g} by {dp.accountant.upper()} after {steps} steps at rate {batch}/{n} is at "
        f"most {args.dp_epsilon:g} (it is {spent:.4g})")
    return _dp_from_args(args)


def _write_summary(args, result: FitResult, out: pathlib.Path, dp) -> None:
    """``summary.json``: the run's test metrics, best epoch and time; under DP-SGD, the ε spent
    by all its steps, the sampling and the accountant (and, for shuffled batches, that ε is not
    a guarantee)."""
    summary = {"model": args.model, "dataset": args.dataset, "seed": args.seed, "dtype": args.dtype,
               "epochs_run": len(result.history), "best_epoch": result.best_epoch,
               "stopped_early": result.stopped_early, "seconds": round(result.seconds, 2),
               **{f"test_{k}": v for k, v in result.test.items()}}
    if dp is not None:
        last = result.history[-1] if result.history else {"epsilon": 0.0, "step": 0}
        summary["dp"] = {"epsilon": last["epsilon"], "delta": dp.delta, "steps": last["step"],
                         "sampling": dp.sampling, "accountant": dp.accountant, "clip": dp.clip,
                         "noise": dp.noise, "clip_mode": dp.clip_mode, "microbatch": dp.microbatch,
                         "expected_batch": args.batch_size,
                         **({"target_epsilon": args.dp_epsilon} if getattr(args, "dp_epsilon", None) is not None
                            else {}),
                         **({"physical_batch": result.dp_physical_batch} if dp.sampling == "poisson" else
                            {"note": NOT_A_GUARANTEE})}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


#: The options of DP-SGD, by their key in ``args``, and their defaults (None: required).
DP_OPTIONS = {"dp_clip": None, "dp_noise": None, "dp_delta": 1e-5, "dp_sampling": "poisson", "dp_accountant": "rdp",
              "dp_physical_batch": None, "dp_clip_mode": "flat", "dp_microbatch": None}


def _dp_from_args(args):
    """``--dp-*`` as a :class:`bpjax.privacy.DPSGD`, None without ``--dp-clip``, or ValueError."""
    given = {k: getattr(args, k, None) for k in DP_OPTIONS}
    target = getattr(args, "dp_epsilon", None)
    if given["dp_clip"] is None:
        if target is not None or any(v is not None for v in given.values()):
            raise ValueError("expected --dp-clip with --dp-noise and --dp-delta (DP-SGD), got no --dp-clip")
        return None
    if target is not None:
        if given["dp_noise"] is not None:
            raise ValueError("expected --dp-noise or --dp-epsilon (the noise, or the epsilon to choose it for), "
                             "got both")
        if not target > 0:
            raise ValueError(f"expected --dp-epsilon > 0, got {target:g}")
        # the calibrated σ once the data is loaded (_calibrate_noise); until then a stand-in
        given["dp_noise"] = getattr(args, "dp_calibrated_noise", 1.0)
    if given["dp_noise"] is None:
        raise ValueError("expected --dp-noise (or --dp-epsilon) with --dp-clip (DP-SGD), got neither")
    if args.dtype != "float32":
        raise ValueError(f"expected --dtype float32 with --dp-clip (DP-SGD runs in float32), got --dtype {args.dtype}")
    micro = given["dp_microbatch"]
    if micro is not None:                            # a string: one sentence, not argparse's usage
        try:
            given["dp_microbatch"] = int(micro)
        except ValueError:
            raise ValueError(f"dp-sgd: expected --dp-microbatch to be an integer >= 1, got {micro!r}") from None
    dp = check_dpsgd(tuple(d if given[k] is None else given[k] for k, d in DP_OPTIONS.items()))
    if dp.microbatch is not None and dp.sampling == "shuffle" and args.batch_size % dp.microbatch:
        raise ValueError(f"dp-sgd: expected --dp-microbatch to divide --batch-size {args.batch_size}, "
                         f"got {dp.microbatch}")
    return dp


def _inspector(args, model, loss, data, out, main):
    """``--inspect``: an Inspector on the first 1024 training examples (at least the batch), or None."""
    if not getattr(args, "inspect", False):
        return None
    from ..train.inspect import Inspector
    b = min(max(args.batch_size, 1024), data.x_train.shape[0])
    plot = None if args.no_plot or not main else out / "inspect.png"
    return Inspector(model, loss, jnp.asarray(data.x_train[:b]), jnp.asarray(data.y_train[:b]),
                     batch_size=args.batch_size, plot_path=plot, seed=args.seed)


def _epoch_hooks(*hooks):
    """One epoch_hook running each given one (None: none) and merging their rows."""
    hooks = [h for h in hooks if h is not None]
    if len(hooks) < 2:
        return hooks[0] if hooks else None

    def run(epoch, params, state):
        row = {}
        for h in hooks:
            row.update(h(epoch, params, state))
        return row

    return run


def _grad_flow_hook(args, model, loss, data, out, main):
    """``--grad-flow``: a FlowRecorder on the first batch of the training set, or None."""
    if not getattr(args, "grad_flow", False):
        return None
    b = min(args.batch_size, data.x_train.shape[0])
    plot = None if args.no_plot or not main else out / "gradflow.png"
    return FlowRecorder(model, loss, jnp.asarray(data.x_train[:b]), jnp.asarray(data.y_train[:b]), plot)


def _health_hook(args, model, loss, data, out, main):
    """``--health``: a HealthRecorder on the first batch of the training set (process 0), or None;
    with ``--health-every K`` it also records every K steps (``recorder.at_step``)."""
    every = getattr(args, "health_every", None)
    if not (getattr(args, "health", False) or every) or not main:
        return None
    from ..train.health import HealthRecorder
    b = min(args.batch_size, data.x_train.shape[0])
    n_train = int(round(data.x_train.shape[0] * (1 - args.val_fraction)))
    return HealthRecorder(model, loss, jnp.asarray(data.x_train[:b]), jnp.asarray(data.y_train[:b]), out=out,
                          steps_per_epoch=max(n_train // b, 1), every=every, plot=not args.no_plot)


def _sanity(args, model, loss, data, say) -> None:
    """``--sanity``: the checks of :func:`bpjax.train.health.sanity_checks` on the run's initial
    params (drawn as ``fit`` draws them, from ``--seed``), one line each; the run is unchanged."""
    from ..train.health import sanity_checks
    k_init = jax.random.split(jax.random.PRNGKey(args.seed), 3)[0]       # as fit's _start_or_resume
    params, state, _ = model.init(k_init, data.in_shape)
    for r in sanity_checks(model, loss, data.x_train, data.y_train, params=params, state=state,
                           num_classes=data.num_classes):
        say(r.line)


def final_line(args, result: FitResult, out: pathlib.Path, seconds: float) -> str:
    """The one sentence ``bpjax train`` ends with: the test figure, the time (all of it, data and
    compiling included, and the training alone) and where the run is."""
    if "acc" in result.test:
        figure = f"{100 * result.test['acc']:.1f}% test accuracy"
    else:
        figure = f"test loss {result.test['loss']:.4g}"
    epochs = f"best epoch {result.best_epoch} of {len(result.history)}"
    return (f"bpjax train: {args.model} reached {figure} on {args.dataset} in {seconds:.0f} s "
            f"({result.seconds:.0f} s of training, {epochs}); the run is in {out} "
            f"(bpjax evaluate {out}; bpjax predict {out} X.npy --out Y.npy)")


def already_ended_line(result: FitResult, out: pathlib.Path) -> str:
    """What ``bpjax train --resume`` says of a run that had ended, which it leaves as it was."""
    why = f"early stop after epoch {len(result.history)}" if result.stopped_early else "all its epochs run"
    if "acc" in result.test:
        figure = f"{100 * result.test['acc']:.1f}% test accuracy"
    else:
        figure = f"test loss {result.test['loss']:.4g}"
    return (f"bpjax train: --resume: the run in {out} had ended ({why}); nothing changed: {figure}, best epoch "
            f"{result.best_epoch} of {len(result.history)} (bpjax evaluate {out})")


#: The options whose values define a run, by their key in run.json: ``--resume`` continues a run
#: only with the same values. ``--epochs`` joins them when the schedule depends on it (cosine);
#: with a constant schedule a run may be resumed with more epochs. Under DP-SGD its options join
#: them (the sampling, the accountant, the physical batch when given: it changes the sums' order).
#: What only says how to run it (``--devices``, ``--fsdp``, ``--patience``, ``--min-delta``,
#: progress, plot) may change.
DEFINING = {"model": "--model", "dataset": "--dataset", "seed": "--seed", "dtype": "--dtype",
            "batch_size": "--batch-size", "optimizer": "--optimizer", "lr": "--lr", "schedule": "--schedule",
            "weight_decay": "--weight-decay", "val_fraction": "--val-fraction", "epochs": "--epochs",
            "metrics_format": "--metrics-format", "bpjax_version": "the bpjax version",
            "dp_clip": "--dp-clip", "dp_noise": "--dp-noise", "dp_epsilon": "--dp-epsilon", "dp_delta": "--dp-delta",
            "dp_sampling": "--dp-sampling", "dp_accountant": "--dp-accountant",
            "dp_physical_batch": "--dp-physical-batch", "dp_clip_mode": "--dp-clip-mode",
            "dp_microbatch": "--dp-microbatch"}


def run_arguments(args) -> Dict[str, Any]:
    """The arguments that define the run of ``bpjax train`` ``args`` (keys of :data:`DEFINING`)."""

    defining = {k: getattr(args, k, None) for k in DEFINING if k not in ("epochs", "bpjax_version", "dp_epsilon")
                and k not in DP_OPTIONS}
    dp = _dp_from_args(args)
    if dp is not None:                               # DP-SGD's options only when it is on, defaults filled
        defining.update({k: v for k, v in zip(DP_OPTIONS, dp) if v is not None})
        if getattr(args, "dp_epsilon", None) is not None:
            defining["dp_epsilon"] = args.dp_epsilon     # and dp_noise is the σ chosen for it
    if args.schedule == "cosine":                    # the learning rate decays to 0 over --epochs
        defining["epochs"] = args.epochs
    defining["bpjax_version"] = __version__
    return defining


def loss_name(data: Dataset) -> str:
    """The loss ``bpjax train`` trains ``data`` with: cross-entropy for classification."""
    return "squared_error" if data.num_classes is None else "softmax_cross_entropy"


def _model_fits(model: str, dataset: str, data: Dataset, num_outputs: int) -> Optional[str]:
    """``None`` when ``model`` maps one example of ``data`` to ``num_outputs`` scores, else the
    one line that says so and names the models that do."""

    if output_shape(model, data.in_shape, num_outputs) == (num_outputs,):
        return None
    return (f"bpjax train: --model {model} does not fit --dataset {dataset} (examples of shape "
            f"{data.in_shape}, {num_outputs} output{'s' if num_outputs > 1 else ''}): expected one of "
            f"{', '.join(fitting(data.in_shape, num_outputs))}, got {model}")


def _prepare_run_dir(out: pathlib.Path, args) -> Optional[str]:
    """Make ``out`` ready for the run of ``args``, or say in one line why not: a folder holding a
    run is only continued with ``--resume`` (and the same defining arguments) or cleared with
    ``--overwrite``; two runs never mix in one folder."""

    if args.resume and args.overwrite:
        return "bpjax train: expected --resume or --overwrite, got both"
    if out.exists() and not out.is_dir():
        return f"bpjax train: expected --out to be a folder, got {out}, which is a file"
    if args.overwrite:
        try:
            runs.remove_run(out)
        except runs.RunError as e:
            return f"bpjax train: {e}"
    elif runs.holds_run(out) and not args.resume:
        return (f"bpjax train: {out} already holds a run; pass --resume to continue it or --overwrite to "
                f"replace it (or choose another --out)")
    elif args.resume and runs.holds_run(out):
        try:
            stored = runs.read_info(out, who="bpjax train --resume")
        except runs.RunError as e:
            return (f"{e}; pass --overwrite to start a new run there" if (out / runs.RUN_FILE).exists() else
                    f"bpjax train: --resume expected {out / runs.RUN_FILE} describing the run to continue, got "
                    f"none (a run of an older bpjax); pass --overwrite to start a new run there")
        differ = _differences(run_arguments(args), stored)
        if differ:
            return (f"bpjax train: --resume expected the arguments of the run in {out}, got "
                    + "; ".join(differ) + "; pass the run's values, or --overwrite to start a new run")
    out.mkdir(parents=True, exist_ok=True)
    return None


def _differences(now: Dict[str, Any], stored: Dict[str, Any]) -> List[str]:
    """``"--lr 0.05 (the run has 0.01)"`` for each defining argument that differs."""
    out = []
    for key, option in DEFINING.items():
        if key not in now and key not in stored:
            continue
        if key == "epochs" and (key not in now or key not in stored):
            continue                      # the schedules differ, which is named
        mine, theirs = now.get(key), stored.get(key)
        if key == "dp_clip_mode" and "dp_clip" in stored:
            theirs = stored.get(key, "flat")      # a DP run written before --dp-clip-mode clipped flat
        if mine != theirs:
            if key == "bpjax_version":
                out.append(f"bpjax {mine} (the run was written by bpjax {theirs})")
            else:
                out.append(f"{option} {mine} (the run has {theirs})")
    return out


def _agree_to_stop(stop: bool) -> bool:
    """Process 0's verdict on every process (one process: ``stop`` itself)."""
    if jax.process_count() == 1:
        return stop
    from jax.experimental import multihost_utils
    return bool(int(multihost_utils.broadcast_one_to_all(np.int32(stop))))


def _join_processes(args) -> bool:
    """With ``--coordinator``: join the other processes (:func:`bpjax.distributed.initialize`,
    which exits with one line after ``--init-timeout`` seconds). Returns whether this process
    prints and writes files (process 0, or the only process)."""

    if args.coordinator is None:
        if args.num_processes != 1 or args.process_id != 0:
            raise ValueError(f"expected --coordinator HOST:PORT with --num-processes and --process-id, got "
                             f"--num-processes {args.num_processes} --process-id {args.process_id} without it")
        return True
    _stdout_for_python_only()
    dist.initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.init_timeout, cli=True)
    return dist.is_main_process()


def _stdout_for_python_only() -> None:
    """Keep ``print`` on the terminal's stdout and send what C++ writes to file descriptor 1 to
    ``/dev/null``: gloo, JAX's CPU collectives, prints ``[Gloo] Rank 1 is connected to 1 peer
    ranks...`` there in every process, and process 1 should print nothing (errors go to stderr)."""
    sys.stdout.flush()
    python_stdout = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = os.fdopen(python_stdout, "w", buffering=1, encoding=sys.stdout.encoding, errors="replace")


def _mesh_from_args(args):
    """The mesh of ``--devices`` (``None``: one device). Across processes it is always one over
    every device of every process (each process must hold a part), which ``--devices`` may name."""

    if jax.process_count() > 1:
        if args.devices not in (None, jax.device_count()):
            raise ValueError(f"expected --devices {jax.device_count()} (every device of the "
                             f"{jax.process_count()} processes) or no --devices, got --devices {args.devices}")
        return dist.make_mesh(jax.device_count())
    return dist.make_mesh(args.devices) if args.devices else None


class _DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: ...)" after each option's help, unless the help already says what
    the default is or the default is ``None`` (an option left unset, which its help explains)."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_parser(subparsers) -> None:
    """``bpjax train`` as a subcommand of the ``bpjax`` parser."""

    p = subparsers.add_parser(
        "train", help="train a model on a dataset with the hand-written backward (default: a residual CNN on MNIST-1D)",
        description="Train a model on a dataset (generated or shipped locally, never downloaded) with "
                    "the hand-written backward: progress bar, metrics file, PNG of the curves, Orbax "
                    "checkpoints every epoch, exact --resume. Models: " + ", ".join(sorted(MODELS)) +
                    ". Datasets: " + ", ".join(sorted(DATASETS)) + ".",
        formatter_class=_DefaultsOnce)
    add_arguments(p)
    p.set_defaults(run=command)
