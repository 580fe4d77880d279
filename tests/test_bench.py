"""scripts/benchmarks/bench.py runs end to end on its tiniest settings, prints the table and writes the
report where --out says.

Timings never decide a test: only the table's shape is checked.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module                 # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_writes_a_table_with_the_expected_columns(tmp_path):
    bench = _load_bench()
    out = tmp_path / "BENCH.md"
    rows, md = bench.main(["--quick", "--models", "tiny", "--no-torch", "--out", str(out)])
    assert [r["variant"] for r in rows] == ["bpjax hand-written", "jax.value_and_grad"]
    lines = md.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(bench.COLUMNS)
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert len(body) == 2 and all(len(row) == len(header) for row in body)
    assert body[1][header.index("× jax.grad")] == "1.00"          # the reference against itself
    for row in body:
        float(row[header.index("ms/step")]), float(row[header.index("temp MiB")])
    text = out.read_text()
    for needed in (md, "scripts/benchmarks/bench.py --quick", "## Machine", "load average", "jaxlib",
                   "PyTorch column skipped"):
        assert needed in text



def test_bench_runs_in_bfloat16_with_float32_master_weights(tmp_path):
    """--dtype bfloat16 (for a GPU run, mixed precision): the table, a bfloat16 peak, and a report
    that says which precision it measured and why the PyTorch column is absent."""
    bench = _load_bench()
    out = tmp_path / "BENCH.md"
    rows, md = bench.main(["--quick", "--models", "tiny", "--dtype", "bfloat16", "--out", str(out)])
    assert [r["variant"] for r in rows] == ["bpjax hand-written", "jax.value_and_grad"]
    text = out.read_text()
    assert "bfloat16 compute with float32 master weights" in text
    assert "over the bfloat16 matmul peak" in text
    assert "PyTorch column skipped: it runs in float32 only" in text
    assert "The float32 peak,\nmeasured the same way in the same rounds" in text     # the other peak


def test_bench_prints_both_peaks_writes_no_file_by_default_and_runs_without_torch(
        tmp_path, monkeypatch, capsys):
    """With no --out, bench.py prints the table and both matmul peaks (float32 and bfloat16, "of
    peak" against the compute dtype's) and writes nothing, BENCHMARKS.md included; without torch
    the PyTorch column is left out with a note, not an error."""
    bench = _load_bench()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)                  # `import torch` fails
    rows, md = bench.main(["--quick", "--models", "tiny"])
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []                            # nothing written
    assert [r["variant"] for r in rows] == ["bpjax hand-written", "jax.value_and_grad"]
    assert md in out
    after = out.split(md, 1)[1]                                      # stated under the table
    assert "float32 matmul peak (512 × 512 jnp.dot) per round:" in after
    assert "bfloat16 matmul peak (512 × 512 jnp.dot) per round:" in after
    assert "of peak: against the float32 peak (" in after and "against the bfloat16 peak (" in after
    assert "PyTorch column skipped: torch is not installed" in after


def test_peak_matrix_size_is_chosen_by_backend():
    bench = _load_bench()
    assert bench.default_peak_n("cpu") == 2048
    assert bench.default_peak_n("gpu") == bench.default_peak_n("tpu") == 8192


def test_bfloat16_step_keeps_float32_master_weights_and_matches_autodiff():
    """One bench step in bfloat16: params and Adam's state stay float32, and the hand-written
    gradients of the 2-D CNN's layers (ReLU inside the convs, by columns) match jax.grad's
    of the same bfloat16 forward within bfloat16's tolerance."""
    import jax
    import jax.numpy as jnp
    import bpjax as bp

    bench = _load_bench()
    model = bp.sequential(bp.conv(4, 3, activation="relu"), bp.conv(6, 3, activation="relu"),
                          bp.flatten(), bp.dense(5))
    gen = np.random.default_rng(0)
    b = bench.Bench("small 2-D CNN", 4, model, gen.standard_normal((4, 6, 6, 2), np.float32),
                    gen.integers(0, 5, 4).astype(np.int32), 1.0)
    run, _, _ = bench.jax_step(b, bp.value_and_grad, jnp.bfloat16)
    run(2)                                                   # two updates
    floats = [leaf.dtype for leaf in jax.tree.leaves(run.carry) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert floats and set(floats) == {jnp.dtype(jnp.float32)}             # params and Adam's moments
    params, state, _ = model.init(jax.random.PRNGKey(0), (6, 6, 2))
    cast = bench._cast(params, jnp.bfloat16)
    x = jnp.asarray(b.x, jnp.bfloat16)
    loss = bp.softmax_cross_entropy()
    (v, _), g = jax.jit(bp.value_and_grad(model, loss))(cast, state, x, jnp.asarray(b.y))
    (v_ref, _), g_ref = jax.jit(bp.reference_value_and_grad(model, loss))(cast, state, x, jnp.asarray(b.y))
    assert v.dtype == v_ref.dtype == jnp.float32        # the loss value is computed in float32 from bf16 logits
    np.testing.assert_allclose(np.float32(v), np.float32(v_ref), rtol=2e-2)
    for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert got.dtype == want.dtype == jnp.bfloat16
        scale = float(jnp.abs(want.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=0.1, atol=0.05 * scale)
