"""The training loop: loss falls, data order is deterministic, resuming is exact, faults are clear."""
from __future__ import annotations

import json
import re
import shutil
import signal
import sys

import jax
import numpy as np
import optax
import pytest

import bpjax as bp
from bpjax import datasets, models, train
from bpjax.cli import train as train_cli
from bpjax.train import loop


def _fit(data, **kw):
    kw.setdefault("optimizer", optax.adam(1e-2))
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda s: None)
    return train.fit(models.textbook_mlp(data.num_classes), bp.softmax_cross_entropy(), data, **kw)


@pytest.fixture(scope="module")
def xor():
    return datasets.xor()


def test_a_short_run_lowers_the_loss(xor):
    result = _fit(xor, epochs=30, batch_size=32, patience=None, optimizer=optax.adam(5e-2))
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.test["acc"] > 0.9


def test_data_order_is_deterministic_given_the_key():
    key = jax.random.PRNGKey(3)
    a, b = train.epoch_order(key, 1, 50), train.epoch_order(key, 1, 50)
    np.testing.assert_array_equal(a, b)
    assert sorted(a) == list(range(50))
    assert not np.array_equal(a, train.epoch_order(key, 2, 50))
    assert not np.array_equal(a, train.epoch_order(jax.random.PRNGKey(4), 1, 50))


def test_resuming_reaches_the_same_params_bit_for_bit(xor, tmp_path):
    kw = dict(epochs=6, batch_size=32, patience=None)
    full = _fit(xor, **kw, metrics_path=tmp_path / "full.jsonl")
    _fit(xor, **kw, checkpoint_dir=tmp_path / "ck", metrics_path=tmp_path / "m.jsonl", stop_after_epoch=3)
    resumed = _fit(xor, **kw, checkpoint_dir=tmp_path / "ck", metrics_path=tmp_path / "m.jsonl", resume=True)
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    full_rows = [json.loads(line) for line in (tmp_path / "full.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 7))
    assert [r["val_loss"] for r in rows] == [r["val_loss"] for r in full_rows]


def test_early_stopping_when_validation_error_stops_falling(xor):
    result = _fit(xor, epochs=200, batch_size=32, patience=2, min_delta=10.0)   # nothing counts as falling
    assert result.stopped_early and len(result.history) == 3 and result.best_epoch == 1


def test_resuming_a_run_that_stopped_early_trains_nothing(xor, tmp_path):
    """Its early stop had fired: resumed, it stays stopped (rows and checkpoints as they were),
    unless a larger patience is given, under which it goes on until that runs out."""
    kw = dict(epochs=200, batch_size=32, min_delta=10.0, checkpoint_dir=tmp_path / "ck",
              metrics_path=tmp_path / "m.jsonl")
    _fit(xor, **kw, patience=2)
    before = (tmp_path / "m.jsonl").read_bytes(), sorted(p.name for p in (tmp_path / "ck").iterdir())
    logs = []
    again = _fit(xor, **kw, patience=2, resume=True, log=logs.append)
    assert again.already_ended and again.stopped_early and len(again.history) == 3 and again.best_epoch == 1
    assert ((tmp_path / "m.jsonl").read_bytes(), sorted(p.name for p in (tmp_path / "ck").iterdir())) == before
    assert any("the run had ended: early stop after epoch 3" in line for line in logs), logs
    longer = _fit(xor, **kw, patience=4, resume=True)
    assert not longer.already_ended and longer.stopped_early and [r["epoch"] for r in longer.history] == [1, 2, 3, 4, 5]


def _run_state(best_val=np.inf, best_loss=np.inf, since_best=0, best_epoch=0):
    return {"best_val": np.float64(best_val), "best_loss": np.float64(best_loss), "since_best": np.int64(since_best),
            "best_epoch": np.int64(best_epoch), "best_params": None, "best_state": None}


@pytest.mark.parametrize("errors,losses,min_delta,best,since_best", [
    ([0.1, 0.0, 0.0, 0.0], [0.5, 0.4, 0.3, 0.35], 0.0, 3, 2),      # a tie of accuracies: the lower loss
    ([0.1, 0.0, 0.0], [0.5, 0.4, 0.45], 0.0, 2, 1),                # a tie at a higher loss: kept
    ([0.2, 0.1, 0.1], [0.5, 0.6, 0.4], 0.0, 3, 1),                 # the error first, then the loss
    ([0.2, 0.15, 0.15], [0.5, 0.4, 0.3], 0.1, 1, 2),               # a fall under min_delta is no progress
])
def test_the_best_epoch_breaks_ties_of_the_error_by_the_validation_loss(errors, losses, min_delta, best, since_best):
    """Early stopping counts only falls of the error; the params kept are those of the lowest
    error and, of the epochs with that error, the lowest validation loss."""
    run = _run_state()
    for epoch, (error, loss) in enumerate(zip(errors, losses), start=1):
        loop._update_best(run, error, loss, min_delta, epoch, np.full(2, epoch), {}, {})
    assert int(run["best_epoch"]) == best and int(run["best_params"][0]) == best
    assert int(run["since_best"]) == since_best


def test_a_non_finite_loss_names_the_step(xor, tmp_path):
    bad = xor._replace(x_train=np.where(np.arange(len(xor.x_train))[:, None] == 5, np.nan, xor.x_train))
    with pytest.raises(train.TrainingError, match=r"the loss became nan at step \d+ \(epoch 1, batch \d+\); no checkpoint had been written yet$"):
        _fit(bad, epochs=2, batch_size=32, val_fraction=0.0, checkpoint_dir=tmp_path / "ck")
    _fit(xor, epochs=1, batch_size=32, val_fraction=0.0, checkpoint_dir=tmp_path / "ck")
    with pytest.raises(train.TrainingError, match=r"at step \d+ \(epoch 2, batch \d+\); the last good checkpoint is kept in "):
        _fit(bad, epochs=2, batch_size=32, val_fraction=0.0, checkpoint_dir=tmp_path / "ck", resume=True)


def test_a_checkpoint_from_another_model_is_refused(xor, tmp_path):
    _fit(xor, epochs=1, batch_size=32, checkpoint_dir=tmp_path / "ck")
    other = bp.sequential(bp.dense(3), bp.relu(), bp.dense(2))
    with pytest.raises(train.TrainingError, match="does not fit this run"):
        train.fit(other, bp.softmax_cross_entropy(), xor, epochs=2, batch_size=32, progress=False,
                  log=lambda s: None, checkpoint_dir=tmp_path / "ck", resume=True)


def test_a_corrupt_checkpoint_is_refused(xor, tmp_path):
    _fit(xor, epochs=1, batch_size=32, checkpoint_dir=tmp_path / "ck")
    (latest,) = [d for d in (tmp_path / "ck").iterdir() if d.name.isdigit()]
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "METADATA" not in f.name:
            f.write_bytes(b"\x00garbage" * 4)
    with pytest.raises(train.TrainingError, match="does not fit this run"):
        _fit(xor, epochs=2, batch_size=32, checkpoint_dir=tmp_path / "ck", resume=True)


def test_csv_metrics_and_plot(xor, tmp_path):
    _fit(xor, epochs=3, batch_size=32, metrics_path=tmp_path / "m.csv", plot_path=tmp_path / "c.png")
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines[0].split(",")[:3] == ["epoch", "step", "train_loss"] and len(lines) == 4
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_regression_dataset_trains_with_squared_error():
    data = datasets.regression()
    result = train.fit(models.textbook_mlp(1), bp.squared_error(), data, optimizer=optax.adam(1e-2),
                       epochs=5, batch_size=32, progress=False, log=lambda s: None)
    assert "acc" not in result.test and result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_train_command_trains_xor_with_its_defaults(tmp_path, capsys):
    """`--dataset xor` alone picks the textbook network and a recipe that leaves XOR's plateau."""
    from bpjax import cli
    assert cli.main(["train", "--dataset", "xor", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "bpjax train: textbook_mlp on xor" in out and "batch 16, adam lr 0.03 (cosine)" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"bpjax train: textbook_mlp reached {100 * summary['test_acc']:.1f}% test accuracy "
                           f"on xor in ") and f"the run is in {tmp_path / 'run'} " in last
    assert summary["test_acc"] >= 0.95
    assert (tmp_path / "run" / "curves.png").exists() and (tmp_path / "run" / "metrics.jsonl").exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    top = max(r["val_acc"] for r in rows)           # XOR's validation split: 100% is reached, then tied
    assert summary["best_epoch"] == min((r for r in rows if r["val_acc"] == top), key=lambda r: r["val_loss"])["epoch"]
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    per_epoch = steps[-1] - steps[-2]                        # one per epoch, named by global step
    assert steps[-1] == summary["epochs_run"] * per_epoch


def test_recipes_fill_only_what_the_user_left_unset():
    import argparse
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    default = parser.parse_args([])
    train_cli.apply_recipe(default)
    assert (default.model, default.optimizer, default.lr, default.epochs) == ("resnet1d", "adamw", 3e-3, 30)
    paper = parser.parse_args(["--model", "cnn", "--lr", "0.05"])
    train_cli.apply_recipe(paper)
    assert (paper.optimizer, paper.lr, paper.batch_size, paper.patience) == ("adam", 0.05, 100, 10)
    assert parser.parse_args(["--dataset", "digits"]).model is None
    digits = parser.parse_args(["--dataset", "digits"])
    train_cli.apply_recipe(digits)
    assert digits.model == "digits_cnn"


def test_train_help_lists_models_datasets_and_options(capsys):
    from bpjax import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for word in ("cnn", "resnet1d", "mnist1d", "digits", "xor", "--resume", "--epochs", "--devices"):
        assert word in out, word
    options = re.split(r"\n  (?=-)", out.split("options:")[1])      # one block per option
    assert len(options) > 30
    said_twice = [o.split()[0] for o in options if o.count("(default") > 1]
    assert not said_twice, said_twice                     # e.g. "(default: the model's recipe) (default: None)"


def test_missing_optional_package_names_the_install_command(monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("mnist1d"):
            raise ImportError("no")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="pip install mnist1d"):
        datasets.mnist1d(cache=False)


@pytest.mark.parametrize("per_dispatch", [1, 3])
def test_the_chunk_size_does_not_change_the_result(xor, per_dispatch):
    kw = dict(epochs=3, batch_size=32, patience=None)
    auto = _fit(xor, **kw)                                  # chunks sized from the step time
    fixed = _fit(xor, **kw, steps_per_dispatch=per_dispatch)
    for a, b in zip(jax.tree_util.tree_leaves(auto.params), jax.tree_util.tree_leaves(fixed.params)):
        np.testing.assert_array_equal(a, b)
    assert [r["train_loss"] for r in auto.history] == [r["train_loss"] for r in fixed.history]


def test_a_mid_epoch_interrupt_resumes_exactly(xor, tmp_path, monkeypatch):
    """SIGINT lands between chunks: with 2 steps a chunk, after step 2 of epoch 2; the resumed
    run reaches the uninterrupted run's params bit for bit."""
    kw = dict(epochs=3, batch_size=32, patience=None, steps_per_dispatch=2)
    full = _fit(xor, **kw)
    real_run_epoch, calls = loop._run_epoch, []

    def interrupting(*a, signals, **k):
        calls.append(1)
        if len(calls) == 2:                                 # epoch 2: a signal before its first chunk
            signals.caught = int(signal.SIGINT)
        return real_run_epoch(*a, signals=signals, **k)

    monkeypatch.setattr(loop, "_run_epoch", interrupting)
    stopped = _fit(xor, **kw, checkpoint_dir=tmp_path / "ck")
    assert stopped.interrupted_by == "SIGINT" and len(stopped.history) == 1
    monkeypatch.setattr(loop, "_run_epoch", real_run_epoch)
    logs = []
    resumed = _fit(xor, **kw, checkpoint_dir=tmp_path / "ck", resume=True, log=logs.append)
    assert any("epoch 1 done, 2 batches of epoch 2" in line for line in logs), logs
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)


def test_fit_reuses_the_compiled_loop(xor):
    """Two fits of one model, loss and optimizer share one compiled chunk of steps."""
    model, loss, opt = models.textbook_mlp(2), bp.softmax_cross_entropy(), optax.adam(1e-2)
    kw = dict(optimizer=opt, epochs=1, batch_size=32, progress=False, log=lambda s: None)
    train.fit(model, loss, xor, **kw)
    before = train.make_train_chunk.cache_info()
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None)
    try:
        train.fit(model, loss, xor, **kw, seed=1)
    finally:
        jax.monitoring.clear_event_listeners()
    assert compiles == []                                   # nothing at all compiled again
    after = train.make_train_chunk.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses
    n_train = xor.x_train.shape[0] - int(round(0.1 * xor.x_train.shape[0]))
    chunk = train.make_train_chunk(model, loss, opt, batch_size=32, max_steps=n_train // 32,
                                   classification=True, mesh=None, fsdp=False, compute_dtype=None)
    assert train.make_train_chunk.cache_info().hits == after.hits + 1    # the one fit used
    assert chunk._cache_size() == 1                         # one compile served both runs


def test_steps_per_dispatch_must_be_positive(xor):
    with pytest.raises(ValueError, match="expected steps_per_dispatch >= 1 or None, got 0"):
        _fit(xor, epochs=1, batch_size=32, steps_per_dispatch=0)


def test_bfloat16_compute_keeps_float32_master_weights(xor):
    import jax.numpy as jnp
    result = _fit(xor, epochs=30, batch_size=32, patience=None, optimizer=optax.adam(5e-2),
                  compute_dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree_util.tree_leaves(result.params)} == {np.dtype("float32")}
    assert result.test["acc"] > 0.9 and np.isfinite(result.history[-1]["train_loss"])


@pytest.mark.parametrize("split,bad,message", [
    ("y_train", -1, r"fit \(training split\): expected labels in \[0, 2\), got labels in \[-1, 1\] \(1 of \d+ out of range, the first at index 3\)"),
    ("y_train", 2, r"fit \(training split\): expected labels in \[0, 2\), got labels in \[0, 2\]"),
    ("y_test", 10, r"fit \(test split\): expected labels in \[0, 2\), got labels in \[0, 10\]"),
])
def test_labels_out_of_range_are_refused_before_training(xor, split, bad, message):
    y = getattr(xor, split)
    data = xor._replace(**{split: np.where(np.arange(len(y)) == 3, bad, y)})
    with pytest.raises(ValueError, match=message):
        _fit(data, epochs=1, batch_size=32)


def test_float_labels_and_an_uncalled_loss_are_refused(xor):
    with pytest.raises(ValueError, match=r"fit \(test split\): expected integer class labels, got labels of dtype float64"):
        _fit(xor._replace(y_test=xor.y_test.astype(np.float64)), epochs=1)
    unlabelled = xor._replace(y_train=xor.y_train.astype(np.float32), y_test=xor.y_test.astype(np.float32),
                              num_classes=None)          # a dataset of float y, given to cross-entropy
    dtype = r"expected integer labels for targets of shape \(32,\) \(probabilities have shape \(32, 2\)\), got dtype float32"
    with pytest.raises(ValueError, match="^softmax_cross_entropy: " + dtype):
        train.fit(models.textbook_mlp(2), bp.softmax_cross_entropy(), unlabelled, epochs=1, batch_size=32,
                  progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match=dtype):
        bp.softmax_cross_entropy().forward(np.zeros((32, 2), np.float32), np.zeros(32, np.float32))
    with pytest.raises(TypeError, match="did you forget to call the factory"):
        train.fit(models.textbook_mlp(2), bp.softmax_cross_entropy, xor, epochs=1, progress=False)


def test_train_command_names_bad_labels_in_one_line(tmp_path, monkeypatch, capsys):
    from bpjax import cli
    xor = datasets.xor()
    bad = xor._replace(y_train=np.where(np.arange(len(xor.y_train)) == 0, 7, xor.y_train))
    monkeypatch.setitem(datasets.DATASETS, "xor", lambda **kw: bad)
    code = cli.main(["train", "--model", "textbook_mlp", "--dataset", "xor", "--epochs", "1",
                     "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("bpjax train: fit (training split): expected labels in [0, 2), got labels in [0, 7]")
    assert not (tmp_path / "run").exists()                   # no half-run left to refuse the next try


@pytest.mark.parametrize("argv,message", [
    (["--model", "gru", "--dataset", "digits"],
     "bpjax train: --model gru does not fit --dataset digits (examples of shape (8, 8, 1), 10 outputs): "
     "expected one of cnn, digits_cnn, logreg, mlp, resnet1d, got gru"),
    (["--model", "textbook_mlp", "--dataset", "mnist1d"],
     "bpjax train: --model textbook_mlp does not fit --dataset mnist1d (examples of shape (40, 1), 10 outputs): "
     "expected one of cnn, digits_cnn, gru, logreg, mlp, resnet1d, got textbook_mlp"),
    (["--model", "cnn", "--dataset", "xor"],
     "bpjax train: --model cnn does not fit --dataset xor (examples of shape (2,), 2 outputs): "
     "expected one of logreg, mlp, textbook_mlp, got cnn"),
    (["--model", "textbook_mlp", "--dataset", "xor", "--devices", "2"],
     "bpjax train: make_mesh: expected 1 <= num_devices <= 1 (the devices JAX sees: cpu x1), got 2; for 2 CPU "
     "devices start Python with JAX_NUM_CPU_DEVICES=2 (or XLA_FLAGS=--xla_force_host_platform_device_count=2) set"),
])
def test_train_command_mismatches_are_one_line(tmp_path, capsys, argv, message):
    from bpjax import cli
    assert cli.main(["train", *argv, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert capsys.readouterr().err == message + "\n"
    assert not (tmp_path / "run").exists()                   # nothing written for a refused run


def test_train_command_names_a_missing_dataset_package(tmp_path, capsys, monkeypatch):
    from bpjax import cli

    def missing(**kw):
        raise ImportError("this dataset needs the 'mnist1d' package: pip install mnist1d (or pip install 'bpjax[train]')")

    monkeypatch.setitem(datasets.DATASETS, "mnist1d", missing)
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert capsys.readouterr().err == ("bpjax train: --dataset mnist1d: this dataset needs the 'mnist1d' package: "
                                       "pip install mnist1d (or pip install 'bpjax[train]')\n")


@pytest.mark.parametrize("module,words", [
    ("orbax.checkpoint", ("bpjax train: the checkpoints need orbax-checkpoint, which is not installed: pip install "
                          "orbax-checkpoint (or pip install 'bpjax[train]')")),
    ("matplotlib", ("bpjax train: the plot needs matplotlib, which is not installed: pip install matplotlib (or pip "
                    "install 'bpjax[train]'; --no-plot does without matplotlib)")),
])
def test_train_command_names_a_missing_training_package_before_writing(tmp_path, capsys, monkeypatch, module, words):
    """`pip install -e .` without the train extra: one line, exit 2, and no run.json left behind
    that would refuse the next try as a second run."""
    from bpjax import cli
    monkeypatch.setitem(sys.modules, module, None)           # `import module` raises ImportError
    argv = ["train", "--dataset", "xor", "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == words + "\n"
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_at_its_start_leaves_no_run_behind(tmp_path, monkeypatch):
    from bpjax import cli

    def failing(*a, **k):
        raise RuntimeError("failed before the first checkpoint")

    monkeypatch.setattr(train_cli, "fit", failing)
    with pytest.raises(RuntimeError, match="before the first checkpoint"):
        cli.main(["train", "--dataset", "xor", "--out", str(tmp_path / "run"), "--no-progress"])
    assert not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(RuntimeError):
        cli.main(["train", "--dataset", "xor", "--out", str(tmp_path / "mine"), "--no-progress"])
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())   # the folder was the user's


def test_the_module_docstring_example_runs(monkeypatch):
    """bpjax.train's docstring example, as written but for one epoch and no progress bar."""
    import re
    (code,) = re.findall(r"::\n\n((?:    .*\n|\n)+)", train.__doc__)
    code = "\n".join(line[4:] for line in code.splitlines())
    assert "epochs=20" in code
    namespace = {}
    exec(code.replace("epochs=20", "epochs=1, progress=False, log=lambda s: None"), namespace)
    assert namespace["result"].history and 0 <= namespace["result"].test["acc"] <= 1
