"""Cases of normalisation, dropout, embedding, reshaping and fan-out/join."""
import bpjax as bp

from ..draw import normal
from .base import LayerCase


def _tuple_x(gen, shape, dtype):
    """Inputs of a join: ``shape`` is (batch, shape_1, shape_2, ...), one per-example shape per input."""
    batch, *shapes = shape
    return tuple(normal(gen, (batch, *s), dtype) for s in shapes)


def _inception_in_residual():
    branches = bp.parallel(bp.dense(3), bp.sequential(bp.dense(2), bp.tanh()), bp.identity())
    return bp.residual(bp.sequential(bp.dense(4), branches, bp.concat(), bp.dense(5)))


def _resnet_projection():
    branch = bp.sequential(bp.dense(4, use_bias=False), bp.batch_norm(), bp.relu(), bp.dense(4))
    return bp.sequential(bp.parallel(branch, bp.dense(4)), bp.add(), bp.relu())


CASES = (
    LayerCase("batch_norm", bp.batch_norm, (4,), batch=5, default=True, crosscheck=False),
    LayerCase("batch_norm", bp.batch_norm, (3, 2, 4), id="train-4d"),
    LayerCase("batch_norm", lambda: bp.batch_norm(0.8), (5,), batch=6, train=False, id="eval"),
    LayerCase("layer_norm", bp.layer_norm, (5,), batch=3, default=True, crosscheck=False),
    LayerCase("layer_norm", bp.layer_norm, (3, 6), x_scale=2.0),
    LayerCase("rms_norm", bp.rms_norm, (5,), batch=3, default=True, crosscheck=False),
    LayerCase("rms_norm", bp.rms_norm, (2, 6), x_scale=2.0),
    LayerCase("group_norm", lambda: bp.group_norm(2), (3, 4), batch=3, default=True, crosscheck=False),
    LayerCase("group_norm", lambda: bp.group_norm(3), (2, 3, 6)),
    LayerCase("dropout", lambda: bp.dropout(0.3), (5,), batch=3, needs_key=True, default=True, crosscheck=False),
    LayerCase("dropout", lambda: bp.dropout(0.3), (3, 5), needs_key=True),
    LayerCase("dropout", lambda: bp.dropout(0.3), (3, 5), train=False, id="eval"),
    LayerCase("embedding", lambda: bp.embedding(6, 3), (4,), batch=3, int_input=6, default=True, crosscheck=False),
    LayerCase("embedding", lambda: bp.embedding(7, 3), (5,), int_input=7),
    LayerCase("flatten", bp.flatten, (2, 3), batch=3, default=True, crosscheck=False),
    LayerCase("flatten", bp.flatten, (2, 3, 2)),
    LayerCase("reshape", lambda: bp.reshape((3, 2)), (6,), batch=3, default=True, crosscheck=False),
    LayerCase("reshape", lambda: bp.reshape((3, -1)), (2, 3, 2)),
    LayerCase("parallel", lambda: bp.sequential(bp.parallel(bp.dense(2), bp.tanh()), bp.concat()), (3,), batch=3,
              default=True, crosscheck=False),
    LayerCase("parallel", _inception_in_residual, (5,), id="inception-in-residual"),
    LayerCase("concat", bp.concat, ((3,), (2,)), batch=3, default=True, crosscheck=False),
    LayerCase("concat", bp.concat, ((3,), (2,)), draw_x=_tuple_x),
    LayerCase("concat", lambda: bp.concat(axis=1), ((2, 3), (1, 3)), draw_x=_tuple_x, id="axis1"),
    LayerCase("add", bp.add, ((3,), (3,)), batch=3, default=True, crosscheck=False),
    LayerCase("add", bp.add, ((4,), (4,), (4,)), draw_x=_tuple_x),
    LayerCase("add", _resnet_projection, (3,), batch=5, id="resnet-projection"),
)
