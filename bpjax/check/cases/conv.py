"""Cases of convolution and pooling.

Shapes are tiny: what matters is that every padding kind, stride, dilation and groups option
meets every formulation. conv has two (``impl``): lax's convolutions, with the kernel gradient
as a ``lax`` convolution for 1 spatial axis (the ``1d-*`` cases) and shifted views times dy for
2 and 3 (``groups > 1`` and the ``*-lax`` cases); and columns (im2col), which 'auto' picks on
CPU for 2 and 3 spatial axes with groups = 1 and no input dilation (the other ``2d-*`` and
``3d`` conv cases, and the ``*-columns`` cases), except that in float32 a stride-1 2-D conv with
at least 16 channels in and out keeps lax's forward and dx, routed to Eigen (the ``*-eigen``
cases). Pooling inputs are continuous random draws, so no window
holds a tie (jax.grad may route ties differently; tests/test_conv.py checks the tie rule).
"""
import bpjax as bp

from .base import LayerCase

CASES = (
    LayerCase("conv", lambda: bp.conv(3, (2, 2)), (4, 4, 2), batch=2, default=True, crosscheck=False),
    # conv, 1 spatial axis: dW as a lax convolution
    LayerCase("conv", lambda: bp.conv(4, 3), (9, 3), id="1d-same"),
    LayerCase("conv", lambda: bp.conv(3, (3,), strides=2, padding="VALID", dilation=2), (11, 2),
              id="1d-valid-stride2-dilation2"),
    LayerCase("conv", lambda: bp.conv(4, 3, padding=2, groups=2, strides=2), (8, 4),
              id="1d-int-groups2-stride2"),
    LayerCase("conv", lambda: bp.conv(2, (2,), padding=((3, 1),), use_bias=False), (5, 2),
              id="1d-pairs-beyond-kernel-nobias"),                # dx pads by k' - 1 - lo < 0
    # conv, 2 and 3 spatial axes: dW as shifted views times dy
    LayerCase("conv", lambda: bp.conv(4, (3, 3), strides=2), (6, 5, 2), batch=2, id="2d-same-stride2"),
    LayerCase("conv", lambda: bp.conv(3, (3, 2), strides=(2, 1), padding="VALID", dilation=(1, 2)), (7, 6, 2),
              batch=2, id="2d-valid-stride21-dilation12"),
    LayerCase("conv", lambda: bp.conv(6, 3, padding=1, groups=3, use_bias=False), (5, 4, 3), batch=2,
              id="2d-int-groups3-nobias"),
    LayerCase("conv", lambda: bp.conv(3, (2, 3), strides=(1, 2), padding=((1, 0), (2, 1))), (5, 4, 2),
              batch=2, id="2d-pairs-stride12"),
    LayerCase("conv", lambda: bp.conv(2, (2, 2, 2), strides=(1, 2, 1)), (3, 4, 3, 2), batch=2, id="3d"),
    # the two formulations forced: lax's convolutions with the shifted-view dW, and columns
    # (im2col) where 'auto' would not choose them (1 spatial axis, input dilation)
    LayerCase("conv", lambda: bp.conv(4, (3, 3), strides=2, impl="lax"), (6, 5, 2), batch=2,
              id="2d-same-stride2-lax"),
    LayerCase("conv", lambda: bp.conv(3, (2, 2, 3), padding=((1, 0), (0, 1), (2, 2)), dilation=(1, 2, 1),
                                      impl="lax"), (3, 5, 4, 2), batch=2, id="3d-pairs-dilation-lax"),
    LayerCase("conv", lambda: bp.conv(3, 3, strides=2, dilation=2, impl="columns"), (11, 2),
              id="1d-stride2-dilation2-columns"),
    LayerCase("conv", lambda: bp.conv(4, (3, 3), padding=((1, 2), (0, 1)), impl="columns"), (5, 4, 3),
              batch=3, id="2d-pairs-columns-batch3"),
    # the ReLU applied inside the layer (activation='relu'): by columns, per chunk, and by lax
    LayerCase("conv", lambda: bp.conv(4, (3, 3), padding="SAME", activation="relu", impl="columns"),
              (5, 4, 3), batch=3, id="2d-relu-columns"),
    LayerCase("conv", lambda: bp.conv(3, (3, 2), strides=2, activation="relu", use_bias=False, impl="lax"),
              (6, 5, 2), batch=2, id="2d-relu-nobias-lax"),
    LayerCase("conv", lambda: bp.conv(4, 3, strides=2, padding=1, activation="relu"), (9, 3),
              id="1d-relu"),
    # 'auto' on CPU in float32 for a stride-1 2-D conv with ≥ 16 channels in and out: the
    # forward and dx as lax convolutions with an extra output row (routed to Eigen, see
    # bpjax/kernels/cpu_conv.py), dW by columns from the whole dz; in float64, columns
    LayerCase("conv", lambda: bp.conv(16, 3, activation="relu"), (5, 4, 16), batch=2, id="2d-relu-eigen"),
    LayerCase("conv", lambda: bp.conv(17, (3, 2), padding="VALID", use_bias=False), (6, 5, 16), batch=2,
              id="2d-valid-nobias-eigen"),                  # dx's output is larger already
    LayerCase("conv", lambda: bp.conv(16, 3, padding=((2, 0), (1, 1)), impl="routed"), (4, 5, 16), batch=2,
              id="2d-pairs-routed-eigen"),                  # routed on every platform, dW by views
    # conv_transpose (padding is that of the conv it transposes)
    LayerCase("conv_transpose", lambda: bp.conv_transpose(2, (2, 2), strides=2), (3, 3, 2), batch=2,
              default=True, crosscheck=False),
    LayerCase("conv_transpose", lambda: bp.conv_transpose(3, 3, strides=2), (5, 2), id="1d-same-stride2"),
    LayerCase("conv_transpose", lambda: bp.conv_transpose(4, 4, strides=3, padding=1, dilation=2, groups=2),
              (4, 4), id="1d-int-stride3-dilation2-groups2"),
    LayerCase("conv_transpose", lambda: bp.conv_transpose(2, (2, 3), strides=(2, 1), padding="VALID"),
              (3, 4, 2), batch=2, id="2d-valid-stride21"),
    LayerCase("conv_transpose", lambda: bp.conv_transpose(4, (3, 2), strides=(2, 3), padding=((1, 0), (2, 1)),
                                                          dilation=(2, 1), groups=2, use_bias=False),
              (4, 3, 2), batch=2, id="2d-pairs-groups2-dilation-nobias"),
    LayerCase("conv_transpose", lambda: bp.conv_transpose(3, (3, 2), strides=(2, 3), padding=((4, 0), (1, 3)),
                                                          dilation=(2, 1), impl="columns"),
              (4, 3, 2), batch=2, id="2d-pairs-crop-columns"),              # P_lo = k' - 1 - lo < 0
    LayerCase("conv_transpose", lambda: bp.conv_transpose(3, (2, 2), strides=2, activation="relu"),
              (3, 4, 2), batch=2, id="2d-relu-stride2"),
    LayerCase("conv_transpose", lambda: bp.conv_transpose(16, 3, activation="relu"), (4, 4, 16), batch=2,
              id="2d-relu-stride1-eigen"),
    # max_pool: padded cells are -inf
    LayerCase("max_pool", lambda: bp.max_pool(2), (4, 4, 2), batch=2, default=True, crosscheck=False),
    LayerCase("max_pool", lambda: bp.max_pool(2), (6, 4, 3), id="2d-2x2"),
    LayerCase("max_pool", lambda: bp.max_pool((3, 2), strides=(2, 1), padding="SAME"), (7, 5, 2),
              id="2d-same-overlapping"),
    LayerCase("max_pool", lambda: bp.max_pool(3, strides=1, padding=1), (7, 3), id="1d-int-stride1"),
    LayerCase("max_pool", lambda: bp.max_pool((2, 3), strides=2, padding=((1, 0), (0, 2))), (5, 6, 2),
              id="2d-pairs"),
    # avg_pool: padded cells count as zeros
    LayerCase("avg_pool", lambda: bp.avg_pool(2), (4, 4, 2), batch=2, default=True, crosscheck=False),
    LayerCase("avg_pool", lambda: bp.avg_pool(2), (6, 4, 3), id="2d-2x2"),
    LayerCase("avg_pool", lambda: bp.avg_pool((3, 2), strides=(2, 1), padding="SAME"), (7, 5, 2),
              id="2d-same-overlapping"),
    LayerCase("avg_pool", lambda: bp.avg_pool(3, strides=1, padding=1), (7, 3), id="1d-int-stride1"),
    LayerCase("avg_pool", lambda: bp.avg_pool((2, 3), strides=2, padding=((1, 0), (0, 2))), (5, 6, 2),
              id="2d-pairs"),
    # global pools
    LayerCase("global_avg_pool", bp.global_avg_pool, (3, 3, 2), batch=2, default=True, crosscheck=False),
    LayerCase("global_avg_pool", bp.global_avg_pool, (4, 5, 3), id="2d"),
    LayerCase("global_avg_pool", bp.global_avg_pool, (6, 3), id="1d"),
    LayerCase("global_max_pool", bp.global_max_pool, (3, 3, 2), batch=2, default=True, crosscheck=False),
    LayerCase("global_max_pool", bp.global_max_pool, (4, 5, 3), id="2d"),
    LayerCase("global_max_pool", bp.global_max_pool, (6, 3), id="1d"),
)
