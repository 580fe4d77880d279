"""DP-SGD's gradient: each example's gradient clipped to norm C, summed, Gaussian noise added,
on fixed batches (:func:`dp_forward_backward`) or on Poisson-sampled ones taken in padded
physical batches (:func:`poisson_dp_grad`); and the options that choose it (:class:`DPSGD`)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from .. import _checks
from .._per_example import AUTO_GAMMA, CLIP_MODES, _check_microbatch, _clipped, check_clip
from .accounting import ACCOUNTANTS
from .sampling import SAMPLERS

__all__ = ["DPSGD", "check_dp", "check_dpsgd", "dp_forward_backward", "poisson_dp_grad", "NOISE_STREAM", "NOT_A_GUARANTEE"]


class DPSGD(NamedTuple):
    """DP-SGD's options, as ``fit(..., dp=...)`` takes them (a plain ``(C, σ, δ)`` gives the
    defaults of the rest; :func:`check_dpsgd` checks them).

    clip: C, each example's gradient is clipped to norm at most C (``--dp-clip``); with
      ``clip_mode="per-layer"`` C is split equally over the L layers with params, C/√L each, or
      ``clip`` is L thresholds (forward order) or a mapping {layer path: C_l}.
    noise: σ, the noise multiplier: Gaussian noise of std σ·S on the sum (``--dp-noise``), S the
      sensitivity of the clipped sum: C (flat, automatic, per-layer's equal split), √(Σ_l C_l²).
    delta: δ, at which ε is reported (``--dp-delta``).
    sampling: "poisson" (each example joins each step with probability q = B/n) or "shuffle"
      (the epoch's shuffled order cut into batches of B; ε is then not a guarantee).
    accountant: "rdp" or "pld", dp-accounting's accountant for ε (``--dp-accountant``).
    physical_batch: P, rows per physical batch under Poisson sampling (``None``: the default of
      :func:`bpjax.privacy.default_physical_batch`).
    clip_mode: "flat", "per-layer" or "automatic" (``--dp-clip-mode``; :func:`bpjax.clipped_grad`).
    microbatch: m, rows per backward (``--dp-microbatch``; ``None``: the whole batch at once); it
      bounds memory only, the gradient is the same. It must divide the batch (shuffle) or the
      physical batch (Poisson).
    """
    clip: float
    noise: float
    delta: float = 1e-5
    sampling: str = "poisson"
    accountant: str = "rdp"
    physical_batch: Optional[int] = None
    clip_mode: str = "flat"
    microbatch: Optional[int] = None


def check_dp(clip: float, noise: float, delta: float) -> tuple:
    """``(C, σ, δ)`` as floats, or ``ValueError`` naming the one that is wrong."""
    clip = _checks.check_real("dp-sgd", "--dp-clip", clip)
    noise = _checks.check_real("dp-sgd", "--dp-noise", noise)
    delta = _checks.check_real("dp-sgd", "--dp-delta", delta)
    if clip <= 0:
        raise ValueError(f"dp-sgd: expected --dp-clip > 0, got {clip:g}")
    if noise < 0:
        raise ValueError(f"dp-sgd: expected --dp-noise >= 0, got {noise:g}")
    if not 0 < delta < 1:
        raise ValueError(f"dp-sgd: expected --dp-delta in (0, 1), got {delta:g}")
    return clip, noise, delta


def check_dpsgd(dp) -> DPSGD:
    """``dp`` (a :class:`DPSGD`, or a tuple of its first fields, e.g. ``(C, σ, δ)``) as a
    :class:`DPSGD`, or ``ValueError`` naming the option that is wrong."""
    dp = DPSGD(*dp)
    if dp.clip_mode not in CLIP_MODES:
        raise ValueError(f"dp-sgd: expected --dp-clip-mode to be one of {', '.join(CLIP_MODES)}, got {dp.clip_mode!r}")
    if dp.clip_mode == "per-layer" and not isinstance(dp.clip, (int, float)):
        clip, _ = check_clip("dp-sgd", dp.clip, "per-layer", option="--dp-clip")
        _, noise, delta = check_dp(1.0, dp.noise, dp.delta)
    else:
        clip, noise, delta = check_dp(dp.clip, dp.noise, dp.delta)
    if dp.sampling not in SAMPLERS:
        raise ValueError(f"dp-sgd: expected --dp-sampling to be one of {', '.join(SAMPLERS)}, got {dp.sampling!r}")
    if dp.accountant not in ACCOUNTANTS:
        raise ValueError(f"dp-sgd: expected --dp-accountant to be one of {', '.join(ACCOUNTANTS)}, "
                         f"got {dp.accountant!r}")
    physical = dp.physical_batch
    if physical is not None and (isinstance(physical, bool) or int(physical) != physical or physical < 1):
        raise ValueError(f"dp-sgd: expected --dp-physical-batch to be an integer >= 1, got {physical!r}")
    if physical is not None and dp.sampling != "poisson":
        raise ValueError(f"dp-sgd: expected --dp-physical-batch only with --dp-sampling poisson (shuffled batches "
                         f"are whole), got --dp-sampling {dp.sampling}")
    micro = _check_microbatch("dp-sgd", dp.microbatch, "--dp-microbatch")
    physical = None if physical is None else int(physical)
    if micro is not None and physical is not None and physical % micro:
        raise ValueError(f"dp-sgd: expected --dp-microbatch to divide --dp-physical-batch {physical}, got {micro}")
    return DPSGD(clip, noise, delta, dp.sampling, dp.accountant, physical, dp.clip_mode, micro)


#: What a run with ``--dp-sampling shuffle`` says of its ε, in its output and summary.json.
NOT_A_GUARANTEE = ("epsilon is not a guarantee for this run: its batches were cut from each epoch's shuffled "
                   "order (--dp-sampling shuffle), and epsilon was computed as if each example had been "
                   "Poisson-sampled at rate batch/n")


def _clipped_and_sensitivity(model, loss, clip, mode: str, microbatch):
    """:func:`bpjax._per_example._clipped` for these options, and S, the clipped sum's sensitivity."""
    clip, sensitivity = check_clip("dp-sgd", clip, mode, option="--dp-clip")
    return _clipped(model, loss, clip, mode=mode, gamma=AUTO_GAMMA, microbatch=microbatch), sensitivity


def dp_forward_backward(model, loss, clip, noise: float, *, mode: str = "flat", microbatch: Optional[int] = None):
    """DP-SGD's gradient on a fixed batch of B (``--dp-sampling shuffle``), with
    :func:`bpjax._grad.forward_backward`'s signature (for the training step):
    ``f(params, state, x, target, *, key) -> (value, new_state, y, grads)`` with::

        grads = (1/B) Σ_n clip(g_n)  +  (σ·S/B) · z,   z ~ N(0, I)

    (clip(g_n) = min(1, C/‖g_n‖) g_n for ``mode="flat"``, C = ``clip``, σ = ``noise``; the other
    modes and their sensitivity S, C for flat, in :func:`bpjax.clipped_grad`; ``microbatch``: rows
    per backward). The noise has its own key, ``fold_in(key, NOISE_STREAM)``, apart from the
    layers' (dropout) key."""
    clipped, sensitivity = _clipped_and_sensitivity(model, loss, clip, mode, microbatch)

    def f(params, state, x, target, *, key=None):
        value, new_state, y, grads, _ = clipped(params, state, x, target, key)
        n = jax.tree_util.tree_leaves(x)[0].shape[0]
        return value, new_state, y, _add_noise(grads, noise * sensitivity / n, key)

    f.sensitivity = sensitivity
    return f


def poisson_dp_grad(model, loss, clip, noise: float, *, expected_batch: int, physical: int,
                    metric=None, place=None, mode: str = "flat", microbatch: Optional[int] = None):
    """DP-SGD's gradient on a Poisson-sampled batch S (:func:`bpjax.privacy.poisson_sample`)::

        grads = (1/B) (Σ_{n in S} clip(g_n)  +  σ·Δ · z),   z ~ N(0, I)

    (clip(g_n) = min(1, C/‖g_n‖) g_n and sensitivity Δ = C for ``mode="flat"``; the other modes
    in :func:`bpjax.clipped_grad`; ``microbatch`` rows per backward, a divisor of P)
    normalised by the expected batch size B = q·n (``expected_batch``), not by |S|, as Opacus
    does for Poisson sampling: |S| depends on the sample, and dividing by it would make the
    noise's scale and every example's influence depend on the others.

    S is taken P = ``physical`` rows at a time: physical batch j holds ``indices[j·P : (j+1)·P]``,
    its rows past ``size`` padding, whose clip factors are 0 (no gradient, no norm) and whose loss
    and metric are left out. The ⌈|S|/P⌉ physical batches (none for an empty S) are summed, then
    the noise is drawn once, under ``fold_in(key, NOISE_STREAM)``: a batch larger than P is one
    step, never truncated. Physical batch j's layers (dropout) get ``fold_in(key, j)``.

    Returns ``f(params, state, x_all, y_all, indices, size, *, key) -> (grads, new_state,
    (loss_sum, metric_sum))`` over the whole training split ``x_all``, ``y_all`` (N, ...):
    ``loss_sum`` = Σ_{n in S} ℓ_n, and ``metric_sum`` = Σ over the physical batches of
    ``metric(y, target, mask)`` (0 without one). ``place(xb, yb)``: where a physical batch goes
    (a mesh's batch sharding); the layer state is carried from one physical batch to the next.
    """
    clipped, sensitivity = _clipped_and_sensitivity(model, loss, clip, mode, microbatch)
    place = place or (lambda xb, yb: (xb, yb))

    def example_losses(y, target):                                 # ℓ_n, the loss of a batch of one
        one = lambda a: a[None]                                    # noqa: E731
        return jax.vmap(lambda y1, t1: loss.forward(jax.tree_util.tree_map(one, y1),
                                                    jax.tree_util.tree_map(one, t1))[0])(y, target)

    def f(params, state, x_all, y_all, indices, size, *, key=None):
        key = key if key is not None else jax.random.PRNGKey(0)
        take = lambda a, rows: jnp.take(a, rows, axis=0)          # noqa: E731

        def physical_batch(j, acc):
            total, state, loss_sum, metric_sum = acc
            rows = jax.lax.dynamic_slice_in_dim(indices, j * physical, physical)       # (P,)
            mask = j * physical + jnp.arange(physical) < size                           # (P,) real rows
            xb, yb = place(jax.tree_util.tree_map(lambda a: take(a, rows), x_all),
                           jax.tree_util.tree_map(lambda a: take(a, rows), y_all))
            _, state, y, grads, _ = clipped(params, state, xb, yb, jax.random.fold_in(key, j), mask)
            # grads = (1/P) Σ_{n in mask} clip(g_n)
            total = jax.tree_util.tree_map(jnp.add, total, grads)
            loss_sum = loss_sum + jnp.sum(jnp.where(mask, example_losses(y, yb), 0.0))
            if metric is not None:
                metric_sum = metric_sum + metric(y, yb, mask).astype(metric_sum.dtype)
            return total, state, loss_sum, metric_sum

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        count = (size + physical - 1) // physical                                       # ⌈|S|/P⌉
        total, state, loss_sum, metric_sum = jax.lax.fori_loop(
            0, count, physical_batch, (zeros, state, jnp.zeros((), jnp.result_type(float)), jnp.zeros((), jnp.int32)))
        b = float(expected_batch)
        summed = jax.tree_util.tree_map(lambda t: t * (physical / b), total)           # (1/B) Σ clipped
        return _add_noise(summed, noise * sensitivity / b, key), state, (loss_sum, metric_sum)

    f.sensitivity = sensitivity
    return f


def _add_noise(grads, std: float, key):
    """``grads + std · z``, z ~ N(0, I) under ``fold_in(key, NOISE_STREAM)``, a leaf per key."""
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    k = jax.random.fold_in(key if key is not None else jax.random.PRNGKey(0), NOISE_STREAM)
    zs = [jax.random.normal(kk, g.shape, g.dtype) for kk, g in zip(jax.random.split(k, len(leaves)), leaves)]
    return treedef.unflatten([g + std * z for g, z in zip(leaves, zs)])


#: The ``fold_in`` constant of DP-SGD's noise key (the layers' dropout key is the step key itself).
NOISE_STREAM = 0x6E6F6973
