"""bpjax's curvature quantities against BackPACK's on the same PyTorch models: values and cost.

Issue 25's two models, the same weights on both sides: the MLP 784-1024-1024-10 (ReLU) at batch
256 and the 2-D CNN 3×3 conv 32, ReLU, 3×3 conv 64, ReLU ('SAME'), 4×4 average pool, dense 10 on
28×28×1 at batch 64; softmax cross-entropy, a mean over the batch.

**Values** (``--check``, a smaller batch; float64 on both sides for the MLP, float32 for the
CNN, as BackPACK's AvgPool2d extension fails on float64 tensors, "expected scalar type Double
but found Float"): bpjax's ``diag_ggn``,
``kflr``, ``sum_grad_squared`` and ``variance`` (``bp.backward_quantities``) against BackPACK's
DiagGGNExact, KFLR, SumGradSquared and Variance, after the conventions are matched:

* BackPACK's individual gradients of a mean loss are ∇ℓ_n / N, bpjax's ∇ℓ_n: SumGradSquared =
  sum_grad_squared / N² and Variance = variance / N² (both normalise the variance by N);
* layouts: torch's Linear weight is (out, in), bpjax's dense W (in, out); its conv weight
  (C_out, C_in, kh, kw), bpjax's (kh, kw, C_in, C_out); a KFLR factor pair is compared as the
  Kronecker block it stands for, entry by entry where it fits (the CNN's), else (the MLP's 784·1024
  rows) by the factors normalised to unit Frobenius norm and the product of their norms, which
  together fix the block (a and g are only defined up to a scale between them); the conv's
  input factor is over the patches, ordered (C_in, kh, kw) by torch's unfold and (kh, kw, C_in) by
  bpjax, so it is permuted first. BackPACK's conv KFLR pairs the input factor summed over the
  R output positions (R times bpjax's "expand" a) with the error factor of the errors summed over
  the positions (bpjax's "reduce" g): each is compared entry by entry with that bpjax factor.

**Cost** (float32, ``--rounds``): each quantity's step against its own plain step, in one run:
bpjax's ``backward_quantities(..., [q])`` jitted over bpjax's ``value_and_grad`` step; BackPACK's
``loss.backward()`` inside ``with backpack(Extension())`` over torch's plain ``loss.backward()``.
Medians of interleaved rounds.

    pip install torch==2.13.0 && pip install --no-deps backpack-for-pytorch einops unfoldNd
    python scripts/benchmarks/backpack_compare.py --check          # values, float64
    python scripts/benchmarks/backpack_compare.py                  # cost, float32
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import numpy as np

QUANTITIES = {"variance": "Variance", "sum_grad_squared": "SumGradSquared", "diag_ggn_mc": "DiagGGNMC",
              "kfac": "KFAC", "batch_l2": "BatchL2Grad", "diag_ggn": "DiagGGNExact", "kflr": "KFLR"}
SAVEFIELD = {"Variance": "variance", "SumGradSquared": "sum_grad_squared", "DiagGGNMC": "diag_ggn_mc",
             "KFAC": "kfac", "BatchL2Grad": "batch_l2", "DiagGGNExact": "diag_ggn_exact", "KFLR": "kflr"}


def models(name, batch, dtype):
    """(bpjax model, torch model with the same weights, x (N, 28, 28, 1) or (N, 784), y)."""
    import jax
    import jax.numpy as jnp
    import torch
    import bpjax as bp
    gen = np.random.default_rng(0)
    if name == "mlp":
        model = bp.sequential(bp.dense(1024), bp.relu(), bp.dense(1024), bp.relu(), bp.dense(10))
        x = gen.standard_normal((batch, 784))
    else:
        model = bp.sequential(bp.conv(32, 3, padding="SAME"), bp.relu(), bp.conv(64, 3, padding="SAME"), bp.relu(),
                              bp.avg_pool(4, strides=4), bp.flatten(), bp.dense(10))
        x = gen.standard_normal((batch, 28, 28, 1))
    y = gen.integers(0, 10, batch)
    params, state, _ = model.init(jax.random.PRNGKey(0), x.shape[1:])
    params = bp.cast_floating(params, dtype)
    tdt = torch.float64 if dtype == jnp.float64 else torch.float32
    t = lambda a: torch.tensor(np.asarray(a), dtype=tdt)                       # noqa: E731
    if name == "mlp":
        layers = [torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                  torch.nn.Linear(1024, 10)]
        for i in (0, 2, 4):
            layers[i].weight.data, layers[i].bias.data = t(params[i]["w"]).T.contiguous(), t(params[i]["b"])
    else:
        layers = [torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, padding=1),
                  torch.nn.ReLU(), torch.nn.AvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(7 * 7 * 64, 10)]
        for i in (0, 2):
            layers[i].weight.data = t(params[i]["w"]).permute(3, 2, 0, 1).contiguous()
            layers[i].bias.data = t(params[i]["b"])
        # bpjax flattens (7, 7, 64) channels last; torch (64, 7, 7): permute the dense's rows to match
        w = np.asarray(params[6]["w"]).reshape(7, 7, 64, 10).transpose(2, 0, 1, 3).reshape(-1, 10)
        layers[6].weight.data, layers[6].bias.data = t(w).T.contiguous(), t(params[6]["b"])
    tm = torch.nn.Sequential(*layers).to(tdt)
    xt = t(x) if name == "mlp" else t(x).permute(0, 3, 1, 2).contiguous()
    return model, params, state, jnp.asarray(x, dtype), jnp.asarray(y), tm, xt, torch.tensor(y)


def _torch_layout(a, kind):
    """A bpjax param (or its per-param quantity) in torch's layout."""
    a = np.asarray(a)
    if kind == "dense_w":
        return a.T
    if kind == "conv_w":
        return a.transpose(3, 2, 0, 1)
    return a


def check(name, batch):
    """The largest relative difference per quantity and layer, bpjax against BackPACK."""
    import jax
    import jax.numpy as jnp
    import torch
    from backpack import backpack, extend
    from backpack import extensions as ext
    import bpjax as bp
    jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if name == "mlp" else jnp.float32    # BackPACK's AvgPool2d fails in float64
    model, params, state, x, y, tm, xt, yt = models(name, batch, dtype)
    f = jax.jit(bp.backward_quantities(model, bp.softmax_cross_entropy(),
                                       ["variance", "sum_grad_squared", "diag_ggn", "kflr"]))
    (value, _), grads, ours = f(params, state, x, y)
    reduced = jax.jit(bp.backward_quantities(model, bp.softmax_cross_entropy(), ["kflr"], kronecker="reduce"))(
        params, state, x, y)[2]
    tm, lossf = extend(tm), extend(torch.nn.CrossEntropyLoss())
    loss = lossf(tm(xt), yt)
    with backpack(ext.Variance(), ext.SumGradSquared(), ext.DiagGGNExact(), ext.KFLR()):
        loss.backward()
    assert abs(float(loss.detach()) - float(value)) < (1e-10 if name == "mlp" else 1e-5) * abs(float(value)), (float(loss.detach()), float(value))
    mods = [m for m in tm if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    labels = [k for k in ours]                                                  # forward order
    rows = []

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))

    for label, m in zip(labels, mods):
        q = ours[label]
        kind = "conv_w" if isinstance(m, torch.nn.Conv2d) else "dense_w"
        w_perm = None
        if name == "cnn" and isinstance(m, torch.nn.Linear):                    # the dense after the pool
            w_perm = lambda a: np.asarray(a).reshape(7, 7, 64, 10).transpose(2, 0, 1, 3).reshape(-1, 10).T  # noqa: E731
        to_t = w_perm or (lambda a: _torch_layout(a, kind))                    # noqa: E731
        rows.append((label, "Variance w", rel(to_t(q["variance"]["w"]) / batch ** 2, m.weight.variance.detach().numpy())))
        rows.append((label, "SumGradSquared w",
                     rel(to_t(q["sum_grad_squared"]["w"]) / batch ** 2, m.weight.sum_grad_squared.detach().numpy())))
        rows.append((label, "DiagGGNExact w", rel(to_t(q["diag_ggn"]["w"]), m.weight.diag_ggn_exact.detach().numpy())))
        rows.append((label, "DiagGGNExact b", rel(q["diag_ggn"]["b"], m.bias.diag_ggn_exact.detach().numpy())))
        g_t, a_t = (f.detach().numpy() for f in m.weight.kflr)                 # G (out, out), A (in, in)
        k = q["kflr"]["w"]
        a, g = np.asarray(k.a), np.asarray(k.g)
        if kind == "conv_w":                                                    # patches (kh, kw, cin) -> (cin, kh, kw)
            kh, kw, cin = m.kernel_size[0], m.kernel_size[1], m.in_channels
            p = np.arange(kh * kw * cin).reshape(kh, kw, cin).transpose(2, 0, 1).reshape(-1)
            positions = int(np.prod(x.shape[1:3]))                              # 'SAME': R = H·W output positions
            a = positions * a[np.ix_(p, p)]                                     # BackPACK: Σ over positions
            g = np.asarray(reduced[label]["kflr"]["w"].g)                       # BackPACK: the reduced errors'
            rows.append((label, "KFLR A = R·a(expand)", rel(a, a_t)))
            rows.append((label, "KFLR G = g(reduce)", rel(g, g_t)))
            continue
        elif w_perm is not None:
            p = np.arange(7 * 7 * 64).reshape(7, 7, 64).transpose(2, 0, 1).reshape(-1)
            a = a[np.ix_(p, p)]
        norm = lambda z: z / np.linalg.norm(z)                                  # noqa: E731
        rows.append((label, "KFLR A (normalised)", rel(norm(a), norm(a_t))))
        rows.append((label, "KFLR G (normalised)", rel(norm(g), norm(g_t))))
        rows.append((label, "KFLR ‖A‖·‖G‖", rel(np.linalg.norm(a) * np.linalg.norm(g),
                                                np.linalg.norm(a_t) * np.linalg.norm(g_t))))
    return rows


def _timed(fns, rounds, reps):
    """Median ms per call of each of ``fns`` {name: f()}, interleaved round by round."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()                                                                     # warm (and compile)
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            times[k].append((time.perf_counter() - t0) / reps * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def cost(name, batch, quantities, rounds, reps):
    import jax
    import jax.numpy as jnp
    import torch
    from backpack import backpack, extend
    from backpack import extensions as ext
    import bpjax as bp
    model, params, state, x, y, tm, xt, yt = models(name, batch, jnp.float32)
    loss = bp.softmax_cross_entropy()
    key = jax.random.PRNGKey(1)
    fns = {}
    plain = jax.jit(bp.value_and_grad(model, loss))
    fns["bpjax plain"] = lambda: jax.block_until_ready(plain(params, state, x, y))
    for q in quantities:
        f = jax.jit(bp.backward_quantities(model, loss, [q]))
        fns[f"bpjax {q}"] = (lambda f=f: jax.block_until_ready(f(params, state, x, y, key=key)))
    tm, lossf = extend(tm), extend(torch.nn.CrossEntropyLoss())

    def torch_step(extension=None):
        tm.zero_grad()
        out = lossf(tm(xt), yt)
        if extension is None:
            out.backward()
        else:
            with backpack(extension()):
                out.backward()

    fns["torch plain"] = torch_step
    for q in quantities:
        fns[f"BackPACK {QUANTITIES[q]}"] = (lambda e=getattr(ext, QUANTITIES[q]): torch_step(e))
    ms = _timed(fns, rounds, reps)
    rows = []
    for q in quantities:
        rows.append((q, QUANTITIES[q], ms[f"bpjax {q}"], ms[f"bpjax {q}"] / ms["bpjax plain"],
                     ms[f"BackPACK {QUANTITIES[q]}"], ms[f"BackPACK {QUANTITIES[q]}"] / ms["torch plain"]))
    return ms["bpjax plain"], ms["torch plain"], rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    p.add_argument("--check", action="store_true", help="compare the values (float64) instead of timing")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 256/64 to time, 16 to check)")
    p.add_argument("--quantities", default=",".join(QUANTITIES), help="comma-separated: " + ", ".join(QUANTITIES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    qs = [q for q in args.quantities.split(",") if q]
    if any(m not in ("mlp", "cnn") for m in names) or any(q not in QUANTITIES for q in qs):
        print(f"backpack_compare.py: expected --models from mlp, cnn and --quantities from {', '.join(QUANTITIES)}, "
              f"got {args.models!r} and {args.quantities!r}", file=sys.stderr)
        return 2
    try:
        import backpack  # noqa: F401
        import torch
    except ImportError as e:
        print(f"backpack_compare.py: needs torch and backpack-for-pytorch (bench-only): {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(os.cpu_count() or 1)
    import jax
    load = os.getloadavg()
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, JAX {jax.__version__}, "
          f"PyTorch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"load average before {load[0]:.2f}")
    if args.check:
        print("| model | layer | quantity | largest relative difference |\n|---|---|---|---|")
        for m in names:
            for label, what, d in check(m, args.batch or 16):
                print(f"| {m} | {label} | {what} | {d:.1e} |")
        return 0
    print("| model | batch | bpjax quantity | BackPACK extension | bpjax ms | × bpjax plain | BackPACK ms | "
          "× torch plain backward |\n|---|---|---|---|---|---|---|---|")
    for m in names:
        batch = args.batch or (256 if m == "mlp" else 64)
        base, tbase, rows = cost(m, batch, qs, args.rounds, args.reps)
        print(f"| {m} | {batch} | plain value_and_grad | plain backward | {base:.1f} | 1.00 | {tbase:.1f} | 1.00 |")
        for q, e, ms, r, bms, br in rows:
            print(f"| {m} | {batch} | {q} | {e} | {ms:.1f} | {r:.2f} | {bms:.1f} | {br:.2f} |")
    load = os.getloadavg()
    print(f"load average after {load[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
