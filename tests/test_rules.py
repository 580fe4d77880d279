"""Project rules that code review alone would miss."""
from __future__ import annotations

import io
import pathlib
import re
import tokenize

import jax
import jax.numpy as jnp
import numpy as np

import bpjax as bp

PACKAGE = pathlib.Path(bp.__file__).parent
AUTODIFF = re.compile(r"\bjax\.(grad|vjp|jvp|linearize|linear_transpose|value_and_grad)\b"
                      r"|\bfrom\s+jax\s+import\s+[^\n]*\b(grad|vjp|jvp|linearize|linear_transpose|value_and_grad)\b")
# Only the reference, the custom_vjp bridges and the checking code (the check/ folder) may
# differentiate automatically.
ALLOWED = re.compile(r"^check/|(check|reference|bridge|verify|interop|gradcheck|testing)[^/]*\.py$")


def _code_lines(source):
    """Each line of ``source`` with comments and string literals (docstrings) blanked out."""
    out = [""] * (len(source.splitlines()) + 1)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.NAME, tokenize.OP):
            out[tok.start[0] - 1] += " " + tok.string
    return out[:-1]


def test_no_autodiff_in_backward_code():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if ALLOWED.search(path.relative_to(PACKAGE).as_posix()):
            continue
        for n, code in enumerate(_code_lines(path.read_text()), 1):
            if AUTODIFF.search(code.replace(" . ", ".").replace(" .", ".").replace(". ", ".")):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{n}: {code.strip()}")
    assert not offenders, "autodiff outside the reference/bridge/check modules:\n" + "\n".join(offenders)


def test_the_scan_itself_finds_autodiff():
    code = _code_lines('"""jax.grad in a docstring"""\ng = jax . grad(f)(x)  # jax.vjp\nfrom jax import vjp\n')
    hits = [AUTODIFF.search(c.replace(" . ", ".").replace(" .", ".").replace(". ", ".")) for c in code]
    assert [bool(h) for h in hits] == [False, True, True]
    assert not AUTODIFF.search("jax.gradient_thing")


def test_initializer_schemes_have_the_documented_scale():
    fan_in, fan_out = 400, 300
    key = jax.random.PRNGKey(0)
    expected_std = {
        "glorot_uniform": np.sqrt(2 / (fan_in + fan_out)), "glorot_normal": np.sqrt(2 / (fan_in + fan_out)),
        "he_uniform": np.sqrt(2 / fan_in), "he_normal": np.sqrt(2 / fan_in),
        "lecun_uniform": np.sqrt(1 / fan_in), "lecun_normal": np.sqrt(1 / fan_in),
    }
    for name, std in expected_std.items():
        params, _, _ = bp.dense(fan_out, w_init=name).init(key, (fan_in,))
        assert abs(float(jnp.std(params["w"])) / std - 1) < 0.05, name
        assert params["w"].dtype == jnp.float32 and not np.any(params["b"])


def test_dense_default_init_is_glorot_uniform():
    params, state, out_shape = bp.dense(20).init(jax.random.PRNGKey(0), (30,))
    a = np.sqrt(6 / 50)
    assert state == () and out_shape == (20,)
    assert float(jnp.max(jnp.abs(params["w"]))) <= a and float(jnp.max(jnp.abs(params["w"]))) > 0.9 * a
