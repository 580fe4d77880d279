"""Kronecker factors of a layer's GGN block: KFAC and KFLR, with KFC for convolutions.

For a weight W (D_in, D_out) used on the rows a_m (the layer's inputs) with output errors b_m,
the GGN block is G_W = Σ_n Σ_c (Σ_m a_m ⊗ b_mc)(Σ_m a_m ⊗ b_mc)ᵀ over the columns c of the
loss Hessian's factor (``loss_hessian``), the rows m of example n. K-FAC approximates it by
one Kronecker product, ``kron(a, g)`` for W flattened row-major (D_in major, D_out minor). Where
one example has R rows (positions over T, a convolution's output positions O) the two variants
of Eschenhagen et al. (2023, "Kronecker-Factored Approximate Curvature for Modern Neural
Network Architectures") are::

    expand (default)   a = (1/(N·R)) Σ_{n,r} a_nr a_nrᵀ       g = Σ_c Σ_{n,r} b_nrc b_nrcᵀ
    reduce             a = (1/N) Σ_n ā_n ā_nᵀ, ā_n = (1/R) Σ_r a_nr
                       g = Σ_c Σ_n b̄_nc b̄_ncᵀ,  b̄_nc = Σ_r b_nrc

With R = 1 both are the classic K-FAC (Martens & Grosse 2015). Expand is the default: it is
K-FAC for convolutions (KFC, Grosse & Martens 2016) and for a loss on every position (the GPT);
reduce fits a network that pools over the positions before its loss. ``kflr`` takes the columns
of the exact factor S_n, ``kfac`` sampled ones (MC, from the predictive distribution).

Per leaf layer, by the rule its factory names: ``make_layer(..., curvature=...)`` where it
names one, else ``make_layer(..., per_example=...)`` (``RULES``), never by the layer's name::

    "dense"                  a from x (N, ..., D_in); the bias as a homogeneous input 1: kron([[1]], g)
    "conv"                   conv and conv_transpose: a from the patches p_no (∏K·C_in) a window
                             reads (KFC): the layer's own im2col columns (``example_rows``), or for a
                             layer without them its own backward with a unit error at one output
                             position, dW[..., 0] = p_no, so no geometry is rebuilt here.
                             groups = 1 and no fused activation only (else refused, naming the layer)
    "embedding"              a diagonal: a_v = (1/(N·R)) Σ [id_nr = v], given as the vector (V,)
                             (expand only)
    "norm", "mixes_examples" the norm layers (elementwise params): their GGN diagonal instead

Any other layer with params is refused by :func:`kronecker_rule`, naming it, and saying why
for the rules that name a reason (``REFUSED``: "recurrent", "attention", "gpt").
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._observe import View

__all__ = ["Kronecker", "VARIANTS", "RULES", "REFUSED", "rule_name", "kronecker_rule", "input_factors", "error_factors"]

VARIANTS = ("expand", "reduce")


class Kronecker(NamedTuple):
    """One param's Kronecker-factored GGN block, ``kron(a, g)`` (``a`` 1-D: ``diag(a)``), for
    the param flattened row-major with its last axis (outputs) minor."""

    a: jax.Array
    g: jax.Array

    def dense(self) -> jax.Array:
        """The block itself, kron(a, g)."""
        a = jnp.diag(self.a) if self.a.ndim == 1 else self.a
        return jnp.kron(a, self.g)


#: A leaf layer's Kronecker rule by the rule name its factory gave make_layer (``rule_name``);
#: "diagonal": the norm layers (elementwise params) get their GGN diagonal in place of factors.
RULES = {"dense": "dense", "conv": "conv", "embedding": "embedding", "norm": "diagonal", "mixes_examples": "diagonal"}

#: Why a layer with params has no Kronecker rule, by the rule name its factory gave make_layer.
REFUSED = {
    "attention": "its projections' inputs and output errors stay inside its own backward",
    "recurrent": "its weights act through a recurrence over time (no input/error pair per use)",
    "gpt": "its token table is used twice, as a lookup and as the tied unembedding, and its "
           "positions are added",
}


def rule_name(v: View):
    """The rule name ``v``'s factory gave make_layer for its curvature: ``curvature=`` where it
    gave one (conv's per-example rule, "columns", and attention's, "projections", say nothing
    of curvature), else ``per_example=``."""
    return v.curvature or v.per_example


def kronecker_rule(v: View, variant: str) -> str:
    """``"dense"``, ``"conv"``, ``"embedding"``, ``"diagonal"`` for ``v``'s layer (``RULES``), or
    ``ValueError`` naming it and why it has none (raised by the caller only for a layer that
    reports its own params: a GPT's attention is refused as the GPT)."""
    rule = RULES.get(rule_name(v)) if v.leaf else None
    if rule == "embedding" and variant == "reduce":
        raise ValueError(f"kfac: {v.label}: the reduce variant's factor a of an embedding is a dense "
                         "V×V matrix; use kronecker='expand'")
    if rule == "conv":
        x = v.res[0]
        if len(v.res) != 1:
            raise ValueError(f"kfac: {v.label}: a fused activation (activation='relu') makes dW's error "
                             "differ from dy; use a separate relu layer")
        if v.params["w"].shape[-2] != x.shape[-1]:
            raise ValueError(f"kfac: {v.label}: with groups > 1, dW is not one Kronecker product")
    if rule is not None:
        return rule
    why = REFUSED.get(rule_name(v), f"its factory names no Kronecker rule ({', '.join(RULES)})")
    raise ValueError(f"kfac: {v.label}: no Kronecker factors: {why}")


def _rows(a, n):
    """(N, R, K): one example's R rows (positions) of K features."""
    return a.reshape(n, -1, a.shape[-1])


def _second_moment(rows, variant: str, mean: bool):
    """Σ or mean of r rᵀ over the rows (N, R, K), expanded or reduced (module doc).     (K, K)"""
    n, r = rows.shape[0], rows.shape[1]
    if variant == "reduce":
        rows = (jnp.mean(rows, axis=1) if mean else jnp.sum(rows, axis=1))[:, None]   # (N, 1, K)
    flat = rows.reshape(-1, rows.shape[-1])
    total = flat.T @ flat
    if not mean:
        return total
    return total / (n * r if variant == "expand" else n)


def input_factors(v: View, rule: str, n: int, variant: str) -> dict:
    """The factor a of each param of ``v``'s layer (module doc): a dict like its params."""
    if rule == "dense":
        (x,) = v.res
        a = _second_moment(_rows(x, n), variant, mean=True)                       # (D_in, D_in)
        out = {"w": a}
    elif rule == "conv":
        a = _second_moment(_patches(v, n), variant, mean=True)                    # (∏K·C_in, ∏K·C_in)
        out = {"w": a}
    else:                                                                          # embedding
        (ids,) = v.res
        vocab = v.params["table"].shape[0]
        ids = ids.reshape(-1)
        out = {"table": jnp.zeros((vocab,), v.dy.dtype).at[ids].add(1.0, mode="drop") / ids.shape[0]}
    if "b" in v.params:
        out["b"] = jnp.ones((1, 1), v.dy.dtype)                                    # the homogeneous input 1
    return out


def error_factors(v: View, rule: str, n: int, variant: str):
    """This cotangent's part of the factor g, (D_out, D_out): Σ b bᵀ over the rows."""
    return _second_moment(_rows(v.dy, n), variant, mean=False)


def _patches(v: View, n: int) -> jax.Array:
    """p_no for every example and output position, (N, ∏O, ∏K·C_in): the layer's im2col
    columns where it gives them (``example_rows``, bpjax's conv), else from its own backward
    on example n with a unit error at output o, channel 0, which is dW[..., 0] = p_no."""
    if v.example_rows is not None:
        cols, _ = v.example_rows(v.params, v.res, v.dy)                            # (N, ∏O, 1, ∏K·C_in)
        return cols.reshape(n, cols.shape[1], -1)
    (x,) = v.res
    out = v.dy.shape[1:]                                                            # (*O, C_out)
    positions = out[:-1]
    count = 1
    for s in positions:
        count *= s

    def patch(x1, o):
        dy1 = jnp.zeros((1, count, out[-1]), v.dy.dtype).at[0, o, 0].set(1.0).reshape(1, *out)
        dparams, _ = v.backward(v.params, (x1[None],), dy1)
        return dparams["w"][..., 0].reshape(-1)                                    # (∏K·C_in,)

    per_position = jax.vmap(patch, in_axes=(None, 0))
    return jax.vmap(lambda x1: per_position(x1, jnp.arange(count)))(x)
