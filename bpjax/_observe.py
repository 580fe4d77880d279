"""Observing the backward pass, layer by layer: what every layer's backward saw and made.

A hand-written backward holds, at every layer, the error ``dy`` arriving from above, the
residuals of its forward (which hold the input ``x`` or what the layer derived from it), the
``dparams`` it makes and the ``dx`` it sends on. :func:`observe` runs a function with every
bpjax layer it calls instrumented, and hands each layer's backward, as it finishes, to a
*client* that turns those arrays into a few numbers (norms, per-example squared norms). No
layer's math changes: the layers run their own ``forward`` and ``backward``; the hook sits in
:func:`bpjax.make_layer`, so a user's own layer takes part like a built-in one.

Each observation is an :class:`Entry`: the layer's path name (``sequential[3] (dense)``: the
fourth layer of the outer ``sequential``; ``sequential[1].residual[0] (dense)`` the layer
inside the ``residual`` that is the second layer), the values the client measured, and the
entries of the layers it called (its sub-layers), so a combinator's entry holds its layers'.

Control flow. A layer whose backward runs inside a ``lax.scan`` (the GPT's blocks) is traced in
the scan's body; what it measured cannot leave the body as a Python value. Such a layer hands
its entry back *through the data*: it returns its ``dparams`` wrapped with the entry
(:class:`_Carried`), the scan stacks both, and the layer that ran the scan unwraps them before
its ``dparams`` are checked, with one entry per step, named ``gpt[1]{0}``, ``gpt[1]{1}``, ….

Residuals. A client that needs a leaf layer's input (to recompute one example's gradient) asks
for a :class:`_Tape`: the residuals, the input x, the state, the key and the layer's raw forward
travel together from forward to backward, through any scan, and are unwrapped before the
layer's own backward sees its residuals.

Works under ``jit`` (everything is traced; nothing runs on the host) and with sharded batches
(the measured arrays are ordinary values XLA partitions like the rest).
"""
from __future__ import annotations

import collections
import contextlib
from typing import Any, Callable, Optional

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from . import _core
from ._grad import value_and_grad

__all__ = ["observe", "Entry", "sq_norm", "flatten_entries"]


def sq_norm(tree) -> jax.Array:
    """Σ a² over every floating leaf of ``tree`` (None and integer leaves count 0), in float32
    or wider (float64 stays float64)."""
    total = jnp.zeros((), jnp.float32)
    for a in jax.tree_util.tree_leaves(tree):
        if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.inexact):
            acc = _core.accumulation_dtype(a.dtype)
            total = total + jnp.sum(jnp.square(a.astype(acc)))
    return total


def param_size(tree) -> int:
    """The number of floating parameters in ``tree`` (a Python int: shapes only)."""
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree)
               if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.inexact))


# ----------------------------------------------------------------------------- pytrees that travel


class Entry:
    """One layer's observation: ``label``, ``values`` (a dict of arrays the client measured),
    ``subs`` (the entries of the layers it called, in backward order), ``leaf`` (it called no
    layer) and ``size`` (its number of parameters). A pytree: arrays are its leaves."""

    def __init__(self, label: str, values: dict, subs: tuple, leaf: bool, size: int, order: tuple = (),
                 slot: Optional[int] = None, step: bool = False):
        self.label, self.values, self.subs, self.leaf, self.size = label, values, subs, leaf, size
        self.order = order              # when its forward ran: entries sort into forward order
        self.slot = slot                # its residuals' _Slot number, or None
        self.step = step                # one step of a scan, its values sliced from the stacked ones

    def relabel(self, old: str, new: str, before: tuple) -> "Entry":
        """This entry and its subs with the path prefix ``old`` replaced by ``new``, and
        ``before`` put in front of their orders (one step of a scan: its entries sort together)."""
        label = new + self.label[len(old):] if self.label.startswith(old) else self.label
        return Entry(label, self.values, tuple(s.relabel(old, new, before) for s in self.subs), self.leaf,
                     self.size, before + self.order, self.slot, True)

    def __repr__(self):
        return f"Entry({self.label!r}, {sorted(self.values)}, {len(self.subs)} subs)"


jax.tree_util.register_pytree_node(
    Entry, lambda e: ((e.values, e.subs), (e.label, e.leaf, e.size, e.order, e.slot, e.step)),
    lambda aux, ch: Entry(aux[0], ch[0], ch[1], *aux[1:]))


class _Slot:
    """A leaf layer's residuals with the number of its forward call, ``sid`` (static: one
    number for every step of a scan), and ``record``: what an earlier backward over the same
    residuals recorded for that layer (clipped_grad's second pass, :func:`with_records`),
    stacked as the residuals are, or None."""

    def __init__(self, res, sid, record=None):
        self.res, self.sid, self.record = res, sid, record


jax.tree_util.register_pytree_node(
    _Slot, lambda s: ((s.res, s.record), s.sid), lambda sid, ch: _Slot(ch[0], sid, ch[1]))


def _is_slot(a) -> bool:
    return isinstance(a, _Slot)


class _Carried:
    """A layer's ``dparams`` carrying its ``entry`` out of a scan body (see the module doc);
    ``marker`` is a scalar whose shape, after the scan stacked it, is the shape of the steps."""

    def __init__(self, dparams, entry, marker, prefix):
        self.dparams, self.entry, self.marker, self.prefix = dparams, entry, marker, prefix


jax.tree_util.register_pytree_node(
    _Carried, lambda c: ((c.dparams, c.entry, c.marker), c.prefix),
    lambda prefix, ch: _Carried(ch[0], ch[1], ch[2], prefix))


class _Tape:
    """A leaf layer's residuals with its input, state and key, and (static) its raw forward and
    ``train``: what a client needs to recompute one example's gradient in the backward."""

    def __init__(self, res, x, state, key, forward, train):
        self.res, self.x, self.state, self.key, self.forward, self.train = res, x, state, key, forward, train


jax.tree_util.register_pytree_node(
    _Tape, lambda t: ((t.res, t.x, t.state, t.key), (t.forward, t.train)),
    lambda aux, ch: _Tape(*ch, *aux))


def _is_carried(a) -> bool:
    return isinstance(a, _Carried)


# ----------------------------------------------------------------------------- the hook


class View:
    """What a client sees of one layer's backward (the arguments of ``Client.measure``).

    ``name``: the factory's name (``dense``); ``per_example``, ``curvature``: the rules its
    factory named (``make_layer(..., per_example=..., curvature=...)``), or None; ``example_rows``:
    the function of the ``"columns"`` and ``"projections"`` rules, or None; ``label``: the path name;
    ``params``, ``res`` (the layer's own residuals), ``dy``, ``dparams``, ``dx``; ``tape``: the
    :class:`_Tape` or None; ``subs``: the entries of its sub-layers; ``backward``: its raw
    backward.
    """

    def __init__(self, **kw):
        self.__dict__.update(kw)

    @property
    def leaf(self) -> bool:
        return not self.called


#: The key under which ``Client.measure`` may return the layer's gradient in place of its own.
REPLACE_DPARAMS = "replace dparams"


class Client:
    """What to record. ``slots``: whether leaf layers with params get their residuals marked
    (:class:`_Slot`) and their dy, dx recorded, for a second backward over the same residuals
    (clipped_grad's).  ``tape(name, per_example, params, leaf)`` says, after a layer's forward,
    whether its backward will need x (a :class:`_Tape`); ``measure(view)`` returns the dict of
    arrays to record for that layer (it may raise, naming ``view.label``). A value under
    :data:`REPLACE_DPARAMS` is the layer's gradient computed another way, equal up to rounding (the sum of the
    per-example gradients a client built anyway): it replaces the layer's own, which XLA then
    drops, and is not recorded."""

    slots = False

    def tape(self, name: str, per_example: Optional[str], params, leaf: bool) -> bool:
        return False

    def measure(self, view: View) -> dict:
        return {}


class _Frame:
    """One call of a layer's forward: its path name, and the layers it called, in order."""

    def __init__(self, token, label, chain, order=()):
        self.token, self.label, self.chain, self.order = token, label, chain, order
        self.children: list = []
        self.used = False


class _Scope:
    """One running backward: its frame, the trace it runs in, and the entries of its sub-layers."""

    def __init__(self, frame, trace):
        self.frame, self.trace, self.entries = frame, trace, []


def _trace_state():
    return jax.extend.core.get_opaque_trace_state()


class _Observer:
    """The hook that :func:`bpjax.make_layer` calls while :func:`observe` runs."""

    def __init__(self, client: Client):
        self.client = client
        self.roots: list = []           # forward frames of the outermost layers
        self.forward_stack: list = []
        self.scopes: list = []          # running backwards
        self.entries: list = []         # entries of the outermost layers, in backward order
        self.calls = 0                  # forward calls so far (the order of the entries)
        self.log: list = []             # every backward, in the order they began: token, leaf, dy, dx
        self.carried = False            # an entry left a scan's body through the data
        self.stacked: list = []         # the entries that did, as they left it (values stacked by step)
        self.nested = False             # one left a scan's body inside another scan's body
        self.top = None                 # the trace of the outermost backward

    # -- forward: name every call by its path; tape a leaf's input when the client asks
    def layer_forward(self, name, token, forward, params, state, x, *, key, train):
        parent = self.forward_stack[-1] if self.forward_stack else None
        self.calls += 1
        if parent is None:
            frame = _Frame(token, name, name, (self.calls,))
            self.roots.append(frame)
        else:
            i = len(parent.children)
            frame = _Frame(token, f"{parent.chain}[{i}] ({name})", f"{parent.chain}[{i}].{name}", (self.calls,))
            parent.children.append(frame)
        self.forward_stack.append(frame)
        try:
            y, new_state, res = forward(params, state, x, key=key, train=train)
        finally:
            self.forward_stack.pop()
        if self.client.tape(name, token.per_example, params, leaf=not frame.children):
            res = _Tape(res, x, state, key, forward, train)
        if self.client.slots and not frame.children and jax.tree_util.tree_leaves(params):
            res = _Slot(res, frame.order[0])
        return y, new_state, res

    def _frame(self, name, token):
        parent = self.scopes[-1].frame if self.scopes else None
        pool = self.roots if parent is None else parent.children
        frame = next((f for f in reversed(pool) if f.token is token and not f.used), None)
        if frame is None:               # its forward ran outside observe (or under another token)
            frame = _Frame(token, name if parent is None else f"{parent.chain}[?] ({name})",
                           name if parent is None else f"{parent.chain}[?].{name}")
        frame.used = True
        return frame

    # -- backward: run it, unwrap what sub-layers carried out of scans, measure, hand the entry up
    def layer_backward_checked(self, name, token, backward, finish, params, res, dy):
        frame = self._frame(name, token)
        if self.top is None:
            self.top = _trace_state()
        slot = res.sid if isinstance(res, _Slot) else None
        res = res.res if isinstance(res, _Slot) else res
        tape = res if isinstance(res, _Tape) else None
        res = tape.res if tape is not None else res
        scope = _Scope(frame, _trace_state())
        record = {"token": token, "dy": dy}
        self.log.append(record)
        self.scopes.append(scope)
        try:
            out = backward(params, res, dy)
        finally:
            self.scopes.pop()
        if isinstance(out, tuple) and len(out) == 2:
            out = (self._unwrap(out[0], scope), out[1])
        dparams, dx = finish(params, out)
        view = View(name=name, per_example=token.per_example, curvature=token.curvature,
                    example_rows=token.example_rows, label=frame.label,
                    params=params, res=res, dy=dy, dparams=dparams, dx=dx, tape=tape,
                    subs=tuple(scope.entries), backward=backward, called=bool(frame.children or scope.entries))
        record.update(leaf=view.leaf, dx=dx)
        values = self.client.measure(view)
        if REPLACE_DPARAMS in values:   # the same gradient, computed by the client (see Client)
            values = dict(values)
            dparams = _core.cast_like(values.pop(REPLACE_DPARAMS), params)
        if slot is not None:            # what clipped_grad's second pass needs of this layer
            values = {**values, "_dx": dx, **({} if "_examples" in values else {"_dy": dy})}
        entry = Entry(frame.label, values, tuple(scope.entries), view.leaf, param_size(params), frame.order,
                      slot)
        parent = self.scopes[-1] if self.scopes else None
        if parent is None:
            self.entries.append(entry)
        elif parent.trace == scope.trace:
            parent.entries.append(entry)
        else:                           # in a scan's (or vmap's) body: out through the data
            prefix = frame.chain[:-len(name) - 1] if frame.chain != name else name    # gpt[1]
            dparams = _Carried(dparams, entry, jnp.zeros((), jnp.int8), prefix)
            self.carried = True
        return dparams, dx

    def _unwrap(self, dparams, scope):
        """``dparams`` with every :class:`_Carried` replaced by its dparams; their entries, one
        per step of the scan that stacked them, join ``scope``'s."""
        found = []

        def strip(a):
            if isinstance(a, _Carried):
                found.append(a)
                return a.dparams
            return a

        dparams = jax.tree_util.tree_map(strip, dparams, is_leaf=_is_carried)
        if found and scope.trace != self.top:
            self.nested = True          # a scan inside a scan: its steps' records are not kept stacked
        self.stacked.extend(c.entry for c in found)
        for c in found:
            steps = c.marker.shape
            for idx in np.ndindex(*steps):
                entry = jax.tree_util.tree_map(lambda a, idx=idx: a[idx], c.entry)
                tag = "".join(f"{{{i}}}" for i in idx)
                scope.entries.append(entry.relabel(c.prefix, c.prefix + tag, entry.order + idx))
        return dparams

    def loss_forward(self, name, forward, pred, target):
        return forward(pred, target)

    def loss_backward(self, name, backward, res, dvalue):
        return backward(res, dvalue)

    def rewind(self) -> None:
        """Forget the backward seen so far (which frames it used, its entries), keeping the
        forward's frames: the next backward over the same forward is observed anew, with the
        same path names (``bpjax.backward_quantities`` runs several over one forward)."""

        def reset(frame):
            frame.used = False
            for child in frame.children:
                reset(child)

        for root in self.roots:
            reset(root)
        self.entries = []


def slot_records(hook) -> Optional[dict]:
    """{sid: what the backward observed by ``hook`` recorded for the leaf layer of that
    :class:`_Slot` ("_dx", and "_examples" or "_dy")}, stacked by step for a layer in a scan
    (as the scan stacked them); None when a scan ran inside another scan's body."""
    if hook.nested:
        return None
    out: dict = {}

    def walk(e, stacked):
        if e.slot is not None and "_dx" in e.values and (stacked or not e.step):
            out[e.slot] = {k: v for k, v in e.values.items() if k in ("_dx", "_dy", "_examples")}
        for sub in e.subs:
            walk(sub, stacked)

    for e in hook.entries:
        walk(e, False)
    for e in hook.stacked:
        walk(e, True)
    return out


def with_records(res, records: dict):
    """The residuals ``res`` with each :class:`_Slot` given its record; KeyError for a slot
    whose layer's backward did not run."""
    return jax.tree_util.tree_map(lambda a: _Slot(a.res, a.sid, records[a.sid]) if _is_slot(a) else a,
                                  res, is_leaf=_is_slot)


def unslot(res):
    """A layer's residuals without the :class:`_Slot` and :class:`_Tape` wrappers."""
    res = res.res if isinstance(res, _Slot) else res
    return res.res if isinstance(res, _Tape) else res


@contextlib.contextmanager
def paused():
    """No hook inside (the layers run their raw functions): for a client that reruns a layer."""
    saved = list(_core._HOOKS)
    _core._HOOKS.clear()
    try:
        yield
    finally:
        _core._HOOKS[:] = saved


def observe(fn: Callable, client: Client) -> Callable:
    """``fn`` with every bpjax layer it calls observed by ``client``.

    Returns ``g(*args, **kwargs) -> (fn's result, entries)``, where ``entries`` is the list of
    :class:`Entry` of the outermost layers whose backward ran (usually one: the model). Call it
    inside ``jit`` or not: it only adds traced operations."""

    def g(*args, **kwargs):
        out, hook = run_observed(fn, client, *args, **kwargs)
        return out, hook.entries

    return g


def run_observed(fn: Callable, client: Client, *args, **kwargs):
    """``fn(*args, **kwargs)`` observed by ``client``: ``(its result, the hook)`` (the hook's
    ``entries``, and its ``log`` of every backward: token, leaf, dy, dx)."""
    hook = _Observer(client)
    _core._HOOKS.append(hook)
    try:
        out = fn(*args, **kwargs)
    finally:
        _core._HOOKS.remove(hook)
    return out, hook


def flatten_entries(entries, *, leaves_only: bool = True) -> list:
    """The entries of a tree (only its leaf layers', by default), in the order their forwards
    ran (the steps of a scan in step order)."""
    out = []

    def walk(e):
        if e.leaf or not leaves_only:
            out.append(e)
        for s in e.subs:
            walk(s)

    for e in entries:
        walk(e)
    return sorted(out, key=lambda e: e.order)       # stable: a scan's steps keep their order


# ----------------------------------------------------------------------------- gradient flow


def _norm(tree) -> jax.Array:
    return jnp.sqrt(sq_norm(tree))


class _Flow(Client):
    """Per leaf layer: ‖dy‖ arriving, ‖dx‖ leaving, ‖dparams‖, ‖params‖ (L2 over every leaf)."""

    def measure(self, v: View) -> dict:
        if not v.leaf:
            return {}
        out = {"dy": _norm(v.dy), "dparams": _norm(v.dparams), "params": _norm(v.params)}
        if any(a is not None for a in jax.tree_util.tree_leaves(v.dx)):
            out["dx"] = _norm(v.dx)
        return out


def gradient_flow(model, loss, *, compute_dtype: Optional[Any] = None):
    """The error travelling back through ``model``, layer by layer, with the gradients.

    Returns ``f(params, state, x, target, *, key=None) -> ((value, new_state), grads, flow)``:
    ``(value, new_state), grads`` are exactly ``bp.value_and_grad``'s, and ``flow`` is a
    dict, one entry per leaf layer in forward order, keyed by the layer's path name
    (``sequential[3] (dense)``), each a dict of scalars::

        "dy":      ‖dy‖     the error arriving at the layer's output    (from the loss side)
        "dx":      ‖dx‖     the error it sends on to its input          (absent when x is ids)
        "dparams": ‖dθ‖     its share of the gradient
        "params":  ‖θ‖      its parameters

    (‖·‖ is the L2 norm over every entry of every array.) For a layer used once, ``dparams`` is
    exactly its part of ``grads``; a layer inside a scan (the GPT's blocks) has one entry per
    step, ``gpt[1]{0}.transformer_block[3] (dense)``. Jittable; the steps are those of
    ``bp.value_and_grad``, observed with :func:`observe`.
    """
    _core.check_model_and_loss("gradient_flow", model, loss)
    run = observe(value_and_grad(model, loss, compute_dtype=compute_dtype), _Flow())

    def f(params, state, x, target, *, key=None):
        ((value, new_state), grads), entries = run(params, state, x, target, key=key)
        flow = collections.OrderedDict((e.label, e.values) for e in flatten_entries(entries))
        return (value, new_state), grads, flow

    return f


# ----------------------------------------------------------------------------- bpjax train --grad-flow


class _FlowAndParams(_Flow):
    """:class:`_Flow` plus each leaf layer's params themselves (for the update-to-weight ratio)."""

    def measure(self, v: View) -> dict:
        out = super().measure(v)
        if out and jax.tree_util.tree_leaves(v.params):
            out["_params"] = v.params
        return out


class FlowRecorder:
    """The ``epoch_hook`` of :func:`bpjax.train.fit` behind ``bpjax train --grad-flow``.

    ``recorder(epoch, params, state)`` runs :func:`gradient_flow` on a fixed probe batch (the
    first ``batch_size`` training examples) and returns the metrics of that epoch, per leaf
    layer with params, flat (``grad_flow/<layer>/<what>``, so a CSV row stays one line)::

        dy, dx, dparams, params        the norms of gradient_flow
        update_ratio                   ‖θ_epoch − θ_previous‖ / ‖θ_previous‖, the update-to-weight
                                       ratio over the epoch (from the second call on: the first
                                       call, before training, sets θ_previous)

    and redraws ``plot_path`` (one line per layer over the epochs, log scale).
    """

    def __init__(self, model, loss, x, y, plot_path=None):
        run = observe(value_and_grad(model, loss), _FlowAndParams())

        def probe(params, state):
            _, entries = run(params, state, x, y)
            return collections.OrderedDict((e.label, e.values) for e in flatten_entries(entries)
                                           if "_params" in e.values)

        self.probe = jax.jit(probe)
        self.plot_path = plot_path
        self.previous = None
        self.rows: list = []

    def __call__(self, epoch, params, state) -> dict:
        flow = jax.device_get(self.probe(params, state))
        first = self.previous is None
        row = {}
        for label, v in flow.items():
            for what in ("dy", "dx", "dparams", "params"):
                if what in v:
                    row[f"grad_flow/{label}/{what}"] = float(v[what])
            if not first:
                row[f"grad_flow/{label}/update_ratio"] = _ratio(v["_params"], self.previous[label])
        self.previous = {label: v["_params"] for label, v in flow.items()}
        if first:
            return {}                   # the call before training: it sets θ_previous only
        self.rows.append({"epoch": epoch, **row})
        if self.plot_path:
            plot_grad_flow(self.rows, self.plot_path)
        return row


def _ratio(new, old) -> float:
    """‖new − old‖ / ‖old‖ over every leaf, on the host in float64."""
    pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64))
             for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old))]
    change = sum(float(np.sum((a - b) ** 2)) for a, b in pairs)
    size = sum(float(np.sum(b ** 2)) for _, b in pairs)
    return float(np.sqrt(change / max(size, 1e-300)))


def _series(rows, what):
    """{layer: (epochs, values)} of ``grad_flow/<layer>/<what>`` over ``rows``."""
    out: dict = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("grad_flow/") and k.endswith(f"/{what}"):
                label = k[len("grad_flow/"):-len(what) - 1]
                out.setdefault(label, ([], []))
                out[label][0].append(r["epoch"])
                out[label][1].append(v)
    return out


def plot_grad_flow(rows, path, *, title: str = "") -> None:
    """Save a PNG of three panels over the epochs, one line per layer, log scale: ‖dy‖ arriving
    at each layer, ‖dθ‖, and the update-to-weight ratio ‖Δθ‖/‖θ‖."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("dy", "‖dy‖ arriving (error signal)"), ("dparams", "‖dθ‖ (gradient)"),
              ("update_ratio", "‖Δθ‖ / ‖θ‖ over the epoch")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (what, name) in zip(axes, panels):
        for label, (ep, vals) in _series(rows, what).items():
            ax.plot(ep, np.maximum(np.asarray(vals, float), 1e-30), marker=".", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(name)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7, frameon=False)
    fig.suptitle(title or "gradient flow, per layer with params")
    fig.tight_layout(rect=(0, 0.04 + 0.035 * ((len(labels) + 3) // 4), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
