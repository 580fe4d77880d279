"""The Pallas flash-attention kernels (bpjax/kernels/flash.py), in interpret mode on the CPU:
key masks, uneven T and head sizes 64 and 128 against the jnp lean path and jax.vjp of the
plain forward; the Triton lowering, reached from the CPU by exporting for CUDA; the block-shape
rules; which formulation ``impl`` picks. (The causal case, in float64 and float32, is in the
cross-check table: bpjax/check/cases/seq.py.) Interpret mode compiles slowly, so there are few
shapes, all small. Only a GPU runs the compiled kernels: test_compiled_kernels_on_a_gpu."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpjax as bp
from bpjax.kernels import flash as _flash
from helpers import assert_close, init_params, normal, rng


def _hand_vjp(layer, params, x, dy):
    y, _, res = layer.forward(params, (), x)
    return y, layer.backward(params, res, dy)


@pytest.mark.parametrize("causal,heads", [(False, 2), (True, 4)], ids=["head128", "causal-head64"])
def test_pallas_matches_the_jnp_lean_path_and_autodiff_with_a_key_mask(causal, heads):
    """float32, T = 19 (blocks of 16: the second padded), a key mask under which example 1 sees
    4 keys and example 2 none at all (O = 0, no gradient through attention): y and every
    gradient equal the jnp lean path's and jax.vjp of the plain (standard) forward's."""
    t, d_model, f32 = 19, 256, jnp.float32
    kw = dict(causal=causal, masked=True)
    pallas = bp.multi_head_attention(heads, impl="pallas", pallas_blocks=(16, 16),
                                     pallas_interpret=True, **kw)
    lean = bp.multi_head_attention(heads, lean=True, block_size=8, **kw)
    plain = bp.multi_head_attention(heads, **kw)
    gen = rng(f"flash-mask-{causal}")
    params, _, _ = init_params(pallas, ((t, d_model), (t,)), gen, f32)
    x = normal(gen, (2, t, d_model), f32)
    mask = jnp.asarray(np.arange(t)[None, :] < np.array([4, 0])[:, None])      # (2, T)
    dy = normal(gen, x.shape, f32)

    @jax.jit
    def run(params, x, mask, dy):
        y_plain, vjp = jax.vjp(lambda p, x: plain.forward(p, (), (x, mask))[0], params, x)
        dp_plain, dx_plain = vjp(dy)
        return {"pallas": _hand_vjp(pallas, params, (x, mask), dy),
                "lean": _hand_vjp(lean, params, (x, mask), dy),
                "autodiff": (y_plain, (dp_plain, (dx_plain, None)))}

    out = run(params, x, mask, dy)
    y, (dp, (dx, dmask)) = out["pallas"]
    assert dmask is None
    for ref in ("lean", "autodiff"):
        y_ref, (dp_ref, (dx_ref, _)) = out[ref]
        assert_close(y, y_ref, f32, f"pallas y vs {ref}")
        assert_close(dp, dp_ref, f32, f"pallas dparams vs {ref}")
        assert_close(dx, dx_ref, f32, f"pallas dx vs {ref}")
    np.testing.assert_allclose(y[1], np.broadcast_to(params["b_o"], y[1].shape), rtol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="untested here (no GPU): the compiled Triton kernels "
                    "and their bfloat16 dots with float32 accumulation; interpret mode runs neither")
def test_compiled_kernels_on_a_gpu():
    """What the CPU cannot check: interpret mode runs the kernels' jnp code, and the lowering
    test below stops at Triton's IR, so Triton's compilation, the kernels' numbers with
    bfloat16 tensor-core dots accumulating in float32 (and float32 dots in TF32), and
    num_warps/num_stages are tested only here, on a GPU: bfloat16, head size 64 and 128, causal
    and not, T = 300 (padded), against the plain reference in float32 and its autodiff, to
    bfloat16's precision."""
    from bpjax.kernels.flash_bridge import attention_reference
    gen = rng("flash-gpu")
    for d, causal in [(64, True), (128, False)]:
        q, k, v, do = (normal(gen, (2, 3, 300, d), jnp.bfloat16) for _ in range(4))
        kw = dict(causal=causal, scale=d ** -0.5)
        o, lse = _flash.flash_forward(q, k, v, None, blocks=(64, 64), **kw)
        grads = _flash.flash_backward(do, q, k, v, o, lse, None, blocks=(64, 64), **kw)
        f32 = [a.astype(jnp.float32) for a in (q, k, v)]
        (o_ref, lse_ref), vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, None, **kw), *f32)
        refs = vjp((do.astype(jnp.float32), jnp.zeros_like(lse_ref)))
        for got, want in [(o, o_ref), (lse, lse_ref), *zip(grads, refs)]:
            err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
            assert err < 2e-2, (d, causal, err)


def _export_for_a_gpu(f, *args):
    """The StableHLO of ``f`` lowered for CUDA from this CPU (``jax.export``): each Pallas kernel
    goes through the Triton lowering and becomes a custom call."""
    from jax import export
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    return export.export(jax.jit(f), platforms=["cuda"], disabled_checks=[triton])(*args).mlir_module()


@pytest.mark.parametrize("dtype,d,causal,blocks", [(jnp.bfloat16, 64, True, (64, 64)),
                                                   (jnp.float32, 128, False, (128, 64))])
def test_the_kernels_pass_the_triton_lowering_without_a_gpu(dtype, d, causal, blocks):
    """Lowered for CUDA on the CPU (no compile, nothing run): the three kernels pass the Pallas
    Triton lowering's rules (power-of-two tiles, the ops it supports), with a key mask and T = 300
    padded; and so does the layer's forward + backward with impl='pallas' compiled."""
    s = jax.ShapeDtypeStruct((2, 3, 300, d), dtype)
    mask = jax.ShapeDtypeStruct((2, 1, 1, 300), jnp.bool_)
    kw = dict(causal=causal, scale=d ** -0.5, blocks=blocks, interpret=False)

    def kernels(q, k, v, do, mask):
        o, lse = _flash.flash_forward(q, k, v, mask, **kw)
        return _flash.flash_backward(do, q, k, v, o, lse, mask, **kw)

    hlo = _export_for_a_gpu(kernels, s, s, s, s, mask)
    for name in ("bpjax_flash_forward", "bpjax_flash_dkv", "bpjax_flash_dq"):
        assert f'name = "{name}"' in hlo, name
    layer = bp.multi_head_attention(3, causal=causal, impl="pallas", pallas_blocks=blocks,
                                    pallas_interpret=False)
    params, _, _ = jax.eval_shape(lambda k: layer.init(k, (300, 3 * d)), jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), params)
    x = jax.ShapeDtypeStruct((2, 300, 3 * d), dtype)
    hlo = _export_for_a_gpu(lambda p, x: _hand_vjp(layer, p, x, x)[1], params, x)
    assert hlo.count("__gpu$xla.gpu.triton") == 3


# ----------------------------------------------------------------------------- options and errors


@pytest.mark.parametrize("blocks", [(48, 64), (8, 16), (64,), 64, (64.0, 64), (True, 64)])
def test_block_shapes_follow_the_gpu_lowering_rules(blocks):
    with pytest.raises(ValueError, match=r"^multi_head_attention: expected pallas_blocks to be two "
                       r"powers of two ≥ 16 \(query, key\), as the GPU lowering requires, got"):
        bp.multi_head_attention(2, impl="pallas", pallas_blocks=blocks)


def test_bad_impl_pair_mask_and_gpu_head_size_are_one_sentence():
    with pytest.raises(ValueError, match=r"^multi_head_attention: expected impl to be one of "
                       r"\('jnp', 'pallas', 'auto'\), got 'flash'$"):
        bp.multi_head_attention(2, impl="flash")
    with pytest.raises(ValueError, match=r"^transformer_block: expected attention_impl to be one of "
                       r"\('jnp', 'pallas', 'auto'\), got 'flash'$"):
        bp.gpt(11, dim=8, num_heads=2, num_layers=1, max_len=6, attention_impl="flash")
    layer = bp.multi_head_attention(2, masked=True, impl="pallas")
    params, _, _ = init_params(layer, ((5, 8), (5,)), rng("pairs"), jnp.float32)
    x, pairs = jnp.ones((1, 5, 8)), jnp.ones((1, 5, 5), bool)
    with pytest.raises(ValueError, match=r"^multi_head_attention: expected a key mask of shape \(1, 5\) "
                       r"with impl='pallas' \(its kernels take no \(query, key\) mask\), got "
                       r"mask.shape=\(1, 5, 5\)$"):
        layer.forward(params, (), (x, pairs))
    with pytest.raises(ValueError, match=r"^multi_head_attention: expected a head size D/num_heads that "
                       r"is a power of two ≥ 16 for impl='pallas' \(a block side of the compiled kernels; "
                       r"pallas_interpret=True takes any\), got 4$"):
        layer.forward(params, (), (x, jnp.ones((1, 5))))         # on any platform: it may be lowered for CUDA
    interpreted = bp.multi_head_attention(2, masked=True, impl="pallas", pallas_interpret=True)
    jax.eval_shape(lambda p: interpreted.forward(p, (), (x, jnp.ones((1, 5)))), params)   # any head size
    with pytest.raises(ValueError, match=r"^multi_head_attention: expected pallas_interpret to be None, "
                       r"True or False, got 'yes'$"):
        bp.multi_head_attention(2, impl="pallas", pallas_interpret="yes")


def _formulation(layer, x, platform, dtype=jnp.float32):
    """What the forward runs in a program lowered for ``platform`` (``jax.export`` from this
    machine): the Pallas kernels "compiled" (Triton) or "interpreted", or the "jnp" passes."""
    from jax import export
    params, _, _ = init_params(layer, tuple(e.shape[1:] for e in x) if isinstance(x, tuple)
                               else x.shape[1:], rng("auto"), dtype)
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    text = export.export(jax.jit(lambda p, x: layer.forward(p, (), x)[0]), platforms=[platform],
                         disabled_checks=[triton])(params, x).mlir_module()
    if "__gpu$xla.gpu.triton" in text:
        return "compiled"
    return "interpreted" if "bpjax_flash_forward" in text else "jnp"


def test_auto_picks_pallas_for_cuda_where_it_lowers_and_jnp_elsewhere():
    """Exported for each platform from this CPU: which formulation each setting runs."""
    x64 = jnp.ones((1, 5, 128), jnp.float32)                       # 2 heads of 64
    keys, pairs = (x64, jnp.ones((1, 5))), (x64, jnp.ones((1, 5, 5)))
    auto = bp.multi_head_attention(2, impl="auto")
    auto_masked = bp.multi_head_attention(2, impl="auto", masked=True)
    pallas = bp.multi_head_attention(2, impl="pallas")
    assert _formulation(auto, x64, "cpu") == "jnp" and _formulation(auto, x64, "tpu") == "jnp"
    assert _formulation(pallas, x64, "cpu") == "interpreted"
    assert _formulation(pallas, x64, "cuda") == "compiled"
    assert _formulation(bp.multi_head_attention(2), x64, "cuda") == "jnp"    # the default is jnp
    assert _formulation(auto, x64, "cuda") == "compiled"
    assert _formulation(auto, x64.astype(jnp.bfloat16), "cuda", jnp.bfloat16) == "compiled"
    assert _formulation(auto_masked, keys, "cuda") == "compiled"
    assert _formulation(auto_masked, pairs, "cuda") == "jnp"               # a (query, key) mask: jnp
    assert _formulation(bp.multi_head_attention(16, impl="auto"), x64, "cuda") == "jnp"  # head size 8
    assert _formulation(auto, x64.astype(jnp.float64), "cuda", jnp.float64) == "jnp"
