"""Check mode: the first layer whose forward or backward makes a NaN or an Inf, by name.

``check_finite(fn)`` runs ``fn`` with every bpjax layer and loss it calls instrumented: after
each layer's forward, its input ``x``, its params, its output ``y`` and its new state are
checked; after each backward, the incoming ``dy``, ``dparams`` and ``dx``; after a loss, its
value and ``dpred``. The checks are ``jax.experimental.checkify`` checks, so they work under
``jit``: the error is carried out of the compiled function as a value, and the first check
that failed, in program order, is raised on the host as ``FloatingPointError``::

    bpjax.check_finite: 1 NaN and 0 Inf in the forward of sequential[2] (log_softmax): output y

A layer inside a combinator is named by its path: ``sequential[2] (log_softmax)`` is the
third layer of the outer ``sequential``; ``sequential[1].residual[0] (dense)`` the layer inside
the ``residual`` that is the second layer. A combinator checks only its own output and ``dx``
(its layers check the rest), so the layer named is the innermost one where the value appeared.

Off by default, and free when off: the layers call their raw functions. On, each check is a
reduction over one array, and ``fn`` is traced afresh (the instrumented program differs).
"""
from __future__ import annotations

import functools
import re
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from .. import _core
from .._core import Layer, Loss
from .._grad import value_and_grad

__all__ = ["check_finite", "debug_nans"]


#: The head of the check of integer labels (a ValueError, not a FloatingPointError).
_LABELS = "bpjax.check_finite: labels out of range in the forward of "


class _Frame:
    """One call of a layer's forward: its path name, and the layers it called, in order."""

    def __init__(self, token, label, chain):
        self.token, self.label, self.chain = token, label, chain
        self.children: list = []
        self.used = False               # its backward has been matched to it


def _check(where: str, what: str, tree) -> None:
    """A checkify check per floating leaf of ``tree``: every entry finite."""
    for path, a in jax.tree_util.tree_leaves_with_path(tree):
        if not hasattr(a, "dtype") or not jnp.issubdtype(a.dtype, jnp.inexact):
            continue
        checkify.check(jnp.all(jnp.isfinite(a)),
                       f"bpjax.check_finite: {{nan}} NaN and {{inf}} Inf in {where}: "
                       f"{what}{jax.tree_util.keystr(path)}",
                       nan=jnp.sum(jnp.isnan(a)), inf=jnp.sum(jnp.isinf(a)))


class _FiniteChecks:
    """The hook ``make_layer`` and ``make_loss`` call while ``check_finite`` traces.

    The forward builds a tree of frames (one per layer call) to name each layer by its path;
    the backward finds each layer's frame among the children of its parent's frame: the latest
    one of that layer not yet matched (a ``sequential`` walks its layers in reverse).
    """

    def __init__(self):
        self.roots: list = []
        self.forward_stack: list = []
        self.backward_stack: list = []

    def layer_forward(self, name, token, forward, params, state, x, *, key, train):
        parent = self.forward_stack[-1] if self.forward_stack else None
        if parent is None:
            frame = _Frame(token, name, name)
            self.roots.append(frame)
        else:
            i = len(parent.children)
            frame = _Frame(token, f"{parent.chain}[{i}] ({name})", f"{parent.chain}[{i}].{name}")
            parent.children.append(frame)
        self.forward_stack.append(frame)
        try:
            y, new_state, res = forward(params, state, x, key=key, train=train)
        finally:
            self.forward_stack.pop()
        where = f"the forward of {frame.label}"
        if not frame.children:          # a layer of its own: what came in, then what it made
            _check(where, "input x", x)
            _check(where, "params", params)
        _check(where, "output y", y)
        _check(where, "new state", new_state)
        return y, new_state, res

    def layer_backward(self, name, token, backward, params, res, dy):
        parent = self.backward_stack[-1] if self.backward_stack else None
        pool = self.roots if parent is None else parent.children
        frame = next((f for f in reversed(pool) if f.token is token and not f.used), None)
        if frame is None:               # its forward ran outside check_finite
            frame = _Frame(token, name, name)
        frame.used = True
        self.backward_stack.append(frame)
        try:
            dparams, dx = backward(params, res, dy)
        finally:
            self.backward_stack.pop()
        where = f"the backward of {frame.label}"
        if not frame.children:
            _check(where, "incoming dy", dy)
            _check(where, "dparams", dparams)
        _check(where, "dx", dx)
        return dparams, dx

    def loss_forward(self, name, forward, pred, target):
        value, res = forward(pred, target)
        _check(f"the forward of {name}", "value", value)
        return value, res

    def labels(self, name, target, num_classes):
        """Integer labels, known only when the compiled function runs: each in [0, num_classes)."""
        if not target.size:
            return
        checkify.check(jnp.all((target >= 0) & (target < num_classes)),
                       f"{_LABELS}{name}: expected labels in [0, {num_classes}), "
                       f"got labels in [{{lo}}, {{hi}}]", lo=jnp.min(target), hi=jnp.max(target))

    def loss_backward(self, name, backward, res, dvalue):
        dpred = backward(res, dvalue)
        _check(f"the backward of {name}", "dpred", dpred)
        return dpred


def check_finite(fn: Callable, *, jit: bool = True) -> Callable:
    """``fn`` with every bpjax layer and loss it calls checked for NaN and Inf.

    Args:
      fn: any function of pytrees of arrays that calls bpjax layers or losses (a training
        step, ``bp.value_and_grad(model, loss)``, a bare ``model.forward``).
      jit: compile the checked function with ``jax.jit`` (default); ``False`` runs it eagerly.

    Returns:
      A function with ``fn``'s arguments and results that raises ``FloatingPointError`` naming
      the first layer, forward or backward, where a non-finite value appeared, and the array
      (``input x``, ``params['w']``, ``output y``, ``dx``, ...) it appeared in; or
      ``ValueError`` for integer labels out of range in ``softmax_cross_entropy`` (which make a
      NaN or a silently wrong loss), checked first::

          bpjax.check_finite: labels out of range in the forward of softmax_cross_entropy: expected labels in [0, 10), got labels in [0, 10]
    """

    def instrumented(*args, **kwargs):
        hook = _FiniteChecks()
        _core._HOOKS.append(hook)
        try:
            return fn(*args, **kwargs)
        finally:
            _core._HOOKS.remove(hook)

    checked = checkify.checkify(instrumented)
    if jit:
        checked = jax.jit(checked)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        err, out = checked(*args, **kwargs)
        msg = err.get()
        if msg is not None:
            msg = re.sub(r"\s*\((`check` failed|check failed at .*)\)\s*$", "", msg, flags=re.S)
            raise (ValueError if msg.startswith(_LABELS) else FloatingPointError)(msg)
        return out

    return run


def debug_nans(model: Layer, loss: Loss, *, jit: bool = True) -> Callable:
    """``bp.value_and_grad(model, loss)`` under :func:`check_finite`: the same
    ``f(params, state, x, target, *, key=None) -> ((value, new_state), grads)``, which raises
    ``FloatingPointError`` naming the first layer whose forward or backward made a NaN or Inf."""
    _core.check_model_and_loss("debug_nans", model, loss)
    return check_finite(value_and_grad(model, loss), jit=jit)
