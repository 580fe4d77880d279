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
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ._core import Layer, Loss, check_is_layer, check_is_loss, check_model_and_loss, describe
from ._grad import value_and_grad

__all__ = ["Comparison", "GradientReport", "check_layer", "check_model", "check_loss",
           "assert_gradients_close", "per_example_grads"]

PyTree = Any
METHODS = ("vjp", "fd", "jvp")

#: Default relative tolerances per dtype and reference, and the floor: the relative error of
#: an element is ``|a − b| / max(floor · scale, |a| + |b|)`` where ``scale`` is the leaf's largest
#: ``|a| + |b|``, so elements far below the leaf's scale are judged on an absolute footing.
TOLERANCES = {
    "float64": {"vjp": 1e-8, "jvp": 1e-8, "fd": 1e-6, "floor": 1e-4},
    "float32": {"vjp": 1e-4, "jvp": 1e-4, "fd": 1e-3, "floor": 1e-2},
    "float16": {"vjp": 2e-2, "jvp": 2e-2, "fd": 5e-2, "floor": 2e-1},
    "bfloat16": {"vjp": 1e-1, "jvp": 1e-1, "fd": 1e-1, "floor": 5e-1},
}

# Finite-difference steps h_k = 0.1 · 2⁻ᵏ, k = 0 … 13 (0.1 down to 1.2e-5), times the leaf's RMS.
_STEPS = 0.1 * 0.5 ** np.arange(14)


# ----------------------------------------------------------------------------- the report


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One gradient leaf against one reference.

    Attributes:
        gradient: the leaf, named by its tree path (``"dparams[0]['w']"``, ``"dx"``).
        shape: the leaf's shape.
        reference: ``"vjp"``, ``"fd"`` or ``"jvp"``.
        max_abs: ``max |a − b|`` (for ``fd`` and ``jvp``, over the directional derivatives).
        max_rel: ``max |a − b| / max(ε, |a| + |b|)``, ε = floor × the leaf's scale.
        cosine: cosine similarity of ``a`` and ``b`` (1.0 when both are zero).
        rtol: the tolerance ``max_rel`` was held to.
        ok: whether it passed.
        order: ``fd`` only: observed order of the Taylor remainder (≈ 2 right, ≈ 1 wrong;
            ``None`` when the remainder is at rounding level: the function is linear along v).
        order_binding: False for a low order that did not decide the result: the remainder
            fell within tolerance at the smallest step (typically a relu kink crossed at larger
            steps); printed in parentheses.
        note: why a leaf could not be compared (wrong shape, dtype or structure).
    """

    gradient: str
    shape: tuple
    reference: str
    max_abs: float
    max_rel: float
    cosine: float
    rtol: float
    ok: bool
    order: Optional[float] = None
    order_binding: bool = True
    note: str = ""


_LEGEND = {
    "vjp": "vjp = jax.vjp of the same forward, pulled back along dy",
    "fd": "fd  = central differences in {fd}, {n} random directions per leaf; order of the Taylor "
          "remainder: ≈2 right, ≈1 wrong, — linear, (…) not binding (kink)",
    "jvp": "jvp = forward mode ⟨dy, J v⟩ vs ⟨grad, v⟩",
}


@dataclasses.dataclass(frozen=True)
class GradientReport:
    """The result of :func:`check_layer`, :func:`check_model` or :func:`check_loss`.

    ``str(report)`` is a table with one row per gradient leaf and reference, failing rows
    marked ``FAIL <--``; ``report.ok`` is true when every row passed.

    Attributes:
        title: what was checked (``"check_layer(dense)"``).
        details: dtype, input shape, cotangent, directions.
        rows: the :class:`Comparison` rows, leaf by leaf.
        methods: the references used.
        directions: random directions per leaf for ``fd`` and ``jvp``.
        fd_dtype: the dtype the finite differences actually ran in (float64 by default, even
            with x64 off: they run apart, under ``jax.enable_x64``).
    """

    title: str
    details: str
    rows: tuple
    methods: tuple = METHODS
    directions: int = 3
    fd_dtype: str = "float64"

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def failing(self) -> tuple:
        """Names of the failing gradient leaves, in table order."""
        return tuple(dict.fromkeys(r.gradient for r in self.rows if not r.ok))

    def row(self, gradient: str, reference: str) -> Comparison:
        """The row of ``gradient`` (e.g. ``"dparams['w']"``) against ``reference``."""
        for r in self.rows:
            if r.gradient == gradient and r.reference in (reference, "shape"):
                return r
        raise KeyError(f"GradientReport.row: expected one of {sorted({r.gradient for r in self.rows})} "
                       f"and a reference in {self.methods}, got ({gradient!r}, {reference!r})")

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILED: " + ", ".join(self.failing)
        head = ["gradient", "shape", "vs", "max abs err", "max rel err", "cosine", "order", "tol", "result"]
        table, notes, prev = [], [], None
        for r in self.rows:
            name, shape = (r.gradient, str(r.shape)) if r.gradient != prev else ("", "")
            prev = r.gradient
            result = ("—" if r.note else "ok") if r.ok else "FAIL <--"
            if r.note:                                    # spans the numeric columns
                table.append([name, shape, r.reference, r.note, result])
                continue
            order = "" if r.reference != "fd" else ("—" if r.order is None else f"{r.order:.2f}")
            order = order if r.order_binding else f"({order})"
            table.append([name, shape, r.reference, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}",
                          f"{r.cosine:.6f}", order, f"{r.rtol:.0e}", result])
        full = [t for t in table if len(t) == len(head)]
        widths = [max([len(h)] + [len(t[i]) for t in full] + [len(t[i]) for t in table if i < 3])
                  for i, h in enumerate(head)]
        line = lambda cols: "  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()
        out = [f"{self.title} — {verdict}", f"  {self.details}", line(head)]
        for t in table:
            out.append(line(t) if len(t) == len(head) else line(t[:3]) + "  " + t[3] + "  " + t[4])
        if not table:
            out.append("  (no floating-point inputs: nothing to check)")
        out += ["  " + _LEGEND[m].format(n=self.directions, fd=self.fd_dtype) for m in self.methods]
        return "\n".join(out)

    def summary(self) -> str:
        """One line: the verdict, the number of leaves, the worst relative error per reference."""
        worst = []
        for m in self.methods:
            rels = [r.max_rel for r in self.rows if r.reference == m and not r.note]
            if rels:
                worst.append(f"{m} {max(rels):.1e}")
            elif any(r.reference == m for r in self.rows):
                worst.append(f"{m} skipped")
        n = len(dict.fromkeys(r.gradient for r in self.rows))
        what = "ok  " if self.ok else "FAIL"
        tail = f"failing: {', '.join(self.failing)}" if not self.ok else "worst rel err " + ", ".join(worst)
        return f"{what}  {self.title:<44} {n} gradient{'s' if n != 1 else ' '}  {tail}"


# ----------------------------------------------------------------------------- helpers


def _is_float(a) -> bool:
    return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)


def _wide(dtype):
    """The dtype to accumulate inner products in: float64 if enabled, else float32."""
    return jnp.promote_types(dtype, jnp.float32) if not jax.config.jax_enable_x64 else jnp.float64


def _vdot(a: PyTree, b: PyTree):
    """Σ over all leaves of Σ a ⊙ b, accumulated in a wide dtype."""
    terms = [jnp.sum(x.astype(_wide(x.dtype)) * y.astype(_wide(x.dtype)))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
    return sum(terms) if terms else jnp.zeros((), _wide(jnp.float32))


def _abs_vdot(a: PyTree, b: PyTree):
    terms = [jnp.sum(jnp.abs(x.astype(jnp.float64) * y.astype(jnp.float64)))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
    return sum(terms) if terms else jnp.zeros((), jnp.float64)


def _cast_floats(tree: PyTree, dtype) -> PyTree:
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if _is_float(a) else a, tree)


def _jit(f):
    """``jax.jit`` at XLA optimisation level 0: a check runs each program once, and compiling
    dominates its cost (level 0 compiles about 2.5x faster here; the arithmetic is the same)."""
    return jax.jit(f, compiler_options={"xla_backend_optimization_level": 0})


def _x64():
    """A context in which float64 exists: a no-op when x64 is already enabled."""
    return contextlib.nullcontext() if jax.config.jax_enable_x64 else jax.enable_x64(True)


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def _tolerances(dtype, rtol, name: str) -> dict:
    base = dict(TOLERANCES.get(_dtype_name(dtype), TOLERANCES["float32"]))
    if rtol is None:
        return base
    if isinstance(rtol, Mapping):
        unknown = set(rtol) - set(METHODS) - {"floor"}
        if unknown:
            raise ValueError(f"{name}: expected rtol keys among {METHODS + ('floor',)}, got {sorted(unknown)}")
        base.update({k: float(v) for k, v in rtol.items()})
        return base
    return {**base, **{m: float(rtol) for m in METHODS}}


def _denominators(a: np.ndarray, b: np.ndarray, floor: float, noise=0.0) -> np.ndarray:
    """Per element ``max(|a| + |b|, floor · scale, noise)``, ``scale`` = the largest ``|a| + |b|``."""
    size = np.abs(a) + np.abs(b)
    scale = float(np.max(size)) if size.size and np.all(np.isfinite(size)) else np.inf
    return np.maximum(np.maximum(size, np.broadcast_to(np.asarray(noise, np.float64), size.shape)),
                      max(floor * scale, np.finfo(np.float64).tiny))


def _compare(a: np.ndarray, b: np.ndarray, rtol: float, floor: float, atol: Optional[float], noise=0.0):
    """max_abs, max_rel, cosine, ok of ``a`` (hand-written) against ``b`` (reference), in float64.

    ``max_rel = max |a − b| / max(|a| + |b|, floor · scale, noise)``: elements far below the
    leaf's scale, or at the rounding ``noise`` (per element or scalar), are judged on an
    absolute footing. ``ok`` when ``max_rel <= rtol`` (or ``max_abs <= atol``).
    """
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.size == 0:
        return 0.0, 0.0, 1.0, True
    diff = np.abs(a - b)
    max_abs = float(np.max(diff))
    max_rel = float(np.max(diff / _denominators(a, b, floor, np.asarray(noise).ravel())))
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        cosine = 1.0
    elif na == 0.0 or nb == 0.0:
        cosine = 0.0
    else:
        cosine = float(np.dot(a, b) / (na * nb))
    ok = bool(max_rel <= rtol or (atol is not None and max_abs <= atol))
    if not np.isfinite(max_abs):
        max_rel, ok = float("nan") if np.isnan(max_abs) else float("inf"), False
    return max_abs, max_rel, cosine, ok


def _random_like(gen: np.random.Generator, shape_dtype, *, scalar_away_from_zero=True):
    """A random array drawn on the host (no compile): N(0, 1), or ±U(0.5, 1.5) for a scalar."""
    shape, dtype = tuple(shape_dtype.shape), shape_dtype.dtype
    if math.prod(shape) == 1 and scalar_away_from_zero:
        v = gen.choice([-1.0, 1.0]) * gen.uniform(0.5, 1.5, shape)
    else:
        v = gen.standard_normal(shape)
    return jnp.asarray(v, dtype)


def _fill_params(tree: PyTree, gen: np.random.Generator, dtype, *, state: bool) -> PyTree:
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


# ----------------------------------------------------------------------------- the engine


def _run(name: str, title: str, fn: Callable, manual: Callable, groups: Sequence[tuple], aux: PyTree, *,
         dtype, methods, rtol, atol, directions: int, seed: int, cotangent, jit: bool,
         fd_dtype, min_order: Optional[float], details: str) -> GradientReport:
    """Compare ``manual`` with the references for ``fn``.

    ``fn(trees, aux) -> y`` is the forward, a function of the inputs ``trees`` (one tree per
    group, e.g. ``(params, x)``) and of ``aux`` (state, key, target: not differentiated).
    ``manual(trees, aux, dy) -> grads``, one gradient tree per group. ``groups`` are
    ``(prefix, tree)`` pairs naming the rows: ``("dparams", params)``, ``("dx", x)``.
    """
    methods = tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"{name}: expected methods among {METHODS}, got {methods!r}")
    directions = int(directions)
    if directions < 1:
        raise ValueError(f"{name}: expected directions >= 1, got {directions}")
    tol = _tolerances(dtype, rtol, name)
    base_tol = _tolerances(dtype, None, name)
    gen = np.random.default_rng(seed)
    fd_dtype = jnp.dtype(fd_dtype)
    if "fd" in methods and fd_dtype != jnp.float64:
        warnings.warn(f"{name}: finite differences in {fd_dtype.name} are unreliable: rounding error "
                      f"≈ ε/h swamps the derivative; use fd_dtype=float64 (the default), which bpjax "
                      f"runs under jax.enable_x64 even when x64 is off", stacklevel=3)
        tol["fd"] = max(tol["fd"], TOLERANCES.get(fd_dtype.name, TOLERANCES["float32"])["fd"] * 10)

    trees = tuple(t for _, t in groups)
    treedefs = [jax.tree_util.tree_structure(t) for t in trees]
    leaves, names, owner = [], [], []
    for g, (prefix, tree) in enumerate(groups):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            leaves.append(leaf)
            names.append(prefix + jax.tree_util.keystr(path))
            owner.append(g)
    diff = [i for i, a in enumerate(leaves) if _is_float(a)]

    def rebuild(all_leaves):
        out, k = [], 0
        for td in treedefs:
            out.append(jax.tree_util.tree_unflatten(td, all_leaves[k:k + td.num_leaves]))
            k += td.num_leaves
        return tuple(out)

    # the cotangent: random, shaped like y
    y_struct = jax.eval_shape(lambda t, a: fn(t, a), trees, aux)
    for path, s in jax.tree_util.tree_leaves_with_path(y_struct):
        if not jnp.issubdtype(s.dtype, jnp.floating):
            raise TypeError(f"{name}: expected floating-point outputs, got y{jax.tree_util.keystr(path)} "
                            f"of dtype {jnp.dtype(s.dtype).name}")
    if cotangent is None:
        dy = jax.tree_util.tree_map(lambda s: _random_like(gen, s), y_struct)
    else:
        dy = jax.tree_util.tree_map(lambda c, s: jnp.asarray(c, s.dtype), cotangent, y_struct)

    # the structure, shapes and dtypes of the hand-written gradient
    rows: list = []
    m_struct = jax.eval_shape(lambda t, a, c: manual(t, a, c), trees, aux, dy)
    valid = []
    for g, (prefix, tree) in enumerate(groups):
        idx = [i for i in diff if owner[i] == g]
        if not idx:
            continue
        try:
            got = treedefs[g].flatten_up_to(m_struct[g])
        except (ValueError, TypeError, IndexError):
            got_g = m_struct[g] if isinstance(m_struct, (tuple, list)) and g < len(m_struct) else m_struct
            rows.append(Comparison(prefix, (), "shape", math.nan, math.nan, math.nan, 0.0, False,
                                   note=f"structure {describe(got_g)}, expected {describe(tree)}"))
            continue
        first = sum(td.num_leaves for td in treedefs[:g])
        for i in idx:
            s, want = got[i - first], leaves[i]
            if not hasattr(s, "shape") or tuple(s.shape) != tuple(want.shape):
                got_shape = tuple(s.shape) if hasattr(s, "shape") else type(s).__name__
                rows.append(Comparison(names[i], tuple(want.shape), "shape", math.nan, math.nan,
                                       math.nan, 0.0, False,
                                       note=f"shape {got_shape}, expected {tuple(want.shape)}"))
            elif s.dtype != want.dtype:
                rows.append(Comparison(names[i], tuple(want.shape), "shape", math.nan, math.nan,
                                       math.nan, 0.0, False,
                                       note=f"dtype {jnp.dtype(s.dtype).name}, expected {jnp.dtype(want.dtype).name}"))
            else:
                valid.append(i)

    def fn_valid(vleaves, aux_):
        all_leaves = list(leaves)
        for i, v in zip(valid, vleaves):
            all_leaves[i] = v
        return fn(rebuild(all_leaves), aux_)

    def manual_valid(vleaves, aux_, dy_):
        all_leaves = list(leaves)
        for i, v in zip(valid, vleaves):
            all_leaves[i] = v
        grads = manual(rebuild(all_leaves), aux_, dy_)
        flat = []
        for g, td in enumerate(treedefs):
            flat += td.flatten_up_to(grads[g]) if any(owner[i] == g for i in valid) else [None] * td.num_leaves
        return [flat[i] for i in valid]

    x0 = [leaves[i] for i in valid]
    scales = [float(np.sqrt(np.mean(np.square(np.asarray(a, np.float64))))) if a.size else 1.0 for a in x0]
    scales = [min(max(s, 1e-3), 1e3) if np.isfinite(s) and s > 0 else 1.0 for s in scales]
    V = [np.stack([s * gen.standard_normal(a.shape) for _ in range(directions)]) for a, s in zip(x0, scales)]
    n_valid = len(valid)
    psize = max(1, sum(int(a.size) for a in x0))

    def directional(vdirs, f, evals_per_tangent):
        """``f(tangent)`` for every (leaf l, direction d) tangent (``vdirs[l][d]`` on leaf l, zeros
        elsewhere), as an array (n_valid, directions, …). Vmapped; mapped in batches when the
        tangents times the evaluations each would pass ~4M elements."""
        l_idx = jnp.repeat(jnp.arange(n_valid), directions)
        d_idx = jnp.tile(jnp.arange(directions), n_valid)

        def body(ld):
            l, d = ld
            return f([jnp.where(l == j, vdirs[j][d], jnp.zeros_like(vdirs[j][d])) for j in range(n_valid)])

        n = n_valid * directions
        bs = max(1, min(n, (1 << 22) // (psize * evals_per_tangent)))
        out = jax.vmap(body)((l_idx, d_idx)) if bs >= n else jax.lax.map(body, (l_idx, d_idx), batch_size=bs)
        return out.reshape(n_valid, directions, *out.shape[1:])

    def vjp_reference(vleaves, aux_, dy_):
        _, pullback = jax.vjp(lambda v: fn_valid(v, aux_), vleaves)
        return pullback(dy_)[0]

    def jvp_reference(vleaves, aux_, dy_, vdirs):
        jvp = lambda t: jax.jvp(lambda v: fn_valid(v, aux_), (vleaves,), (t,))[1]
        return directional(vdirs, lambda t: _vdot(dy_, jvp(t)), 1)

    steps = np.concatenate([_STEPS, -_STEPS])

    fd_used = set()                 # the dtype the finite differences ran in, seen at trace time

    def finite_differences(vleaves, aux_, dy_, vdirs):
        cast = lambda t: _cast_floats(t, fd_dtype)
        vleaves, aux_, dy_ = cast(vleaves), cast(aux_), cast(dy_)
        fd_used.update(_dtype_name(a.dtype) for a in vleaves)
        g = lambda v: _vdot(dy_, fn_valid(v, aux_))
        y0 = fn_valid(vleaves, aux_)
        g0, gabs = _vdot(dy_, y0), _abs_vdot(dy_, y0)

        def along(tangent):
            return jax.vmap(lambda h: g([a + h * t for a, t in zip(vleaves, tangent)]))(jnp.asarray(steps))

        return g0, gabs, directional(vdirs, along, len(steps))

    # ------------------------------------------------------------------ compute
    # One compiled function does as much as it can (compiles dominate the cost of a check):
    # the hand-written gradient (when jit), the references and, when float64 is on, the
    # finite differences. Float64 off: the finite differences run apart, under enable_x64.
    # Should a reference not apply to the forward (a custom_vjp has no jvp), each part is
    # then run alone and the one that cannot run is reported as skipped.
    parts = {
        "y": lambda x_, a_, c_, V_, Vfd: jax.tree_util.tree_leaves(fn_valid(x_, a_)),
        "manual": lambda x_, a_, c_, V_, Vfd: manual_valid(x_, a_, c_),
        "vjp": lambda x_, a_, c_, V_, Vfd: vjp_reference(x_, a_, c_),
        "jvp": lambda x_, a_, c_, V_, Vfd: jvp_reference(x_, a_, c_, V_),
        "fd": lambda x_, a_, c_, V_, Vfd: finite_differences(x_, a_, c_, Vfd),
    }
    todo = [m for m in methods if n_valid]
    apart = ["fd"] if "fd" in todo and fd_dtype == jnp.float64 and not jax.config.jax_enable_x64 else []
    together = (["y"] if n_valid else []) + (["manual"] if jit else []) + [m for m in todo if m not in apart]
    to_host = lambda a: np.asarray(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, np.float64)
    skipped = {}

    def run_parts(names_, context):
        with context:
            args = (x0, aux, dy, [jnp.asarray(v, a.dtype) for v, a in zip(V, x0)],
                    [jnp.asarray(v, fd_dtype) for v in V] if "fd" in names_ else None)
            f = lambda *a_: {k: parts[k](*a_) for k in names_}
            return jax.tree_util.tree_map(to_host, _jit(f)(*args))

    main_ctx = lambda: _x64() if _dtype_name(dtype) == "float64" else contextlib.nullcontext()
    out = {}
    for group, ctx in ((together, main_ctx), (apart, _x64)):
        if not group:
            continue
        try:
            out.update(run_parts(group, ctx()))
        except Exception:
            own = [m for m in group if m in ("y", "manual")]
            if own:
                out.update(run_parts(own, ctx()))                 # the user's functions: let them raise
            for m in group:
                if m in own:
                    continue
                try:
                    out.update(run_parts([m], ctx()))
                except Exception as e:                              # this reference does not apply
                    skipped[m] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    if not jit:
        with main_ctx():
            out["manual"] = [to_host(a) for a in manual_valid(x0, aux, dy)]
    grads = out.get("manual", [])
    refs = out
    if "fd" in out:
        g0, gabs, gh = float(out["fd"][0]), float(out["fd"][1]), out["fd"][2]
    # ------------------------------------------------------------------ compare
    # ⟨manual gradient, v⟩ per leaf and direction, on the host in float64
    proj = [np.tensordot(v.reshape(directions, -1), m.reshape(-1), axes=1) for v, m in zip(V, grads)]
    K = len(_STEPS)
    pairs = {}                                      # (leaf j, method) -> (a, b, extra noise)
    for j in range(n_valid):
        for m in methods:
            if m in skipped:
                continue
            if m == "vjp":
                pairs[j, m] = (grads[j], refs["vjp"][j], 0.0)
            elif m == "jvp":
                pairs[j, m] = (proj[j], refs["jvp"][j], 0.0)
            else:
                plus, minus = gh[j][:, :K], gh[j][:, K:]                      # (directions, K)
                D = (plus - minus) / (2 * _STEPS)                             # central differences
                k = np.argmin(np.abs(np.diff(D, axis=1)), axis=1)             # the most stable step
                fd = D[np.arange(directions), k + 1]
                err = (2 * np.abs(D[np.arange(directions), k] - fd)           # its estimated error
                       + 32 * float(jnp.finfo(fd_dtype).eps) * gabs / _STEPS[k + 1])
                pairs[j, m] = (proj[j], fd, err)
    # rounding noise: 32 ε of the gradient's dtype times the largest gradient of the same kind in
    # the report (or max|dy|·max|y| when all are ~0), so that a gradient that is zero in exact
    # arithmetic (a bias before batch norm) is not failed for rounding
    eps = float(jnp.finfo(dtype).eps)
    base = max([float(np.max(np.abs(a))) if a.size else 0.0 for a in jax.tree_util.tree_leaves(dy)] + [0.0]) \
        * max([float(np.max(np.abs(a))) if a.size else 0.0 for a in out.get("y", [])] + [1.0])
    noise = {m: 32 * eps * max([base] + [float(np.max(np.abs(a) + np.abs(b), initial=0.0))
                                         for (j, mm), (a, b, _) in pairs.items() if mm == m])
             for m in methods}
    for j, i in enumerate(valid):
        shape = tuple(leaves[i].shape)
        for m in methods:
            if m in skipped:
                rows.append(Comparison(names[i], shape, m, math.nan, math.nan, math.nan, 0.0, True,
                                       note=f"skipped: {skipped[m]}"))
                continue
            a_, b_, extra = pairs[j, m]
            # rounding noise counts as agreement at the dtype's default tolerance (an override of
            # rtol changes what counts as agreement, not what counts as rounding)
            floor_noise = np.maximum(extra, noise[m]) / base_tol[m]
            res = _compare(a_, b_, tol[m], tol["floor"], atol, floor_noise)
            if m != "fd":
                rows.append(Comparison(names[i], shape, m, *res[:3], tol[m], res[3]))
                continue
            plus = gh[j][:, :K]
            allowed = tol["fd"] * _denominators(a_, b_, tol["floor"], floor_noise)   # per direction
            order, binding = _taylor_order(plus, g0, a_, allowed, gabs, float(jnp.finfo(fd_dtype).eps))
            ok = res[3] and (min_order is None or binding is None or binding >= min_order)
            rows.append(Comparison(names[i], shape, "fd", *res[:3], tol["fd"], ok,
                                   order=order if binding is None else binding,
                                   order_binding=binding is not None or order is None
                                   or min_order is None or order >= min_order))
    order_of = {n: k for k, n in enumerate(names)}
    rows.sort(key=lambda r: (order_of.get(r.gradient, -1), r.reference != "shape"))
    more = f" · {directions} directions" if ("fd" in methods or "jvp" in methods) else ""
    fd_name = (min(fd_used, key=lambda d: jnp.finfo(d).bits) if fd_used else fd_dtype.name)
    return GradientReport(title, f"{details}{more}", tuple(rows), methods, directions, fd_name)


def _taylor_order(plus, g0, a, allowed, gabs, eps):
    """Observed order of r(h) = |g(θ + h v) − g(θ) − h a| as h halves, and whether it is binding.

    A step counts where r is above what the tolerance allows (h · ``allowed``, the error of the
    directional derivative ``a`` that the fd comparison accepts) and above
    rounding (10³·ε·Σ|dy ⊙ y|). The order is the rate log₂ r(h)/r(h/2) at the smallest pair of
    steps that both count, where the expansion is most accurate; ``None`` when no pair counts
    (the function is linear along v). It is *binding* only when the smallest step counts: a
    wrong gradient leaves r ≈ h·|error| there, whereas a right one at a kink (relu) leaves r
    below the tolerance once h is small, whatever the rate across the kink at larger h.
    Returns the worst (smallest) order over directions and whether any binding one fails.
    """
    orders, binding = [], []
    for d in range(plus.shape[0]):
        r = np.abs(plus[d] - g0 - _STEPS * a[d])
        floor = _STEPS * allowed[d] + 1e3 * eps * gabs
        counts = r > floor
        pairs = [k for k in range(len(_STEPS) - 1) if counts[k] and counts[k + 1]]
        if pairs:
            k = pairs[-1]
            orders.append(float(np.log2(r[k] / r[k + 1])))
            if k == len(_STEPS) - 2:
                binding.append(orders[-1])
    return (min(orders) if orders else None), (min(binding) if binding else None)


# ----------------------------------------------------------------------------- public API


def _default_dtype():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


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
        params, state = _cast_floats(params, dtype), _cast_floats(state, dtype)
        if x is None:
            is_tuple = bool(shapes) and isinstance(shapes[0], tuple)
            draw = lambda s: jnp.asarray(gen.standard_normal((batch, *s)), dtype)
            x = tuple(draw(s) for s in shapes) if is_tuple else draw(shapes)
        else:
            x = _cast_floats(jax.tree_util.tree_map(jnp.asarray, x), dtype)

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
           if any(_is_float(a) and jnp.dtype(a.dtype) == dtype for a in jax.tree_util.tree_leaves(t))]
    return (f"{dtype.name} (x64 is on, but {' and '.join(low) or 'the inputs'} "
            f"{'are' if len(low) != 1 or low[0] == 'params' else 'is'} {dtype.name}: "
            f"cast with bp.cast_floating(tree, jnp.float64) to check in float64)")


def _lowest_float(trees) -> np.dtype:
    dts = [jnp.dtype(a.dtype) for a in jax.tree_util.tree_leaves(trees) if _is_float(a)]
    if not dts:
        return jnp.dtype(_default_dtype())
    return min(dts, key=lambda d: jnp.finfo(d).bits * 10 + jnp.finfo(d).nmant)


def _layer_name(obj) -> str:
    """The name a factory gave a layer or loss, from its functions' qualified names."""
    fn = obj[0]
    qualname = getattr(fn, "__qualname__", "") or ""
    head = qualname.split(".")[0] if "." in qualname else ""   # a factory's name, not a bare function's
    if head in ("make_loss", "make_layer"):         # the name is a string in the wrapper's closure
        cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
        head = next((c for c in cells if isinstance(c, str)), "")
    if head and head != "<lambda>":
        return head
    return type(obj).__name__
