"""scripts/gpu_check.sh, the prepared GPU check, runs end to end on the CPU in its tiny mode.

Only the wiring is checked: every stage runs and passes (or is skipped, saying why), the results
land in OUT_DIR as at most 8 files (what the device tool brings back), and the summary printed
last names every stage with its status. Timings never decide anything here.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = ("env", "data", "tests", "bench_float32", "bench_bfloat16", "fit_speed", "gpt")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_check_runs_every_stage_in_tiny_mode(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "BPJAX_GPU_CHECK_TINY": "1", "PYTHON": sys.executable,
           "BPJAX_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8, files
    expected = {"summary.md", "gpu_check.log", "bench_float32.md", "bench_bfloat16.md"}
    if (ROOT / "scripts" / "fit_speed.py").exists():
        expected.add("fit_speed.json")
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
