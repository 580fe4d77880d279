"""DP-SGD samples what its accountant composes: Poisson batches whose sizes and inclusions are
Binomial(n, q) (and a wrong q is caught), padded rows that add exactly nothing, a batch larger
than the physical one accumulated into one step, ε equal to dp-accounting's (RDP and PLD), runs
that name their sampling and accountant (and say so when ε is not a guarantee), exact resume."""
from __future__ import annotations

import json
import signal

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_accounting import pld, rdp
from scipy import stats

import bpjax as bp
from bpjax import cli, datasets, models, privacy, train
from bpjax.train import loop
from helpers import init_params, rng

#: One model, loss and optimizer for every fit here: one compiled chunk of steps serves them.
MODEL, LOSS, OPT = models.textbook_mlp(2), bp.softmax_cross_entropy(), optax.adam(3e-2)
TRAIN = ["train", "--model", "textbook_mlp", "--dataset", "xor", "--epochs", "1", "--no-progress", "--no-plot",
         "--dp-clip", "1", "--dp-noise", "1.1"]


@pytest.fixture(scope="module")
def xor():
    return datasets.xor()


def _fit(data, dp, **kw):
    kw.setdefault("optimizer", OPT)
    return train.fit(MODEL, LOSS, data, epochs=kw.pop("epochs", 1), batch_size=16, patience=None, progress=False,
                     log=lambda s: None, dp=dp, **kw)


# ----------------------------------------------------------------------------- the sampler

N, Q, DRAWS = 40, 0.25, 2000


def _masks(rate):
    keys = jax.random.split(jax.random.PRNGKey(0), DRAWS)
    return np.asarray(jax.jit(jax.vmap(lambda k: privacy.poisson_mask(k, N, rate)))(keys))     # (DRAWS, N)


def _binomial_p_values(masks, q):
    """Chi-square p-values that the batch sizes are Binomial(N, q) (bins pooled until each
    expects 5 draws) and that each example's count of inclusions is Binomial(DRAWS, q)."""
    sizes = masks.sum(axis=1)
    expected, observed = stats.binom.pmf(np.arange(N + 1), N, q) * DRAWS, np.bincount(sizes, minlength=N + 1)
    bins, e, o = [], 0.0, 0
    for ek, ok in zip(expected, observed):
        e, o = e + ek, o + ok
        if e >= 5:
            bins.append([e, o])
            e, o = 0.0, 0
    bins[-1][0] += e
    bins[-1][1] += o
    exp_bins, obs_bins = np.array(bins).T
    p_sizes = stats.chisquare(obs_bins, exp_bins * obs_bins.sum() / exp_bins.sum()).pvalue
    counts = masks.sum(axis=0)
    p_inclusions = stats.chi2.sf(np.sum((counts - DRAWS * q) ** 2 / (DRAWS * q * (1 - q))), N)
    return p_sizes, p_inclusions


def test_poisson_batches_are_binomial_and_a_wrong_rate_fails_the_test():
    assert min(_binomial_p_values(_masks(Q), Q)) > 1e-3
    assert max(_binomial_p_values(_masks(1.2 * Q), Q)) < 1e-3          # the test sees a 20% error in q


def test_the_padded_sample_holds_the_drawn_examples_first():
    key = jax.random.PRNGKey(5)
    indices, size = privacy.poisson_sample(key, N, Q, 8)
    drawn = np.flatnonzero(np.asarray(privacy.poisson_mask(key, N, Q)))
    assert indices.shape == (40,) and int(size) == len(drawn) > 0
    np.testing.assert_array_equal(indices[:len(drawn)], drawn)
    assert not np.any(indices[len(drawn):])
    assert privacy.default_physical_batch(3600, 100 / 3600) == 130          # 100 + 3·√(100·(1 − 1/36))
    assert privacy.default_physical_batch(230, 16 / 230, multiple=4) == 28


# ----------------------------------------------------------------------------- the DP-SGD gradient


def _case():
    model = bp.sequential(bp.dense(6), bp.tanh(), bp.layer_norm(), bp.dense(3))
    params, state, _ = init_params(model, (4,), rng("dp"), jnp.float64)
    gen = rng("dp data")
    x, y = jnp.asarray(gen.standard_normal((12, 4))), jnp.asarray(gen.integers(0, 3, 12))
    return model, params, state, x, y


def _reference(model, params, state, x, y, rows, clip, b):
    """(1/B) Σ_{n in rows} min(1, C/‖g_n‖) g_n from the vmapped per-example gradients."""
    pe = jax.jit(bp.per_example_grads(model, LOSS))(params, state, x[rows], y[rows])
    norms = np.sqrt(sum(np.sum(np.reshape(a, (len(rows), -1)) ** 2, axis=1) for a in jax.tree_util.tree_leaves(pe)))
    scale = np.minimum(1.0, clip / norms)
    return jax.tree_util.tree_map(lambda a: np.sum(a * scale.reshape((-1,) + (1,) * (a.ndim - 1)), 0) / b, pe)


def _assert_trees_close(got, want):
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * max(1.0, float(np.max(np.abs(b)))))


def test_padded_rows_add_nothing():
    """Noise 0, float64: the sample {1, 4, 5, 9, 10} of 12 examples in a physical batch of 8 (3
    padded rows, copies of example 0, which is not drawn) gives (1/B) Σ over the five alone, and
    their loss and correct count alone; padding with copies of example 11 instead changes no bit."""
    model, params, state, x, y = _case()
    rows, clip, b = np.array([1, 4, 5, 9, 10]), 0.5, 6
    grad = jax.jit(privacy.poisson_dp_grad(model, LOSS, clip, 0.0, expected_batch=b, physical=8,
                                           metric=loop._masked_correct))
    by_pad = {pad: grad(params, state, x, y, jnp.asarray(np.concatenate([rows, np.full(11, pad)]), jnp.int32),
                        jnp.int32(len(rows)), key=jax.random.PRNGKey(1)) for pad in (0, 11)}
    grads, _, (loss_sum, correct) = by_pad[0]
    _assert_trees_close(grads, _reference(model, params, state, x, y, rows, clip, b))
    for a, other in zip(jax.tree_util.tree_leaves(by_pad[0]), jax.tree_util.tree_leaves(by_pad[11])):
        np.testing.assert_array_equal(a, other)
    out, _, _ = model.forward(params, state, x[rows], train=True)
    np.testing.assert_allclose(loss_sum, len(rows) * LOSS.forward(out, y[rows])[0], rtol=1e-12)
    assert int(correct) == int(np.sum(np.argmax(out, -1) == y[rows]))


def test_a_batch_larger_than_the_physical_one_is_one_step(xor):
    """Eleven examples in physical batches of 4 (three, summed) with noise σ = 1: the gradient of
    one physical batch of 16, so one noise draw; in fit, physical batches of 2 of an expected 16
    still make one optimizer update a step (the optimizer adds 1 to every param per update)."""
    model, params, state, x, y = _case()
    rows = np.array([0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11])
    indices = jnp.asarray(np.concatenate([rows, np.zeros(16 - len(rows), int)]), jnp.int32)
    key = jax.random.PRNGKey(2)
    by = {p: jax.jit(privacy.poisson_dp_grad(model, LOSS, 0.5, 1.0, expected_batch=6, physical=p))(
        params, state, x, y, indices, jnp.int32(len(rows)), key=key)[0] for p in (4, 16)}
    _assert_trees_close(by[4], by[16])

    ones = optax.GradientTransformation(lambda p: optax.EmptyState(),
                                        lambda u, s, p=None: (jax.tree_util.tree_map(jnp.ones_like, u), s))
    result = _fit(xor, privacy.DPSGD(1.0, 1.0, physical_batch=2), optimizer=ones, restore_best=False)
    start, _, _ = MODEL.init(jax.random.split(jax.random.PRNGKey(0), 3)[0], xor.in_shape)
    steps = result.history[-1]["step"]
    assert steps == 230 // 16 and result.dp_physical_batch == 2
    for a, b in zip(jax.tree_util.tree_leaves(result.params), jax.tree_util.tree_leaves(start)):
        np.testing.assert_allclose(np.asarray(a) - np.asarray(b), steps, atol=1e-5)


# ----------------------------------------------------------------------------- fit and bpjax train


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_is_dp_accountings_for_the_poisson_sampling_run(xor, accountant):
    result = _fit(xor, privacy.DPSGD(1.0, 1.1, 1e-5, accountant=accountant))
    (row,) = result.history
    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(16 / 230, dp_accounting.GaussianDpEvent(1.1))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, 230 // 16))
    assert row["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert (row["dp_sampling"], row["dp_accountant"]) == ("poisson", accountant)


def test_a_poisson_run_resumes_bit_for_bit(xor, tmp_path, monkeypatch):
    """SIGINT before epoch 2's first chunk (two steps a chunk): the resumed run draws the same
    batches and reaches the uninterrupted run's params bit for bit."""
    kw = dict(epochs=2, steps_per_dispatch=2)
    dp = privacy.DPSGD(1.0, 1.1)
    full = _fit(xor, dp, **kw)
    real_run_epoch, calls = loop._run_epoch, []

    def interrupting(*a, signals, **k):
        calls.append(1)
        if len(calls) == 2:
            signals.caught = int(signal.SIGINT)
        return real_run_epoch(*a, signals=signals, **k)

    monkeypatch.setattr(loop, "_run_epoch", interrupting)
    assert _fit(xor, dp, **kw, checkpoint_dir=tmp_path / "ck").interrupted_by == "SIGINT"
    monkeypatch.setattr(loop, "_run_epoch", real_run_epoch)
    resumed = _fit(xor, dp, **kw, checkpoint_dir=tmp_path / "ck", resume=True)
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)
    assert resumed.history[-1]["epsilon"] == full.history[-1]["epsilon"]


def test_a_dp_run_names_its_sampling_and_accountant_and_keeps_them_on_resume(tmp_path, capsys):
    out = tmp_path / "dp"
    assert cli.main([*TRAIN, "--dp-delta", "1e-5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "DP-SGD: each example's gradient clipped to 1" in printed and "--dp-sampling poisson" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dp = json.loads((out / "summary.json").read_text())["dp"]
    assert dp == {"epsilon": rows[-1]["epsilon"], "delta": 1e-5, "steps": 14, "sampling": "poisson",
                  "accountant": "rdp", "clip": 1.0, "noise": 1.1, "clip_mode": "flat", "microbatch": None,
                  "expected_batch": 16, "physical_batch": 28}
    info = json.loads((out / "run.json").read_text())
    assert (info["dp_sampling"], info["dp_accountant"]) == ("poisson", "rdp")
    assert cli.main([*TRAIN, "--out", str(out), "--resume", "--dp-sampling", "shuffle"]) == 2
    assert "--dp-sampling shuffle (the run has poisson)" in capsys.readouterr().err


def test_shuffled_batches_say_that_epsilon_is_not_a_guarantee(tmp_path, capsys):
    out = tmp_path / "shuffled"
    assert cli.main([*TRAIN, "--dp-sampling", "shuffle", "--dp-accountant", "pld", "--metrics-format", "csv",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    sentence = ("epsilon is not a guarantee for this run: its batches were cut from each epoch's shuffled order "
                "(--dp-sampling shuffle), and epsilon was computed as if each example had been Poisson-sampled "
                "at rate batch/n")
    assert printed[-2] == f"bpjax train: {sentence}"
    dp = json.loads((out / "summary.json").read_text())["dp"]
    assert (dp["sampling"], dp["accountant"], dp["note"]) == ("shuffle", "pld", sentence)
    assert "dp_sampling,dp_accountant" in (out / "metrics.csv").read_text().splitlines()[0]


def test_bad_dp_options_are_one_line_each(tmp_path, capsys):
    for argv, msg in ((["--dp-clip", "0", "--dp-noise", "1"], "expected --dp-clip > 0"),
                      (["--dp-clip", "1", "--dp-noise", "-1"], "expected --dp-noise >= 0"),
                      (["--dp-clip", "1", "--dp-noise", "1", "--dp-delta", "1"], "expected --dp-delta in (0, 1)"),
                      (["--dp-clip", "1", "--dp-noise", "1", "--dp-physical-batch", "0"],
                       "expected --dp-physical-batch to be an integer >= 1, got 0"),
                      (["--dp-clip", "1", "--dp-noise", "1", "--dp-sampling", "shuffle", "--dp-physical-batch", "8"],
                       "expected --dp-physical-batch only with --dp-sampling poisson"),
                      (["--dp-clip", "1", "--dp-noise", "1", "--dp-clip-mode", "layer"],
                       "expected --dp-clip-mode to be one of flat, per-layer, automatic, got 'layer'"),
                      (["--dp-clip", "1", "--dp-noise", "1", "--dp-microbatch", "0"],
                       "expected --dp-microbatch to be an integer >= 1 or None, got 0"),
                      (["--dp-clip", "1", "--dp-noise", "1", "--dp-microbatch", "two"],
                       "expected --dp-microbatch to be an integer >= 1, got 'two'"),
                      (["--dp-clip", "1", "--dp-noise", "1", "--dp-sampling", "shuffle", "--dp-microbatch", "5"],
                       "expected --dp-microbatch to divide --batch-size 16, got 5"),
                      (["--dp-clip", "1", "--dp-noise", "1", "--dp-physical-batch", "8", "--dp-microbatch", "3"],
                       "expected --dp-microbatch to divide --dp-physical-batch 8, got 3"),
                      (["--dp-noise", "1"], "expected --dp-clip"),
                      (["--dp-sampling", "shuffle"], "expected --dp-clip"),
                      (["--dp-clip", "1"], "expected --dp-noise")):
        assert cli.main(["train", "--dataset", "xor", *argv, "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err


def test_a_dp_run_records_its_clip_mode_and_microbatch(tmp_path, capsys):
    """--dp-clip-mode and --dp-microbatch reach the step (the announced line, summary.json) and
    join run.json's defining arguments: a resume with another mode is refused, naming it."""
    out = tmp_path / "per_layer"
    argv = [*TRAIN, "--dp-sampling", "shuffle", "--dp-clip-mode", "per-layer", "--dp-microbatch", "8"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    assert "clipped layer by layer to 1/√L (L layers with params), 8 rows per backward" in capsys.readouterr().out
    info = json.loads((out / "run.json").read_text())
    assert (info["dp_clip_mode"], info["dp_microbatch"]) == ("per-layer", 8)
    dp = json.loads((out / "summary.json").read_text())["dp"]
    assert (dp["clip_mode"], dp["microbatch"]) == ("per-layer", 8)
    assert cli.main([*TRAIN, "--dp-sampling", "shuffle", "--dp-clip-mode", "automatic", "--dp-microbatch", "8",
                     "--out", str(out), "--resume"]) == 2
    assert "--dp-clip-mode automatic (the run has per-layer)" in capsys.readouterr().err


def test_dp_epsilon_chooses_the_noise_for_the_run_and_records_it(tmp_path, capsys):
    """--dp-epsilon E: σ is the least (to 0.1%) whose ε after the run's steps at its rate is at
    most E (xor: 230 training examples, 14 steps of 16), printed, in summary.json and run.json;
    with --dp-noise too, one line."""
    out = tmp_path / "eps"
    argv = [a for a in TRAIN if a not in ("--dp-noise", "1.1")]
    assert cli.main([*argv, "--dp-epsilon", "3", "--out", str(out)]) == 0
    sigma = privacy.dp_noise_for(3.0, 16 / 230, 14, 1e-5)
    assert privacy.dp_epsilon(sigma, 16 / 230, 14, 1e-5) <= 3.0 < privacy.dp_epsilon(sigma / 1.001, 16 / 230, 14, 1e-5)
    assert f"--dp-epsilon 3: noise multiplier {sigma:.4g}" in capsys.readouterr().out
    dp = json.loads((out / "summary.json").read_text())["dp"]
    assert (dp["noise"], dp["target_epsilon"]) == (sigma, 3.0) and dp["epsilon"] <= 3.0
    info = json.loads((out / "run.json").read_text())
    assert (info["dp_noise"], info["dp_epsilon"]) == (sigma, 3.0)
    assert cli.main([*TRAIN, "--dp-epsilon", "3", "--out", str(tmp_path / "both")]) == 2
    err = capsys.readouterr().err
    assert "expected --dp-noise or --dp-epsilon" in err and "got both" in err and err.count("\n") == 1
