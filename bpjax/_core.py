"""The layer and loss protocols, and the trace-time checks every layer shares.

A layer is three pure functions (``init``, ``forward``, ``backward``); a loss is two
(``forward``, ``backward``). ``make_layer`` and ``make_loss`` wrap the raw functions a
layer author writes with the checks every layer needs, so that bad input is caught in
``forward``, at trace time, with a message that names the layer, what it expected and
what it got.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Shape = tuple


class Layer(NamedTuple):
    """A layer: three pure functions over parameter pytrees.

    ``init(key, in_shape) -> (params, state, out_shape)``
        ``in_shape`` is one example's shape, without the batch axis. ``state`` is ``()``
        for stateless layers (running statistics live here).
    ``forward(params, state, x, *, key=None, train=True) -> (y, new_state, res)``
        ``x`` has a leading batch axis. ``res`` (the residuals, CS231n's cache) holds the
        arrays ``backward`` needs, and only arrays.
    ``backward(params, res, dy) -> (dparams, dx)``
        ``dparams`` has exactly the structure, shapes and dtypes of ``params``.
    """

    init: Callable[..., tuple]
    forward: Callable[..., tuple]
    backward: Callable[..., tuple]


class Loss(NamedTuple):
    """A loss: two pure functions.

    ``forward(pred, target) -> (value, res)``: ``value`` is a scalar, the mean over examples.
    ``backward(res, dvalue=1.0) -> dpred``: the error at the output, shaped like ``pred``.
    """

    forward: Callable[..., tuple]
    backward: Callable[..., Any]


# ----------------------------------------------------------------------------- helpers


def describe(tree: PyTree) -> str:
    """A pytree printed with each leaf as ``dtype[shape]`` (e.g. ``{'w': float32[3, 4]}``)."""

    def leaf(a):
        if hasattr(a, "shape") and hasattr(a, "dtype"):
            return _Repr(f"{jnp.dtype(a.dtype).name}{list(a.shape)}")
        return _Repr(repr(a))

    return repr(jax.tree_util.tree_map(leaf, tree))


class _Repr:
    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text


def _got(obj) -> str:
    """What ``obj`` is, for a message: ``function relu``, ``int``."""
    fn = getattr(obj, "__name__", None)
    return f"{type(obj).__name__} {fn}" if callable(obj) and fn else type(obj).__name__


def _uncalled_hint(obj) -> str:
    """`` (did you forget to call the factory, e.g. dense(...) rather than dense?)`` for a function."""
    fn = getattr(obj, "__name__", None)
    if not callable(obj) or not fn or isinstance(obj, (Layer, Loss)):
        return ""
    try:
        needs = any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                    for p in inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        needs = False
    return f" (did you forget to call the factory, e.g. {fn}({'...' if needs else ''}) rather than {fn}?)"


def check_is_layer(name: str, arg: Optional[str], obj) -> None:
    """Raise ``TypeError`` unless ``obj`` is a :class:`Layer`; an uncalled factory is named."""
    if isinstance(obj, Layer):
        return
    hint = _uncalled_hint(obj)
    what = f"{arg} to be a bpjax.Layer" if arg else "a bpjax.Layer"
    raise TypeError(f"{name}: expected {what}, got {_got(obj)}{hint}")


def check_is_loss(name: str, arg: Optional[str], obj) -> None:
    """Raise ``TypeError`` unless ``obj`` is a :class:`Loss`; an uncalled factory is named
    (``bp.softmax_cross_entropy`` rather than ``bp.softmax_cross_entropy()``)."""
    if isinstance(obj, Loss):
        return
    hint = _uncalled_hint(obj)
    what = f"{arg} to be a bpjax.Loss" if arg else "a bpjax.Loss"
    raise TypeError(f"{name}: expected {what}, got {_got(obj)}{hint}")


def check_model_and_loss(name: str, model, loss) -> None:
    """The checks of a (model, loss) pair that ``value_and_grad``, the gradient checks and
    ``fit`` share: ``TypeError`` naming ``name`` unless ``model`` is a :class:`Layer` and
    ``loss`` a :class:`Loss`, with the hint for a factory that was not called."""
    check_is_layer(name, "model", model)
    check_is_loss(name, "loss", loss)


def check_positive_int(name: str, arg: str, value) -> int:
    """Raise unless ``value`` is an integer > 0; returns it as ``int``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}: expected {arg} to be an integer > 0, got {value!r}")
    return int(value)


def check_real(name: str, arg: str, value) -> float:
    """Raise ``TypeError`` unless ``value`` is a finite real number; returns it as ``float``."""
    try:
        if isinstance(value, (bool, str, bytes)):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected {arg} to be a real number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite {arg}, got {value!r}")
    return v


def check_float_input(name: str, arg: str, x) -> jax.Array:
    """Raise unless ``x`` is an array of a floating-point dtype; returns it as a JAX array."""
    if isinstance(x, (tuple, list)) and any(hasattr(e, "shape") for e in x):
        raise TypeError(f"{name}: expected {arg} to be an array, got a {type(x).__name__} of {len(x)} arrays "
                        "(only the joins, concat() and add(), take one array per branch)")
    if not hasattr(x, "dtype"):
        try:
            x = jnp.asarray(x)
        except TypeError as e:
            raise TypeError(f"{name}: expected {arg} to be an array, got {type(x).__name__}") from e
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name}: expected a floating-point {arg}, got dtype {jnp.dtype(x.dtype).name} "
            f"(cast it first, e.g. {arg}.astype(jnp.float32))"
        )
    return x


def check_ndim(name: str, arg: str, x, *, ndim: Optional[int] = None, min_ndim: int = 1,
               meaning: str = "") -> None:
    """Raise unless ``x.ndim`` is ``ndim`` (when given) or at least ``min_ndim``."""
    hint = f" {meaning}" if meaning else ""
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected {arg}.ndim == {ndim}{hint}, got {arg}.shape={tuple(x.shape)}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name}: expected {arg}.ndim >= {min_ndim}{hint}, got {arg}.shape={tuple(x.shape)}")


def _check_x(name, arg, x, float_input, ndim, min_ndim, meaning):
    """The dtype and rank checks of one input array; returns it as a JAX array."""
    if float_input:
        x = check_float_input(name, arg, x)
    elif not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    check_ndim(name, arg, x, ndim=ndim, min_ndim=min_ndim, meaning=meaning)
    return x


def check_tuple_input(name: str, x, *, float_input: bool = True, ndim: Optional[int] = None,
                      min_ndim: int = 1, meaning: str = "") -> tuple:
    """Raise unless ``x`` is a non-empty tuple (or list) of arrays, each passing the dtype and
    rank checks, all with the same batch size; returns it as a tuple of JAX arrays."""
    if not isinstance(x, (tuple, list)) or not x:
        got = (f"an array of shape {tuple(x.shape)}" if hasattr(x, "shape")
               else f"{type(x).__name__} {x!r}" if isinstance(x, (tuple, list)) else type(x).__name__)
        raise TypeError(f"{name}: expected x to be a non-empty tuple of arrays (one per branch), got {got}")
    elems = [_check_x(name, f"x[{i}]", e, float_input, ndim, min_ndim, meaning) for i, e in enumerate(x)]
    if len({e.shape[0] for e in elems}) > 1:
        raise ValueError(f"{name}: expected every x[i] to have the same batch size, "
                         f"got shapes {[tuple(e.shape) for e in elems]}")
    return tuple(elems)


def _tuple_of_shapes(name: str, in_shape) -> tuple:
    """``in_shape`` of a layer with tuple input: a tuple of per-example shapes, as ints."""
    try:
        if not in_shape or any(isinstance(s, (int, np.integer)) for s in in_shape):
            raise TypeError
        return tuple(tuple(int(d) for d in s) for s in in_shape)
    except TypeError:
        raise TypeError(f"{name}: expected in_shape to be a non-empty tuple of shapes, one per input, "
                        f"got in_shape={in_shape!r}") from None


def _is_tuple_of_shapes(in_shape) -> bool:
    return (isinstance(in_shape, (tuple, list)) and bool(in_shape)
            and all(isinstance(s, (tuple, list)) for s in in_shape))


def _check_in_shape(name: str, in_shape, ndim, min_ndim, meaning) -> tuple:
    """``in_shape`` (one example's shape) as a tuple of ints >= 0 with the rank ``forward`` needs."""
    try:
        if isinstance(in_shape, (str, bytes)) or any(isinstance(d, bool) or int(d) != d for d in in_shape):
            raise TypeError
        out = tuple(int(d) for d in in_shape)
    except TypeError:
        raise TypeError(f"{name}: expected in_shape to be a tuple of integers (one example's shape, "
                        f"without the batch axis), got in_shape={in_shape!r}") from None
    if any(d < 0 for d in out):
        raise ValueError(f"{name}: expected in_shape to hold sizes >= 0, got in_shape={out}")
    hint = f" (x: {meaning})" if meaning else ""
    axes = lambda k: f"{k} ax{'is' if k == 1 else 'es'}"  # noqa: E731
    if ndim is not None and len(out) != ndim - 1:
        raise ValueError(f"{name}: expected in_shape with {axes(ndim - 1)}{hint}, got in_shape={out}")
    if len(out) < min_ndim - 1:
        raise ValueError(f"{name}: expected in_shape with at least {axes(min_ndim - 1)}{hint}, got in_shape={out}")
    return out


def shape_record(x) -> jax.Array:
    """A zero-size array ``(0, *x.shape[1:])`` of ``x``'s dtype: it records, in residuals (which
    hold arrays only), the per-example shape and dtype that a backward needs to undo a reshape
    or a concatenation, at no memory cost."""
    return jnp.zeros((0, *x.shape[1:]), x.dtype)


@functools.lru_cache(maxsize=4096)
def _abstract_init(init: Callable, in_shape: Shape):
    """Shapes and structure of ``init``'s params and state for ``in_shape``, without computing them."""
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return jax.eval_shape(lambda k: init(k, in_shape)[:2], key)


def _shapes(tree) -> list:
    return [tuple(getattr(a, "shape", ())) for a in jax.tree_util.tree_leaves(tree)]


def _initialised_for(init: Callable, x_shape: Shape, params: PyTree) -> Optional[tuple]:
    """The input shapes (one example's) for which ``init`` gives params of exactly the shapes of
    ``params``, when ``x_shape`` does not: the sign that x, not the params, is wrong. Returns
    ``(smallest, largest)`` (equal unless a stride's floor lets several sizes fit), or ``None``
    when no such shape is found (the params are wrong: another width, another model).

    The search runs only on this error path, at trace time, on shapes only. Each round takes the
    first parameter size that differs, finds the input axes it depends on (one axis alone, or a
    group of axes of equal size in x, e.g. an image's height and width, moved together) and
    bisects that axis's size for the one that gives the parameter's size (sizes grow with the
    input's); the shape found must then give every parameter's shape.
    """
    want = _shapes(params)
    if any(not hasattr(a, "shape") for a in jax.tree_util.tree_leaves(params)):
        return None

    def shapes_for(shape):
        try:
            return _shapes(_abstract_init(init, tuple(shape))[0])
        except Exception:               # too small for the layers (a convolution without padding)
            return None

    def first_diff(got):
        for i, (g, w) in enumerate(zip(got, want)):
            if len(g) != len(w):
                return None
            for d, (a, b) in enumerate(zip(g, w)):
                if a != b:
                    return i, d
        return None

    rank = len(x_shape)
    groups = [(a,) for a in range(rank)]
    groups += [tuple(a for a in range(rank) if x_shape[a] == x_shape[b])
               for b in range(rank)]
    groups = sorted(dict.fromkeys(groups), key=len)
    shape, upper = list(x_shape), list(x_shape)
    for _ in range(rank + 1):
        got = shapes_for(shape)
        if got is None or len(got) != len(want):
            return None
        where = first_diff(got)
        if where is None:
            if tuple(shape) == tuple(x_shape):
                return None
            if upper != shape and shapes_for(upper) == want:
                return tuple(shape), tuple(upper)
            return tuple(shape), tuple(shape)
        i, d = where
        for g in groups:
            def size(v, g=g):
                trial = list(shape)
                for a in g:
                    trial[a] = v
                out = shapes_for(trial)
                return None if out is None or len(out) != len(want) or len(out[i]) != len(want[i]) else out[i][d]
            lo, hi = 1, 1 << 16
            v = shape[g[0]]
            if size(2 * v + 1) == got[i][d] and size(max(1, v // 2)) == got[i][d]:
                continue                # this parameter does not depend on these axes
            while lo < hi:              # the smallest v whose size reaches the parameter's
                mid = (lo + hi) // 2
                m = size(mid)
                if m is None or m < want[i][d]:
                    lo = mid + 1
                else:
                    hi = mid
            if size(lo) == want[i][d]:
                top, hi = lo, 1 << 16   # the largest v with that size (a stride's floor allows several)
                while top < hi:
                    mid = (top + hi + 1) // 2
                    m = size(mid)
                    if m is not None and m <= want[i][d]:
                        top = mid
                    else:
                        hi = mid - 1
                for a in g:
                    shape[a], upper[a] = lo, top
                break
        else:
            return None
    return None


def check_tree(name: str, what: str, expected: PyTree, got: PyTree, *, shapes: bool) -> None:
    """Raise ``TypeError`` if the structures differ, ``ValueError`` if (with ``shapes``) a leaf's shape does."""
    exp_def = jax.tree_util.tree_structure(expected)
    got_def = jax.tree_util.tree_structure(got)
    if exp_def != got_def:
        raise TypeError(
            f"{name}: the {what} tree does not fit the model.\n"
            f"  expected: {describe(expected)}\n"
            f"  got:      {describe(got)}"
        )
    if not shapes:
        return
    for (path, e), g in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree_util.tree_leaves(got)):
        gshape = getattr(g, "shape", None)
        where = f"{what}{jax.tree_util.keystr(path)}"
        if gshape is None or tuple(gshape) != tuple(e.shape):
            raise ValueError(
                f"{name}: expected {where}.shape == {tuple(e.shape)}, "
                f"got {tuple(gshape) if gshape is not None else type(g).__name__}"
            )
        if jnp.issubdtype(e.dtype, jnp.floating) and not jnp.issubdtype(g.dtype, jnp.floating):
            raise TypeError(f"{name}: expected a floating-point {where}, got dtype {jnp.dtype(g.dtype).name}")


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
    """Cast every leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
    return jax.tree_util.tree_map(lambda g, p: jnp.asarray(g).astype(p.dtype), tree, like)


# ----------------------------------------------------------------------------- factories

#: Instrumentation that is switched on (``bpjax.check_finite`` pushes one while it traces, and
#: ``bpjax._observe.observe`` one that sees every layer's backward); empty otherwise, and then
#: the layers run their raw functions directly.
_HOOKS: list = []


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
) -> Layer:
    """Build a :class:`Layer` from raw functions, adding the checks every layer shares.

    ``forward`` then checks, in order, at trace time: that ``x`` is a floating-point array
    (unless ``float_input=False``) of the right rank; that ``params`` and ``state`` have the
    structure ``init`` gives for ``x.shape[1:]`` (``TypeError`` showing both); the layer's
    own ``check(params, state, x)``; and finally every leaf's shape. ``backward`` casts
    ``dparams`` to the dtypes of ``params``.

    With ``tuple_input=True`` (the joins: ``concat``, ``add``) ``x`` is a non-empty tuple
    (or list, taken as a tuple) of arrays: each element gets the dtype and rank checks, all
    must share the batch size, and ``init`` takes a tuple of per-example shapes,
    ``tuple(e.shape[1:] for e in x)``. ``backward`` then returns ``dx`` as a tuple.
    ``passes_tuples=True`` (``sequential``) takes either: an array, or a tuple for a first
    layer that is a join.

    ``init`` checks that ``in_shape`` is a tuple of sizes >= 0 of the rank ``forward`` needs.
    """
    token = object()                       # this layer, for the path names of bpjax.check_finite

    def init_(key, in_shape):
        if tuple_input or (passes_tuples and _is_tuple_of_shapes(in_shape)):
            return init(key, _tuple_of_shapes(name, in_shape))   # (a sequential may start with a join)
        in_shape = _check_in_shape(name, in_shape, ndim, min_ndim, meaning)
        return init(key, in_shape)

    def forward_(params, state, x, *, key=None, train=True):
        if tuple_input or (passes_tuples and isinstance(x, (tuple, list))
                           and any(hasattr(e, "shape") for e in x)):
            x = check_tuple_input(name, x, float_input=float_input, ndim=ndim, min_ndim=min_ndim,
                                  meaning=meaning)
            in_shape = tuple(tuple(e.shape[1:]) for e in x)
        else:
            x = _check_x(name, "x", x, float_input, ndim, min_ndim, meaning)
            in_shape = tuple(x.shape[1:])
        exp_params, exp_state = _abstract_init(init, in_shape)
        if not jax.tree_util.tree_leaves(state) and not jax.tree_util.tree_leaves(exp_state):
            state = exp_state            # stateless: () stands for any tree of empty tuples
        check_tree(name, "params", exp_params, params, shapes=False)
        check_tree(name, "state", exp_state, state, shapes=False)
        if check is not None:
            check(params, state, x)
        try:
            check_tree(name, "params", exp_params, params, shapes=True)
        except ValueError:
            fit = None if isinstance(x, tuple) else _initialised_for(init, in_shape, params)
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
        """The checks of what ``backward`` returned: a pair, dparams cast to params' dtypes."""
        if not isinstance(out, tuple) or len(out) != 2:
            raise TypeError(f"{name}: expected backward to return a pair (dparams, dx), got {describe(out)}")
        dparams, dx = out
        try:
            return cast_like(dparams, params), dx
        except (TypeError, ValueError, AttributeError):
            if jax.tree_util.tree_structure(dparams) == jax.tree_util.tree_structure(params):
                raise
            raise TypeError(f"{name}: expected backward to return dparams with the tree structure of params, "
                            f"got another tree.\n"
                            f"  expected: {describe(params)}\n"
                            f"  got:      {describe(dparams)}") from None

    for f in (init_, forward_, backward_):
        f.__qualname__ = f"{name}.{f.__name__.rstrip('_')}"
    return Layer(init_, forward_, backward_)


def make_loss(name: str, forward: Callable, backward: Callable, *, check: Optional[Callable] = None) -> Loss:
    """Build a :class:`Loss`; ``forward`` checks that ``pred`` is a floating array with a batch
    axis and then runs the loss's own ``check(pred, target)``."""

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

    return Loss(forward_, backward_)


def concrete(x) -> Optional[np.ndarray]:
    """``x`` as a NumPy array when its values are known (not traced under jit), else ``None``."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def num_rows(shape: Sequence[int], trailing: int = 0) -> int:
    """Number of examples: the product of ``shape`` without its last ``trailing`` axes."""
    return math.prod(shape[: len(shape) - trailing])


def accumulation_dtype(*dtypes):
    """The dtype in which a backward accumulates a long sum of arrays of ``dtypes``: float32 for
    bfloat16 and float16 (whose 8 or 11 significant bits would lose a sum over a batch), the
    dtype itself for float32 and float64 (never narrower: float64 stays float64)."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def sum_acc(a: jax.Array, axis=None, **kwargs) -> jax.Array:
    """Σ a over ``axis``, accumulated and returned in ``accumulation_dtype(a.dtype)``: the bias
    gradient Σ_rows dy and the other weight-gradient sums over a batch."""
    return jnp.sum(a, axis=axis, dtype=accumulation_dtype(a.dtype), **kwargs)
