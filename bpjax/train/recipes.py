"""How each model trains by default: the model a dataset gets, and the options each model takes
unless the command line says otherwise (``bpjax train`` fills what is left unset from here)."""
from __future__ import annotations

from typing import Any, Dict

#: The model ``bpjax train --dataset D`` trains when no ``--model`` is given.
DEFAULT_MODEL = {"mnist1d": "resnet1d", "digits": "digits_cnn", "xor": "textbook_mlp", "regression": "textbook_mlp"}


#: How ``bpjax train`` trains each model unless an option says otherwise ("*": every other model).
#: The paper's MNIST-1D models keep the paper's Adam at 1e-2 and batch 100 (here with a cosine
#: decay and early stopping); ``resnet1d`` takes AdamW with weight decay over 30 epochs, which
#: passes the human expert's 96% in about a minute or less on a 2-core CPU (README); the textbook's
#: sigmoid network needs small batches and a larger step to leave the plateau of XOR.
RECIPES: Dict[str, Dict[str, Any]] = {
    "*": dict(epochs=40, batch_size=100, optimizer="adam", lr=1e-2, schedule="cosine", weight_decay=0.0,
              patience=10),
    "resnet1d": dict(epochs=30, batch_size=100, optimizer="adamw", lr=3e-3, schedule="cosine",
                     weight_decay=1e-4, patience=0),
    "textbook_mlp": dict(epochs=100, batch_size=16, optimizer="adam", lr=3e-2, schedule="cosine",
                         weight_decay=0.0, patience=20),
}

#: What ``bpjax train --optimizer kfac`` takes in place of the model's recipe, unless an option
#: says otherwise: K-FAC's step size (``bpjax.curvature.kfac``: fixed lr, momentum 0.9, a norm
#: constraint), the rest of the recipe (epochs, batch, schedule, patience) kept.
KFAC_RECIPE: Dict[str, Any] = dict(lr=3e-2, weight_decay=0.0)
