"""Sampling from a :func:`bpjax.gpt`: an incremental decoder with a key/value cache, forward only.

Re-running the whole model for every new token costs O(T) positions per token; with the keys
and values of the positions already seen kept in a cache, each new token costs one position
(its own q, k, v against the cached ones). The decoder runs the model's own layers — the same
:func:`bpjax.layer_norm` (same ε), :func:`bpjax.dense` and tanh :func:`bpjax.gelu`, the
attention's q/k/v split, scale 1/√d and masking — so its logits equal ``model.forward``'s.

Shapes: N prompts, T0 prompt positions, V vocabulary, D width, L blocks, H heads, d = D/H,
``max_len`` the rows of the params' position table ``pos``. The cache is one array for the
keys and one for the values, each (L, N, H, max_len, d): the layer axis leads, like the
blocks' stacked params, so block l's slice is contiguous. The ``lax.scan`` over blocks carries
the whole cache and block l writes its S new rows into it with ``dynamic_update_slice``, which
XLA does in place (handing each layer's slice in and out of the scan instead copied the cache
every step: half the speed, scripts/benchmarks/generate_bench.py). Position
j of the cache is used by queries at positions ≥ j only once it is written (a position mask),
so the unwritten rows (zeros) never count.

``generate`` prefills the prompt in one pass, then samples one token per step in a
``lax.fori_loop``; ``cached_logits`` feeds a given sequence through the same cache step by
step (teacher-forced), for checking the decoder against the full forward. ``filter_logits`` is
the top-k / top-p (nucleus) filter the sampler applies.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from .._checks import check_positive_int, check_real
from .._core import accumulation_dtype
from ..layers.basic import dense, gelu
from ..layers.norm import layer_norm

__all__ = ["cached_logits", "filter_logits", "generate"]


# ----------------------------------------------------------------------------- the cached model


def _sizes(params, num_heads):
    """(V, D, L, H, d, max_len) read from a gpt's params; H from the caller (it is not in them)."""
    vocab, dim = params["tok"]["table"].shape
    max_len = params["pos"].shape[0]
    layers = params["blocks"]["ln1"]["scale"].shape[0]
    if dim % num_heads:
        raise ValueError(f"generate: expected num_heads to divide the model width D={dim}, got num_heads={num_heads}")
    return vocab, dim, layers, num_heads, dim // num_heads, max_len


def empty_cache(params, batch: int, *, num_heads: int):
    """Zero key and value caches for ``batch`` sequences: each (L, N, H, max_len, d), in the
    params' dtype (the dtype the model's k and v have)."""
    _, _, layers, heads, d, max_len = _sizes(params, num_heads)
    shape = (layers, batch, heads, max_len, d)
    dtype = params["blocks"]["attn"]["w_qkv"].dtype
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


@functools.cache
def _layers(eps: float, hidden: int, dim: int):
    """The model's own sub-layers (their forwards only), for layer-norm ε and MLP widths
    D → hidden → D: the same math as :func:`bpjax.transformer_block`."""
    return {"ln": layer_norm(eps), "fc": dense(hidden), "act": gelu(approximate=True), "proj": dense(dim)}


def decode_chunk(params, cache, ids, start, *, num_heads: int, eps: float = 1e-5):
    """Run S new positions ``start … start+S−1`` through the model against the cache.

    ``ids`` (N, S) integer tokens, ``start`` a (traced) int scalar, ``cache`` the pair (K, V),
    each (L, N, H, max_len, d). Returns the logits (N, S, V) and the cache with rows
    ``start … start+S−1`` of every layer written. Per block::

        a = ln1(h);  [q | k | v] = a W_qkv + b_qkv                   (N, S, 3D) -> (N, H, S, d)
        K[:, :, start:start+S] = k;  V[…] = v                         the cache, (N, H, max_len, d)
        s = q Kᵀ/√d,  masked where key j > start + i (causal, and unwritten rows)
        h = h + merge(softmax(s) V) W_o + b_o
        h = h + proj(gelu(fc(ln2(h))))

    The prefill is one call with S = T0, each decoding step one with S = 1: one function, so
    prompt and steps share the same arithmetic.
    """
    _vocab, dim, _, heads, d, max_len = _sizes(params, num_heads)
    f = _layers(eps, params["blocks"]["fc"]["w"].shape[-1], dim)
    n, s_len = ids.shape
    start = jnp.asarray(start, jnp.int32)                              # int64 under x64 otherwise
    zero = jnp.int32(0)
    h = params["tok"]["table"][ids] + lax.dynamic_slice_in_dim(params["pos"], start, s_len, 0)  # (N, S, D)
    scale = 1.0 / math.sqrt(d)
    qi = start + lax.broadcasted_iota(jnp.int32, (s_len, max_len), 0)
    kj = lax.broadcasted_iota(jnp.int32, (s_len, max_len), 1)
    allowed = kj <= qi                                                 # (S, max_len): seen, and written

    def heads_of(a):                                                   # (N, S, D) -> (N, H, S, d)
        return a.reshape(n, s_len, heads, d).transpose(0, 2, 1, 3)

    def block(carry, theta_and_layer):
        h, (k_all, v_all) = carry                                      # the whole cache, updated in place
        theta, layer = theta_and_layer
        attn = theta["attn"]
        a = f["ln"].forward(theta["ln1"], (), h)[0]                    # (N, S, D)
        qkv = a @ attn["w_qkv"] + attn["b_qkv"]                        # (N, S, 3D)
        q, k, v = (heads_of(x) for x in jnp.split(qkv, 3, axis=-1))     # (N, H, S, d)
        at = (layer, zero, zero, start, zero)
        k_all = lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), at)
        v_all = lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), at)
        k_cache = lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False)   # (N, H, max_len, d)
        v_cache = lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False)
        acc = accumulation_dtype(q.dtype)
        s = jnp.einsum("nhqd,nhkd->nhqk", q, k_cache, preferred_element_type=acc) * scale  # (N, H, S, max_len)
        s = jnp.where(allowed, s, jnp.finfo(s.dtype).min)
        p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
        o = jnp.einsum("nhqk,nhkd->nhqd", p, v_cache, preferred_element_type=acc).astype(q.dtype)
        om = o.transpose(0, 2, 1, 3).reshape(n, s_len, dim)            # (N, S, D)
        h = h + (om @ attn["w_o"] + attn["b_o"])
        b = f["ln"].forward(theta["ln2"], (), h)[0]
        b = f["fc"].forward(theta["fc"], (), b)[0]                     # (N, S, hidden)
        b = f["act"].forward((), (), b)[0]
        h = h + f["proj"].forward(theta["proj"], (), b)[0]             # (N, S, D)
        return (h, (k_all, v_all)), None

    layers = params["blocks"]["ln1"]["scale"].shape[0]
    (h, cache), _ = lax.scan(block, (h, cache), (params["blocks"], jnp.arange(layers, dtype=jnp.int32)))
    hf = f["ln"].forward(params["ln_f"], (), h)[0]                     # (N, S, D)
    return hf @ params["tok"]["table"].T, cache                        # (N, S, V) tied unembedding


# ----------------------------------------------------------------------------- sampling


def filter_logits(logits, *, top_k: int | None = None, top_p: float | None = None):
    """Logits (..., V) with the tokens outside the top-k and then outside the top-p nucleus set
    to −inf, so that a softmax over the result gives them probability 0.

    top-k keeps the k largest logits (ties with the k-th are kept too); top-p keeps the smallest
    set of the largest-probability tokens whose probabilities sum to at least p (token i is kept
    when the mass of the tokens ranked before it is < p, so the most likely one always is), the
    probabilities being the softmax of what top-k kept. Options as in :func:`generate`.
    """
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    if top_k is not None:
        kth = lax.top_k(logits, top_k)[0][..., -1:]                    # (..., 1) the k-th largest
        logits = jnp.where(logits >= kth, logits, neg)
    if top_p is not None:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]                 # (..., V) largest first
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs                    # mass ranked before each
        kept = before < top_p
        cutoff = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)   # smallest kept
        logits = jnp.where(logits >= cutoff, logits, neg)
    return logits


def _sample(logits, key, temperature, top_k, top_p):
    """One token per row from logits (N, V): argmax at temperature 0, else a draw from
    softmax(filter(logits / temperature)).   (N,) int32"""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    z = filter_logits(logits.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


def _check_options(params, prompt_ids, num_heads, steps, temperature, top_k, top_p, eps):
    name = "generate"
    heads = check_positive_int(name, "num_heads", num_heads)
    steps = check_positive_int(name, "steps", steps)
    temperature = check_real(name, "temperature", temperature)
    if temperature < 0:
        raise ValueError(f"{name}: expected temperature >= 0 (0 is greedy), got {temperature!r}")
    vocab, _, _, _, _, max_len = _sizes(params, heads)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab):
        raise ValueError(f"{name}: expected top_k to be None or an integer in [1, V={vocab}], got {top_k!r}")
    if top_p is not None:
        top_p = check_real(name, "top_p", top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"{name}: expected top_p to be None or in (0, 1], got {top_p!r}")
    eps = check_real(name, "eps", eps)
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1 or not jnp.issubdtype(prompt_ids.dtype, jnp.integer):
        raise ValueError(f"{name}: expected prompt_ids to be integer ids of shape (N, T0) with T0 >= 1, "
                         f"got shape {tuple(prompt_ids.shape)} and dtype {jnp.dtype(prompt_ids.dtype).name}")
    t0 = prompt_ids.shape[1]
    if t0 + steps > max_len:
        raise ValueError(f"{name}: expected T0 + steps <= max_len={max_len} (the rows of params['pos']), "
                         f"got T0={t0} + steps={steps} = {t0 + steps}")
    return heads, steps, temperature, top_k, top_p, eps


@functools.partial(jax.jit, static_argnames=("num_heads", "steps", "temperature", "top_k", "top_p", "eps"))
def _generate(params, prompt_ids, key, *, num_heads, steps, temperature, top_k, top_p, eps):
    n, t0 = prompt_ids.shape
    cache = empty_cache(params, n, num_heads=num_heads)
    logits, cache = decode_chunk(params, cache, prompt_ids, jnp.int32(0), num_heads=num_heads, eps=eps)
    first = _sample(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_k, top_p)     # (N,)
    out = jnp.zeros((n, steps), jnp.int32).at[:, 0].set(first)

    def step(i, carry):                                                # token i from token i − 1
        out, cache = carry
        prev = lax.dynamic_slice_in_dim(out, i - 1, 1, 1)              # (N, 1)
        logits, cache = decode_chunk(params, cache, prev, t0 + i - 1, num_heads=num_heads, eps=eps)
        tok = _sample(logits[:, 0], jax.random.fold_in(key, i), temperature, top_k, top_p)
        return lax.dynamic_update_slice_in_dim(out, tok[:, None], i, 1), cache

    out, _ = lax.fori_loop(1, steps, step, (out, cache))
    return jnp.concatenate([prompt_ids.astype(jnp.int32), out], axis=1)


def generate(params, prompt_ids, *, num_heads: int, steps: int, key=None, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eps: float = 1e-5):
    """Continue each prompt by ``steps`` tokens sampled from a :func:`bpjax.gpt`'s params.

    ``prompt_ids`` (N, T0) integer ids; returns (N, T0 + steps) int32, the prompts then their
    continuations. V, D, L and ``max_len`` are read from the params' shapes; ``num_heads`` and
    ``eps`` (layer norm's ε) must be the model's. One compiled program (jitted, cached by the
    static options): a prefill of the prompt, then a ``lax.fori_loop`` of single-token steps
    over the fixed-size key/value cache (module docstring), so a step costs one position, not
    T.

    ``temperature`` 0 is greedy (argmax; ``key``, ``top_k``, ``top_p`` unused), else the logits
    are divided by it, filtered by :func:`filter_logits` (``top_k`` in [1, V], ``top_p`` in
    (0, 1]) and sampled with ``key`` (step i uses ``fold_in(key, i)``). Raises ``ValueError``
    for a bad option and for T0 + steps > max_len (the position table has no rows beyond).
    """
    prompt_ids = jnp.asarray(prompt_ids)
    heads, steps, temperature, top_k, top_p, eps = _check_options(
        params, prompt_ids, num_heads, steps, temperature, top_k, top_p, eps)
    if key is None:
        if temperature != 0:
            raise ValueError("generate: expected a PRNG key for temperature > 0, got key=None")
        key = jax.random.PRNGKey(0)
    return _generate(params, prompt_ids, key, num_heads=heads, steps=steps, temperature=temperature,
                     top_k=top_k, top_p=top_p, eps=eps)


@functools.partial(jax.jit, static_argnames=("num_heads", "prefill", "eps"))
def _cached_logits(params, ids, *, num_heads, prefill, eps):
    n, t = ids.shape
    cache = empty_cache(params, n, num_heads=num_heads)
    first, cache = decode_chunk(params, cache, ids[:, :prefill], jnp.int32(0), num_heads=num_heads, eps=eps)

    def step(cache, i):                                                # position i, alone
        logits, cache = decode_chunk(params, cache, lax.dynamic_slice_in_dim(ids, i, 1, 1), i,
                                     num_heads=num_heads, eps=eps)
        return cache, logits[:, 0]                                     # (N, V)

    _, rest = lax.scan(step, cache, jnp.arange(prefill, t, dtype=jnp.int32))   # (T − prefill, N, V)
    return jnp.concatenate([first, rest.transpose(1, 0, 2)], axis=1)


def cached_logits(params, ids, *, num_heads: int, prefill: int = 1, eps: float = 1e-5):
    """The cached decoder's logits (N, T, V) for a given sequence ``ids`` (N, T), teacher-forced:
    the first ``prefill`` positions in one pass, then one position per step through the cache,
    exactly as :func:`generate` runs. For checking the decoder: they should equal
    ``model.forward(params, (), ids)[0]``.
    """
    ids = jnp.asarray(ids)
    heads = check_positive_int("cached_logits", "num_heads", num_heads)
    _, _, _, _, _, max_len = _sizes(params, heads)
    t = ids.shape[1] if ids.ndim == 2 else 0
    if ids.ndim != 2 or not 1 <= t <= max_len or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"cached_logits: expected integer ids of shape (N, T) with 1 <= T <= max_len={max_len}, "
                         f"got shape {tuple(ids.shape)} and dtype {jnp.dtype(ids.dtype).name}")
    if not isinstance(prefill, int) or not 1 <= prefill <= t:
        raise ValueError(f"cached_logits: expected prefill to be an integer in [1, T={t}], got {prefill!r}")
    return _cached_logits(params, ids, num_heads=heads, prefill=prefill, eps=check_real("cached_logits", "eps", eps))
