"""The privacy DP-SGD spends, ε at δ, from Google's ``dp-accounting``: T steps of the Gaussian
mechanism (noise multiplier σ) on Poisson-sampled batches (rate q), composed by its RDP or its
PLD accountant. Nothing here re-implements either; this module only names the event.

RDP (Rényi DP, Mironov 2017) bounds ε from the Rényi divergences at a fixed set of orders and
takes a fraction of a second; PLD (privacy loss distributions) composes the discretised
distribution of the privacy loss itself and gives a tighter ε, in a second or two on this CPU
(σ = 1, q = 1/36, δ = 1e-5: 6.44 by RDP, 5.85 by PLD after 1080 steps). :func:`dp_noise_for`
inverts it: the noise multiplier a run needs for a target ε, by bisection on :func:`dp_epsilon`.
"""
from __future__ import annotations

import logging

__all__ = ["ACCOUNTANTS", "dp_epsilon", "dp_event", "dp_noise_for"]

#: ``--dp-accountant``: dp-accounting's accountants, by the name the option takes.
ACCOUNTANTS = ("rdp", "pld")


def dp_event(noise: float, sampling_rate: float, steps: int):
    """``steps`` compositions of the Gaussian mechanism of noise multiplier σ = ``noise`` on a
    batch Poisson-sampled at rate q = ``sampling_rate``, as a ``dp_accounting.DpEvent``."""
    import dp_accounting
    event = dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise))
    return dp_accounting.SelfComposedDpEvent(event, int(steps))


def dp_epsilon(noise: float, sampling_rate: float, steps: int, delta: float, *, accountant: str = "rdp") -> float:
    """ε spent at δ after ``steps`` DP-SGD steps (:func:`dp_event`), by dp-accounting's
    ``accountant``: "rdp" (``rdp.RdpAccountant``) or "pld" (``pld.PLDAccountant``, its default
    discretisation). ``inf`` for σ = 0; 0 before the first step."""
    from dp_accounting import pld, rdp
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"dp_epsilon: expected accountant to be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    if noise == 0:
        return float("inf")
    if steps == 0:
        return 0.0
    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)        # its notes on RDP orders left out of the bound
    try:
        acc.compose(dp_event(noise, sampling_rate, steps))
        return float(acc.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def dp_noise_for(epsilon: float, sampling_rate: float, steps: int, delta: float, *, accountant: str = "rdp",
                 who: str = "dp_noise_for") -> float:
    """The least noise multiplier σ (to 0.1%, rounded up) whose ε at ``delta`` after ``steps``
    DP-SGD steps at Poisson rate ``sampling_rate`` is at most ``epsilon``, by the accountant's
    :func:`dp_epsilon`: a bisection on σ (ε falls as σ grows), some 15 calls of the accountant
    (a fraction of a second by RDP, tens of seconds by PLD). ``who`` names the caller in errors."""
    if not epsilon > 0:
        raise ValueError(f"{who}: expected epsilon > 0, got {epsilon!r}")
    if not steps >= 1:
        raise ValueError(f"{who}: expected at least one step to calibrate the noise for, got {steps!r}")
    lo, hi = 0.05, 1.0                    # ε(lo) > epsilon ≥ ε(hi)
    while dp_epsilon(hi, sampling_rate, steps, delta, accountant=accountant) > epsilon:
        lo, hi = hi, 2.0 * hi
        if hi > 1e4:
            raise ValueError(f"{who}: no noise up to 1e4 gives epsilon {epsilon:g} at delta {delta:g}")
    if dp_epsilon(lo, sampling_rate, steps, delta, accountant=accountant) <= epsilon:
        raise ValueError(f"{who}: expected an epsilon that needs noise above {lo:g}, got epsilon {epsilon:g}")
    while hi / lo > 1.001:
        mid = (lo * hi) ** 0.5
        enough = dp_epsilon(mid, sampling_rate, steps, delta, accountant=accountant) <= epsilon
        lo, hi = (lo, mid) if enough else (mid, hi)
    return hi
