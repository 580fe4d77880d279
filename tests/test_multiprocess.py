"""Two real processes train together: ``bpjax train --coordinator 127.0.0.1:PORT --num-processes 2
--process-id I`` on localhost, each process with 2 CPU devices, gives the run of one process with 4
devices (``--devices 4``): the same checkpointed run state (params, optimizer state, best params)
to float32 tolerance, the same test accuracy, one metrics file with one row per epoch written by
process 0 alone, and a run folder that ``--resume`` continues. A process that cannot reach the
coordinator fails in one line after ``--init-timeout`` seconds, never a hang or a traceback.

Every subprocess is bounded by a timeout, and both processes of a pair are killed on a failure.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parents[1]
TIMEOUT = 240                        # seconds, per run; a run here takes about 15 s on 2 busy cores
EPOCHS, FIRST = 4, 2                 # the pair runs FIRST epochs, then --resume to EPOCHS
TRAIN = ["train", "--model", "textbook_mlp", "--dataset", "xor", "--batch-size", "32", "--lr", "0.05",
         "--schedule", "constant",   # constant: the schedule must not depend on --epochs, for the resume
         "--patience", "0", "--no-progress"]


def _env(devices: int):
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices), "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, devices):
    return subprocess.Popen([sys.executable, "-m", "bpjax", *TRAIN, *args], env=_env(devices), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs, timeout=TIMEOUT):
    """Wait for every process; on a timeout or a failure kill all, and report every output."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outs = [p.communicate() for p in procs]
        raise AssertionError("timed out:\n" + _show(outs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise AssertionError(f"exit codes {[p.returncode for p in procs]}:\n" + _show(outs))
    return [o for o, _ in outs]


def _show(outs):
    return "\n".join(f"--- process {i} stdout:\n{o}\n--- stderr:\n{e}" for i, (o, e) in enumerate(outs))


def _pair(out, epochs, *extra):
    """Process 0 and process 1 of one run, 2 CPU devices each, on a free localhost port (started)."""
    coord = f"127.0.0.1:{_free_port()}"
    return [_start(["--out", str(out), "--epochs", str(epochs), "--coordinator", coord,
                    "--num-processes", "2", "--process-id", str(i), *extra], devices=2) for i in (0, 1)]


def _last_checkpoint(out):
    """Every leaf of the run state in the run's latest checkpoint (numpy arrays, in order)."""
    import orbax.checkpoint as ocp

    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    leaves = ocp.PyTreeCheckpointer().restore(out / "checkpoints" / str(steps[-1]) / "default")
    return steps[-1], [np.asarray(leaves[k]) for k in sorted(leaves)]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("multiprocess")
    one = _start(["--out", str(d / "one"), "--epochs", str(EPOCHS), "--devices", "4"], devices=4)
    one, *first = _finish([one, *_pair(d / "two", FIRST)])          # the baseline runs beside the pair
    rows_first = _rows(d / "two")
    second = _finish(_pair(d / "two", EPOCHS, "--resume", "--devices", "4"))   # --devices: every process's
    return d / "one", d / "two", one, first, rows_first, second


def test_two_processes_train_as_one_process_with_four_devices(runs):
    one, two, *_ = runs
    step_one, want = _last_checkpoint(one)
    step_two, got = _last_checkpoint(two)
    assert step_two == step_one and len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    s1, s2 = (json.loads((o / "summary.json").read_text()) for o in (one, two))
    assert s2["test_acc"] == s1["test_acc"] and s2["best_epoch"] == s1["best_epoch"]
    assert s2["test_loss"] == pytest.approx(s1["test_loss"], rel=1e-5)
    for r2, r1 in zip(_rows(two), _rows(one), strict=True):
        assert r2["epoch"] == r1["epoch"] and r2["val_acc"] == r1["val_acc"]
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-5)


def test_only_process_0_prints_and_writes(runs):
    _, two, _, first, rows_first, second = runs
    assert [r["epoch"] for r in rows_first] == list(range(1, FIRST + 1))
    assert [r["epoch"] for r in _rows(two)] == list(range(1, EPOCHS + 1))    # one row per epoch
    assert (two / "summary.json").exists() and (two / "curves.png").exists()
    for main, other in (first, second):
        assert "bpjax train: textbook_mlp on xor" in main and "device cpu x4 (2 processes)" in main
        assert "bpjax train: textbook_mlp reached" in main
        # process 1 prints nothing; gloo's "[Gloo] Rank 1 is connected ..." lines (from C++) neither
        assert other == "", f"process 1 printed {other!r}; process 0 printed:\n{main}"
        assert "[Gloo]" not in main


def test_resume_continues_the_run_folder(runs):
    _, _, _, first, _, second = runs
    assert "resumed from" not in first[0]
    assert f"epoch {FIRST} done" in second[0] and "resumed from" in second[0]
    assert f"epoch {FIRST + 1} " in second[0] and "epoch 1 " not in second[0]


def test_an_unreachable_coordinator_fails_in_one_line(tmp_path):
    proc = _start(["--out", str(tmp_path / "lost"), "--epochs", "1", "--coordinator",
                   f"127.0.0.1:{_free_port()}", "--num-processes", "2", "--process-id", "1",
                   "--init-timeout", "3"], devices=2)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2, out + err
    assert "Traceback" not in err and out == ""
    assert err.strip().splitlines()[-1].startswith("bpjax train: expected to reach the coordinator (process 0) "
                                                   "at 127.0.0.1:")
    assert "within 3 s (--init-timeout)" in err
