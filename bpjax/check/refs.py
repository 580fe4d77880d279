"""The function under check and its references (one part of a check).

:class:`Problem` flattens the inputs (one tree per group: ``params``, ``x``) into named leaves,
keeps the floating-point leaves whose hand-written gradient has the right shape and dtype
(the others become ``shape`` rows of the report), and restricts the forward and the
hand-written gradient to those leaves. The references differentiate the forward (or a
separate reference function) with JAX autodiff:

- ``vjp``: ``jax.vjp`` pulled back along ``dy``;
- ``jvp``: forward mode ``⟨dy, J v⟩`` along each direction ``v``.

:func:`evaluate` compiles as much as it can into one program (compiles dominate the cost of a
check) and reports a reference that does not apply (``jax.jvp`` of a ``custom_vjp``) as skipped.
"""
from __future__ import annotations

import collections
import contextlib
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import describe
from .._grad import is_floating
from .fd import vdot
from .report import Comparison

PyTree = Any


def jit_o0(f):
    """``jax.jit`` at XLA optimisation level 0: a check runs each program once, and compiling
    dominates its cost (level 0 compiles about 2.5x faster here; the arithmetic is the same)."""
    return jax.jit(f, compiler_options={"xla_backend_optimization_level": 0})


def x64():
    """A context in which float64 exists: a no-op when x64 is already enabled."""
    return contextlib.nullcontext() if jax.config.jax_enable_x64 else jax.enable_x64(True)


class Problem:
    """The inputs as named leaves, and the forward and hand-written gradient on the valid ones.

    ``fn(trees, aux) -> y``; ``manual(trees, aux, dy) -> grads`` (one tree per group);
    ``groups`` are ``(prefix, tree)`` pairs naming the leaves: ``("dparams", params)``.
    Attributes: ``leaves``, ``names``, ``valid`` (indices of the leaves compared), ``x0``
    (their values) and ``rows`` (``shape`` rows of the leaves whose gradient is malformed).
    """

    def __init__(self, fn: Callable, manual: Callable, groups: Sequence[tuple], aux: PyTree):
        self.fn, self.manual, self.aux = fn, manual, aux
        self.trees = tuple(t for _, t in groups)
        self.treedefs = [jax.tree_util.tree_structure(t) for t in self.trees]
        self.leaves, self.names, self.owner = [], [], []
        for g, (prefix, tree) in enumerate(groups):
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
                self.leaves.append(leaf)
                self.names.append(prefix + jax.tree_util.keystr(path))
                self.owner.append(g)
        self.groups = list(groups)
        self.valid, self.rows = [], []

    def rebuild(self, all_leaves):
        out, k = [], 0
        for td in self.treedefs:
            out.append(jax.tree_util.tree_unflatten(td, all_leaves[k:k + td.num_leaves]))
            k += td.num_leaves
        return tuple(out)

    def output_struct(self):
        return jax.eval_shape(lambda t, a: self.fn(t, a), self.trees, self.aux)

    def validate(self, dy) -> None:
        """Sort the floating-point leaves into ``valid`` and ``shape`` rows, from the structure,
        shapes and dtypes of the hand-written gradient (traced only)."""
        m_struct = jax.eval_shape(lambda t, a, c: self.manual(t, a, c), self.trees, self.aux, dy)
        diff = [i for i, a in enumerate(self.leaves) if is_floating(a)]
        for g, (prefix, tree) in enumerate(self.groups):
            idx = [i for i in diff if self.owner[i] == g]
            if not idx:
                continue
            try:
                got = self.treedefs[g].flatten_up_to(m_struct[g])
            except (ValueError, TypeError, IndexError):
                got_g = m_struct[g] if isinstance(m_struct, (tuple, list)) and g < len(m_struct) else m_struct
                self.rows.append(_malformed(prefix, (), f"structure {describe(got_g)}, expected {describe(tree)}"))
                continue
            first = sum(td.num_leaves for td in self.treedefs[:g])
            for i in idx:
                note = _leaf_mismatch(got[i - first], self.leaves[i])
                if note:
                    self.rows.append(_malformed(self.names[i], tuple(self.leaves[i].shape), note))
                else:
                    self.valid.append(i)
        self.x0 = [self.leaves[i] for i in self.valid]

    def with_leaves(self, vleaves):
        """The input trees with the valid leaves replaced by ``vleaves``."""
        all_leaves = list(self.leaves)
        for i, v in zip(self.valid, vleaves):
            all_leaves[i] = v
        return self.rebuild(all_leaves)

    def fn_valid(self, vleaves, aux):
        return self.fn(self.with_leaves(vleaves), aux)

    def manual_valid(self, vleaves, aux, dy):
        grads = self.manual(self.with_leaves(vleaves), aux, dy)
        flat = []
        for g, td in enumerate(self.treedefs):
            has = any(self.owner[i] == g for i in self.valid)
            flat += td.flatten_up_to(grads[g]) if has else [None] * td.num_leaves
        return [flat[i] for i in self.valid]


def _malformed(name, shape, note) -> Comparison:
    return Comparison(name, shape, "shape", math.nan, math.nan, math.nan, 0.0, False, note=note)


def _leaf_mismatch(s, want) -> str:
    if not hasattr(s, "shape") or tuple(s.shape) != tuple(want.shape):
        got_shape = tuple(s.shape) if hasattr(s, "shape") else type(s).__name__
        return f"shape {got_shape}, expected {tuple(want.shape)}"
    if s.dtype != want.dtype:
        return f"dtype {jnp.dtype(s.dtype).name}, expected {jnp.dtype(want.dtype).name}"
    return ""


def directional(vdirs: list, f: Callable, evals_per_tangent: int, psize: int):
    """``f(tangent)`` for every (leaf l, direction d) tangent (``vdirs[l][d]`` on leaf l, zeros
    elsewhere), stacked leaf by leaf: (Σ_l D_l, …). Vmapped; mapped in batches when the
    tangents times the evaluations each would pass ~4M elements."""
    counts = [int(v.shape[0]) for v in vdirs]
    l_idx = jnp.asarray(np.repeat(np.arange(len(vdirs)), counts))
    d_idx = jnp.asarray(np.concatenate([np.arange(c) for c in counts]) if counts else np.zeros(0, int))

    def body(ld):
        l, d = ld
        return f([jnp.where(l == j, v[jnp.minimum(d, c - 1)], jnp.zeros_like(v[0]))
                  for j, (v, c) in enumerate(zip(vdirs, counts))])

    n = sum(counts)
    bs = max(1, min(n, (1 << 22) // (psize * evals_per_tangent)))
    return jax.vmap(body)((l_idx, d_idx)) if bs >= n else jax.lax.map(body, (l_idx, d_idx), batch_size=bs)


def vjp_reference(f: Callable, vleaves: list, dys: list) -> list:
    """Per leaf, ``jax.vjp`` of ``f`` pulled back along each block's cotangent: (B, *shape)."""
    _, pullback = jax.vjp(f, vleaves)
    per_block = [pullback(dy)[0] for dy in dys]
    return [jnp.stack([g[j] for g in per_block]) for j in range(len(vleaves))]


def jvp_reference(f: Callable, vleaves: list, dys: list, vdirs: list, psize: int):
    """``⟨dy_b, J v⟩`` for every direction and block: (Σ_l D_l, B)."""
    jvp = lambda t: jax.jvp(f, (vleaves,), (t,))[1]
    return directional(vdirs, lambda t: (lambda y: jnp.stack([vdot(dy, y) for dy in dys]))(jvp(t)), 1, psize)


def to_host(a):
    return np.asarray(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, np.float64)


#: Compiled programs kept between checks, by key (:func:`evaluate`): checking one f at many
#: seeds (or drawing a point again) compiles once. The most recent few are kept.
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_KEEP = 16


def evaluate(parts: dict, together: list, apart: list, args: Callable, main_ctx: Callable, key=None) -> tuple:
    """Run the named ``parts`` (``part(*args(names))``) compiled: ``together`` in one program
    under ``main_ctx()``, ``apart`` in another under float64. Should a group fail, the user's
    own parts (``y``, ``manual``) run alone and may raise; a reference that cannot run is
    returned in ``skipped`` with the reason. Returns ``(out, skipped)``, arrays on the host.
    With a ``key`` (the same parts up to the values of their arguments), each program is kept
    and reused under that key."""
    skipped, out = {}, {}

    def run(names, context):
        with context:
            at = None if key is None else (key, tuple(names), jax.config.jax_enable_x64)
            program = _PROGRAMS.get(at) if at is not None else None
            if program is None:
                program = jit_o0(lambda *a: {k: parts[k](*a) for k in names})
            if at is not None:                      # kept even if it raises: a run that failed compiled
                _PROGRAMS[at] = program
                _PROGRAMS.move_to_end(at)
                while len(_PROGRAMS) > _KEEP:
                    _PROGRAMS.popitem(last=False)
            return jax.tree_util.tree_map(to_host, program(*args(names)))

    for group, ctx in ((together, main_ctx), (apart, x64)):
        if not group:
            continue
        try:
            out.update(run(group, ctx()))
        except Exception:
            own = [m for m in group if m in ("y", "manual")]
            if own:
                out.update(run(own, ctx()))                 # the user's functions: let them raise
            for m in group:
                if m in own:
                    continue
                try:
                    out.update(run([m], ctx()))
                except Exception as e:                      # this reference does not apply
                    skipped[m] = _reason(e)
    return out, skipped


def _reason(e: Exception) -> str:
    """One line for why a part could not run: the error's first line, or, when that only opens
    a traceback (an error raised in a host callback), its last."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
    return f"{type(e).__name__}: {(lines[-1] if lines[0].endswith('(most recent call last):') else lines[0])[:100]}"
