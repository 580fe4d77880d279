"""Cases of dense, the activations, sequential and residual."""
import bpjax as bp

from .base import LayerCase

CASES = (
    LayerCase("dense", lambda: bp.dense(4), (3,), batch=3, default=True, crosscheck=False),
    # dW = xᵀ dy both ways (bpjax.kernels.matmul_tn): directly when D_out ≥ D_in or the product is
    # small, as (dyᵀ x)ᵀ for a narrow output from N·D_in·D_out = 2¹⁹ multiply-adds (narrow-large)
    LayerCase("dense", lambda: bp.dense(7), (5,)),
    LayerCase("dense", lambda: bp.dense(4), (1024,), batch=128, id="narrow-large"),
    # the forward pads W to 16 columns on CPU for D_out mod 16 in 9..15 (bpjax.kernels.matmul)
    LayerCase("dense", lambda: bp.dense(10), (6, 5), id="width10-padded"),
    LayerCase("dense", lambda: bp.dense(3, use_bias=False), (6, 5), id="nobias-3d"),
    LayerCase("dense", lambda: bp.dense(1, w_init="he_normal"), (4,), batch=1, id="batch1-width1"),
    LayerCase("identity", bp.identity, (4,), batch=3, default=True, crosscheck=False),
    LayerCase("identity", bp.identity, (3, 5)),
    LayerCase("relu", bp.relu, (5,), batch=3, default=True, crosscheck=False),
    LayerCase("relu", bp.relu, (6,)),
    LayerCase("leaky_relu", lambda: bp.leaky_relu(0.2), (5,), batch=3, default=True, crosscheck=False),
    LayerCase("leaky_relu", lambda: bp.leaky_relu(0.2), (6,)),
    LayerCase("elu", bp.elu, (5,), batch=3, default=True, crosscheck=False),
    LayerCase("elu", lambda: bp.elu(0.7), (6,), x_scale=2.0),
    LayerCase("sigmoid", bp.sigmoid, (5,), batch=3, default=True, crosscheck=False),
    LayerCase("sigmoid", bp.sigmoid, (6,), x_scale=3.0),
    LayerCase("tanh", bp.tanh, (5,), batch=3, default=True, crosscheck=False),
    LayerCase("tanh", bp.tanh, (6,), x_scale=2.0),
    LayerCase("softplus", bp.softplus, (5,), batch=3, default=True, crosscheck=False),
    LayerCase("softplus", bp.softplus, (6,), x_scale=3.0),
    LayerCase("gelu", bp.gelu, (5,), batch=3, default=True, crosscheck=False),
    LayerCase("gelu", lambda: bp.gelu(approximate=False), (6,), x_scale=2.0, id="exact"),
    LayerCase("gelu", lambda: bp.gelu(approximate=True), (6,), x_scale=2.0, id="tanh"),
    LayerCase("silu", bp.silu, (5,), batch=3, default=True, crosscheck=False),
    LayerCase("silu", bp.silu, (6,), x_scale=2.0),
    LayerCase("softmax", bp.softmax, (5,), batch=3, default=True, crosscheck=False),
    LayerCase("softmax", bp.softmax, (3, 7), x_scale=2.0),
    LayerCase("log_softmax", bp.log_softmax, (5,), batch=3, default=True, crosscheck=False),
    LayerCase("log_softmax", bp.log_softmax, (7,), x_scale=2.0),
    LayerCase("sequential", lambda: bp.sequential(bp.dense(4), bp.tanh(), bp.dense(2)), (3,), batch=3,
              default=True, crosscheck=False),
    LayerCase("sequential", lambda: bp.sequential(bp.dense(8), bp.tanh(), bp.dense(3), bp.softmax()), (5,)),
    LayerCase("sequential", lambda: bp.sequential(bp.sequential(bp.dense(4), bp.relu()), bp.dense(2)),
              (3,), id="nested"),
    LayerCase("residual", lambda: bp.residual(bp.sequential(bp.dense(3), bp.gelu())), (3,), batch=3,
              default=True, crosscheck=False),
    LayerCase("residual", lambda: bp.residual(bp.sequential(bp.dense(5), bp.gelu(), bp.dense(5))), (5,)),
)
