#!/usr/bin/env python
"""hlo_guard: prove that a file-layout refactor of bpjax leaves the compiled programs unchanged.

Usage::

    python scripts/benchmarks/hlo_guard.py --repo . --out DIR      # compile every program, write DIR
    python scripts/benchmarks/hlo_guard.py --compare DIR_A DIR_B   # same / DIFFERENT per program; exit 1 on any

Run it on a checkout of the commit before a refactor and on the one after, on the same machine
with the same versions, and compare. ``same up to the names of instructions`` means the programs
differ only in names XLA derived from Python function names (a renamed jitted helper).

The programs (all on the CPU, ``JAX_PLATFORMS=cpu`` forced; ``XLA_FLAGS`` left as it is):

* ``bench_<model>_bp`` / ``bench_<model>_autodiff``: scripts/benchmarks/bench.py's jitted training step
  (forward, softmax cross-entropy, backward, optax Adam update, ``donate_argnums=(0, 1)``) with
  ``bp.value_and_grad`` (the hand-written backward) and ``bp.reference_value_and_grad``
  (jax.value_and_grad of the same loss), for bench.py's models ``mlp128``, ``cnn1d``, ``cnn2d``,
  ``gru``, ``gpt`` at bench.py's own shapes. The step is built by bench.py's own ``jax_step``:
  ``jax.jit`` is spied on while it runs and the program it compiles is taken.
* ``fit_chunk_mlp128`` / ``fit_chunk_cnn1d``: ``bpjax.train.make_train_chunk`` for bench.py's MLP
  and MNIST-1D CNN with ``optax.adam(1e-3)`` (fit's default), built and lowered as ``fit`` does
  (``_prepare``/``_run_epoch``): fit's default batch 128 and val_fraction 0.1 on a 4000-example
  training set (MNIST-1D's size), ``max_steps = steps_per_epoch``; arguments ``(carry, x_all,
  y_all, order, np.int32 first, np.int32 count, key_dropout, np.int32 step0)``. The chunk is
  already ``jax.jit(chunk, donate_argnums=(0,))``, so it is lowered directly (wrapping it in
  another ``jax.jit`` would drop the donation).

Each program is ``.lower(*args).compile().as_text()``, then stripped of source locations: every
``metadata={...}`` attribute (op_type/op_name/source_file/source_line/stack_frame_id), the
``FileNames``/``FunctionNames``/``FileLocations``/``StackFrames`` tables that newer XLA prints
after the HloModule line, any stray ``source_file=``/``source_line=``/``stack_frame_id=``, and a
file path in the HloModule name. DIR gets ``<name>.hlo.txt`` (stripped), ``hashes.txt``
(``name sha256`` per line) and ``manifest.json`` (versions, XLA_FLAGS, paths, how each program
was built, compile times; not compared, only reported).
"""
from __future__ import annotations

import argparse
import difflib
import glob
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import re
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"        # force the CPU before jax is imported; XLA_FLAGS untouched

BENCH_MODELS = ("mlp128", "cnn1d", "cnn2d", "gru", "gpt")
CHUNK_MODELS = ("mlp128", "cnn1d")
VARIANTS = (("bp", "value_and_grad"), ("autodiff", "reference_value_and_grad"))


# ----------------------------------------------------------------------------- stripping


def _skip_braced(text: str, i: int) -> int:
    """``text[i] == '{'``: the index just past its matching ``}``, skipping quoted strings
    (with backslash escapes) so that braces inside op_name/source_file strings don't count."""
    assert text[i] == "{"
    depth, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError("unbalanced braces in HLO text")


def _remove_attr(text: str, name: str) -> str:
    """Every ``, name={...}`` (or ``name={...}``) attribute removed."""
    out, pos = [], 0
    pat = re.compile(r",?\s*\b" + re.escape(name) + r"=\{")
    while True:
        m = pat.search(text, pos)
        if m is None:
            out.append(text[pos:])
            return "".join(out)
        out.append(text[pos:m.start()])
        pos = _skip_braced(text, m.end() - 1)


_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
_STRAY = re.compile(r',?\s*\b(?:source_file="(?:[^"\\]|\\.)*"|source_line=\d+|source_end_line=\d+|'
                    r'source_column=\d+|source_end_column=\d+|stack_frame_id=\d+)')


def strip_hlo(text: str) -> str:
    """The compiled HLO text without source locations (see the module docstring)."""
    text = _remove_attr(text, "metadata")
    lines, out, in_table = text.split("\n"), [], False
    for line in lines:
        if line.strip() in _TABLES:             # a location table: up to the next blank line
            in_table = True
            continue
        if in_table:
            if line.strip() == "":
                in_table = False
            continue
        out.append(line)
    text = "\n".join(out)
    text = _STRAY.sub("", text)

    def module_name(m):
        name = m.group(1)
        if "/" in name or "\\" in name or ".py" in name:
            name = "module"
        return f"HloModule {name}"
    text = re.sub(r"^HloModule ([^,\s]+)", module_name, text, count=1, flags=re.M)
    text = re.sub(r"\n{3,}", "\n\n", text)      # the removed tables leave runs of blank lines
    return text.strip("\n") + "\n"


# ----------------------------------------------------------------------------- locating the repo's code


def _setup_path(repo: str):
    repo = os.path.realpath(repo)
    here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) not in (here, repo)]
    sys.path.insert(0, repo)
    for m in [m for m in sys.modules if m == "bpjax" or m.startswith("bpjax.")]:
        del sys.modules[m]
    import bpjax
    f = os.path.realpath(bpjax.__file__)
    print(f"bpjax: {f}")
    if not f.startswith(repo + os.sep):
        sys.exit(f"hlo_guard: bpjax resolved to {f}, not under {repo}")
    return repo, f


def _import_path(path: str, name: str):
    """Import ``path`` as a module; as ``pkg.mod`` when its folder is a package (relative imports)."""
    d = os.path.dirname(path)
    if os.path.exists(os.path.join(d, "__init__.py")):
        parent = os.path.dirname(d)
        if parent not in sys.path:
            sys.path.insert(1, parent)
        return importlib.import_module(f"{os.path.basename(d)}.{os.path.splitext(os.path.basename(path))[0]}")
    if d not in sys.path:
        sys.path.insert(1, d)                   # sibling imports (a shared models module)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def find_bench(repo: str):
    """bench.py's module and the modules beside it that may hold its models or its step."""
    candidates = [os.path.join(repo, "scripts", "bench.py"),
                  os.path.join(repo, "scripts", "benchmarks", "bench.py")]
    candidates += sorted(glob.glob(os.path.join(repo, "scripts", "**", "bench.py"), recursive=True))
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        sys.exit(f"hlo_guard: no bench.py under {repo}/scripts or {repo}/scripts/benchmarks")
    bench = _import_path(path, "hlo_guard_bench")
    print(f"bench: {path}")
    # other modules that may hold the moved models/step: siblings of bench.py, and scripts/benchmarks/
    extra, seen = [], {os.path.realpath(path)}
    for d in {os.path.dirname(path), os.path.join(repo, "scripts", "benchmarks")}:
        for p in sorted(glob.glob(os.path.join(d, "*.py"))):
            if os.path.realpath(p) in seen or os.path.basename(p) == "__init__.py":
                continue
            seen.add(os.path.realpath(p))
            try:
                src = open(p, encoding="utf-8").read()
            except OSError:
                continue
            if re.search(r"^MODELS\s*=|^def (mlp|cnn1d|cnn2d|gru|gpt|jax_step)\(", src, re.M):
                extra.append(p)
    return path, bench, extra


def _lookup(modules, attr):
    for m in modules:
        if hasattr(m, attr):
            return getattr(m, attr), m
    return None, None


def model_builders(bench, extra_paths):
    """``{name: () -> Bench}`` for BENCH_MODELS, from a MODELS dict or from the builder functions."""
    modules, loaded = [bench], []

    def more():
        for i, p in enumerate(extra_paths):
            if p not in loaded:
                loaded.append(p)
                try:
                    modules.append(_import_path(p, f"hlo_guard_extra{i}"))
                except Exception as e:      # noqa: BLE001
                    print(f"  (could not import {p}: {type(e).__name__}: {e})")
    fallback = {"mlp128": ("mlp", (128,)), "cnn1d": ("cnn1d", ()), "cnn2d": ("cnn2d", ()),
                "gru": ("gru", ()), "gpt": ("gpt", ())}
    out = {}
    for attempt in range(2):
        models, where = _lookup(modules, "MODELS")
        for name in BENCH_MODELS:
            if name in out:
                continue
            if isinstance(models, dict) and name in models:
                out[name] = (models[name], f"{where.__name__}.MODELS[{name!r}]")
                continue
            fn_name, args = fallback[name]
            fn, where2 = _lookup(modules, fn_name)
            if fn is not None:
                out[name] = ((lambda fn=fn, args=args: fn(*args)), f"{where2.__name__}.{fn_name}{args}")
        if len(out) == len(BENCH_MODELS) or attempt:
            break
        more()
    missing = [n for n in BENCH_MODELS if n not in out]
    if missing:
        sys.exit(f"hlo_guard: bench models {missing} not found in bench.py or beside it")
    step, where = _lookup(modules, "jax_step")
    if step is None:
        more()
        step, where = _lookup(modules, "jax_step")
    return out, step, (where.__name__ if where else None)


# ----------------------------------------------------------------------------- the programs


class _Spy:
    """While active, ``jax.jit(...).lower(...).compile()`` records each compiled program."""

    def __init__(self, jax):
        self.jax, self.compiled, self.real = jax, [], jax.jit

    def __enter__(self):
        spy, real = self, self.real

        class Lowered:
            def __init__(self, low):
                self._low = low

            def compile(self, *a, **k):
                c = self._low.compile(*a, **k)
                spy.compiled.append(c)
                return c

            def __getattr__(self, n):
                return getattr(self._low, n)

        class Jitted:
            def __init__(self, j):
                self._j = j

            def __call__(self, *a, **k):
                return self._j(*a, **k)

            def lower(self, *a, **k):
                return Lowered(self._j.lower(*a, **k))

            def __getattr__(self, n):
                return getattr(self._j, n)

        def jit(fun=None, *a, **k):
            if fun is None:                      # used as @jax.jit(...) factory
                return lambda f: Jitted(real(f, *a, **k))
            return Jitted(real(fun, *a, **k))

        self.jax.jit = jit
        return self

    def __exit__(self, *exc):
        self.jax.jit = self.real


def bench_programs(builders, jax_step):
    """``[(name, compiled, how)]``: bench.py's step for every model and both gradients."""
    import jax
    import jax.numpy as jnp
    import bpjax as bp
    out = []
    for key in BENCH_MODELS:
        make, where = builders[key]
        b = make()
        for suffix, fn_name in VARIANTS:
            grad_fn = getattr(bp, fn_name)
            name = f"bench_{key}_{suffix}"
            t0 = time.perf_counter()
            with _Spy(jax) as spy:
                jax_step(b, grad_fn, jnp.float32)
            if len(spy.compiled) != 1:
                raise SystemExit(f"hlo_guard: expected bench.py's jax_step to compile one program for {name}, "
                                 f"got {len(spy.compiled)}")
            compiled, how = spy.compiled[0], "bench jax_step (spied jax.jit)"
            dt = time.perf_counter() - t0
            print(f"  {name}: {dt:.1f} s  [{where}; {how}]")
            out.append((name, compiled, {"how": how, "model": where, "batch": b.batch,
                                         "x": list(b.x.shape), "seconds": round(dt, 2)}))
    return out


def chunk_programs(builders):
    """``[(name, compiled, info)]``: fit's compiled chunk for the MLP and the MNIST-1D CNN."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import bpjax as bp
    import bpjax.train as train
    try:
        from bpjax.datasets import Dataset
    except ImportError:
        Dataset = None
    n_total, batch_size, val_fraction, seed = 4000, 128, 0.1, 0      # fit's defaults, MNIST-1D's size
    out = []
    for key in CHUNK_MODELS:
        make, where = builders[key]
        b = make()
        gen = np.random.default_rng(7)
        x = gen.standard_normal((n_total,) + tuple(b.x.shape[1:]), np.float32)
        y = gen.integers(0, 10, n_total).astype(np.int32)
        if Dataset is not None and hasattr(train, "split_validation"):
            data = Dataset(x, y, x[:1000], y[:1000], 10, "synthetic")
            x_tr, y_tr, _, _ = train.split_validation(data, val_fraction, seed)
        else:
            order = np.random.default_rng(seed).permutation(n_total)
            tr = order[int(round(val_fraction * n_total)):]
            x_tr, y_tr = x[tr], y[tr]
        n = x_tr.shape[0]
        bs = min(batch_size, n)
        steps_per_epoch = n // bs
        max_steps = min(steps_per_epoch, getattr(train, "MAX_STEPS_PER_DISPATCH", 4096))
        model, loss, optimizer = b.model, bp.softmax_cross_entropy(), optax.adam(1e-3)
        t0 = time.perf_counter()
        chunk = train.make_train_chunk(model, loss, optimizer, batch_size=bs, max_steps=max_steps,
                                       classification=True, mesh=None, fsdp=False, compute_dtype=None)
        # fit's _start_or_resume / _place_carry / _place_data / _order_fn / _run_epoch
        k_init, data_key, k_dropout = jax.random.split(jax.random.PRNGKey(seed), 3)
        params, state, _ = model.init(k_init, tuple(x_tr.shape[1:]))
        carry = (params, state, optimizer.init(params))
        x_dev, y_dev = jnp.asarray(x_tr), jnp.asarray(y_tr)
        order = jax.jit(lambda k, e: jax.random.permutation(jax.random.fold_in(k, e), n))(data_key, 1)
        args = (carry, x_dev, y_dev, order, np.int32(0), np.int32(max_steps), k_dropout, np.int32(0))
        compiled = chunk.lower(*args).compile()
        dt = time.perf_counter() - t0
        name = f"fit_chunk_{key}"
        print(f"  {name}: {dt:.1f} s  [{where}; n={n}, batch {bs}, max_steps {max_steps}]")
        out.append((name, compiled, {"how": "bpjax.train.make_train_chunk(...).lower(fit's args)", "model": where,
                                     "n": n, "batch": bs, "max_steps": max_steps, "seconds": round(dt, 2)}))
    return out


# ----------------------------------------------------------------------------- modes


def run(repo: str, out_dir: str) -> int:
    t_start = time.perf_counter()
    repo, bpjax_file = _setup_path(repo)
    import jax
    import jaxlib
    import optax
    import numpy as np
    print(f"jax {jax.__version__} (backend {jax.default_backend()}), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    bench_path, bench, extra = find_bench(repo)
    builders, jax_step, step_where = model_builders(bench, extra)
    if jax_step is None:
        raise SystemExit("hlo_guard: found no jax_step beside bench.py's models")
    print(f"step: {step_where}.jax_step")
    programs = bench_programs(builders, jax_step) + chunk_programs(builders)

    os.makedirs(out_dir, exist_ok=True)
    for f in glob.glob(os.path.join(out_dir, "*.hlo.txt")):
        os.remove(f)
    hashes, info = [], {}
    for name, compiled, meta in programs:
        text = strip_hlo(compiled.as_text())
        leftover = [w for w in ("source_file", "source_line", "stack_frame_id", "metadata=", repo)
                    if w in text]
        if leftover:
            print(f"  warning: {name} still mentions {leftover}")
        with open(os.path.join(out_dir, f"{name}.hlo.txt"), "w") as f:
            f.write(text)
        digest = hashlib.sha256(text.encode()).hexdigest()
        hashes.append(f"{name} {digest}")
        info[name] = dict(meta, sha256=digest, lines=text.count("\n"))
    with open(os.path.join(out_dir, "hashes.txt"), "w") as f:
        f.write("\n".join(hashes) + "\n")

    seconds = time.perf_counter() - t_start
    manifest = {"repo": repo, "bpjax": bpjax_file, "bench": bench_path, "step": step_where,
                "jax": jax.__version__, "jaxlib": jaxlib.__version__, "optax": optax.__version__,
                "numpy": np.__version__, "python": platform.python_version(),
                "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS"),
                "cpu_count": os.cpu_count(), "seconds": round(seconds, 1), "programs": info}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(programs)} programs to {out_dir} in {seconds:.0f} s")
    return 0


def _read_hashes(d):
    with open(os.path.join(d, "hashes.txt")) as f:
        return dict(line.split() for line in f if line.strip())


def canonical_names(text: str) -> str:
    """The program with every instruction and computation name (``%name``) replaced by its
    order of first appearance: two programs that differ only in the names XLA derived from
    Python function names (a renamed jitted helper) become equal; any other change stays."""
    names = {}
    return re.sub(r"%[\w.\-]+", lambda m: names.setdefault(m.group(0), f"%v{len(names)}"), text)


def compare(a: str, b: str, context_lines: int = 20) -> int:
    ha, hb = _read_hashes(a), _read_hashes(b)
    any_diff = False
    for name in list(ha) + [n for n in hb if n not in ha]:
        if name not in ha or name not in hb:
            any_diff = True
            print(f"{name}: DIFFERENT (only in {a if name in ha else b})")
            continue
        ta = open(os.path.join(a, f"{name}.hlo.txt")).read()
        tb = open(os.path.join(b, f"{name}.hlo.txt")).read()
        if ha[name] == hb[name] and ta == tb:
            print(f"{name}: same")
            continue
        if canonical_names(ta) == canonical_names(tb):
            print(f"{name}: same up to the names of instructions")
            continue
        any_diff = True
        print(f"{name}: DIFFERENT")
        diff = list(difflib.unified_diff(ta.splitlines(), tb.splitlines(), f"{a}/{name}.hlo.txt",
                                         f"{b}/{name}.hlo.txt", n=1, lineterm=""))
        for line in diff[:context_lines]:
            print("    " + (line if len(line) <= 300 else line[:300] + " …"))
        if len(diff) > context_lines:
            print(f"    ... ({len(diff) - context_lines} more diff lines)")
    # environment notes (not compared as programs)
    try:
        ma, mb = (json.load(open(os.path.join(d, "manifest.json"))) for d in (a, b))
        for k in ("jax", "jaxlib", "optax", "numpy", "python", "XLA_FLAGS", "cpu_count"):
            if ma.get(k) != mb.get(k):
                print(f"note: {k} differs: {ma.get(k)!r} vs {mb.get(k)!r}")
        how = {n: (ma["programs"].get(n, {}).get("how"), mb["programs"].get(n, {}).get("how"))
               for n in ma.get("programs", {})}
        for n, (x, y) in how.items():
            if x != y:
                print(f"note: {n} built differently: {x!r} vs {y!r}")
    except (OSError, ValueError, KeyError):
        pass
    print("all same" if not any_diff else "some programs DIFFER")
    return 1 if any_diff else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", help="the bpjax checkout to import (put first on sys.path)")
    p.add_argument("--out", help="folder for <name>.hlo.txt, hashes.txt, manifest.json")
    p.add_argument("--compare", nargs=2, metavar=("DIR_A", "DIR_B"))
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not (args.repo and args.out):
        p.error("give --repo and --out, or --compare DIR_A DIR_B")
    return run(args.repo, args.out)


if __name__ == "__main__":
    sys.exit(main())
