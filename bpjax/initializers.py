"""Weight-initialisation schemes by name, taken from ``jax.nn.initializers``.

Every scheme has the signature ``init(key, shape, dtype) -> array``. For a weight of shape
``(*receptive_field, fan_in_channels, fan_out_channels)`` the fan-in is
``prod(receptive_field) * fan_in_channels`` (dense weights are ``(D_in, D_out)``).

=================  ===================================================
name               distribution
=================  ===================================================
``glorot_uniform`` U(-a, a), a = sqrt(6 / (fan_in + fan_out))  (Xavier)
``glorot_normal``  truncated N with variance 2 / (fan_in + fan_out)
``he_uniform``     U(-a, a), a = sqrt(6 / fan_in)                (Kaiming)
``he_normal``      truncated N with variance 2 / fan_in
``lecun_uniform``  U(-a, a), a = sqrt(3 / fan_in)
``lecun_normal``   truncated N with variance 1 / fan_in
``zeros``, ``ones``
=================  ===================================================
"""
from __future__ import annotations

from typing import Callable, Union

import jax.nn.initializers as jinit

Initializer = Callable

SCHEMES = {
    "glorot_uniform": jinit.glorot_uniform(),
    "glorot_normal": jinit.glorot_normal(),
    "he_uniform": jinit.he_uniform(),
    "he_normal": jinit.he_normal(),
    "lecun_uniform": jinit.lecun_uniform(),
    "lecun_normal": jinit.lecun_normal(),
    "zeros": jinit.zeros,
    "ones": jinit.ones,
}


def get(scheme: Union[str, Initializer], layer: str = "initializer") -> Initializer:
    """The initializer named ``scheme``, or ``scheme`` itself if it is already a callable."""
    if callable(scheme):
        return scheme
    try:
        return SCHEMES[scheme]
    except (KeyError, TypeError):
        raise ValueError(
            f"{layer}: expected an initializer, one of {sorted(SCHEMES)} or a callable "
            f"(key, shape, dtype) -> array, got {scheme!r}"
        ) from None
