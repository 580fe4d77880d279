"""bpjax train --health (health.json, health.png) and --sanity: the checks catch a broken init
and a detached layer, and leave the run as it would be without them."""
import json

import jax
import jax.numpy as jnp
import numpy as np

import bpjax as bp
from bpjax import cli
from bpjax.train.health import HealthRecorder, sanity_checks


def _data(n=64, d=8, c=3):
    x = jax.random.normal(jax.random.PRNGKey(1), (n, d))
    return x, jnp.arange(n) % c


def _detached():
    """An identity whose backward sends no gradient: nothing before it, nor it, can learn."""
    def init(key, in_shape):
        return (), (), in_shape

    def forward(params, state, x, *, key=None, train=True):
        return x, state, ()

    def backward(params, res, dy):
        return (), jnp.zeros_like(dy)
    return bp.make_layer("detached", init, forward, backward)


def test_a_huge_init_saturates_the_tanh(tmp_path):
    x, y = _data()
    model = bp.sequential(bp.dense(32), bp.tanh(), bp.dense(3))
    params, state, _ = model.init(jax.random.PRNGKey(0), (8,))
    rec = HealthRecorder(model, bp.softmax_cross_entropy(), x, y, out=tmp_path)
    rec(0, params, state)
    calm = rec.records[-1]["layers"]["sequential[1] (tanh)"]["saturated"]
    big = (jax.tree.map(lambda a: 100 * a, params[0]), *params[1:])
    rec(1, big, state)
    layers = rec.records[-1]["layers"]
    assert calm < 0.2 and layers["sequential[1] (tanh)"]["saturated"] > 0.9
    assert "update_ratio" in layers["sequential[0] (dense)"] and "saturated" not in layers["sequential[0] (dense)"]
    assert (tmp_path / "health.png").stat().st_size > 1000


def test_the_checks_catch_a_wrong_init_and_a_detached_layer():
    x, y = _data()
    loss = bp.softmax_cross_entropy()
    model = bp.sequential(bp.dense(16), bp.tanh(), bp.dense(3))
    params, state, _ = model.init(jax.random.PRNGKey(0), (8,))
    good = sanity_checks(model, loss, x, y, params=params, state=state, num_classes=3)
    assert [r.ok for r in good] == [True, True], [r.line for r in good]
    big = (*params[:2], jax.tree.map(lambda a: 100 * a, params[2]))
    wrong = sanity_checks(model, loss, x, y, params=big, state=state, num_classes=3)
    assert wrong[0].ok is False and "WARNING" in wrong[0].line and "log 3" in wrong[0].line
    detached = bp.sequential(bp.dense(3), _detached())
    p, s, _ = detached.init(jax.random.PRNGKey(0), (8,))
    stuck = sanity_checks(detached, loss, x, y, params=p, state=s, num_classes=3)
    assert stuck[1].ok is False and "WARNING" in stuck[1].line
    before = jax.tree.map(np.array, p)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(p)))


def test_train_health_and_sanity(tmp_path, capsys):
    args = ["train", "--model", "textbook_mlp", "--dataset", "xor", "--epochs", "2", "--no-progress"]
    assert cli.main(args + ["--health", "--sanity", "--out", str(tmp_path / "a")]) == 0
    said = capsys.readouterr().out
    assert "sanity: initial loss" in said and "sanity: overfit 16 examples" in said
    doc = json.loads((tmp_path / "a" / "health.json").read_text())
    assert [r["epoch"] for r in doc["records"]] == [0, 1, 2]
    assert list(doc["records"][-1]["layers"]) == [f"sequential[{i}] ({k})" for i, k in
                                                  enumerate(["dense", "sigmoid", "dense", "sigmoid", "dense"])]
    values = [v for r in doc["records"] for s in r["layers"].values() for v in s.values()]
    assert values and all(np.isfinite(values))
    assert (tmp_path / "a" / "health.png").stat().st_size > 1000
    assert cli.main(args + ["--no-sanity", "--out", str(tmp_path / "b")]) == 0
    assert "sanity:" not in capsys.readouterr().out
    assert cli.main(args + ["--no-sanity", "--health-every", "5", "--no-plot", "--out", str(tmp_path / "c")]) == 0
    doc = json.loads((tmp_path / "c" / "health.json").read_text())
    steps = 2 * doc["steps_per_epoch"]
    assert [r["step"] for r in doc["records"]] == list(range(0, steps + 1, 5)) and doc["every_steps"] == 5
    assert [r["epoch"] for r in doc["records"]] == [-(-s // doc["steps_per_epoch"]) for s in range(0, steps + 1, 5)]
    rows = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in "abc"]
    assert rows[0] == rows[1] == rows[2]        # the sanity checks, the probe and its chunking change nothing
    assert cli.main(args + ["--health-every", "0", "--out", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err.strip() == "bpjax train: --health-every: expected a whole number of steps ≥ 1, got 0"


def test_the_ratio_is_per_step_since_the_last_record():
    x, y = _data()
    model = bp.sequential(bp.dense(3))
    params, state, _ = model.init(jax.random.PRNGKey(0), (8,))
    rec = HealthRecorder(model, bp.softmax_cross_entropy(), x, y, every=1, steps_per_epoch=10)
    rec(0, params, state)
    rec(0, params, state)                       # the epoch hook records only the state before training
    assert len(rec.records) == 1
    moved = jax.tree.map(lambda a: a + 0.01, params)
    rec.at_step(1, moved, state)
    rec.at_step(4, jax.tree.map(lambda a: a + 0.03, moved), state)
    flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)]).astype(np.float64)  # noqa: E731
    first = np.linalg.norm(flat(moved) - flat(params)) / np.linalg.norm(flat(params))
    second = np.linalg.norm(0.03 * np.ones(flat(moved).size)) / np.linalg.norm(flat(moved)) / 3
    ratios = [r["layers"]["sequential[0] (dense)"].get("update_ratio") for r in rec.records]
    assert ratios[0] is None and [r["step"] for r in rec.records] == [0, 1, 4]
    np.testing.assert_allclose(ratios[1:], [first, second], rtol=1e-6)
