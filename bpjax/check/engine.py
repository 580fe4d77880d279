"""One gradient check, as five parts in order: draw, references, finite differences, compare, report.

:func:`run` is what every front-end calls (:func:`bpjax.check_layer`, ``check_model``,
``check_loss``, :func:`bpjax.check_vjp`): each front-end only says what the forward is, what the
hand-written gradient is, and how to name the inputs.

1. draw (:mod:`._gradcheck_draw`): the cotangent ``dy`` and the directions ``v``;
2. references (:mod:`._gradcheck_refs`): ``jax.vjp`` and ``jax.jvp`` of the forward (or of a
   reference function), compiled with the hand-written gradient into one program;
3. finite differences (:mod:`._gradcheck_fd`): ``⟨dy, f(θ ± h v)⟩`` in float64 at 14 steps;
4. compare (:mod:`._gradcheck_compare`): per leaf (and output block) and reference;
5. report (:mod:`._gradcheck_report`): the rows, the table.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._grad import cast_floating
from . import draw
from .compare import TOLERANCES, compare, denominators, rounding_noise, tolerances
from .fd import evaluate_along, fd_row, kinked, measured_noise, taylor_order
from .refs import Problem, directional, evaluate, jvp_reference, to_host, vjp_reference, x64
from .report import METHODS, Comparison, GradientReport

PyTree = Any


def run(name: str, title: str, fn: Callable, manual: Callable, groups: Sequence[tuple], aux: PyTree, *,
        dtype, methods, rtol, atol, directions: int, seed: int, cotangent, jit: bool,
        fd_dtype, min_order: Optional[float], details: str, reference: Optional[Callable] = None,
        upcast_reference: bool = False, per_output: bool = False, coords: int = 0, sample: int = 0,
        kinks: bool = False, low_floor: Optional[float] = None,
        labels: Optional[dict] = None, legend: tuple = (), show_where: bool = False) -> GradientReport:
    """Compare ``manual`` with the references for ``fn``.

    ``fn(trees, aux) -> y`` is the forward, a function of the inputs ``trees`` (one tree per
    group, e.g. ``(params, x)``) and of ``aux`` (state, key, target: not differentiated).
    ``manual(trees, aux, dy) -> grads``, one gradient tree per group. ``groups`` are
    ``(prefix, tree)`` pairs naming the rows: ``("dparams", params)``, ``("dx", x)``.

    Options of :func:`bpjax.check_vjp`: ``reference(trees, aux)`` is differentiated by the
    ``vjp``/``jvp`` references instead of ``fn`` (in float64 on upcast copies with
    ``upcast_reference``); ``per_output`` pulls back one output leaf at a time; leaves of at
    most ``coords`` elements are differentiated along their coordinate axes (larger ones along
    ``sample`` random axes too, after the random directions); ``kinks`` leaves
    out directions with a kink within the smallest step and holds the Taylor remainder to the
    measured noise of the forward; ``low_floor``: below float64, the hand-written gradient is
    also run on upcast copies, the difference is taken as its rounding, per element, and the
    floor drops to ``low_floor`` (unless ``rtol`` sets one); ``labels`` renames references.
    """
    methods, directions = _validated(name, methods, directions)
    tol, base_tol = tolerances(dtype, rtol, name), tolerances(dtype, None, name)
    gen = np.random.default_rng(seed)
    fd_dtype = jnp.dtype(fd_dtype)
    if "fd" in methods and fd_dtype != jnp.float64:
        warnings.warn(f"{name}: finite differences in {fd_dtype.name} are unreliable: rounding error "
                      f"≈ ε/h swamps the derivative; use fd_dtype=float64 (the default), which bpjax "
                      f"runs under jax.enable_x64 even when x64 is off", stacklevel=4)
        tol["fd"] = max(tol["fd"], TOLERANCES.get(fd_dtype.name, TOLERANCES["float32"])["fd"] * 10)

    # 1. draw: the cotangent, the leaves compared, the directions
    problem = Problem(fn, manual, groups, aux)
    y_struct = problem.output_struct()
    dy = draw.cotangent(name, y_struct, cotangent, gen)
    problem.validate(dy)
    blocks = _blocks(y_struct, dy, per_output)
    V, elements = draw.directions(gen, problem.x0, directions, coords, sample)

    # 2.–3. the hand-written gradient, the references and the finite differences, compiled
    twice = low_floor is not None and jnp.dtype(dtype) != jnp.float64
    out, skipped, fd_used = _compute(problem, [d for _, d in blocks], V, methods, dtype=dtype, jit=jit,
                                     fd_dtype=fd_dtype, reference=reference, upcast=upcast_reference,
                                     twice=twice)
    if "manual_up" in out and not (isinstance(rtol, Mapping) and "floor" in rtol):
        tol["floor"] = base_tol["floor"] = min(tol["floor"], low_floor)

    # 4. compare, leaf by leaf, block by block, reference by reference
    fd_eps = float(jnp.finfo(fd_dtype).eps)
    pairs, found = _pairs(problem, out, skipped, V, elements, len(blocks), methods, fd_eps, kinks)
    # rounding of the hand-written gradient: measured per element when it also ran on float64
    # copies, else modelled from the dtype's ε
    noise = rounding_noise(fd_dtype if "manual_up" in out else dtype, jax.tree_util.tree_leaves(dy),
                           out.get("y", []), pairs, methods)
    rows = list(problem.rows)
    for j, i in enumerate(problem.valid):
        for b, (output, _) in enumerate(blocks):
            for m in methods:
                rows.append(_row(problem.names[i], tuple(problem.leaves[i].shape), output, m, pairs.get((j, b, m)),
                                 skipped, found.get((j, b)), elements[j], tol, base_tol, atol, noise, out, b,
                                 fd_eps, min_order, labels or {}))

    # 5. report
    order_of = {n: k for k, n in enumerate(problem.names)}
    rows.sort(key=lambda r: (order_of.get(r.gradient, -1), r.reference != "shape"))
    fd_name = min(fd_used, key=lambda d: jnp.finfo(d).bits) if fd_used else fd_dtype.name
    shown = tuple((labels or {}).get(m, m) for m in methods)
    return GradientReport(title, details + _directions_text(methods, directions, coords, sample), tuple(rows),
                          shown, directions, fd_name, legend=legend, show_where=show_where)


def _directions_text(methods, directions: int, coords: int, sample: int) -> str:
    if "fd" not in methods and "jvp" not in methods:
        return ""
    if not coords:
        return f" · {directions} directions"
    return (f" · every coordinate of leaves ≤ {coords} elements, else {directions} random directions"
            + (f" and {sample} random coordinates" if sample else ""))


def _validated(name: str, methods, directions) -> tuple:
    methods = tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"{name}: expected methods among {METHODS}, got {methods!r}")
    directions = int(directions)
    if directions < 1:
        raise ValueError(f"{name}: expected directions >= 1, got {directions}")
    return methods, directions


def _blocks(y_struct, dy, per_output: bool) -> list:
    """``(output name, cotangent)`` pairs: the whole ``dy``, or one output leaf's at a time
    (the other leaves zero) when ``per_output`` and y has several leaves."""
    paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(y_struct)]
    if not per_output or len(paths) < 2:
        return [("", dy)]
    leaves, treedef = jax.tree_util.tree_flatten(dy)
    return [("y" + jax.tree_util.keystr(p),
             jax.tree_util.tree_unflatten(treedef, [a if k == o else jnp.zeros_like(a) for k, a in enumerate(leaves)]))
            for o, p in enumerate(paths)]


def _compute(problem: Problem, dys: list, V: list, methods, *, dtype, jit, fd_dtype, reference, upcast,
             twice=False):
    """Run the hand-written gradient and the references: per leaf ``manual`` and ``vjp`` (B, *shape),
    ``jvp`` (Σ D, B), ``fd`` = (g0 (B,), Σ|dy ⊙ y| (B,), g(±h) (Σ D, 2K, B)); and ``y``. With
    ``twice``, ``manual_up``: the hand-written gradient on float64 copies (its rounding is the
    difference), skipped if it cannot run there."""
    x0, n_valid = problem.x0, len(problem.x0)
    psize = max(1, sum(int(a.size) for a in x0))
    ref = problem.fn_valid if reference is None else (lambda v, a: reference(problem.with_leaves(v), a))
    fd_used = set()                 # the dtype the finite differences ran in, seen at trace time
    cast = lambda t: cast_floating(t, fd_dtype)

    def manual(x_, a_, c_):
        per_block = [problem.manual_valid(x_, a_, c) for c in c_]
        return [jnp.stack([g[j] for g in per_block]) for j in range(n_valid)]

    def finite_differences(x_, a_, c_, Vfd):
        x_, a_, c_ = cast(x_), cast(a_), cast(c_)
        fd_used.update(jnp.dtype(a.dtype).name for a in x_)
        return evaluate_along(lambda v: problem.fn_valid(v, a_), x_, c_,
                              lambda along, n: directional(Vfd, along, n, psize))

    def vjp(x_, a_, c_):
        x_, a_, c_ = (cast(x_), cast(a_), cast(c_)) if upcast else (x_, a_, c_)
        return vjp_reference(lambda v: ref(v, a_), x_, c_)

    parts = {
        "y": lambda x_, a_, c_, V_, Vfd: jax.tree_util.tree_leaves(problem.fn_valid(x_, a_)),
        "manual": lambda x_, a_, c_, V_, Vfd: manual(x_, a_, c_),
        "vjp": lambda x_, a_, c_, V_, Vfd: vjp(x_, a_, c_),
        "jvp": lambda x_, a_, c_, V_, Vfd: jvp_reference(lambda v: ref(v, a_), x_, c_, V_, psize),
        "fd": lambda x_, a_, c_, V_, Vfd: finite_differences(x_, a_, c_, Vfd),
        "manual_up": lambda x_, a_, c_, V_, Vfd: manual(cast(x_), cast(a_), cast(c_)),
    }
    todo = [m for m in methods if n_valid] + (["manual_up"] if twice and n_valid else [])
    wide_apart = fd_dtype == jnp.float64 and not jax.config.jax_enable_x64
    apart = [m for m in todo if wide_apart and (m in ("fd", "manual_up") or (upcast and m == "vjp"))]
    together = (["y"] if n_valid else []) + (["manual"] if jit else []) + [m for m in todo if m not in apart]

    def args(names):
        return (x0, problem.aux, dys, [jnp.asarray(v, a.dtype) for v, a in zip(V, x0)],
                [jnp.asarray(v, fd_dtype) for v in V] if "fd" in names else None)

    main_ctx = lambda: x64() if jnp.dtype(dtype).name == "float64" else contextlib.nullcontext()
    out, skipped = evaluate(parts, together, apart, args, main_ctx)
    if not jit:
        with main_ctx():
            out["manual"] = [to_host(a) for a in manual(x0, problem.aux, dys)]
    return out, skipped, fd_used


def _pairs(problem, out, skipped, V, elements, n_blocks, methods, fd_eps, kinks) -> tuple:
    """``(a, b, extra noise)`` per (leaf, block, reference), and the kinked directions found."""
    grads, up = out.get("manual", []), out.get("manual_up")
    offsets = np.cumsum([0] + [v.shape[0] for v in V])
    seg = lambda arr, j: arr[offsets[j]:offsets[j + 1]]
    pairs, found = {}, {}
    for j, v in enumerate(V):
        flat_v = v.reshape(v.shape[0], -1)
        for b in range(n_blocks):
            proj = flat_v @ grads[j][b].reshape(-1)                       # ⟨manual gradient, v⟩
            # its rounding, per element: 3 × |the gradient − the same rule on float64 copies|
            rounding = 0.0 if up is None else 3 * np.abs(grads[j][b] - up[j][b]).reshape(-1)
            if "fd" in methods and "fd" not in skipped:
                g0, gabs, gh = float(out["fd"][0][b]), float(out["fd"][1][b]), seg(out["fd"][2], j)[:, :, b]
                bent = kinked(gh, g0, gabs, fd_eps) if kinks else np.zeros(gh.shape[0], bool)
                if bent.any():
                    found[j, b] = np.flatnonzero(bent)
                keep = ~bent if bent.any() else None
                err_v = np.abs(flat_v) @ rounding if up is not None else 0.0
                a, fd, err, plus = fd_row(proj, gh, g0, gabs, fd_eps, keep, err_v)
                noise = (measured_noise(gh, g0) if keep is None else measured_noise(gh, g0)[keep]) if kinks else None
                pairs[j, b, "fd"] = (a, fd, err, plus, g0, gabs, noise)
            if "vjp" in methods and "vjp" not in skipped:
                a, r = grads[j][b].reshape(-1), out["vjp"][j][b].reshape(-1)
                extra = np.broadcast_to(rounding, a.shape)
                at_kink = _kinked_elements(found.get((j, b)), elements[j])
                if at_kink.size:                                          # elements at a kink
                    keep = np.ones(a.size, bool)
                    keep[at_kink] = False
                    a, r, extra = a[keep], r[keep], extra[keep]
                pairs[j, b, "vjp"] = (a, r, extra if up is not None else 0.0)
            if "jvp" in methods and "jvp" not in skipped:
                pairs[j, b, "jvp"] = (proj, seg(out["jvp"], j)[:, b], 0.0)
    return pairs, found


def _kinked_elements(bent, elements) -> np.ndarray:
    """The flat elements whose coordinate direction crosses a kink (random directions name none)."""
    if bent is None:
        return np.zeros(0, int)
    return np.unique(elements[bent][elements[bent] >= 0])


def _row(name, shape, output, m, pair, skipped, bent, elements, tol, base_tol, atol, noise, out, b,
         fd_eps, min_order, labels) -> Comparison:
    """One row of the report: leaf ``name`` (for ``output``) against reference ``m``."""
    ref = labels.get(m, m)
    if m in skipped:
        return Comparison(name, shape, ref, math.nan, math.nan, math.nan, 0.0, True,
                          note=f"skipped: {skipped[m]}", output=output)
    a_, b_, extra = pair[:3]
    # rounding noise counts as agreement at the dtype's default tolerance (an override of
    # rtol changes what counts as agreement, not what counts as rounding)
    floor_noise = np.maximum(extra, noise[m]) / base_tol[m]
    max_abs, max_rel, cosine, ok, worst = compare(a_, b_, tol[m], tol["floor"], atol, floor_noise)
    if m == "vjp":                                                   # elements, some left out at kinks
        left_out = _kinked_elements(bent, elements)
        where = "" if worst is None else _element(_skip(worst, left_out), shape)
        kinks = tuple(_element(e, shape) for e in left_out)
    else:                                                            # directions, some left out at kinks
        left_out = np.asarray([] if bent is None or m != "fd" else bent, int)
        where = "" if worst is None else _direction(_skip(worst, left_out), elements, shape)
        kinks = tuple(_direction(d, elements, shape) for d in left_out)
    common = dict(output=output, where=where, kinks=kinks)
    if m != "fd":
        return Comparison(name, shape, ref, max_abs, max_rel, cosine, tol[m], ok, **common)
    plus, g0, gabs, g_noise = pair[3:]
    allowed = tol["fd"] * denominators(a_, b_, tol["floor"], floor_noise)    # per direction
    order, binding = taylor_order(plus, g0, a_, allowed, gabs, fd_eps, g_noise)
    ok = ok and (min_order is None or binding is None or binding >= min_order)
    return Comparison(name, shape, "fd", max_abs, max_rel, cosine, tol["fd"], ok,
                      order=order if binding is None else binding,
                      order_binding=binding is not None or order is None or min_order is None or order >= min_order,
                      **common)


def _skip(k: int, left_out) -> int:
    """The index of the k-th point kept, counting past the ``left_out`` ones."""
    for d in sorted(int(x) for x in left_out):
        if d <= k:
            k += 1
    return k


def _element(flat: int, shape) -> str:
    return str(tuple(int(i) for i in np.unravel_index(int(flat), shape))) if shape else "()"


def _direction(d: int, elements, shape) -> str:
    """Direction ``d`` of a leaf: the element it moves alone, or ``v<d>`` for a random one."""
    return _element(elements[d], shape) if elements[d] >= 0 else f"v{d}"
