"""scripts/benchmarks/gpu_check.sh, the prepared GPU check, runs end to end on the CPU in its tiny mode.

Only the wiring is checked: every stage runs and passes (or is skipped, saying why), the results
land in OUT_DIR as at most 8 files (what the device tool brings back), and the summary printed
last names every stage with its status. Timings never decide anything here.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = ("env", "data", "tests", "bench_float32", "bench_bfloat16", "fit_speed", "gpt", "gpt2_parity", "gpt2_memory", "finetune")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_check_runs_every_stage_in_tiny_mode(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "BPJAX_GPU_CHECK_TINY": "1", "PYTHON": sys.executable,
           "BPJAX_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "benchmarks" / "gpu_check.sh"), str(out)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8, files
    expected = {"summary.md", "gpu_check.log", "bench_float32.md", "bench_bfloat16.md"}
    if (ROOT / "scripts" / "benchmarks" / "fit_speed.py").exists():
        expected.add("fit_speed.json")
    if importlib.util.find_spec("tokenizers"):
        expected |= {"finetune_losses.json", "finetune_curves.png"}
    assert expected <= set(files), files

    summary = (out / "summary.md").read_text()
    assert "mode: tiny (BPJAX_GPU_CHECK_TINY=1)" in summary
    assert "- versions: python " in summary and "jax " in summary and "- bpjax: commit " in summary
    for stage in STAGES:
        assert re.search(rf"^\| {stage} \| (ok|skipped \([^|]+\)) \| \d+ \|", summary, re.M), (stage, summary)
    assert proc.stdout.rstrip().endswith(summary.rstrip())            # the summary comes last
    log = (out / "gpu_check.log").read_text()
    assert "tiny mode runs a subset" in log and "=== bench_bfloat16 (limit" in log
    assert "The bfloat16 peak," in (out / "bench_float32.md").read_text()        # both peaks


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_check_full_mode_commands_and_a_failed_stage_does_not_stop_the_others(tmp_path):
    """The GPU branch, wired on the CPU: a stand-in python reports backend=gpu and echoes the
    stages' commands instead of running them, and fails the bfloat16 bench; the stages after
    it still run, the summary says FAILED for that one only, and the exit status is 1."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1" = "-" ] && [ $# -eq 1 ]; then "{sys.executable}" - | sed 's/^backend=cpu/backend=gpu/'; exit ${{PIPESTATUS[0]}}; fi
case "$*" in
    *bench.py*bfloat16*) echo "bench broke"; exit 3 ;;
    *scripts/*.py* | *pytest*) echo "RAN: $*"; exit 0 ;;
esac
exec "{sys.executable}" "$@"
""")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "BPJAX_GPU_CHECK_TINY"}
    env.update(PYTHON=str(fake), BPJAX_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "benchmarks" / "gpu_check.sh"), str(out)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-6000:] + proc.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    assert "mode: full (JAX's backend is gpu)" in summary
    assert re.search(r"^\| bench_bfloat16 \| FAILED \(exit 3\) \| \d+ \| bench broke \|", summary, re.M)
    for stage in ("tests", "bench_float32", "gpt"):
        assert re.search(rf"^\| {stage} \| ok \|", summary, re.M), (stage, summary)
    log = (out / "gpu_check.log").read_text()
    for command in ("JAX_DEFAULT_MATMUL_PRECISION=highest",
                    "tests/test_crosscheck.py tests/test_networks.py",
                    "scripts/benchmarks/bench.py --rounds 3 --chunk-seconds 0.25 --pause 0.05 --dtype float32 --out",
                    "--preset gpt2-small --dtype bfloat16 --steps 30 --batch 8 --print-every 10 "
                    "--eval-every 0 --sample-chars 0"):
        assert "RAN: " in log and command in log, command
    assert re.search(r"^RAN: scripts/benchmarks/gpt2_memory\.py$", log, re.M)        # full sizes on a GPU
    assert re.search(r"^RAN: scripts/examples/finetune_gpt2\.py --from \S+ --text \S+ --out \S+ --curve \S+ "
                     r"--steps 200 --batch-tokens 8192 --micro-batch 8 --context 256 --eval-every 20 --dtype bfloat16$",
                     log, re.M)
    if (ROOT / "scripts" / "benchmarks" / "fit_speed.py").exists():
        assert re.search(r"RAN: scripts/benchmarks/fit_speed\.py --out \S+/fit_speed\.json --batch-sizes 32,1024", log)
