"""Multi-head self-attention, the pre-layer-norm transformer block and a GPT-style language
model, each with its backward written by hand.

Attention has two backward passes. The standard one saves the attention probabilities P
(N, heads, T, T) and applies the softmax Jacobian-vector product to them. The memory-lean one
(``lean=True``, the flash-attention idea) saves only the per-row log-sum-exp of the scores,
(N, heads, T): its forward runs an online softmax over blocks of keys, and its backward
recomputes P block by block, so no (T × T) array ever exists, only (T × block) ones.
``impl="pallas"`` runs the same lean math as Pallas kernels (bpjax/kernels/flash.py): on a GPU
each block stays in fast memory; elsewhere the kernels run in Pallas's interpret mode (slow, for
checking). Which formulation runs is decided in one place, for the platform the program is
lowered for: :mod:`bpjax.kernels`.

Mixed precision: for bfloat16 q, k, v the scores, the softmax (its max, sum and log-sum-exp),
the softmax's backward and the lean passes' running sums (ℓ, the output accumulator, dQ) are
float32 (``accumulation_dtype``), every product accumulates in float32
(``preferred_element_type``), and what is stored or returned (P, O, dQ, dK, dV) is bfloat16.
For float32 and float64 nothing changes.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from .. import initializers, kernels
from ..kernels import flash as _flash
from .basic import dense, gelu
from .._checks import check_float_input, check_positive_int
from .._core import Layer, accumulation_dtype, make_layer, sum_acc
from .norm import layer_norm
from .structure import embedding

__all__ = ["multi_head_attention", "transformer_block", "gpt"]


# ----------------------------------------------------------------------------- attention kernels
#
# q, k, v, o are (N, h, T, d): batch, heads, time, head size; s = q kᵀ/√d the scores (N, h, T, T).
# ``allowed`` is a boolean array broadcastable to the scores, or None; disallowed scores become
# _masked(dtype), a finite very negative number, so exp(s − max) is exactly 0 there (no NaN from
# −∞ − (−∞)). A query with no allowed key at all gets all-zero weights: o = 0 there, and no
# gradient flows through its row.


def _masked(dtype):
    return jnp.finfo(dtype).min


def _dot(spec, a, b, acc):
    """einsum(spec, a, b) accumulated in, and returned as, ``acc`` (float32 for bfloat16)."""
    return jnp.einsum(spec, a, b, preferred_element_type=acc)


def _allowed(mask, causal, t_q, t_k):
    """Boolean (·, ·, T_q, T_k) of the (query, key) pairs that may attend, or None for all.

    ``mask`` is None, (N, 1, 1, T_k) (keys) or (N, 1, T_q, T_k) (pairs)."""
    allowed = None if mask is None else mask
    if causal:
        qi = lax.broadcasted_iota(jnp.int32, (t_q, t_k), 0)
        kj = lax.broadcasted_iota(jnp.int32, (t_q, t_k), 1)
        c = kj <= qi                                               # (T_q, T_k): no looking ahead
        allowed = c if allowed is None else allowed & c
    return allowed


def _attention_forward(q, k, v, allowed, scale, *, user_mask):
    """The standard forward: o = softmax(q kᵀ·scale) v; returns o and P (N, h, T, T).
    ``user_mask``: rows may have no allowed key (causal masking alone always allows key 0)."""
    acc = accumulation_dtype(q.dtype)
    s = _dot("nhqd,nhkd->nhqk", q, k, acc) * scale                 # (N, h, T, T)
    if allowed is not None:
        s = jnp.where(allowed, s, _masked(s.dtype))
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)                 # (N, h, T, T)
    if user_mask:                                                  # rows with no allowed key: 0
        p = jnp.where(jnp.any(allowed, axis=-1, keepdims=True), p, 0)
    return _dot("nhqk,nhkd->nhqd", p, v, acc).astype(q.dtype), p   # (N, h, T, d)


def _attention_backward(do, q, k, v, p, scale):
    """Standard backward from the saved P::

        dV = Pᵀ dO                     dP = dO Vᵀ
        dS = P ⊙ (dP − rowsum(dP ⊙ P))  (the softmax Jacobian-vector product)
        dQ = dS K · scale              dK = dSᵀ Q · scale

    A disallowed score is a constant, so its dS is 0 (P is 0 there already).
    """
    acc, lo = accumulation_dtype(q.dtype), q.dtype
    dv = _dot("nhqk,nhqd->nhkd", p, do, acc)                       # (N, h, T, d)
    dp = _dot("nhqd,nhkd->nhqk", do, v, acc)                       # (N, h, T, T)
    pf = p.astype(acc)
    ds = (pf * (dp - jnp.sum(dp * pf, axis=-1, keepdims=True))).astype(lo)  # (N, h, T, T)
    dq = _dot("nhqk,nhkd->nhqd", ds, k, acc) * scale               # (N, h, T, d)
    dk = _dot("nhqk,nhqd->nhkd", ds, q, acc) * scale               # (N, h, T, d)
    return dq.astype(lo), dk.astype(lo), dv.astype(lo)


def _key_blocks(k, v, mask, block):
    """Keys, values and the key part of the mask cut into blocks along time, for ``lax.scan``.

    Returns (kb, vb, mb, starts, valid): kb, vb (B, N, h, b, d) with B = ⌈T/b⌉ (the last block
    zero-padded), mb the mask blocks (B, N, 1, T_q|1, b) or None, the first key index of each
    block, and ``valid`` (B, b), False on the padding keys."""
    t = k.shape[2]
    nb = -(-t // block)
    pad = nb * block - t

    def cut(a):                                                    # (..., T, ·) -> (B, ..., b, ·)
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, pad), (0, 0)])
        a = a.reshape(*a.shape[:-2], nb, block, a.shape[-1])
        return jnp.moveaxis(a, -3, 0)

    mb = None
    if mask is not None:
        m = jnp.pad(mask, [(0, 0)] * 3 + [(0, pad)]).reshape(*mask.shape[:3], nb, block)
        mb = jnp.moveaxis(m, 3, 0)                                 # (B, N, 1, T_q|1, b)
    starts = jnp.arange(nb) * block
    valid = (jnp.arange(nb * block) < t).reshape(nb, block)
    return cut(k), cut(v), mb, starts, valid


def _block_scores(q, k_j, m_j, start, valid_j, causal, scale):
    """Scores of every query against one block of keys, masked: (N, h, T, b)."""
    s = _dot("nhqd,nhkd->nhqk", q, k_j, accumulation_dtype(q.dtype)) * scale   # (N, h, T, b)
    allowed = m_j
    if causal:
        qi = lax.broadcasted_iota(jnp.int32, s.shape[-2:], 0)
        kj = lax.broadcasted_iota(jnp.int32, s.shape[-2:], 1) + start
        allowed = (kj <= qi) if allowed is None else allowed & (kj <= qi)
    if allowed is not None:
        s = jnp.where(allowed, s, _masked(s.dtype))
    return jnp.where(valid_j, s, -jnp.inf)                         # padding keys: weight exactly 0


def _lean_forward(q, k, v, mask, causal, scale, block):
    """Online softmax over key blocks: o = softmax(s) v without the (T × T) matrix.

    Carries, per query row, the running max m, the running sum ℓ = Σ e^{s − m} and the running
    unnormalised output acc = Σ e^{s − m} v; each block rescales them by e^{m_old − m_new}.
    Returns o (N, h, T, d) and L = m + log ℓ (N, h, T), the log-sum-exp the backward needs.
    A row with no allowed key (m is the mask value) gets o = 0 and L = +∞, so P = e^{S−L} = 0.
    m, ℓ, acc and L are float32 for bfloat16 q (o is returned in q's dtype)."""
    kb, vb, mb, starts, valid = _key_blocks(k, v, mask, block)
    f = accumulation_dtype(q.dtype)

    def step(carry, blk):
        m, l, acc = carry
        k_j, v_j, m_j, start, valid_j = blk
        s = _block_scores(q, k_j, m_j, start, valid_j, causal, scale)      # (N, h, T, b)
        m_new = jnp.maximum(m, s.max(axis=-1))                     # (N, h, T)
        a = jnp.exp(m - m_new)                                     # rescales the old sums
        p = jnp.exp(s - m_new[..., None])                          # (N, h, T, b)
        l = a * l + p.sum(axis=-1)
        acc = a[..., None] * acc + _dot("nhqk,nhkd->nhqd", p.astype(v_j.dtype), v_j, f)
        return (m_new, l, acc), None

    n, h, t, d = q.shape
    init = (jnp.full((n, h, t), -jnp.inf, f), jnp.zeros((n, h, t), f), jnp.zeros((n, h, t, d), f))
    (m, l, acc), _ = lax.scan(step, init, (kb, vb, mb, starts, valid))
    has_key = m > _masked(m.dtype)                                 # (N, h, T)
    o = jnp.where(has_key[..., None], acc / l[..., None], 0)       # (N, h, T, d)
    return o.astype(q.dtype), jnp.where(has_key, m + jnp.log(l), jnp.inf)


def _lean_backward(do, q, k, v, o, lse, mask, causal, scale, block):
    """The standard backward, one key block at a time, recomputing P_j = exp(S_j − L)::

        δ = rowsum(dO ⊙ O)  (= rowsum(dP ⊙ P), so the softmax JVP needs no full row of P)
        per block j:  dV_j = P_jᵀ dO      dP_j = dO V_jᵀ      dS_j = P_j ⊙ (dP_j − δ)
                      dQ += dS_j K_j · scale                  dK_j = dS_jᵀ Q · scale

    δ, P_j, dS_j and the running dQ are float32 for bfloat16 (P_j and dS_j enter the products
    in bfloat16); dQ, dK, dV are returned in q's dtype.
    """
    t = k.shape[2]
    lo, f = q.dtype, accumulation_dtype(q.dtype)
    kb, vb, mb, starts, valid = _key_blocks(k, v, mask, block)
    dof = do.astype(f)
    delta = jnp.sum(dof * o.astype(f), axis=-1, keepdims=True)     # (N, h, T, 1)

    def step(dq, blk):
        k_j, v_j, m_j, start, valid_j = blk
        s = _block_scores(q, k_j, m_j, start, valid_j, causal, scale)      # (N, h, T, b)
        p = jnp.exp(s - lse[..., None])                            # (N, h, T, b)
        dv_j = _dot("nhqk,nhqd->nhkd", p.astype(lo), do, f)        # (N, h, b, d)
        dp = _dot("nhqd,nhkd->nhqk", do, v_j, f)                   # (N, h, T, b)
        ds = (p * (dp - delta)).astype(lo)                         # (N, h, T, b)
        dq = dq + _dot("nhqk,nhkd->nhqd", ds, k_j, f) * scale      # (N, h, T, d)
        dk_j = _dot("nhqk,nhqd->nhkd", ds, q, f) * scale           # (N, h, b, d)
        return dq, (dk_j.astype(lo), dv_j.astype(lo))

    dq, (dkb, dvb) = lax.scan(step, jnp.zeros_like(q, dtype=f), (kb, vb, mb, starts, valid))

    def uncut(a):                                                  # (B, N, h, b, d) -> (N, h, T, d)
        a = jnp.moveaxis(a, 0, 2)
        return a.reshape(*a.shape[:2], -1, a.shape[-1])[:, :, :t]

    return dq.astype(lo), uncut(dkb), uncut(dvb)


# ----------------------------------------------------------------------------- the layer


def multi_head_attention(num_heads: int, *, causal: bool = False, masked: bool = False,
                         lean: bool = False, block_size: int = 128, impl: str = "jnp",
                         pallas_blocks=(64, 64), pallas_interpret=None, w_init="glorot_uniform",
                         b_init="zeros", param_dtype=jnp.float32) -> Layer:
    """Multi-head self-attention over x (N, T, D), with h = ``num_heads`` heads of size d = D/h.

    Params ``{"w_qkv": (D, 3D), "b_qkv": (3D,), "w_o": (D, D), "b_o": (D,)}``; the columns of
    ``w_qkv`` are ``[q | k | v]``, each ``[head 1 | … | head h]`` of d columns.

    Forward (per head, the heads side by side)::

        [Q | K | V] = x W_qkv + b_qkv                                  (N, T, 3D) -> 3 × (N, h, T, d)
        S = Q Kᵀ/√d,  masked entries −∞ (in effect)                   (N, h, T, T)
        P = softmax(S)  over the keys                                  (N, h, T, T)
        O = P V,  heads merged back to (N, T, D)
        y = O W_o + b_o                                                (N, T, D)

    Backward::

        dW_o = Oᵀ dy    db_o = Σ dy    dO = dy W_oᵀ                   (split into heads)
        dV = Pᵀ dO      dP = dO Vᵀ
        dS = P ⊙ (dP − rowsum(dP ⊙ P))                                 the softmax JVP
        dQ = dS K/√d    dK = dSᵀ Q/√d
        d[Q | K | V] -> dW_qkv = xᵀ d[Q|K|V],  db_qkv = Σ d[Q|K|V],  dx = d[Q|K|V] W_qkvᵀ

    ``causal=True``: position i attends to keys j ≤ i only (a language model). ``masked=True``:
    the input is ``(x, mask)`` with mask (N, T) over the keys or (N, T, T) over (query, key)
    pairs, nonzero = may attend; ``dx`` is then ``(dx, None)``. A query with no allowed key
    gets all-zero weights (O = 0 there, so y = b_o).

    ``lean=True`` saves the per-row log-sum-exp L = log Σ_k e^{S_qk} (N, h, T) instead of P:
    the forward is an online softmax over blocks of ``block_size`` keys and the backward
    recomputes P_j = exp(S_j − L) block by block, with rowsum(dP ⊙ P) = rowsum(dO ⊙ O). Memory
    for P goes from O(T²) to O(T · block_size) per head; the result is the same.

    ``impl``: ``"jnp"`` (the default) runs the passes above in jnp; ``"pallas"`` runs the lean
    math as flash-attention kernels (bpjax/kernels/flash.py: one program per block of
    ``pallas_blocks = (B_q, B_k)`` queries or keys, powers of two ≥ 16; the backward's dK, dV
    loop over query blocks and dQ over key blocks), compiled in a program lowered for CUDA and
    interpreted elsewhere; it takes a key mask (N, T) but not a (query, key) one, and a head size
    that is a power of two ≥ 16. ``"auto"``: the kernels for CUDA where they apply, the jnp lean
    passes elsewhere (``lean`` is then implied: both save O and L). ``pallas_interpret=True``
    interprets the kernels on a GPU too (what the checks do). Reverse-mode autodiff of the Pallas
    forward differentiates the plain one.
    """
    name = "multi_head_attention"
    heads = check_positive_int(name, "num_heads", num_heads)
    block = check_positive_int(name, "block_size", block_size)
    if impl not in kernels.ATTENTION_IMPLS:
        raise ValueError(f"{name}: expected impl to be one of {kernels.ATTENTION_IMPLS}, got {impl!r}")
    blocks = _flash.check_blocks(name, pallas_blocks)
    if pallas_interpret not in (None, True, False):
        raise ValueError(f"{name}: expected pallas_interpret to be None, True or False, "
                         f"got {pallas_interpret!r}")
    w_fn = initializers.get(w_init, name)
    b_fn = initializers.get(b_init, name)

    def init(key, in_shape):
        d_model = (in_shape[0] if masked else in_shape)[-1]
        if d_model % heads:
            raise ValueError(f"{name}: expected the model dim x.shape[-1] divisible by num_heads={heads}, "
                             f"got in_shape={tuple(in_shape)}")
        k1, k2, k3, k4 = jax.random.split(key, 4)
        params = {"w_qkv": w_fn(k1, (d_model, 3 * d_model), param_dtype),
                  "b_qkv": b_fn(k2, (3 * d_model,), param_dtype),
                  "w_o": w_fn(k3, (d_model, d_model), param_dtype),
                  "b_o": b_fn(k4, (d_model,), param_dtype)}
        return params, (), (in_shape[0] if masked else in_shape)

    def split_heads(a):                                            # (N, T, D) -> (N, h, T, d)
        n, t, d_model = a.shape
        return a.reshape(n, t, heads, d_model // heads).transpose(0, 2, 1, 3)

    def merge_heads(a):                                            # (N, h, T, d) -> (N, T, D)
        n, _, t, d = a.shape
        return a.transpose(0, 2, 1, 3).reshape(n, t, heads * d)

    def forward(params, state, x, *, key=None, train=True):
        x, mask = x if masked else (x, None)
        t = x.shape[1]
        if mask is not None:                                       # (N, 1, 1|T, T), boolean
            mask = (mask != 0).reshape(mask.shape[0], 1, -1, t)
        qkv = x @ params["w_qkv"] + params["b_qkv"]                # (N, T, 3D)
        q, k, v = (split_heads(a) for a in jnp.split(qkv, 3, axis=-1))     # (N, h, T, d) each
        scale = 1.0 / math.sqrt(q.shape[-1])
        res = {"x": x, "q": q, "k": k, "v": v}
        if mask is not None:
            res["mask"] = mask
        path = kernels.attention_path(impl, lean, q, mask)
        if path == "standard":
            o, p = _attention_forward(q, k, v, _allowed(mask, causal, t, t), scale,
                                      user_mask=mask is not None)
            res["p"] = p                                           # (N, h, T, T)
        else:                                                      # the lean passes, or their kernels
            lean_forward = lambda q, k, v, mask: _lean_forward(q, k, v, mask, causal, scale, min(block, t))  # noqa: E731
            o, lse = kernels.lean_attention_forward(path, lean_forward, q, k, v, mask, causal=causal, scale=scale,
                                                    blocks=blocks, interpret=pallas_interpret)
            res.update(o=o, lse=lse)                               # (N, h, T, d), (N, h, T)
        om = merge_heads(o)                                        # (N, T, D)
        res["om"] = om
        y = om @ params["w_o"] + params["b_o"]                     # (N, T, D)
        return y, state, res

    def backward(params, res, dy):
        x, om = res["x"], res["om"]
        acc = accumulation_dtype(dy.dtype)                         # float32 sums for bfloat16
        dparams = {"w_o": _dot("ntd,nte->de", om, dy, acc),        # (D, D)
                   "b_o": sum_acc(dy, axis=(0, 1))}                # (D,)
        dqkv = qkv_error(params, res, dy)                          # (N, T, 3D)
        dparams["w_qkv"] = _dot("ntd,nte->de", x, dqkv, acc)       # (D, 3D)
        dparams["b_qkv"] = sum_acc(dqkv, axis=(0, 1))              # (3D,)
        dx = dqkv @ params["w_qkv"].T                              # (N, T, D)
        return dparams, ((dx, None) if masked else dx)

    def qkv_error(params, res, dy):
        """d[Q | K | V] from dy, through the output projection and the attention.   (N, T, 3D)"""
        x, q, k, v = res["x"], res["q"], res["k"], res["v"]
        scale = 1.0 / math.sqrt(q.shape[-1])
        do = split_heads(dy @ params["w_o"].T)                     # (N, h, T, d)
        path = kernels.attention_path(impl, lean, q, res.get("mask"))
        if path == "standard":
            dq, dk, dv = _attention_backward(do, q, k, v, res["p"], scale)
        else:
            t = x.shape[1]
            lean_backward = lambda do, q, k, v, o, lse, mask: _lean_backward(  # noqa: E731
                do, q, k, v, o, lse, mask, causal, scale, min(block, t))
            dq, dk, dv = kernels.lean_attention_backward(path, lean_backward, do, q, k, v, res["o"], res["lse"],
                                                         res.get("mask"), causal=causal, scale=scale, blocks=blocks,
                                                         interpret=pallas_interpret)
        return jnp.concatenate([merge_heads(a) for a in (dq, dk, dv)], axis=-1)

    def projections(params, res, dy):
        """The rows of the two projections, for ``per_example="projections"``
        (bpjax/_per_example.py): each example's dW_o = Σ_t om_ntᵀ dy_nt and dW_qkv =
        Σ_t x_ntᵀ d[Q|K|V]_nt, the biases Σ_t of the errors. d[Q|K|V] is the backward's own
        (the same operations on the same arrays, which XLA computes once)."""
        return {"w_o": (res["om"], dy, "b_o"), "w_qkv": (res["x"], qkv_error(params, res, dy), "b_qkv")}

    def check(params, state, x):
        d_model = params["w_o"].shape[0]
        if masked:
            if len(x) != 2:
                raise ValueError(f"{name}: expected x to be the tuple (x, mask), got a tuple of {len(x)} arrays")
            x, mask = x
            check_float_input(name, "x[0]", x)
        if x.ndim != 3 or x.shape[-1] != d_model:
            raise ValueError(f"{name}: expected x.shape == (N, T, {d_model}), got x.shape={tuple(x.shape)}")
        if masked:
            n, t = x.shape[:2]
            if tuple(mask.shape) not in ((n, t), (n, t, t)):
                raise ValueError(f"{name}: expected mask.shape == {(n, t)} (keys) or {(n, t, t)} "
                                 f"(query, key), got mask.shape={tuple(mask.shape)}")
            if impl == "pallas" and mask.ndim == 3:
                raise ValueError(f"{name}: expected a key mask of shape {(n, t)} with impl='pallas' "
                                 f"(its kernels take no (query, key) mask), got mask.shape={tuple(mask.shape)}")
        if impl == "pallas":
            _flash.check_head_size(name, d_model // heads, interpret=pallas_interpret is True)

    if masked:
        return make_layer(name, init, forward, backward, check=check, tuple_input=True,
                          float_input=False, min_ndim=2, per_example="projections", curvature="attention",
                          example_rows=projections)
    return make_layer(name, init, forward, backward, check=check, ndim=3,
                      meaning="(batch, time, features)", per_example="projections", curvature="attention",
                      example_rows=projections)


# ----------------------------------------------------------------------------- transformer block


def transformer_block(num_heads: int, *, mlp_ratio: int = 4, causal: bool = True,
                      lean: bool = False, block_size: int = 128, attention_impl: str = "jnp",
                      eps: float = 1e-5, param_dtype=jnp.float32) -> Layer:
    """A pre-layer-norm transformer block (GPT-2's) over x (N, T, D).

    Params ``{"ln1", "attn", "ln2", "fc", "proj"}``: two :func:`layer_norm`, a
    :func:`multi_head_attention` and the MLP's two :func:`dense` layers, D → ``mlp_ratio``·D → D.

    Forward::

        h = x + attn(ln1(x))                                          (N, T, D)
        y = h + proj(gelu(fc(ln2(h))))                                (N, T, D)

    Backward: each sub-layer's own backward, in reverse order; a residual connection passes
    its gradient through unchanged and adds the branch's::

        dh = dy + ln2ᵀ(fcᵀ(geluᵀ(projᵀ(dy))))                          (N, T, D)
        dx = dh + ln1ᵀ(attnᵀ(dh))                                     (N, T, D)

    (fᵀ is f's backward.) The GELU is the tanh approximation. ``causal``, ``lean``,
    ``block_size`` and ``attention_impl`` (its ``impl``) go to the attention.
    """
    name = "transformer_block"
    heads = check_positive_int(name, "num_heads", num_heads)
    ratio = check_positive_int(name, "mlp_ratio", mlp_ratio)
    if attention_impl not in kernels.ATTENTION_IMPLS:
        raise ValueError(f"{name}: expected attention_impl to be one of {kernels.ATTENTION_IMPLS}, "
                         f"got {attention_impl!r}")

    @functools.lru_cache(maxsize=None)
    def parts(d_model):
        """The sub-layers for model dim D (the MLP's widths depend on it)."""
        return {"ln1": layer_norm(eps, param_dtype=param_dtype),
                "attn": multi_head_attention(heads, causal=causal, lean=lean, block_size=block_size,
                                             impl=attention_impl, param_dtype=param_dtype),
                "ln2": layer_norm(eps, param_dtype=param_dtype),
                "fc": dense(ratio * d_model, param_dtype=param_dtype),
                "act": gelu(approximate=True),
                "proj": dense(d_model, param_dtype=param_dtype)}

    def init(key, in_shape):
        if in_shape[-1] % heads:
            raise ValueError(f"{name}: expected the model dim x.shape[-1] divisible by num_heads={heads}, "
                             f"got in_shape={tuple(in_shape)}")
        f = parts(in_shape[-1])
        keys = dict(zip(["ln1", "attn", "ln2", "fc", "proj"], jax.random.split(key, 5)))
        params = {k: f[k].init(keys[k], in_shape)[0] for k in ("ln1", "attn", "ln2")}
        params["fc"] = f["fc"].init(keys["fc"], in_shape)[0]
        params["proj"] = f["proj"].init(keys["proj"], (*in_shape[:-1], ratio * in_shape[-1]))[0]
        return params, (), in_shape

    def forward(params, state, x, *, key=None, train=True):
        f = parts(x.shape[-1])
        a, _, r_ln1 = f["ln1"].forward(params["ln1"], (), x)                # (N, T, D)
        a, _, r_attn = f["attn"].forward(params["attn"], (), a)             # (N, T, D)
        h = x + a                                                          # residual 1
        b, _, r_ln2 = f["ln2"].forward(params["ln2"], (), h)                # (N, T, D)
        b, _, r_fc = f["fc"].forward(params["fc"], (), b)                   # (N, T, 4D)
        b, _, r_act = f["act"].forward((), (), b)                          # (N, T, 4D)
        b, _, r_proj = f["proj"].forward(params["proj"], (), b)             # (N, T, D)
        y = h + b                                                          # residual 2
        return y, state, {"ln1": r_ln1, "attn": r_attn, "ln2": r_ln2, "fc": r_fc, "act": r_act,
                          "proj": r_proj}

    def backward(params, res, dy):
        f = parts(dy.shape[-1])
        dparams = {}
        dparams["proj"], db = f["proj"].backward(params["proj"], res["proj"], dy)   # (N, T, 4D)
        _, db = f["act"].backward((), res["act"], db)                              # (N, T, 4D)
        dparams["fc"], db = f["fc"].backward(params["fc"], res["fc"], db)          # (N, T, D)
        dparams["ln2"], db = f["ln2"].backward(params["ln2"], res["ln2"], db)      # (N, T, D)
        dh = dy + db                                                               # residual 2
        dparams["attn"], da = f["attn"].backward(params["attn"], res["attn"], dh)  # (N, T, D)
        dparams["ln1"], da = f["ln1"].backward(params["ln1"], res["ln1"], da)      # (N, T, D)
        return dparams, dh + da                                                    # residual 1

    def check(params, state, x):
        d_model = params["ln1"]["scale"].shape[0]
        if x.ndim != 3 or x.shape[-1] != d_model:
            raise ValueError(f"{name}: expected x.shape == (N, T, {d_model}), got x.shape={tuple(x.shape)}")

    return make_layer(name, init, forward, backward, check=check, ndim=3,
                      meaning="(batch, time, features)", per_example="combinator")


# ----------------------------------------------------------------------------- GPT


def gpt(vocab_size: int, *, dim: int, num_heads: int, num_layers: int, max_len: int,
        mlp_ratio: int = 4, lean: bool = False, block_size: int = 128, attention_impl: str = "jnp",
        eps: float = 1e-5, param_dtype=jnp.float32) -> Layer:
    """A GPT-style language model: integer token ids (N, T) to next-token logits (N, T, V).

    Train it with ``bp.softmax_cross_entropy()`` and the ids shifted by one as labels (N, T).

    Params ``{"tok": {"table": E (V, D)}, "pos": P (max_len, D), "blocks": θ, "ln_f": final
    layer-norm params}``, with θ the L blocks' params stacked: each leaf of a
    :func:`transformer_block`'s params with a leading axis L.

    Forward::

        h_0 = E[ids] + P[:T]                                           (N, T, D)
        h_l = block(θ_l, h_{l−1})   for l = 1 … L   (causal; a lax.scan over θ)
        z = ln_f(h_L) Eᵀ                                               (N, T, V)  tied unembedding

    Backward::

        dE_out = Σ_{n,t} dz_ntᵀ ln_f(h_L)_nt     dĥ = dz E                (V, D), (N, T, D)
        dh_L = ln_fᵀ(dĥ)
        (dθ_l, dh_{l−1}) = blockᵀ(θ_l, r_l, dh_l)   for l = L … 1   (a lax.scan in reverse)
        dP[:T] = Σ_n dh_0                       dE_in = scatter-add of dh_0 at ids
        dE = dE_in + dE_out                     (the embedding is used twice: both add)

    (fᵀ is f's backward.) The scans over the blocks compile one block whatever L is.

    ``ids`` have no gradient: ``dx`` is ``None``. ``lean`` and ``block_size`` select the
    attention's memory-lean backward, ``attention_impl`` its ``impl`` ("jnp", "pallas", "auto").
    """
    name = "gpt"
    vocab = check_positive_int(name, "vocab_size", vocab_size)
    dim = check_positive_int(name, "dim", dim)
    n_layers = check_positive_int(name, "num_layers", num_layers)
    max_len = check_positive_int(name, "max_len", max_len)
    heads = check_positive_int(name, "num_heads", num_heads)
    if dim % heads:
        raise ValueError(f"{name}: expected dim divisible by num_heads, got dim={dim}, num_heads={heads}")
    tok = embedding(vocab, dim, table_init=jax.nn.initializers.normal(0.02), param_dtype=param_dtype)
    block = transformer_block(heads, mlp_ratio=mlp_ratio, causal=True, lean=lean,
                              block_size=block_size, attention_impl=attention_impl, eps=eps,
                              param_dtype=param_dtype)
    ln_f = layer_norm(eps, param_dtype=param_dtype)

    def init(key, in_shape):
        k_tok, k_pos, *k_blocks = jax.random.split(key, 2 + n_layers)
        t = in_shape[0]
        params = {"tok": tok.init(k_tok, in_shape)[0],
                  "pos": 0.01 * jax.random.normal(k_pos, (max_len, dim), param_dtype),
                  "blocks": jax.tree_util.tree_map(lambda *a: jnp.stack(a),       # (L, ...) leaves
                                                   *[block.init(k, (t, dim))[0] for k in k_blocks]),
                  "ln_f": ln_f.init(key, (t, dim))[0]}
        return params, (), (t, vocab)

    def forward(params, state, ids, *, key=None, train=True):
        t = ids.shape[1]
        h, _, r_tok = tok.forward(params["tok"], (), ids)                  # (N, T, D)
        h = h + params["pos"][:t]

        def run_block(h, theta):                                           # one block, θ_l
            h, _, r = block.forward(theta, (), h)                          # (N, T, D)
            return h, r

        h, r_blocks = lax.scan(run_block, h, params["blocks"])             # residuals stacked (L, ...)
        hf, _, r_ln = ln_f.forward(params["ln_f"], (), h)                  # (N, T, D)
        logits = hf @ params["tok"]["table"].T                             # (N, T, V)
        return logits, state, {"tok": r_tok, "blocks": r_blocks, "ln_f": r_ln, "hf": hf}

    def backward(params, res, dz):
        table = params["tok"]["table"]                                     # (V, D)
        hf = res["hf"]
        acc = accumulation_dtype(dz.dtype)                                 # float32 sums for bfloat16
        d_table_out = jnp.einsum("ntv,ntd->vd", dz, hf, preferred_element_type=acc)  # (V, D) unembedding's
        dh = dz @ table                                                    # (N, T, D)
        d_ln_f, dh = ln_f.backward(params["ln_f"], res["ln_f"], dh)        # (N, T, D)

        def back_block(dh, theta_and_res):                                 # block l, from L down to 1
            theta, r = theta_and_res
            dtheta, dh = block.backward(theta, r, dh)                      # (N, T, D)
            return dh, dtheta

        dh, d_blocks = lax.scan(back_block, dh, (params["blocks"], res["blocks"]), reverse=True)
        t = dh.shape[1]
        d_pos = jnp.zeros_like(params["pos"], dtype=acc).at[:t].set(sum_acc(dh, axis=0))  # (max_len, D)
        d_tok, _ = tok.backward(params["tok"], res["tok"], dh)             # scatter-add, (V, D)
        d_tok = {"table": d_tok["table"] + d_table_out}                    # tied: both uses add
        return {"tok": d_tok, "pos": d_pos, "blocks": d_blocks, "ln_f": d_ln_f}, None

    def check(params, state, ids):
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"{name}: expected integer token ids, got dtype {jnp.dtype(ids.dtype).name} "
                            "(cast them first, e.g. ids.astype(jnp.int32))")
        if ids.shape[1] > max_len:
            raise ValueError(f"{name}: expected at most max_len={max_len} positions, got ids.shape={tuple(ids.shape)}")

    return make_layer(name, init, forward, backward, check=check, ndim=2, float_input=False,
                      meaning="(batch, time) of integer ids", per_example="gpt")
