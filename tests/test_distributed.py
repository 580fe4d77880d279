"""Data-parallel and FSDP-sharded training on 4 forced host devices, in a subprocess so the rest
of the suite keeps one device (the checks themselves are in tests/distributed_check.py)."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent


def test_four_devices_match_one():
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE / "distributed_check.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DISTRIBUTED OK" in proc.stdout
    assert proc.stdout.count("max relative error") == 8
