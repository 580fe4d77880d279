"""Cases of the losses: targets of every kind each loss takes."""
import bpjax as bp

from ..draw import binary, labels, normal, probabilities
from .base import LossCase

CASES = (
    LossCase("squared_error", bp.squared_error, (3,), normal, default=True, crosscheck=False),
    LossCase("squared_error", bp.squared_error, (3,), normal, batch=6),
    LossCase("squared_error", bp.squared_error, (2, 3), normal, batch=5, id="3d"),
    LossCase("mean_squared_error", bp.mean_squared_error, (3,), normal, default=True, crosscheck=False),
    LossCase("mean_squared_error", bp.mean_squared_error, (3,), normal, batch=6),
    LossCase("huber", lambda: bp.huber(0.5), (3,), normal, default=True, crosscheck=False),
    LossCase("huber", lambda: bp.huber(0.8), (4,), normal, batch=6, pred_scale=2.0),
    LossCase("softmax_cross_entropy", bp.softmax_cross_entropy, (4,), labels, default=True, crosscheck=False),
    LossCase("softmax_cross_entropy", bp.softmax_cross_entropy, (5,), labels, batch=6, id="labels"),
    LossCase("softmax_cross_entropy", bp.softmax_cross_entropy, (5,), probabilities, batch=6, id="probs"),
    LossCase("softmax_cross_entropy", lambda: bp.softmax_cross_entropy(0.1), (4, 5), labels, batch=3,
             id="smooth-seq"),
    LossCase("softmax_cross_entropy", lambda: bp.softmax_cross_entropy(0.2), (5,), probabilities, batch=6,
             id="smooth-probs"),
    LossCase("sigmoid_binary_cross_entropy", bp.sigmoid_binary_cross_entropy, (3,), binary, default=True,
             crosscheck=False),
    LossCase("sigmoid_binary_cross_entropy", bp.sigmoid_binary_cross_entropy, (3,), binary, batch=8,
             pred_scale=3.0),
)
