"""Check the VJP of any JAX function: a ``jax.custom_vjp``, a ``bp.as_jax_fn`` layer, anything.

:func:`check_vjp` is one more front-end of the checker (:mod:`._gradcheck_engine`): the
"hand-written" side is ``jax.vjp`` of ``f`` itself (for a ``custom_vjp`` function, its ``bwd``
rule) pulled back along a random cotangent ``dy``, one output leaf at a time, and the
references are

- ``fd``: central differences of ``f`` in float64 on upcast copies of the inputs, with the
  automatic step and the Taylor-remainder order: along every coordinate of a small leaf (so a
  disagreement names its element), along random directions of a large one;
- ``ref``: ``jax.vjp`` of ``reference``, a plain JAX function computing the same primal, in
  float64 on upcast copies (when given).

Low precision (float32, float16, bfloat16): the finite differences and ``ref`` run on float64
copies, and ``f``'s VJP runs a second time on them; the difference between the two VJPs is
its rounding, per element. Each element is then allowed three times its own rounding and the
dtype's relative tolerance (see :func:`bpjax.check_layer`), above a floor of 10⁻³ of the leaf's
scale, so a small bug is not lost in bfloat16's coarse grid. (A rule that cannot run in float64
falls back to the dtype's tolerances and floor.)

Kinks (relu at 0, ``abs``, ``max`` at a tie): a direction along which a kink lies within the
smallest steps is found from the second difference (:func:`._gradcheck_fd.kinked`). At a drawn
point, the point is drawn again; at a point the user gave, the report says where the kink is
and leaves it out of the comparison instead of failing it. Likewise the edge of f's domain
(``log`` near 0, ``logit`` near 1): a step at which f is not finite is never used, and a
direction finite at too few of the smallest steps is reported and left out.

No reference, no pass: a leaf that no reference compared (the float64 differences raised and
no reference was given, say) is ``not checked`` and fails, unless ``allow_unchecked`` names it.
When f cannot run on float64 copies, its differences run in its own precision (float32) with
that precision's tolerances. A forward that computes below float64 inside (a kernel that casts
to float32) is found by a probe (:func:`._gradcheck_fd.forward_precision`) and held to its own
precision too. An output of at most 8 elements is also pulled back along ``−dy``: a rule
using ``|g|`` for ``g`` agrees with the truth whenever every element of ``dy`` is positive.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from .._grad import is_floating
from .draw import default_dtype, lowest_float
from .engine import run
from .refs import x64
from .report import GradientReport

__all__ = ["check_vjp", "assert_vjp_close"]

PyTree = Any
_FLOATS = ("float64", "float32", "float16", "bfloat16")
_NAME = "check_vjp"
#: Below float64, f's VJP also runs on float64 copies; the difference is its rounding, per element,
#: so the floor of the relative error (see bpjax.check_layer) drops from 1e-2 (float32), 0.2
#: (float16), 0.5 (bfloat16) to this.
_LOW_FLOOR = 1e-3
_SAMPLE = 16            # random coordinates of a leaf larger than ``coords``, beside its random directions
_SIGNS = 8              # an output leaf of at most this many elements is also pulled back along −dy


def check_vjp(f: Callable, *args, reference: Optional[Callable] = None,
              argnums: Union[None, int, Sequence[int]] = None, dtype=None, seed: int = 0,
              rtol=None, atol: Optional[float] = None, cotangent=None, directions: int = 3,
              coords: int = 64, min_order: Optional[float] = 1.5, resample: int = 3,
              allow_unchecked: bool | Sequence[str] = ()) -> GradientReport:
    """Check the VJP of ``f`` (e.g. a ``jax.custom_vjp`` rule) against float64 finite differences.

    ``y = f(*args)``; checked is ``dargs = vjp(f, *args)(dy)`` for a random ``dy``, one output
    leaf of ``y`` at a time, for every floating-point leaf of the arguments in ``argnums``.

    Args:
        f: any JAX function of pytrees returning floating-point arrays (a pytree of them).
        *args: its positional arguments. A leaf may be an array (checked there), or a shape to
            draw a random non-degenerate value for: a ``jax.ShapeDtypeStruct`` or a tuple of
            ints (N(0, 1) entries; a scalar ±U(0.5, 1.5)). To pass a tuple of ints as itself
            (axes), close over it: ``functools.partial(f, axes=(0, 1))``.
        reference: a plain JAX function computing the same primal (same arguments, same
            outputs); its autodiff becomes a second reference, ``ref``.
        argnums: the arguments differentiated (default: every argument with a floating-point
            leaf); the others are held fixed (non-array ones are passed as they are).
        dtype: cast every floating-point input to this dtype (default: arrays keep theirs,
            ``ShapeDtypeStruct`` its dtype, a shape tuple float64 with x64 on, else float32).
            It sets the tolerances (see :func:`bpjax.check_layer`); the finite differences
            and ``ref`` always run in float64, on upcast copies.
        seed: seeds the drawn inputs, the cotangent and the directions.
        rtol, atol, min_order: as in :func:`bpjax.check_layer` (``rtol`` keys ``"fd"``,
            ``"vjp"`` for ``ref``, ``"floor"``).
        cotangent: ``dy``, shaped like y (default N(0, 1): ones hide bugs that cancel).
        directions: random directions per leaf larger than ``coords`` elements (beside 16 of
            its coordinates, drawn at random).
        coords: leaves of at most this many elements are differentiated along every coordinate.
        resample: how many times a drawn point with a kink within a step is drawn again.
        allow_unchecked: gradient leaves (``"dx"``, ``"dp['a']"``, or True for all) that may go
            unchecked, reported ``not checked (allowed)`` instead of failing, when no reference
            can compare them (f raises at a perturbed point, say).

    Returns:
        A :class:`bpjax.GradientReport`: per input leaf and output leaf, the relative error
        against each reference, the observed Taylor order, and where the largest
        disagreement sits (``at``); ``report.failing`` names the wrong inputs (and those not
        checked, ``report.unchecked``); ``report.kinks`` and ``report.edges`` what was left out.
    """
    f, reference, dtype = _validated(f, reference, dtype, args)
    names = _argument_names(f, len(args))
    with (x64() if dtype is not None and dtype == jnp.float64 else contextlib.nullcontext()):
        values, drawn = _fill(args, np.random.default_rng(seed + 7919), dtype)
        argnums = _argnums(argnums, values)
        notes, report, attempt = [], None, 0
        for attempt in range(resample + 1):
            report = _check_at(f, reference, values, argnums, names, dtype, seed=seed + attempt, rtol=rtol,
                               atol=atol, cotangent=cotangent, directions=directions, coords=coords,
                               min_order=min_order, unchecked=_allowed(allow_unchecked))
            if not report.kinks or not any(drawn[i] for i in argnums) or attempt == resample:
                break
            notes.append(f"drawn again: a kink within the smallest step at {_kink_text(report.kinks)}")
            values, _ = _fill(args, np.random.default_rng(seed + 7919 + 104729 * (attempt + 1)), dtype,
                              keep=[None if drawn[i] else values[i] for i in range(len(args))])
    if report.kinks:
        where = "the given input" if not any(drawn[i] for i in argnums) else \
            "the drawn point" + (f", drawn {attempt + 1} times" if attempt else "")
        notes.append(f"kink at {where}: {_kink_text(report.kinks)}: one-sided derivatives differ "
                     f"there, so it is left out of fd (and of ref); not a failure")
    return _with_notes(report, notes)


def assert_vjp_close(f: Callable, *args, **kwargs) -> GradientReport:
    """:func:`check_vjp`, raising ``AssertionError`` with the report's table unless it passes.

    For tests: ``bp.assert_vjp_close(my_softplus, jax.ShapeDtypeStruct((3, 4), jnp.float32))``
    (the README has the whole example). Returns the report.
    """
    report = check_vjp(f, *args, **kwargs)
    if not report.ok:
        raise AssertionError(f"the VJP of {_fn_name(f)} differs from the references\n{report}")
    return report


# ----------------------------------------------------------------------------- arguments


def _validated(f, reference, dtype, args):
    if not callable(f):
        raise TypeError(f"{_NAME}: expected a callable f, got {type(f).__name__}")
    if reference is not None and not callable(reference):
        raise TypeError(f"{_NAME}: expected reference to be a callable or None, got {type(reference).__name__}")
    if not args:
        raise ValueError(f"{_NAME}: expected at least one argument for {_fn_name(f)}, got none")
    if dtype is not None:
        try:
            dtype = jnp.dtype(dtype)
        except TypeError:
            dtype = None if dtype is None else str(dtype)
        if not isinstance(dtype, np.dtype) or dtype.name not in _FLOATS:
            raise ValueError(f"{_NAME}: expected dtype float64, float32, float16 or bfloat16, got {dtype!r}")
    return f, reference, dtype


def _allowed(allow_unchecked):
    """``allow_unchecked`` as the engine takes it (True, or a tuple of names), checked at once."""
    if allow_unchecked is True or allow_unchecked is False:
        return allow_unchecked or ()
    names = (allow_unchecked,) if isinstance(allow_unchecked, str) else allow_unchecked
    if not isinstance(names, (tuple, list, set, frozenset)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{_NAME}: expected allow_unchecked to be a bool or gradient names like 'dx', "
                        f"got {allow_unchecked!r}")
    return tuple(names)


def _is_shape(a) -> bool:
    return isinstance(a, jax.ShapeDtypeStruct) or (
        isinstance(a, tuple) and len(a) > 0 and all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                                                    for d in a))


def _fill(args, gen, dtype, keep=None) -> tuple:
    """The arguments with shapes replaced by drawn values and float leaves cast to ``dtype``;
    and, per argument, whether anything in it was drawn. ``keep[i]``: use that argument as is."""
    values, drawn = [], []
    for i, a in enumerate(args):
        if keep is not None and keep[i] is not None:
            values.append(keep[i])
            drawn.append(False)
            continue
        flag = [False]

        def leaf(x, i=i):
            if _is_shape(x):
                flag[0] = True
                return _draw(x, gen, dtype, i)
            if isinstance(x, float) or (hasattr(x, "dtype") and hasattr(x, "shape")):
                x = jnp.asarray(x)
                return x.astype(dtype) if dtype is not None and is_floating(x) else x
            return x

        values.append(jax.tree_util.tree_map(leaf, a, is_leaf=_is_shape))
        drawn.append(flag[0])
    return values, drawn


def _draw(spec, gen, dtype, i):
    shape = tuple(spec.shape) if isinstance(spec, jax.ShapeDtypeStruct) else tuple(spec)
    if any(int(d) < 0 for d in shape):
        raise ValueError(f"{_NAME}: expected non-negative dimensions for argument {i}, got shape {shape}")
    d = dtype if dtype is not None else (spec.dtype if isinstance(spec, jax.ShapeDtypeStruct) else default_dtype())
    if not jnp.issubdtype(d, jnp.floating):
        raise ValueError(f"{_NAME}: expected a floating-point ShapeDtypeStruct for argument {i} "
                         f"(pass integer inputs as arrays), got {jnp.dtype(d).name}")
    if math.prod(shape) == 1:
        v = gen.choice([-1.0, 1.0]) * gen.uniform(0.5, 1.5, shape)
    else:
        v = gen.standard_normal(shape)
    return jnp.asarray(v, d)


def _argnums(argnums, values) -> tuple:
    n = len(values)
    has_float = [any(is_floating(a) for a in jax.tree_util.tree_leaves(v)) for v in values]
    if argnums is None:
        argnums = tuple(i for i in range(n) if has_float[i])
        if not argnums:
            raise ValueError(f"{_NAME}: expected a floating-point input among the {n} arguments, got none")
        return argnums
    one = isinstance(argnums, (int, np.integer)) and not isinstance(argnums, bool)
    nums = (argnums,) if one else tuple(argnums) if isinstance(argnums, (tuple, list)) else None
    if nums is None or not nums or any(not isinstance(k, (int, np.integer)) or isinstance(k, bool) for k in nums):
        raise TypeError(f"{_NAME}: expected argnums to be an int or a tuple of ints, got {argnums!r}")
    nums = tuple(int(k) % n if -n <= int(k) < n else int(k) for k in nums)
    bad = [k for k in nums if not 0 <= k < n]
    if bad or len(set(nums)) != len(nums):
        raise ValueError(f"{_NAME}: expected distinct argnums within the {n} arguments, got {argnums!r}")
    if not any(has_float[k] for k in nums):
        raise ValueError(f"{_NAME}: expected a floating-point input among the arguments {nums}, got none")
    return tuple(sorted(nums))


def _argument_names(f, n: int) -> list:
    """``x``, ``w``… from f's signature (``args[i]`` where it has none)."""
    try:
        params = list(inspect.signature(f).parameters.values())
    except (TypeError, ValueError):
        params = []
    names, k = [], 0
    for i in range(n):
        while k < len(params) and params[k].kind in (params[k].KEYWORD_ONLY, params[k].VAR_KEYWORD):
            k += 1
        if k < len(params) and params[k].kind == params[k].VAR_POSITIONAL:
            names.append(f"{params[k].name}[{i - k}]")
        elif k < len(params):
            names.append(params[k].name)
            k += 1
        else:
            names.append(f"args[{i}]")
    return names


def _fn_name(f) -> str:
    return getattr(f, "__name__", None) or getattr(getattr(f, "fun", None), "__name__", None) or type(f).__name__


# ----------------------------------------------------------------------------- one check


def _check_at(f, reference, values, argnums, names, dtype, **kw) -> GradientReport:
    """One run of the engine at the point ``values``."""
    fixed = {i: v for i, v in enumerate(values) if i not in argnums}
    dynamic = {i: v for i, v in fixed.items() if _is_arrays(v)}
    static = {i: v for i, v in fixed.items() if i not in dynamic}

    def call(g, trees, aux):
        full = dict(static)
        full.update(aux)
        full.update(zip(argnums, trees))
        return g(*[full[i] for i in range(len(values))])

    fn = lambda trees, aux: call(f, trees, aux)
    ref = None if reference is None else (lambda trees, aux: call(reference, trees, aux))

    def manual(trees, aux, dy):
        _, pullback = jax.vjp(lambda *t: fn(t, aux), *trees)
        return pullback(dy)

    groups = [(f"d{names[i]}", values[i]) for i in argnums]
    y = jax.eval_shape(lambda t, a: fn(t, a), tuple(values[i] for i in argnums), dynamic)
    if reference is not None:
        _same_outputs(y, jax.eval_shape(lambda t, a: ref(t, a), tuple(values[i] for i in argnums), dynamic))
    low = dtype or lowest_float([[values[i] for i in argnums], y])
    key = (f, reference, argnums, tuple(static.items()), tuple(sorted(dynamic)))   # f's programs are kept by it
    try:
        hash(key)
    except TypeError:                            # an argument held fixed is not hashable: not kept
        key = None
    methods = ("fd", "vjp") if reference is not None else ("fd",)
    return run(_NAME, f"check_vjp({_fn_name(f)})", fn, manual, groups, dynamic, dtype=low, methods=methods,
               jit=True, fd_dtype=jnp.float64, details=_details(low, values, argnums, y), reference=ref,
               upcast_reference=True, per_output=True, sample=_SAMPLE, kinks=True, low_floor=_LOW_FLOOR,
               labels={"vjp": "ref"}, signs=_SIGNS, detect_precision=True, program_key=key,
               legend=_legend(reference is not None, kw["coords"]), show_where=True, **kw)


def _is_arrays(tree) -> bool:
    return all(hasattr(a, "dtype") and hasattr(a, "shape") for a in jax.tree_util.tree_leaves(tree))


def _same_outputs(y, r) -> None:
    if jax.tree_util.tree_structure(y) != jax.tree_util.tree_structure(r) or any(
            a.shape != b.shape for a, b in zip(jax.tree_util.tree_leaves(y), jax.tree_util.tree_leaves(r))):
        raise ValueError(f"{_NAME}: expected reference to return what f returns, {_describe(y)}, "
                         f"got {_describe(r)}")


def _describe(tree) -> str:
    leaves = [f"{jnp.dtype(a.dtype).name}{list(a.shape)}" for a in jax.tree_util.tree_leaves(tree)]
    return leaves[0] if len(leaves) == 1 and not isinstance(tree, (tuple, list, dict)) else f"({', '.join(leaves)})"


def _details(dtype, values, argnums, y) -> str:
    ins = ", ".join(_describe(values[i]) for i in argnums)
    return f"{jnp.dtype(dtype).name} · inputs {ins} · output {_describe(y)} · random cotangent dy"


def _legend(with_reference: bool, coords: int) -> tuple:
    lines = ["checked: jax.vjp of f (its custom_vjp bwd rule) along dy, one output leaf at a time",
             "fd  = central differences of f in {fd} (on upcast copies), along every coordinate of a leaf of "
             f"≤ {coords} elements, else {{n}} random directions v0, v1… and {_SAMPLE} random coordinates; "
             "order of the Taylor remainder: ≈2 right, ≈1 wrong, — linear, (…) not binding (kink)"]
    if with_reference:
        lines.append("ref = jax.vjp of reference, in float64 on upcast copies")
    lines.append("at  = where the largest disagreement sits: an element, or a random direction vK")
    return tuple(lines)


def _kink_text(kinks: dict) -> str:
    return "; ".join(f"{g} at {', '.join(str(k) for k in points)}" for g, points in kinks.items())


def _with_notes(report: GradientReport, notes: list) -> GradientReport:
    return dataclasses.replace(report, notes=report.notes + tuple(notes)) if notes else report
