"""The record of :func:`bpjax.explain.explain` as text: the tutorial's steps in order, each
equation printed beside its numbers (values for small arrays; shape, norm and range for large)."""
from __future__ import annotations

import numpy as np

from .record import Explanation

__all__ = ["MAX_VALUES", "describe", "format_explanation", "layer_text", "show_array"]

#: Arrays with at most this many entries are printed whole; larger ones as shape, norm and range.
MAX_VALUES = 32


def _shape(a: np.ndarray) -> str:
    return "(" + ", ".join(str(d) for d in a.shape) + ("," if a.ndim == 1 else "") + ")"


def show_array(a, indent: str = "", max_values: int = MAX_VALUES) -> str:
    """``a``'s shape and its values (4 significant digits) when it has at most ``max_values``
    entries; its shape, L2 norm, mean and range otherwise."""
    a = np.asarray(a)
    if a.ndim == 2 and a.shape[1] == 1 and 1 < a.size <= max_values:     # a column: one line, transposed
        return f"{_shape(a)} " + _values(a[:, 0], indent) + "ᵀ"
    if a.size <= max_values:
        body = _values(a, indent)
        lines = body.splitlines()
        if len(lines) == 1:
            return f"{_shape(a)} {lines[0]}"
        return f"{_shape(a)}\n" + "\n".join(indent + "  " + line for line in lines)
    f = a.astype(np.float64)
    return (f"{_shape(a)}  ‖·‖ = {np.linalg.norm(f):.4g}, mean {f.mean():.4g}, "
            f"range [{f.min():.4g}, {f.max():.4g}]")


def _values(a: np.ndarray, indent: str) -> str:
    """The entries of ``a`` to 4 significant digits, aligned."""
    if not np.issubdtype(a.dtype, np.inexact):
        return np.array2string(a, separator=" ")
    width = max(len(f"{v:.4g}") for v in a.ravel()) if a.size else 1
    return np.array2string(a, separator=" ", max_line_width=100 - len(indent),
                           formatter={"float_kind": lambda v: f"{v:.4g}".rjust(width)})


def param_label(name: str) -> str:
    """A parameter's name as the equations write it (dense's ``w`` is W)."""
    return "W" if name == "w" else name


def in_equation_order(layer, tree: dict) -> list:
    """``tree``'s items in the order of the layer's equations (W before b), then the rest."""
    first = [k for k in layer.formula.grads if k in tree]
    return [(k, tree[k]) for k in first] + [(k, a) for k, a in tree.items() if k not in first]


def layer_text(layer) -> str:
    """One layer in a few characters: ``dense 2→4``, ``sigmoid``."""
    if layer.params and layer.x.ndim and layer.y.ndim:
        return f"{layer.name} {layer.x.shape[-1]}→{layer.y.shape[-1]}"
    return layer.name


def describe(rec: Explanation) -> str:
    """The network in one line: ``dense 2→4, sigmoid, dense 4→1, sigmoid``."""
    return ", ".join(layer_text(layer) for layer in rec.layers)


def _row(indent: str, name: str, a, max_values: int) -> str:
    return f"{indent}{name:<14} " + show_array(a, indent + " " * 15, max_values)


def format_explanation(rec: Explanation, *, max_values: int = MAX_VALUES) -> str:
    """The text ``bpjax explain`` prints (module doc)."""
    out: list[str] = []
    say = out.append
    i4, i6 = "    ", "      "
    say(f"Backpropagation, step by step: {rec.model} ({describe(rec)}) with {rec.loss_name}, "
        f"on a batch of n = {rec.n}.")
    say("")
    say("1. Forward: the input batch propagates through the layers to the output.")
    say(_row(i4, "x (input)", rec.x, max_values))
    for layer in rec.layers:
        say(f"{i4}{layer.label}:  {layer.formula.forward}")
        for k, a in in_equation_order(layer, layer.params):
            say(_row(i6, param_label(k), a, max_values))
        say(_row(i6, "y", layer.y, max_values))
    say("")
    say("2. The loss compares the output y with the expected output y′.")
    say(f"{i4}{rec.loss_formula.forward}")
    say(_row(i6, "y′ (target)", rec.target, max_values))
    say(f"{i6}{'E':<14} {rec.loss:.6g}")
    say("")
    say("3. Its partial derivatives give the error at the output.")
    say(f"{i4}{rec.loss_formula.backward}")
    say(_row(i6, "∂E/∂y", rec.error, max_values))
    say("")
    say("4. The error propagates backwards, layer by layer, giving every weight's gradient.")
    for layer in reversed(rec.layers):
        say(f"{i4}{layer.label}:  {layer.formula.backward}")
        say(_row(i6, "dy (arrives)", layer.dy, max_values))
        for k, g in in_equation_order(layer, layer.grads):
            say(f"{i6}{layer.formula.grads.get(k, f'∂E/∂{k}')}")
            say(_row(i6 + "  ", f"∂E/∂{param_label(k)}", g, max_values))
        if layer.dx is not None:
            say(_row(i6, "dx (sent on)", layer.dx, max_values))
        else:
            say(f"{i6}(its input is integer ids: no error is sent on)")
    say("")
    say(f"5. The weights are updated: {rec.update_formula}, η = {rec.lr:g}.")
    for layer in rec.layers:
        if layer.updates:
            say(f"{i4}{layer.label}:")
        for k, u in in_equation_order(layer, layer.updates):
            say(_row(i6, f"Δ{param_label(k)}", u, max_values))
    say(f"{i4}E after the step: {rec.loss_after:.6g} (before: {rec.loss:.6g})")
    if len(rec.losses) > 2:
        say(f"{i4}… and the loop repeats: after {len(rec.losses) - 1} steps E = {rec.losses[-1]:.6g}")
    say("")
    say("Every gradient above is bpjax's hand-written backward, the one training runs; "
        "tests/test_explain.py checks each against JAX's autodiff of the same loss.")
    return "\n".join(out)
