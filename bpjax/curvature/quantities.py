"""Curvature and gradient statistics per layer, from one forward and a few backward passes.

:func:`backward_quantities` runs the model's forward once, observed (``bpjax.observe``), and then
its hand-written backward once per kind of cotangent the asked-for quantities need, each pass
observed so that every layer hands over the dy it got and its residuals::

    the error dy = ∂L/∂y           first order: batch_grad, batch_l2, sum_grad_squared, variance
                                   (and the batch gradient itself, always)
    the columns of S_n, H_n = S_n S_nᵀ    diag_ggn, batch_diag_ggn, kflr  (C cotangents, vmapped)
    sampled s, E[s sᵀ] = H_n       diag_ggn_mc, kfac                     (k cotangents, vmapped)

(``loss_hessian`` gives S_n and the samples per loss.) A batch of cotangents is the backward
vmapped over its leading axis: each column goes through the same hand-written backward, and
vmap is not autodiff. Every layer with params then splits its dθ by example (``per_layer``)
or forms its Kronecker factors (``kronecker``), and the sums over the columns give::

    batch_grad       g_n = ∇θ ℓ_n, example n's loss alone (bp.per_example_grads)   (N, *θ)
    batch_l2         ‖g_n‖² over the layer's params                                 (N,)
    sum_grad_squared Σ_n g_n ⊙ g_n                                                  θ's shape
    variance         (1/N) Σ_n g_n ⊙ g_n − ḡ ⊙ ḡ,  ḡ = (1/N) Σ_n g_n = the batch gradient:
                     the per-parameter variance of the g_n, normalised by N (not N − 1), BackPACK's
    diag_ggn         diag G, G = Σ_n J_nᵀ H_n J_n = Σ_n Σ_c (J_nᵀ s_nc)²            θ's shape
    batch_diag_ggn   diag(J_nᵀ H_n J_n) per example (they sum to diag_ggn)         (N, *θ)
    diag_ggn_mc      Σ_n Σ_samples (J_nᵀ s_n)², an unbiased estimate of diag_ggn   θ's shape
    kflr, kfac       per param a :class:`Kronecker` (a, g) from the exact / sampled cotangents;
                     the norm layers get their GGN diagonal (exact / MC) in its place

H_n is the Hessian of the batch loss L (a mean over examples, as every bpjax loss is) with
respect to y_n, so G is the GGN of L itself. J_nᵀ s is the per-example share of the backward of
the cotangent s placed at example n (``per_layer``).
"""
from __future__ import annotations

import collections
import re
from typing import Sequence

import jax
import jax.numpy as jnp

from .. import _core
from .._observe import Client, View, _Observer, param_size
from .kronecker import Kronecker, VARIANTS, error_factors, input_factors, kronecker_rule
from .loss_hessian import check_loss_known, factor_columns, sampled_columns
from .per_layer import needs_tape, per_example_dparams

__all__ = ["QUANTITIES", "backward_quantities"]

FIRST_ORDER = ("batch_grad", "batch_l2", "sum_grad_squared", "variance")
EXACT = ("diag_ggn", "batch_diag_ggn", "kflr")
SAMPLED = ("diag_ggn_mc", "kfac")
#: Every quantity :func:`backward_quantities` computes.
QUANTITIES = FIRST_ORDER + EXACT + SAMPLED
#: The ``fold_in`` constant of the key that draws the sampled cotangents (the layers get ``key`` itself).
SAMPLE_STREAM = 0x63757276

_WHERE = "backward_quantities"


class _Measure(Client):
    """What each layer with params reports in one backward pass: its per-example dparams
    (``"g"``, scaled to the g_n of its loss alone), their squares (``"sq"`` summed over
    examples, ``"sq_n"`` per example), or its Kronecker factors (``"a"``, ``"g"``)."""

    def __init__(self, n: int, variant: str):
        self.n, self.variant = n, variant
        self.wants: tuple = ()          # set before each pass: what this pass measures
        self.refused: dict = {}         # path (without scan steps) -> why it has no Kronecker factors

    def tape(self, name, per_example, params, leaf):
        return needs_tape(per_example, params, leaf)

    def measure(self, v: View) -> dict:
        if not jax.tree_util.tree_leaves(v.params) or not self._owns_params(v):
            return {}
        out = {}
        rule = None
        if "kron" in self.wants:
            try:
                rule = kronecker_rule(v, self.variant)
            except ValueError as e:     # raised if this layer reports itself (not inside a GPT)
                self.refused[v.label] = str(e)
                out["refused"] = jnp.zeros(())     # so that its entry reports (and the pass raises)
            if rule not in (None, "diagonal"):
                out["a"] = input_factors(v, rule, self.n, self.variant)
                out["g"] = error_factors(v, rule, self.n, self.variant)
        needs_sq = {"sq", "sq_n"} & set(self.wants) or rule == "diagonal"
        rows = _single_rows(v, self.n)
        if "grad_sq" in self.wants:                  # the first-order sums, without the g_n where it can
            out.update(_first_order_sums(v, self.n, rows))
        if needs_sq and rows is not None and "sq_n" not in self.wants:
            out["sq"] = _sum_sq(v, *rows)             # Σ_n (J_nᵀ s_n)² = (x²)ᵀ (s²), no per-example shares
            needs_sq = False
        if "grad" in self.wants or needs_sq:
            g = per_example_dparams(_WHERE, v, self.n)                   # (N, *θ)
            if "grad" in self.wants:
                out["grad"] = jax.tree_util.tree_map(lambda a: self.n * a, g)       # g_n = N · J_nᵀ dy_n
            if needs_sq:
                sq = jax.tree_util.tree_map(jnp.square, g)
                out["sq"] = jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), sq)
                if "sq_n" in self.wants:
                    out["sq_n"] = sq
        return out

    def _owns_params(self, v: View) -> bool:
        """A leaf, or a layer with params beside its layers' (it reports them all, and its
        layers' entries are left out)."""
        return v.leaf or (v.per_example != "combinator" and param_size(v.params) != sum(e.size for e in v.subs))


def _single_rows(v: View, n: int):
    """(x (N, D_in), dy (N, D_out)) for a dense layer that sees one row per example, whose
    per-example shares are outer products x_n ⊗ dy_n; else None."""
    if not v.leaf or v.per_example != "dense":
        return None
    (x,) = v.res
    if x.ndim != 2 or x.shape[0] != n:
        return None
    return x, v.dy


def _sum_sq(v: View, x, dy) -> dict:
    """Σ_n (x_n ⊗ dy_n)² = (x²)ᵀ (dy²), and Σ_n dy_n² for the bias: BackPACK's square trick."""
    out = {"w": jnp.square(x).T @ jnp.square(dy)}
    if "b" in v.params:
        out["b"] = jnp.sum(jnp.square(dy), axis=0)
    return out


def _first_order_sums(v: View, n: int, rows) -> dict:
    """For the first-order quantities but batch_grad: Σ_n g_n² ("gsq"), ‖g_n‖² ("l2", (N,)) and
    ḡ = (1/N) Σ_n g_n ("mean", the layer's dparams), with g_n = N · J_nᵀ dy_n; from (x²)ᵀ(dy²)
    and ‖x_n‖²·‖dy_n‖² for a dense layer on rows, else from the per-example shares."""
    if rows is not None:
        x, dy = rows
        gsq = jax.tree_util.tree_map(lambda a: n * n * a, _sum_sq(v, x, dy))
        dy2 = jnp.sum(jnp.square(dy), axis=1)
        l2 = n * n * (jnp.sum(jnp.square(x), axis=1) * dy2 + (dy2 if "b" in v.params else 0.0))
    else:
        g = jax.tree_util.tree_map(lambda a: n * a, per_example_dparams(_WHERE, v, n))   # (N, *θ)
        gsq = jax.tree_util.tree_map(lambda a: jnp.sum(a * a, axis=0), g)
        l2 = sum(jnp.sum(a.reshape(n, -1) ** 2, axis=1) for a in jax.tree_util.tree_leaves(g))
    return {"gsq": gsq, "l2": l2, "mean": v.dparams}


def _reported(entries) -> list:
    """The entries that report a layer's quantities, in forward order: every entry with values;
    below one, none (its params cover its layers')."""
    out = []

    def walk(e):
        if e.values:
            out.append(e)
            return
        for s in e.subs:
            walk(s)

    for e in entries:
        walk(e)
    return sorted(out, key=lambda e: e.order)


def _check_quantities(quantities, variant) -> tuple:
    if isinstance(quantities, str):
        quantities = (quantities,)
    quantities = tuple(quantities)
    unknown = [q for q in quantities if q not in QUANTITIES]
    if unknown or not quantities:
        raise ValueError(f"{_WHERE}: expected quantities among {', '.join(QUANTITIES)}, got {list(quantities)!r}")
    if variant not in VARIANTS:
        raise ValueError(f"{_WHERE}: expected kronecker to be one of {VARIANTS}, got {variant!r}")
    return quantities


def backward_quantities(model, loss, quantities: Sequence[str], *, mc_samples: int = 1,
                        kronecker: str = "expand", train: bool = True):
    """The loss, the batch gradient and, per layer, the asked-for curvature and gradient statistics.

    Returns ``f(params, state, x, target, *, key=None) -> ((value, new_state), grads, per_layer)``:
    ``(value, new_state), grads`` are ``bp.value_and_grad``'s, and ``per_layer`` is a dict keyed
    by the layers' path names (``sequential[3] (dense)``, as :func:`bpjax.gradient_flow`), one
    per layer with params, in forward order, each a dict ``{quantity: value}`` for the
    ``quantities`` asked (``QUANTITIES``; the module doc gives each one's equation and shape).
    A layer with params of its own beside its layers' (the GPT: its tied table and positions)
    has one entry for all its params, and its layers none.

    ``mc_samples``: the sampled cotangents per example for ``diag_ggn_mc`` and ``kfac`` (drawn
    with ``fold_in(key, SAMPLE_STREAM)``; ``key`` is then required). ``kronecker``: ``"expand"``
    (default) or ``"reduce"``, the variant for a layer applied to several positions of one
    example (``bpjax.curvature.kronecker``). ``train``: the forward's mode (``batch_norm`` in
    training mixes examples and is refused, naming it). Jittable.

    Raises ``ValueError`` for a loss whose output Hessian is not known (second-order
    quantities), and for a layer with no Kronecker rule (``kfac``, ``kflr``), naming it and why.
    """
    _core.check_model_and_loss(_WHERE, model, loss)
    quantities = _check_quantities(quantities, kronecker)
    mc_samples = int(mc_samples)
    if mc_samples < 1:
        raise ValueError(f"{_WHERE}: expected mc_samples >= 1, got {mc_samples}")
    if set(quantities) & set(EXACT + SAMPLED):
        check_loss_known(_WHERE, loss)
    variant = kronecker

    def f(params, state, x, target, *, key=None):
        if set(quantities) & set(SAMPLED) and key is None:
            raise ValueError(f"{_WHERE}: expected key= to draw the sampled cotangents of "
                             f"{', '.join(q for q in quantities if q in SAMPLED)}")
        n = jax.tree_util.tree_leaves(x)[0].shape[0]
        client = _Measure(n, variant)
        hook = _Observer(client)
        _core._HOOKS.append(hook)
        try:
            y, new_state, res = model.forward(params, state, x, key=key, train=train)      # the forward
            value, loss_res = loss.forward(y, target)
            dy = loss.backward(loss_res)                                                 # (N, ...) ∂L/∂y
            first = set(quantities) & set(FIRST_ORDER)
            client.wants = ("grad",) if "batch_grad" in first else ("grad_sq",) if first else ()
            grads, _ = model.backward(params, res, dy)                                   # first order
            reports = {"grad": _reported(hook.entries)}
            if set(quantities) & set(EXACT):
                client.wants = _wants(quantities, EXACT)
                cols = factor_columns(loss, y, loss_res)                  # (C, N, ...)
                reports["exact"] = _columns_pass(model, params, res, cols, hook)
            if set(quantities) & set(SAMPLED):
                client.wants = _wants(quantities, SAMPLED)
                k = jax.random.fold_in(key, SAMPLE_STREAM)
                cols = sampled_columns(loss, y, loss_res, k, mc_samples)  # (k, N, ...)
                reports["sampled"] = _columns_pass(model, params, res, cols, hook)
        finally:
            _core._HOOKS.remove(hook)
        grads = _core.cast_like(grads, params)
        return (value, new_state), grads, _assemble(quantities, reports, n)

    return f


def _wants(quantities, kind) -> tuple:
    """What a pass of cotangents of ``kind`` (EXACT or SAMPLED) measures."""
    diag, batch, kron = kind[0], "batch_diag_ggn", kind[-1]
    return tuple(w for w, q in (("sq", diag), ("sq_n", batch), ("kron", kron)) if q in quantities)


def _columns_pass(model, params, res, cols, hook) -> list:
    """The model's backward of every cotangent in ``cols`` (C, N, ...), vmapped, observed:
    the reporting entries, each value summed over the C columns (the factors a, the same for
    every column, taken once)."""

    def one(d):
        hook.rewind()
        model.backward(params, res, d)
        return _reported(hook.entries)

    stacked = jax.vmap(one)(cols)
    for e in stacked:
        why = hook.client.refused.get(re.sub(r"\{\d+\}", "", e.label))
        if why:
            raise ValueError(why)
    for e in stacked:
        e.values = {k: jax.tree_util.tree_map((lambda a: a[0]) if k == "a" else (lambda a: jnp.sum(a, axis=0)), v)
                    for k, v in e.values.items()}
    return stacked


def _assemble(quantities, reports, n) -> dict:
    """{path: {quantity: value}} from the passes' entries."""
    out: dict = collections.OrderedDict()
    for e in reports["grad"]:
        out[e.label] = {}
        if "grad" in e.values:
            out[e.label].update(_first_order(quantities, e.values["grad"], n))
        elif "gsq" in e.values:
            gsq, mean = e.values["gsq"], e.values["mean"]
            out[e.label].update(batch_l2=e.values["l2"], sum_grad_squared=gsq,
                                variance=jax.tree_util.tree_map(lambda s, m: s / n - m * m, gsq, mean))
    for kind, diag, kron in (("exact", "diag_ggn", "kflr"), ("sampled", "diag_ggn_mc", "kfac")):
        for e in reports.get(kind, ()):
            q = out.setdefault(e.label, {})
            if diag in quantities:
                q[diag] = e.values["sq"]
            if kind == "exact" and "batch_diag_ggn" in quantities:
                q["batch_diag_ggn"] = e.values["sq_n"]
            if kron in quantities:
                q[kron] = _factors(e.values)
    return collections.OrderedDict((label, {k: v[k] for k in quantities if k in v}) for label, v in out.items())


def _first_order(quantities, g, n) -> dict:
    """The first-order quantities of one layer from its g_n (N, *θ) (module doc)."""
    mean = jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), g)
    sq = jax.tree_util.tree_map(lambda a: jnp.sum(a * a, axis=0), g)
    return {
        "batch_grad": g,
        "batch_l2": sum(jnp.sum(a.reshape(n, -1) ** 2, axis=1) for a in jax.tree_util.tree_leaves(g)),
        "sum_grad_squared": sq,
        "variance": jax.tree_util.tree_map(lambda s, m: s / n - m * m, sq, mean),
    }


def _factors(values) -> dict:
    """A layer's Kronecker factors per param, or its GGN diagonal (the norm layers)."""
    if "a" not in values:
        return values["sq"]
    return {k: Kronecker(a, values["g"]) for k, a in values["a"].items()}


