"""Comparing a hand-written gradient with a reference (one part of a check), on the host in float64.

The relative error of an element is ``|a − b| / max(|a| + |b|, floor · scale, noise)``, where
``scale`` is the leaf's largest ``|a| + |b|``: elements far below the leaf's scale, or at the
rounding noise of the dtype, are judged on an absolute footing.
"""
from __future__ import annotations

from typing import Mapping, Optional

import jax.numpy as jnp
import numpy as np

from .report import METHODS

#: Default relative tolerances per dtype and reference, and the floor: the relative error of
#: an element is ``|a − b| / max(floor · scale, |a| + |b|)`` where ``scale`` is the leaf's largest
#: ``|a| + |b|``, so elements far below the leaf's scale are judged on an absolute footing.
TOLERANCES = {
    "float64": {"vjp": 1e-8, "jvp": 1e-8, "fd": 1e-6, "floor": 1e-4},
    "float32": {"vjp": 1e-4, "jvp": 1e-4, "fd": 1e-3, "floor": 1e-2},
    "float16": {"vjp": 2e-2, "jvp": 2e-2, "fd": 5e-2, "floor": 2e-1},
    "bfloat16": {"vjp": 1e-1, "jvp": 1e-1, "fd": 1e-1, "floor": 5e-1},
}


def tolerances(dtype, rtol, name: str) -> dict:
    """The tolerances of ``dtype``, overridden by ``rtol`` (a float, or a mapping per reference)."""
    base = dict(TOLERANCES.get(jnp.dtype(dtype).name, TOLERANCES["float32"]))
    if rtol is None:
        return base
    if isinstance(rtol, Mapping):
        unknown = set(rtol) - set(METHODS) - {"floor"}
        if unknown:
            raise ValueError(f"{name}: expected rtol keys among {METHODS + ('floor',)}, got {sorted(unknown)}")
        base.update({k: float(v) for k, v in rtol.items()})
        return base
    return {**base, **{m: float(rtol) for m in METHODS}}


def denominators(a: np.ndarray, b: np.ndarray, floor: float, noise=0.0) -> np.ndarray:
    """Per element ``max(|a| + |b|, floor · scale, noise)``, ``scale`` = the largest ``|a| + |b|``."""
    size = np.abs(a) + np.abs(b)
    scale = float(np.max(size)) if size.size and np.all(np.isfinite(size)) else np.inf
    return np.maximum(np.maximum(size, np.broadcast_to(np.asarray(noise, np.float64), size.shape)),
                      max(floor * scale, np.finfo(np.float64).tiny))


def compare(a: np.ndarray, b: np.ndarray, rtol: float, floor: float, atol: Optional[float], noise=0.0):
    """max_abs, max_rel, cosine, ok, worst of ``a`` (hand-written) against ``b`` (reference).

    ``max_rel = max |a − b| / max(|a| + |b|, floor · scale, noise)``: elements far below the
    leaf's scale, or at the rounding ``noise`` (per element or scalar), are judged on an
    absolute footing. ``ok`` when ``max_rel <= rtol`` (or ``max_abs <= atol``). ``worst`` is
    the flat index of the largest relative error (None when empty).
    """
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.size == 0:
        return 0.0, 0.0, 1.0, True, None
    diff = np.abs(a - b)
    max_abs = float(np.max(diff))
    rel = diff / denominators(a, b, floor, np.asarray(noise).ravel())
    worst = int(np.argmax(np.where(np.isnan(rel), np.inf, rel)))
    max_rel = float(np.max(rel))
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
    return max_abs, max_rel, cosine, ok, worst


def rounding_noise(dtype, dy_leaves: list, y_leaves: list, pairs: dict, methods) -> dict:
    """Per reference: 32 ε of the gradient's dtype times the largest gradient of that reference
    in the report (or ``max|dy| · max|y|`` when all are ~0), so that a gradient that is zero in
    exact arithmetic (a bias before batch norm) is not failed for rounding."""
    eps = float(jnp.finfo(dtype).eps)
    top = lambda arrays, start: max([float(np.max(np.abs(a))) if a.size else 0.0 for a in arrays] + [start])
    base = top(dy_leaves, 0.0) * top(y_leaves, 1.0)
    return {m: 32 * eps * max([base] + [float(np.max(np.abs(p[0]) + np.abs(p[1]), initial=0.0))
                                        for key, p in pairs.items() if key[-1] == m])
            for m in methods}
