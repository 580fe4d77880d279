"""Flash attention as Pallas kernels: the forward and the hand-written backward of
``multi_head_attention(..., impl="pallas")``, for a GPU (Triton) or, with ``interpret=True``,
the CPU.

The math is the memory-lean path's (bpjax/layers/attention.py, ``_lean_forward`` and
``_lean_backward``); here each program of a kernel keeps one block of queries (or keys) in fast
memory and loops over the blocks of the other side, so no (T × T) array exists, not even in
HBM between XLA kernels. Per batch-and-head b, with S = Q Kᵀ · scale masked, blocks of B_q
queries (index i) and B_k keys (index j)::

    forward, program (b, i):   for j:  m' = max(m, rowmax S_ij)
                                       ℓ  = e^{m − m'} ℓ + rowsum e^{S_ij − m'}
                                       A  = e^{m − m'} A + e^{S_ij − m'} V_j        m ← m'
                               O_i = A / ℓ            L_i = m + log ℓ              (B_q, d), (B_q,)
    backward:                  D = rowsum(dO ⊙ O)                                  (T,)
      program (b, j):          for i:  P_ij = exp(S_ij − L_i)   (recomputed, never stored)
                                       dV_j += P_ijᵀ dO_i        dP_ij = dO_i V_jᵀ
                                       dS_ij = P_ij ⊙ (dP_ij − D_i)
                                       dK_j += dS_ijᵀ Q_i · scale
      program (b, i):          for j:  the same P_ij and dS_ij;   dQ_i += dS_ij K_j · scale

Two backward kernels, one per output side, so that every program writes only its own block
(no atomics). Causal attention skips the blocks above the diagonal: the forward and dQ loop
over j up to the query block's last row, dK/dV start at the first query block that can see
key block j.

Masking: a disallowed score (key mask, causal, or a padding key past T) becomes the finite
``finfo.min``, so e^{S − m} is exactly 0 there and no −∞ − (−∞) = NaN can occur. A row with no
allowed key keeps m = finfo.min: it gets O = 0 and L = +∞, so P = e^{S − L} = 0 and no gradient
flows through it. T is padded up to a multiple of both block sides; padded query rows get
L = +∞ in the backward, so they add nothing to dK and dV.

Dtypes: for bfloat16 (or float16) q, k, v every product runs in q's dtype with float32
accumulation (``preferred_element_type``), and m, ℓ, A, L, D, P, dS and the running dQ, dK, dV
are float32; P and dS enter their products in q's dtype. float32 and float64 stay themselves.

GPU lowering (Triton): every block a kernel touches must have power-of-two sides of at least
16 (a tensor-core dot needs 16), so the block sides and the head size d are checked
(:func:`check_blocks`, :func:`check_head_size`); interpret mode takes any head size.
"""
from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .._core import accumulation_dtype

__all__ = ["flash_forward", "flash_backward", "check_blocks", "check_head_size", "lowers"]


def lowers(q, mask) -> bool:
    """Whether the GPU lowering takes these inputs: q (N, h, T, d) in a 16-bit float or float32
    with d a power of two ≥ 16, and no mask or a key mask (N, 1, 1, T)."""
    return (q.dtype in (jnp.bfloat16, jnp.float16, jnp.float32) and _power_of_two_16(q.shape[-1])
            and (mask is None or mask.shape[2] == 1))


def _power_of_two_16(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 16 and n & (n - 1) == 0


def check_blocks(name: str, blocks) -> tuple:
    """``blocks`` = (B_q, B_k) as a tuple of ints, or a one-sentence ValueError."""
    ok = isinstance(blocks, (tuple, list)) and len(blocks) == 2 and all(map(_power_of_two_16, blocks))
    if not ok:
        raise ValueError(f"{name}: expected pallas_blocks to be two powers of two ≥ 16 (query, key), "
                         f"as the GPU lowering requires, got {blocks!r}")
    return tuple(blocks)


def check_head_size(name: str, d: int, *, interpret: bool) -> None:
    """Compiled, the head size is a block side too: a power of two ≥ 16 (e.g. 64 or 128). A program
    with compiled kernels may be lowered for CUDA, so the rule holds unless ``interpret``."""
    if not interpret and not _power_of_two_16(d):
        raise ValueError(f"{name}: expected a head size D/num_heads that is a power of two ≥ 16 for "
                         f"impl='pallas' (a block side of the compiled kernels; pallas_interpret=True "
                         f"takes any), got {d}")


# ----------------------------------------------------------------------------- inside a kernel
#
# Tiles are 2-D: q (B_q, d), k and v (B_k, d), scores (B_q, B_k). ``rows`` and ``cols`` are the
# tile's query and key positions.


def _dot(a, b, acc):                                # a b         (m, k) (k, n) -> (m, n)
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=acc)


def _dot_t(a, b, acc):                              # a bᵀ        (m, k) (n, k) -> (m, n)
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=acc)


def _t_dot(a, b, acc):                              # aᵀ b        (k, m) (k, n) -> (m, n)
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=acc)


def _scores(q, k, rows, cols, key_ok, *, t, padded, causal, scale, acc):
    """S = q kᵀ · scale (B_q, B_k) in ``acc``, disallowed entries set to finfo(acc).min."""
    s = _dot_t(q, k, acc) * scale                                  # (B_q, B_k)
    rules = []
    if padded:
        rules.append((cols < t)[None, :])                          # keys past T
    if key_ok is not None:
        rules.append(key_ok[None, :])                              # the key mask
    if causal:
        rules.append(cols[None, :] <= rows[:, None])               # no looking ahead
    if not rules:
        return s
    return jnp.where(functools.reduce(operator.and_, rules), s, jnp.finfo(acc).min)


def _causal_key_blocks(i, bq, bk):
    """Key blocks 0 … n−1 hold every key a causal query block i can see: n = ⌈(i+1)·B_q / B_k⌉."""
    return _div((i + 1) * bq + bk - 1, bk)


def _div(a, b: int):
    """a // b for a traced int32 ``a`` (lax.div: what the Triton lowering takes)."""
    return lax.div(a, jnp.asarray(b, a.dtype))


def _forward_kernel(q_ref, k_ref, v_ref, *refs, cfg):
    """Program (b, i): O_i and L_i by the online softmax over key blocks j."""
    mask_ref, o_ref, lse_ref = refs if cfg["masked"] else (None, *refs)
    bq, bk, acc = cfg["bq"], cfg["bk"], cfg["acc"]
    i = pl.program_id(1)
    q = q_ref[...]                                                 # (B_q, d)
    rows = i * bq + jnp.arange(bq)

    def step(j, carry):
        m, l, a = carry                                            # (B_q,), (B_q,), (B_q, d)
        cols = j * bk + jnp.arange(bk)
        key_ok = None if mask_ref is None else mask_ref[pl.ds(j * bk, bk)] != 0
        k = k_ref[pl.ds(j * bk, bk), :]                            # (B_k, d)
        v = v_ref[pl.ds(j * bk, bk), :]                            # (B_k, d)
        s = _scores(q, k, rows, cols, key_ok, **cfg["score"])      # (B_q, B_k)
        m_new = jnp.maximum(m, s.max(axis=1))
        rescale = jnp.exp(m - m_new)                               # the old sums' new scale
        p = jnp.exp(s - m_new[:, None])                            # (B_q, B_k)
        l = rescale * l + p.sum(axis=1)
        a = rescale[:, None] * a + _dot(p.astype(v.dtype), v, acc)
        return m_new, l, a

    floor = jnp.finfo(acc).min
    init = (jnp.full((bq,), floor, acc), jnp.zeros((bq,), acc), jnp.zeros(q.shape, acc))
    n_k = _causal_key_blocks(i, bq, bk) if cfg["score"]["causal"] else cfg["t_pad"] // bk
    m, l, a = lax.fori_loop(0, n_k, step, init)
    has_key = m > floor                                            # a row with an allowed key
    o_ref[...] = jnp.where(has_key[:, None], a / l[:, None], 0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has_key, m + jnp.log(l), jnp.inf)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg):
    """Program (b, j): dK_j and dV_j, looping over the query blocks i."""
    mask_ref, dk_ref, dv_ref = refs if cfg["masked"] else (None, *refs)
    bq, bk, acc = cfg["bq"], cfg["bk"], cfg["acc"]
    j = pl.program_id(1)
    k, v = k_ref[...], v_ref[...]                                  # (B_k, d)
    cols = j * bk + jnp.arange(bk)
    key_ok = None if mask_ref is None else mask_ref[...] != 0

    def step(i, carry):
        dk, dv = carry                                             # (B_k, d) each
        q = q_ref[pl.ds(i * bq, bq), :]                            # (B_q, d)
        do = do_ref[pl.ds(i * bq, bq), :]                          # (B_q, d)
        rows = i * bq + jnp.arange(bq)
        s = _scores(q, k, rows, cols, key_ok, **cfg["score"])      # (B_q, B_k)
        p = jnp.exp(s - lse_ref[pl.ds(i * bq, bq)][:, None])       # P_ij, recomputed
        dv = dv + _t_dot(p.astype(do.dtype), do, acc)              # P_ijᵀ dO_i
        dp = _dot_t(do, v, acc)                                    # (B_q, B_k)
        ds = p * (dp - delta_ref[pl.ds(i * bq, bq)][:, None])      # (B_q, B_k)
        dk = dk + _t_dot(ds.astype(q.dtype), q, acc)               # dS_ijᵀ Q_i
        return dk, dv

    first = _div(j * bk, bq) if cfg["score"]["causal"] else 0   # query blocks that see block j
    zeros = jnp.zeros(k.shape, acc)
    dk, dv = lax.fori_loop(first, cfg["t_pad"] // bq, step, (zeros, zeros))
    dk_ref[...] = (dk * cfg["score"]["scale"]).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg):
    """Program (b, i): dQ_i, looping over the key blocks j."""
    mask_ref, dq_ref = refs if cfg["masked"] else (None, *refs)
    bq, bk, acc = cfg["bq"], cfg["bk"], cfg["acc"]
    i = pl.program_id(1)
    q, do = q_ref[...], do_ref[...]                                # (B_q, d)
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]    # (B_q, 1)
    rows = i * bq + jnp.arange(bq)

    def step(j, dq):
        cols = j * bk + jnp.arange(bk)
        key_ok = None if mask_ref is None else mask_ref[pl.ds(j * bk, bk)] != 0
        k = k_ref[pl.ds(j * bk, bk), :]                            # (B_k, d)
        v = v_ref[pl.ds(j * bk, bk), :]
        s = _scores(q, k, rows, cols, key_ok, **cfg["score"])      # (B_q, B_k)
        p = jnp.exp(s - lse)                                       # P_ij, recomputed
        ds = p * (_dot_t(do, v, acc) - delta)                      # (B_q, B_k)
        return dq + _dot(ds.astype(k.dtype), k, acc)               # dS_ij K_j

    n_k = _causal_key_blocks(i, bq, bk) if cfg["score"]["causal"] else cfg["t_pad"] // bk
    dq = lax.fori_loop(0, n_k, step, jnp.zeros(q.shape, acc))
    dq_ref[...] = (dq * cfg["score"]["scale"]).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- the calls
#
# The layer's arrays are (N, h, T, d); the kernels see (N·h, T_pad, d), one grid row per
# batch-and-head b, and the key mask (N, T_pad) as int32 (row b // h).


def _layout(q, blocks):
    """(B_q, B_k, T_pad): the block sides, shrunk to the smallest power of two ≥ 16 that holds T
    when T is shorter, and T rounded up to a multiple of both."""
    t = q.shape[2]
    fit = max(16, pl.next_power_of_2(t))
    bq, bk = min(blocks[0], fit), min(blocks[1], fit)
    step = max(bq, bk)
    return bq, bk, -(-t // step) * step


def _config(q, blocks, causal, scale, masked):
    bq, bk, t_pad = _layout(q, blocks)
    acc = accumulation_dtype(q.dtype)
    t = q.shape[2]
    return {"bq": bq, "bk": bk, "t_pad": t_pad, "acc": acc, "masked": masked,
            "score": dict(t=t, padded=t_pad > t, causal=causal, scale=scale, acc=acc)}


def _to_kernel(a, t_pad, fill=0):
    """(N, h, T, ·) -> (N·h, T_pad, ·), padded with ``fill``; (N, h, T) -> (N·h, T_pad)."""
    a = a.reshape(-1, *a.shape[2:])
    pad = [(0, 0), (0, t_pad - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
    return jnp.pad(a, pad, constant_values=fill)


def _key_mask(mask, t_pad):
    """The layer's key mask (N, 1, 1, T) boolean -> (N, T_pad) int32, 0 on the padding."""
    m = mask.reshape(mask.shape[0], -1).astype(jnp.int32)
    return jnp.pad(m, [(0, 0), (0, t_pad - m.shape[1])])


def _call(kernel, cfg, grid, in_specs, out_specs, out_shape, interpret, name):
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton
        params = pl_triton.CompilerParams(num_warps=4, num_stages=2)
    return pl.pallas_call(functools.partial(kernel, cfg=cfg), grid=grid, in_specs=in_specs,
                          out_specs=out_specs, out_shape=out_shape, interpret=interpret,
                          compiler_params=params, name=name)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "blocks", "interpret"))
def flash_forward(q, k, v, mask, *, causal, scale, blocks, interpret: bool):
    """O = softmax(S) V and L = log Σ_k e^{S} (+∞ for a row with no allowed key).

    q, k, v (N, h, T, d); ``mask`` None or the keys' (N, 1, 1, T) boolean. Returns O (N, h, T, d)
    in q's dtype and L (N, h, T) in ``accumulation_dtype(q.dtype)``. ``interpret``: the kernels
    interpreted (any platform) or compiled (Triton, CUDA); ``bpjax.kernels`` chooses per platform."""
    n, h, t, d = q.shape
    cfg = _config(q, blocks, causal, scale, mask is not None)
    bq, t_pad = cfg["bq"], cfg["t_pad"]
    args = [_to_kernel(a, t_pad) for a in (q, k, v)]               # (N·h, T_pad, d)
    in_specs = [pl.BlockSpec((None, bq, d), lambda b, i: (b, i, 0)),
                pl.BlockSpec((None, t_pad, d), lambda b, i: (b, 0, 0)),
                pl.BlockSpec((None, t_pad, d), lambda b, i: (b, 0, 0))]
    if mask is not None:
        args.append(_key_mask(mask, t_pad))                        # (N, T_pad)
        in_specs.append(pl.BlockSpec((None, t_pad), lambda b, i: (_div(b, h), 0)))
    o, lse = _call(_forward_kernel, cfg, (n * h, t_pad // bq), in_specs,
                   [pl.BlockSpec((None, bq, d), lambda b, i: (b, i, 0)),
                    pl.BlockSpec((None, bq), lambda b, i: (b, i))],
                   [jax.ShapeDtypeStruct(args[0].shape, q.dtype),
                    jax.ShapeDtypeStruct(args[0].shape[:2], cfg["acc"])],
                   interpret, "bpjax_flash_forward")(*args)
    return o[:, :t].reshape(q.shape), lse[:, :t].reshape(n, h, t)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "blocks", "interpret"))
def flash_backward(do, q, k, v, o, lse, mask, *, causal, scale, blocks, interpret: bool):
    """dQ, dK, dV (N, h, T, d each, in q's dtype) from dO and the forward's O and L.

    D = rowsum(dO ⊙ O) is one fused XLA reduction here; the dK/dV kernel (grid over key
    blocks) and the dQ kernel (grid over query blocks) recompute P from L."""
    n, h, t, d = q.shape
    cfg = _config(q, blocks, causal, scale, mask is not None)
    bq, bk, t_pad, acc = cfg["bq"], cfg["bk"], cfg["t_pad"], cfg["acc"]
    delta = jnp.sum(do.astype(acc) * o.astype(acc), axis=-1)       # D (N, h, T)
    qp, kp, vp, dop = (_to_kernel(a, t_pad) for a in (q, k, v, do))       # (N·h, T_pad, d)
    lse_p = _to_kernel(lse, t_pad, fill=jnp.inf)                   # padded rows: P = 0
    delta_p = _to_kernel(delta, t_pad)                             # (N·h, T_pad)
    args = [qp, kp, vp, dop, lse_p, delta_p]
    whole = pl.BlockSpec((None, t_pad, d), lambda b, x: (b, 0, 0))
    whole_row = pl.BlockSpec((None, t_pad), lambda b, x: (b, 0))
    q_block = pl.BlockSpec((None, bq, d), lambda b, i: (b, i, 0))
    k_block = pl.BlockSpec((None, bk, d), lambda b, j: (b, j, 0))
    q_row = pl.BlockSpec((None, bq), lambda b, i: (b, i))
    mask_specs = []
    if mask is not None:
        args.append(_key_mask(mask, t_pad))
        mask_specs = [pl.BlockSpec((None, bk), lambda b, j: (_div(b, h), j)),     # dK/dV: block j
                      pl.BlockSpec((None, t_pad), lambda b, i: (_div(b, h), 0))]  # dQ: every key
    out = jax.ShapeDtypeStruct(qp.shape, q.dtype)
    dk, dv = _call(_dkv_kernel, cfg, (n * h, t_pad // bk),
                   [whole, k_block, k_block, whole, whole_row, whole_row] + mask_specs[:1],
                   [k_block, k_block], [out, out], interpret, "bpjax_flash_dkv")(*args)
    dq = _call(_dq_kernel, cfg, (n * h, t_pad // bq),
               [q_block, whole, whole, q_block, q_row, q_row] + mask_specs[1:],
               q_block, out, interpret, "bpjax_flash_dq")(*args)
    return tuple(a[:, :t].reshape(q.shape) for a in (dq, dk, dv))
