"""The equations ``bpjax explain`` prints beside the numbers, by layer and loss name.

Each entry is written in the tutorial's notation: x a layer's input, y its output, dy = ∂E/∂y the
error arriving at its output, dx = ∂E/∂x the error it sends on, and ⊙ the elementwise product.
A layer or loss with no entry (a user's own) is described by its name and its hand-written
backward, never by an equation it may not satisfy.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["UPDATE", "LayerFormula", "LossFormula", "layer_formula", "loss_formula"]


class LayerFormula(NamedTuple):
    forward: str
    backward: str
    grads: dict[str, str]       # param name -> its gradient's equation


class LossFormula(NamedTuple):
    forward: str
    backward: str


_LAYERS: dict[str, LayerFormula] = {
    "dense": LayerFormula("y = x W + b", "dx = dy Wᵀ", {"w": "∂E/∂W = xᵀ dy", "b": "∂E/∂b = Σₙ dyₙ"}),
    "identity": LayerFormula("y = x", "dx = dy", {}),
    "relu": LayerFormula("y = max(x, 0)", "dx = dy ⊙ [x > 0]", {}),
    "leaky_relu": LayerFormula("y = x if x > 0 else αx", "dx = dy ⊙ (1 if x > 0 else α)", {}),
    "elu": LayerFormula("y = x if x > 0 else α(eˣ − 1)", "dx = dy ⊙ (1 if x > 0 else y + α)", {}),
    "sigmoid": LayerFormula("y = σ(x) = 1 / (1 + e⁻ˣ)", "dx = dy ⊙ σ′(x) = dy ⊙ y ⊙ (1 − y)", {}),
    "tanh": LayerFormula("y = tanh(x)", "dx = dy ⊙ (1 − y²)", {}),
    "softplus": LayerFormula("y = log(1 + eˣ)", "dx = dy ⊙ σ(x)", {}),
    "gelu": LayerFormula("y = x Φ(x)", "dx = dy ⊙ (Φ(x) + x φ(x))", {}),
    "silu": LayerFormula("y = x σ(x)", "dx = dy ⊙ σ(x) ⊙ (1 + x ⊙ (1 − σ(x)))", {}),
    "softmax": LayerFormula("y = eˣ / Σₖ eˣᵏ", "dx = y ⊙ (dy − Σₖ dyₖ yₖ)", {}),
    "log_softmax": LayerFormula("y = x − log Σₖ eˣᵏ", "dx = dy − softmax(x) Σₖ dyₖ", {}),
    "conv": LayerFormula("y = x ⋆ W + b  (cross-correlation over windows)",
                         "dx = the transposed convolution of dy with W",
                         {"w": "∂E/∂W = Σ over positions: x's window ⊗ dy", "b": "∂E/∂b = Σ dy"}),
    "batch_norm": LayerFormula("x̂ = (x − μ_batch) / √(σ²_batch + ε),  y = γ ⊙ x̂ + β",
                               "dx = γ/√(σ² + ε) ⊙ (dy − mean(dy) − x̂ ⊙ mean(dy ⊙ x̂))",
                               {"scale": "∂E/∂γ = Σ dy ⊙ x̂", "bias": "∂E/∂β = Σ dy"}),
    "layer_norm": LayerFormula("x̂ = (x − μ_row) / √(σ²_row + ε),  y = γ ⊙ x̂ + β",
                               "dx = γ/√(σ² + ε) ⊙ (dy − mean(dy) − x̂ ⊙ mean(dy ⊙ x̂)), means over each row",
                               {"scale": "∂E/∂γ = Σ dy ⊙ x̂", "bias": "∂E/∂β = Σ dy"}),
    "max_pool": LayerFormula("y = the max of each window", "dx = dy routed to each window's max", {}),
    "avg_pool": LayerFormula("y = the mean of each window", "dx = dy spread evenly over each window", {}),
    "global_avg_pool": LayerFormula("y = the mean over positions", "dx = dy / (positions), at every position", {}),
    "flatten": LayerFormula("y = x reshaped to (n, features)", "dx = dy reshaped back", {}),
    "reshape": LayerFormula("y = x reshaped", "dx = dy reshaped back", {}),
    "dropout": LayerFormula("y = x ⊙ m / (1 − p),  m ~ Bernoulli(1 − p)", "dx = dy ⊙ m / (1 − p)", {}),
}

_LOSSES: dict[str, LossFormula] = {
    "squared_error": LossFormula("E = (1/n) Σₙ ½‖yₙ − y′ₙ‖²", "∂E/∂y = (y − y′) / n"),
    "mean_squared_error": LossFormula("E = (1/S) Σ (y − y′)²,  S = the number of entries",
                                      "∂E/∂y = 2 (y − y′) / S"),
    "huber": LossFormula("E = (1/S) Σ ℓ(y − y′),  ℓ(r) = ½r² if |r| ≤ δ else δ(|r| − ½δ)",
                         "∂E/∂y = clip(y − y′, −δ, δ) / S"),
    "softmax_cross_entropy": LossFormula("E = −(1/n) Σₙ log softmax(yₙ)[y′ₙ]",
                                         "∂E/∂y = (softmax(y) − onehot(y′)) / n"),
}

#: Step 5 of the algorithm: gradient descent with step size η.
UPDATE = "θ ← θ − η ∂E/∂θ"


def layer_formula(name: str, param_names: tuple[str, ...] = ()) -> LayerFormula:
    """The equations of the layer factory ``name``; a plain description for one not listed."""
    if name in _LAYERS:
        return _LAYERS[name]
    grads = {p: f"∂E/∂{p} = {name}'s hand-written backward" for p in param_names}
    return LayerFormula(f"y = {name}(x)", f"dx = {name}'s hand-written backward of dy", grads)


def loss_formula(name: str) -> LossFormula:
    """The equations of the loss ``name``; a plain description for one not listed."""
    return _LOSSES.get(name, LossFormula(f"E = {name}(y, y′)", f"∂E/∂y = {name}'s hand-written backward"))
