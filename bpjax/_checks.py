"""The trace-time checks every layer shares: of arguments, input arrays, ``in_shape`` and trees.

Each raises, at trace time, one message that names the layer, what it expected and what it
got (``dense: expected x.shape[-1] == 40, got x.shape=(32, 41)``). :func:`bpjax.make_layer`
and :func:`bpjax.make_loss` run them on every call; layers call the argument checks in their
factories. The shape helpers the layers keep in residuals and the losses' label checks use
(``shape_record``, ``concrete``, ``num_rows``) live here too.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Shape = tuple


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


def check_key(name: str, key) -> None:
    """Raise unless ``key`` is one PRNG key: ``jax.random.key(0)`` (a typed key of shape ()) or
    ``jax.random.PRNGKey(0)`` (raw uint32 key data: 2 words, or 4 for the ``rbg`` generator)."""
    dtype, shape = getattr(key, "dtype", None), tuple(getattr(key, "shape", ()))
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    if typed and shape == () or not typed and dtype == jnp.uint32 and shape in ((2,), (4,)):
        return
    got = repr(key) if dtype is None else f"{'key' if typed else jnp.dtype(dtype).name}{list(shape)}"
    raise TypeError(f"{name}: expected key to be one PRNG key (jax.random.key(0) or "
                    f"jax.random.PRNGKey(0)), got {got}")


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


def check_x(name, arg, x, float_input, ndim, min_ndim, meaning):
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
    elems = [check_x(name, f"x[{i}]", e, float_input, ndim, min_ndim, meaning) for i, e in enumerate(x)]
    if len({e.shape[0] for e in elems}) > 1:
        raise ValueError(f"{name}: expected every x[i] to have the same batch size, "
                         f"got shapes {[tuple(e.shape) for e in elems]}")
    return tuple(elems)


def tuple_of_shapes(name: str, in_shape) -> tuple:
    """``in_shape`` of a layer with tuple input: a tuple of per-example shapes, as ints."""
    try:
        if not in_shape or any(isinstance(s, (int, np.integer)) for s in in_shape):
            raise TypeError
        return tuple(tuple(int(d) for d in s) for s in in_shape)
    except TypeError:
        raise TypeError(f"{name}: expected in_shape to be a non-empty tuple of shapes, one per input, "
                        f"got in_shape={in_shape!r}") from None


def is_tuple_of_shapes(in_shape) -> bool:
    return (isinstance(in_shape, (tuple, list)) and bool(in_shape)
            and all(isinstance(s, (tuple, list)) for s in in_shape))


def check_in_shape(name: str, in_shape, ndim, min_ndim, meaning) -> tuple:
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


def input_record(x):
    """A zero-size record of an input's full shape and dtype (``(0, *x.shape)``), or a tuple of
    them for a tuple input: what a combinator keeps in its residuals so that it can check the
    ``dx`` each of its layers returns against the input that layer was given, at no memory cost."""
    if isinstance(x, (tuple, list)):
        return tuple(input_record(e) for e in x)
    return jnp.zeros((0, *x.shape), x.dtype)


def check_dx(name: str, dx, record) -> None:
    """Raise unless ``dx`` (what ``name``'s backward returned for its input) has the shape and
    dtype that :func:`input_record` recorded for that input: a wrong ``dx`` would otherwise
    surface as an XLA error in the layer below, or broadcast silently. Integer inputs (token
    ids) have no gradient and are not checked."""
    if isinstance(record, tuple):
        if not isinstance(dx, (tuple, list)) or len(dx) != len(record):
            raise TypeError(f"{name}: expected backward to return dx as a tuple of {len(record)} arrays "
                            f"(one per input), got {describe(dx)}")
        for i, (d, r) in enumerate(zip(dx, record)):
            check_dx(f"{name} (input {i})", d, r)
        return
    if not jnp.issubdtype(record.dtype, jnp.floating):
        return
    want, got = tuple(record.shape[1:]), getattr(dx, "shape", None)
    if got is None or tuple(got) != want:
        raise ValueError(f"{name}: expected backward to return dx.shape == {want} (the shape of its input x), "
                         f"got {describe(dx) if got is None else tuple(got)}")
    if jnp.dtype(dx.dtype) != jnp.dtype(record.dtype):
        raise TypeError(f"{name}: expected backward to return dx of dtype {jnp.dtype(record.dtype).name} "
                        f"(the dtype of its input x), got {jnp.dtype(dx.dtype).name}")


@functools.lru_cache(maxsize=4096)
def abstract_init(init: Callable, in_shape: Shape):
    """Shapes and structure of ``init``'s params and state for ``in_shape``, without computing them."""
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return jax.eval_shape(lambda k: init(k, in_shape)[:2], key)


def _shapes(tree) -> list:
    return [tuple(getattr(a, "shape", ())) for a in jax.tree_util.tree_leaves(tree)]


def initialised_for(init: Callable, x_shape: Shape, params: PyTree) -> Optional[tuple]:
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
            return _shapes(abstract_init(init, tuple(shape))[0])
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


def concrete(x) -> Optional[np.ndarray]:
    """``x`` as a NumPy array when its values are known (not traced under jit), else ``None``."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def num_rows(shape: Sequence[int], trailing: int = 0) -> int:
    """Number of examples: the product of ``shape`` without its last ``trailing`` axes."""
    return math.prod(shape[: len(shape) - trailing])
