"""Poisson sampling, the batches DP-SGD's accountant assumes, on the device and in one shape.

Each step, every one of the N training examples joins the batch on its own with probability
q = B/N (B the expected batch size), so the batch size is |S| ~ Binomial(N, q), mean B and
standard deviation √(B(1−q)). That is the sampling the accountants of :mod:`.accounting`
compose (``PoissonSampledDpEvent``); a fixed-size batch cut from a shuffled order is not.

A jitted step keeps one shape, so the sampled indices come padded: ``indices[:size]`` are the
examples drawn, in increasing order, and the rest index example 0, rows that DP-SGD masks out
(:func:`bpjax.privacy.poisson_dp_grad`). They are taken P at a time, P the physical batch
(:func:`default_physical_batch`); a batch larger than P is several physical batches of one step.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["SAMPLERS", "SAMPLING_STREAM", "poisson_mask", "poisson_sample", "default_physical_batch",
           "inclusion_threshold"]

#: ``--dp-sampling``: Poisson (the default: what ε is accounted for) or the epoch's shuffled order
#: cut into fixed batches of B (ε then computed as if Poisson: not a guarantee).
SAMPLERS = ("poisson", "shuffle")

#: The ``fold_in`` constant of the sampling key under the run's data key (step s draws its batch
#: under ``fold_in(fold_in(data_key, SAMPLING_STREAM), s)``).
SAMPLING_STREAM = 0x73616D70


def inclusion_threshold(rate: float) -> int:
    """t = ⌊q·2³²⌋: an example joins when its uniform 32-bit word is below t, so its probability
    is t/2³², within 2⁻³² of q and never above it (ε is accounted at q, which bounds it)."""
    if not 0 <= rate <= 1:
        raise ValueError(f"poisson sampling: expected a rate in [0, 1], got {rate!r}")
    return min(math.floor(rate * 2**32), 2**32 - 1)


def poisson_mask(key, n: int, rate: float):
    """Which of the ``n`` examples this step's batch holds: each on its own with probability
    ``rate`` (:func:`inclusion_threshold`).                                          (n,) bool"""
    bits = jax.random.bits(key, (n,), jnp.uint32)
    return bits < jnp.uint32(inclusion_threshold(rate))


def poisson_sample(key, n: int, rate: float, physical: int):
    """One step's Poisson batch, padded: ``(indices, size)``.

    ``indices`` (⌈n/P⌉·P,) int32 holds the ``size`` examples drawn (:func:`poisson_mask`) first, in
    increasing order, then zeros (padding); P = ``physical``, so that physical batch j,
    ``indices[j·P : (j+1)·P]``, is always a whole slice. ``size`` () int32 ~ Binomial(n, rate).
    """
    mask = poisson_mask(key, n, rate)
    slots = -(-n // physical) * physical
    (indices,) = jnp.nonzero(mask, size=slots, fill_value=0)
    return indices.astype(jnp.int32), jnp.sum(mask, dtype=jnp.int32)


def default_physical_batch(n: int, rate: float, multiple: int = 1) -> int:
    """P = ⌈B + 3√(B(1−q))⌉ (B = n·q), rounded up to a ``multiple`` (a mesh's devices) and at most
    n rounded so: the mean batch plus three standard deviations, about the 0.999 quantile of
    Binomial(n, q), so about one step in 700 takes two physical batches. Padding costs P/B − 1
    of the rows computed (30% at B = 100)."""
    b = n * rate
    p = min(math.ceil(b + 3 * math.sqrt(b * (1 - rate))), n)
    return max(multiple, -(-p // multiple) * multiple)
