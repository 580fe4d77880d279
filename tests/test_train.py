"""The training loop: loss falls, data order is deterministic, resuming is exact, faults are clear."""
from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import optax
import pytest

import bpjax as bp
from bpjax import datasets, models, train


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


def test_a_non_finite_loss_names_the_step(xor, tmp_path):
    bad = xor._replace(x_train=np.where(np.arange(len(xor.x_train))[:, None] == 5, np.nan, xor.x_train))
    with pytest.raises(train.TrainingError, match=r"the loss became nan at step \d+ \(epoch 1, batch \d+\); the last good checkpoint is kept"):
        _fit(bad, epochs=2, batch_size=32, val_fraction=0.0, checkpoint_dir=tmp_path / "ck")


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


def test_train_command_smoke(tmp_path, capsys):
    from bpjax import cli
    assert cli.main(["train", "--model", "textbook_mlp", "--dataset", "xor", "--epochs", "2",
                     "--batch-size", "32", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "bpjax train: textbook_mlp on xor" in out and "done in" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and 0 <= summary["test_acc"] <= 1
    assert (tmp_path / "run" / "curves.png").exists() and (tmp_path / "run" / "metrics.jsonl").exists()
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 2 and steps[1] == 2 * steps[0]        # one per epoch, named by global step


def test_train_help_lists_models_datasets_and_options(capsys):
    from bpjax import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for word in ("cnn", "resnet1d", "mnist1d", "digits", "xor", "--resume", "--epochs", "--devices"):
        assert word in out, word


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
