"""The formulation is chosen for the platform a program is lowered for, not for the machine that
traces it: a jitted training step exported from this CPU (``jax.export``) for cpu, cuda and tpu
holds the CPU's matrix-product and convolution kernels in the cpu program only, and the
compiled Pallas attention (``impl="pallas"``) in the cuda program only.

``bpjax.kernels`` runs each platform's formulation under the name scope
``bpjax_<platform>_<what>``, which the exported module keeps in its locations; the columns'
jitted functions and ``matmul_tn``'s optimisation barrier are looked for as well."""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import optax
import pytest
from jax import export

import bpjax as bp
from bpjax import models, train

PLATFORMS = ("cpu", "cuda", "tpu")
TRITON = "__gpu$xla.gpu.triton"

#: name -> (model, one example's shape, input dtype, batch size)
CASES = {
    "mlp": (lambda: models.mlp(10, hidden=512), (40,), jnp.float32, 128),
    "cnn": (lambda: models.cnn(10, channels=8), (40, 1), jnp.float32, 8),
    "cnn2d": (lambda: bp.sequential(bp.conv(8, 3, activation="relu"), bp.conv(16, 3, activation="relu"),
                                    bp.conv(16, 3, activation="relu"), bp.flatten(), bp.dense(10)),
              (8, 8, 1), jnp.float32, 8),
    "gru": (lambda: models.gru(10, hidden=16), (40, 1), jnp.float32, 8),
    "gpt": (lambda: bp.gpt(64, dim=32, num_heads=2, num_layers=1, max_len=16, attention_impl="pallas"),
            (16,), jnp.int32, 8),
}

#: The CPU formulations each case's cpu program holds (and no other platform's does).
CPU_KERNELS = {
    "mlp": {"matmul", "matmul_tn"},                   # 10 outputs: padded; 512 → 10's dW: (bᵀa)ᵀ
    "cnn": {"matmul"},                                # 1-D convs: lax's on every platform
    "cnn2d": {"matmul", "conv_forward", "conv_backward"},   # columns, and 16 → 16 routed to Eigen
    "gru": {"matmul"},
    "gpt": {"matmul_tn"},                             # the MLP's 128 → 32 dW over 8·16 tokens
}


@functools.lru_cache(maxsize=None)
def _exported(name: str, platform: str) -> str:
    make, in_shape, dtype, n = CASES[name]
    model = make()
    loss = bp.softmax_cross_entropy()
    step = train.make_train_step(model, loss, optax.adam(1e-3), donate=False)
    params, state = jax.eval_shape(lambda k: model.init(k, in_shape)[:2], jax.random.PRNGKey(0))
    opt_state = jax.eval_shape(optax.adam(1e-3).init, params)
    x = jax.ShapeDtypeStruct((n, *in_shape), dtype)
    out = jax.eval_shape(lambda p, s, x: model.forward(p, s, x, train=False)[0], params, state, x)
    y = jax.ShapeDtypeStruct(out.shape[:-1], jnp.int32)               # one label per example (token)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    step_num = jax.ShapeDtypeStruct((), jnp.int32)
    exp = export.export(step, platforms=[platform], disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])
    return exp(params, state, opt_state, x, y, key, step_num).mlir_module()


def _kernels(text: str, platform: str) -> set:
    return set(re.findall(rf"bpjax_{platform}_(\w+?)[/\"]", text))


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_platform_gets_its_own_formulation(name):
    for platform in PLATFORMS:
        text = _exported(name, platform)
        found_cpu = _kernels(text, "cpu")
        if platform == "cpu":
            assert found_cpu == CPU_KERNELS[name], (name, found_cpu)
        else:
            assert not found_cpu, (name, platform, found_cpu)
            assert "optimization_barrier" not in text and "by_columns" not in text, (name, platform)
        if name == "cnn2d":
            assert ("dx_by_columns" in text) == (platform == "cpu")
            assert "stablehlo.convolution" in text    # lax's (cuda, tpu), routed to Eigen (cpu)
        if name == "gpt":                             # impl="pallas": compiled for cuda, interpreted elsewhere
            assert (TRITON in text) == (platform == "cuda"), platform
            assert "bpjax_flash_forward" in text and "bpjax_flash_dq" in text
            assert _kernels(text, "cuda") == ({"attention_forward", "attention_backward"} if platform == "cuda"
                                              else set())


def test_the_cpu_program_routes_the_wide_conv_and_no_other_platform_does():
    """The 2-D CNN's 16 → 16 convolution: padded by an extra row (Eigen) in the cpu program only."""
    pads = {p: re.findall(r"stablehlo\.convolution.*?pad = \[\[(\d+), (\d+)\]", _exported("cnn2d", p))
            for p in PLATFORMS}
    assert ("1", "2") in pads["cpu"]                  # 'SAME' (1, 1) plus the extra row
    for platform in ("cuda", "tpu"):
        assert pads[platform] and all(p == ("1", "1") for p in pads[platform]), (platform, pads[platform])
