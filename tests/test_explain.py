"""bp.explain and bpjax explain: every number of the record (each layer's output, the loss, the
error at the output, the error arriving at and leaving every layer, every gradient, the update)
equals autodiff of the same forward, in float64 and float32, and the printed numbers are those."""
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from bpjax import cli
from bpjax.cli.explain import tutorial_problem
from bpjax.explain.text import format_explanation, show_array

TOL = {jnp.float64: 1e-12, jnp.float32: 2e-6}


def _by_autodiff(layers, loss, params, x, target):
    """Each layer's output, and by jax.vjp the error at every layer's output and input and every
    gradient, for a sequential of leaf layers written out as a chain of forwards."""
    ys, pullbacks = [x], []
    for layer, p in zip(layers, params):
        y, pull = jax.vjp(lambda p, a, layer=layer: layer.forward(p, (), a)[0], p, ys[-1])
        ys.append(y)
        pullbacks.append(pull)
    value, dy = jax.value_and_grad(lambda y: loss.forward(y, target)[0])(ys[-1])
    errors, grads = [None] * len(layers), [None] * len(layers)
    for i in reversed(range(len(layers))):
        errors[i] = dy
        grads[i], dy = pullbacks[i](dy)
    return ys, value, errors, grads, dy


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_every_number_of_the_tutorials_pass_equals_autodiff(dtype):
    model, loss, x, y = tutorial_problem()
    x, y = x.astype(dtype), y.astype(dtype)
    params, state, _ = model.init(jax.random.PRNGKey(3), (2,))
    params = bp.cast_floating(params, dtype)
    rec = bp.explain(model, loss, params, state, x, y, lr=0.7, steps=3)
    layers = [bp.dense(4), bp.sigmoid(), bp.dense(1), bp.sigmoid()]
    ys, value, errors, grads, dx0 = _by_autodiff(layers, loss, params, x, y)
    tol = TOL[dtype]
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)
    close(rec.loss, value)
    close(rec.output, ys[-1])
    close(rec.error, errors[-1])
    assert [s.label for s in rec.layers] == [f"sequential[{i}] ({n})" for i, n in
                                             enumerate(["dense", "sigmoid", "dense", "sigmoid"])]
    for i, s in enumerate(rec.layers):
        close(s.x, ys[i])
        close(s.y, ys[i + 1])
        close(s.dy, errors[i])
        close(s.dx, dx0 if i == 0 else errors[i - 1])
        assert sorted(s.grads) == sorted(grads[i]) and sorted(s.params) == sorted(params[i])
        for k in s.grads:
            close(s.grads[k], grads[i][k])
            close(s.updates[k], -0.7 * np.asarray(grads[i][k]))
    ref = jax.grad(lambda p: loss.forward(model.forward(p, state, x)[0], y)[0])
    stepped = jax.tree_util.tree_map(lambda p, g: p - 0.7 * g, params, ref(params))
    close(rec.loss_after, loss.forward(model.forward(stepped, state, x)[0], y)[0])
    assert len(rec.losses) == 5 and rec.losses[0] == rec.loss and rec.losses[1] == rec.loss_after


def test_a_model_with_combinators_conv_and_batch_norm_equals_autodiff():
    model = bp.sequential(bp.conv(3, 3), bp.batch_norm(), bp.relu(), bp.residual(bp.sequential(bp.conv(3, 3), bp.tanh())),
                          bp.flatten(), bp.dense(2))
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 6, 2))
    labels = jnp.array([0, 1, 1, 0, 1])
    params, state, _ = model.init(jax.random.PRNGKey(1), (6, 2))
    params = bp.cast_floating(params, jnp.float64)
    loss = bp.softmax_cross_entropy()
    rec = bp.explain(model, loss, params, state, x, labels)
    _, ref = bp.reference_value_and_grad(model, loss)(params, state, x, labels)
    for a, b in zip(jax.tree_util.tree_leaves(rec.grads), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    labels_seen = [s.label for s in rec.layers]
    assert "sequential[3].residual[0].sequential[0] (conv)" in labels_seen and len(labels_seen) == 7
    assert rec.layers[-1].dy.shape == (5, 2)
    np.testing.assert_allclose(rec.layers[-1].dy, rec.error)


def _block(text: str, header: str) -> list:
    """The numbers printed in the block that starts at the line holding ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if header in line)
    body = [lines[start].split(")", 1)[1]]
    for line in lines[start + 1:]:
        if not line.strip().startswith("["):
            break
        body.append(line)
    return [float(v) for v in re.findall(r"-?\d+(?:\.\d*)?(?:e[-+]?\d+)?", " ".join(body))]


def test_bpjax_explain_prints_the_four_steps_with_autodiffs_numbers(capsys):
    assert cli.main(["explain", "--steps", "2"]) == 0
    text = capsys.readouterr().out
    for step in ("1. Forward", "2. The loss", "3. Its partial derivatives give the error at the output",
                 "4. The error propagates backwards", "5. The weights are updated"):
        assert step in text
    for formula in ("y = x W + b", "E = (1/n) Σₙ ½‖yₙ − y′ₙ‖²", "∂E/∂y = (y − y′) / n",
                    "dx = dy ⊙ σ′(x) = dy ⊙ y ⊙ (1 − y)", "∂E/∂W = xᵀ dy", "dx = dy Wᵀ", "θ ← θ − η ∂E/∂θ"):
        assert formula in text
    model, loss, x, y = tutorial_problem()
    params, state, _ = model.init(jax.random.PRNGKey(0), (2,))
    ref = jax.grad(lambda p: loss.forward(model.forward(p, state, x)[0], y)[0])(params)
    by_layer = text.split("4. The error propagates backwards")[1].split("5. The weights")[0]
    for i in (0, 2):
        part = by_layer.split(f"sequential[{i}] (dense):")[1]
        for name, key in (("∂E/∂W", "w"), ("∂E/∂b", "b")):
            printed = _block(part, f"{name}          (")
            expected = np.asarray(ref[i][key]).ravel()
            assert len(printed) == expected.size
            np.testing.assert_allclose(printed, expected, rtol=5e-4, atol=5e-5)
    error = _block(text, "∂E/∂y          (")
    np.testing.assert_allclose(error, (np.asarray(model.forward(params, state, x)[0]) - np.asarray(y)).ravel() / 4,
                               rtol=5e-4, atol=5e-5)


def test_bpjax_explain_on_a_dataset_shows_large_arrays_by_their_norms(capsys):
    assert cli.main(["explain", "--dataset", "xor", "--examples", "6", "--steps", "0"]) == 0
    text = capsys.readouterr().out
    assert "softmax_cross_entropy" in text and "n = 6" in text and "‖·‖ =" in text
    assert "∂E/∂y = (softmax(y) − onehot(y′)) / n" in text


def test_show_array_prints_values_or_a_summary():
    assert show_array(np.array([[1.0], [2.0]])) == "(2, 1) [1 2]ᵀ"
    assert show_array(np.array([0.5, -2.5e-05, 3.0])) == "(3,) [     0.5 -2.5e-05        3]"
    big = show_array(np.ones((10, 10)))
    assert big.startswith("(10, 10)  ‖·‖ = 10,") and "range [1, 1]" in big


@pytest.mark.parametrize("argv, message", [
    (["--model", "mlp"], "bpjax explain: --model needs --dataset (the tutorial's network has its own data)"),
    (["--examples", "0", "--dataset", "xor"], "bpjax explain: --examples: expected a whole number ≥ 1, got 0"),
    (["--steps", "-1"], "bpjax explain: --steps: expected a whole number ≥ 0, got -1"),
    (["--lr", "0"], "bpjax explain: expected lr, the step size, to be a positive number, got 0.0"),
    (["--html", "/nonexistent-folder/page.html"],
     ("bpjax explain: --html /nonexistent-folder/page.html: expected a file in an existing folder, got no folder "
     "/nonexistent-folder")),
])
def test_bad_options_get_one_line(capsys, argv, message):
    assert cli.main(["explain", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == message and captured.out == ""


def test_html_never_replaces_a_file_unless_forced(tmp_path, capsys):
    page = tmp_path / "page.html"
    page.write_text("mine")
    assert cli.main(["explain", "--steps", "0", "--html", str(page)]) == 2
    assert "the file exists; pass --force to replace it" in capsys.readouterr().err and page.read_text() == "mine"
    assert cli.main(["explain", "--steps", "0", "--html", str(page), "--force"]) == 0
    assert page.read_text().startswith("<!DOCTYPE html>")


def test_the_record_text_names_every_layer():
    model, loss, x, y = tutorial_problem()
    params, state, _ = model.init(jax.random.PRNGKey(0), (2,))
    text = format_explanation(bp.explain(model, loss, params, state, x, y))
    assert "(dense 2→4, sigmoid, dense 4→1, sigmoid)" in text
    assert text.count("sequential[2] (dense):") == 3      # forward, backward, update


def test_the_tutorial_page_shows_what_bpjax_explain_prints(capsys):
    """docs/tutorials/explain.md shows the command's output verbatim: the same words, and every
    number equal to the digits shown (4 significant: rounding may differ in the last on another CPU)."""
    text = pathlib.Path(__file__).parents[1].joinpath("docs/tutorials/explain.md").read_text()
    shown = text.split("<!-- explain-output -->\n```text\n", 1)[1].split("\n```", 1)[0]
    assert cli.main(["explain", "--seed", "0"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    number = r"-?\d+(?:\.\d*)?(?:e[-+]?\d+)?"
    assert re.sub(number, "#", re.sub(r" +", " ", shown)) == re.sub(number, "#", re.sub(r" +", " ", printed))
    a, b = (np.array([float(v) for v in re.findall(number, t)]) for t in (shown, printed))
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-7)
