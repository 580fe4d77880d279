import importlib.util
import os
import shutil
import tempfile

# The suite compiles well over a thousand small XLA programs, and on the CPU most of its time is
# LLVM optimising them. At -O0 the same programs (same HLO, same IEEE arithmetic: XLA's CPU
# backend has fast-math off) compile about twice as fast; BENCHMARKS.md ("The test suite") has
# the measurements. Set before jax is imported, so that subprocesses the tests start inherit it;
# BPJAX_TEST_XLA_OPT=1 keeps XLA's default level, and a GPU machine keeps it too.
_GPU = any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin"))
if (os.environ.get("BPJAX_TEST_XLA_OPT") != "1" and not _GPU
        and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

# One persistent compilation cache for this run, shared by the xdist workers and the subprocesses
# the tests start (each would otherwise compile the same training steps again). A fresh folder
# per run: a run never reads what an earlier run compiled. The first process to load this file
# (pytest itself, before it starts the workers) makes it and removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="bpjax-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    import atexit
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

# bpjax train's sanity checks (on by default) would add an overfit's compile to every command the
# suite runs; tests/test_health.py turns them on with --sanity.
os.environ.setdefault("BPJAX_SANITY", "0")

import jax  # noqa: E402

# The cross-checks run in float64 as well as float32; arrays are cast explicitly per test.
jax.config.update("jax_enable_x64", True)


def pytest_configure(config):
    """Print the 15 slowest tests at the end of every run (unless --durations says otherwise),
    so that a test that got slow is seen the day it does."""
    if config.getoption("durations") is None:                  # --durations=0 still prints them all
        config.option.durations = 15


#: Test files that start subprocesses or train whole models, run first: with the slow tests at
#: the end, one xdist worker finished long before the other (the suite's CPU time over its wall
#: time was 1.5 of 2 cores); first, the quick files fill in around them. The README's command
#: hands whole files to the workers (``--dist loadfile``), so that a module-scoped fixture that
#: trains a run (test_runs, test_faults, test_multiprocess) runs once, not once per worker.
SLOW_FIRST = ("test_gpu_check", "test_multiprocess", "test_crosscheck", "test_distributed", "test_faults", "test_bf16",
              "test_fuzz", "test_runs", "test_per_example", "test_autodiff_speed", "test_train_gpt", "test_scripts",
              "test_train", "test_dp", "test_clipping", "test_curvature", "test_audit", "test_check_vjp_hard", "test_gradient_flow",
              "test_bench", "test_gpt2_hf", "test_finetune_gpt2")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))      # stable: file order kept within
