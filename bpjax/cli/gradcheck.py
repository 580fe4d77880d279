"""``bpjax gradcheck``: every built-in layer and loss, a user's factory, or any JAX function, checked against autodiff and finite differences."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import sys
import time
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import bpjax as bp

from ..check import cases, draw


def default_configs() -> dict:
    """The default case of every export ``bpjax gradcheck`` knows, by export name: the table's
    (:mod:`bpjax.check.cases`), so that the command checks what the tests know to build."""

    return cases.defaults()


def missing_defaults() -> list:
    """Exports of ``bpjax.LAYERS`` / ``bpjax.LOSSES`` that have no default case in the table."""

    known = default_configs()
    return [name for name in (*bp.LAYERS, *bp.LOSSES) if name not in known]


class FunctionCheck(NamedTuple):
    """How ``bpjax gradcheck module:function --args-shapes ...`` checks any JAX function with
    :func:`bpjax.check_vjp`: one shape per positional argument, and an optional reference."""

    args_shapes: tuple
    reference: Optional[Callable] = None


def run_check(label: str, obj, config, *, dtype, seed: int, methods: Sequence[str], rtol, directions: int):
    """Check one layer or loss with its case (a ``LayerCase``, ``LossCase`` or :class:`FunctionCheck`);
    returns a ``GradientReport`` titled ``label``."""


    if isinstance(config, FunctionCheck):
        shapes = [jax.ShapeDtypeStruct(s, dtype) for s in config.args_shapes]
        report = bp.check_vjp(obj, *shapes, reference=config.reference, seed=seed, rtol=rtol,
                              directions=directions)
        return dataclasses.replace(report, title=label)
    gen = np.random.default_rng(seed)
    common = dict(seed=seed, methods=tuple(methods), rtol=rtol, directions=directions)
    if isinstance(obj, bp.Loss):
        shape = (config.batch, *config.pred_shape)
        pred = draw.normal(gen, shape, dtype, config.pred_scale)
        target = config.target(gen, shape, dtype)
        report = bp.check_loss(obj, pred, target, **common)
    else:
        x = None
        if config.int_input is not None:
            x = jnp.asarray(gen.integers(0, config.int_input, (config.batch, *config.in_shape)))
        key = jax.random.key(seed, impl="rbg") if config.needs_key else None   # rbg: compiles fast
        report = bp.check_layer(obj, None if x is not None else config.in_shape, batch=config.batch,
                                dtype=dtype, x=x, key=key, train=config.train, **common)
    return dataclasses.replace(report, title=label)


def _load_target(spec: str):
    """``module:attr`` → the object; ``attr`` may be dotted (``pkg.mod:Class.factory``)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"bpjax gradcheck: expected a built-in name or module:factory, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())          # like `python -m`: modules in the working directory
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"bpjax gradcheck: expected an importable module in {spec!r}, got {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"bpjax gradcheck: expected {module_name} to define {attr}, got no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def _required_args(fn) -> int:
    """How many positional arguments ``fn`` cannot be called without (0 when it has no signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 0
    return sum(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _build(label: str, make):
    """The layer or loss a target names: ``make`` itself, or what calling it with no arguments returns."""
    if callable(make) and not isinstance(make, (bp.Layer, bp.Loss)) and _required_args(make):
        raise ValueError(f"bpjax gradcheck: expected --args-shapes (one shape per argument) for {label}, a function "
                         f"of {_required_args(make)} argument{'s' if _required_args(make) != 1 else ''}, got none "
                         f"(without it, a module:name target is a bpjax.Layer or bpjax.Loss, or a factory "
                         f"of no arguments)")
    obj = make() if callable(make) and not isinstance(make, (bp.Layer, bp.Loss)) else make
    if not isinstance(obj, (bp.Layer, bp.Loss)):
        raise ValueError(f"bpjax gradcheck: expected {label} to be or to return a bpjax.Layer or bpjax.Loss, "
                         f"got {type(obj).__name__}")
    return obj


def _function_check(spec: str, args) -> tuple:
    """The function ``spec`` names and its :class:`FunctionCheck`, or a usage error."""

    shapes = tuple(_parse_arg_shape(t) for t in args.args_shapes)
    fn = _load_target(spec)
    ref = _load_target(args.reference) if args.reference else None
    for label, obj in ((spec, fn), (args.reference, ref)):
        if obj is not None and (isinstance(obj, (bp.Layer, bp.Loss)) or not callable(obj)):
            raise ValueError(f"bpjax gradcheck: expected {label} to be a JAX function for --args-shapes "
                             f"(a layer takes --in-shape), got {type(obj).__name__}")
        try:
            if obj is not None:
                inspect.signature(obj).bind(*shapes)
        except TypeError as e:
            raise ValueError(f"bpjax gradcheck: expected --args-shapes to match the arguments of {label}, "
                             f"got {len(shapes)} shape{'s' if len(shapes) != 1 else ''} ({e})") from None
        except ValueError:                       # no signature to read: let the call say
            pass
    return fn, FunctionCheck(shapes, ref)


def _parse_arg_shape(text: str) -> tuple:
    """``3,4`` or ``3x4`` → (3, 4); ``scalar`` or ``()`` → (); anything else a usage error."""
    if text.strip() in ("scalar", "()"):
        return ()
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        shape = None
    if not shape or any(d < 0 for d in shape):
        raise ValueError(f"bpjax gradcheck: expected --args-shapes like 3,4 or scalar, got {text!r}")
    return shape


def _parse_shape(text: str) -> tuple:
    try:
        return tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 5 or 4,4,3, got {text!r}") from None


def _gradcheck(args) -> int:

    try:
        dtype = jnp.dtype(args.dtype)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in ("float64", "float32", "float16", "bfloat16"):
        print(f"bpjax gradcheck: expected --dtype float64, float32, float16 or bfloat16, got {args.dtype!r}",
              file=sys.stderr)
        return 2
    jax.config.update("jax_enable_x64", True)     # finite differences are in float64


    out = sys.stdout
    defaults = default_configs()
    jobs = []                                     # (label, layer or loss, case)
    try:
        if not args.targets:
            missing = missing_defaults()
            if missing:
                print(f"bpjax gradcheck: no default configuration for {', '.join(missing)}: add a case with "
                      f"default=True per export to the table in {os.path.dirname(cases.__file__)}",
                      file=sys.stderr)
                return 2
            names = [*bp.LAYERS, *bp.LOSSES]
        else:
            names = args.targets
        plain = [n for n in names if ":" not in n]
        if args.args_shapes is not None and plain or args.reference and args.args_shapes is None:
            raise ValueError(f"bpjax gradcheck: expected --args-shapes (and --reference) only with module:function "
                             f"targets, got {', '.join(plain) or '--reference without --args-shapes'}")
        for name in names:
            if ":" in name and args.args_shapes is not None:           # any JAX function: check_vjp
                jobs.append((name, *_function_check(name, args)))
            elif ":" in name:
                obj = _build(name, _load_target(name))
                if args.in_shape is None:
                    raise ValueError(f"bpjax gradcheck: expected --in-shape (one example's shape) for {name}, "
                                     f"got none")
                shape = args.in_shape[0] if len(args.in_shape) == 1 else tuple(args.in_shape)
                if isinstance(obj, bp.Loss):
                    config = cases.LossCase(name, lambda obj=obj: obj, shape, draw.TARGETS[args.target],
                                            batch=args.batch or 4)
                else:
                    config = cases.LayerCase(name, lambda obj=obj: obj, shape, batch=args.batch or 3,
                                             int_input=args.int_input, needs_key=args.key, train=not args.eval)
                jobs.append((name, obj, config))
            elif name in defaults:
                config = defaults[name]
                if args.batch:
                    config = dataclasses.replace(config, batch=args.batch)
                jobs.append((name, _build(name, config.make), config))
            else:
                raise ValueError(f"bpjax gradcheck: expected a built-in layer or loss "
                                 f"(one of {', '.join(sorted(defaults))}) or module:factory, got {name!r}")
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not methods or set(methods) - {"vjp", "fd", "jvp"}:
        print(f"bpjax gradcheck: expected --methods among vjp,fd,jvp, got {args.methods!r}", file=sys.stderr)
        return 2
    verbose = args.verbose or len(jobs) == 1
    failed, start = [], time.time()
    for label, obj, config in jobs:
        try:
            report = run_check(label, obj, config, dtype=dtype, seed=args.seed, methods=methods,
                               rtol=args.rtol, directions=args.directions)
        except Exception as e:                    # a check that cannot run is a failure, named
            print(f"ERROR {label}: {type(e).__name__}: {e}", file=out)
            failed.append(label)
            continue
        if verbose or not report.ok:
            print(report, file=out)
            print(file=out)
        else:
            print(report.summary(), file=out)
        if not report.ok:
            failed.append(label)
        out.flush()
    n = len(jobs)
    verdict = f"{len(failed)} of {n} failed: {', '.join(failed)}" if failed else f"all {n} passed"
    print(f"bpjax gradcheck: {n} check{'s' if n != 1 else ''} in {dtype.name}, {verdict} "
          f"({time.time() - start:.1f} s)", file=out)
    return 1 if failed else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "gradcheck", help="check hand-written gradients against autodiff (vjp), finite differences and forward mode (jvp)",
        description="Check every built-in layer and loss, the ones named, or a user's module:factory "
                    "(a bpjax.Layer or bpjax.Loss, or a function of no arguments returning one); with "
                    "--args-shapes, any JAX function module:function (bp.check_vjp). "
                    "Prints the table; exits 1 on any failure, 2 on a usage error.")
    p.add_argument("targets", nargs="*", metavar="TARGET",
                   help="built-in export names (default: all) or module:factory")
    p.add_argument("--in-shape", type=_parse_shape, action="append", metavar="SHAPE",
                   help="one example's shape for module:factory targets, e.g. 5 or 8,8,3 "
                        "(repeat it for a layer taking a tuple of inputs; for a loss: the prediction's)")
    p.add_argument("--args-shapes", nargs="+", default=None, metavar="SHAPE",
                   help="module:function targets: check any JAX function (e.g. a jax.custom_vjp) with "
                        "bp.check_vjp at random arguments of these shapes, one per positional argument "
                        "(e.g. 3,4 4; 'scalar' for ())")
    p.add_argument("--reference", default=None, metavar="MODULE:FUNCTION",
                   help="with --args-shapes: a plain JAX function computing the same primal, whose "
                        "autodiff is a second reference")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 3 for layers, 4 for losses)")
    p.add_argument("--dtype", default="float64", help="float64 (default), float32, float16 or bfloat16")
    p.add_argument("--methods", default="vjp,fd,jvp", help="comma-separated references (default vjp,fd,jvp)")
    p.add_argument("--rtol", type=float, default=None, help="override every reference's tolerance")
    p.add_argument("--directions", type=int, default=3, help="random directions per leaf for fd and jvp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--int-input", type=int, default=None, metavar="V",
                   help="module:factory layers: x is integer ids in [0, V) (embeddings)")
    p.add_argument("--key", action="store_true", help="module:factory layers: pass a PRNG key to forward")
    p.add_argument("--eval", action="store_true", help="module:factory layers: forward with train=False")
    p.add_argument("--target", default="normal", choices=("normal", "labels", "probs", "binary"),
                   help="module:factory losses: how to draw the target (bpjax.check.draw.TARGETS)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every table, not only failing ones")
    p.set_defaults(run=_gradcheck)
