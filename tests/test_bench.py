"""scripts/bench.py runs end to end on its tiniest settings and writes the table.

Timings never decide a test: only the table's shape is checked.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
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
    for needed in (md, "scripts/bench.py --quick", "## Machine", "load average", "jaxlib",
                   "PyTorch column skipped"):
        assert needed in text

