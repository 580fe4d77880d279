"""Three gradient checkers on one corpus of hand-written VJPs: which bugs each catches.

    python scripts/benchmarks/vjp_corpus.py                    # prints two markdown tables: the summary, then per case
    python scripts/benchmarks/vjp_corpus.py --dtype bfloat16   # the same functions and points, in bfloat16

The corpus (``scripts/benchmarks/vjp_corpus_fns.py``) holds ``jax.custom_vjp`` functions, half correct
(kinks and pytree inputs included) and half with a planted bug, and their PyTorch twins as
``torch.autograd.Function`` with the same rules and the same bugs. At the same inputs, in
float64 (float32 for the kernel that refuses float64), it runs

- ``bp.check_vjp(f, *args)`` (defaults: float64 central differences, no reference);
- ``jax.test_util.check_grads(f, args, order=1, modes=["rev"])`` (defaults);
- ``torch.autograd.gradcheck(twin, inputs)`` (defaults), when torch is installed.

A checker *catches* a planted bug when it fails the case, raises a *false alarm* when it fails
a correct one, and *names the wrong input* when it says which input is wrong and is right:
bpjax names every failing input leaf (the set must be exactly the wrong ones); torch names the
first input whose Jacobian mismatches (it must be one of the wrong ones); ``check_grads``
names none. Time is the wall-clock time of all its checks, compiles included.
"""
from __future__ import annotations

import argparse
import pathlib
import re
import sys
import time
import warnings

import jax

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import vjp_corpus_fns as corpus  # noqa: E402

import bpjax as bp  # noqa: E402


DTYPE = {"name": "float64"}          # set by --dtype


def _dtype(case) -> str:
    """--dtype, or the case's own when narrower (a kernel that refuses float64 gets float32)."""
    order = ("bfloat16", "float32", "float64")
    return min(DTYPE["name"], case.dtype, key=order.index)


def _arguments(case):
    import jax.numpy as jnp

    return jax.tree_util.tree_map(lambda a: a.astype(_dtype(case)), corpus.arguments(case, jnp))


def run_bpjax(name, case):
    report = bp.check_vjp(corpus.jax_fn(name), *_arguments(case))
    return (not report.ok), (set(report.failing) == set(case.wrong)) if case.wrong else None


def run_check_grads(name, case):
    from jax.test_util import check_grads

    try:
        check_grads(corpus.jax_fn(name), _arguments(case), order=1, modes=["rev"])
    except AssertionError:
        return True, False                        # it fails the check, naming no input
    return False, (False if case.wrong else None)


def run_torch(name, case):
    import torch
    from torch.autograd.gradcheck import GradcheckError

    dtype = getattr(torch, _dtype(case))
    inputs = [torch.tensor(a, dtype=torch.float64).to(dtype).requires_grad_() for a in corpus.leaves(case)]
    try:
        with warnings.catch_warnings():                 # below float64 it warns, then checks anyway
            warnings.simplefilter("ignore")
            torch.autograd.gradcheck(corpus.torch_fn(name), tuple(inputs))
    except GradcheckError as e:
        m = re.search(r"with respect to input (\d+)", str(e))
        named = m is not None and int(m.group(1)) in corpus.wrong_leaves(case)
        return True, (named if case.wrong else None)
    return False, (False if case.wrong else None)


CHECKERS = {"bp.check_vjp": run_bpjax, "jax check_grads (rev)": run_check_grads,
            "torch gradcheck": run_torch}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-torch", action="store_true", help="leave torch.autograd.gradcheck out")
    parser.add_argument("--cases", nargs="*", default=None, help="a subset of the corpus, by name")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32", "bfloat16"),
                        help="the inputs' dtype for every checker (default float64)")
    args = parser.parse_args(argv)
    DTYPE["name"] = args.dtype
    checkers = dict(CHECKERS)
    if args.no_torch:
        checkers.pop("torch gradcheck")
    else:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch is not installed: torch gradcheck left out (pip install torch==2.13.0)", file=sys.stderr)
            checkers.pop("torch gradcheck")
    names = args.cases or list(corpus.CASES)
    results = {c: {} for c in checkers}
    seconds = {c: 0.0 for c in checkers}
    for name in names:
        for checker, fn in checkers.items():
            start = time.perf_counter()
            results[checker][name] = fn(name, corpus.CASES[name])
            seconds[checker] += time.perf_counter() - start
    print(summary_table(names, results, seconds))
    print()
    print(case_table(names, results))
    return results


def summary_table(names, results, seconds) -> str:
    bugs = [n for n in names if corpus.CASES[n].wrong]
    good = [n for n in names if not corpus.CASES[n].wrong]
    lines = ["| checker | planted bugs caught | false alarms | wrong input named | time (s) |",
             "| --- | --- | --- | --- | --- |"]
    for checker, res in results.items():
        caught = sum(res[n][0] for n in bugs)
        alarms = sum(res[n][0] for n in good)
        named = sum(bool(res[n][1]) for n in bugs)
        lines.append(f"| {checker} | {caught} of {len(bugs)} | {alarms} of {len(good)} | "
                     f"{named} of {len(bugs)} | {seconds[checker]:.1f} |")
    return "\n".join(lines)


def case_table(names, results) -> str:
    checkers = list(results)
    lines = ["| case | planted bug | " + " | ".join(checkers) + " |", "|" + " --- |" * (2 + len(checkers))]
    for n in names:
        case = corpus.CASES[n]
        cells = []
        for c in checkers:
            failed, named = results[c][n]
            if not case.wrong:
                cells.append("FALSE ALARM" if failed else "pass")
            else:
                cells.append(("caught" + (", input named" if named else "")) if failed else "MISSED")
        lines.append(f"| {n} | {case.bug or '—'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
