"""compare_intermediates: a hand-derived gradient of the loss, intermediate by intermediate,
against autodiff (the "backprop ninja" exercise: find the first line of a backward that is wrong).

How autodiff gets ``∂loss/∂h`` for an intermediate ``h``: the forward passes each intermediate
through ``tap(name, value)``. Called by the user, ``tap`` returns ``value`` unchanged; called by
:func:`compare_intermediates`, it returns ``value + zeros[name]``, and the gradient of the loss
with respect to that added zero is exactly ``∂loss/∂h`` (the zero changes no value, and every use
of ``h`` downstream sees it). One function, one extra argument, nothing to rewrite: that is why
taps were chosen over splitting the forward at every intermediate.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .compare import TOLERANCES, compare

__all__ = ["IntermediateRow", "IntermediateTable", "compare_intermediates", "identity_tap"]


def identity_tap(name: str, value):
    """The default ``tap``: the value unchanged, so the forward runs as plain JAX."""
    return value


@dataclasses.dataclass(frozen=True)
class IntermediateRow:
    """One intermediate (or parameter) against autodiff.

    Attributes:
        name: the tap's (or parameter's) name.
        status: ``"exact"`` (bitwise equal), ``"approx"`` (within ``rtol``), ``"FAIL"`` (beyond it),
            ``"wrong shape"`` or ``"not checked"`` (no gradient supplied).
        shape: the reference gradient's shape.
        max_abs: ``max |mine − autodiff|`` (NaN when nothing was compared).
        max_rel: the largest relative error, as :mod:`bpjax.check.compare` defines it.
        rtol: the tolerance it was held to.
        note: what went wrong, for the error rows.
    """

    name: str
    status: str
    shape: tuple
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    rtol: float = float("nan")
    note: str = ""

    @property
    def ok(self) -> bool:
        """Only a compared gradient can pass; a missing or wrong-shaped one never does."""
        return self.status in ("exact", "approx")


@dataclasses.dataclass(frozen=True)
class IntermediateTable:
    """The result of :func:`compare_intermediates`: ``str(table)`` prints one row per name, in
    the order the forward computed them, then the parameters; ``table.ok`` is the verdict."""

    rows: tuple
    dtype: str

    @property
    def ok(self) -> bool:
        """True when every intermediate and parameter was supplied and matched."""
        return all(r.ok for r in self.rows)

    all_close = ok

    def row(self, name: str) -> IntermediateRow:
        """The row named ``name``."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"compare_intermediates: no row named {name!r}; the rows are {[r.name for r in self.rows]}")

    @property
    def failing(self) -> tuple:
        """The names of the rows that did not pass."""
        return tuple(r.name for r in self.rows if not r.ok)

    def __str__(self) -> str:
        head = ["name", "shape", "result", "max abs diff", "max rel diff", "tol"]
        cells = [[r.name, str(r.shape), r.status + ("" if r.ok else "  <--"),
                  "" if np.isnan(r.max_abs) else f"{r.max_abs:.2e}",
                  "" if np.isnan(r.max_rel) else f"{r.max_rel:.2e}",
                  "" if np.isnan(r.rtol) else f"{r.rtol:.0e}"] for r in self.rows]
        widths = [max(len(c[i]) for c in [head] + cells) for i in range(len(head))]
        line = lambda c: "  ".join(s.ljust(w) for s, w in zip(c, widths)).rstrip()
        out = [line(head), line(["-" * w for w in widths])] + [line(c) for c in cells]
        out += [f"  {r.name}: {r.note}" for r in self.rows if r.note]
        bad = self.failing
        out.append(f"{self.dtype}: exact = bitwise equal; approx = max rel diff <= tol "
                   "(as in bpjax.check.compare) or max abs diff <= 32 eps x the largest gradient; "
                   + ("all ok" if not bad else f"{len(bad)} not ok: {', '.join(bad)}"))
        return "\n".join(out)


def compare_intermediates(forward: Callable, params, *args, grads: Mapping, rtol=None) -> IntermediateTable:
    """Compare hand-derived gradients of the loss with autodiff, one intermediate at a time.

    Usage (docs/tutorials/backprop_ninja.md has a whole exercise):

        def forward(params, x, y, tap=bp.identity_tap):
            h = tap("h", x @ params["w"])
            loss = tap("loss", jnp.mean((h - y) ** 2))
            return loss, {"h": h}

        loss, inter = forward(params, x, y)
        dh = 2 * (inter["h"] - y) / y.size
        table = bp.compare_intermediates(forward, params, x, y,
                                         grads={"loss": 1.0, "h": dh, "w": x.T @ dh})
        print(table)

    Args:
        forward: ``forward(params, *args, tap=...) -> (loss, intermediates)``; it passes every
            intermediate it wants checked through ``tap(name, value)`` (each name once) and
            returns a scalar loss and anything else (the intermediates, for the user's backward).
        params: a dict of arrays (names must differ from the taps'); their gradients are rows too.
        *args: the forward's other arguments (inputs, labels), not differentiated.
        grads: name -> the hand-derived ``∂loss/∂name``, for taps and parameters; a name left out
            is a ``not checked`` row, which fails.
        rtol: a float to override the dtype's tolerance (``TOLERANCES[dtype]["vjp"]``:
            1e-8 in float64, 1e-4 in float32).

    Returns:
        An :class:`IntermediateTable`.
    """
    name = "compare_intermediates"
    if not callable(forward):
        raise TypeError(f"{name}: expected forward to be a function (params, *args, tap=...) -> (loss, aux), "
                        f"got {type(forward).__name__}")
    if not isinstance(params, Mapping) or not all(hasattr(v, "shape") for v in params.values()):
        raise TypeError(f"{name}: expected params to be a dict of arrays, got {type(params).__name__}")
    if not isinstance(grads, Mapping):
        raise TypeError(f"{name}: expected grads to be a dict name -> array, got {type(grads).__name__}")

    shapes: dict = {}

    def recording_tap(tap_name, value):
        if not isinstance(tap_name, str):
            raise TypeError(f"{name}: expected tap's name to be a str, got {tap_name!r}")
        if tap_name in shapes:
            raise ValueError(f"{name}: expected each tap name once, got {tap_name!r} twice")
        if tap_name in params:
            raise ValueError(f"{name}: expected tap names distinct from params' keys, got {tap_name!r} in both")
        shapes[tap_name] = jax.ShapeDtypeStruct(jnp.shape(value), jnp.result_type(value))
        return value

    out = jax.eval_shape(lambda p: forward(p, *args, tap=recording_tap), params)
    if not (isinstance(out, tuple) and len(out) == 2 and out[0].shape == ()):
        raise ValueError(f"{name}: expected forward to return (scalar loss, intermediates), got {out}")
    unknown = sorted(set(grads) - set(shapes) - set(params))
    if unknown:
        raise ValueError(f"{name}: expected grads' names among the taps {list(shapes)} and params "
                         f"{list(params)}, got unknown {unknown}")

    def loss_of(p, zeros):
        return forward(p, *args, tap=lambda n, v: v + zeros[n])[0]

    zeros = {n: jnp.zeros(s.shape, s.dtype) for n, s in shapes.items()}
    dparams, dtaps = jax.grad(loss_of, argnums=(0, 1))(params, zeros)
    reference = {**dtaps, **dparams}
    dtype = jnp.result_type(out[0]).name
    tol = TOLERANCES.get(dtype, TOLERANCES["float32"])
    limit = tol["vjp"] if rtol is None else float(rtol)
    # 32 ε of the dtype times the table's largest gradient: a gradient that is zero in exact
    # arithmetic (logit_maxes' in a cross-entropy) is passed when its error is at that rounding level.
    noise = 32 * float(jnp.finfo(dtype).eps) * max(float(np.max(np.abs(r), initial=0.0)) for r in reference.values())
    return IntermediateTable(tuple(_row(n, grads.get(n), reference[n], limit, tol["floor"], noise)
                                   for n in list(shapes) + list(params)), dtype)


def _row(name: str, mine, ref, rtol: float, floor: float, noise: float) -> IntermediateRow:
    """One row: missing, wrong shape, exact, approx or FAIL."""
    ref = np.asarray(ref)
    if mine is None:
        return IntermediateRow(name, "not checked", ref.shape, note="no gradient supplied")
    mine = np.asarray(mine)
    if mine.shape != ref.shape:
        return IntermediateRow(name, "wrong shape", ref.shape,
                               note=f"expected shape {ref.shape}, got {mine.shape}")
    if np.array_equal(mine, ref):
        return IntermediateRow(name, "exact", ref.shape, 0.0, 0.0, rtol)
    max_abs, max_rel, _, ok, _ = compare(mine, ref, rtol, floor, noise)
    return IntermediateRow(name, "approx" if ok else "FAIL", ref.shape, max_abs, max_rel, rtol)
