"""Run folders: two runs never mix in one (refuse, --overwrite, --resume with the same or other
arguments, in real ``python -m bpjax train`` processes), and a finished run gives back a model
you can use (``bpjax.load_run``, ``bpjax evaluate``, ``bpjax predict``), with one-line errors for
a folder that is damaged, unfinished or for another model."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

import bpjax as bp
from bpjax import cli, train
from bpjax.cli import train as train_cli
from bpjax.train import runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = ["train", "--model", "textbook_mlp", "--dataset", "xor", "--batch-size", "32", "--schedule", "constant",
        "--no-progress", "--no-plot"]
TRAIN = [*BASE, "--epochs", "2"]


def _bpjax(*args, wait=True):
    """``python -m bpjax ARGS``: finished (bounded by a timeout), or started (``wait=False``)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "bpjax", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)


def _one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    for w in words:
        assert w in line, (w, line)
    return line


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _steps(run):
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished 2-epoch run (the other tests copy it before changing it); --resume into a
    folder that holds no run starts one, and says so."""
    run = tmp_path_factory.mktemp("runs") / "run"
    proc = _bpjax(*TRAIN, "--out", run, "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"bpjax train: --resume: {run} holds no run yet; starting one" in proc.stdout
    return run


@pytest.fixture
def copy(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


# ----------------------------------------------------------------------------- the folder


def test_the_run_folder_layout(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"run.json", "checkpoints", "model", "metrics.jsonl", "summary.json"} <= names
    info = json.loads((trained / "run.json").read_text())
    assert info["model"] == "textbook_mlp" and info["dataset"] == "xor" and info["seed"] == 0
    assert info["model_args"] == {"num_classes": 2} and info["in_shape"] == [2] and info["bpjax_version"] == bp.__version__
    assert "epochs" not in info             # a constant schedule: the run may be extended


def test_a_second_run_into_the_folder_is_refused(copy):
    before = (copy / "metrics.jsonl").read_text(), _steps(copy)
    line = _one_line_error(_bpjax(*TRAIN, "--out", copy), str(copy), "--resume", "--overwrite")
    assert line.startswith("bpjax train: ")
    assert ((copy / "metrics.jsonl").read_text(), _steps(copy)) == before      # untouched


def test_resume_with_other_defining_arguments_is_refused(copy):
    proc = _bpjax(*TRAIN, "--out", copy, "--resume", "--lr", "0.05", "--seed", "1")
    line = _one_line_error(proc, str(copy), "--lr 0.05 (the run has 0.03)", "--seed 1 (the run has 0)")
    assert line.startswith("bpjax train: --resume")
    assert len(_rows(copy)) == 2


@pytest.fixture(scope="module")
def resumed_and_overwritten(trained, tmp_path_factory):
    """Two copies of the run, side by side: one resumed with the same arguments (and, as the
    schedule is constant, one more epoch), one overwritten by a 1-epoch run of another seed."""
    d = tmp_path_factory.mktemp("again")
    resumed, overwritten = d / "resumed", d / "overwritten"
    for run in (resumed, overwritten):
        shutil.copytree(trained, run)
    (overwritten / "notes.txt").write_text("mine")
    procs = [_bpjax(*BASE, "--epochs", "3", "--out", resumed, "--resume", wait=False),
             _bpjax(*BASE, "--epochs", "1", "--out", overwritten, "--overwrite", "--seed", "1", wait=False)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
    return (resumed, outs[0][0]), (overwritten, outs[1][0])


def test_resume_with_the_same_arguments_continues_the_run(resumed_and_overwritten):
    (run, out), _ = resumed_and_overwritten
    assert "resumed from" in out and "epoch 2 done" in out
    assert [r["epoch"] for r in _rows(run)] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 3


def test_overwrite_removes_the_old_run_and_only_it(resumed_and_overwritten):
    _, (run, out) = resumed_and_overwritten
    assert "resumed" not in out
    assert [r["epoch"] for r in _rows(run)] == [1] and len(_steps(run)) == 1
    assert json.loads((run / "run.json").read_text())["seed"] == 1
    assert (run / "notes.txt").read_text() == "mine"


def _files(run):
    """Every file of a run folder, by its path, with its bytes."""
    return {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file()}


def test_resume_of_a_run_that_stopped_early_changes_nothing(tmp_path):
    """Its early stop fired after epoch 2 (no fall of the error counts under --min-delta 10):
    --resume says the run had ended and leaves every file as it was, each time."""
    run, stops = tmp_path / "run", [*BASE, "--epochs", "5", "--patience", "1", "--min-delta", "10"]
    proc = _bpjax(*stops, "--out", run)
    assert proc.returncode == 0 and "early stop after epoch 2" in proc.stdout, proc.stdout + proc.stderr
    before = _files(run)
    for _ in range(2):
        proc = _bpjax(*stops, "--out", run, "--resume")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.strip().splitlines()[-1].startswith(
            f"bpjax train: --resume: the run in {run} had ended (early stop after epoch 2); nothing changed: ")
        assert "early stop after epoch 3" not in proc.stdout
        assert _files(run) == before


def test_resume_of_a_run_that_ran_all_its_epochs_changes_nothing(copy, capsys):
    before = _files(copy)
    assert cli.main([*TRAIN, "--out", str(copy), "--resume"]) == 0
    assert f"the run in {copy} had ended (all its epochs run); nothing changed" in capsys.readouterr().out
    assert _files(copy) == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "thesis.tex").write_text("mine")
    _one_line_error(_bpjax(*TRAIN, "--out", tmp_path, "--overwrite"), str(tmp_path), "thesis.tex",
                   "--overwrite expected a run folder")
    assert (tmp_path / "thesis.tex").read_text() == "mine"


def _args(**kw):
    base = dict(model="mlp", dataset="xor", seed=0, dtype="float32", batch_size=32, optimizer="adam", lr=0.01,
                schedule="cosine", weight_decay=0.0, val_fraction=0.1, epochs=2, metrics_format="jsonl")
    return types.SimpleNamespace(**{**base, **kw})


def test_epochs_define_the_run_only_under_a_schedule_that_depends_on_them():
    cosine = train_cli.run_arguments(_args())
    assert train_cli._differences(train_cli.run_arguments(_args(epochs=4)), cosine) == ["--epochs 4 (the run has 2)"]
    constant = train_cli.run_arguments(_args(schedule="constant"))
    assert train_cli._differences(train_cli.run_arguments(_args(schedule="constant", epochs=4)), constant) == []
    assert train_cli._differences(constant, cosine) == ["--schedule constant (the run has cosine)"]
    assert train_cli._differences({**cosine, "bpjax_version": "9.9"}, cosine) == [
        f"bpjax 9.9 (the run was written by bpjax {bp.__version__})"]


def test_resume_without_run_json_and_resume_with_overwrite_are_refused(tmp_path, capsys):
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)          # a run of an older bpjax
    assert cli.main([*TRAIN, "--out", str(tmp_path / "old"), "--resume"]) == 2
    assert "run.json describing the run to continue, got none" in capsys.readouterr().err
    assert cli.main([*TRAIN, "--out", str(tmp_path / "new"), "--resume", "--overwrite"]) == 2
    assert "expected --resume or --overwrite, got both" in capsys.readouterr().err


# ----------------------------------------------------------------------------- using the model


def test_evaluate_prints_exactly_the_summary_test_metrics(trained, capsys):
    summary = json.loads((trained / "summary.json").read_text())
    assert cli.main(["evaluate", str(trained)]) == 0
    words = capsys.readouterr().out.strip().splitlines()[-1].split()
    printed = {k: float(v) for k, v in zip(words[::2], words[1::2])}
    assert printed == {"test_loss": summary["test_loss"], "test_acc": summary["test_acc"]}
    assert bp.load_run(trained).evaluate() == {"loss": summary["test_loss"], "acc": summary["test_acc"]}


def test_load_run_rebuilds_the_model_and_predicts_in_inference_mode(trained):
    run = bp.load_run(trained)
    assert run.info["model"] == "textbook_mlp" and isinstance(run.model, bp.Layer)
    x = np.random.default_rng(0).normal(size=(2345, 2)).astype(np.float32)
    want, _, _ = run.model.forward(run.params, run.state, x, train=False)
    np.testing.assert_allclose(run.predict(x), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(run.predict(x, batch_size=7)[:30], want[:30], rtol=1e-6, atol=1e-6)
    assert run.predict(x[:0]).shape == (0, 2)
    with pytest.raises(ValueError, match=r"predict: expected x of shape \(N, 2\) .* got \(4, 3\)"):
        run.predict(np.zeros((4, 3)))


def test_predict_command_writes_the_outputs(trained, tmp_path, capsys):
    x = np.random.default_rng(1).normal(size=(50, 2))                  # float64: cast to the run's float32
    np.save(tmp_path / "x.npy", x)
    assert cli.main(["predict", str(trained), str(tmp_path / "x.npy"), "--out", str(tmp_path / "y.npy")]) == 0
    assert "(50, 2) float32 outputs of textbook_mlp" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), bp.load_run(trained).predict(x))


def test_the_model_leaves_are_named_by_their_tree_paths(trained):
    import orbax.checkpoint as ocp
    saved = ocp.StandardCheckpointer().metadata((trained / "model").absolute()).item_metadata
    run = bp.load_run(trained)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(run.params)[0]]
    assert sorted(saved["params"]) == sorted(names) and "[0]['w']" in names


def _damage(run, how):
    if how == "no run.json":
        (run / "run.json").unlink()
        return "run.json (written by bpjax train when a run starts), got no such file"
    if how == "damaged run.json":
        (run / "run.json").write_text("{ not json")
        return "run.json to be JSON, got a damaged file"
    if how == "unfinished":
        shutil.rmtree(run / "model")
        return "got no such folder: the run has not finished"
    if how == "another model":
        info = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**info, "model": "mlp"}))
        return "to hold the params of mlp(num_classes=2), got"
    if how == "damaged model":
        for f in (run / "model").rglob("*"):
            if f.is_file() and f.stat().st_size > 0:
                f.write_bytes(b"\x00garbage" * 4)
        return "got a damaged one"
    if how == "no folder":
        shutil.rmtree(run)
        return "which does not exist"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["no run.json", "damaged run.json", "unfinished", "another model", "damaged model",
                                 "no folder"])
def test_a_bad_run_folder_is_one_clear_error(copy, how, capsys):
    words = _damage(copy, how)
    with pytest.raises(runs.RunError, match="^load_run: ") as e:
        bp.load_run(copy)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert cli.main(["evaluate", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bpjax evaluate: ") and words in err and len(err.strip().splitlines()) == 1


def test_predict_command_usage_errors_exit_2(trained, tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.zeros((3, 5), np.float32))
    assert cli.main(["predict", str(trained), str(tmp_path / "bad.npy"), "--out", str(tmp_path / "y.npy")]) == 2
    assert "bpjax predict: expected x of shape (N, 2) for textbook_mlp on xor, got (3, 5)" in capsys.readouterr().err
    assert cli.main(["predict", str(trained), str(tmp_path / "none.npy"), "--out", str(tmp_path / "y.npy")]) == 2
    assert "bpjax predict: expected INPUT to be a .npy file" in capsys.readouterr().err
    assert not (tmp_path / "y.npy").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"bpjax {bp.__version__}"
