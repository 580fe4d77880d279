"""Gradient checking: a hand-written backward against three independent references.

For every parameter leaf and for ``dx`` a check compares the hand-written gradient with

1. ``vjp``: ``jax.vjp`` of the same forward, pulled back along a random cotangent ``dy``
   (never all ones: ones hide bugs that cancel);
2. ``fd``: central finite differences in float64 along random directions ``v``, with the
   step chosen automatically, plus a Taylor-remainder test that needs no step: the
   first-order remainder ``|g(θ + h v) − g(θ) − h ⟨∇g, v⟩|`` of ``g = ⟨f(θ), dy⟩`` shrinks
   like ``h²`` when the gradient is right and only like ``h`` when it is wrong; the report
   gives the observed order;
3. ``jvp``: forward mode, ``⟨dy, J v⟩`` from ``jax.jvp`` against ``⟨grad, v⟩``.

The directions ``v`` touch one leaf at a time, so a failure points at the leaf that is wrong.
Only the forward passes are differentiated here; this module (like ``_reference.py``) is
allowed to use JAX autodiff because it is the checker, not a backward.

This module holds the front-ends: each says what the forward is, what the hand-written
gradient is and how to name the inputs, and hands them to :func:`._gradcheck_engine.run`,
which runs the parts of every check: draw (``_gradcheck_draw``), references
(``_gradcheck_refs``), finite differences with the Taylor order (``_gradcheck_fd``), compare
(``_gradcheck_compare``) and report (``_gradcheck_report``). :func:`bpjax.check_vjp`
(``_checkvjp``) is one more front-end, for any JAX function.
"""
from __future__ import annotations

import contextlib
from typing import Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from .._core import Layer, Loss, check_is_layer, check_is_loss, check_model_and_loss, shapes_reported
from .._grad import cast_floating, is_floating, value_and_grad
from .compare import TOLERANCES  # noqa: F401  (the default tolerances, documented here)
from .draw import default_dtype as _default_dtype
from .draw import fill_params as _fill_params
from .draw import lowest_float as _lowest_float
from .engine import run as _run
from .refs import x64 as _x64
from .report import METHODS, Comparison, GradientReport

__all__ = ["Comparison", "GradientReport", "check_layer", "check_model", "check_loss",
           "assert_gradients_close", "per_example_grads"]


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


# ----------------------------------------------------------------------------- public API


def _example_shapes(name: str, in_shape, x):
    if in_shape is None:
        if x is None:
            raise ValueError(f"{name}: expected in_shape (one example's shape) or x, got neither")
        return jax.tree_util.tree_map(lambda a: tuple(a.shape[1:]), x)
    if isinstance(in_shape, (int, np.integer)):
        return (int(in_shape),)
    in_shape = tuple(in_shape)
    if in_shape and all(isinstance(s, (tuple, list)) for s in in_shape):
        return tuple(tuple(int(d) for d in s) for s in in_shape)     # a tuple-input layer
    return tuple(int(d) for d in in_shape)


def check_layer(layer: Layer, in_shape=None, *, batch: int = 3, dtype=None, params=None, state=None,
                x=None, key=None, train: bool = True, seed: int = 0,
                methods: Sequence[str] = METHODS, rtol: Union[None, float, Mapping[str, float]] = None,
                atol: Optional[float] = None, directions: int = 3, cotangent=None, jit: bool = True,
                fd_dtype=jnp.float64, min_order: Optional[float] = 1.5) -> GradientReport:
    """Check a layer's hand-written ``backward`` against ``jax.vjp``, finite differences and ``jax.jvp``.

    Works with any :class:`bpjax.Layer`, built with :func:`bpjax.make_layer` or not. The forward
    ``y = layer.forward(params, state, x, key=key, train=train)[0]`` is differentiated with
    respect to ``params`` and ``x`` (``x`` only when floating point); ``state`` and ``key`` are
    held fixed. The check itself runs eagerly (it returns a report of Python numbers): each
    call compiles one program, at XLA optimisation level 0, holding the hand-written
    gradient and the references. A reference that does not apply to the forward (``jax.jvp``
    of a ``custom_vjp``) is reported as skipped.

    Args:
        layer: the layer to check.
        in_shape: one example's shape, without the batch axis (a tuple of shapes for a layer
            that takes a tuple of inputs). May be omitted when ``x`` is given.
        batch: N, the batch size of the drawn ``x`` (N, *in_shape).
        dtype: dtype of params, state and x (default float64 when x64 is enabled, else float32).
            It sets the default tolerances (``rtol`` of vjp/jvp, of fd, and the floor)::

                float64   1e-8, 1e-6, 1e-4         float16    2e-2, 5e-2, 0.2
                float32   1e-4, 1e-3, 1e-2         bfloat16   1e-1, 1e-1, 0.5
        params, state: values to check at. By default the structure comes from ``layer.init``
            (traced only) and values are drawn on the host: leaves of rank ≥ 2 ~ N(0, 1/fan_in),
            others and state ~ U(0.5, 1.5): non-degenerate (no zeros, no identical rows).
        x: the input (N, ...), default N(0, 1). Integer inputs (ids) are not differentiated.
        key: the PRNG key passed to ``forward`` (dropout); fixed across all evaluations.
        train: passed to ``forward``.
        seed: seeds the host draws of params, x, the cotangent and the directions.
        methods: a subset of ``("vjp", "fd", "jvp")``.
        rtol: a float for every reference, or a mapping such as ``{"fd": 1e-5, "floor": 1e-3}``.
        atol: a row also passes when ``max_abs <= atol``.
        directions: random directions per leaf for ``fd`` and ``jvp``.
        cotangent: the upstream gradient dy, shaped like y (default N(0, 1); ones hide bugs).
        jit: run the hand-written backward under ``jax.jit`` (references are always jitted).
        fd_dtype: dtype of the finite differences; anything below float64 warns.
        min_order: ``fd`` fails when the observed Taylor order is below this where the remainder
            still exceeds the tolerance at the smallest step (None: report the order only).

    Returns:
        A :class:`GradientReport`; print it for the table, test ``.ok``.
    """
    name = "check_layer"
    check_is_layer(name, None, layer)
    dtype = jnp.dtype(dtype or _default_dtype())
    gen = np.random.default_rng(seed + 7919)
    shapes = _example_shapes(name, in_shape, x)
    with (_x64() if dtype == jnp.float64 else contextlib.nullcontext()):
        if params is None or state is None:
            p_struct, s_struct = jax.eval_shape(lambda k: layer.init(k, shapes)[:2], jax.random.PRNGKey(0))
            params = _fill_params(p_struct, gen, dtype, state=False) if params is None else params
            state = _fill_params(s_struct, gen, dtype, state=True) if state is None else state
        params, state = cast_floating(params, dtype), cast_floating(state, dtype)
        if x is None:
            is_tuple = bool(shapes) and isinstance(shapes[0], tuple)
            draw = lambda s: jnp.asarray(gen.standard_normal((batch, *s)), dtype)
            x = tuple(draw(s) for s in shapes) if is_tuple else draw(shapes)
        else:
            x = cast_floating(jax.tree_util.tree_map(jnp.asarray, x), dtype)

    def fn(trees, aux):
        p, xx = trees
        return layer.forward(p, aux["state"], xx, key=aux["key"], train=train)[0]

    def manual(trees, aux, dy):
        p, xx = trees
        _, _, res = layer.forward(p, aux["state"], xx, key=aux["key"], train=train)
        return layer.backward(p, res, dy)

    xs = ", ".join(f"{_dtype_name(a.dtype)}{list(a.shape)}" for a in jax.tree_util.tree_leaves(x))
    details = f"{dtype.name} · x {xs} · {'random' if cotangent is None else 'given'} cotangent dy"
    title = f"check_layer({_layer_name(layer)})"
    with shapes_reported(layer):
        return _run(name, title, fn, manual, [("dparams", params), ("dx", x)], {"state": state, "key": key},
                    dtype=dtype, methods=methods, rtol=rtol, atol=atol, directions=directions, seed=seed,
                    cotangent=cotangent, jit=jit, fd_dtype=fd_dtype, min_order=min_order, details=details)


def check_model(model: Layer, loss: Loss, params, state, x, target, *, key=None, train: bool = True,
                seed: int = 0, methods: Sequence[str] = METHODS,
                rtol: Union[None, float, Mapping[str, float]] = None, atol: Optional[float] = None,
                directions: int = 3, cotangent=None, jit: bool = True, fd_dtype=jnp.float64,
                min_order: Optional[float] = 1.5) -> GradientReport:
    """Check the gradients of a whole model under a loss: ``dparams`` and ``dx`` of the loss value.

    The hand-written side is the classic algorithm of :func:`bpjax.value_and_grad`, seeded
    with a random ``dvalue`` (not 1); the references differentiate
    ``loss.forward(model.forward(params, state, x)[0], target)[0]``.

    Args:
        model, loss: what to check.
        params, state: the model's params and state (their float dtype sets the tolerances).
        x: the input batch (N, ...); integer inputs are not differentiated.
        target: the loss target, held fixed.
        key, train: passed to ``model.forward``.
        seed, methods, rtol, atol, directions, jit, fd_dtype, min_order: as in :func:`check_layer`.
        cotangent: the scalar ``dvalue`` (default ±U(0.5, 1.5)).

    Returns:
        A :class:`GradientReport`.
    """
    name = "check_model"
    check_model_and_loss(name, model, loss)
    x = jax.tree_util.tree_map(jnp.asarray, x)
    target = jnp.asarray(target)
    dtype = _lowest_float([params, x])

    def fn(trees, aux):
        p, xx = trees
        y = model.forward(p, aux["state"], xx, key=aux["key"], train=train)[0]
        return loss.forward(y, aux["target"])[0]

    def manual(trees, aux, dvalue):
        p, xx = trees
        y, _, res = model.forward(p, aux["state"], xx, key=aux["key"], train=train)
        _, loss_res = loss.forward(y, aux["target"])
        return model.backward(p, res, loss.backward(loss_res, dvalue))

    xs = ", ".join(f"{_dtype_name(a.dtype)}{list(a.shape)}" for a in jax.tree_util.tree_leaves(x))
    details = f"{_why_dtype(dtype, params, x)} · x {xs} · {'random' if cotangent is None else 'given'} dvalue"
    title = f"check_model({_layer_name(model)}, {_layer_name(loss)})"
    with shapes_reported(model):
        return _run(name, title, fn, manual, [("dparams", params), ("dx", x)],
                    {"state": state, "key": key, "target": target},
                    dtype=dtype, methods=methods, rtol=rtol, atol=atol, directions=directions, seed=seed,
                    cotangent=cotangent, jit=jit, fd_dtype=fd_dtype, min_order=min_order, details=details)


def check_loss(loss: Loss, pred, target, *, seed: int = 0, methods: Sequence[str] = METHODS,
               rtol: Union[None, float, Mapping[str, float]] = None, atol: Optional[float] = None,
               directions: int = 3, cotangent=None, jit: bool = True, fd_dtype=jnp.float64,
               min_order: Optional[float] = 1.5) -> GradientReport:
    """Check a loss's hand-written ``backward`` (``dpred``) at ``pred`` (N, ...) and ``target``.

    Args:
        loss: the loss to check.
        pred: predictions (N, ...); their dtype sets the tolerances.
        target: held fixed (labels, probabilities, values).
        seed, methods, rtol, atol, directions, jit, fd_dtype, min_order: as in :func:`check_layer`.
        cotangent: the scalar ``dvalue`` (default ±U(0.5, 1.5), not 1).

    Returns:
        A :class:`GradientReport` with one gradient, ``dpred``.
    """
    name = "check_loss"
    check_is_loss(name, None, loss)
    pred, target = jnp.asarray(pred), jnp.asarray(target)

    def fn(trees, aux):
        return loss.forward(trees[0], aux["target"])[0]

    def manual(trees, aux, dvalue):
        _, res = loss.forward(trees[0], aux["target"])
        return (loss.backward(res, dvalue),)

    details = (f"{_dtype_name(pred.dtype)} · pred {list(pred.shape)} · target "
               f"{_dtype_name(target.dtype)}{list(target.shape)} · {'random' if cotangent is None else 'given'} dvalue")
    return _run(name, f"check_loss({_layer_name(loss)})", fn, manual, [("dpred", pred)], {"target": target},
                dtype=pred.dtype, methods=methods, rtol=rtol, atol=atol, directions=directions, seed=seed,
                cotangent=cotangent, jit=jit, fd_dtype=fd_dtype, min_order=min_order, details=details)


def assert_gradients_close(checked, *args, **kwargs) -> GradientReport:
    """Raise ``AssertionError`` with the report's table as its message unless every gradient passes.

    ``checked`` is a :class:`GradientReport`, or a :class:`bpjax.Layer` (then the arguments are
    those of :func:`check_layer`), or a :class:`bpjax.Loss` (those of :func:`check_loss`).
    For a model under a loss, pass ``check_model(...)``'s report. Returns the report.
    """
    if isinstance(checked, GradientReport):
        if args or kwargs:
            raise TypeError("assert_gradients_close: expected no further arguments with a "
                            f"GradientReport, got {len(args)} positional and {sorted(kwargs)}")
        report = checked
    elif isinstance(checked, Layer):
        report = check_layer(checked, *args, **kwargs)
    elif isinstance(checked, Loss):
        report = check_loss(checked, *args, **kwargs)
    else:
        raise TypeError(f"assert_gradients_close: expected a GradientReport, bpjax.Layer or bpjax.Loss, "
                        f"got {type(checked).__name__}")
    if not report.ok:
        raise AssertionError("hand-written gradients differ from the references\n" + str(report))
    return report


def per_example_grads(model: Layer, loss: Loss):
    """Per-example gradients from the hand-written backward, vmapped over the batch.

    Each example is run through :func:`bpjax.value_and_grad` as a batch of one, and
    ``jax.vmap`` maps that over the batch axis, so the result equals
    ``jax.vmap(jax.grad(per_example_loss))`` (e.g. for differentially private training:
    clip each example's gradient, then average).

    Returns:
        ``f(params, state, x, target, *, key=None) -> grads``, where every leaf of ``grads`` has
        shape ``(N, *param.shape)``: the gradient of the loss of example ``n`` alone
        (x[n:n+1], target[n:n+1]). ``state`` is shared by all examples and not updated (layers
        that normalise over the batch see a batch of one). With ``key``, example n gets
        ``jax.random.split(key, N)[n]``. Jittable.
    """
    check_model_and_loss("per_example_grads", model, loss)
    vg = value_and_grad(model, loss)

    def one(params, state, x1, t1, k):
        add_batch = lambda a: a[None]
        _, grads = vg(params, state, jax.tree_util.tree_map(add_batch, x1), add_batch(t1), key=k)
        return grads

    def f(params, state, x, target, *, key=None):
        n = jax.tree_util.tree_leaves(x)[0].shape[0]
        keys = None if key is None else jax.random.split(key, n)
        return jax.vmap(one, in_axes=(None, None, 0, 0, None if key is None else 0))(
            params, state, x, target, keys)

    return f


def _why_dtype(dtype, params, x) -> str:
    """The dtype check_model ran in, and, when float64 exists but was not used, why."""
    if not jax.config.jax_enable_x64 or dtype == jnp.float64:
        return dtype.name
    low = [n for n, t in (("params", params), ("x", x))
           if any(is_floating(a) and jnp.dtype(a.dtype) == dtype for a in jax.tree_util.tree_leaves(t))]
    return (f"{dtype.name} (x64 is on, but {' and '.join(low) or 'the inputs'} "
            f"{'are' if len(low) != 1 or low[0] == 'params' else 'is'} {dtype.name}: "
            f"cast with bp.cast_floating(tree, jnp.float64) to check in float64)")


def _layer_name(obj) -> str:
    """The name of a layer or loss: its ``name`` (make_layer's and make_loss's). A ``bp.Layer``
    or ``bp.Loss`` built by hand has the default name; it is called after the factory that
    defined its functions (README's ``scale``), or after its type (``Layer``) for functions
    defined at module level."""
    if obj.name != type(obj)._field_defaults["name"]:
        return obj.name
    qualname = getattr(obj[0], "__qualname__", "") or ""
    head = qualname.split(".")[0] if "." in qualname else ""   # a factory's name, not a bare function's
    return head if head and head != "<lambda>" else type(obj).__name__
