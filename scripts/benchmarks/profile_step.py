"""Where one training step's time goes: the XLA operations of a benchmark model's jitted step,
from a ``jax.profiler`` trace, summed per operation and averaged per step.

    python scripts/benchmarks/profile_step.py cnn2d                 # bpjax's hand-written backward
    python scripts/benchmarks/profile_step.py cnn2d --autodiff      # jax.value_and_grad of the same loss

The models are those of ``scripts/benchmarks/bench.py``. Operations that XLA runs asynchronously (some
matrix products on CPU) show only their dispatch, so the list is a guide, not an account.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

import bpjax as bp  # noqa: E402


def profile(model: str, *, autodiff: bool = False, steps: int = 3, top: int = 25):
    """``[(ms per step, calls per step, operation name)]``, the most expensive first."""
    b = bench.MODELS[model]()
    run, _, _ = bench.jax_step(b, bp.reference_value_and_grad if autodiff else bp.value_and_grad)
    run(2)                                                          # compiled and warm
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            run(steps)
        return op_table(d, steps=steps, top=top)


def op_table(trace_dir: str, *, steps: int = 1, top: int = 25, xla_only: bool = False):
    """The newest ``jax.profiler`` trace under ``trace_dir``, summed per operation:
    ``[(ms per step, calls per step, operation name)]``, the most expensive first.

    Every complete event counts, Python frames (``$...``) and the CPU executor's wait left out.
    ``xla_only`` keeps only the events that name an XLA operation (``args["hlo_op"]``), those
    on an accelerator (a ``/device:...`` process) if there are any, and groups by that name;
    without such events it falls back to the accelerator's events, then to every event."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"op_table: no *.trace.json.gz under {trace_dir!r}")
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e
                and not e.get("name", "").startswith(("$", "ThunkExecutor"))]
    name_of = lambda e: e.get("name", "")                          # noqa: E731
    if xla_only:
        device = {e.get("pid") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                  and str(e.get("args", {}).get("name", "")).startswith("/device:")}
        on_device = [e for e in complete if e.get("pid") in device]
        ops = lambda es: [e for e in es if (e.get("args") or {}).get("hlo_op")]   # noqa: E731
        for chosen in (ops(on_device), ops(complete)):
            if chosen:
                complete, name_of = chosen, lambda e: e["args"]["hlo_op"]          # noqa: E731
                break
        else:
            complete = on_device or complete
    total, calls = collections.Counter(), collections.Counter()
    for e in complete:
        total[name_of(e)] += e["dur"]
        calls[name_of(e)] += 1
    return [(us / steps / 1e3, calls[name] / steps, name) for name, us in total.most_common(top)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=sorted(bench.MODELS))
    p.add_argument("--autodiff", action="store_true", help="profile jax.value_and_grad's step instead")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    rows = profile(args.model, autodiff=args.autodiff, steps=args.steps, top=args.top)
    for ms, n, name in rows:
        print(f"{ms:9.2f} ms  ×{n:5.0f}  {name}")
    return rows


if __name__ == "__main__":
    main()
