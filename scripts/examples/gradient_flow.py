"""The vanishing gradient, and its cure, seen in the error signal that backpropagation carries.

Two networks of the same depth (``--depth`` hidden layers of ``--width``, default 10 of 64) are
trained on the same data with the same optimizer:

* a plain sigmoid MLP: every layer multiplies the error by σ'(z) ≤ 1/4 on its way down, so
  the error reaching the first layers is orders of magnitude smaller than at the top;
* the same depth with ReLU, residual connections and layer_norm: each block is
  x + relu(dense(layer_norm(x))), so the error reaches every layer through the skip paths.

Every step's gradient comes from ``bp.gradient_flow``, which also returns, per layer, the norm
of the error ‖dy‖ arriving at its output and of its gradient ‖dθ‖. The figure shows them
against depth (the first epoch and the last), and both training losses.

    python scripts/examples/gradient_flow.py                 # MNIST-1D when cached, writes docs/gradient_flow.png
    python scripts/examples/gradient_flow.py --synthetic     # a synthetic 10-class problem instead

The data: MNIST-1D from ``bpjax.datasets`` when it is already in the cache (generating it takes
~10 s and needs the mnist1d package); otherwise, or with ``--synthetic``, 4000 examples of 40
features from 10 random Gaussian class centres.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
import bpjax as bp  # noqa: E402


def sigmoid_mlp(depth: int, width: int, classes: int) -> bp.Layer:
    layers = [bp.flatten()]
    for _ in range(depth):
        layers += [bp.dense(width), bp.sigmoid()]
    return bp.sequential(*layers, bp.dense(classes))


def residual_net(depth: int, width: int, classes: int) -> bp.Layer:
    """An input layer, then depth − 1 blocks x + relu(dense(layer_norm(x))): depth hidden layers,
    and a layer_norm before the output layer (as in a pre-norm transformer)."""
    layers = [bp.flatten(), bp.dense(width, w_init="he_normal"), bp.relu()]
    for _ in range(depth - 1):
        layers.append(bp.residual(bp.sequential(bp.layer_norm(), bp.dense(width, w_init="he_normal"), bp.relu())))
    return bp.sequential(*layers, bp.layer_norm(), bp.dense(classes))


def load_data(synthetic: bool):
    from bpjax import datasets
    if not synthetic:
        try:
            cached = list(datasets.cache_dir().glob("mnist1d-*.npz"))
            if cached:
                d = datasets.mnist1d()
                return "MNIST-1D", d.x_train, d.y_train, d.num_classes
        except Exception:               # no cache, or no mnist1d package: the synthetic default
            pass
    gen = np.random.default_rng(0)
    centres = gen.standard_normal((10, 40))
    y = gen.integers(0, 10, 4000)
    x = centres[y] + 1.5 * gen.standard_normal((4000, 40))
    return "synthetic (10 Gaussian classes, 40 features)", x.astype(np.float32), y, 10


def dense_labels(flow):
    """The labels of the dense layers, input first."""
    return [k for k in flow if k.endswith("(dense)")]


def train(model, x, y, *, epochs, batch, lr, seed=0):
    """SGD with momentum; returns per-epoch mean loss and the per-layer flow of the first and
    last epochs (mean over the epoch's steps)."""
    params, state, _ = model.init(jax.random.PRNGKey(seed), x.shape[1:])
    opt = optax.sgd(lr, momentum=0.9)
    opt_state = opt.init(params)
    flow_fn = bp.gradient_flow(model, bp.softmax_cross_entropy())

    @jax.jit
    def step(params, state, opt_state, xb, yb):
        (value, state), grads, flow = flow_fn(params, state, xb, yb)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, value, flow

    losses, flows = [], []
    steps = x.shape[0] // batch
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(x.shape[0])
        ep_loss, ep_flow = [], []
        for i in range(steps):
            idx = order[i * batch:(i + 1) * batch]
            params, state, opt_state, value, flow = step(params, state, opt_state, x[idx], y[idx])
            ep_loss.append(value)
            ep_flow.append(flow)
        losses.append(float(np.mean(jax.device_get(ep_loss))))
        flows.append(jax.tree_util.tree_map(lambda *a: float(np.mean(a)), *jax.device_get(ep_flow)))
    return losses, flows


def draw(results, data_name, path, depth):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colours = {"sigmoid MLP": "tab:red", "ReLU + residual + layer_norm": "tab:blue"}
    for name, (losses, flows) in results.items():
        c = colours[name]
        for flow, style, when in ((flows[0], "--", "epoch 1"), (flows[-1], "-", f"epoch {len(flows)}")):
            labels = dense_labels(flow)
            depth_axis = np.arange(1, len(labels) + 1)
            axes[0].plot(depth_axis, [flow[k]["dy"] for k in labels], style, color=c, marker=".",
                         label=f"{name}, {when}")
            axes[1].plot(depth_axis, [flow[k]["dparams"] / flow[k]["params"] for k in labels], style, color=c,
                         marker=".")
        axes[2].plot(np.arange(1, len(losses) + 1), losses, color=c, marker=".", label=name)
    axes[0].set_title("‖dy‖: the error arriving at each dense layer")
    axes[1].set_title("‖dθ‖ / ‖θ‖ of each dense layer")
    for ax in axes[:2]:
        ax.set_yscale("log")
        ax.set_xlabel(f"dense layer (1 = input side, {depth + 1} = output)")
    axes[2].set_title(f"training loss ({data_name})")
    axes[2].set_xlabel("epoch")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=10, help="hidden layers (>= 8 shows the effect well)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--synthetic", action="store_true", help="the synthetic data even when MNIST-1D is cached")
    p.add_argument("--out", default="docs/gradient_flow.png")
    args = p.parse_args(argv)
    if args.depth < 1 or args.width < 1 or args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        print("gradient_flow.py: expected --depth, --width, --epochs, --batch-size >= 1 and --lr > 0",
              file=sys.stderr)
        return 2
    data_name, x, y, classes = load_data(args.synthetic)
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y)
    results = {}
    t0 = time.perf_counter()
    for name, make in (("sigmoid MLP", sigmoid_mlp), ("ReLU + residual + layer_norm", residual_net)):
        results[name] = train(make(args.depth, args.width, classes), x, y, epochs=args.epochs,
                              batch=args.batch_size, lr=args.lr)
        losses, flows = results[name]
        labels = dense_labels(flows[0])
        first, last = flows[0][labels[0]]["dy"], flows[0][labels[-1]]["dy"]
        print(f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; epoch 1 ‖dy‖ at the first dense layer "
              f"{first:.2e}, at the last {last:.2e} (ratio {first / last:.1e})")
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    draw(results, data_name, args.out, args.depth)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
