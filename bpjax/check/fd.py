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
  evaluation does not see a step below float32's resolution (``PROBE_STEP``,
  :func:`forward_precision`); its ``g`` then carries that rounding, and the step is chosen
  for the least error counting it (``noise`` of :func:`central_differences`).
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
#: The precision probe's step (times the leaf's RMS): below float32's resolution of an element
#: of that size (2⁻²⁴ of it), so a forward that rounds its inputs to float32 does not see it.
PROBE_STEP = 2.0 ** -30


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
    precision probe of ``f`` (:func:`forward_precision`).

    ``f(leaves) -> y``; ``dys`` holds one cotangent per output block ``b`` (one block: the
    whole ``dy``); ``directional(along, evals)`` maps ``along(tangent)`` over the directions.
    Along each direction f is also evaluated one step of ``PROBE_STEP`` away, where only a
    float64 computation can move an output by less than float32 resolves.
    """
    steps = jnp.asarray(np.concatenate([STEPS, -STEPS, [PROBE_STEP]]))
    g = lambda y: jnp.stack([vdot(dy, y) for dy in dys], axis=-1)
    y0 = f(vleaves)
    flat = lambda y: jnp.concatenate([a.reshape(-1).astype(wide(a.dtype)) for a in jax.tree_util.tree_leaves(y)])
    g0, flat0 = g(y0), flat(y0)
    gabs = jnp.stack([abs_vdot(dy, y0) for dy in dys])

    def at(h, tangent):
        y = f([a + (h * t).astype(a.dtype) for a, t in zip(vleaves, tangent)])
        moved = jnp.abs(flat(y) - flat0)
        fine = (moved > 0) & (moved <= 2.0 ** -26 * jnp.maximum(jnp.abs(flat(y)), jnp.abs(flat0)))
        return g(y), jnp.sum(fine)                    # and the outputs that moved below float32's resolution

    gh, fine = directional(lambda tangent: jax.vmap(lambda h: at(h, tangent))(steps), len(steps))
    same = lambda dt: jnp.all(flat0.astype(dt).astype(flat0.dtype) == flat0)
    probe = jnp.stack([jnp.sum(fine[:, -1]), same(jnp.float16), same(jnp.bfloat16)]).astype(flat0.dtype)
    return g0, gabs, gh[:, :-1], probe


def forward_precision(fd) -> str | None:
    """The precision of f's float64 evaluation, from :func:`evaluate_along`'s results ``fd``:
    None when it is float64 (some output moved by less than float32 resolves, at the probe's
    step), or unknown (nothing moved at the smallest steps either); else the narrowest float
    its outputs fit exactly (float32, or float16, bfloat16)."""
    g0, _, gh, (fine, f16, bf16) = fd
    K = len(STEPS)
    if fine > 0 or not np.any(gh[:, [K - 1, 2 * K - 1], :] != np.asarray(g0)[None, None, :]):
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
