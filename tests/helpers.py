"""Shared test helpers: non-degenerate params and the comparison with tolerances per dtype."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import zlib

from bpjax.check.draw import normal  # noqa: F401  (the package's drawer, for the tests)

RTOL = {jnp.float64: 1e-10, jnp.float32: 1e-5}


def rng(name):
    """A NumPy generator seeded from a name: test data is drawn on the host, which needs no compiles."""
    return np.random.default_rng(zlib.crc32(str(name).encode()))


def init_params(layer, in_shape, gen, dtype):
    """Params and state with the structure ``layer.init`` gives, filled with random host values.

    Drawing them on the host skips compiling ``jax.random`` (slow here) and gives
    non-degenerate values: weights ~ N(0, 1/fan_in), vectors ~ N(0, 0.1²) + small offset, state
    values in [0.5, 1.5] (positive, as variances must be).
    """
    shapes = []

    def abstract_init(key):
        params, state, out_shape = layer.init(key, in_shape)
        shapes.append(out_shape)
        return params, state

    params, state = jax.eval_shape(abstract_init, jax.random.PRNGKey(0))
    out_shape = shapes[0]

    def fill_param(s):
        if not np.issubdtype(s.dtype, np.floating):
            return jnp.zeros(s.shape, s.dtype)
        if len(s.shape) >= 2:
            fan_in = int(np.prod(s.shape[:-1]))
            return jnp.asarray(gen.standard_normal(s.shape) / np.sqrt(fan_in), dtype)
        return jnp.asarray(0.05 + 0.1 * gen.standard_normal(s.shape), dtype)

    def fill_state(s):
        if not np.issubdtype(s.dtype, np.floating):
            return jnp.zeros(s.shape, s.dtype)
        return jnp.asarray(0.5 + gen.uniform(size=s.shape), dtype)

    def as_ints(shape):            # one shape, or a tuple of shapes (layers with tuple outputs)
        return tuple(as_ints(d) if isinstance(d, (tuple, list)) else int(d) for d in shape)

    out_shape = as_ints(out_shape)
    return jax.tree_util.tree_map(fill_param, params), jax.tree_util.tree_map(fill_state, state), out_shape


def assert_close(got, want, dtype, what=""):
    """Elementwise |got − want| ≤ rtol·|want| + atol, with atol = rtol · max|want| (the scale)."""
    rtol = RTOL[dtype]
    flat_got, _ = jax.tree_util.tree_flatten_with_path(got)
    flat_want = jax.tree_util.tree_leaves(want)
    assert len(flat_got) == len(flat_want), f"{what}: {len(flat_got)} leaves, expected {len(flat_want)}"
    for (path, g), w in zip(flat_got, flat_want):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = float(np.max(np.abs(w))) if w.size else 0.0
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(scale, 1e-30),
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")
