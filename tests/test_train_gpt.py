"""scripts/examples/train_gpt.py: the presets, the on-device windows, and short runs that report
tokens/s and MFU (what a GPU run reports). GPT-2 small itself is only shaped here (``jax.eval_shape``), never
stepped: a step is about a TFLOP per sequence."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_scripts import _load

script = _load("train_gpt")


def test_gpt2_small_preset_has_gpt2_small_s_shape_and_86m_parameters():
    cfg = script.config("gpt2-small")
    assert (cfg["layers"], cfg["dim"], cfg["heads"], cfg["context"], cfg["vocab"]) == (12, 768, 12, 1024, "bytes")
    _, shapes = script.build(vocab_size=256, dim=768, heads=12, layers=12, context=1024)
    # by hand: per block 2·(2·768) layer norms + 768·2304 + 2304 (qkv) + 768·768 + 768 (out)
    # + 768·3072 + 3072 (fc) + 3072·768 + 768 (proj) = 7,087,872; twelve of them, the token
    # table 256·768, the positions 1024·768 and the final layer norm 2·768
    per_block = 2 * 2 * 768 + 768 * 2304 + 2304 + 768 * 768 + 768 + 768 * 3072 + 3072 + 3072 * 768 + 768
    assert per_block == 7_087_872
    total = 12 * per_block + 256 * 768 + 1024 * 768 + 2 * 768
    assert script.param_count(shapes) == total == 86_039_040
    n = script.param_count(shapes, flops=True)
    assert n == total - 1024 * 768
    flops = script.flops_per_step(n, layers=12, context=1024, dim=768, batch=8)
    assert flops == (6 * n + 12 * 12 * 1024 * 768) * 8 * 1024
    assert 5.0e12 < flops < 5.3e12                    # about 0.64 TFLOP per sequence of 1024


def test_tiny_is_the_default_and_flags_override_a_preset():
    assert script.options([]) == {**script.PRESETS["tiny"], "dtype": "float32", "lean": False,
                                  "seed": 0, "profile_steps": 3}
    cfg = script.options(["--preset", "gpt2-small", "--layers", "2", "--dim", "32", "--batch", "3",
                          "--steps", "7", "--context", "16", "--eval-every", "0",
                          "--sample-chars", "0", "--dtype", "bfloat16"])
    assert cfg == {**script.PRESETS["gpt2-small"], "layers": 2, "dim": 32, "batch": 3, "steps": 7,
                   "context": 16, "eval_every": 0, "sample_chars": 0, "dtype": "bfloat16",
                   "lean": False, "seed": 0, "profile_steps": 3}
    with pytest.raises(ValueError, match="preset"):
        script.config("gpt3")


def test_windows_drawn_on_the_device_are_slices_of_the_corpus_with_labels_shifted_by_one():
    gen = np.random.default_rng(0)
    data = gen.integers(0, 2**30, 500).astype(np.int32)          # distinct values: a value names its place
    where = {int(v): i for i, v in enumerate(data)}
    assert len(where) == len(data)
    draw = jax.jit(script.draw_windows, static_argnums=(2, 3))
    starts = set()
    for seed in range(5):
        x, y = draw(jnp.asarray(data), jax.random.PRNGKey(seed), 8, 16)
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape == (8, 16) and x.dtype == np.int32
        for row_x, row_y in zip(x, y):
            o = where[int(row_x[0])]
            assert 0 <= o < len(data) - 16 - 1
            np.testing.assert_array_equal(row_x, data[o:o + 16])
            np.testing.assert_array_equal(row_y, data[o + 1:o + 17])
            starts.add(o)
    assert len(starts) > 30                                       # random offsets, not one


def test_a_tiny_run_reports_tokens_per_second_mfu_and_a_profile(capsys, tmp_path):
    """float32 over characters, with validation, a sample and a profiled step (bfloat16 over
    bytes: the next test)."""
    dtype, vocab, profile = "float32", "chars", str(tmp_path / "trace")
    out = script.train(steps=5, dim=16, layers=1, heads=2, context=16, batch=4, dtype=dtype,
                       vocab=vocab, corpus_chars=20_000, print_every=2, eval_every=4,
                       eval_batches=1, sample_chars=5, peak_n=128, profile=profile, profile_steps=1)
    text = capsys.readouterr().out
    assert f"vocabulary {256 if vocab == 'bytes' else 96}" in text
    assert f"compute {dtype}" in text
    assert text.count("tokens/s") >= 3 and "MFU" in text          # two windows and the summary
    assert "throughput:" in text and "TFLOP/s" in text
    for k in ("train_loss", "val_loss", "tokens_per_s", "mfu", "peak_flops"):
        assert math.isfinite(out[k]), k
    assert out["tokens_per_s"] > 0 and 0 < out["mfu"] < 1
    assert 1e6 < out["peak_flops"] < 1e16                         # FLOP/s, not GFLOP/s
    assert len(out["sample"]) >= len("def ")
    assert "XLA operations" in text and "ms/step" in text


def test_the_gpu_check_command_at_tiny_sizes(capsys):
    """The GPU check's command line, made small by explicit flags: 30 steps, three timed windows,
    no validation and no sample; gpt2-small's learning-rate warm-up is cut to the short run."""
    gpu_check = ["--preset", "gpt2-small", "--dtype", "bfloat16", "--steps", "30", "--batch", "8",
                 "--print-every", "10", "--eval-every", "0", "--sample-chars", "0"]
    out = script.main(gpu_check + ["--layers", "1", "--dim", "16", "--heads", "2", "--context", "16",
                                   "--corpus-chars", "20000", "--peak-n", "128"])
    text = capsys.readouterr().out
    assert "vocabulary 256 (bytes of UTF-8)" in text and "compute bfloat16" in text
    assert text.count("tokens/s  MFU") == 3 and "medians over 3 windows" in text
    assert "validation loss nan" in text and "sample (" not in text
    assert math.isfinite(out["train_loss"]) and out["sample"] == ""
    assert out["tokens_per_s"] > 0 and 0 < out["mfu"] < 1 and 1e6 < out["peak_flops"] < 1e16
