"""bp.check_vjp: any JAX function's VJP against float64 finite differences (and a reference).

The corpus (scripts/benchmarks/vjp_corpus_fns.py): every planted bug caught at exactly the wrong inputs,
no false alarm; kinks at a drawn point drawn again, at a given point reported; low precision;
the command line; bad arguments in one sentence. (test_check_vjp_hard.py: where a checker is
easily fooled.)
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from bpjax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_corpus():
    spec = importlib.util.spec_from_file_location("vjp_corpus_fns", ROOT / "scripts" / "benchmarks" / "vjp_corpus_fns.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


corpus = _load_corpus()


# ----------------------------------------------------------------------------- the corpus


@pytest.mark.parametrize("name", list(corpus.CASES))
def test_corpus_every_bug_caught_at_the_wrong_input_and_no_false_alarm(name):
    case = corpus.CASES[name]
    report = bp.check_vjp(corpus.jax_fn(name), *corpus.arguments(case))
    assert report.failing == case.wrong, report


def test_the_corpus_covers_what_the_issue_asks():
    bugs = [c for c in corpus.CASES.values() if c.wrong]
    good = [c for c in corpus.CASES.values() if not c.wrong]
    assert len(corpus.CASES) >= 20 and len(bugs) >= 10 and len(good) >= 10
    kinds = {c.bug for c in bugs}
    assert {"missing factor", "transposed matrix", "wrong leaf", "sign", "only for non-unit cotangents",
            "one of several inputs", "cancels under ones", "float64 refused (a slope)",
            "only for positive cotangents"} <= kinds
    assert any(isinstance(v, dict) for c in good for _, v in c.args)          # pytree inputs
    assert {"logit_near_edges", "rms_norm_f32_inside"} <= set(corpus.CASES)   # a domain's edge, float32 inside


@pytest.mark.skipif(not os.environ.get("BPJAX_TEST_TORCH"), reason="importing torch takes ~5 s: "
                    "BPJAX_TEST_TORCH=1 python -m pytest tests/test_check_vjp.py -k torch")
def test_torch_twins_carry_the_same_rules():
    torch = pytest.importorskip("torch")
    for name in ("layer_norm", "two_outputs", "exp_g_abs_g", "scale_shift_swapped", "logit_near_edges", "det2_abs_g"):
        case = corpus.CASES[name]
        leaves = corpus.leaves(case)
        gen = np.random.default_rng(0)
        f = corpus.jax_fn(name)
        y, pullback = jax.vjp(f, *corpus.arguments(case))
        dy = jax.tree_util.tree_map(lambda a: jnp.asarray(gen.standard_normal(a.shape)), y)
        want = jax.tree_util.tree_leaves(pullback(dy))
        inputs = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in leaves]
        out = corpus.torch_fn(name)(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        got = torch.autograd.grad(outs, inputs, [torch.tensor(np.asarray(d)) for d in jax.tree_util.tree_leaves(dy)])
        for a, b in zip(got, want):
            np.testing.assert_allclose(a.numpy(), np.asarray(b), rtol=1e-12, atol=1e-12, err_msg=name)


# ----------------------------------------------------------------------------- what the report says


def _with_bwd(fwd, bwd):
    f = jax.custom_vjp(fwd)
    f.defvjp(lambda *a: (fwd(*a), a), bwd)
    return f


def square_wrong_at_one_element(x):
    return x * x


square_wrong_at_one_element = _with_bwd(
    square_wrong_at_one_element, lambda res, g: (2 * res[0] * g * jnp.ones((3, 4)).at[1, 2].set(1.5),))


def test_the_report_names_the_element_and_the_order():
    report = bp.check_vjp(square_wrong_at_one_element, (3, 4))
    row = report.row("dx", "fd")
    assert not row.ok and row.where == "(1, 2)" and 0.8 < row.order < 1.2, report
    text = str(report)
    assert "  at " in text.splitlines()[2] + " " and "(1, 2)" in text and "FAIL <--" in text


def test_a_reference_is_a_second_opinion_and_outputs_are_reported_one_by_one():
    name = "two_outputs_drop_y1"
    case = corpus.CASES[name]
    ref = lambda x, w: (x @ w, jnp.sum(x * x))
    report = bp.check_vjp(corpus.jax_fn(name), *corpus.arguments(case), reference=ref)
    assert report.failing == ("dx",), report
    assert report.row("dx", "fd", output="y[0]").ok and report.row("dx", "ref", output="y[0]").ok
    assert not report.row("dx", "fd", output="y[1]").ok and not report.row("dx", "ref", output="y[1]").ok
    assert report.row("dw", "ref", output="y[0]").ok
    assert bp.check_vjp(corpus.jax_fn("two_outputs"), *corpus.arguments(corpus.CASES["two_outputs"]),
                        reference=ref).ok


def test_shapes_are_drawn_and_as_jax_fn_layers_check():
    layer = bp.dense(3)
    params, _, _ = layer.init(jax.random.PRNGKey(0), (4,))
    params = bp.cast_floating(params, jnp.float64)
    report = bp.check_vjp(bp.as_jax_fn(layer), params, (), (2, 4), argnums=(0, 2))      # fn(params, state, x)
    names = list(dict.fromkeys(r.gradient for r in report.rows))
    assert report.ok and names == ["dparams['b']", "dparams['w']", "dx"], report      # named from fn's signature

    def wrong_db(params, res, dy):
        dparams, dx = layer.backward(params, res, dy)
        return {"w": dparams["w"], "b": 2 * dparams["b"]}, dx

    buggy = bp.as_jax_fn(bp.Layer(layer.init, layer.forward, wrong_db))
    assert bp.check_vjp(buggy, params, (), jax.ShapeDtypeStruct((2, 4), jnp.float64)).failing == ("dparams['b']",)


def test_assert_vjp_close_raises_with_the_table():
    case = corpus.CASES["sigmoid_sign"]
    with pytest.raises(AssertionError, match=r"(?s)the VJP of sigmoid_sign differs.*dx.*FAIL <--"):
        bp.assert_vjp_close(corpus.jax_fn("sigmoid_sign"), *corpus.arguments(case))
    assert bp.assert_vjp_close(corpus.jax_fn("softplus"), (3, 4)).ok


# ----------------------------------------------------------------------------- kinks


def test_a_kink_at_the_given_input_is_reported_not_failed():
    case = corpus.CASES["relu_at_zeros"]
    report = bp.check_vjp(corpus.jax_fn("relu_at_zeros"), *corpus.arguments(case))
    zeros = {str(tuple(int(i) for i in ix)) for ix in np.argwhere(case.args[0][1] == 0)}
    assert report.ok and set(report.kinks["dx"]) == zeros, report
    assert "kink at the given input: dx at" in str(report)


def test_a_bug_beside_a_kink_at_the_given_input_is_still_caught():
    x = np.array([[-1.0, 0.0, 2.0], [0.0, -0.5, 1.5]])
    report = bp.check_vjp(corpus.jax_fn("leaky_relu_slope"), x)
    assert report.failing == ("dx",) and set(report.kinks["dx"]) == {"(0, 1)", "(1, 0)"}, report


def test_a_large_leaf_at_kinks_is_still_checked_along_random_coordinates():
    gen = np.random.default_rng(1)
    x = np.where(gen.uniform(size=(20, 30)) < 0.5, 0.0, gen.uniform(0.5, 1.5, (20, 30)) * gen.choice([-1, 1], (20, 30)))
    right = bp.check_vjp(corpus.jax_fn("relu"), x)                 # every random direction crosses a kink
    assert right.ok and {"v0", "v1", "v2"} <= set(right.kinks["dx"]), right
    wrong = bp.check_vjp(corpus.jax_fn("leaky_relu_slope"), x)
    row = wrong.row("dx", "fd")
    where = tuple(int(i) for i in row.where.strip("()").split(","))
    assert wrong.failing == ("dx",) and x[where] < 0, wrong              # named: an element on the wrong slope


def _relu(x):
    return jnp.where(x > 0, x, 0.0)


_relu = _with_bwd(_relu, lambda res, g: (g * (res[0] > 0),))


def test_a_drawn_point_within_a_step_of_a_kink_is_drawn_again():
    x0 = np.random.default_rng(0 + 7919).standard_normal((2, 3))        # check_vjp's first draw, seed 0
    c = jnp.asarray(x0[0, 1] + 3e-6)                                      # a kink 3e-6 from x[0, 1]

    def near_kink(x):
        return _relu(x - c)

    once = bp.check_vjp(near_kink, (2, 3), resample=0)
    assert once.ok and once.kinks == {"dx": ("(0, 1)",)}, once          # found, left out, said
    again = bp.check_vjp(near_kink, (2, 3))
    assert again.ok and again.kinks == {} and "drawn again: a kink within the smallest step at dx at (0, 1)" \
        in str(again), again


def _softplus_in_float32(right: bool):
    """A forward that rounds to float32 inside: its float64 differences carry float32 noise."""

    @jax.custom_vjp
    def sp32(x):
        return jnp.logaddexp(x.astype(jnp.float32), 0.0).astype(x.dtype)

    def bwd(x, g):
        s = jax.nn.sigmoid(x.astype(jnp.float32))
        return ((g * (s if right else s * (s - 1))).astype(x.dtype),)

    sp32.defvjp(lambda x: (sp32(x), x), bwd)
    return sp32


@pytest.mark.parametrize("shape", [(4, 8), (12, 20)], ids=["coordinates", "random-directions"])
def test_rounding_noise_in_the_forward_is_not_a_kink(shape):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    right = bp.check_vjp(_softplus_in_float32(True), x)
    assert right.ok and right.kinks == {} and not any("kink" in n for n in right.notes), right
    assert any(n.startswith("f computes in float32 inside") for n in right.notes), right
    wrong = bp.check_vjp(_softplus_in_float32(False), x)
    assert wrong.failing == ("dx",) and wrong.kinks == {}, wrong


def test_kinked_directions_from_the_second_difference():
    from bpjax.check.fd import STEPS, kinked
    h = np.concatenate([STEPS, -STEPS])
    smooth = np.exp(0.3 * h) + h ** 2                                    # g(h), g(0) = 1
    at_kink = 1 + 2 * np.maximum(h, 0) - 0.5 * np.minimum(h, 0)          # slopes 2 and -0.5 meet at 0
    near = 1 + 2 * np.maximum(h - 2e-6, 0)                               # a kink at 2e-6
    noisy = smooth + 1e-7 * np.random.default_rng(0).standard_normal(h.shape)   # float32-like rounding
    assert kinked(np.stack([smooth, at_kink, near, noisy]), 1.0, 1.0, 2.2e-16).tolist() == [False, True, True, False]


# ----------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_low_precision_passes_right_rules_and_catches_wrong_ones(dtype):
    name = jnp.dtype(dtype).name
    report = bp.check_vjp(corpus.jax_fn("softplus"), jax.ShapeDtypeStruct((3, 4), dtype))
    assert report.ok and report.fd_dtype == "float64", report
    assert report.rows[0].rtol == bp.check.layer.TOLERANCES[name]["fd"]
    assert report.details.startswith(f"{name} · inputs {name}[3, 4]")
    assert bp.check_vjp(corpus.jax_fn("sigmoid_sign"), (3, 4), dtype=dtype).failing == ("dx",)


@pytest.mark.parametrize("name", ["leaky_relu_slope", "matmul_transposed", "exp_g_abs_g", "layer_norm"])
def test_bfloat16_holds_each_element_to_its_measured_rounding(name):
    """Below float64 f's VJP also runs on float64 copies: the difference is its rounding, per
    element, so a small bug (a slope of 0.01 for 0.1) is not lost in bfloat16's loose floor."""
    case = corpus.CASES[name]
    args = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), corpus.arguments(case))
    report = bp.check_vjp(corpus.jax_fn(name), *args)
    assert report.failing == case.wrong, report


def test_float32_with_x64_off_still_differences_in_float64():
    with jax.enable_x64(False):
        report = bp.check_vjp(corpus.jax_fn("square_sum_missing_2"), (3, 4))
    assert report.failing == ("dx",) and report.fd_dtype == "float64"
    assert report.details.startswith("float32")


# ----------------------------------------------------------------------------- the command line

USER_OPS = textwrap.dedent('''
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def dense_tanh(x, w):
        return jnp.tanh(x @ w)

    def _fwd(x, w):
        y = jnp.tanh(x @ w)
        return y, (x, w, y)

    def _bwd(res, g):
        x, w, y = res
        d = g * (1 - y * y)
        return d @ w.T, x.T @ d

    def _bwd_wrong(res, g):
        x, w, y = res
        d = g * (1 - y * y)
        return d @ w.T, x.T @ g                      # forgot tanh' in dw

    dense_tanh.defvjp(_fwd, _bwd)
    buggy = jax.custom_vjp(lambda x, w: jnp.tanh(x @ w))
    buggy.defvjp(_fwd, _bwd_wrong)

    def plain(x, w):
        return jnp.tanh(x @ w)

    not_a_function = 3
''')


@pytest.fixture
def user_ops(tmp_path, monkeypatch):
    name = f"user_ops_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(USER_OPS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_cli_checks_any_function(user_ops, capsys):
    assert cli.main(["gradcheck", f"{user_ops}:dense_tanh", "--args-shapes", "3,4", "4,2",
                     "--reference", f"{user_ops}:plain"]) == 0
    assert "1 check in float64, all 1 passed" in capsys.readouterr().out
    assert cli.main(["gradcheck", f"{user_ops}:buggy", "--args-shapes", "3,4", "4x2"]) == 1
    out = capsys.readouterr().out
    assert f"{user_ops}:buggy — FAILED: dw" in out and "1 of 1 failed" in out


@pytest.mark.parametrize("argv,message", [
    (["{m}:dense_tanh", "--args-shapes", "3,4"], "expected --args-shapes to match the arguments of {m}:dense_tanh, "
                                                "got 1 shape"),
    (["{m}:dense_tanh", "--args-shapes", "3,-4", "4"], "expected --args-shapes like 3,4 or scalar, got '3,-4'"),
    (["{m}:not_a_function", "--args-shapes", "3"], "expected {m}:not_a_function to be a JAX function"),
    (["dense", "--args-shapes", "3"], "expected --args-shapes (and --reference) only with module:function targets"),
    (["{m}:dense_tanh", "--reference", "{m}:plain"], "expected --args-shapes (and --reference) only with"),
    (["{m}:missing", "--args-shapes", "3"], "expected {m} to define missing"),
])
def test_cli_usage_errors_are_one_line_and_exit_2(user_ops, capsys, argv, message):
    assert cli.main(["gradcheck", *[a.format(m=user_ops) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bpjax gradcheck: " + message.format(m=user_ops)), err


# ----------------------------------------------------------------------------- bad arguments


def test_bad_arguments_raise_one_sentence():
    f = corpus.jax_fn("softplus")
    with pytest.raises(TypeError, match="^check_vjp: expected a callable f, got int$"):
        bp.check_vjp(3, (3,))
    with pytest.raises(ValueError, match="^check_vjp: expected at least one argument for softplus, got none$"):
        bp.check_vjp(f)
    with pytest.raises(ValueError, match=r"^check_vjp: expected distinct argnums within the 1 arguments, got 2$"):
        bp.check_vjp(f, (3,), argnums=2)
    with pytest.raises(TypeError, match="^check_vjp: expected argnums to be an int or a tuple of ints"):
        bp.check_vjp(f, (3,), argnums="x")
    with pytest.raises(ValueError, match="^check_vjp: expected a floating-point input among the 1 arguments"):
        bp.check_vjp(f, jnp.arange(3))
    with pytest.raises(ValueError, match="^check_vjp: expected dtype float64, float32, float16 or bfloat16, got"):
        bp.check_vjp(f, (3,), dtype=jnp.int32)
    with pytest.raises(ValueError, match=r"^check_vjp: expected non-negative dimensions for argument 0"):
        bp.check_vjp(f, (3, -1))
    with pytest.raises(TypeError, match="^check_vjp: expected reference to be a callable or None, got str$"):
        bp.check_vjp(f, (3,), reference="softplus")
    with pytest.raises(ValueError, match=r"^check_vjp: expected reference to return what f returns, "
                                         r"float64\[3\], got float64\[\]$"):
        bp.check_vjp(f, (3,), reference=lambda x: jnp.sum(x))
    with pytest.raises(TypeError, match=r"^check_vjp: expected floating-point outputs, got y\[1\] of dtype int"):
        bp.check_vjp(lambda x: (x, jnp.argmax(x)), (3,))
