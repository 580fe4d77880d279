"""The textbook example: a small sigmoid network trained by gradient descent on squared error.

The classic algorithm, once per epoch, on the whole data set:
  1. the input batch x propagates forward through the hidden layers to the output y;
  2. the loss E = (1/n) Σ ½‖y − y'‖² compares y with the expected output y';
  3. its derivative dE/dy = (y − y')/n is the error at the output;
  4. that error propagates backwards, layer by layer, giving every weight's gradient;
  5. the weights step against their gradient, until the error stops falling.

Two tasks: XOR (2-4-1) and a small regression, y = sin(x) on [−π, π] (1-16-1, linear output).
Only the public API of bpjax is used, with optax for the update. Run:

    python scripts/examples/seed_example.py                       # both tasks
    python scripts/examples/seed_example.py --task xor --lr 2 --patience 50 --tol 1e-6
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import bpjax as bp


def xor_task():
    x = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    y = jnp.array([[0.0], [1.0], [1.0], [0.0]])
    net = bp.sequential(bp.dense(4), bp.sigmoid(), bp.dense(1), bp.sigmoid())
    return net, x, y


def regression_task():
    x = jnp.linspace(-jnp.pi, jnp.pi, 64)[:, None]
    y = jnp.sin(x)
    net = bp.sequential(bp.dense(16), bp.sigmoid(), bp.dense(1))
    return net, x, y


TASKS = {"xor": xor_task, "regression": regression_task}


def train(task, *, lr, momentum, tol, patience, max_epochs, seed, print_every):
    net, x, y = TASKS[task]()
    loss = bp.squared_error()
    params, state, _ = net.init(jax.random.PRNGKey(seed), x.shape[1:])
    opt = optax.sgd(lr, momentum=momentum)
    opt_state = opt.init(params)
    grad_fn = bp.value_and_grad(net, loss)            # forward, error at the output, backward: by hand

    @jax.jit
    def epoch(params, opt_state):
        (error, _), grads = grad_fn(params, state, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, error

    print(f"== {task}: {x.shape[0]} examples, sigmoid network, squared error, "
          f"SGD lr={lr} momentum={momentum}")
    best, since_best, t0 = float("inf"), 0, time.perf_counter()
    for n in range(1, max_epochs + 1):
        params, opt_state, error = epoch(params, opt_state)
        error = float(error)
        if print_every and (n % print_every == 0 or n == 1):
            print(f"epoch {n:5d}  error {error:.6f}")
        if error < best - tol:                       # still falling
            best, since_best = error, 0
        else:
            since_best += 1
            if since_best >= patience:
                print(f"stopped at epoch {n}: the error fell by less than {tol:g} in {patience} epochs")
                break
    else:
        print(f"stopped at epoch {max_epochs} (max epochs)")

    y_hat, _, _ = net.forward(params, state, x, train=False)
    final, _ = loss.forward(y_hat, y)
    print(f"final error {float(final):.6f}  ({time.perf_counter() - t0:.1f} s)")
    shown = range(x.shape[0]) if x.shape[0] <= 8 else range(0, x.shape[0], x.shape[0] // 8)
    print("   input      target   prediction")
    for i in shown:
        inputs = " ".join(f"{v:5.2f}" for v in x[i])
        print(f"  {inputs:>10}  {float(y[i, 0]):7.3f}  {float(y_hat[i, 0]):9.3f}")
    return float(final)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=[*TASKS, "both"], default="both")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 2.0 xor, 0.5 regression)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--tol", type=float, default=1e-6, help="least fall of the error that counts as falling")
    p.add_argument("--patience", type=int, default=50, help="epochs without a fall before stopping")
    p.add_argument("--max-epochs", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--print-every", type=int, default=1, help="print the error every N epochs (0: never)")
    args = p.parse_args(argv)
    tasks = list(TASKS) if args.task == "both" else [args.task]
    default_lr = {"xor": 2.0, "regression": 0.5}
    for task in tasks:
        train(task, lr=args.lr or default_lr[task], momentum=args.momentum, tol=args.tol,
              patience=args.patience, max_epochs=args.max_epochs, seed=args.seed,
              print_every=args.print_every)


if __name__ == "__main__":
    main()
