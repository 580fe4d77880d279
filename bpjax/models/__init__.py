"""Ready-made models for the datasets in :mod:`bpjax.datasets`, by name.

Each entry of :data:`MODELS` is ``make(num_classes) -> Layer``; inputs are channels-last
(MNIST-1D is ``(N, 40, 1)``, digits ``(N, 8, 8, 1)``). The MNIST-1D models follow the paper
(Greydanus & Kobak, "Scaling down deep learning"): a logistic regression, an MLP with two hidden
layers of 100, and a three-layer CNN with 25 channels; ``resnet1d`` is our residual 1-D CNN.

Hugging Face GPT-2 folders load into, and save from, :func:`bpjax.gpt` with
:func:`gpt2_from_pretrained` and :func:`save_gpt2_pretrained` (:mod:`bpjax.models.gpt2`).

:func:`generate` (and :func:`cached_logits`, :func:`filter_logits`) samples from a
:func:`bpjax.gpt`'s params with a key/value cache: :mod:`bpjax.models.generate`.
"""
from __future__ import annotations

from collections.abc import Callable

from .._core import Layer
from ..layers import basic as B
from ..layers.combinators import residual, sequential
from ..layers.conv import conv
from ..layers.norm import batch_norm
from ..layers.pool import global_avg_pool, max_pool
from ..layers.recurrent import gru as _gru
from ..layers.structure import flatten
from .gpt2 import gpt2_from_pretrained, gpt2_tokenizer, save_gpt2_pretrained  # noqa: F401  Hugging Face GPT-2 folders
from .generate import cached_logits, filter_logits, generate  # noqa: F401  (sampling from a bp.gpt)


def logreg(num_classes: int = 10) -> Layer:
    """Logistic regression: flatten, one dense layer (softmax is in the loss)."""
    return sequential(flatten(), B.dense(num_classes))


def mlp(num_classes: int = 10, hidden: int = 100, depth: int = 2) -> Layer:
    """MLP: ``depth`` ReLU layers of ``hidden`` units."""
    layers = [flatten()]
    for _ in range(depth):
        layers += [B.dense(hidden, w_init="he_normal"), B.relu()]
    return sequential(*layers, B.dense(num_classes))


def cnn(num_classes: int = 10, channels: int = 25) -> Layer:
    """The paper's 1-D CNN: conv 5 (stride 2) → conv 3 (stride 2) → conv 3 (stride 2), ReLU
    after each, padding 1, then flatten and dense. On MNIST-1D the lengths are 40 → 19 → 10 → 5."""
    return sequential(
        conv(channels, 5, strides=2, padding=1), B.relu(),
        conv(channels, 3, strides=2, padding=1), B.relu(),
        conv(channels, 3, strides=2, padding=1), B.relu(),
        flatten(), B.dense(num_classes))


def resnet1d(num_classes: int = 10, channels: int = 64, blocks: int = 3) -> Layer:
    """A residual 1-D CNN: a stem conv, ``blocks`` stages of a residual block
    (conv-BN-ReLU-conv-BN, skip) followed by a stride-2 max pool, then global average pooling."""

    def block():
        return residual(sequential(
            conv(channels, 3, use_bias=False), batch_norm(), B.relu(),
            conv(channels, 3, use_bias=False), batch_norm()))

    layers = [conv(channels, 5, use_bias=False), batch_norm(), B.relu()]
    for _ in range(blocks):
        layers += [block(), B.relu(), max_pool(2, strides=2)]
    return sequential(*layers, global_avg_pool(), B.dense(num_classes))


def gru(num_classes: int = 10, hidden: int = 64) -> Layer:
    """A GRU over the sequence (each of the 40 positions is one step with 1 feature), its last
    hidden state into a dense layer."""
    return sequential(_gru(hidden, return_sequences=False), B.dense(num_classes))


def digits_cnn(num_classes: int = 10, channels: int = 32) -> Layer:
    """A small 2-D CNN for 8×8 digits: conv-BN-ReLU-pool twice, then dense."""
    return sequential(
        conv(channels, 3), batch_norm(), B.relu(), max_pool(2, strides=2),
        conv(2 * channels, 3), batch_norm(), B.relu(), max_pool(2, strides=2),
        flatten(), B.dense(num_classes))


def textbook_mlp(num_classes: int = 2) -> Layer:
    """The textbook sigmoid network for XOR and the regression task: 2 hidden layers of 16."""
    return sequential(B.dense(16), B.sigmoid(), B.dense(16), B.sigmoid(), B.dense(num_classes))


MODELS: dict[str, Callable[..., Layer]] = {
    "logreg": logreg, "mlp": mlp, "cnn": cnn, "gru": gru, "resnet1d": resnet1d, "digits_cnn": digits_cnn,
    "textbook_mlp": textbook_mlp,
}


def output_shape(name: str, in_shape, num_classes: int):
    """The output shape of one example under model ``name``, or ``None`` when the model cannot
    take inputs of ``in_shape`` (found by tracing its ``init``: nothing is computed)."""
    import jax

    shapes = []
    try:
        jax.eval_shape(lambda key: shapes.append(MODELS[name](num_classes).init(key, tuple(in_shape))[2]),
                       jax.random.PRNGKey(0))
    except (ValueError, TypeError, IndexError):
        return None
    return tuple(shapes[0])


def fitting(in_shape, num_classes: int):
    """The names of the models whose output for inputs of ``in_shape`` is one score per class."""
    return [name for name in sorted(MODELS) if output_shape(name, in_shape, num_classes) == (num_classes,)]
