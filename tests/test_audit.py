"""The one-run privacy audit (bpjax.privacy.audit): the bound itself, checked against exact
binomial sums and against randomised response (the worst case its theorem allows), then one
honest and one deliberately broken DP-SGD run, and the ``bpjax audit`` command."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from bpjax import cli, datasets
from bpjax.privacy import audit


def _tail(r: int, v: int, p: Fraction) -> Fraction:
    """P[Binomial(r, p) >= v], exactly."""
    return sum((math.comb(r, k) * p**k * (1 - p)**(r - k) for k in range(v, r + 1)), Fraction(0))


def _p_value_exact(m, r, v, p: Fraction, delta: Fraction) -> float:
    """The theorem's right side as it is written, its max over i = 1..m, in rationals."""
    f = lambda k: Fraction(1) if k <= 0 else _tail(r, k, p)                      # noqa: E731
    alpha = max((f(v - i) - f(v)) / i for i in range(1, m + 1))
    return float(min(Fraction(1), f(v) + 2 * m * delta * alpha))


@pytest.mark.parametrize("m, r, v, delta", [(10, 10, 10, 0), (10, 8, 6, 0), (40, 20, 17, 1e-3), (40, 20, 11, 1e-2),
                                            (7, 3, 0, 1e-3), (100, 30, 30, 1e-5)])
def test_p_value_is_the_theorems_right_side(m, r, v, delta):
    for eps in (0.0, 0.5, 2.0):
        p = Fraction(math.exp(eps)) / (1 + Fraction(math.exp(eps)))
        assert audit.p_value(m, r, v, eps, delta) == pytest.approx(_p_value_exact(m, r, v, p, Fraction(delta)),
                                                                   rel=1e-9, abs=1e-15)


def test_all_guesses_right_give_the_closed_form_and_a_bound_that_grows_with_m():
    """With δ = 0 and v = r the p-value is p^r, so the bound is logit(β^(1/r)) exactly."""
    bounds = []
    for m in (10, 100, 1000):
        got = audit.epsilon_lower_bound(m, m, m, delta=0.0, confidence=0.95)
        q = 0.05 ** (1 / m)
        assert got == pytest.approx(math.log(q / (1 - q)), abs=1e-5)
        bounds.append(got)
    assert 0 < bounds[0] < bounds[1] < bounds[2]                   # 1.82, 3.98, 6.30
    assert audit.epsilon_lower_bound(1000, 1000, 1000, delta=1e-5) < bounds[2]   # δ costs something


def test_chance_guesses_give_no_bound():
    assert audit.epsilon_lower_bound(1000, 1000, 500, delta=1e-5) == 0.0
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    bound = audit.bound_from_scores(rng.standard_normal(1000), included, delta=1e-5)     # scores unrelated to S
    assert bound.epsilon < 0.2 and bound.canaries == 1000


def test_the_bound_is_valid_and_nearly_tight_against_randomised_response():
    """ε-DP randomised response gets each guess right with probability e^ε/(1+e^ε): the worst case
    of the theorem. Its bound exceeds ε in at most 5% of runs, and lies close below ε."""
    rng = np.random.default_rng(1)
    eps, r, trials = 1.0, 400, 200
    correct = rng.binomial(r, 1 / (1 + math.exp(-eps)), size=trials)
    bounds = np.array([audit.epsilon_lower_bound(r, r, int(v), delta=0.0) for v in correct])
    assert np.mean(bounds > eps) <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / trials)
    assert 0.6 < np.median(bounds) < eps


def test_guesses_take_the_top_and_the_bottom_and_abstain_in_between():
    t = audit.guess([0.3, -2.0, 5.0, 0.1, -0.5, 1.0], 2)
    assert t.tolist() == [0, -1, 1, 0, -1, 1]
    perfect = audit.bound_from_scores(np.arange(100.0), np.arange(100) >= 50, delta=0.0, guesses=[20, 100])
    assert (perfect.guesses, perfect.correct) == (100, 100)
    assert perfect.epsilon == pytest.approx(audit.epsilon_lower_bound(100, 100, 100, delta=0.0, confidence=0.975))
    with pytest.raises(ValueError, match="expected 0 <= correct <= guesses <= canaries, got correct 5, guesses 4"):
        audit.p_value(10, 4, 5, 1.0, 0.0)
    with pytest.raises(ValueError, match="bound_from_scores: expected guess counts that are even"):
        audit.bound_from_scores(np.zeros(10), np.zeros(10, bool), delta=0.0, guesses=[3])


#: One small run on XOR (256 examples) with 200 canaries: the accountant is made to claim ε = 1.
RUN = dict(canaries=200, epsilon=1.0, delta=1e-5, epochs=5, batch_size=64, seed=0)


def test_an_honest_run_stays_below_its_epsilon_and_a_broken_one_exceeds_it():
    data = datasets.xor()
    honest = audit.audit_dp_sgd(data, **RUN)
    broken = audit.audit_dp_sgd(data, noise_divisor=10.0, **RUN)               # trains with σ/10, accounts σ
    for result in (honest, broken):
        assert result.epsilon_claimed == pytest.approx(1.0, abs=0.01)
        assert result.noise_accounted == honest.noise_accounted > 1
    assert broken.noise_trained == pytest.approx(honest.noise_accounted / 10)
    assert honest.epsilon_lower <= honest.epsilon_claimed and not honest.violated
    assert broken.epsilon_lower > 1.5 and broken.violated                       # 2.2 when written
    assert broken.largest_bound >= broken.epsilon_lower
    assert np.array_equal(honest.membership, broken.membership)                 # the same canaries in both


def test_bpjax_audit_prints_both_epsilons_and_exits_1_on_a_broken_run(capsys):
    argv = ["audit", "--dataset", "xor", "--canaries", "200", "--epsilon", "1", "--epochs", "5", "--batch-size", "64",
            "--no-progress"]
    assert cli.main(argv + ["--break-noise", "10"]) == 1
    out = capsys.readouterr().out
    for text in ("deliberately broken: σ/10", "accountant: epsilon 1", "lower bound: epsilon >= 2.", "95% confidence",
                 "200 canaries", "VIOLATED: the lower bound"):
        assert text in out, out
    for bad, msg in ((["--canaries", "1"], "expected canaries to be an integer >= 2, got 1"),
                     (["--break-noise", "0.5"], "expected noise_divisor >= 1"),
                     (["--confidence", "1"], "expected confidence in (0, 1), got 1.0"),
                     (["--dp-noise", "1"], "expected --dp-noise or --epsilon, got both"),
                     (["--dp-clip", "0"], "expected --dp-clip > 0"),
                     (["--batch-size", "1000"], "expected batch_size <= the training set"),
                     (["--dataset", "regression"], "expected a classification dataset")):
        assert cli.main(argv + bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("bpjax audit: ") and msg in err and err.count("\n") == 1, err
