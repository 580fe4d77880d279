"""``bpjax train --health`` and ``--sanity``: a network's health while it trains, and two checks
before it does (Karpathy's makemore part 3; CS231n's sanity checks).

Health. Every epoch (or every K steps: ``--health-every K``), a separate jitted observation
pass on one fixed probe batch (the first ``batch_size`` training examples; training's own steps
are not changed, though every K steps end a chunk of them) records, per leaf layer, from the hand-written backward seen by :func:`bpjax._observe.observe`::

    act_mean, act_std     of the layer's output y
    saturated             tanh: the fraction with |y| > 0.97; relu: the fraction with y == 0
                          (dead units); other layers: absent
    dy_mean, dy_std       of the error dy arriving at the layer's output
    grad_mean, grad_std   of the layer's gradient dθ (layers with params)
    update_ratio          ‖θ_now − θ_before‖ / ‖θ_before‖ since the last record, divided by its steps
                          (layers with params, from the second record): the per-step
                          update-to-data ratio when the steps point one way, a lower bound
                          otherwise (exact with ``--health-every 1``); about 1e-3 is healthy

into ``health.json`` (the numbers, and the histograms of the last record) and ``health.png``
(activation and gradient histograms, one line per layer, and log10 of the ratio over time with
the 1e-3 reference line).

Sanity checks (:func:`sanity_checks`), one line each:

* the initial loss against its expected value: log C for C classes under cross-entropy (a
  network that starts unsure); a warning when it is more than :data:`LOSS_FACTOR` times off
  either way. Other losses: the check does not apply, which the line says.
* overfitting one small batch (:data:`OVERFIT_EXAMPLES` examples, :data:`OVERFIT_STEPS` steps of
  Adam at :data:`OVERFIT_LR`, in one jitted ``lax.scan`` on a copy of the params): a model that
  can learn gets the batch's loss below :data:`OVERFIT_TARGET` (cross-entropy) or below
  :data:`OVERFIT_TARGET` of its initial loss (other losses); a warning when it does not (a
  detached layer, a broken backward, a model that cannot fit).
"""
from __future__ import annotations

import collections
import json
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import _observe
from .._grad import value_and_grad

__all__ = [
    "LOSS_FACTOR",
    "OVERFIT_EXAMPLES",
    "OVERFIT_LR",
    "OVERFIT_STEPS",
    "OVERFIT_TARGET",
    "TANH_SATURATION",
    "HealthRecorder",
    "SanityResult",
    "plot_health",
    "sanity_checks",
]

#: |tanh(x)| above this counts as saturated (its derivative 1 − y² is then below 0.06).
TANH_SATURATION = 0.97
#: The initial loss may be this many times above or below log C before a warning.
LOSS_FACTOR = 3.0
OVERFIT_EXAMPLES, OVERFIT_STEPS, OVERFIT_LR, OVERFIT_TARGET = 16, 200, 1e-2, 0.05
#: Bins of the histograms in health.json and health.png.
BINS = 50


class _Health(_observe.Client):
    """Per leaf layer: its output (recomputed from its taped input), dy, dparams and params."""

    def tape(self, name, per_example, params, leaf):
        return leaf

    def measure(self, v):
        if not v.leaf or v.tape is None:
            return {}
        t = v.tape
        with _observe.paused():
            y = t.forward(v.params, t.state, t.x, key=t.key, train=t.train)[0]
        out = {"y": y, "dy": v.dy}
        if jax.tree_util.tree_leaves(v.params):
            out["dparams"], out["params"] = v.dparams, v.params
        return out


def _flat(tree) -> np.ndarray:
    leaves = [np.asarray(a, np.float64).ravel() for a in jax.tree_util.tree_leaves(tree)
              if hasattr(a, "dtype") and np.issubdtype(np.asarray(a).dtype, np.inexact)]
    return np.concatenate(leaves) if leaves else np.zeros(0)


def _hist(a: np.ndarray) -> dict:
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(a, bins=BINS)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


class HealthRecorder:
    """The ``epoch_hook`` of :func:`bpjax.train.fit` behind ``bpjax train --health`` (module doc).

    ``recorder(epoch, params, state)`` runs the probe and returns ``{}`` (the numbers go to
    ``health.json`` in ``out``, not the metrics rows, where they would be dozens of columns);
    ``steps_per_epoch`` turns the epoch's ratio into a per-step one.

    ``every=K`` (``--health-every K``): a record every K steps instead, from ``fit``'s
    ``step_hook=(K, recorder.at_step)``; the epoch hook then records only the state before
    training. Each record's ratio is divided by the steps since the one before (with K = 1, the
    true per-step ratio)."""

    def __init__(self, model, loss, x, y, *, out=None, steps_per_epoch: int = 1, every=None, plot: bool = True):
        run = _observe.observe(value_and_grad(model, loss), _Health())

        def probe(params, state):
            _, entries = run(params, state, x, y)
            return collections.OrderedDict((e.label, e.values) for e in _observe.flatten_entries(entries)
                                           if e.values)

        self.probe = jax.jit(probe)
        self.examples = int(jax.tree_util.tree_leaves(x)[0].shape[0])
        self.out, self.plot, self.steps = out, plot, max(int(steps_per_epoch), 1)
        self.every = None if every is None else int(every)
        self.previous: dict | None = None
        self.last_step = 0
        self.records: list = []
        self.histograms: dict = {}

    def __call__(self, epoch, params, state) -> dict:
        if self.every is None or not self.records:
            self._record(int(epoch) * self.steps, params, state)
        return {}

    def at_step(self, step, params, state) -> None:
        """A record after global step ``step`` (the ``step_hook`` of ``fit``)."""
        self._record(int(step), params, state)

    def _record(self, step, params, state) -> None:
        layers = list(jax.device_get(self.probe(params, state)).items())
        record, hist = {"epoch": -(-step // self.steps), "step": step, "layers": {}}, {}
        since = max(step - self.last_step, 1)
        for label, v in layers:
            y = _flat(v["y"])
            stats = {"act_mean": float(y.mean()), "act_std": float(y.std())}
            kind = label.rsplit("(", 1)[-1].rstrip(")")
            if kind == "tanh":
                stats["saturated"] = float(np.mean(np.abs(y) > TANH_SATURATION))
            elif kind == "relu":
                stats["saturated"] = float(np.mean(y == 0))
            dy = _flat(v["dy"])
            stats.update(dy_mean=float(dy.mean()), dy_std=float(dy.std()))
            hist[label] = {"act": _hist(y)}
            if "params" in v:
                g = _flat(v["dparams"])
                stats.update(grad_mean=float(g.mean()), grad_std=float(g.std()))
                hist[label]["grad"] = _hist(g)
                if self.previous is not None and label in self.previous:
                    old, new = self.previous[label], _flat(v["params"])
                    ratio = np.linalg.norm(new - old) / max(np.linalg.norm(old), 1e-300)
                    stats["update_ratio"] = float(ratio / since)
            else:
                hist[label]["grad"] = _hist(dy)
            record["layers"][label] = stats
        self.previous = {label: _flat(v["params"]) for label, v in layers if "params" in v}
        self.last_step = step
        self.records.append(record)
        self.histograms = hist
        if self.out is not None:
            self.write()

    def write(self) -> None:
        """health.json (and health.png unless ``plot`` is off) in ``out``, rewritten whole."""
        import pathlib
        out = pathlib.Path(self.out)
        doc = {"probe_examples": self.examples, "tanh_saturation": TANH_SATURATION, "steps_per_epoch": self.steps,
               "every_steps": self.every,
               "records": self.records, "last_histograms": self.histograms}
        (out / "health.json").write_text(json.dumps(doc, indent=1) + "\n")
        if self.plot:
            plot_health(self.records, self.histograms, out / "health.png", by="step" if self.every else "epoch")


def plot_health(records, histograms, path, *, by: str = "epoch") -> None:
    """Save a PNG of three panels: the last record's activation histograms and gradient
    histograms, one line per layer, and log10 of each layer's update-to-data ratio over the
    epochs (``by="step"``: over the steps), with the healthy 1e-3 as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    last = records[-1] if records else {"layers": {}, by: 0}
    for ax, what, title in ((axes[0], "act", "activations y"), (axes[1], "grad", "gradients dθ (dy without params)")):
        for label, h in histograms.items():
            if h[what]["counts"]:
                e = np.asarray(h[what]["edges"])
                s = last["layers"].get(label, {})
                word = "dead" if label.endswith("(relu)") else "saturated"
                extra = f", {word} {100 * s['saturated']:.0f}%" if what == "act" and "saturated" in s else ""
                ax.plot((e[1:] + e[:-1]) / 2, h[what]["counts"], label=f"{label}{extra}")
        ax.set_title(f"{title}, {by} {last[by]}")
        ax.legend(fontsize=6)
    labels = sorted({k for r in records for k, s in r["layers"].items() if "update_ratio" in s})
    for label in labels:
        pts = [(r[by], r["layers"][label]["update_ratio"]) for r in records
               if "update_ratio" in r["layers"].get(label, {}) and r["layers"][label]["update_ratio"] > 0]
        if pts:
            ep, v = zip(*pts)
            axes[2].plot(ep, np.log10(v), marker=".", label=label)
    axes[2].axhline(-3, ls="--", color="k", label="1e-3 (healthy)")
    axes[2].set_title("log10 update-to-data ratio ‖Δθ‖/‖θ‖ per step")
    axes[2].set_xlabel(by)
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class SanityResult(NamedTuple):
    """One check: its ``name``, whether it passed (``ok``; None: did not apply), the measured
    ``value`` and the one ``line`` that says so."""
    name: str
    ok: bool | None
    value: float
    line: str


def sanity_checks(model, loss, x, y, *, params, state, num_classes: int | None) -> list[SanityResult]:
    """The two checks of the module doc on the first :data:`OVERFIT_EXAMPLES` rows of ``x, y``,
    from ``params, state`` (the run's initial ones; they are not changed: the overfit trains a
    copy, with no random key drawn). ``num_classes``: C under cross-entropy, None otherwise."""
    vg = value_and_grad(model, loss)
    xb, yb = jnp.asarray(x[:OVERFIT_EXAMPLES]), jnp.asarray(y[:OVERFIT_EXAMPLES])
    (first, _), _ = jax.jit(vg)(params, state, jnp.asarray(x[:256]), jnp.asarray(y[:256]))
    first = float(first)
    out = []
    if num_classes:
        expected = math.log(num_classes)
        ratio = first / expected
        ok = 1 / LOSS_FACTOR <= ratio <= LOSS_FACTOR
        out.append(SanityResult("initial_loss", ok, first,
                                f"sanity: initial loss {first:.4g}, expected log {num_classes} = {expected:.4g} "
                                f"(ratio {ratio:.2f}): " + ("ok" if ok else
                                f"WARNING: more than {LOSS_FACTOR:g}x off; check the init scale of the last layer")))
    else:
        out.append(SanityResult("initial_loss", None, first,
                                f"sanity: initial loss {first:.4g}; the expected-value check applies to "
                                "cross-entropy over classes only, not this loss"))
    opt = optax.adam(OVERFIT_LR)

    @jax.jit
    def overfit(params, state):
        (start, _), _ = vg(params, state, xb, yb)

        def step(carry, _):
            p, s, o = carry
            (value, s), g = vg(p, s, xb, yb)
            u, o = opt.update(g, o, p)
            return (optax.apply_updates(p, u), s, o), value

        (p, s, _), _ = jax.lax.scan(step, (params, state, opt.init(params)), None, length=OVERFIT_STEPS)
        (end, _), _ = vg(p, s, xb, yb)
        return start, end

    start, end = (float(v) for v in overfit(jax.tree_util.tree_map(jnp.array, params), state))
    target = OVERFIT_TARGET if num_classes else OVERFIT_TARGET * start
    ok = bool(np.isfinite(end) and end < target)
    out.append(SanityResult("overfit", ok, end,
                            f"sanity: overfit {xb.shape[0]} examples with {OVERFIT_STEPS} steps of Adam lr "
                            f"{OVERFIT_LR:g}: loss {start:.4g} -> {end:.4g} (target < {target:.3g}): " +
                            ("ok" if ok else "WARNING: it did not fit; a layer may send no gradient "
                             "(a broken backward) or the model cannot learn")))
    return out
