"""The layer and loss protocols: what a layer and a loss are, how to build one, and the hooks.

A layer is three pure functions (``init``, ``forward``, ``backward``) and its name; a loss is
two (``forward``, ``backward``) and its name. ``make_layer`` and ``make_loss`` wrap the raw
functions a layer author writes with the checks every layer needs (``_checks.py``), so that
bad input is caught in ``forward``, at trace time, with a message that names the layer, what
it expected and what it got; and they hand every call to the instrumentation that is switched
on (:class:`Hook`: ``bpjax.check_finite``, ``bpjax.observe``), if any.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, NamedTuple, Optional, Protocol, Union

import jax
import jax.numpy as jnp

from ._checks import (abstract_init, check_float_input, check_in_shape, check_key, check_ndim, check_tree,
                      check_tuple_input, check_x, describe, initialised_for, is_tuple_of_shapes, tuple_of_shapes)

PyTree = Any


class Layer(NamedTuple):
    """A layer: three pure functions over parameter pytrees, and its name.

    ``init(key, in_shape) -> (params, state, out_shape)``
        ``in_shape`` is one example's shape, without the batch axis. ``state`` is ``()``
        for stateless layers (running statistics live here).
    ``forward(params, state, x, *, key=None, train=True) -> (y, new_state, res)``
        ``x`` has a leading batch axis. ``res`` (the residuals, CS231n's cache) holds the
        arrays ``backward`` needs, and only arrays.
    ``backward(params, res, dy) -> (dparams, dx)``
        ``dparams`` has exactly the structure, shapes and dtypes of ``params``.
    ``name``
        What messages and reports call it (``dense``): the name given to :func:`make_layer`;
        ``"layer"`` for a ``Layer(init, forward, backward)`` built by hand.
    """

    init: Callable[..., tuple]
    forward: Callable[..., tuple]
    backward: Callable[..., tuple]
    name: str = "layer"


class Loss(NamedTuple):
    """A loss: two pure functions, its name, and the rule of its Hessian.

    ``forward(pred, target) -> (value, res)``: ``value`` is a scalar, the mean over examples.
    ``backward(res, dvalue=1.0) -> dpred``: the error at the output, shaped like ``pred``.
    ``name``: the name given to :func:`make_loss` (``"loss"`` for a ``Loss`` built by hand).
    ``hessian``: the rule by which ``bpjax.curvature`` knows its Hessian in ``pred`` (the name
    given to ``make_loss(..., hessian=...)``), or None: none known.
    """

    forward: Callable[..., tuple]
    backward: Callable[..., Any]
    name: str = "loss"
    hessian: Optional[str] = None


# ----------------------------------------------------------------------------- the hooks


class LayerToken:
    """One layer made by :func:`make_layer`, as the hooks see it. Compared with ``is``: a hook
    matches a layer's backward with its forward by it. ``per_example`` and ``curvature`` are the
    rules the layer's factory named (``make_layer(..., per_example=..., curvature=...)``), or None;
    ``example_rows`` the function the ``"columns"`` and ``"projections"`` rules call, or None."""

    __slots__ = ("per_example", "curvature", "example_rows")

    def __init__(self, per_example: Optional[str], curvature: Optional[str] = None,
                 example_rows: Optional[Callable] = None):
        self.per_example, self.curvature, self.example_rows = per_example, curvature, example_rows


class _Calls(Protocol):
    """The calls every hook takes (see :class:`Hook`)."""

    def layer_forward(self, name: str, token: LayerToken, forward: Callable, params: PyTree, state: PyTree, x,
                      *, key, train: bool) -> tuple:
        """``forward(params, state, x, key=key, train=train)``: ``(y, new_state, res)``."""

    def loss_forward(self, name: str, forward: Callable, pred, target) -> tuple:
        """``forward(pred, target)``: ``(value, res)``."""

    def loss_backward(self, name: str, backward: Callable, res, dvalue):
        """``backward(res, dvalue)``: ``dpred``."""


class Hook(_Calls, Protocol):
    """Instrumentation that :func:`make_layer` and :func:`make_loss` hand every call to while it
    is switched on: the last hook in ``_HOOKS``. With none on, they run the raw functions.

    Each method gets the layer's or loss's ``name``, its raw function and that function's
    arguments; it runs the function (around it: what it instruments) and returns what the
    function returns. ``token`` (a :class:`LayerToken`) is the layer's identity. ``make_layer``
    checks what ``layer_backward`` returns (a pair; dparams cast to params' dtypes) after it.

    The hooks: ``bpjax.check_finite``'s (``check/finite.py``, a :class:`Hook`), ``bpjax.observe``'s
    and ``clipped_grad``'s replay (``_observe.py``, ``_per_example.py``, each a
    :class:`FinishingHook`). A hook may also have ``labels(name, target, num_classes)``:
    ``softmax_cross_entropy`` hands it integer labels that are known only when the compiled
    function runs (``check_finite`` checks them there).
    """

    def layer_backward(self, name: str, token: LayerToken, backward: Callable, params: PyTree, res, dy) -> tuple:
        """``backward(params, res, dy)``: ``(dparams, dx)``."""


class FinishingHook(_Calls, Protocol):
    """A :class:`Hook` that runs ``make_layer``'s checks of a backward's result itself (``bpjax.observe``
    unwraps what sub-layers carried out of a scan first): it has ``layer_backward_checked``
    in place of ``layer_backward``, and ``make_layer`` calls that when it is there."""

    def layer_backward_checked(self, name: str, token: LayerToken, backward: Callable, finish: Callable,
                               params: PyTree, res, dy) -> tuple:
        """``finish(params, backward(params, res, dy))``: ``(dparams, dx)``, dparams cast to params' dtypes."""


#: The hooks switched on, innermost last (``bpjax.check_finite`` pushes one while it traces,
#: ``bpjax._observe.observe`` one that sees every layer's backward); empty otherwise, and then
#: the layers run their raw functions directly.
_HOOKS: list[Union[Hook, FinishingHook]] = []


#: The backwards of the layers that a gradient check (``check_layer``, ``check_model``) is
#: checking: their report shows a ``dparams`` leaf of the wrong shape as a failed row, next to
#: every other leaf's comparison, so ``make_layer`` does not raise for it (see
#: :func:`shapes_reported`). Layers inside them still raise, naming the layer.
_SHAPES_REPORTED: set = set()


@contextlib.contextmanager
def shapes_reported(layer: Layer):
    """While in this block, ``layer``'s own backward returns ``dparams`` of any shape, for a
    gradient check to report."""
    _SHAPES_REPORTED.add(layer.backward)
    try:
        yield
    finally:
        _SHAPES_REPORTED.discard(layer.backward)


# ----------------------------------------------------------------------------- is it a layer?


def _got(obj) -> str:
    """What ``obj`` is, for a message: ``function relu``, ``int``."""
    fn = getattr(obj, "__name__", None)
    return f"{type(obj).__name__} {fn}" if callable(obj) and fn else type(obj).__name__


def _uncalled_hint(obj, kind: str = "layer") -> str:
    """What a function given where a layer (``kind="layer"``) or a loss was expected probably is:
    bpjax's factory, or a user's factory of no arguments, not called (`` (did you forget to call
    the factory, e.g. dense(...) rather than dense?)``); or a plain function of the arrays
    (``lambda y, t: ...``), which needs ``make_layer`` / ``make_loss`` and a hand-written backward."""
    fn = getattr(obj, "__name__", None)
    if not callable(obj) or not fn or isinstance(obj, (Layer, Loss)):
        return ""
    try:
        needs = sum(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                    for p in inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        needs = 0
    ours = (getattr(obj, "__module__", None) or "").split(".")[0] == "bpjax"
    if needs and not ours:
        make = "bp.make_layer(name, init, forward, backward)" if kind == "layer" else \
            "bp.make_loss(name, forward, backward)"
        return (f" (a plain function is not a {kind}: a bpjax.{kind.title()} carries its hand-written backward; "
                f"build one with {make}, or use a built-in {kind})")
    return f" (did you forget to call the factory, e.g. {fn}({'...' if needs else ''}) rather than {fn}?)"


def check_is_layer(name: str, arg: Optional[str], obj, *, position: Optional[int] = None) -> None:
    """Raise ``TypeError`` unless ``obj`` is a :class:`Layer`; an uncalled factory is named.
    ``position``: ``obj`` is the layer at that position of a combinator's layers."""
    if isinstance(obj, Layer):
        return
    hint = _uncalled_hint(obj)
    if position is not None:
        raise TypeError(f"{name}: expected a bpjax.Layer at position {position}, got {type(obj).__name__}{hint}")
    what = f"{arg} to be a bpjax.Layer" if arg else "a bpjax.Layer"
    raise TypeError(f"{name}: expected {what}, got {_got(obj)}{hint}")


def check_is_loss(name: str, arg: Optional[str], obj) -> None:
    """Raise ``TypeError`` unless ``obj`` is a :class:`Loss`; an uncalled factory is named
    (``bp.softmax_cross_entropy`` rather than ``bp.softmax_cross_entropy()``)."""
    if isinstance(obj, Loss):
        return
    hint = _uncalled_hint(obj, "loss")
    what = f"{arg} to be a bpjax.Loss" if arg else "a bpjax.Loss"
    raise TypeError(f"{name}: expected {what}, got {_got(obj)}{hint}")


def check_model_and_loss(name: str, model, loss) -> None:
    """The checks of a (model, loss) pair that ``value_and_grad``, the gradient checks and
    ``fit`` share: ``TypeError`` naming ``name`` unless ``model`` is a :class:`Layer` and
    ``loss`` a :class:`Loss`, with the hint for a factory that was not called."""
    check_is_layer(name, "model", model)
    check_is_loss(name, "loss", loss)


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
    """Every leaf of ``tree`` cast to the dtype of the matching leaf of ``like``."""
    return jax.tree_util.tree_map(lambda a, b: jnp.asarray(a).astype(jnp.result_type(b)), tree, like)


# ----------------------------------------------------------------------------- factories


def make_layer(
    name: str,
    init: Callable,
    forward: Callable,
    backward: Callable,
    *,
    check: Optional[Callable] = None,
    min_ndim: int = 1,
    ndim: Optional[int] = None,
    meaning: str = "",
    float_input: bool = True,
    tuple_input: bool = False,
    passes_tuples: bool = False,
    per_example: Optional[str] = None,
    curvature: Optional[str] = None,
    example_rows: Optional[Callable] = None,
) -> Layer:
    """Build a :class:`Layer` from raw functions, adding the checks every layer shares.

    ``forward`` then checks, in order, at trace time: that ``key``, if given, is one PRNG key;
    that ``x`` is a floating-point array
    (unless ``float_input=False``) of the right rank; that ``params`` and ``state`` have the
    structure ``init`` gives for ``x.shape[1:]`` (``TypeError`` showing both); the layer's
    own ``check(params, state, x)``; and finally every leaf's shape. ``backward`` checks that
    ``dparams`` has the tree and every leaf's shape of ``params`` (``ValueError`` naming the
    leaf) and casts it to the dtypes of ``params``; the combinators check each layer's ``dx``
    against the shape and dtype of the input it was given.

    With ``tuple_input=True`` (the joins: ``concat``, ``add``) ``x`` is a non-empty tuple
    (or list, taken as a tuple) of arrays: each element gets the dtype and rank checks, all
    must share the batch size, and ``init`` takes a tuple of per-example shapes,
    ``tuple(e.shape[1:] for e in x)``. ``backward`` then returns ``dx`` as a tuple.
    ``passes_tuples=True`` (``sequential``) takes either: an array, or a tuple for a first
    layer that is a join.

    ``init`` checks that ``in_shape`` is a tuple of sizes >= 0 of the rank ``forward`` needs.

    ``per_example`` names the rule by which :func:`bpjax.per_example_grad_norms` splits this
    layer's gradient by example (the rules are in ``bpjax/_per_example.py``; each built-in
    layer names its own: ``"dense"``, ``"norm"``, ``"columns"``, ``"projections"``, ``"mixes_examples"``, …).
    The default, None, reruns the layer on each example: right for any layer that does not mix
    examples. The rule goes with the layer, whatever its name or the module it is written in.

    ``per_example="columns"`` (conv, conv_transpose) comes with ``example_rows(params, res, dy)
    -> (cols (N, T, G, P), dz (N, T, G, Q))``: each example's weight gradient is
    Σ_t cols_ntgᵀ dz_ntg within each of G groups (P·Q weights each), its bias gradient Σ_t dz_nt,
    so that the rule needs no other knowledge of the layer. ``per_example="projections"``
    (multi_head_attention, the recurrent layers) comes with ``example_rows(params, res, dy) ->
    {weight: (rows (N, T, P), errors (N, T, Q), its bias's name or None)}``, one dense-like
    product per weight, which with the biases must cover every param.

    ``curvature`` names the layer's rule in ``bpjax.curvature`` (its Kronecker factors, or why
    it has none) where ``per_example`` does not tell it: ``"conv"`` (conv and conv_transpose),
    ``"recurrent"``, ``"attention"``. The default, None, leaves it to ``per_example`` (``"dense"``,
    ``"embedding"``, the norms' rules); a layer with neither has no Kronecker factors.
    """
    if (per_example in ("columns", "projections")) != (example_rows is not None):
        raise ValueError(f"make_layer: {name}: expected example_rows exactly with per_example 'columns' or "
                         f"'projections', got per_example={per_example!r} and example_rows={example_rows!r}")
    token = LayerToken(per_example, curvature, example_rows)   # this layer, for the hooks (path names, its rules)

    def init_(key, in_shape):
        if tuple_input or (passes_tuples and is_tuple_of_shapes(in_shape)):
            return init(key, tuple_of_shapes(name, in_shape))   # (a sequential may start with a join)
        in_shape = check_in_shape(name, in_shape, ndim, min_ndim, meaning)
        return init(key, in_shape)

    def forward_(params, state, x, *, key=None, train=True):
        if key is not None:
            check_key(name, key)        # here, where it enters: a combinator splits it before its layers see it
        if tuple_input or (passes_tuples and isinstance(x, (tuple, list))
                           and any(hasattr(e, "shape") for e in x)):
            x = check_tuple_input(name, x, float_input=float_input, ndim=ndim, min_ndim=min_ndim,
                                  meaning=meaning)
            in_shape = tuple(tuple(e.shape[1:]) for e in x)
        else:
            x = check_x(name, "x", x, float_input, ndim, min_ndim, meaning)
            in_shape = tuple(x.shape[1:])
        exp_params, exp_state = abstract_init(init, in_shape)
        if not jax.tree_util.tree_leaves(state) and not jax.tree_util.tree_leaves(exp_state):
            state = exp_state            # stateless: () stands for any tree of empty tuples
        check_tree(name, "params", exp_params, params, shapes=False)
        check_tree(name, "state", exp_state, state, shapes=False)
        if check is not None:
            check(params, state, x)
        try:
            check_tree(name, "params", exp_params, params, shapes=True)
        except ValueError:
            fit = None if isinstance(x, tuple) else initialised_for(init, in_shape, params)
            if fit is None:
                raise                   # the params are wrong, not x
            lo, hi = fit
            want = (f"== {lo} (the input shape its params were initialised for)" if lo == hi else
                    f"between {lo} and {hi} (the input shapes its params fit)")
            raise ValueError(f"{name}: expected x.shape[1:] {want}, got x.shape={tuple(x.shape)}") from None
        check_tree(name, "state", exp_state, state, shapes=True)
        if _HOOKS:
            return _HOOKS[-1].layer_forward(name, token, forward, params, state, x, key=key, train=train)
        return forward(params, state, x, key=key, train=train)

    def backward_(params, res, dy):
        if _HOOKS and hasattr(_HOOKS[-1], "layer_backward_checked"):     # bpjax.observe: it finishes
            return _HOOKS[-1].layer_backward_checked(name, token, backward, finish, params, res, dy)
        if _HOOKS:
            out = _HOOKS[-1].layer_backward(name, token, backward, params, res, dy)
        else:
            out = backward(params, res, dy)
        return finish(params, out)

    def finish(params, out):
        """The checks of what ``backward`` returned: a pair whose dparams has the tree and leaf shapes
        of params (floating where params are), cast to params' dtypes (a bfloat16 layer may
        return float32 accumulations)."""
        if not isinstance(out, tuple) or len(out) != 2:
            raise TypeError(f"{name}: expected backward to return a pair (dparams, dx), got {describe(out)}")
        dparams, dx = out
        if jax.tree_util.tree_structure(dparams) != jax.tree_util.tree_structure(params):
            raise TypeError(f"{name}: expected backward to return dparams with the tree structure of params, "
                            f"got another tree.\n"
                            f"  expected: {describe(params)}\n"
                            f"  got:      {describe(dparams)}")
        if backward_ in _SHAPES_REPORTED:               # a gradient check's report shows the shapes
            return cast_like(dparams, params), dx
        check_tree(name, "backward's dparams", params, dparams, shapes=True)   # shapes, and float where float
        return cast_like(dparams, params), dx

    for f in (init_, forward_, backward_):
        f.__qualname__ = f"{name}.{f.__name__.rstrip('_')}"
    return Layer(init_, forward_, backward_, name)


def make_loss(name: str, forward: Callable, backward: Callable, *, check: Optional[Callable] = None,
              hessian: Optional[str] = None) -> Loss:
    """Build a :class:`Loss`; ``forward`` checks that ``pred`` is a floating array with a batch
    axis and then runs the loss's own ``check(pred, target)``.

    ``hessian`` names the rule by which ``bpjax.curvature`` knows the loss's Hessian in ``pred``
    (``bpjax/curvature/loss_hessian.py``; each built-in loss names its own). The default, None:
    the second-order quantities refuse the loss. The rule goes with the loss, whatever its name.
    """

    def forward_(pred, target):
        pred = check_float_input(name, "pred", pred)
        check_ndim(name, "pred", pred, min_ndim=1)
        if pred.size == 0:
            raise ValueError(f"{name}: expected a non-empty pred (a mean over no elements is NaN), "
                             f"got pred.shape={tuple(pred.shape)}")
        if not hasattr(target, "dtype"):
            target = jnp.asarray(target)
        if check is not None:
            check(pred, target)
        if _HOOKS:
            return _HOOKS[-1].loss_forward(name, forward, pred, target)
        return forward(pred, target)

    def backward_(res, dvalue=1.0):
        if _HOOKS:
            return _HOOKS[-1].loss_backward(name, backward, res, dvalue)
        return backward(res, dvalue)

    for f in (forward_, backward_):
        f.__qualname__ = f"{name}.{f.__name__.rstrip('_')}"
    return Loss(forward_, backward_, name, hessian)


# ----------------------------------------------------------------------------- accumulation


def accumulation_dtype(*dtypes):
    """The dtype in which a backward accumulates a long sum of arrays of ``dtypes``: float32 for
    bfloat16 and float16 (whose 8 or 11 significant bits would lose a sum over a batch), the
    dtype itself for float32 and float64 (never narrower: float64 stays float64)."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def sum_acc(a: jax.Array, axis=None, **kwargs) -> jax.Array:
    """Σ a over ``axis``, accumulated and returned in ``accumulation_dtype(a.dtype)``: the bias
    gradient Σ_rows dy and the other weight-gradient sums over a batch."""
    return jnp.sum(a, axis=axis, dtype=accumulation_dtype(a.dtype), **kwargs)
