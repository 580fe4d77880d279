"""The one table of cases that drives the gradient cross-check (tests/test_crosscheck.py).

Every layer and loss that ``bpjax`` exports appears here at least once (``export`` names it);
``test_every_export_is_in_the_table`` fails otherwise. A case builds the layer or loss, says
what one example looks like, and how to draw inputs and targets.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import bpjax as bp
from table_base import LayerCase, LossCase


# Target makers take a NumPy generator (test data is drawn on the host: no compiles).


def _normal(gen, shape, dtype):
    return jnp.asarray(gen.standard_normal(shape), dtype)


def _labels(gen, shape, dtype):
    return jnp.asarray(gen.integers(0, shape[-1], shape[:-1]))


def _probabilities(gen, shape, dtype):
    z = 2 * gen.standard_normal(shape)
    e = np.exp(z - z.max(-1, keepdims=True))
    return jnp.asarray(e / e.sum(-1, keepdims=True), dtype)


def _binary(gen, shape, dtype):
    """Targets in [0, 1], including exact 0s and 1s."""
    u = gen.uniform(size=shape)
    return jnp.asarray(np.where(u < 0.25, 0.0, np.where(u > 0.75, 1.0, u)), dtype)


LAYER_CASES = [
    # dW = xᵀ dy both ways (bpjax.kernels.matmul_tn): directly when D_out ≥ D_in or the product is
    # small, as (dyᵀ x)ᵀ for a narrow output from N·D_in·D_out = 2¹⁹ multiply-adds (narrow-large)
    LayerCase("dense", lambda: bp.dense(7), (5,)),
    LayerCase("dense", lambda: bp.dense(4), (1024,), batch=128, id="narrow-large"),
    # the forward pads W to 16 columns on CPU for D_out mod 16 in 9..15 (bpjax.kernels.matmul)
    LayerCase("dense", lambda: bp.dense(10), (6, 5), id="width10-padded"),
    LayerCase("dense", lambda: bp.dense(3, use_bias=False), (6, 5), id="nobias-3d"),
    LayerCase("dense", lambda: bp.dense(1, w_init="he_normal"), (4,), batch=1, id="batch1-width1"),
    LayerCase("identity", bp.identity, (3, 5)),
    LayerCase("relu", bp.relu, (6,)),
    LayerCase("leaky_relu", lambda: bp.leaky_relu(0.2), (6,)),
    LayerCase("elu", lambda: bp.elu(0.7), (6,), x_scale=2.0),
    LayerCase("sigmoid", bp.sigmoid, (6,), x_scale=3.0),
    LayerCase("tanh", bp.tanh, (6,), x_scale=2.0),
    LayerCase("softplus", bp.softplus, (6,), x_scale=3.0),
    LayerCase("gelu", lambda: bp.gelu(approximate=False), (6,), x_scale=2.0, id="exact"),
    LayerCase("gelu", lambda: bp.gelu(approximate=True), (6,), x_scale=2.0, id="tanh"),
    LayerCase("silu", bp.silu, (6,), x_scale=2.0),
    LayerCase("softmax", bp.softmax, (3, 7), x_scale=2.0),
    LayerCase("log_softmax", bp.log_softmax, (7,), x_scale=2.0),
    LayerCase("sequential", lambda: bp.sequential(bp.dense(8), bp.tanh(), bp.dense(3), bp.softmax()), (5,)),
    LayerCase("sequential", lambda: bp.sequential(bp.sequential(bp.dense(4), bp.relu()), bp.dense(2)),
              (3,), id="nested"),
    LayerCase("residual", lambda: bp.residual(bp.sequential(bp.dense(5), bp.gelu(), bp.dense(5))), (5,)),
]

LOSS_CASES = [
    LossCase("squared_error", bp.squared_error, (6, 3), _normal),
    LossCase("squared_error", bp.squared_error, (5, 2, 3), _normal, id="3d"),
    LossCase("mean_squared_error", bp.mean_squared_error, (6, 3), _normal),
    LossCase("huber", lambda: bp.huber(0.8), (6, 4), _normal, pred_scale=2.0),
    LossCase("softmax_cross_entropy", bp.softmax_cross_entropy, (6, 5), _labels, id="labels"),
    LossCase("softmax_cross_entropy", bp.softmax_cross_entropy, (6, 5), _probabilities, id="probs"),
    LossCase("softmax_cross_entropy", lambda: bp.softmax_cross_entropy(0.1), (3, 4, 5), _labels,
             id="smooth-seq"),
    LossCase("softmax_cross_entropy", lambda: bp.softmax_cross_entropy(0.2), (6, 5), _probabilities,
             id="smooth-probs"),
    LossCase("sigmoid_binary_cross_entropy", bp.sigmoid_binary_cross_entropy, (8, 3), _binary,
             pred_scale=3.0),
]

# Cases of the image and signal layers (issue 3) live beside their own helpers; they are part
# of this one table.
from table_conv import CONV_CASES  # noqa: E402
from table_norm import NORM_CASES  # noqa: E402
from table_seq import SEQ_CASES  # noqa: E402

LAYER_CASES = LAYER_CASES + CONV_CASES + NORM_CASES + SEQ_CASES
