"""An empirical lower bound on DP-SGD's ε from one training run: a test of the guarantee.

The accountant's ε is an upper bound, proved for the mechanism as written down. An audit
runs the mechanism as implemented and measures how much it leaks: a lower bound on ε. A lower
bound above the accountant's ε is a bug (in the noise, the clipping, the sampling or the
accounting); a lower bound below it is consistent with the guarantee and proves nothing.

The method is Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run"
(NeurIPS 2023). m canaries are each put in the training set with probability ½,
independently: S_i = +1 (in) or −1 (out). One DP-SGD run trains on the set. The auditor
scores every canary, guesses T_i = +1 for the k highest scores, T_i = −1 for the k lowest and
abstains on the rest (r = 2k guesses), and counts the correct ones, W = #{i: T_i = S_i}.
Their theorem: if the training is (ε, δ)-DP for adding or removing one canary, then for every v

    P[W ≥ v] ≤ f(v) + 2mδ · max_{i=1..v} (f(v−i) − f(v)) / i,
    f(k) = P[Binomial(r, p) ≥ k],   p = e^ε / (1 + e^ε)

(ε-DP randomised response gets each guess right with probability p; the δ term is the price of
δ; the paper's max runs over i = 1..m, and the terms past i = v are smaller). The right side is
the p-value :func:`p_value` of having seen v correct guesses. The lower bound at confidence
1 − β is the largest ε that this count rejects, where p_value(ε) crosses β
(:func:`epsilon_lower_bound`). The count of guesses r is fixed before the scores are seen;
:func:`bound_from_scores` tries a few counts and tests each at β/J (Bonferroni over the J
counts), so the best of them holds at 1 − β.

The canaries (:func:`add_canaries`) are the strongest a DP-SGD step must hide, written as
training examples. Every input is flattened to D features and given m more, zero in every
natural example; canary i is zero everywhere but its own feature D + i, set to ``a``, with a
random label. In a model whose first layer is dense (``logreg``, ``mlp``) the row D + i of that
layer's weights w gets a gradient from canary i alone, so over training it moves by canary i's
clipped gradient, if it is in, plus DP-SGD's noise, and nothing else (the one-run paper's
"Dirac canary", a gradient with one nonzero coordinate, reached through the inputs).

The score is white-box, from the params after every epoch (DP-SGD's guarantee covers every
iterate, so any function of them is a post-processing): with plain SGD, step size η,

    s_i = Σ_epochs ⟨u_i, w_{e−1}[D+i] − w_e[D+i]⟩,    u_i = g_i / ‖g_i‖ at θ_{e−1}

(g_i the gradient of canary i's loss on its row). An included canary moves its row by about
η·min(‖g_i‖, C)/B along u_i each time it is in a batch (the row holds nearly all of its
gradient); the noise moves it by η·σC/B per step in every direction. After E epochs, T = E·n/B
steps, the scores of the canaries that were in sit about E/(σ√T) = √(E·B/n)/σ noise standard
deviations above the others', whatever the natural data does.

What it can and cannot show:

- A lower bound only. Above the accountant's ε: the run leaks more than claimed, at the stated
  confidence. At or below: nothing is proved; the implementation may still be wrong in a way
  these canaries do not see (the audit sees what one canary's inclusion changes in the
  iterates, not every bug).
- One-run audits are loose. At a realistic ε the separation above is a fraction of a noise
  standard deviation and the bound is far below ε; and with m canaries no audit, even of a
  non-private run, can give more than :func:`largest_bound` (about 3–6 for m in the hundreds to
  thousands at 95%).
- It audits DP-SGD with these canaries, a dense first layer and plain SGD, not the user's own
  model or optimizer (the guarantee is the same for any model: a post-processing of the
  clipped, noised gradients). The accountant treats fit's shuffled batches (every example once
  an epoch) as Poisson sampling at rate B/n; an audit this loose cannot tell the two apart.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np

__all__ = ["p_value", "epsilon_lower_bound", "largest_bound", "guess", "bound_from_scores", "Bound",
           "add_canaries", "Canaries", "audit_dp_sgd", "AuditResult", "describe", "GUESS_FRACTIONS",
           "AUDIT_MODELS"]


# ----------------------------------------------------------------------------- the bound


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The probability, were the training (ε, δ)-DP, of v or more correct guesses out of r, with
    m canaries: f(v) + 2mδ · max_{i=1..v} (f(v−i) − f(v))/i, f(k) = P[Binomial(r, e^ε/(1+e^ε)) ≥ k]
    (the module doc), capped at 1. ``v = 0`` gives 1."""
    from scipy import special, stats
    _check_counts("p_value", m, r, v)
    if v == 0:
        return 1.0
    p = float(special.expit(epsilon))                          # e^ε / (1 + e^ε)
    tail = float(stats.binom.sf(v - 1, r, p))                  # f(v) = P[X ≥ v]
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, p))   # f(v−i) − f(v) = P[v−i ≤ X < v], i = 1..v
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, confidence: float = 0.95) -> float:
    """The largest ε that v correct guesses out of r (m canaries) reject at ``confidence``: where
    ``p_value(m, r, v, ε, delta)`` crosses β = 1 − confidence, by bisection to 1e-6. The ε
    returned always has p-value ≤ β, so the claim (ε, δ) is rejected, and with it every smaller
    ε (an (ε, δ)-DP run is (ε', δ)-DP for every ε' > ε). 0 when even ε = 0 is not rejected."""
    _check_counts("epsilon_lower_bound", m, r, v)
    beta = 1.0 - _check_confidence("epsilon_lower_bound", confidence)
    if p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    lo, hi = 0.0, 1.0                                          # p_value(lo) ≤ β < p_value(hi)
    while p_value(m, r, v, hi, delta) <= beta:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-6:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) <= beta else (lo, mid)
    return lo


#: The guess counts :func:`bound_from_scores` tries, as fractions of m (each rounded to an even
#: count, half guessed in, half out): few enough that Bonferroni costs little.
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _guess_counts(m: int, guesses: Optional[Sequence[int]], name: str = "bound_from_scores") -> list:
    if guesses is None:
        return sorted({max(2, 2 * int(f * m / 2)) for f in GUESS_FRACTIONS})
    counts = sorted({int(r) for r in guesses})
    bad = [r for r in counts if r < 2 or r % 2 or r > m]
    if bad or not counts:
        raise ValueError(f"{name}: expected guess counts that are even and in [2, {m}], got {list(guesses)}")
    return counts


def largest_bound(m: int, *, delta: float, confidence: float = 0.95, guesses: Optional[Sequence[int]] = None) -> float:
    """The most an audit with m canaries can show: the bound when every guess is right, at the
    best of the guess counts (Bonferroni, as :func:`bound_from_scores`). Even a non-private run
    gives no more."""
    counts = _guess_counts(m, guesses)
    level = 1.0 - (1.0 - confidence) / len(counts)
    return max(epsilon_lower_bound(m, r, r, delta=delta, confidence=level) for r in counts)


def guess(scores, k: int) -> np.ndarray:
    """T (m,) in {−1, 0, +1}: +1 (in) for the k highest scores, −1 (out) for the k lowest, 0
    (abstain) for the rest. Ties are broken by the canary's index (a stable sort)."""
    scores = np.asarray(scores, np.float64)
    m = scores.shape[0]
    if not 0 <= 2 * k <= m:
        raise ValueError(f"guess: expected 0 <= 2k <= m = {m}, got k = {k}")
    order = np.argsort(-scores, kind="stable")                 # highest first
    t = np.zeros(m, np.int64)
    t[order[:k]] = 1
    t[order[m - k:]] = -1
    return t


class Bound(NamedTuple):
    """A lower bound on ε from one set of guesses."""
    epsilon: float        # the lower bound (0: nothing shown)
    guesses: int          # r, the guesses it was computed from (k in, k out)
    correct: int          # v, the correct ones
    canaries: int         # m
    confidence: float     # the confidence of the best-of-J bound (each count tested at 1 − β/J)


def bound_from_scores(scores, included, *, delta: float, confidence: float = 0.95,
                      guesses: Optional[Sequence[int]] = None) -> Bound:
    """The lower bound on ε from canary scores (high: guessed in) and the truth ``included``
    (bool, m): for each guess count r (default: :data:`GUESS_FRACTIONS` of m) the top and
    bottom r/2 are guessed, their bound computed at confidence 1 − β/J, and the largest of the
    J bounds is returned (Bonferroni: it holds at 1 − β)."""
    scores = np.asarray(scores, np.float64)
    included = np.asarray(included, bool)
    if scores.ndim != 1 or scores.shape != included.shape:
        raise ValueError(f"bound_from_scores: expected scores and included of the same shape (m,), got "
                         f"{scores.shape} and {included.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("bound_from_scores: expected finite scores, got a NaN or an infinity")
    m = scores.shape[0]
    counts = _guess_counts(m, guesses)
    level = 1.0 - (1.0 - _check_confidence("bound_from_scores", confidence)) / len(counts)
    truth = np.where(included, 1, -1)
    found = []
    for r in counts:
        v = int(np.sum(guess(scores, r // 2) == truth))        # abstentions (0) never match
        eps = epsilon_lower_bound(m, r, v, delta=delta, confidence=level)
        found.append((eps, -p_value(m, r, v, 0.0, delta), r, v))   # ties (0): the strongest evidence
    eps, _, r, v = max(found)
    return Bound(eps, r, v, m, confidence)


def _check_counts(name: str, m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"{name}: expected 0 <= correct <= guesses <= canaries, got correct {v}, guesses {r}, "
                         f"canaries {m}")


def _check_confidence(name: str, confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"{name}: expected confidence in (0, 1), got {confidence!r}")
    return float(confidence)


# ----------------------------------------------------------------------------- the canaries


class Canaries(NamedTuple):
    """The training set with the included canaries, and what the auditor keeps to itself."""
    data: object          # the Dataset: inputs flattened to (N, D + m), natural ones zero in the last m
    x: np.ndarray         # (m, D + m) every canary, in or out: zero but for a at feature D + i
    y: np.ndarray         # (m,) their labels, uniform over the classes
    included: np.ndarray  # (m,) bool: S_i = +1
    features: int         # D, the natural features; canary i's own feature is D + i


#: The numpy seed stream of the canaries (their labels and which are in), apart from ``fit``'s
#: JAX keys (init, order, noise), which come from the same seed.
CANARY_STREAM = 0x63616E61


def add_canaries(data, m: int, *, seed: int, scale: float) -> Canaries:
    """``data`` with m canaries (module doc), each included with probability ½ independently,
    drawn under ``seed``; canary i is ``scale`` at its own feature D + i, zero elsewhere. The
    included canaries follow the natural examples in the training split; the test split is
    the natural test split, zero in the canary features."""
    if data.num_classes is None:
        raise ValueError(f"audit: expected a classification dataset, got {data.name} (real-valued targets)")
    rng = np.random.default_rng([seed, CANARY_STREAM])
    d = int(np.prod(data.in_shape))
    labels = rng.integers(0, data.num_classes, m).astype(data.y_train.dtype)
    included = rng.random(m) < 0.5
    x = np.zeros((m, d + m), np.float32)
    x[np.arange(m), d + np.arange(m)] = scale

    def widen(a):
        a = a.reshape(a.shape[0], -1).astype(np.float32)
        return np.concatenate([a, np.zeros((a.shape[0], m), np.float32)], axis=1)

    x_train = np.concatenate([widen(data.x_train), x[included]])
    y_train = np.concatenate([data.y_train, labels[included]])
    audited = data._replace(x_train=x_train, y_train=y_train, x_test=widen(data.x_test),
                            name=f"{data.name}+{m} canaries")
    return Canaries(audited, x, labels, included, d)


# ----------------------------------------------------------------------------- the audit


class AuditResult(NamedTuple):
    """What :func:`audit_dp_sgd` found, and the run it found it in."""
    epsilon_claimed: float     # the accountant's ε at delta, for noise_accounted
    epsilon_lower: float       # the empirical lower bound at confidence
    largest_bound: float       # the most this audit could have shown (every guess right)
    confidence: float
    delta: float
    canaries: int              # m
    included: int              # how many were in
    guesses: int               # r of the best bound
    correct: int               # v of the best bound
    noise_accounted: float     # σ the accountant was told
    noise_trained: float       # σ the training used (noise_accounted / noise_divisor)
    clip: float
    examples: int              # n, the training set (natural examples + included canaries)
    batch_size: int
    steps: int
    test_acc: float
    seconds: float
    scores: np.ndarray         # (m,) every canary's score
    membership: np.ndarray     # (m,) bool, the truth

    @property
    def violated(self) -> bool:
        """The lower bound exceeds the accountant's ε: the run leaks more than it claims."""
        return self.epsilon_lower > self.epsilon_claimed


#: The models the audit trains (a dense first layer holds each canary's own row).
AUDIT_MODELS = ("logreg", "mlp")


def audit_dp_sgd(data, *, model: str = "logreg", canaries: int = 1000, clip: float = 1.0,
                 noise: Optional[float] = None, epsilon: Optional[float] = None, delta: float = 1e-5,
                 epochs: int = 5, batch_size: int = 100, lr: float = 0.5, seed: int = 0,
                 noise_divisor: float = 1.0, confidence: float = 0.95, guesses: Optional[Sequence[int]] = None,
                 canary_scale: Optional[float] = None, progress: bool = False,
                 log: Callable[[str], None] = lambda line: None) -> AuditResult:
    """One DP-SGD run of ``bpjax.train.fit(..., dp=(C, σ, δ))`` with m = ``canaries`` canaries,
    audited (module doc): the accountant's ε for the run, beside the empirical lower bound.

    Args:
      data: a classification :class:`bpjax.datasets.Dataset` (its inputs are flattened).
      model: one of :data:`AUDIT_MODELS` (``bpjax.models``), trained with plain SGD at ``lr``.
      noise, epsilon: σ, or the ε at ``delta`` the accountant should claim (σ is then the
        smallest that gives it, for this run's sampling rate and steps); exactly one.
      noise_divisor: train with σ / ``noise_divisor`` while the accountant is told σ: a
        deliberately broken run, to test the audit (1: an honest run).
      canary_scale: a, canary i's value at its own feature (default: the natural inputs' RMS
        norm, at least 4C, so that its gradient is clipped).
      guesses: the guess counts to try (default :data:`GUESS_FRACTIONS` of m).
      progress: fit's progress bar; log: where the audit's own lines go.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from .. import models as _models
    from .._grad import value_and_grad
    from .accounting import dp_epsilon, dp_noise_for
    from .sgd import check_dp
    from ..layers.losses import softmax_cross_entropy
    from ..train import fit

    t0 = time.perf_counter()
    m = _positive_int("canaries", canaries, least=2)
    epochs = _positive_int("epochs", epochs)
    batch_size = _positive_int("batch_size", batch_size)
    if model not in AUDIT_MODELS:
        raise ValueError(f"audit: expected model to be one of {', '.join(AUDIT_MODELS)} (a dense first layer), "
                         f"got {model!r}")
    if (noise is None) == (epsilon is None):
        raise ValueError("audit: expected exactly one of noise (σ) and epsilon (the ε to claim), got "
                         + ("both" if noise is not None else "neither"))
    if epsilon is not None and not epsilon > 0:
        raise ValueError(f"audit: expected epsilon > 0, got {epsilon!r}")
    if not noise_divisor >= 1:
        raise ValueError(f"audit: expected noise_divisor >= 1 (train with σ / noise_divisor), got {noise_divisor!r}")
    if not lr > 0:
        raise ValueError(f"audit: expected lr > 0, got {lr!r}")
    _check_confidence("audit", confidence)
    clip, _, delta = check_dp(clip, 1.0 if noise is None else noise, delta)
    _guess_counts(m, guesses, "audit")

    rms = float(np.sqrt(np.mean(np.sum(data.x_train.reshape(len(data.x_train), -1) ** 2, axis=1))))
    scale = max(rms, 4.0 * clip) if canary_scale is None else float(canary_scale)
    if not scale > 0:
        raise ValueError(f"audit: expected canary_scale > 0, got {canary_scale!r}")
    c = add_canaries(data, m, seed=seed, scale=scale)
    n = c.data.x_train.shape[0]
    if batch_size > n:
        raise ValueError(f"audit: expected batch_size <= the training set ({n} examples with the canaries), "
                         f"got {batch_size}")
    rate, steps = batch_size / n, epochs * (n // batch_size)          # as fit accounts them
    with _quiet_accountant():
        sigma = dp_noise_for(epsilon, rate, steps, delta, who="audit") if noise is None else float(noise)
        claimed = dp_epsilon(sigma, rate, steps, delta)
    trained = sigma / noise_divisor
    log(f"audit: {model} on {data.name} ({data.x_train.shape[0]} examples) + {m} canaries ({int(c.included.sum())} "
        f"in, each with probability 1/2, seed {seed}); DP-SGD: clip {clip:g}, noise {sigma:.4g}"
        + (f" accounted but {trained:.4g} trained (deliberately broken: σ/{noise_divisor:g})" if noise_divisor != 1
           else "") + f", batch {batch_size}, {epochs} epochs ({steps} steps), SGD lr {lr:g}")

    net = _models.MODELS[model](data.num_classes)
    loss = softmax_cross_entropy()
    grads_of = jax.jit(value_and_grad(net, loss))
    xc, yc = jnp.asarray(c.x), jnp.asarray(c.y)
    scores = np.zeros(m)
    last = {}                             # the canary rows and their directions at the last epoch's end

    def rows(tree):
        """The rows D.. D+m−1 of the first layer's w: (m, H), canary i's own row i."""
        w = next(a for a in jax.tree_util.tree_leaves(tree) if a.ndim == 2 and a.shape[0] == c.features + m)
        return np.asarray(w[c.features:], np.float64)

    def directions(params, state):
        """u_i, canary i's gradient on its row, normalised: the rows of the gradient of the mean
        loss over all m canaries (only canary i touches row i; the 1/m goes with the norm)."""
        (_, _), grads = grads_of(params, state, xc, yc)
        g = rows(grads)
        return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), np.finfo(np.float64).tiny)

    def hook(epoch, params, state):
        w = rows(params)
        if last:
            scores[:] += np.sum(last["u"] * (last["w"] - w), axis=1)   # ⟨u_i, w_{e−1} − w_e⟩
        last.update(w=w, u=directions(params, state))
        return {}

    with _quiet_accountant():
        result = fit(net, loss, c.data, optimizer=optax.sgd(lr), epochs=epochs, batch_size=batch_size, seed=seed,
                     val_fraction=0.0, patience=None, restore_best=False, progress=progress, log=lambda line: None,
                     epoch_hook=hook, dp=(clip, trained, delta))
    bound = bound_from_scores(scores, c.included, delta=delta, confidence=confidence, guesses=guesses)
    most = largest_bound(m, delta=delta, confidence=confidence, guesses=guesses)
    return AuditResult(claimed, bound.epsilon, most, confidence, delta, m, int(c.included.sum()), bound.guesses,
                       bound.correct, sigma, trained, clip, n, batch_size, steps, float(result.test.get("acc", np.nan)),
                       time.perf_counter() - t0, scores, c.included)


def _positive_int(arg: str, value, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"audit: expected {arg} to be an integer >= {least}, got {value!r}")
    return int(value)


@contextlib.contextmanager
def _quiet_accountant():
    """dp-accounting logs a warning (absl) for every RDP order whose series does not converge
    at large sampling rates; those orders are left out of its bound, which stays valid."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def describe(result: AuditResult) -> Sequence[str]:
    """The lines ``bpjax audit`` ends with: the two ε, the verdict, and what it means."""
    q = result.batch_size / result.examples
    pct = f"{100 * result.confidence:g}%"
    lines = [f"accountant: epsilon {result.epsilon_claimed:.4g} at delta {result.delta:g} (dp-accounting RDP, "
             f"noise {result.noise_accounted:.4g}, {result.steps} steps counted as Poisson sampling at rate {q:.4g})",
             f"lower bound: epsilon >= {result.epsilon_lower:.4g} at {pct} confidence, from {result.canaries} canaries "
             f"({result.included} in): {result.correct} of {result.guesses} guesses right (the best of the guess counts "
             f"tried, Bonferroni); with every guess right this audit could show at most {result.largest_bound:.3g}",
             f"model: test accuracy {100 * result.test_acc:.1f}%, {result.examples} training examples, "
             f"{result.seconds:.0f} s"]
    if result.violated:
        lines.append(f"VIOLATED: the lower bound {result.epsilon_lower:.4g} exceeds the accountant's epsilon "
                     f"{result.epsilon_claimed:.4g}: at {pct} confidence this run leaks more than it claims "
                     "(the noise, the clipping, the sampling or the accounting is wrong)")
    else:
        lines.append(f"consistent: the lower bound does not exceed the accountant's epsilon. This is a lower bound "
                     f"only: it does not prove the guarantee, and one-run audits are loose (at a realistic epsilon "
                     f"the bound sits far below it); a bound above it would show a bug at {pct} confidence")
    return lines

