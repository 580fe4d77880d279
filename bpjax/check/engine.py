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

No reference, no pass: a leaf (for an output block) that no reference compared — every one
skipped, or every direction at a kink or the edge of f's domain — is reported ``not checked``
and fails, unless the front-end names it in ``unchecked``. When the float64 differences
cannot run, they run in f's own precision instead, with that precision's tolerances.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._grad import cast_floating
from . import draw
from .compare import TOLERANCES, compare, denominators, rounding_noise, tolerances
from .fd import at_edge, evaluate_along, fd_row, forward_precision, kinked, measured_noise, taylor_order
from .refs import Problem, directional, evaluate, jvp_reference, to_host, vjp_reference, x64
from .report import METHODS, Comparison, GradientReport

PyTree = Any


def run(name: str, title: str, fn: Callable, manual: Callable, groups: Sequence[tuple], aux: PyTree, *,
        dtype, methods, rtol, atol, directions: int, seed: int, cotangent, jit: bool,
        fd_dtype, min_order: Optional[float], details: str, reference: Optional[Callable] = None,
        upcast_reference: bool = False, per_output: bool = False, coords: int = 0, sample: int = 0,
        kinks: bool = False, low_floor: Optional[float] = None,
        labels: Optional[dict] = None, legend: tuple = (), show_where: bool = False, signs: int = 0,
        detect_precision: bool = False, unchecked=(), program_key=None) -> GradientReport:
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
    floor drops to ``low_floor`` (unless ``rtol`` sets one); ``labels`` renames references;
    ``signs``: an output block of at most this many elements is also pulled back along
    ``−dy`` (a rule using ``|g|`` for ``g`` passes whenever every element of ``dy`` is
    positive); ``detect_precision``: find a forward that computes below float64 inside
    (:func:`._gradcheck_fd.forward_precision`) and hold its differences to that precision;
    ``unchecked``: names of leaves (or True for all) that may go unchecked without failing;
    ``program_key``: a hashable key for ``fn`` and ``manual`` (equal keys: the same functions),
    under which the compiled programs are kept for the next check at the same shapes.
    """
    methods, directions = _validated(name, methods, directions)
    gen = np.random.default_rng(seed)
    fd_dtype = jnp.dtype(fd_dtype)
    if "fd" in methods and fd_dtype != jnp.float64:
        warnings.warn(f"{name}: finite differences in {fd_dtype.name} are unreliable: rounding error "
                      f"≈ ε/h swamps the derivative; use fd_dtype=float64 (the default), which bpjax "
                      f"runs under jax.enable_x64 even when x64 is off", stacklevel=4)

    # 1. draw: the cotangent, the leaves compared, the directions
    problem = Problem(fn, manual, groups, aux)
    y_struct = problem.output_struct()
    dy = draw.cotangent(name, y_struct, cotangent, gen)
    problem.validate(dy)
    blocks = _blocks(y_struct, dy, per_output, signs)
    V, elements = draw.directions(gen, problem.x0, directions, coords, sample)

    # 2.–3. the hand-written gradient, the references and the finite differences, compiled
    out, skipped, fd_name, fallback = _compute(problem, [d for _, d in blocks], V, methods, dtype=dtype, jit=jit,
                                               fd_dtype=fd_dtype, reference=reference, upcast=upcast_reference,
                                               twice=low_floor is not None and jnp.dtype(dtype) != jnp.float64,
                                               program_key=program_key)
    level, tol, base_tol, tol_dtype = _tolerances(name, dtype, rtol, methods, fd_dtype, out, fallback,
                                                  detect_precision, low_floor)

    # 4. compare, leaf by leaf, block by block, reference by reference
    fd_eps = float(jnp.finfo(fallback[0] if fallback else fd_dtype).eps)
    level_eps = fd_eps if level is None else float(jnp.finfo(level).eps)
    pairs, found, edges = _pairs(problem, out, skipped, V, elements, len(blocks), methods, fd_eps, kinks,
                                 noisy=level_eps if level is not None else None)
    # rounding of the hand-written gradient: measured per element when it also ran on float64
    # copies, else modelled from the dtype's ε (or, below it, from f's own precision)
    noise = rounding_noise(tol_dtype if level is not None else fd_dtype if "manual_up" in out else dtype,
                           jax.tree_util.tree_leaves(dy), out.get("y", []), pairs, methods)
    rows = list(problem.rows)
    for j, i in enumerate(problem.valid):
        for b, (output, _) in enumerate(blocks):
            rows += _unchecked([_row(problem.names[i], tuple(problem.leaves[i].shape), output, m, pairs.get((j, b, m)),
                                     skipped, found.get((j, b)), edges.get((j, b)), elements[j], tol, base_tol, atol,
                                     noise, out, b, level_eps, min_order, labels or {}) for m in methods],
                               unchecked is True or problem.names[i] in (unchecked or ()))

    # 5. report
    order_of = {n: k for k, n in enumerate(problem.names)}
    rows.sort(key=lambda r: (order_of.get(r.gradient, -1), r.reference != "shape"))
    shown = tuple((labels or {}).get(m, m) for m in methods)
    return GradientReport(title, details + _directions_text(methods, directions, coords, sample), tuple(rows),
                          shown, directions, fd_name, legend=(*legend, *_twin_legend(signs, blocks)),
                          show_where=show_where, notes=_notes(fallback, level, tol_dtype, rows, problem))


def _twin_legend(signs: int, blocks) -> tuple:
    """The legend's line for the rows pulled back along −dy, when there are any."""
    if not any(output.endswith("−dy") for output, _ in blocks):
        return ()
    line = (f"−dy = the same, pulled back along −dy (an output of ≤ {signs} elements: a rule using |g| for g "
            f"passes along a positive dy)")
    return (line,)


def _tolerances(name, dtype, rtol, methods, fd_dtype, out, fallback, detect_precision, low_floor) -> tuple:
    """``level``, the precision of f's differences: None for fd_dtype's, else f's own (when
    float64 cannot run, or when f computes below it inside); ``tol``, ``base_tol`` (without
    ``rtol``) and the dtype they are for, the narrower of ``dtype`` and ``level``. The floor
    drops to ``low_floor`` when the rounding of the hand-written gradient was measured."""
    level = fallback[0] if fallback else (forward_precision(out["fd"]) if detect_precision and "fd" in out
                                          and fd_dtype == jnp.float64 else None)
    low_floor = low_floor if "manual_up" in out else None
    tol_dtype = dtype if level is None else min([jnp.dtype(dtype), jnp.dtype(level)], key=draw.precision_rank)
    tol, base_tol = tolerances(tol_dtype, rtol, name), tolerances(tol_dtype, None, name)
    if "fd" in methods and fd_dtype != jnp.float64:
        tol["fd"] = max(tol["fd"], TOLERANCES.get(fd_dtype.name, TOLERANCES["float32"])["fd"] * 10)
    if low_floor is not None and level is None and not (isinstance(rtol, Mapping) and "floor" in rtol):
        tol["floor"] = base_tol["floor"] = min(tol["floor"], low_floor)
    return level, tol, base_tol, tol_dtype


def _unchecked(rows: list, allowed: bool) -> list:
    """The rows of one leaf (and output block): as they are when a reference compared it, else
    each ``not checked``, failing unless ``allowed``."""
    if any(r.checked for r in rows):
        return rows
    return [dataclasses.replace(r, ok=allowed, note=("not checked (allowed): " if allowed else "not checked: ")
                                + r.note) for r in rows]


def _notes(fallback, level, tol_dtype, rows, problem) -> tuple:
    """Lines under the table: differences in a lower precision, and points at the domain's edge."""
    notes = []
    if fallback:
        notes.append(f"fd in {fallback[0]}: f cannot run on float64 copies ({fallback[1]}), so its differences "
                     f"are in its own precision, with {jnp.dtype(tol_dtype).name} tolerances")
    elif level:
        notes.append(f"f computes in {level} inside: on float64 copies no perturbation below {level}'s resolution "
                     f"moves its output, so its differences carry {level} rounding; fd steps are chosen for that "
                     f"noise and the tolerances are {level}'s")
    edge = {}
    for r in rows:
        if r.edges:
            edge.setdefault(r.gradient, [])
            edge[r.gradient] += [e for e in r.edges if e not in edge[r.gradient]]
    if edge:
        size = {n: int(problem.leaves[i].size) for n, i in zip([problem.names[i] for i in problem.valid],
                                                                problem.valid)}
        text = "; ".join(f"{g} at {', '.join(points)} ({len(points)} of {size.get(g, '?')} elements"
                         + (" or directions" if any(p.startswith("v") for p in points) else "") + ")"
                         for g, points in edge.items())
        notes.append(f"edge of f's domain: {text}: f is not finite within the smallest steps there, so it is "
                     f"left out of fd; not a failure")
    return tuple(notes)


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


def _blocks(y_struct, dy, per_output: bool, signs: int = 0) -> list:
    """``(output name, cotangent)`` pairs: the whole ``dy``, or one output leaf's at a time
    (the other leaves zero) when ``per_output`` and y has several leaves; each of at most
    ``signs`` elements followed by its twin along ``−dy`` (named ``… −dy``)."""
    paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(y_struct)]
    leaves, treedef = jax.tree_util.tree_flatten(dy)
    if not per_output or len(paths) < 2:
        blocks = [("", dy, sum(int(a.size) for a in leaves))]
    else:
        blocks = [("y" + jax.tree_util.keystr(p),
                   jax.tree_util.tree_unflatten(treedef, [a if k == o else jnp.zeros_like(a)
                                                          for k, a in enumerate(leaves)]), int(leaves[o].size))
                  for o, p in enumerate(paths)]
    out = []
    for output, c, size in blocks:
        if 0 < size <= signs:
            out += [(output or "y", c), ((output or "y") + " −dy", jax.tree_util.tree_map(jnp.negative, c))]
        else:
            out.append((output, c))
    return out


def _compute(problem: Problem, dys: list, V: list, methods, *, dtype, jit, fd_dtype, reference, upcast,
             twice=False, program_key=None):
    """Run the hand-written gradient and the references: per leaf ``manual`` and ``vjp`` (B, *shape),
    ``jvp`` (Σ D, B), ``fd`` = (g0 (B,), Σ|dy ⊙ y| (B,), g(±h) (Σ D, 2K, B), the precision probe);
    and ``y``; then ``skipped``, the dtype the differences ran in and ``fallback``. With ``twice``, ``manual_up``: the hand-written gradient on float64 copies (its
    rounding is the difference), skipped if it cannot run there. When ``fd`` cannot run in
    float64 it runs in float32, or in ``dtype``: ``fallback`` is then (that dtype, the reason).
    ``program_key`` (from the front-end: f, and what else its forward closes over) keeps the
    compiled programs for the next check of the same f at the same shapes (another seed)."""
    x0, n_valid = problem.x0, len(problem.x0)
    psize = max(1, sum(int(a.size) for a in x0))
    ref = problem.fn_valid if reference is None else (lambda v, a: reference(problem.with_leaves(v), a))
    cast = lambda t, dt=fd_dtype: cast_floating(t, dt)

    def manual(x_, a_, c_):
        per_block = [problem.manual_valid(x_, a_, c) for c in c_]
        return [jnp.stack([g[j] for g in per_block]) for j in range(n_valid)]

    def finite_differences(x_, a_, c_, Vfd, dt=fd_dtype):
        x_, a_, c_ = cast(x_, dt), cast(a_, dt), cast(c_, dt)
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

    def args(names, dt=fd_dtype):
        return (x0, problem.aux, dys, [jnp.asarray(v, a.dtype) for v, a in zip(V, x0)],
                [jnp.asarray(v, dt) for v in V] if "fd" in names else None)

    main_ctx = lambda: x64() if jnp.dtype(dtype).name == "float64" else contextlib.nullcontext()
    key = _program_key(program_key, problem, (x0, problem.aux, dys, V), methods, dtype, fd_dtype, upcast, twice)
    out, skipped = evaluate(parts, together, apart, args, main_ctx, key)
    fallback = None
    if "fd" in skipped and fd_dtype == jnp.float64:                # in f's own precision instead
        fallback = _fd_fallback(finite_differences, args, main_ctx, dtype, out, skipped, key)
    if not jit:
        with main_ctx():
            out["manual"] = [to_host(a) for a in manual(x0, problem.aux, dys)]
    return out, skipped, fallback[0] if fallback else fd_dtype.name, fallback


def _program_key(program_key, problem, args, methods, dtype, fd_dtype, upcast, twice):
    """What the compiled programs of a check depend on beside the values of their arguments:
    the front-end's key for f (None: f's programs are not kept), the structure and shapes of
    the arguments, and the options. None when a leaf that is not compared would be baked in."""
    if program_key is None or len(problem.valid) != len(problem.leaves):
        return None
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return (program_key, tuple(problem.treedefs), treedef, tuple((np.shape(a), str(a.dtype)) for a in leaves),
            tuple(methods), jnp.dtype(dtype).name, fd_dtype.name, upcast, twice)


def _fd_fallback(finite_differences, args, main_ctx, dtype, out, skipped, key):
    """Run ``fd`` in float32, else in ``dtype``, when it could not run in float64: into ``out``;
    returns (the dtype it ran in, why float64 could not), or None."""
    for dt in dict.fromkeys([jnp.promote_types(dtype, jnp.float32), jnp.dtype(dtype)]):
        if dt == jnp.float64:
            continue
        part = {"fd": lambda x_, a_, c_, V_, Vfd, dt=dt: finite_differences(x_, a_, c_, Vfd, dt)}
        got, _ = evaluate(part, ["fd"], [], lambda names, dt=dt: args(names, dt), main_ctx,
                          None if key is None else (*key, "fd in", jnp.dtype(dt).name))
        if "fd" in got:
            out["fd"] = got["fd"]
            return jnp.dtype(dt).name, skipped.pop("fd")
    return None


def _pairs(problem, out, skipped, V, elements, n_blocks, methods, fd_eps, kinks, noisy=None) -> tuple:
    """``(a, b, extra noise)`` per (leaf, block, reference), and the directions found at a kink
    and at the edge of f's domain. ``noisy``: the ε of f's own precision when its differences
    carry rounding above ``fd_eps`` (float64 impossible, or a forward below it inside): the
    step is then the one of least error, counting that rounding and the measured noise."""
    grads, up = out.get("manual", []), out.get("manual_up")
    offsets = np.cumsum([0] + [v.shape[0] for v in V])
    seg = lambda arr, j: arr[offsets[j]:offsets[j + 1]]
    pairs, found, edges = {}, {}, {}
    for j, v in enumerate(V):
        flat_v = v.reshape(v.shape[0], -1)
        for b in range(n_blocks):
            proj = flat_v @ grads[j][b].reshape(-1)                       # ⟨manual gradient, v⟩
            # its rounding, per element: 3 × |the gradient − the same rule on float64 copies|
            rounding = 0.0 if up is None else 3 * np.abs(grads[j][b] - up[j][b]).reshape(-1)
            if "fd" in methods and "fd" not in skipped:
                g0, gabs, gh = float(out["fd"][0][b]), float(out["fd"][1][b]), seg(out["fd"][2], j)[:, :, b]
                edge = at_edge(gh, g0)                                    # f not finite within the steps
                bent = kinked(gh, g0, gabs, fd_eps) & ~edge if kinks else np.zeros(gh.shape[0], bool)
                if bent.any():
                    found[j, b] = np.flatnonzero(bent)
                if edge.any():
                    edges[j, b] = np.flatnonzero(edge)
                keep = ~(bent | edge) if (bent | edge).any() else None
                err_v = np.abs(flat_v) @ rounding if up is not None else 0.0
                g_noise = measured_noise(gh, g0)
                a, fd, err, plus = fd_row(proj, gh, g0, gabs, noisy or fd_eps, keep, err_v, g_noise if noisy else None)
                noise = (g_noise if keep is None else g_noise[keep]) if kinks or noisy else None
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
    return pairs, found, edges


def _kinked_elements(bent, elements) -> np.ndarray:
    """The flat elements whose coordinate direction crosses a kink (random directions name none)."""
    if bent is None:
        return np.zeros(0, int)
    return np.unique(elements[bent][elements[bent] >= 0])


def _row(name, shape, output, m, pair, skipped, bent, edge, elements, tol, base_tol, atol, noise, out, b,
         taylor_eps, min_order, labels) -> Comparison:
    """One row of the report: leaf ``name`` (for ``output``) against reference ``m``; ``checked``
    is False when ``m`` was skipped or every point was left out."""
    ref = labels.get(m, m)
    if m in skipped:
        return Comparison(name, shape, ref, math.nan, math.nan, math.nan, 0.0, True,
                          note=f"skipped: {skipped[m]}", output=output, checked=False)
    a_, b_, extra = pair[:3]
    if m == "vjp":                                                   # elements, some left out at kinks
        left_out = _kinked_elements(bent, elements)
        name_of = lambda k: _element(k, shape)
        kinks, edges = tuple(name_of(e) for e in left_out), ()
    else:                                                            # directions, some left out at kinks or edges
        bent, edge = (np.asarray([] if d is None or m != "fd" else d, int) for d in (bent, edge))
        left_out, name_of = np.concatenate([bent, edge]), lambda k: _direction(k, elements, shape)
        kinks, edges = tuple(name_of(d) for d in bent), tuple(name_of(d) for d in edge)
    if not np.size(a_) and math.prod(shape):                         # every point left out
        why = " or ".join(w for w, n in (("at the edge of f's domain", edges), ("at a kink", kinks)) if n)
        return Comparison(name, shape, ref, math.nan, math.nan, math.nan, 0.0, True, output=output, kinks=kinks,
                          edges=edges, checked=False,
                          note=f"compared nothing: every {'element' if m == 'vjp' else 'direction'} is {why}")
    # rounding noise counts as agreement at the dtype's default tolerance (an override of
    # rtol changes what counts as agreement, not what counts as rounding)
    floor_noise = np.maximum(extra, noise[m]) / base_tol[m]
    max_abs, max_rel, cosine, ok, worst = compare(a_, b_, tol[m], tol["floor"], atol, floor_noise)
    common = dict(output=output, where="" if worst is None else name_of(_skip(worst, left_out)), kinks=kinks,
                  edges=edges)
    if m != "fd":
        return Comparison(name, shape, ref, max_abs, max_rel, cosine, tol[m], ok, **common)
    plus, g0, gabs, g_noise = pair[3:]
    allowed = tol["fd"] * denominators(a_, b_, tol["floor"], floor_noise)    # per direction
    order, binding = taylor_order(plus, g0, a_, allowed, gabs, taylor_eps, g_noise)
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
