"""The report of a gradient check (the last part of a check: draw, references, finite
differences, compare, report).

A :class:`GradientReport` holds one :class:`Comparison` row per gradient leaf (and, for
:func:`bpjax.check_vjp` of a function with several outputs, per output leaf) and reference;
``str(report)`` is the table, ``report.ok`` the verdict.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

__all__ = ["Comparison", "GradientReport", "METHODS", "LEGEND"]

METHODS = ("vjp", "fd", "jvp")

#: One line per reference under the table; ``{n}`` directions, ``{fd}`` the precision used.
LEGEND = {
    "vjp": "vjp = jax.vjp of the same forward, pulled back along dy",
    "fd": "fd  = central differences in {fd}, {n} random directions per leaf; order of the Taylor "
          "remainder: ≈2 right, ≈1 wrong, — linear, (…) not binding (kink)",
    "jvp": "jvp = forward mode ⟨dy, J v⟩ vs ⟨grad, v⟩",
}


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One gradient leaf against one reference.

    Attributes:
        gradient: the leaf, named by its tree path (``"dparams[0]['w']"``, ``"dx"``).
        shape: the leaf's shape.
        reference: ``"vjp"``, ``"fd"`` or ``"jvp"`` (``"ref"``: autodiff of a reference function).
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
        output: the output leaf whose cotangent alone was pulled back (``"y[1]"``); ``""``
            when the cotangent covered every output.
        where: where the largest relative disagreement sits: an element index ``"(2, 0)"``, or
            ``"v1"`` for the second random direction.
        kinks: points left out because a kink sits there (element indices or directions).
        edges: directions left out because f is not finite within their smallest steps (the
            edge of its domain: ``log`` near 0).
        checked: whether this reference compared anything (False when it was skipped, or
            every point was left out). A leaf no reference checked is ``not checked``: it
            fails unless the check was told it may go unchecked.
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
    output: str = ""
    where: str = ""
    kinks: tuple = ()
    edges: tuple = ()
    checked: bool = True


@dataclasses.dataclass(frozen=True)
class GradientReport:
    """The result of :func:`check_layer`, :func:`check_model`, :func:`check_loss` or :func:`check_vjp`.

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
        legend: lines under the table, one per reference (default: :data:`LEGEND`).
        notes: further lines under the table (kinks found, points resampled).
        show_where: print the column of where the largest disagreement sits.
    """

    title: str
    details: str
    rows: tuple
    methods: tuple = METHODS
    directions: int = 3
    fd_dtype: str = "float64"
    legend: tuple = ()
    notes: tuple = ()
    show_where: bool = False

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def failing(self) -> tuple:
        """Names of the failing gradient leaves, in table order (those not checked included)."""
        return tuple(dict.fromkeys(r.gradient for r in self.rows if not r.ok))

    @property
    def unchecked(self) -> tuple:
        """Names of the gradient leaves that no reference compared (for some output), in table order."""
        return tuple(dict.fromkeys(r.gradient for r in self.rows if r.note.startswith("not checked")))

    @property
    def kinks(self) -> dict:
        """``{gradient: points}`` left out of the comparison because a kink sits there."""
        out: dict = {}
        for r in self.rows:
            if r.kinks:
                out.setdefault(r.gradient, [])
                out[r.gradient] += [k for k in r.kinks if k not in out[r.gradient]]
        return {g: tuple(k) for g, k in out.items()}

    def row(self, gradient: str, reference: str, output: Optional[str] = None) -> Comparison:
        """The row of ``gradient`` (e.g. ``"dparams['w']"``) against ``reference`` (for ``output``)."""
        for r in self.rows:
            if r.gradient == gradient and r.reference in (reference, "shape") \
                    and (output is None or r.output == output):
                return r
        raise KeyError(f"GradientReport.row: expected one of {sorted({r.gradient for r in self.rows})} "
                       f"and a reference in {self.methods}, got ({gradient!r}, {reference!r})")

    @property
    def edges(self) -> dict:
        """``{gradient: directions}`` left out of fd at the edge of f's domain."""
        out: dict = {}
        for r in self.rows:
            if r.edges:
                out.setdefault(r.gradient, [])
                out[r.gradient] += [k for k in r.edges if k not in out[r.gradient]]
        return {g: tuple(k) for g, k in out.items()}

    def __str__(self) -> str:
        only_unchecked = lambda g: all(r.note.startswith("not checked") for r in self.rows
                                       if r.gradient == g and not r.ok)
        verdict = "ok" if self.ok else "FAILED: " + ", ".join(
            g + (" (not checked)" if only_unchecked(g) else "") for g in self.failing)
        show_out = any(r.output for r in self.rows)
        lead = ["gradient", "shape"] + (["output"] if show_out else []) + ["vs"]
        head = lead + ["max abs err", "max rel err", "cosine", "order", "tol"] \
            + (["at"] if self.show_where else []) + ["result"]
        table = [_cells(r, prev, show_out, self.show_where) for r, prev in zip(self.rows, (None,) + self.rows)]
        n = len(lead)
        full = [t for t in table if len(t) == len(head)]
        widths = [max([len(h)] + [len(t[i]) for t in full] + [len(t[i]) for t in table if i < n])
                  for i, h in enumerate(head)]
        line = lambda cols: "  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()
        out = [f"{self.title} — {verdict}", f"  {self.details}", line(head)]
        for t in table:
            out.append(line(t) if len(t) == len(head) else line(t[:n]) + "  " + t[n] + "  " + t[n + 1])
        if not table:
            out.append("  (no floating-point inputs: nothing to check)")
        out += ["  " + n_ for n_ in self.notes]
        legend = self.legend or tuple(LEGEND[m] for m in self.methods)
        out += ["  " + t.format(n=self.directions, fd=self.fd_dtype) for t in legend]
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


def _cells(r: Comparison, prev: Optional[Comparison], show_out: bool, show_where: bool) -> list:
    """The cells of one row: the leaf's name and shape only on its first row; a note spans the
    numeric columns."""
    first = prev is None or r.gradient != prev.gradient
    name, shape = (r.gradient, str(r.shape)) if first else ("", "")
    lead = [name, shape]
    if show_out:
        lead.append(r.output if first or r.output != prev.output else "")
    lead.append(r.reference)
    result = ("—" if r.note else "ok") if r.ok else "NOT CHECKED <--" if r.note.startswith("not checked") \
        else "FAIL <--"
    if r.note:
        return lead + [r.note, result]
    order = "" if r.reference != "fd" else ("—" if r.order is None else f"{r.order:.2f}")
    order = order if r.order_binding else f"({order})"
    return lead + [f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", f"{r.cosine:.6f}", order, f"{r.rtol:.0e}"] \
        + ([r.where] if show_where else []) + [result]
