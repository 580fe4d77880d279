"""Finite differences with an automatic step and the Taylor-remainder order (one part of a check).

Along a direction ``v`` of one input leaf, ``g(h) = ⟨dy, f(θ + h v)⟩`` is evaluated at the
steps ``±h_k``, ``h_k = 0.1 · 2⁻ᵏ`` (k = 0 … 13; ``v`` carries the leaf's RMS), in float64 on
upcast copies. Then, on the host:

- the central differences ``D_k = (g(h_k) − g(−h_k)) / 2h_k``; the step taken is the one where
  ``D`` changes least from the step before (the most stable), and its estimated error is
  twice that change plus rounding (``32 ε Σ|dy ⊙ y| / h``);
- the Taylor remainder ``r(h) = |g(h) − g(0) − h ⟨grad, v⟩|`` shrinks like ``h²`` when the
  hand-written gradient is right and like ``h`` when it is wrong: its observed order needs no
  step at all;
- a kink (relu at 0, ``max`` at a tie) within the smallest step shows in the second difference
  ``S(h) = g(h) + g(−h) − 2 g(0)``: smooth, ``S/h`` halves with ``h``; across a kink it stays
  (``|S|/h`` → the jump of the slope); under rounding noise it grows. Such directions are not
  compared (:func:`kinked`);
- the edge of f's domain (``log`` near 0, ``logit`` near 1): a value of ``g`` that is not
  finite is never used; only the steps below the largest one at which ``g`` is finite on
  both sides count (:func:`finite_steps`), and a direction with fewer than ``MIN_STEPS`` of
  them is at the edge and not compared (:func:`at_edge`);
- a forward that computes below float64 inside (a kernel that casts to float32): its float64
  evaluation does not see a perturbation below float32's resolution (:func:`precision_probe`,
  :func:`forward_precision`); its ``g`` then carries that rounding, and the step is chosen
  for the least error counting the measured noise (``noise`` of :func:`central_differences`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

# Finite-difference steps h_k = 0.1 · 2⁻ᵏ, k = 0 … 13 (0.1 down to 1.2e-5), times the leaf's RMS.
STEPS = 0.1 * 0.5 ** np.arange(14)
#: A direction needs g finite on both sides at this many of the smallest steps (h ≤ 3.9e-4 of
#: the RMS, enough for the step choice and the kink test); with fewer it is at the domain's edge.
MIN_STEPS = 5
#: The relative perturbations of the precision probe: one below float32's resolution (2⁻²⁴),
#: one above it.
_PROBE = (2.0 ** -36, 2.0 ** -16)


def wide(dtype):
    """The dtype to accumulate inner products in: float64 if enabled, else float32."""
    return jnp.promote_types(dtype, jnp.float32) if not jax.config.jax_enable_x64 else jnp.float64


def vdot(a: PyTree, b: PyTree):
    """Σ over all leaves of Σ a ⊙ b, accumulated in a wide dtype."""
    terms = [jnp.sum(x.astype(wide(x.dtype)) * y.astype(wide(x.dtype)))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
    return sum(terms) if terms else jnp.zeros((), wide(jnp.float32))


def abs_vdot(a: PyTree, b: PyTree):
    terms = [jnp.sum(jnp.abs(x.astype(jnp.float64) * y.astype(jnp.float64)))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
    return sum(terms) if terms else jnp.zeros((), jnp.float64)


def evaluate_along(f: Callable, vleaves: list, dys: list, directional: Callable):
    """``g0`` (B,), ``Σ|dy ⊙ y|`` (B,), ``g(±h_k)`` along every direction, (T, 2K, B), and the
    precision probe of ``f`` (:func:`precision_probe`).

    ``f(leaves) -> y``; ``dys`` holds one cotangent per output block ``b`` (one block: the
    whole ``dy``); ``directional(along, evals)`` maps ``along(tangent)`` over the directions.
    """
    steps = jnp.asarray(np.concatenate([STEPS, -STEPS]))
    g = lambda y: jnp.stack([vdot(dy, y) for dy in dys], axis=-1)
    # f at the point and at the probe's two perturbations, in one vmapped evaluation
    wiggle = [jnp.sin(jnp.arange(a.size, dtype=a.dtype) * 2.399963).reshape(a.shape) for a in vleaves]
    points = [jnp.stack([a] + [a * (1 + p * u) for p in _PROBE]) for a, u in zip(vleaves, wiggle)]
    ys = jax.vmap(f)(points)
    y0 = jax.tree_util.tree_map(lambda y: y[0], ys)
    g0 = g(y0)
    gabs = jnp.stack([abs_vdot(dy, y0) for dy in dys])

    def along(tangent):
        return jax.vmap(lambda h: g(f([a + (h * t).astype(a.dtype) for a, t in zip(vleaves, tangent)])))(steps)

    return g0, gabs, directional(along, len(steps)), precision_probe(ys)


def precision_probe(ys):
    """What f's evaluation at ``x``, ``x (1 + 2⁻³⁶ u)`` and ``x (1 + 2⁻¹⁶ u)`` (``ys``, stacked)
    says of its precision: the number of output elements that moved by less than float32 can
    resolve (only a float64 computation can), the number that moved at all under the larger
    perturbation, and whether ``y`` is exactly representable in float32, float16, bfloat16.
    """
    leaves = [y for y in jax.tree_util.tree_leaves(ys) if y.size]
    if not leaves:
        return jnp.zeros(5)
    y0, ya, yb = (jnp.concatenate([y[i].reshape(-1).astype(jnp.float64) for y in leaves]) for i in range(3))
    moved = jnp.abs(ya - y0)
    fine = (moved > 0) & (moved <= 2.0 ** -28 * jnp.maximum(jnp.abs(y0), jnp.abs(ya)))
    same = lambda dt: jnp.all(y0.astype(dt).astype(jnp.float64) == y0)
    return jnp.stack([jnp.sum(fine), jnp.sum(yb != y0), same(jnp.float32), same(jnp.float16),
                      same(jnp.bfloat16)]).astype(jnp.float64)


def forward_precision(probe) -> str | None:
    """The precision of f's float64 evaluation, from :func:`precision_probe`: None when it is
    float64 (or unknown: nothing moved), else the narrowest float its outputs fit exactly."""
    fine, moved, _, f16, bf16 = (float(v) for v in np.asarray(probe))
    if fine > 0 or moved == 0:
        return None
    return "bfloat16" if bf16 else "float16" if f16 else "float32"


def finite_steps(gh: np.ndarray) -> np.ndarray:
    """(D, K) booleans: the steps ``h_k`` at which ``g(±h)`` and those at every smaller step are
    finite (a value that is not finite is never used, nor any step beyond it)."""
    K = len(STEPS)
    both = np.isfinite(gh[:, :K]) & np.isfinite(gh[:, K:])
    return np.flip(np.cumprod(np.flip(both, axis=1), axis=1), axis=1).astype(bool)


def at_edge(gh: np.ndarray, g0: float) -> np.ndarray:
    """(D,) booleans: directions with fewer than ``MIN_STEPS`` finite steps (:func:`finite_steps`),
    where the edge of f's domain lies within them (all of them when ``g(0)`` is not finite)."""
    if not np.isfinite(g0):
        return np.ones(gh.shape[0], bool)
    return finite_steps(gh).sum(axis=1) < MIN_STEPS


def central_differences(gh: np.ndarray, gabs: float, eps: float, noise: np.ndarray | None = None):
    """The directional derivative at the most stable step, and its estimated error.

    ``gh`` (D, 2K): ``g(+h_k)`` then ``g(−h_k)`` per direction; only the finite steps count
    (:func:`finite_steps`). The step taken is the one where ``D`` changes least from the step
    before; with ``noise`` (D,), the measured noise of ``g`` (:func:`measured_noise`, for a
    forward below float64, ``eps`` its own), the one of least estimated error, which then
    counts ``noise / h`` too. (Rounding there is not all noise: an output whose change at a
    small step is below its resolution does not move at all, a bias the second difference
    cannot see, and which ``32 ε Σ|dy ⊙ y| / h`` bounds.) Returns ``fd`` (D,), ``err`` (D,)
    (NaN where no two steps are finite).
    """
    K = len(STEPS)
    plus, minus = gh[:, :K], gh[:, K:]                                 # (D, K)
    with np.errstate(invalid="ignore", over="ignore"):
        D = (plus - minus) / (2 * STEPS)                               # central differences
        change = np.abs(np.diff(D, axis=1))                            # (D, K − 1): step k to k + 1
    rounding = 32 * eps * gabs / STEPS[1:]
    if noise is not None:
        rounding = np.maximum(rounding, np.asarray(noise, np.float64)[:, None] / STEPS[1:])
    usable = finite_steps(gh)
    score = np.where(usable[:, :-1], 2 * change + rounding if noise is not None else change, np.inf)
    k = np.argmin(score, axis=1)                                       # the most stable step
    rows = np.arange(gh.shape[0])
    fd = D[rows, k + 1]
    err = 2 * np.abs(D[rows, k] - fd) + np.broadcast_to(rounding, change.shape)[rows, k]  # its estimated error
    missing = ~usable[rows, k]
    return np.where(missing, np.nan, fd), np.where(missing, np.nan, err)


def taylor_order(plus, g0, a, allowed, gabs, eps, noise=None):
    """Observed order of r(h) = |g(θ + h v) − g(θ) − h a| as h halves, and whether it is binding.

    A step counts where r is above what the tolerance allows (h · ``allowed``, the error of the
    directional derivative ``a`` that the fd comparison accepts) and above
    rounding (10³·ε·Σ|dy ⊙ y|). The order is the rate log₂ r(h)/r(h/2) at the smallest pair of
    steps that both count, where the expansion is most accurate; ``None`` when no pair counts
    (the function is linear along v). It is *binding* only when the smallest step counts: a
    wrong gradient leaves r ≈ h·|error| there, whereas a right one at a kink (relu) leaves r
    below the tolerance once h is small, whatever the rate across the kink at larger h.
    ``noise`` (D,), optional, raises the rounding floor per direction to the measured noise of
    ``g`` (:func:`measured_noise`), for a forward that computes below float64 inside.
    Returns the worst (smallest) order over directions and whether any binding one fails.
    """
    orders, binding = [], []
    for d in range(plus.shape[0]):
        r = np.abs(plus[d] - g0 - STEPS * a[d])
        floor = STEPS * allowed[d] + max(1e3 * eps * gabs, 0.0 if noise is None else noise[d])
        counts = r > floor
        pairs = [k for k in range(len(STEPS) - 1) if counts[k] and counts[k + 1]]
        if pairs:
            k = pairs[-1]
            orders.append(float(np.log2(r[k] / r[k + 1])))
            if k == len(STEPS) - 2:
                binding.append(orders[-1])
    return (min(orders) if orders else None), (min(binding) if binding else None)


def kinked(gh: np.ndarray, g0: float, gabs: float, eps: float, n: int = 5) -> np.ndarray:
    """Directions along which a kink lies within the smallest step, (D,) booleans.

    The second difference ``S(h) = g(h) + g(−h) − 2 g(0)`` of a smooth function is ``h² g''``:
    ``A(h) = S/h`` halves as ``h`` halves. With a kink at distance ``δ = ρ h`` from the point
    (ρ < 1 at the smallest step) it is ``|Δslope| (h − δ)``: ``A`` stays nearly flat over the
    ``n`` smallest steps (exactly flat for a kink at the point). Rounding noise in ``g`` (a
    forward that computes in float32 inside) makes ``A`` *grow* as ``h`` shrinks. So a kink is
    counted where, at each of the ``n`` smallest steps, ``S`` stands above float64 rounding
    (10³·ε·Σ|dy ⊙ y|) and every halving of ``h`` keeps ``A`` within (0.55, 1.15) of the step
    before, and within 0.35 of the largest of them (a kink up to ρ ≈ 0.6 of the smallest step).
    """
    K = len(STEPS)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        S = np.abs(gh[:, :K] + gh[:, K:] - 2 * g0)[:, K - n:]          # (D, n), h decreasing
        A = S / STEPS[K - n:]
        big = np.all(S > 1e3 * eps * gabs, axis=1)
        r = A[:, 1:] / A[:, :-1]
        flat = np.all((r > 0.55) & (r < 1.15), axis=1) & (A[:, -1] >= 0.35 * A[:, 0])
    return big & flat


def measured_noise(gh: np.ndarray, g0: float, n: int = 3) -> np.ndarray:
    """Per direction, twice the largest second difference ``|S(h)|`` at the ``n`` smallest steps:
    for a smooth forward computed in float64 that is ``≈ 2·4ⁿ⁻¹ h² |g''|``, negligible; for one
    that rounds below float64 inside, it is the size of that rounding in ``g``."""
    K = len(STEPS)
    with np.errstate(invalid="ignore", over="ignore"):
        return 2 * np.max(np.abs(gh[:, :K] + gh[:, K:] - 2 * g0)[:, K - n:], axis=1)


def fd_row(proj: np.ndarray, gh: np.ndarray, g0: float, gabs: float, eps: float, keep: Optional[np.ndarray],
           more_err=0.0, noise: np.ndarray | None = None):
    """``(a, b, err, plus)`` of one leaf and block: the hand-written ⟨grad, v⟩, the central
    differences, their error (plus ``more_err``, the rounding of ⟨grad, v⟩) and ``g(+h_k)``
    (not finite: NaN), over the directions in ``keep`` (all when None); ``noise`` as in
    :func:`central_differences`."""
    fd, err = central_differences(gh, gabs, eps, noise)
    err = err + more_err
    plus = np.where(finite_steps(gh), gh[:, :len(STEPS)], np.nan)
    if keep is not None:
        proj, fd, err, plus = proj[keep], fd[keep], err[keep], plus[keep]
    return proj, fd, err, plus
