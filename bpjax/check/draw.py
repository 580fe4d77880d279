"""Drawing the values a gradient check runs at (the first part of a check).

Everything is drawn on the host with NumPy (no compile), from one ``np.random.Generator``:
inputs and params that are non-degenerate (no zeros, no identical rows), a loss's targets,
the cotangent ``dy`` (random, never ones: ones hide bugs that cancel) and the directions ``v``
of the finite differences (random, or the coordinate axes of a small leaf, which say where an
error sits).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._grad import is_floating

PyTree = Any


def default_dtype():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def precision_rank(d) -> int:
    """Orders floating dtypes by precision: fewest bits, then fewest mantissa bits (bfloat16 below float16)."""
    return jnp.finfo(d).bits * 10 + jnp.finfo(d).nmant


def lowest_float(trees) -> np.dtype:
    """The narrowest floating dtype among the leaves of ``trees`` (:func:`precision_rank`); the
    default dtype when there is none."""
    dts = [jnp.dtype(a.dtype) for a in jax.tree_util.tree_leaves(trees) if is_floating(a)]
    if not dts:
        return jnp.dtype(default_dtype())
    return min(dts, key=precision_rank)


def random_like(gen: np.random.Generator, shape_dtype, *, scalar_away_from_zero=True):
    """A random array drawn on the host (no compile): N(0, 1), or ±U(0.5, 1.5) for a scalar."""
    shape, dtype = tuple(shape_dtype.shape), shape_dtype.dtype
    if math.prod(shape) == 1 and scalar_away_from_zero:
        v = gen.choice([-1.0, 1.0]) * gen.uniform(0.5, 1.5, shape)
    else:
        v = gen.standard_normal(shape)
    return jnp.asarray(v, dtype)


def normal(gen: np.random.Generator, shape, dtype, scale: float = 1.0):
    """``scale`` · N(0, 1) of ``shape``: inputs, predictions and regression targets."""
    return jnp.asarray(scale * gen.standard_normal(shape), dtype)


def labels(gen: np.random.Generator, shape, dtype):
    """Integer class labels in [0, shape[-1]) of ``shape[:-1]``: the classes are the last axis."""
    return jnp.asarray(gen.integers(0, shape[-1], shape[:-1]))


def probabilities(gen: np.random.Generator, shape, dtype):
    """Rows that sum to 1 over the last axis, peaked (softmax of 2·N(0, 1)) rather than flat."""
    z = 2 * gen.standard_normal(shape)
    e = np.exp(z - z.max(-1, keepdims=True))
    return jnp.asarray(e / e.sum(-1, keepdims=True), dtype)


def binary(gen: np.random.Generator, shape, dtype):
    """Targets in [0, 1], a quarter exactly 0 and a quarter exactly 1 (the ends a BCE must get right)."""
    u = gen.uniform(size=shape)
    return jnp.asarray(np.where(u < 0.25, 0.0, np.where(u > 0.75, 1.0, u)), dtype)


#: A loss target's drawer by name (``bpjax gradcheck --target``): ``drawer(gen, pred_shape, dtype)``.
TARGETS = {"normal": normal, "labels": labels, "probs": probabilities, "binary": binary}


def fill_params(tree: PyTree, gen: np.random.Generator, dtype, *, state: bool) -> PyTree:
    """Non-degenerate values for a tree of ShapeDtypeStructs, drawn on the host.

    Params: leaves of rank ≥ 2 ~ N(0, 1/fan_in); lower rank ~ U(0.5, 1.5) (positive and
    distinct: safe for scales). State: U(0.5, 1.5) (positive, as variances must be).
    Integer leaves are zeros.
    """

    def fill(s):
        if not jnp.issubdtype(s.dtype, jnp.floating):
            return jnp.zeros(s.shape, s.dtype)
        if not state and len(s.shape) >= 2:
            fan_in = math.prod(s.shape[:-1])
            return jnp.asarray(gen.standard_normal(s.shape) / math.sqrt(fan_in), dtype)
        return jnp.asarray(gen.uniform(0.5, 1.5, s.shape), dtype)

    return jax.tree_util.tree_map(fill, tree)


def cotangent(name: str, y_struct: PyTree, given, gen: np.random.Generator) -> PyTree:
    """``dy`` shaped like the output ``y_struct``: ``given`` cast to y's dtypes, or random."""
    for path, s in jax.tree_util.tree_leaves_with_path(y_struct):
        if not jnp.issubdtype(s.dtype, jnp.floating):
            raise TypeError(f"{name}: expected floating-point outputs, got y{jax.tree_util.keystr(path)} "
                            f"of dtype {jnp.dtype(s.dtype).name}")
    if given is None:
        return jax.tree_util.tree_map(lambda s: random_like(gen, s), y_struct)
    return jax.tree_util.tree_map(lambda c, s: jnp.asarray(c, s.dtype), given, y_struct)


def leaf_scale(a) -> float:
    """The RMS of a leaf, clipped to [1e-3, 1e3] (1 when zero or not finite): the unit of its steps."""
    s = float(np.sqrt(np.mean(np.square(np.asarray(a, np.float64))))) if a.size else 1.0
    return min(max(s, 1e-3), 1e3) if np.isfinite(s) and s > 0 else 1.0


def directions(gen: np.random.Generator, x0: list, n: int, coords: int = 0, sample: int = 0) -> tuple:
    """Per leaf ``a`` an array ``(D, *a.shape)`` of directions scaled by the leaf's RMS, and per
    direction the flat element it moves alone (−1 for a random direction).

    A leaf of at most ``coords`` elements gets its ``a.size`` coordinate axes: the finite
    differences then give every element's derivative, and a disagreement names its element.
    A larger one gets ``n`` random N(0, 1) directions, then ``sample`` of its coordinate axes
    drawn at random (which still name an element, and still check the leaf where every
    random direction crosses a kink).
    """
    out, elements = [], []
    for a in x0:
        s = leaf_scale(a)
        if 0 < a.size <= coords:
            elements.append(np.arange(a.size))
            out.append(s * np.eye(a.size).reshape(a.size, *a.shape))
            continue
        dense = [s * gen.standard_normal(a.shape) for _ in range(n)]
        picked = np.sort(gen.choice(a.size, min(sample, a.size), replace=False)) if sample and a.size else []
        axes = [s * np.eye(1, a.size, int(e)).reshape(a.shape) for e in picked]
        elements.append(np.concatenate([-np.ones(n, int), np.asarray(picked, int)]))
        out.append(np.stack(dense + axes))
    return out, elements
