"""K-FAC (Martens & Grosse 2015) as an optax transformation fed with bpjax's Kronecker factors.

Each training step computes, besides the gradient, the factors ``kronecker`` defines (the
``kfac`` quantity of :func:`bpjax.backward_quantities`: ``a`` from the layer's inputs, ``g``
from one sampled cotangent per example, expand variant) and hands them to the update::

    Ā, Ḡ ← ρ·Ā + (1 − ρ)·A,  ρ·Ḡ + (1 − ρ)·G        ρ = min(ema, t/(t+1)), t the step (0 first):
                                                    the first step takes A itself, then a plain
                                                    mean until the weight reaches ``ema``
    every ``inverse_every`` steps (t = 0, K, 2K, …), from the averages, by eigendecomposition:
        damping="pi" (default)  Ā⁻¹ = (Ā + π√λ I)⁻¹,  Ḡ⁻¹ = (Ḡ + √λ/π I)⁻¹,
                                π = √((tr Ā / dim Ā) / (tr Ḡ / dim Ḡ))   (factored Tikhonov, M&G §6.3)
        damping="plain"         Ā⁻¹ = (Ā + λ I)⁻¹,      Ḡ⁻¹ = (Ḡ + λ I)⁻¹
    d  = dW + wd·W                      coupled L2 (``weight_decay``), before preconditioning
    u  = Ā⁻¹ d Ḡ⁻¹                      dW as (∏ W.shape[:-1], W.shape[-1]); a bias has a = [[1]]
    ν  = min(1, √(c / (η² Σ ⟨u, d⟩)))   the norm constraint (kfac-jax's, Ba et al. 2017): a trust
                                        region on the quadratic model's change η² uᵀF u ≈ η² ⟨u, d⟩
    v  ← μ·v + ν·u,   Δθ = −η·v         fixed learning rate η (or an optax schedule) and momentum μ

This is the "simpler stated rule" (fixed η and μ with the norm constraint), not Martens &
Grosse's adaptive η, μ from the quadratic model (which needs a GGN-vector product per step).

Params without factors fall back to SGD with momentum: ``v ← μ·v + d``, ``Δθ = −η_sgd·v``
(``sgd_learning_rate``, default η), outside the norm constraint. They are the params of layers
the curvature code refuses (recurrent, attention, a conv with a fused activation or groups > 1)
and of the norm layers (batch_norm in training mixes examples and has no per-example diagonal;
their diagonal GGN is not used here), and params no layer reports.

Mapping factors to params. The factors are computed per layer (path names
``sequential[3] (dense)``); the update needs them per leaf of the params pytree. While the step
is traced, a leaf layer outside any scan sees the very arrays (tracers) of the params tree the
step was called with, so each of its params is found by identity (``id``) among
``tree_leaves(params)``: no walk of the combinators, and a user's own layer works the same way.
A layer whose params are not found (inside a ``lax.scan``: the GPT's blocks see slices), a layer
with params of its own beside its layers' (the GPT's tied table), and params used by two layers
(tied weights) are refused by name (``ValueError``).

Why a NamedTuple ``KFAC(init, update, factors)`` and not a bare optax transformation: its
``init``/``update`` are optax's (``update(grads, state, params, *, factors)``, the extra
keyword of ``optax.GradientTransformationExtraArgs``), and ``factors`` is the step function that
computes the factors, so that a training loop finds both in one object (``bpjax.train.fit``
does). Only the factor computation traces the model; ``update`` is plain array algebra.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from .. import _core
from .._observe import Client, View, _Observer, param_size
from .kronecker import Kronecker, error_factors, input_factors, kronecker_rule
from .loss_hessian import check_loss_known, sampled_columns
from .quantities import SAMPLE_STREAM

__all__ = ["KFAC", "KfacState", "kfac", "kfac_factors"]

_WHERE = "kfac"


class _Layout(Client):
    """Finds each leaf layer's params among the step's params leaves (by identity) and, in the
    sampled pass, records the Kronecker factors of the layers that have them."""

    def __init__(self, index: dict, n: int, variant: str):
        self.index, self.n, self.variant = index, n, variant
        self.collect = False            # False: the gradient's pass (map); True: the sampled pass
        self.layout: dict = {}          # leaf number -> (path, param name, rule or None, why none)
        self.found: dict = {}           # leaf number -> (a, g) of the pass being traced

    def measure(self, v: View) -> dict:
        if not jax.tree_util.tree_leaves(v.params):
            return {}
        if not v.leaf:
            if v.per_example != "combinator" and param_size(v.params) != sum(e.size for e in v.subs):
                raise ValueError(f"{_WHERE}: {v.label}: has params of its own beside its layers' (a tied or "
                                 "added table): K-FAC cannot give them Kronecker factors")
            return {}
        named = {jax.tree_util.keystr(k): a for k, a in jax.tree_util.tree_flatten_with_path(v.params)[0]}
        where = {k: self.index.get(id(a)) for k, a in named.items()}
        if None in where.values():
            raise ValueError(f"{_WHERE}: {v.label}: its params are not leaves of the params the step was given "
                             "(a layer inside a scan, as the GPT's blocks, sees slices of them): K-FAC cannot "
                             "map its factors to the params")
        if not self.collect:
            self._map(v, where)
            return {}
        rule = self.layout[next(iter(where.values()))][2]
        if rule is not None:
            a = input_factors(v, rule, self.n, self.variant)
            g = error_factors(v, rule, self.n, self.variant)
            for k, factor in a.items():
                self.found[where[f"['{k}']"]] = (factor, g)
        return {}

    def _map(self, v: View, where: dict) -> None:
        try:
            rule, why = kronecker_rule(v, self.variant), None
        except ValueError as e:
            rule, why = None, str(e)
        if rule == "diagonal":
            rule, why = None, f"{_WHERE}: {v.label}: a norm layer: SGD with momentum on its params"
        for k, i in where.items():
            if i in self.layout:
                raise ValueError(f"{_WHERE}: {v.label}: its param {k} is also used by {self.layout[i][0]} "
                                 "(tied weights): K-FAC cannot give it one pair of factors")
            self.layout[i] = (v.label, k, rule, why)


def kfac_factors(model, loss, *, train: bool = True):
    """The step's forward and backwards for :func:`kfac`.

    Returns ``f(params, state, x, target, *, key) -> (value, new_state, y, grads, factors)``:
    ``value, new_state, y, grads`` as :func:`bpjax._grad.forward_backward`, and ``factors`` a
    tuple with one entry per leaf of ``tree_leaves(params)``: its :class:`Kronecker` (a, g) (the
    ``kfac`` quantity, one sampled cotangent per example drawn with ``fold_in(key, SAMPLE_STREAM)``,
    expand variant), or ``None`` for a param that falls back to SGD (module doc). After a trace,
    ``f.layout`` holds ``{leaf number: (layer path, param name, rule or None, why none)}``.
    Raises ``ValueError`` naming a layer it cannot map (module doc). Jittable.
    """
    _core.check_model_and_loss(_WHERE, model, loss)
    check_loss_known(_WHERE, loss)

    def f(params, state, x, target, *, key):
        leaves = jax.tree_util.tree_leaves(params)
        n = jax.tree_util.tree_leaves(x)[0].shape[0]
        client = _Layout({id(a): i for i, a in enumerate(leaves)}, n, "expand")
        hook = _Observer(client)
        _core._HOOKS.append(hook)
        try:
            y, new_state, res = model.forward(params, state, x, key=key, train=train)   # forward
            value, loss_res = loss.forward(y, target)
            dy = loss.backward(loss_res)                                              # (N, ...) ∂L/∂y
            grads, _ = model.backward(params, res, dy)                                # the gradient; maps
            client.collect = True
            cols = sampled_columns(loss, y, loss_res, jax.random.fold_in(key, SAMPLE_STREAM), 1)   # (1, N, ...)

            def one(d):                                                               # one cotangent
                hook.rewind()
                client.found = {}
                model.backward(params, res, d)
                return dict(client.found)

            found = jax.vmap(one)(cols)
        finally:
            _core._HOOKS.remove(hook)
        f.layout = dict(sorted(client.layout.items()))
        factors = tuple(Kronecker(found[i][0][0], jnp.sum(found[i][1], axis=0)) if i in found else None
                        for i in range(len(leaves)))
        return value, new_state, y, _core.cast_like(grads, params), factors

    f.layout = {}
    return f


class KfacState(NamedTuple):
    """``count``: steps taken; per factored leaf, in leaf order: the running averages ``a``,
    ``g`` and the damped inverses ``a_inv``, ``g_inv`` (1-D for a diagonal a); ``velocity``: a
    tree like params."""

    count: jax.Array
    a: tuple
    g: tuple
    a_inv: tuple
    g_inv: tuple
    velocity: Any


class KFAC(NamedTuple):
    """``init(params) -> KfacState``; ``update(grads, state, params, *, factors) -> (updates,
    state)`` (optax's, with the factors of :func:`kfac_factors` as the extra keyword);
    ``factors``: that step function."""

    init: Callable
    update: Callable
    factors: Callable


def _inverse(m, d):
    """(m + d I)⁻¹ of a symmetric PSD ``m`` by its eigendecomposition (eigenvalues below 0,
    rounding, clipped to 0); a 1-D ``m`` is a diagonal: 1/(m + d)."""
    if m.ndim == 1:
        return 1.0 / (jnp.maximum(m, 0) + d)
    e, q = jnp.linalg.eigh(m)
    return (q / (jnp.maximum(e, 0) + d)) @ q.T


def _mean_eig(m):
    """tr m / dim m."""
    return jnp.mean(m) if m.ndim == 1 else jnp.trace(m) / m.shape[0]


def damped_inverses(a, g, damping: float, mode: str = "pi"):
    """The pair (Ā⁻¹, Ḡ⁻¹) of the module doc for ``mode`` "pi" or "plain"."""
    if mode == "plain":
        return _inverse(a, damping), _inverse(g, damping)
    pi = jnp.sqrt(jnp.maximum(_mean_eig(a), 1e-30) / jnp.maximum(_mean_eig(g), 1e-30))
    root = math.sqrt(damping)
    return _inverse(a, pi * root), _inverse(g, root / pi)


def precondition(d, a_inv, g_inv):
    """u = Ā⁻¹ d Ḡ⁻¹ for d of the param's shape (flattened to (∏ shape[:-1], shape[-1]))."""
    d2 = d.reshape(-1, d.shape[-1]) if d.ndim else d.reshape(1, 1)
    left = a_inv[:, None] * d2 if a_inv.ndim == 1 else a_inv @ d2
    return (left @ g_inv).reshape(d.shape)


def kfac(learning_rate: Union[float, Callable], *, model, loss, example, damping: float = 1e-2,
         damping_mode: str = "pi", momentum: float = 0.9, ema: float = 0.95, inverse_every: int = 10,
         norm_constraint: Optional[float] = 1e-2, weight_decay: float = 0.0,
         sgd_learning_rate: Optional[Union[float, Callable]] = None, train: bool = True) -> KFAC:
    """K-FAC with fixed learning rate and momentum and a norm constraint (the module doc has
    every equation).

    Args:
      learning_rate: η, a float or an optax schedule (a function of the step count).
      model, loss: the network and its loss (one whose output Hessian is known: the softmax
        cross-entropy, the squared errors, ...).
      example: ``(x, target)``, a few rows of the training data: ``init`` traces the factor step
        on them (shapes only) to know which params have factors and their sizes.
      damping: λ; ``damping_mode``: "pi" (π-corrected factored Tikhonov, default) or "plain"
        (λ added to each factor).
      momentum: μ; ``ema``: the running average's weight; ``inverse_every``: K, the steps between
        two recomputations of the inverses (the first step computes them).
      norm_constraint: c, or None for no clipping; ``weight_decay``: coupled L2 on every param.
      sgd_learning_rate: η_sgd of the params without factors (default η).
      train: the forward's mode.

    Returns a :class:`KFAC`. Raises ``ValueError`` naming a layer the factors cannot be mapped
    for (a layer inside a scan, the GPT), from ``init``.
    """
    if damping_mode not in ("pi", "plain"):
        raise ValueError(f"{_WHERE}: expected damping_mode 'pi' or 'plain', got {damping_mode!r}")
    if not damping > 0:
        raise ValueError(f"{_WHERE}: expected damping > 0, got {damping!r}")
    inverse_every = int(inverse_every)
    if inverse_every < 1:
        raise ValueError(f"{_WHERE}: expected inverse_every >= 1, got {inverse_every}")
    factors_fn = kfac_factors(model, loss, train=train)
    x_ex, t_ex = example
    lr = learning_rate if callable(learning_rate) else (lambda count: learning_rate)
    sgd = sgd_learning_rate if sgd_learning_rate is not None else learning_rate
    sgd_lr = sgd if callable(sgd) else (lambda count: sgd)

    def shapes(params):
        in_shape = tuple(jnp.shape(x_ex)[1:])

        def trace(p):
            _, s, _ = model.init(jax.random.PRNGKey(0), in_shape)
            return factors_fn(p, s, x_ex, t_ex, key=jax.random.PRNGKey(0))[-1]

        return jax.eval_shape(trace, params)

    def init(params):
        like = shapes(params)
        fac = [k for k in like if k is not None]
        zeros = lambda s: jnp.zeros(s.shape, s.dtype)                                 # noqa: E731
        return KfacState(count=jnp.zeros((), jnp.int32),
                         a=tuple(zeros(k.a) for k in fac), g=tuple(zeros(k.g) for k in fac),
                         a_inv=tuple(zeros(k.a) for k in fac), g_inv=tuple(zeros(k.g) for k in fac),
                         velocity=jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(grads, state, params=None, *, factors):
        g_leaves, treedef = jax.tree_util.tree_flatten(grads)
        if len(factors) != len(g_leaves):
            raise ValueError(f"{_WHERE}: expected factors with one entry per params leaf ({len(g_leaves)}), "
                             f"got {len(factors)}")
        if weight_decay:
            if params is None:
                raise ValueError(f"{_WHERE}: weight_decay needs update(..., params)")
            g_leaves = [d + weight_decay * p for d, p in zip(g_leaves, jax.tree_util.tree_leaves(params))]
        t = state.count
        rho = jnp.minimum(ema, t / (t + 1.0))
        fac = [i for i, k in enumerate(factors) if k is not None]
        a = tuple(rho * old + (1 - rho) * factors[i].a for old, i in zip(state.a, fac))
        g = tuple(rho * old + (1 - rho) * factors[i].g for old, i in zip(state.g, fac))

        def fresh(_):
            pairs = [damped_inverses(ai, gi, damping, damping_mode) for ai, gi in zip(a, g)]
            return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)

        a_inv, g_inv = jax.lax.cond(t % inverse_every == 0, fresh, lambda _: (state.a_inv, state.g_inv), None)
        u = list(g_leaves)
        for j, i in enumerate(fac):
            u[i] = precondition(g_leaves[i], a_inv[j], g_inv[j])
        eta = lr(t)
        nu = jnp.ones((), jnp.float32)
        if norm_constraint is not None and fac:
            quad = sum(jnp.vdot(u[i], g_leaves[i]) for i in fac)
            nu = jnp.minimum(1.0, jnp.sqrt(norm_constraint / jnp.maximum(eta ** 2 * quad, 1e-30)))
        is_fac = set(fac)
        v_leaves = jax.tree_util.tree_leaves(state.velocity)
        v_new = [momentum * v + (nu * ui if i in is_fac else ui) for i, (v, ui) in enumerate(zip(v_leaves, u))]
        eta_sgd = sgd_lr(t)
        updates = [(-(eta if i in is_fac else eta_sgd) * v).astype(d.dtype)
                   for i, (v, d) in enumerate(zip(v_new, jax.tree_util.tree_leaves(grads)))]
        state = KfacState(t + 1, a, g, a_inv, g_inv, jax.tree_util.tree_unflatten(treedef, v_new))
        return jax.tree_util.tree_unflatten(treedef, updates), state

    return KFAC(init, update, factors_fn)
