"""``bp.explain``: one pass of the classic algorithm, recorded in the tutorial's own terms.

The five steps, for every layer (forward order), with the numbers of one batch::

    1. forward     x → each layer's output y
    2. loss        E(y, y′), averaged over the n examples
    3. error       ∂E/∂y at the output
    4. backward    at each layer: the error dy arriving, the error dx it sends on, ∂E/∂θ
    5. update      Δθ = −η ∂E/∂θ (gradient descent), and E after the step

The gradients are those of :func:`value_and_grad <bpjax._grad.value_and_grad>`, the hand-written backward that training
runs, seen layer by layer through :func:`bpjax._observe.observe`; each layer's output is its
forward run again on the input the hook taped (nothing in the model changes).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from .. import _core, _observe
from .._grad import value_and_grad
from .formulas import UPDATE, LayerFormula, LossFormula, layer_formula, loss_formula

__all__ = ["Explanation", "LayerStep", "explain"]


class LayerStep(NamedTuple):
    """One leaf layer in one pass: ``label`` (its path name, ``sequential[0] (dense)``), ``name``
    (its factory), its input ``x`` and output ``y``, the error ``dy`` = ∂E/∂y arriving at its
    output and ``dx`` = ∂E/∂x it sends on (None when x is integer ids), and by parameter name
    (``w``, ``b``; empty without params) its ``params``, ``grads`` ∂E/∂θ and ``updates`` Δθ."""

    label: str
    name: str
    x: np.ndarray
    y: np.ndarray
    dy: np.ndarray
    dx: np.ndarray | None
    params: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    updates: dict[str, np.ndarray]
    formula: LayerFormula


class Explanation(NamedTuple):
    """The record of :func:`explain` (module doc): the batch ``x`` and ``target``, the model's
    ``output`` y, the ``loss`` E and the ``error`` ∂E/∂y at the output, the ``layers``
    (:class:`LayerStep`, forward order), the whole ``grads`` tree, the step size ``lr``, E after one
    step (``loss_after``), and ``losses``: E before each of ``steps`` further steps of gradient
    descent on the same batch and after the last (the loss curve; ``(loss, loss_after)`` at least)."""

    model: str
    loss_name: str
    n: int
    x: np.ndarray
    target: np.ndarray
    output: np.ndarray
    loss: float
    error: np.ndarray
    layers: tuple[LayerStep, ...]
    grads: Any
    lr: float
    loss_after: float
    losses: tuple[float, ...]
    loss_formula: LossFormula
    update_formula: str = UPDATE


class _Explain(_observe.Client):
    """Every layer: the error arriving, and its output (its forward rerun on its taped input);
    leaf layers also: their input, params, gradient and the error they send on."""

    def tape(self, name, per_example, params, leaf):
        return True

    def measure(self, v):
        out = {"dy": v.dy}
        if v.tape is not None:
            t = v.tape
            with _observe.paused():
                out["y"] = t.forward(v.params, t.state, t.x, key=t.key, train=t.train)[0]
            if v.leaf:
                out["x"] = t.x
        if v.leaf:
            out["params"], out["dparams"] = v.params, v.dparams
            if any(a is not None for a in jax.tree_util.tree_leaves(v.dx)):
                out["dx"] = v.dx
        return out


def _named(tree) -> dict[str, np.ndarray]:
    """A layer's params as {name: array}: dict keys as they are (``w``, ``b``), other paths as
    jax writes them."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) or "θ"
        out[name] = np.asarray(leaf)
    return out


def explain(model: _core.Layer, loss: _core.Loss, params, state, x, target, *, lr: float = 0.5,
            steps: int = 0, key: jax.Array | None = None) -> Explanation:
    """One pass of backpropagation through ``model`` under ``loss`` on the batch ``(x, target)``,
    every intermediate recorded: an :class:`Explanation` (module doc).

    ``lr`` is η of the update Δθ = −η ∂E/∂θ; ``steps`` more steps of that gradient descent on the
    same batch give the loss curve ``losses``. ``key`` feeds the layers that draw (dropout).
    ``bpjax explain`` prints the record with each equation beside its numbers; ``--html`` draws it.
    """
    _core.check_model_and_loss("explain", model, loss)
    if not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr > 0):
        raise ValueError(f"explain: expected lr, the step size, to be a positive number, got {lr!r}")
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"explain: expected steps to be a whole number ≥ 0, got {steps!r}")
    grad_fn = value_and_grad(model, loss)
    observed = jax.jit(_observe.observe(grad_fn, _Explain()))
    ((value, _), grads), entries = jax.device_get(observed(params, state, x, target, key=key))
    root = entries[0]

    def step(p, _):
        (e, _), g = grad_fn(p, state, x, target, key=key)
        return jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g), e

    new_params, before = jax.jit(lambda p: jax.lax.scan(step, p, None, length=steps + 1))(params)
    (after, _), _ = jax.jit(grad_fn)(new_params, state, x, target, key=key)
    losses = tuple(float(e) for e in np.asarray(before)) + (float(after),)

    layers = []
    for e in _observe.flatten_entries(entries):
        v = e.values
        name = e.label.rsplit("(", 1)[-1].rstrip(")")
        p, g = _named(v["params"]), _named(v["dparams"])
        layers.append(LayerStep(
            label=e.label, name=name, x=np.asarray(v["x"]), y=np.asarray(v["y"]), dy=np.asarray(v["dy"]),
            dx=np.asarray(v["dx"]) if "dx" in v else None, params=p, grads=g,
            updates={k: -lr * a for k, a in g.items()}, formula=layer_formula(name, tuple(p))))
    return Explanation(
        model=root.label, loss_name=loss.name, n=int(jax.tree_util.tree_leaves(x)[0].shape[0]),
        x=np.asarray(x), target=np.asarray(target), output=np.asarray(root.values["y"]), loss=float(value),
        error=np.asarray(root.values["dy"]), layers=tuple(layers), grads=grads, lr=float(lr),
        loss_after=losses[1], losses=losses, loss_formula=loss_formula(loss.name))
