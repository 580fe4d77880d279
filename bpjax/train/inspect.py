"""``bpjax train --inspect``: the gradient noise scale, each layer's signal-to-noise ratio and the
curvature, every epoch, from the per-example statistics of the hand-written backward.

On a fixed probe batch of B examples (the first of the training set), with g_n the gradient of
example n's loss alone and ḡ = (1/B) Σ_n g_n, from ``bp.backward_quantities(model, loss,
["variance", "diag_ggn_mc"])`` (variance_i = (1/B) Σ_n g_ni² − ḡ_i²)::

    tr Σ      = B/(B − 1) · Σ_i variance_i          the per-example gradient covariance's trace
                                                    (unbiased)
    ‖G‖²      = ‖ḡ‖² − tr Σ / B                     the true gradient's squared norm (unbiased:
                                                    E ‖ḡ‖² = ‖G‖² + tr Σ / B)
    B_simple  = tr Σ / ‖G‖²                          the simple noise scale (McCandlish et al.
                                                    2018, "An Empirical Model of Large-Batch
                                                    Training"): the batch size at which the
                                                    gradient's noise and its signal are equal
    snr_l     = ‖G_l‖² / tr Σ_l                      per layer with params: 1/B_simple of that
                                                    layer's params alone
    tr GGN    = Σ_i diag_ggn_mc_i                    the trace of the GGN of the batch loss
                                                    (one sampled cotangent per example), total
                                                    and per layer

A noise-dominated estimate (‖G‖² ≤ 0: the signal is below what B examples resolve) is recorded
as ``inf`` for B_simple and 0 for the SNR. The forward runs in evaluation mode (``train=False``):
``batch_norm`` then does not mix the examples (in training it does, and per-example gradients do
not exist), and dropout is off. Batches well below B_simple are noise-dominated, so a larger
batch would buy a near-linear speed-up in steps; batches well above it add compute for little
(McCandlish et al.).
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..curvature import backward_quantities

__all__ = ["Inspector", "noise_scale", "plot_inspect"]

#: The ``fold_in`` constant of the key the probe's sampled cotangents are drawn from.
INSPECT_STREAM = 0x696E7370


def noise_scale(variance_sum, mean_sq, b: int):
    """``(tr Σ, ‖G‖², B_simple)`` from Σ_i variance_i, ‖ḡ‖² and the batch size B (module doc),
    as Python floats; B_simple is ``inf`` where ‖G‖² ≤ 0."""
    trace = float(variance_sum) * b / max(b - 1, 1)
    signal = float(mean_sq) - trace / b
    return trace, signal, (trace / signal if signal > 0 else math.inf)


class Inspector:
    """The ``epoch_hook`` of :func:`bpjax.train.fit` behind ``bpjax train --inspect``.

    ``inspector(epoch, params, state)`` runs the probe (module doc) and returns the epoch's
    metrics, flat: ``inspect/b_simple``, ``inspect/trace_cov``, ``inspect/grad_sq``,
    ``inspect/ggn_trace``, and per layer with params ``inspect/<layer>/snr`` and
    ``inspect/<layer>/ggn_trace``; it redraws ``plot_path`` (with the run's ``batch_size`` drawn
    beside B_simple). :meth:`summary` is the closing sentence.
    """

    def __init__(self, model, loss, x, y, *, batch_size: int, plot_path=None, seed: int = 0):
        f = backward_quantities(model, loss, ["variance", "sum_grad_squared", "diag_ggn_mc"], train=False)
        self.b = b = int(jax.tree_util.tree_leaves(x)[0].shape[0])

        def probe(params, state, key):
            _, grads, per_layer = f(params, state, x, y, key=key)
            total = lambda tree: sum(jnp.sum(a) for a in jax.tree_util.tree_leaves(tree))  # noqa: E731
            layers = {label: {"variance": total(q["variance"]), "ggn": total(q["diag_ggn_mc"]),
                              # ‖ḡ_l‖² = Σ_i ((1/B) Σ_n g_ni² − variance_i)
                              "grad_sq": total(q["sum_grad_squared"]) / b - total(q["variance"])}
                      for label, q in per_layer.items()}
            return layers, total(jax.tree_util.tree_map(jnp.square, grads))          # and ‖ḡ‖²

        self.probe = jax.jit(probe)
        self.key = jax.random.fold_in(jax.random.PRNGKey(seed), INSPECT_STREAM)
        self.batch_size, self.plot_path = int(batch_size), plot_path
        self.rows: list = []

    def __call__(self, epoch, params, state) -> dict:
        layers, sq = jax.device_get(self.probe(params, state, jax.random.fold_in(self.key, epoch)))
        var = sum(float(v["variance"]) for v in layers.values())
        trace, signal, b_simple = noise_scale(var, sq, self.b)
        row = {"inspect/b_simple": b_simple, "inspect/trace_cov": trace, "inspect/grad_sq": signal,
               "inspect/ggn_trace": sum(float(v["ggn"]) for v in layers.values())}
        for label, v in layers.items():
            t_l, s_l, _ = noise_scale(v["variance"], v["grad_sq"], self.b)
            row[f"inspect/{label}/snr"] = max(s_l, 0.0) / t_l if t_l > 0 else 0.0
            row[f"inspect/{label}/ggn_trace"] = float(v["ggn"])
        self.rows.append({"epoch": epoch, **row})
        if self.plot_path:
            plot_inspect(self.rows, self.plot_path, batch_size=self.batch_size, summary=self.summary())
        return row

    def summary(self) -> str:
        """What the last epoch's noise scale says of the batch size, in one sentence."""
        if not self.rows:
            return "inspect: no epoch was inspected"
        b = self.rows[-1]["inspect/b_simple"]
        if not math.isfinite(b):
            return (f"inspect: at epoch {self.rows[-1]['epoch']} the gradient's noise hides its signal on the probe "
                    f"of {self.b} examples (B_simple not resolved); a larger --batch-size than {self.batch_size} "
                    "would average more of it away")
        ratio = self.batch_size / b
        verdict = ("noise-dominated: a larger batch would cut the steps nearly in proportion" if ratio < 0.5 else
                   "past the noise scale: a smaller batch would reach the same loss with less compute" if ratio > 2 else
                   "near the noise scale: a good trade of steps against compute")
        return (f"inspect: B_simple ≈ {b:.0f} at epoch {self.rows[-1]['epoch']} (probe of {self.b}); the batch size "
                f"{self.batch_size} is {verdict}")


def plot_inspect(rows, path, *, batch_size: Optional[int] = None, summary: str = "") -> None:
    """Save a PNG of three panels over the epochs, log scale: B_simple (with the run's batch size
    as a dashed line), each layer's SNR, and the GGN's trace (total and per layer)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    b = np.asarray([r["inspect/b_simple"] for r in rows], float)
    axes[0].plot(epochs, np.where(np.isfinite(b), b, np.nan), marker="o", label="B_simple = tr Σ / ‖G‖²")
    if batch_size:
        axes[0].axhline(batch_size, ls="--", color="gray", label=f"batch size {batch_size}")
    axes[0].set_title("gradient noise scale")
    labels = sorted({k[len("inspect/"):-len("/snr")] for r in rows for k in r if k.endswith("/snr")})
    for label in labels:
        snr = np.asarray([r.get(f"inspect/{label}/snr", np.nan) for r in rows], float)
        axes[1].plot(epochs, np.where(snr > 0, snr, np.nan), marker=".", label=label)
        ggn = np.asarray([r.get(f"inspect/{label}/ggn_trace", np.nan) for r in rows], float)
        axes[2].plot(epochs, np.where(ggn > 0, ggn, np.nan), marker=".", label=label)
    total = np.asarray([r["inspect/ggn_trace"] for r in rows], float)
    axes[2].plot(epochs, np.where(total > 0, total, np.nan), color="black", lw=2, label="total")
    axes[1].set_title("per-layer SNR ‖G_l‖² / tr Σ_l")
    axes[2].set_title("trace of the GGN (MC)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=6, loc="best")
    fig.suptitle(summary or "bpjax train --inspect", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=100)
    plt.close(fig)
