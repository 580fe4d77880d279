"""Recurrent layers (Elman RNN, GRU, LSTM) with backpropagation through time written by hand.

All three share one driver. The forward is a ``lax.scan`` over time; the backward is a second
``lax.scan`` over time *in reverse* that carries the gradient of the hidden state backwards
and accumulates the recurrent weight gradient ``dW_h``. Each cell supplies one step of the
forward and the matching step of the backward; the driver does the rest, the same for all:

* **Input projection, outside the scan.** ``gx = x W_x + b`` for all T steps is one matmul
  (N, T, G·H); the scan only does the recurrent part ``gh = h_{t−1} W_h``. Symmetrically the
  backward scan emits ``dgx_t`` for every step, and ``dW_x = Σ_t x_tᵀ dgx_t``, ``db = Σ dgx``
  and ``dx = dgx W_xᵀ`` are computed after it as single matmuls.
* **Mask** (N, T), for sequences of different lengths (1 = a real step, 0 = padding). A masked
  step leaves the state unchanged and outputs zeros::

      h_t = m_t ⊙ h̃_t + (1 − m_t) ⊙ h_{t−1}        h̃_t the cell's new state
      y_t = m_t ⊙ h_t

  so with padding at the end the final state is the state after each sequence's last real
  step. Backward: the state gradient is split, ``m_t ⊙ dh_t`` into the cell and
  ``(1 − m_t) ⊙ dh_t`` straight through to ``h_{t−1}``.
* **Initial state**: zeros, or given per example as part of the input (``initial_state=True``);
  its gradient is then returned with ``dx``.
* **Mixed precision**: for bfloat16 inputs the weight gradients, the running ``dW_h`` of the
  reverse scan included, are summed in float32 (``accumulation_dtype``), each step's
  ``h_{t−1}ᵀ dgh`` a float32 product; the states and their gradients stay bfloat16.

Inputs are ``x`` (N, T, D), or a tuple when the layer is built with ``masked=True`` and/or
``initial_state=True``: ``(x, mask)``, ``(x, h0)`` (``(x, h0, c0)`` for the LSTM) or
``(x, mask, h0[, c0])``. ``backward`` then returns ``dx`` as a tuple of the same length:
``(dx, None, dh0, …)``, ``None`` in the place of the mask (it has no gradient).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .. import initializers
from .._checks import check_float_input, check_positive_int, shape_record
from .._core import Layer, accumulation_dtype, make_layer, sum_acc

__all__ = ["rnn", "gru", "lstm", "bidirectional"]


# ----------------------------------------------------------------------------- the cells


class _Cell(NamedTuple):
    """One step of a recurrent cell, forward and backward, given the two projections.

    ``step(gx, gh, prev) -> (new, saved)``: ``gx = x_t W_x + b`` and ``gh = h_{t−1} W_h (+ b_h)``,
    both (N, G·H); ``prev`` and ``new`` are the state tuples ``(h,)`` or ``(h, c)``, (N, H) each;
    ``saved`` are the arrays the backward step needs.

    ``step_back(dnew, saved, prev, new) -> (dgx, dgh, dprev)``: from the gradient of the new
    state, the gradients of the two projections (N, G·H) and the *direct* gradient of the
    previous state (not through ``gh``: the driver adds ``dgh W_hᵀ`` to ``dprev[0]``).
    """

    gates: int                  # G: the projections are (N, G·H)
    state: int                  # 1: (h,);  2: (h, c)
    hidden_bias: bool           # a separate bias b_h inside gh (GRU)
    step: Callable
    step_back: Callable


def _sigmoid_grad(s):
    return s * (1 - s)


def _rnn_step(gx, gh, prev):
    h = jnp.tanh(gx + gh)                                          # (N, H)
    return (h,), ()


def _rnn_step_back(dnew, saved, prev, new):
    (dh,), (h,) = dnew, new
    da = dh * (1 - h * h)                                          # (N, H)  pre-activation
    return da, da, (jnp.zeros_like(dh),)


def _gru_step(gx, gh, prev):
    (h,) = prev
    gx_r, gx_z, gx_n = jnp.split(gx, 3, axis=-1)                   # (N, H) each
    gh_r, gh_z, gh_n = jnp.split(gh, 3, axis=-1)
    r = jax.nn.sigmoid(gx_r + gh_r)                                # reset gate
    z = jax.nn.sigmoid(gx_z + gh_z)                                # update gate
    n = jnp.tanh(gx_n + r * gh_n)                                  # candidate
    h_new = (1 - z) * n + z * h                                    # (N, H)
    return (h_new,), (r, z, n, gh_n)


def _gru_step_back(dnew, saved, prev, new):
    (dh,), (h,) = dnew, prev
    r, z, n, gh_n = saved
    dn = dh * (1 - z)                                              # (N, H)
    dz = dh * (h - n)
    dan = dn * (1 - n * n)                                         # pre-activation of n
    dar = dan * gh_n * _sigmoid_grad(r)                            # pre-activation of r
    daz = dz * _sigmoid_grad(z)                                    # pre-activation of z
    dgx = jnp.concatenate([dar, daz, dan], axis=-1)                # (N, 3H)
    dgh = jnp.concatenate([dar, daz, dan * r], axis=-1)            # (N, 3H)
    return dgx, dgh, (dh * z,)


def _lstm_step(gx, gh, prev):
    _, c = prev
    a_i, a_f, a_g, a_o = jnp.split(gx + gh, 4, axis=-1)            # (N, H) each
    i, f, o = jax.nn.sigmoid(a_i), jax.nn.sigmoid(a_f), jax.nn.sigmoid(a_o)
    g = jnp.tanh(a_g)
    c_new = f * c + i * g                                          # (N, H)
    h_new = o * jnp.tanh(c_new)                                    # (N, H)
    return (h_new, c_new), (i, f, g, o)


def _lstm_step_back(dnew, saved, prev, new):
    (dh, dc_in), (_, c_prev), (_, c) = dnew, prev, new
    i, f, g, o = saved
    tc = jnp.tanh(c)                                               # (N, H)
    do = dh * tc
    dc = dc_in + dh * o * (1 - tc * tc)                            # total gradient of c_t
    da = jnp.concatenate([dc * g * _sigmoid_grad(i),               # i
                          dc * c_prev * _sigmoid_grad(f),          # f
                          dc * i * (1 - g * g),                    # g
                          do * _sigmoid_grad(o)], axis=-1)         # o          (N, 4H)
    return da, da, (jnp.zeros_like(dh), dc * f)


_RNN = _Cell(1, 1, False, _rnn_step, _rnn_step_back)
_GRU = _Cell(3, 1, True, _gru_step, _gru_step_back)
_LSTM = _Cell(4, 2, False, _lstm_step, _lstm_step_back)


# ----------------------------------------------------------------------------- the driver


def _time_major(a):
    return jnp.swapaxes(a, 0, 1)                                   # (N, T, ...) <-> (T, N, ...)


def _recurrent(name, cell: _Cell, hidden_size, *, return_sequences, masked, initial_state,
               w_init, h_init, b_init, param_dtype, forget_bias=0.0) -> Layer:
    hidden = check_positive_int(name, "hidden_size", hidden_size)
    w_fn = initializers.get(w_init, name)
    h_fn = initializers.get(h_init, name)
    b_fn = initializers.get(b_init, name)
    tuple_input = masked or initial_state
    G = cell.gates * hidden

    def unpack(x):
        """(x, mask or None, initial state tuple or None) from the layer's input."""
        if not tuple_input:
            return x, None, None
        x, *rest = x
        mask = rest.pop(0) if masked else None
        return x, mask, (tuple(rest) if initial_state else None)

    def init(key, in_shape):
        x_shape = in_shape[0] if tuple_input else in_shape
        d_in = x_shape[-1]
        kx, kh, kb, kbh = jax.random.split(key, 4)
        params = {"w_x": w_fn(kx, (d_in, G), param_dtype),
                  "w_h": h_fn(kh, (hidden, G), param_dtype),
                  "b": b_fn(kb, (G,), param_dtype)}
        if forget_bias:
            params["b"] = params["b"].at[hidden:2 * hidden].add(forget_bias)
        if cell.hidden_bias:
            params["b_h"] = b_fn(kbh, (G,), param_dtype)
        out = (x_shape[0], hidden) if return_sequences else (hidden,)
        return params, (), out

    def forward(params, state, x, *, key=None, train=True):
        x, mask, h0 = unpack(x)
        n = x.shape[0]
        gx = _time_major(x @ params["w_x"] + params["b"])          # (T, N, G·H)  all steps at once
        m = None if mask is None else _time_major(mask.astype(x.dtype))[..., None]   # (T, N, 1)
        if h0 is None:
            h0 = tuple(jnp.zeros((n, hidden), x.dtype) for _ in range(cell.state))

        def step(prev, inputs):
            gx_t, m_t = inputs
            gh = prev[0] @ params["w_h"]                           # (N, G·H)
            if cell.hidden_bias:
                gh = gh + params["b_h"]
            new, saved = cell.step(gx_t, gh, prev)
            if m_t is not None:                                    # padding: keep the state
                new = tuple(m_t * a + (1 - m_t) * b for a, b in zip(new, prev))
            return new, (new, saved)

        last, (states, saved) = lax.scan(step, h0, (gx, m))        # states: (T, N, H) each
        if return_sequences:
            y = states[0] if m is None else states[0] * m          # (T, N, H)
            y = _time_major(y)                                     # (N, T, H)
        else:
            y = last[0]                                            # (N, H)
        res = {"x": x, "h0": h0, "states": states, "saved": saved}
        if m is not None:
            res["m"] = m
        return y, state, res

    def backward(params, res, dy):
        x = res["x"]
        dh0, dw_h, dgx, dgh = through_time(params, res, dy)
        acc = accumulation_dtype(dgx.dtype)                        # float32 for bfloat16
        xt = _time_major(x)                                        # (T, N, D)
        dparams = {"w_x": jnp.einsum("tnd,tng->dg", xt, dgx, preferred_element_type=acc),  # (D, G·H)
                   "w_h": dw_h,                                    # (H, G·H)
                   "b": sum_acc(dgx, axis=(0, 1))}                 # (G·H,)
        if cell.hidden_bias:
            dparams["b_h"] = sum_acc(dgh, axis=(0, 1))             # (G·H,)
        dx = _time_major(dgx @ params["w_x"].T)                    # (N, T, D)
        if not tuple_input:
            return dparams, dx
        return dparams, (dx, *((None,) if masked else ()), *(dh0 if initial_state else ()))

    def through_time(params, res, dy):
        """The reverse scan over time: (dh0, dW_h, dgx (T, N, G·H), dgh (T, N, G·H) or None
        without a hidden bias), the errors of the gate pre-activations."""
        h0, states, saved = res["h0"], res["states"], res["saved"]
        m = res.get("m")
        prevs = tuple(jnp.concatenate([s0[None], s[:-1]]) for s0, s in zip(h0, states))  # (T, N, H)
        if return_sequences:
            dys, dlast = _time_major(dy), jnp.zeros_like(h0[0])    # (T, N, H), (N, H)
        else:
            dys, dlast = None, dy                                  # only the last state is output
        w_h = params["w_h"]
        acc = accumulation_dtype(dlast.dtype)                      # float32 for bfloat16

        def back_step(carry, inputs):
            dstate, dw_h = carry                                   # gradient of h_t (c_t), running dW_h
            dy_t, m_t, new, prev, saved_t = inputs
            if dy_t is not None:
                dstate = (dstate[0] + (dy_t if m_t is None else m_t * dy_t), *dstate[1:])
            through = dstate if m_t is None else tuple(m_t * d for d in dstate)
            dgx, dgh, dprev = cell.step_back(through, saved_t, prev, new)
            dw_h = dw_h + jnp.matmul(prev[0].T, dgh, preferred_element_type=acc)  # (H, G·H) accumulated
            dprev = (dprev[0] + dgh @ w_h.T, *dprev[1:])           # (N, H)
            if m_t is not None:                                    # padding: straight through
                dprev = tuple(dp + (1 - m_t) * d for dp, d in zip(dprev, dstate))
            return (dprev, dw_h), (dgx, dgh) if cell.hidden_bias else dgx

        dstate_T = (dlast, *(jnp.zeros_like(s) for s in h0[1:]))
        (dh0, dw_h), out = lax.scan(back_step, (dstate_T, jnp.zeros_like(w_h, dtype=acc)),
                                    (dys, m, states, prevs, saved), reverse=True)
        if cell.hidden_bias:
            return dh0, dw_h, out[0], out[1]
        return dh0, dw_h, out, None

    def example_rows(params, res, dy):
        """Each weight's rows and errors, for ``per_example="projections"``: W_x on (x_t, dgx_t),
        W_h on (h_{t−1}, dgh_t) (dgh = dgx but for a GRU's hidden bias), over the T steps, from
        the backward's own reverse scan (the same operations, which XLA computes once)."""
        _, _, dgx, dgh = through_time(params, res, dy)
        h0, states = res["h0"], res["states"]
        prev = jnp.concatenate([h0[0][None], states[0][:-1]])      # (T, N, H) h_{t−1}
        rows = {"w_x": (res["x"], _time_major(dgx), "b"),
                "w_h": (_time_major(prev), _time_major(dgx if dgh is None else dgh),
                        "b_h" if cell.hidden_bias else None)}
        return rows

    def check(params, state, x):
        d_in = params["w_x"].shape[0]
        if tuple_input:
            parts = ["x"] + (["mask"] if masked else []) + (["h0", "c0"][:cell.state] if initial_state else [])
            if len(x) != len(parts):
                raise ValueError(f"{name}: expected x to be the tuple ({', '.join(parts)}), "
                                 f"got a tuple of {len(x)} arrays")
            xs, mask, h0 = unpack(x)
            check_float_input(name, "x[0]", xs)
        else:
            xs, mask, h0 = x, None, None
        if xs.ndim != 3 or xs.shape[-1] != d_in:
            raise ValueError(f"{name}: expected x.shape == (N, T, {d_in}), got x.shape={tuple(xs.shape)}")
        n, t = xs.shape[:2]
        if t == 0:
            raise ValueError(f"{name}: expected at least one time step, got x.shape={tuple(xs.shape)}")
        if mask is not None and tuple(mask.shape) != (n, t):
            raise ValueError(f"{name}: expected mask.shape == {(n, t)} (N, T), got mask.shape={tuple(mask.shape)}")
        for i, s in enumerate(h0 or ()):
            what = "h0" if i == 0 else "c0"
            check_float_input(name, what, s)
            if tuple(s.shape) != (n, hidden):
                raise ValueError(f"{name}: expected {what}.shape == {(n, hidden)} (N, hidden_size), "
                                 f"got {what}.shape={tuple(s.shape)}")

    if tuple_input:
        return make_layer(name, init, forward, backward, check=check, tuple_input=True,
                          float_input=False, min_ndim=2, curvature="recurrent", per_example="projections",
                          example_rows=example_rows)
    return make_layer(name, init, forward, backward, check=check, ndim=3, meaning="(batch, time, features)",
                      curvature="recurrent", per_example="projections", example_rows=example_rows)


_ORTHOGONAL = jax.nn.initializers.orthogonal()


def rnn(hidden_size: int, *, return_sequences: bool = True, masked: bool = False,
        initial_state: bool = False, w_init="glorot_uniform", h_init=_ORTHOGONAL, b_init="zeros",
        param_dtype=jnp.float32) -> Layer:
    """Elman recurrent layer with tanh, over x (N, T, D); hidden size H.

    Params ``{"w_x": W_x (D, H), "w_h": W_h (H, H), "b": b (H,)}``.

    Forward, for t = 1 … T from h_0 (zeros, or given)::

        a_t = x_t W_x + h_{t−1} W_h + b                                      (N, H)
        h_t = tanh(a_t)
        y = (h_1, …, h_T) (N, T, H) if return_sequences, else h_T (N, H)

    Backward through time, a reverse scan for t = T … 1 carrying dh_t, the gradient of h_t
    (it starts at 0, or at dy for a final-state output; a sequence output adds dy_t to it)::

        da_t = dh_t ⊙ (1 − h_t²)                                             (N, H)
        dW_h += h_{t−1}ᵀ da_t                                               (H, H)
        dh_{t−1} = da_t W_hᵀ                                                (N, H)
        dW_x = Σ_t x_tᵀ da_t,   db = Σ_t Σ_n da_t,   dx_t = da_t W_xᵀ        after the scan

    Options (the same for :func:`gru` and :func:`lstm`):

    * ``return_sequences``: y is every h_t (N, T, H), or only the final state (N, H).
    * ``masked``: x is ``(x, mask)``, mask (N, T) of 0/1 or bool; a masked step keeps the
      state and outputs 0 (see :mod:`bpjax.layers.recurrent`).
    * ``initial_state``: x is ``(x, h0)`` (``(x, h0, c0)`` for the LSTM), h0 (N, H);
      with both, ``(x, mask, h0[, c0])``. ``dx`` is then the tuple ``(dx, [None,] dh0[, dc0])``.
    """
    return _recurrent("rnn", _RNN, hidden_size, return_sequences=return_sequences, masked=masked,
                      initial_state=initial_state, w_init=w_init, h_init=h_init, b_init=b_init,
                      param_dtype=param_dtype)


def gru(hidden_size: int, *, return_sequences: bool = True, masked: bool = False,
        initial_state: bool = False, w_init="glorot_uniform", h_init=_ORTHOGONAL, b_init="zeros",
        param_dtype=jnp.float32) -> Layer:
    """Gated recurrent unit over x (N, T, D); hidden size H. The equations of
    ``torch.nn.GRU`` (the reset gate multiplies the hidden projection, bias included).

    Params ``{"w_x": (D, 3H), "w_h": (H, 3H), "b": (3H,), "b_h": (3H,)}``; the gate layout along
    the last axis is ``[r | z | n]`` (reset, update, candidate), H columns each.

    Forward, per step, with gx = x_t W_x + b and gh = h_{t−1} W_h + b_h split as [r | z | n]::

        r = σ(gx_r + gh_r)              z = σ(gx_z + gh_z)                  (N, H)
        n = tanh(gx_n + r ⊙ gh_n)
        h_t = (1 − z) ⊙ n + z ⊙ h_{t−1}

    Backward, per step in reverse, from dh = dh_t::

        dn = dh ⊙ (1 − z)               dz = dh ⊙ (h_{t−1} − n)
        da_n = dn ⊙ (1 − n²)            da_z = dz ⊙ z(1 − z)
        da_r = da_n ⊙ gh_n ⊙ r(1 − r)
        dgx = [da_r | da_z | da_n]      dgh = [da_r | da_z | da_n ⊙ r]      (N, 3H)
        dW_h += h_{t−1}ᵀ dgh            db_h += Σ_n dgh
        dh_{t−1} = dh ⊙ z + dgh W_hᵀ
        dW_x = Σ_t x_tᵀ dgx_t,   db = Σ dgx,   dx_t = dgx_t W_xᵀ             after the scan

    ``return_sequences``, ``masked``, ``initial_state``: as :func:`rnn`.
    """
    return _recurrent("gru", _GRU, hidden_size, return_sequences=return_sequences, masked=masked,
                      initial_state=initial_state, w_init=w_init, h_init=h_init, b_init=b_init,
                      param_dtype=param_dtype)


def lstm(hidden_size: int, *, return_sequences: bool = True, masked: bool = False,
         initial_state: bool = False, forget_bias: float = 1.0, w_init="glorot_uniform",
         h_init=_ORTHOGONAL, b_init="zeros", param_dtype=jnp.float32) -> Layer:
    """Long short-term memory over x (N, T, D); hidden size H; state (h, c).

    Params ``{"w_x": (D, 4H), "w_h": (H, 4H), "b": (4H,)}``; the gate layout along the last axis
    is ``[i | f | g | o]`` (input, forget, cell candidate, output), H columns each, as in
    ``torch.nn.LSTM``. The forget-gate bias starts at ``forget_bias`` (1).

    Forward, per step, with a = x_t W_x + h_{t−1} W_h + b split as [i | f | g | o]::

        i = σ(a_i)   f = σ(a_f)   g = tanh(a_g)   o = σ(a_o)                (N, H)
        c_t = f ⊙ c_{t−1} + i ⊙ g
        h_t = o ⊙ tanh(c_t)

    Backward, per step in reverse, from dh = dh_t and the carried dc_t::

        do = dh ⊙ tanh(c_t)
        dc = dc_t + dh ⊙ o ⊙ (1 − tanh²(c_t))
        da = [dc ⊙ g ⊙ i(1−i) | dc ⊙ c_{t−1} ⊙ f(1−f) | dc ⊙ i ⊙ (1−g²) | do ⊙ o(1−o)]
                                                                             (N, 4H)
        dW_h += h_{t−1}ᵀ da
        dh_{t−1} = da W_hᵀ            dc_{t−1} = dc ⊙ f
        dW_x = Σ_t x_tᵀ da_t,   db = Σ da,   dx_t = da_t W_xᵀ                after the scan

    ``return_sequences`` (y is h only), ``masked``, ``initial_state`` (``(x, h0, c0)``): as
    :func:`rnn`.
    """
    return _recurrent("lstm", _LSTM, hidden_size, return_sequences=return_sequences, masked=masked,
                      initial_state=initial_state, w_init=w_init, h_init=h_init, b_init=b_init,
                      param_dtype=param_dtype, forget_bias=float(forget_bias))


# ----------------------------------------------------------------------------- bidirectional


def _flip(a):
    return None if a is None else jnp.flip(a, axis=1)               # the time axis of (N, T, ...)


def bidirectional(layer: Layer) -> Layer:
    """Run ``layer`` (call it f) over the sequence and a second copy over it reversed in time,
    and concatenate the two outputs on the last axis.

    Forward::

        y_f = f(θ_f, x)         y_r = f(θ_r, flip(x))                  x (N, T, D)
        y = [y_f | flip(y_r)]   (N, T, H_f + H_r)   for a sequence output,
        y = [y_f | y_r]         (N, H_f + H_r)      for a final state

    Backward::

        dy_f, dy_r = the two halves of dy  (dy_r flipped back for a sequence output)
        (dθ_f, dx_f) = f.backward(θ_f, r_f, dy_f)
        (dθ_r, dx_r) = f.backward(θ_r, r_r, dy_r)
        dx = dx_f + flip(dx_r)

    ``x`` is an array (N, T, D), or ``(x, mask)`` for an inner layer built with ``masked=True``:
    both are flipped, and since a masked step keeps the state, the reverse direction skips the
    end padding and starts at each sequence's last real step. Params and state are
    ``{"forward": …, "reverse": …}``.
    """
    name = "bidirectional"
    if not isinstance(layer, Layer):
        raise TypeError(f"{name}: expected a bpjax.Layer, got {type(layer).__name__}")

    def init(key, in_shape):
        kf, kr = jax.random.split(key)
        pf, sf, out = layer.init(kf, in_shape)
        pr, sr, _ = layer.init(kr, in_shape)
        return {"forward": pf, "reverse": pr}, {"forward": sf, "reverse": sr}, (*out[:-1], 2 * out[-1])

    def flip_input(x):
        return tuple(_flip(e) for e in x) if isinstance(x, tuple) else _flip(x)

    def forward(params, state, x, *, key=None, train=True):
        kf, kr = (None, None) if key is None else jax.random.split(key)
        y_f, s_f, r_f = layer.forward(params["forward"], state["forward"], x, key=kf, train=train)
        y_r, s_r, r_r = layer.forward(params["reverse"], state["reverse"], flip_input(x), key=kr, train=train)
        if y_f.ndim == 3:
            y_r = _flip(y_r)                                       # back to the forward time order
        y = jnp.concatenate([y_f, y_r], axis=-1)                   # (N, [T,] H_f + H_r)
        return y, {"forward": s_f, "reverse": s_r}, {"forward": r_f, "reverse": r_r,
                                                     "y_f": shape_record(y_f)}

    def backward(params, res, dy):
        h_f = res["y_f"].shape[-1]
        dy_f, dy_r = dy[..., :h_f], dy[..., h_f:]
        if dy.ndim == 3:
            dy_r = _flip(dy_r)
        dp_f, dx_f = layer.backward(params["forward"], res["forward"], dy_f)
        dp_r, dx_r = layer.backward(params["reverse"], res["reverse"], dy_r)
        if isinstance(dx_f, tuple):
            dx = tuple(None if a is None else a + _flip(b) for a, b in zip(dx_f, dx_r))
        else:
            dx = dx_f + _flip(dx_r)                                # (N, T, D)
        return {"forward": dp_f, "reverse": dp_r}, dx

    def check(params, state, x):
        if isinstance(x, tuple) and len(x) != 2:
            raise ValueError(f"{name}: expected x to be an array (N, T, D) or the tuple (x, mask), "
                             f"got a tuple of {len(x)} arrays")
        xs = x[0] if isinstance(x, tuple) else x
        if xs.ndim != 3:
            raise ValueError(f"{name}: expected x.ndim == 3 (batch, time, features), got x.shape={tuple(xs.shape)}")

    plain = make_layer(name, init, forward, backward, check=check, per_example="combinator")
    tupled = make_layer(name, init, forward, backward, check=check, tuple_input=True,
                        float_input=False, min_ndim=2, per_example="combinator")

    def init_(key, in_shape):
        is_tuple = len(in_shape) > 0 and hasattr(in_shape[0], "__len__")
        return (tupled if is_tuple else plain).init(key, in_shape)

    def forward_(params, state, x, *, key=None, train=True):
        chosen = tupled if isinstance(x, (tuple, list)) else plain
        return chosen.forward(params, state, x, key=key, train=train)

    return Layer(init_, forward_, plain.backward, name)
