"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (see
tests/test_distributed.py), so the rest of the suite keeps one device. Exits non-zero on failure."""
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bpjax as bp  # noqa: E402
from bpjax import datasets, distributed as dist, models, train  # noqa: E402

assert jax.device_count() == 4, jax.devices()
rng = np.random.default_rng(0)


def net():
    # no bias before batch_norm: its gradient is zero up to rounding, and Adam would amplify that noise
    return bp.sequential(bp.dense(16, use_bias=False), bp.batch_norm(), bp.relu(), bp.dense(8), bp.tanh(),
                         bp.dense(3))


def problem(dtype, batch=32):
    model, loss = net(), bp.softmax_cross_entropy()
    params, state, _ = model.init(jax.random.PRNGKey(0), (5,))
    cast = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), t)  # noqa: E731
    x = jnp.asarray(rng.standard_normal((batch, 5)), dtype)
    y = jnp.asarray(rng.integers(0, 3, batch))
    return model, loss, cast(params), cast(state), x, y


def rel_err(a, b, floor=1e-300):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), floor))


def tree_rel_errs(got, want):
    """Per-leaf relative errors; a leaf that is zero up to rounding (the gradient of a bias just
    before batch_norm, ~1e-17 against ~1) is measured against the largest leaf of its tree."""
    leaves = [np.asarray(b, np.float64) for b in jax.tree_util.tree_leaves(want)]
    scale = max(float(np.max(np.abs(b))) for b in leaves if b.size)
    return [rel_err(a, b, scale if np.max(np.abs(b)) < 1e-3 * scale else 1e-300)
            for a, b in zip(jax.tree_util.tree_leaves(got), leaves)]


def check_gradients(dtype, tol, fsdp):
    model, loss, params, state, x, y = problem(dtype)
    vg = jax.jit(bp.value_and_grad(model, loss))
    (v1, s1), g1 = vg(params, state, x, y)                          # one device, whole batch
    mesh = dist.make_mesh(4)
    p4, _ = dist.place(mesh, params, fsdp=fsdp)
    st4, _ = dist.place(mesh, state)
    x4, y4 = dist.shard_batch(mesh, x, y)
    (v4, s4), g4 = vg(p4, st4, x4, y4)                              # 4 devices, batch split 4 ways
    assert len(x4.sharding.device_set) == 4 and x4.addressable_shards[0].data.shape[0] == 8
    errs = tree_rel_errs((v4, s4), (v1, s1)) + tree_rel_errs(g4, g1)
    assert max(errs) <= tol, (dtype, fsdp, errs)
    print(f"gradients {jnp.dtype(dtype).name} fsdp={fsdp}: max relative error {max(errs):.2e} <= {tol:g}")


def check_ten_steps(dtype, tol, fsdp):
    model, loss, params, state, x, y = problem(dtype)
    opt = optax.adam(1e-2)
    vg = bp.value_and_grad(model, loss)

    def step(params, state, opt_state, x, y):
        (_, state), grads = vg(params, state, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state

    step = jax.jit(step)
    p1, s1, o1 = params, state, opt.init(params)
    mesh = dist.make_mesh(4)
    p4, _ = dist.place(mesh, params, fsdp=fsdp)
    s4, _ = dist.place(mesh, state)
    o4, _ = dist.place(mesh, opt.init(params), fsdp=fsdp)
    for i in range(10):
        xb = jnp.asarray(rng.standard_normal((32, 5)), dtype)
        yb = jnp.asarray(rng.integers(0, 3, 32))
        p1, s1, o1 = step(p1, s1, o1, xb, yb)
        p4, s4, o4 = step(p4, s4, o4, *dist.shard_batch(mesh, xb, yb))
    errs = tree_rel_errs(p4, p1) + tree_rel_errs(s4, s1)
    assert max(errs) <= tol, (dtype, fsdp, errs)
    print(f"ten adam steps {jnp.dtype(dtype).name} fsdp={fsdp} (batch_norm running stats included): "
          f"max relative error {max(errs):.2e} <= {tol:g}")


def check_indivisible_batch():
    mesh = dist.make_mesh(4)
    try:
        dist.shard_batch(mesh, np.zeros((30, 5)))
    except ValueError as e:
        assert "expected the batch size to be divisible by the 4 devices of the mesh, got 30" in str(e), e
        print("indivisible batch:", e)
    else:
        raise AssertionError("no error for a batch of 30 on 4 devices")
    try:
        train.fit(models.textbook_mlp(2), bp.softmax_cross_entropy(), datasets.xor(), epochs=1,
                  batch_size=30, progress=False, mesh=mesh, log=lambda s: None)
    except ValueError as e:
        assert "got 30" in str(e)
    else:
        raise AssertionError("fit accepted a batch of 30 on 4 devices")


FIT = dict(optimizer=optax.adam(5e-2), epochs=12, batch_size=32, progress=False, patience=None,
           log=lambda s: None)


def check_fit_on_a_mesh(fsdp, one):
    data, kw = datasets.xor(), FIT
    four = train.fit(models.textbook_mlp(2), bp.softmax_cross_entropy(), data, mesh=dist.make_mesh(4),
                     fsdp=fsdp, **kw)
    errs = tree_rel_errs(four.params, one.params)
    assert max(errs) < 1e-4 and four.test["acc"] == one.test["acc"], (errs, one.test, four.test)
    print(f"fit on 4 devices fsdp={fsdp}: test acc {four.test['acc']:.3f} (one device {one.test['acc']:.3f}), "
          f"params within {max(errs):.1e}")


if __name__ == "__main__":
    for fsdp in (False, True):
        check_gradients(jnp.float64, 1e-12, fsdp)
        check_gradients(jnp.float32, 1e-6, fsdp)
        check_ten_steps(jnp.float64, 1e-12, fsdp)
        check_ten_steps(jnp.float32, 1e-5, fsdp)
    check_indivisible_batch()
    one = train.fit(models.textbook_mlp(2), bp.softmax_cross_entropy(), datasets.xor(), **FIT)
    check_fit_on_a_mesh(False, one)
    check_fit_on_a_mesh(True, one)
    print("DISTRIBUTED OK")
    sys.exit(0)
