"""Differential privacy: DP-SGD's gradient, the batches it is sampled as, the ε it spends, and an
audit of that guarantee.

DP-SGD (Abadi et al. 2016) clips each example's gradient to norm C, sums, adds Gaussian noise of
std σ·C and divides by the batch size. Its guarantee holds for the sampling the accountant
composes: Poisson sampling, each example joining each step on its own with probability q = B/n.
So that is what ``fit(..., dp=...)`` and ``bpjax train --dp-*`` run by default:

* :mod:`.sampling`: the Poisson batch on the device, padded to P rows a physical batch.
* :mod:`.sgd`: DP-SGD's gradient on it (the padded rows masked, a batch larger than P
  accumulated as one step, normalised by B), and on fixed shuffled batches; :class:`DPSGD`, the
  options.
* :mod:`.accounting`: ε at δ by dp-accounting's RDP or PLD accountant, and the σ a target ε needs.
* :mod:`.audit`: tests the guarantee of a run (an empirical lower bound on its ε, from one
  training run with canaries).

The per-example clipping itself is :func:`bpjax.clipped_grad` (``bpjax/_per_example.py``).
"""
from .accounting import ACCOUNTANTS, dp_epsilon, dp_event, dp_noise_for
from .sampling import SAMPLERS, SAMPLING_STREAM, default_physical_batch, poisson_mask, poisson_sample
from .sgd import DPSGD, NOISE_STREAM, NOT_A_GUARANTEE, check_dp, check_dpsgd, dp_forward_backward, poisson_dp_grad

__all__ = ["DPSGD", "check_dp", "check_dpsgd", "dp_forward_backward", "poisson_dp_grad", "dp_epsilon", "dp_event",
           "dp_noise_for", "poisson_mask", "poisson_sample", "default_physical_batch", "ACCOUNTANTS", "SAMPLERS",
           "NOISE_STREAM", "SAMPLING_STREAM", "NOT_A_GUARANTEE"]
