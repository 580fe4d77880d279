"""bp.check_vjp where a checker is easily fooled: no reference that can run, steps that leave f's
domain, a forward that computes in float32 inside, a bug that a positive cotangent hides.

Each kind passed vacuously or failed a correct function before (issue 29); each test here
holds a right rule to a pass and a planted bug to a failure.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp


def _with_bwd(fwd, bwd, name):
    fwd.__name__ = name
    f = jax.custom_vjp(fwd)
    f.defvjp(lambda *a: (f(*a), a), bwd)
    return f


# ----------------------------------------------------------------------------- no reference, no pass


def _refuses_float64(slope):
    """sin(x), refusing float64 as a Pallas kernel with x64 on does (a dtype error at trace time)."""

    def sin_kernel(x):
        if x.dtype == jnp.float64:
            raise TypeError("lax.div requires arguments to have the same dtypes, got int32, int64")
        return jnp.sin(x)

    return _with_bwd(sin_kernel, lambda res, g: (slope * g * jnp.cos(res[0]),), "sin_kernel")


def test_when_float64_cannot_run_the_differences_run_in_fs_own_precision():
    x = jax.ShapeDtypeStruct((3, 4), jnp.float32)
    right = bp.check_vjp(_refuses_float64(1.0), x)
    assert right.ok and right.fd_dtype == "float32" and right.rows[0].checked, right
    assert right.rows[0].rtol == bp.check.layer.TOLERANCES["float32"]["fd"]
    assert any(n.startswith("fd in float32: f cannot run on float64 copies (TypeError: lax.div") for n in right.notes)
    assert bp.check_vjp(_refuses_float64(1.1), x).failing == ("dx",)


def _solver(x0):
    """``2 x``, by a host solver that raises away from ``x0`` (as one that fails to converge
    at a perturbed point does): only f's own evaluation at x0 succeeds."""

    def solve(x):
        if not np.array_equal(np.asarray(x), x0):
            raise RuntimeError("solver did not converge")
        return 2 * np.asarray(x)

    def solver(x):
        return jax.pure_callback(solve, jax.ShapeDtypeStruct(x.shape, x.dtype), x, vmap_method="sequential")

    return _with_bwd(solver, lambda res, g: (2 * g,), "solver")


def test_a_leaf_no_reference_could_check_fails_unless_allowed():
    x0 = np.array([0.5, -1.25, 2.0])
    solver = _solver(x0)
    report = bp.check_vjp(solver, x0)
    row = report.row("dx", "fd")
    assert not report.ok and report.failing == ("dx",) and report.unchecked == ("dx",), report
    assert not row.checked and row.note.startswith("not checked: skipped: "), report
    assert "FAILED: dx (not checked)" in str(report) and "NOT CHECKED <--" in str(report)
    with pytest.raises(AssertionError, match="NOT CHECKED"):
        bp.assert_vjp_close(solver, x0)
    allowed = bp.check_vjp(solver, x0, allow_unchecked=("dx",))
    assert allowed.ok and allowed.row("dx", "fd").note.startswith("not checked (allowed): "), allowed
    with pytest.raises(TypeError, match="^check_vjp: expected allow_unchecked to be a bool or gradient names"):
        bp.check_vjp(solver, x0, allow_unchecked=3)


# ----------------------------------------------------------------------------- the edge of the domain


def _bce(p, t):
    return -(t * jnp.log(p) + (1 - t) * jnp.log1p(-p))


def _bce_bwd(wrong):
    def bwd(res, g):
        p, t = res
        dp = g * (p - t) / (p * (1 - p) if not wrong else p)
        return dp, g * (jnp.log1p(-p) - jnp.log(p))

    return bwd


_NEAR_EDGES = np.array([0.945, 0.02, 0.5, 0.999, 1e-3, 1 - 1e-9])     # the last within every step of 1


@pytest.mark.parametrize("name,f,wrong", [
    ("logit", jax.scipy.special.logit, None),
    ("log", jnp.log, _with_bwd(lambda x: jnp.log(x), lambda res, g: (g / res[0] ** 2,), "log_wrong")),
    ("bce", _with_bwd(_bce, _bce_bwd(False), "bce"), _with_bwd(_bce, _bce_bwd(True), "bce_wrong")),
])
def test_steps_stay_inside_the_domain_near_0_and_1(name, f, wrong):
    args = (_NEAR_EDGES,) if name != "bce" else (_NEAR_EDGES, np.linspace(0.1, 0.9, 6))
    report = bp.check_vjp(f, *args)
    assert report.ok, report
    edge = {"(5,)"} if name != "log" else set()                       # log's domain has no edge at 1
    assert set(report.edges.get("dx" if name != "bce" else "dp", ())) == edge, report
    if edge:
        assert any(n.startswith("edge of f's domain: d") and "(1 of 6 elements)" in n for n in report.notes), report
    if wrong is not None:
        assert (report := bp.check_vjp(wrong, *args)).failing[:1] == ("dx" if name != "bce" else "dp",), report


def test_a_leaf_whose_every_direction_is_at_the_edge_is_not_checked():
    report = bp.check_vjp(jax.scipy.special.logit, np.array([1 - 1e-9]))
    assert not report.ok and report.unchecked == ("dx",), report
    assert "compared nothing: every direction is at the edge of f's domain" in str(report)


# ----------------------------------------------------------------------------- float32 inside


def _norm32(kind, slope=1.0):
    """rms_norm or layer_norm over the last axis, computed in float32 whatever the inputs (as a
    kernel does), and its hand-written backward (its dx with ``slope``)."""

    def fwd(x, w):
        x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
        xc = x32 - jnp.mean(x32, -1, keepdims=True) if kind == "layer_norm" else x32
        r = jax.lax.rsqrt(jnp.mean(xc * xc, -1, keepdims=True) + 1e-6)
        return (xc * r * w32).astype(x.dtype)

    def bwd(res, g):
        x, w = res
        x32, w32, g32 = x.astype(jnp.float32), w.astype(jnp.float32), g.astype(jnp.float32)
        xc = x32 - jnp.mean(x32, -1, keepdims=True) if kind == "layer_norm" else x32
        r = jax.lax.rsqrt(jnp.mean(xc * xc, -1, keepdims=True) + 1e-6)
        xhat, dxhat = xc * r, g32 * w32
        dx = dxhat - xhat * jnp.mean(dxhat * xhat, -1, keepdims=True)
        if kind == "layer_norm":
            dx = dx - jnp.mean(dxhat, -1, keepdims=True)
        return (slope * r * dx).astype(x.dtype), jnp.sum(g32 * xhat, 0).astype(w.dtype)

    return _with_bwd(fwd, bwd, kind)


@pytest.mark.parametrize("kind,dtype", [("rms_norm", jnp.float32), ("layer_norm", jnp.float64)])
def test_a_forward_in_float32_inside_passes_99_draws_in_100_and_a_slope_bug_fails(kind, dtype):
    """f's programs are kept between checks of the same f, so 100 draws compile once."""
    shapes = (jax.ShapeDtypeStruct((3, 8), dtype), jax.ShapeDtypeStruct((8,), dtype))
    right, wrong = _norm32(kind), _norm32(kind, slope=1.1)
    passed = [bp.check_vjp(right, *shapes, seed=s).ok for s in range(100)]
    assert sum(passed) >= 99, [s for s, ok in enumerate(passed) if not ok]
    report = bp.check_vjp(right, *shapes, seed=0)
    assert report.row("dx", "fd").rtol == bp.check.layer.TOLERANCES["float32"]["fd"], report
    assert any(n.startswith("f computes in float32 inside") for n in report.notes), report
    assert all(bp.check_vjp(wrong, *shapes, seed=s).failing == ("dx",) for s in range(8))


def test_a_float64_forward_is_not_taken_for_float32():
    report = bp.check_vjp(lambda x: jnp.sin(x) * x, jax.ShapeDtypeStruct((3, 4), jnp.float32))
    assert report.ok and not report.notes and report.row("dx", "fd").rtol == bp.check.layer.TOLERANCES["float32"]["fd"]


# ----------------------------------------------------------------------------- cotangent signs


def _det2(x):
    return x[0, 0] * x[1, 1] - x[0, 1] * x[1, 0]


def _det2_bwd(wrong):
    def bwd(res, g):
        (x,) = res
        adj = jnp.array([[x[1, 1], -x[1, 0]], [-x[0, 1], x[0, 0]]])      # d det / dx
        return ((jnp.abs(g) if wrong else g) * adj,)

    return bwd


DET2, DET2_ABS_G = _with_bwd(_det2, _det2_bwd(False), "det2"), _with_bwd(_det2, _det2_bwd(True), "det2_abs_g")


@pytest.mark.parametrize("seed", range(8))
def test_a_bug_a_positive_cotangent_hides_is_caught_at_every_seed(seed):
    """A scalar output: the |g| for g of the wrong rule is right whenever the drawn dy > 0, so
    the pullback along −dy is checked too (the functions are shared: one compile for 8 seeds)."""
    x = jax.ShapeDtypeStruct((2, 2), jnp.float64)
    right = bp.check_vjp(DET2, x, seed=seed)
    assert right.ok and {r.output for r in right.rows} == {"y", "y −dy"}, right
    wrong = bp.check_vjp(DET2_ABS_G, x, seed=seed)
    assert wrong.failing == ("dx",), wrong
    assert "−dy = the same, pulled back along −dy" in str(wrong)
