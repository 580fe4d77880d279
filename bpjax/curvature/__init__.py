"""Curvature and gradient statistics from the hand-written backward (BackPACK's quantities).

``backward_quantities`` (``quantities.py``) is the entry point; the loss Hessian's factors are in
``loss_hessian.py``, each layer's per-example split in ``per_layer.py``, its Kronecker factors
in ``kronecker.py``, the matrix-free GGN-vector product in ``ggn_bridge.py``, and the K-FAC
optimizer fed with the factors in ``kfac_optimizer.py``.
"""
from .ggn_bridge import ggn_vector_product
from .kfac_optimizer import KFAC, KfacState, kfac, kfac_factors
from .kronecker import Kronecker
from .quantities import QUANTITIES, backward_quantities

__all__ = ["backward_quantities", "ggn_vector_product", "Kronecker", "QUANTITIES", "kfac", "kfac_factors", "KFAC",
           "KfacState"]
