"""The ``bpjax gradcheck`` command: its registry, exit status and output."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import pytest

import bpjax as bp
from bpjax import cli
from bpjax.check import cases

REPO = pathlib.Path(bp.__file__).resolve().parent.parent

USER_MODULE = textwrap.dedent('''
    import jax.numpy as jnp
    import bpjax as bp

    def scale(bug=False):
        """y = a ⊙ x;  da = Σ_rows dy ⊙ x,  dx = dy ⊙ a."""
        def init(key, in_shape):
            return {"a": jnp.ones(in_shape[-1])}, (), in_shape
        def forward(params, state, x, *, key=None, train=True):
            return params["a"] * x, state, (x,)
        def backward(params, res, dy):
            (x,) = res
            da = (dy * x).sum(axis=0)
            return {"a": da}, (dy if bug else dy * params["a"])
        return bp.Layer(init, forward, backward)

    def buggy_scale():
        return scale(bug=True)

    def half_mse():
        good = bp.mean_squared_error()
        return bp.Loss(good.forward, lambda res, dvalue=1.0: good.backward(res, dvalue) / 2)
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"user_layers_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_every_export_has_a_default_configuration():
    assert cli.gradcheck.missing_defaults() == [], "add a case with default=True per export to bpjax/check/cases/"
    configs = cli.gradcheck.default_configs()
    assert not set(configs) - set(bp.LAYERS) - set(bp.LOSSES), "entries for names bpjax does not export"


@pytest.mark.parametrize("name", [*bp.LAYERS, *bp.LOSSES])
def test_every_default_configuration_builds_and_traces(name):
    """Shapes only (jax.eval_shape): a broken entry fails here without a compile."""
    config = cli.gradcheck.default_configs()[name]
    obj = config.make()
    if isinstance(obj, bp.Loss):
        assert isinstance(config, cases.LossCase) and config.default
        return
    assert isinstance(obj, bp.Layer) and isinstance(config, cases.LayerCase) and config.default
    params, state = jax.eval_shape(lambda k: obj.init(k, config.in_shape)[:2], jax.random.PRNGKey(0))
    shapes = config.in_shape if isinstance(config.in_shape[0], tuple) else (config.in_shape,)
    dtype = "int32" if config.int_input else "float32"
    xs = tuple(jax.ShapeDtypeStruct((config.batch, *s), dtype) for s in shapes)
    x = xs if isinstance(config.in_shape[0], tuple) else xs[0]
    key = jax.random.PRNGKey(0) if config.needs_key else None
    jax.eval_shape(lambda p, s, x: obj.forward(p, s, x, key=key, train=config.train)[0], params, state, x)


def test_a_new_export_without_an_entry_fails_loudly(monkeypatch, capsys):
    monkeypatch.setattr(bp, "LAYERS", bp.LAYERS + ("shiny_new_layer",))
    assert cli.main(["gradcheck"]) == 2
    err = capsys.readouterr().err
    assert "no default configuration for shiny_new_layer" in err and "default=True" in err


def test_builtins_by_name_pass(capsys):
    assert cli.main(["gradcheck", "dense", "squared_error", "--methods", "vjp,fd"]) == 0
    out = capsys.readouterr().out
    assert "ok    dense" in out and "ok    squared_error" in out
    assert "bpjax gradcheck: 2 checks in float64, all 2 passed" in out


def test_one_target_prints_its_table_in_float32(capsys):
    assert cli.main(["gradcheck", "layer_norm", "--dtype", "float32", "--methods", "vjp"]) == 0
    out = capsys.readouterr().out
    assert "layer_norm — ok" in out and "float32 · x float32[3, 5]" in out and "\n  dx " in out


def test_usage_errors_exit_2(capsys):
    assert cli.main(["gradcheck", "no_such_layer"]) == 2
    assert "expected a built-in layer or loss" in capsys.readouterr().err
    assert cli.main(["gradcheck", "no_such_module_xyz:f", "--in-shape", "3"]) == 2
    assert "expected an importable module" in capsys.readouterr().err
    assert cli.main(["gradcheck", "relu", "--methods", "grad"]) == 2
    assert "expected --methods among vjp,fd,jvp, got 'grad'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main([])                                          # a subcommand is required
    assert e.value.code == 2


def test_user_factory_in_process(user_module, capsys):
    assert cli.main(["gradcheck", f"{user_module}:scale", "--in-shape", "4"]) == 0
    assert "dparams['a']" in capsys.readouterr().out
    assert cli.main(["gradcheck", f"{user_module}:half_mse", "--in-shape", "3", "--methods", "vjp"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: dpred" in out and "FAIL <--" in out
    assert cli.main(["gradcheck", f"{user_module}:scale"]) == 2      # needs --in-shape
    assert "expected --in-shape" in capsys.readouterr().err


def test_command_exit_status_and_output_for_a_buggy_user_layer(user_module):
    """The real command line: ``python -m bpjax gradcheck module:factory`` in a fresh process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "bpjax", "gradcheck", f"{user_module}:buggy_scale",
                           "--in-shape", "4", "--methods", "vjp,jvp"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED: dx" in proc.stdout
    fail_rows = [line for line in proc.stdout.splitlines() if "FAIL <--" in line]
    assert len(fail_rows) == 2 and fail_rows[0].lstrip().startswith("dx"), proc.stdout
    assert "1 of 1 failed: " in proc.stdout


def test_the_subcommands_and_version_are_listed(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for word in ("train", "evaluate", "predict", "gradcheck", "--version"):
        assert word in out, word
