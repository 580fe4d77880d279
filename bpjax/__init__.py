"""bpjax: backpropagation written by hand, on JAX.

Every layer is a :class:`Layer` of three pure functions, ``init``, ``forward`` and a
hand-written ``backward``; every loss is a :class:`Loss` with a hand-written derivative.
:func:`value_and_grad` runs the classic algorithm with them; :func:`reference_value_and_grad`
runs JAX autodiff (value_and_grad) on the same forward, to check against.
"""
from . import initializers
from .layers.basic import *  # noqa: F401,F403
from .layers.basic import __all__ as _basic_all
from .layers.conv import *  # noqa: F401,F403
from .layers.conv import __all__ as _conv_all
from .layers.pool import *  # noqa: F401,F403
from .layers.pool import __all__ as _pool_all
from .layers.norm import *  # noqa: F401,F403
from .layers.norm import __all__ as _norm_all
from .layers.structure import *  # noqa: F401,F403
from .layers.structure import __all__ as _structure_all
from .layers.recurrent import *  # noqa: F401,F403
from .layers.recurrent import __all__ as _recurrent_all
from .layers.attention import *  # noqa: F401,F403
from .layers.attention import __all__ as _attention_all
from ._bridge import as_jax_fn
from .check.vjp import assert_vjp_close, check_vjp
from .layers.combinators import *  # noqa: F401,F403
from .layers.combinators import __all__ as _comb_all
from ._core import Layer, Loss, make_layer, make_loss
from .check.finite import check_finite, debug_nans
from .check.intermediates import IntermediateTable, compare_intermediates, identity_tap
from .explain import Explanation, explain
from ._grad import cast_floating, value_and_grad
from ._observe import gradient_flow
from ._per_example import clipped_grad, per_example_grad_norms
from .curvature import Kronecker, backward_quantities, ggn_vector_product
from .check.layer import (GradientReport, assert_gradients_close, check_layer, check_loss, check_model, per_example_grads)
from .layers.losses import *  # noqa: F401,F403
from .layers.losses import __all__ as _loss_all
from ._reference import reference_value_and_grad
from .train.runs import load_run  # a trained model from a `bpjax train` run folder

__version__ = "0.1.0"

#: Factories of layers, each in the gradient cross-check table.
LAYERS = (tuple(_basic_all) + tuple(_comb_all) + tuple(_conv_all) + tuple(_pool_all)
          + tuple(_norm_all) + tuple(_structure_all) + tuple(_recurrent_all) + tuple(_attention_all))
#: Factories of losses, each in the gradient cross-check table.
LOSSES = tuple(_loss_all)

__all__ = [
    *LAYERS, *LOSSES,
    "Layer", "Loss", "make_layer", "make_loss",
    "value_and_grad", "reference_value_and_grad", "as_jax_fn", "initializers", "cast_floating",
    "check_layer", "check_model", "check_loss", "assert_gradients_close", "GradientReport",
    "per_example_grads", "check_finite", "debug_nans", "load_run",
    "gradient_flow", "per_example_grad_norms", "clipped_grad", "check_vjp", "assert_vjp_close",
    "compare_intermediates", "IntermediateTable", "identity_tap",
    "explain", "Explanation",
    "backward_quantities", "ggn_vector_product", "Kronecker",
]
