"""DP-SGD at ε = 1, 3, 8 on MNIST-1D and digits, with the non-private figure of the same model and
recipe beside each, and the same model trained with Opacus (PyTorch) at the same ε, σ, sampling,
epochs, clip and learning rate (issue 24, part 5).

Every bpjax run is a ``bpjax train`` command (printed, and in the table): DP-SGD with Poisson
sampling, ``--dp-epsilon E`` choosing σ for the run's rate B/n and n // B steps an epoch; the
non-private run is the same command without the ``--dp-*`` options; two more runs of the same
recipe say where the accuracy goes: clipped as DP-SGD clips but with no noise (``--dp-noise 0``),
and, where the recipe's learning rate is too large for unclipped gradients, non-private at a
smaller one (:data:`NONPRIVATE_LR`). The Opacus run trains the
same architecture from the same initial params (bpjax's, for the seed, copied into torch), on the
same training split (``fit``'s validation split), with Opacus' own pieces: ``DPDataLoader``
(Poisson sampling at rate B/n, n // B batches an epoch), ``GradSampleModule`` and ``DPOptimizer``
(clip C, noise σ·C, divided by the expected B), σ the one bpjax chose; Opacus' RDP accountant's ε
for it is recorded beside dp-accounting's. Both keep the params of the best validation epoch and
evaluate them once on the test set. Seconds per epoch, both the same way: the time from the end
of epoch 1 to the end of the last, over the epochs after the first (so compiling is left out);
an epoch is its steps, the validation pass, ε accounted, the best params kept and a checkpoint
written (bpjax train: metrics.jsonl's ``seconds``; Opacus: the same steps timed in the loop
below, ``get_epsilon`` of its RDP accountant and a ``torch.save``).

Each run's result is a JSON file in ``--runs`` (default runs/dp_results); a run already there is
not run again, so the grid can be run in parts. Torch and Opacus are bench-only: only the Opacus
runs import them.

    python scripts/examples/dp_results.py                                 # the whole grid
    python scripts/examples/dp_results.py --datasets mnist1d --seeds 0 --epsilons 3
    python scripts/examples/dp_results.py --parts bpjax,nonprivate        # no Opacus, no σ = 0 runs
    python scripts/examples/dp_results.py --table-only                    # the table from --runs
    python scripts/examples/dp_results.py --time-accounting               # what ε accounting costs an epoch
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

#: The recipe of each dataset, the same for DP-SGD, non-private and Opacus, from short tries at
#: ε = 3 on seed 0 (RESULTS.md lists them): SGD is optax's/torch's with momentum 0.9, the learning
#: rate constant. δ: 1e-5 for MNIST-1D (3600 training examples); for digits (1294), 5e-7, under
#: 1/n² = 5.97e-7.
RECIPES = {
    "mnist1d": dict(model="cnn", batch=900, epochs=40, optimizer="sgd", lr=0.5, clip=1.0, delta=1e-5),
    "digits": dict(model="mlp", batch=100, epochs=20, optimizer="adam", lr=1e-2, clip=1.0, delta=5e-7),
}
EPSILONS = (1.0, 3.0, 8.0)
#: A second non-private run where the recipe's learning rate is too large for unclipped
#: gradients (SGD at 0.5 on MNIST-1D diverges on some seeds): the same recipe at this rate.
NONPRIVATE_LR = {"mnist1d": 0.1}
ROOT = pathlib.Path(__file__).resolve().parents[2]


def bpjax_command(dataset, seed, epsilon, out, variant=None):
    """The ``bpjax train`` command of one run (``epsilon`` None: non-private; ``variant``
    "cliponly": clipped as DP-SGD clips, with no noise, σ = 0; "lr": non-private at
    :data:`NONPRIVATE_LR`)."""
    r = RECIPES[dataset]
    lr = NONPRIVATE_LR[dataset] if variant == "lr" else r["lr"]
    cmd = ["bpjax", "train", "--model", r["model"], "--dataset", dataset, "--epochs", str(r["epochs"]),
           "--batch-size", str(r["batch"]), "--optimizer", r["optimizer"], "--lr", f"{lr:g}",
           "--schedule", "constant", "--patience", "0", "--seed", str(seed)]
    if epsilon is not None:
        cmd += ["--dp-clip", f"{r['clip']:g}", "--dp-epsilon", f"{epsilon:g}", "--dp-delta", f"{r['delta']:g}"]
    elif variant == "cliponly":
        cmd += ["--dp-clip", f"{r['clip']:g}", "--dp-noise", "0", "--dp-delta", f"{r['delta']:g}"]
    return cmd + ["--no-progress", "--no-plot", "--overwrite", "--out", str(out)]


def per_epoch(seconds):
    """Seconds per epoch from the cumulative training seconds at each epoch's end: the epochs
    after the first (which compiles), their validation included."""
    return (seconds[-1] - seconds[0]) / (len(seconds) - 1)


def _name(side, dataset, seed, epsilon, variant=None):
    """The name of a run's folder and (with .json) of its result."""
    kind = {None: "np", "cliponly": "cliponly", "lr": f"np-lr{NONPRIVATE_LR.get(dataset, 0):g}"}[variant]
    return f"{side}-{dataset}-{kind if epsilon is None else f'eps{epsilon:g}'}-s{seed}"


def run_bpjax(dataset, seed, epsilon, runs, variant=None):
    out = runs / _name("bpjax", dataset, seed, epsilon, variant)
    cmd = bpjax_command(dataset, seed, epsilon, out, variant)
    exe = pathlib.Path(sys.executable).with_name("bpjax")
    t0 = time.perf_counter()
    proc = subprocess.run([str(exe), *cmd[1:]], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = {"side": "bpjax", "dataset": dataset, "seed": seed, "epsilon_target": epsilon, "variant": variant,
              "test_acc": summary["test_acc"], "best_epoch": summary["best_epoch"],
              "seconds_per_epoch": per_epoch([row["seconds"] for row in rows]),
              "wall_seconds": time.perf_counter() - t0, "command": " ".join(cmd)}
    if epsilon is not None or variant == "cliponly":
        result.update(noise=summary["dp"]["noise"], epsilon=summary["dp"]["epsilon"], steps=summary["dp"]["steps"])
    return result


# ----------------------------------------------------------------------------- Opacus


def _torch_model(dataset, params):
    """bpjax's model for ``dataset`` in torch, with bpjax's initial ``params`` copied in."""
    import numpy as np
    import torch
    from torch import nn

    def t(a, *perm):
        a = np.array(a, np.float32)                      # a writable copy for torch
        return nn.Parameter(torch.from_numpy(np.ascontiguousarray(a.transpose(*perm) if perm else a)))

    if RECIPES[dataset]["model"] == "cnn":               # conv 5/2, conv 3/2, conv 3/2 (25, pad 1), ReLU, dense

        class ToTorch(nn.Module):                        # (N, 40, 1) channels-last -> (N, 1, 40)
            def forward(self, x):
                return x.permute(0, 2, 1)

        class Flatten(nn.Module):                        # (N, 25, 5) -> bpjax's order (N, 5·25)
            def forward(self, x):
                return x.permute(0, 2, 1).reshape(x.shape[0], -1)

        convs = [nn.Conv1d(1, 25, 5, stride=2, padding=1), nn.Conv1d(25, 25, 3, stride=2, padding=1),
                 nn.Conv1d(25, 25, 3, stride=2, padding=1)]
        dense = nn.Linear(125, 10)
        for layer, p in zip(convs, [params[0], params[2], params[4]]):
            layer.weight, layer.bias = t(p["w"], 2, 1, 0), t(p["b"])      # (k, in, out) -> (out, in, k)
        dense.weight, dense.bias = t(params[7]["w"], 1, 0), t(params[7]["b"])
        return nn.Sequential(ToTorch(), convs[0], nn.ReLU(), convs[1], nn.ReLU(), convs[2], nn.ReLU(), Flatten(),
                             dense)
    denses = [nn.Linear(64, 100), nn.Linear(100, 100), nn.Linear(100, 10)]          # mlp: flatten, 2 × 100 ReLU
    for layer, p in zip(denses, [params[1], params[3], params[5]]):
        layer.weight, layer.bias = t(p["w"], 1, 0), t(p["b"])
    return nn.Sequential(nn.Flatten(), denses[0], nn.ReLU(), denses[1], nn.ReLU(), denses[2])


def run_opacus(dataset, seed, epsilon, runs, variant=None):
    """The same run with Opacus: same split, initial params, σ, Poisson rate, steps, clip, lr
    (``variant`` "cliponly", with ``epsilon`` None: σ = 0 and no accounting)."""
    import jax
    import numpy as np
    import opacus
    import torch
    from opacus import GradSampleModule
    from opacus.accountants import RDPAccountant
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer

    from bpjax import datasets, models
    from bpjax.privacy import dp_epsilon, dp_noise_for
    from bpjax.train.loop import split_validation

    torch.set_num_threads(1)
    r = RECIPES[dataset]
    data = datasets.load(dataset)
    x_tr, y_tr, x_val, y_val = split_validation(data, 0.1, seed)
    n, batch = x_tr.shape[0], r["batch"]
    rate, steps_per_epoch = batch / n, n // batch
    steps = r["epochs"] * steps_per_epoch
    sigma = 0.0 if epsilon is None else dp_noise_for(epsilon, rate, steps, r["delta"])   # bpjax train's σ
    k_init = jax.random.split(jax.random.PRNGKey(seed), 3)[0]           # as fit initialises
    bp_model = models.MODELS[r["model"]](data.num_classes)
    params, state, _ = bp_model.init(k_init, data.in_shape)
    torch.manual_seed(seed)
    net = _torch_model(dataset, params)
    with torch.no_grad():                                               # the copy computes bpjax's model
        y_bp = np.asarray(bp_model.forward(params, state, x_tr[:64], train=False)[0])
        y_torch = net(torch.from_numpy(np.asarray(x_tr[:64]))).numpy()
    assert np.allclose(y_bp, y_torch, atol=1e-4), np.abs(y_bp - y_torch).max()
    tensors = [torch.from_numpy(np.asarray(a)) for a in (x_tr, y_tr.astype(np.int64))]
    loader = DPDataLoader(torch.utils.data.TensorDataset(*tensors), sample_rate=rate,
                          generator=torch.Generator().manual_seed(seed))
    loader.batch_sampler.steps = steps_per_epoch                         # n // B, as bpjax (int(1/q) may round)
    model = GradSampleModule(net)
    opt = torch.optim.SGD(model.parameters(), lr=r["lr"], momentum=0.9) if r["optimizer"] == "sgd" else \
        torch.optim.Adam(model.parameters(), lr=r["lr"])
    opt = DPOptimizer(opt, noise_multiplier=sigma, max_grad_norm=r["clip"], expected_batch_size=batch,
                      generator=torch.Generator().manual_seed(10_000 + seed))
    accountant = RDPAccountant()
    lossf = torch.nn.CrossEntropyLoss()
    xv, yv = torch.from_numpy(np.asarray(x_val)), torch.from_numpy(y_val.astype(np.int64))
    best = (2.0, float("inf"), 0, None)                                  # (val error, val loss, epoch, state)
    ends, t_train = [], 0.0
    ckpt = runs / (_name("opacus", dataset, seed, epsilon, variant) + ".pt")
    for epoch in range(1, r["epochs"] + 1):
        t0 = time.perf_counter()
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            lossf(model(xb), yb).backward()
            opt.step()
            if sigma:
                accountant.step(noise_multiplier=sigma, sample_rate=rate)
        model.eval()
        with torch.no_grad():
            logits = model(xv)
            val_loss, val_err = float(lossf(logits, yv)), float((logits.argmax(1) != yv).float().mean())
        epsilon_now = accountant.get_epsilon(r["delta"]) if sigma else float("inf")    # as bpjax train, every epoch
        if val_err < best[0] or (val_err == best[0] and val_loss < best[1]):
            best = (val_err, val_loss, epoch, {k: v.detach().clone() for k, v in net.state_dict().items()})
        torch.save({"model": net.state_dict(), "optimizer": opt.original_optimizer.state_dict(), "epoch": epoch,
                    "epsilon": epsilon_now}, ckpt)                      # and checkpoints every epoch
        t_train += time.perf_counter() - t0
        ends.append(t_train)
    net.load_state_dict(best[3])
    net.eval()
    with torch.no_grad():
        xt, yt = torch.from_numpy(np.asarray(data.x_test)), torch.from_numpy(data.y_test.astype(np.int64))
        test_acc = float((net(xt).argmax(1) == yt).float().mean())
    return {"side": "opacus", "dataset": dataset, "seed": seed, "epsilon_target": epsilon, "variant": variant,
            "test_acc": test_acc, "best_epoch": best[2], "seconds_per_epoch": per_epoch(ends), "noise": sigma,
            "epsilon": dp_epsilon(sigma, rate, steps, r["delta"]), "epsilon_opacus_rdp": epsilon_now, "steps": steps,
            "torch": torch.__version__, "opacus": opacus.__version__,
            "command": f"python scripts/examples/dp_results.py --opacus-run {dataset} "
                       f"{'cliponly' if epsilon is None else f'{epsilon:g}'} {seed}"}


def time_accounting():
    """Seconds of one epoch's ε accounting, per dataset and ε: dp-accounting's RDP (what
    ``bpjax train`` calls after every epoch: the whole run so far, composed anew) and Opacus'
    RDP accountant's ``get_epsilon`` (after its ``step``s), averaged over the run's epochs."""
    import warnings

    from opacus.accountants import RDPAccountant

    from bpjax.privacy import dp_epsilon, dp_noise_for
    warnings.filterwarnings("ignore", message="Optimal order")
    n_of = {"mnist1d": 3600, "digits": 1294}                        # fit's training split
    for dataset, r in RECIPES.items():
        n, batch = n_of[dataset], r["batch"]
        rate, per = batch / n, n // batch
        for eps in EPSILONS:
            sigma = dp_noise_for(eps, rate, r["epochs"] * per, r["delta"])
            t0 = time.perf_counter()
            for e in range(1, r["epochs"] + 1):
                dp_epsilon(sigma, rate, e * per, r["delta"])
            ours = (time.perf_counter() - t0) / r["epochs"]
            acc, theirs = RDPAccountant(), 0.0
            for e in range(1, r["epochs"] + 1):
                for _ in range(per):
                    acc.step(noise_multiplier=sigma, sample_rate=rate)
                t0 = time.perf_counter()
                acc.get_epsilon(r["delta"])
                theirs += time.perf_counter() - t0
            print(f"{dataset} epsilon {eps:g} sigma {sigma:.4g}: accounting per epoch, dp-accounting RDP {ours:.4f} s, "
                  f"Opacus RDP {theirs / r['epochs']:.4f} s")


# ----------------------------------------------------------------------------- the table


def _spread(values, scale=1.0, digits=1):
    """mean ± std (sample std over the seeds) and min–max, in the unit of ``scale``."""
    v = [scale * x for x in values]
    if len(v) == 1:
        return f"{v[0]:.{digits}f} (1 seed)"
    mean, std = statistics.mean(v), statistics.stdev(v)
    return f"{mean:.{digits}f} ± {std:.{digits}f} ({min(v):.{digits}f}–{max(v):.{digits}f})"


def _ratios(dp, op):
    """bpjax's seconds per epoch over Opacus', seed by seed (each pair ran one after the other)."""
    theirs = {x["seed"]: x["seconds_per_epoch"] for x in op}
    r = [x["seconds_per_epoch"] / theirs[x["seed"]] for x in dp if x["seed"] in theirs]
    return _spread(r, digits=2) if r else "—"


def table(results):
    """The Markdown tables: test accuracy, then seconds per epoch, one row per dataset and ε
    (bpjax DP-SGD, Opacus, the non-private run of the recipe), then the other runs of the recipe."""
    acc = ["| dataset | model | ε target | δ | σ | ε spent: dp-accounting RDP; Opacus RDP | "
           "bpjax DP-SGD, test acc. % | Opacus DP-SGD, test acc. % | non-private, test acc. % | "
           "runs (bpjax, Opacus, non-private) |",
           "|" + " --- |" * 10]
    times = ["", "| dataset | ε target | bpjax DP-SGD, s/epoch | Opacus DP-SGD, s/epoch | "
             "bpjax / Opacus, seed by seed | bpjax non-private, s/epoch |", "|" + " --- |" * 6]
    for dataset, r in RECIPES.items():
        mine = [x for x in results if x["dataset"] == dataset]
        nonpriv = [x for x in mine if x["side"] == "bpjax" and x["epsilon_target"] is None and x.get("variant") is None]
        for eps in EPSILONS:
            dp = [x for x in mine if x["side"] == "bpjax" and x["epsilon_target"] == eps]
            op = [x for x in mine if x["side"] == "opacus" and x["epsilon_target"] == eps]
            if not dp and not op:
                continue
            some = (dp or op)[0]
            spent = f"{some['epsilon']:.3f}" + (f"; {op[0]['epsilon_opacus_rdp']:.3f}" if op else "")
            acc.append(" | ".join([
                f"| {dataset}", r["model"], f"{eps:g}", f"{r['delta']:g}", f"{some['noise']:.3f}", spent,
                _spread([x["test_acc"] for x in dp], 100) if dp else "—",
                _spread([x["test_acc"] for x in op], 100) if op else "—",
                _spread([x["test_acc"] for x in nonpriv], 100) if nonpriv else "—",
                f"{len(dp)}, {len(op)}, {len(nonpriv)} |"]))
            times.append(" | ".join([
                f"| {dataset}", f"{eps:g}",
                _spread([x["seconds_per_epoch"] for x in dp], digits=3) if dp else "—",
                _spread([x["seconds_per_epoch"] for x in op], digits=3) if op else "—",
                _ratios(dp, op),
                (_spread([x["seconds_per_epoch"] for x in nonpriv], digits=3) if nonpriv else "—") + " |"]))
    lines = acc + times
    others = ["", "| dataset | run (same recipe unless named) | test acc. % | s/epoch | seeds |",
              "| --- | --- | --- | --- | --- |"]
    for dataset in RECIPES:
        for side, variant, what in (("bpjax", "cliponly", "bpjax, clipped as DP-SGD, no noise (σ = 0, ε = ∞)"),
                                    ("opacus", "cliponly", "Opacus, clipped, no noise (σ = 0, no accounting)"),
                                    ("bpjax", "lr", f"bpjax, non-private at lr {NONPRIVATE_LR.get(dataset, 0):g}")):
            xs = [x for x in results if x["dataset"] == dataset and x["side"] == side and x.get("variant") == variant]
            if xs:
                others.append(f"| {dataset} | {what} | {_spread([x['test_acc'] for x in xs], 100)} | "
                              f"{_spread([x['seconds_per_epoch'] for x in xs], digits=3)} | "
                              f"{', '.join(str(x['seed']) for x in xs)} |")
    return "\n".join(lines + (others if len(others) > 3 else []))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="mnist1d,digits")
    p.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--parts", default="bpjax,nonprivate,opacus,cliponly,nonprivate-lr",
                   help="which runs: bpjax (DP-SGD), opacus, nonprivate, cliponly (σ = 0), nonprivate-lr "
                        "(non-private at NONPRIVATE_LR)")
    p.add_argument("--runs", default="runs/dp_results", help="folder of the runs and their results (JSON)")
    p.add_argument("--table-only", action="store_true", help="print the table of the results in --runs; run nothing")
    p.add_argument("--opacus-run", nargs=3, metavar=("DATASET", "EPSILON", "SEED"),
                   help="one Opacus run, its result as JSON on stdout (the grid runs each in its own process); "
                        "EPSILON 'cliponly': σ = 0")
    p.add_argument("--time-accounting", action="store_true",
                   help="time one epoch's ε accounting, dp-accounting's RDP against Opacus'; run nothing else")
    args = p.parse_args(argv)
    if args.time_accounting:
        time_accounting()
        return 0
    runs = pathlib.Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    if args.opacus_run:
        dataset, eps, seed = args.opacus_run
        cliponly = eps == "cliponly"
        print(json.dumps(run_opacus(dataset, int(seed), None if cliponly else float(eps), runs,
                                    "cliponly" if cliponly else None)))
        return 0
    if not args.table_only:
        parts = args.parts.split(",")
        for dataset in args.datasets.split(","):
            for seed in map(int, args.seeds.split(",")):
                todo = ([("nonprivate", None, None)] if "nonprivate" in parts else []) + \
                    [(side, float(e), None) for e in args.epsilons.split(",") for side in ("bpjax", "opacus")
                     if side in parts] + \
                    ([("bpjax", None, "cliponly"), ("opacus", None, "cliponly")] if "cliponly" in parts else []) + \
                    ([("bpjax", None, "lr")] if "nonprivate-lr" in parts and dataset in NONPRIVATE_LR else [])
                for side, eps, variant in todo:
                    name = _name("opacus" if side == "opacus" else "bpjax", dataset, seed, eps, variant) + ".json"
                    if (runs / name).exists():
                        continue
                    t0 = time.perf_counter()
                    if side == "opacus":
                        what = "cliponly" if eps is None else f"{eps:g}"
                        proc = subprocess.run([sys.executable, __file__, "--opacus-run", dataset, what, str(seed),
                                               "--runs", str(runs)], capture_output=True, text=True,
                                              env={**os.environ, "PYTHONPATH": str(ROOT)})
                        if proc.returncode:
                            raise RuntimeError(f"the Opacus run {dataset} {what} {seed} failed:\n"
                                               f"{proc.stderr[-3000:]}")
                        result = json.loads(proc.stdout.strip().splitlines()[-1])
                    else:
                        result = run_bpjax(dataset, seed, eps, runs, variant)
                    (runs / name).write_text(json.dumps(result, indent=1) + "\n")
                    print(f"{name}: test acc {100 * result['test_acc']:.1f}%, {result['seconds_per_epoch']:.3f} s/epoch"
                          + (f", sigma {result['noise']:.4g}, epsilon {result['epsilon']:.3f}" if eps else "")
                          + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    results = [json.loads(f.read_text()) for f in sorted(runs.glob("*.json"))]
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
