"""The worked examples run (the pages' Python blocks run in test_site.py)."""
from __future__ import annotations

import importlib.util
import pathlib
import re


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    (path,) = (ROOT / "scripts").glob(f"*/{name}.py")          # examples/, benchmarks/ or experiments/
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_example_learns_xor_and_stops_when_the_error_stops_falling(capsys):
    seed = _load("seed_example")
    final = seed.train("xor", lr=2.0, momentum=0.9, tol=1e-6, patience=50, max_epochs=5000, seed=0,
                       print_every=1)
    out = capsys.readouterr().out
    assert "epoch     1  error" in out and "epoch     2  error" in out     # every epoch
    assert re.search(r"stopped at epoch \d+: the error fell by less than 1e-06 in 50 epochs", out)
    assert "final error" in out and "prediction" in out
    assert final < 0.01                                                     # XOR learned


def test_seed_example_command_line(capsys):
    _load("seed_example").main(["--task", "regression", "--max-epochs", "30", "--print-every", "10"])
    out = capsys.readouterr().out
    assert "epoch    10  error" in out and "stopped at epoch 30 (max epochs)" in out


def test_digits_cnn_script_runs(capsys):
    accs = _load("digits_cnn").main(["--epochs", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert "seed 0: 1438 train / 359 test images, 1 epochs" in out and 0.0 <= accs[0] <= 1.0


def test_conv_formulations_times_every_impl(capsys):
    script = _load("conv_formulations")
    rows = script.main(["--batch", "2", "--size", "5", "--c-in", "16", "--c-out", "16", "--reps", "1"])
    assert [r[0] for r in rows] == ["lax", "routed", "columns", "auto"]
    assert all(ms > 0 for row in rows for ms in row[1:])
    assert "| columns |" in capsys.readouterr().out


def test_profile_step_lists_the_step_s_operations():
    script = _load("profile_step")
    rows = script.profile("tiny", steps=1, top=5)
    assert 0 < len(rows) <= 5
    assert all(ms >= 0 and n > 0 and name for ms, n, name in rows)
    assert rows == sorted(rows, key=lambda r: -r[0])


def test_dtype_accuracy_compares_float32_and_bfloat16_runs(capsys):
    rows = _load("dtype_accuracy").main(["--model", "textbook_mlp", "--dataset", "xor", "--seeds", "0",
                                         "--epochs", "2"])
    out = capsys.readouterr().out
    assert len(rows) == 1 and 0 <= rows[0]["float32"] <= 1 and 0 <= rows[0]["bfloat16"] <= 1
    assert "| seed | float32 test acc | bfloat16 test acc |" in out and "mean ± std" in out


def test_attention_bench_tiny_runs_every_variant(capsys):
    """scripts/benchmarks/attention_bench.py --tiny: every variant runs or says why not (cuDNN on
    the CPU), the gradients agree with autodiff of plain attention, and the verdict line comes."""
    rows = _load("attention_bench").main(["--tiny"])
    out = capsys.readouterr().out
    ran = {name: err for _, name, ms, *_, err in rows if ms is not None}
    assert {"pallas 16x16", "jnp lean", "autodiff plain", "dot_product_attention xla"} <= set(ran)
    assert all(err < 1e-5 for err in ran.values()), ran
    assert "| T | variant | ms | TFLOP/s |" in out and "pallas vs jnp lean at T=40: " in out


def test_gpt2_memory_tiny_exports_for_cuda_and_reads_the_compiled_memory(capsys):
    """scripts/benchmarks/gpt2_memory.py --tiny: the step lowers for CUDA on this CPU, and a batch
    that does not fit a tiny "device" is halved until one does."""
    module = _load("gpt2_memory")
    assert module.main(["--tiny", "--device-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "export for CUDA: ok" in out and "memory: batch 4 × 32 fits in 80 GB" in out
    assert module.main(["--tiny", "--batch", "2", "--device-gb", "1e-4"]) == 1      # 100 kB: no batch fits
    out = capsys.readouterr().out
    assert "batch 2 × 32:" in out and "batch 1 × 32:" in out and "memory: no batch fits in 0.0001 GB" in out


def test_vjp_corpus_script_prints_the_tables(capsys):
    results = _load("vjp_corpus").main(["--no-torch", "--cases", "relu_at_zeros", "sigmoid_sign"])
    out = capsys.readouterr().out
    assert "| bp.check_vjp | 1 of 1 | 0 of 1 | 1 of 1 |" in out, out
    assert "| relu_at_zeros | — | pass | FALSE ALARM |" in out and "| sigmoid_sign | sign | caught, input named |" in out
    assert set(results) == {"bp.check_vjp", "jax check_grads (rev)"}


def test_paper_cnn_variants_train_and_use_pytorchs_init_scale():
    import jax
    import numpy as np
    script = _load("paper_cnn")
    w = np.asarray(script.torch_uniform(jax.random.PRNGKey(0), (3, 25, 25)))
    assert np.abs(w).max() <= 1 / np.sqrt(75) and np.abs(w).max() > 0.9 / np.sqrt(75)
    params, _, _ = script.paper_cnn(True).init(jax.random.PRNGKey(0), (40, 1))
    bias = np.asarray(params[-1]["b"])                      # the dense layer's: fan-in 5 * 25
    assert 0 < np.abs(bias).max() <= 1 / np.sqrt(125)
    from bpjax import datasets
    final, best = script.train(datasets.mnist1d(), torch_init=True, in_order=True, steps=250, seed=0)
    assert 0.5 < final <= best <= 1.0                          # 250 steps already learn a lot


def test_autodiff_speed_quick_prints_the_table(capsys):
    rows = _load("autodiff_speed").main(["--quick", "--models", "cnn2d"])
    out = capsys.readouterr().out
    assert "| network | batch | (a) jax.grad of bpjax forward, ms |" in out and "| 2-D CNN 3×3 32-64, 28×28 | 2 |" in out
    assert [set(ms) for _, _, ms in rows] == [{"a", "b", "c"}]


def test_mnist1d_table_write_replaces_only_the_rows_it_ran(tmp_path):
    script = _load("mnist1d_table")
    path = tmp_path / "RESULTS.md"
    script.write(path, "| model | paper |\n| cnn | 94% | 1% |", ["| cnn | 94% | 1% |"], [0], ["--models", "cnn"])
    assert path.read_text().startswith("# MNIST-1D with hand-written backprop\n\nCommand: `python scripts/"
                                       "examples/mnist1d_table.py --models cnn`")
    path.write_text("# R\n\n| model | paper |\n| --- | --- |\n| mlp | 68% | 66% |\n| cnn | 94% | 1% |\n\nNotes.\n")
    script.write(path, "ignored", ["| cnn | 94% | 93% |"], [0], [])
    assert path.read_text() == "# R\n\n| model | paper |\n| --- | --- |\n| mlp | 68% | 66% |\n| cnn | 94% | 93% |\n\nNotes.\n"


def test_hlo_guard_strips_locations_and_tells_renamed_instructions_from_changed_programs(tmp_path, capsys):
    """scripts/benchmarks/hlo_guard.py, the refactor guard, on two hand-written programs: source
    locations never count, a renamed instruction is 'same up to the names', a changed shape is
    DIFFERENT (exit 1)."""
    guard = _load("hlo_guard")
    program = ('HloModule jit_step, entry_computation_layout={(f32[4]{0})->f32[4]{0}}\n\nFileNames\n1 "/a/b.py"\n\n'
               'ENTRY %main (x.1: f32[4]) -> f32[4] {\n  %x.1 = f32[4]{0} parameter(0), '
               'metadata={op_name="jit(step)/x" source_file="/a/b.py" source_line=3}\n'
               '  ROOT %jit_helper_.2 = f32[4]{0} negate(%x.1), metadata={op_name="neg"}\n}\n')
    stripped = guard.strip_hlo(program)
    assert "metadata" not in stripped and "/a/b.py" not in stripped and "negate(%x.1)" in stripped
    renamed = guard.strip_hlo(program.replace("jit_helper_", "jit_renamed_"))
    changed = guard.strip_hlo(program.replace("f32[4]{0} negate", "f32[8]{0} negate"))
    for name, text in (("a", stripped), ("b", renamed), ("c", changed)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "step.hlo.txt").write_text(text)
        (tmp_path / name / "hashes.txt").write_text(f"step {hash(text)}\n")
    assert guard.compare(str(tmp_path / "a"), str(tmp_path / "b")) == 0
    assert "step: same up to the names of instructions" in capsys.readouterr().out
    assert guard.compare(str(tmp_path / "a"), str(tmp_path / "c")) == 1
    assert "step: DIFFERENT" in capsys.readouterr().out
