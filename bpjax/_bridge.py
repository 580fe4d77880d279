"""The bridge to ordinary JAX: a layer as a function ``jax.grad`` differentiates with our backward."""
from __future__ import annotations

import inspect
import warnings

import jax

from ._core import Layer

__all__ = ["as_jax_fn"]


def as_jax_fn(layer: Layer, *, train: bool = True, with_state: bool = False):
    """Return ``fn(params, state, x, *, key=None)``, the layer's forward, whose derivative is ``layer.backward``.

    The arguments come in the order of every other bpjax function (``layer.forward(params, state,
    x, key=key)``); pass ``()`` as the state of a stateless layer. ``fn`` returns ``y`` (or
    ``(y, new_state)`` with ``with_state=True``). It is a ``jax.custom_vjp`` function: ``jax.grad``,
    ``jax.vjp`` and ``jax.test_util.check_grads(..., modes=["rev"])`` use the hand-written
    backward, so manual layers mix with ordinary JAX code. ``state`` and ``key`` get zero
    cotangents, and ``new_state`` (running statistics) is not differentiated: its cotangent is
    ignored, as if behind ``lax.stop_gradient``.

    The order of bpjax 0.1, ``fn(params, x, state=(), key=None)``, still works, with a
    ``DeprecationWarning``; it goes in the next release.
    """

    @jax.custom_vjp
    def apply(params, x, state, key):
        y, new_state, _ = layer.forward(params, state, x, key=key, train=train)
        return y, new_state

    def apply_fwd(params, x, state, key):
        y, new_state, res = layer.forward(params, state, x, key=key, train=train)
        return (y, new_state), (params, res, state)

    def apply_bwd(saved, cotangents):
        params, res, state = saved
        dy, _ = cotangents
        dparams, dx = layer.backward(params, res, dy)
        dstate = jax.tree_util.tree_map(lambda s: jax.numpy.zeros_like(s), state)
        return dparams, dx, dstate, None

    apply.defvjp(apply_fwd, apply_bwd)

    def fn(params, *args, **kwargs):
        state, x, key = _arguments(layer.name, args, kwargs)
        y, new_state = apply(params, x, state, key)
        return (y, new_state) if with_state else y

    fn.__name__ = fn.__qualname__ = f"{layer.name}_as_jax_fn"
    fn.__signature__ = _SIGNATURE          # what help() and check_vjp's leaf names (dx) read
    fn.__doc__ = (f"``{layer.name}``'s forward, ``fn(params, state, x, *, key=None) -> "
                  f"{'(y, new_state)' if with_state else 'y'}``, differentiated by its hand-written backward "
                  f"(``bpjax.as_jax_fn``).")
    return fn


_P = inspect.Parameter
_SIGNATURE = inspect.Signature([_P("params", _P.POSITIONAL_OR_KEYWORD), _P("state", _P.POSITIONAL_OR_KEYWORD),
                                _P("x", _P.POSITIONAL_OR_KEYWORD), _P("key", _P.KEYWORD_ONLY, default=None)])


def _is_array(a) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype")


def _arguments(name: str, args: tuple, kwargs: dict) -> tuple:
    """``(state, x, key)`` from the arguments after ``params``: ``(state, x)`` and ``key=``; or, with
    a ``DeprecationWarning``, bpjax 0.1's ``(x, state=(), key=None)``, told apart by ``state=``
    given as a keyword, by one argument or three, or by an array followed by a tree that is not one."""
    unknown = set(kwargs) - {"state", "key"}
    if unknown:
        raise TypeError(f"as_jax_fn({name}): expected fn(params, state, x, *, key=None), "
                        f"got the keyword {sorted(unknown)[0]!r}")
    old = ("state" in kwargs or len(args) in (1, 3)
           or len(args) == 2 and _is_array(args[0]) and not _is_array(args[1]))
    if not old:
        if len(args) != 2:
            raise TypeError(f"as_jax_fn({name}): expected fn(params, state, x, *, key=None), "
                            f"got {1 + len(args)} positional arguments")
        return args[0], args[1], kwargs.get("key")
    warnings.warn(f"as_jax_fn({name}): fn(params, x, state=(), key=None) is deprecated and goes in the next "
                  f"release; call fn(params, state, x, key=key), the order of layer.forward",
                  DeprecationWarning, stacklevel=3)
    x, rest = args[0], args[1:]
    state = rest[0] if rest else kwargs.get("state", ())
    key = rest[1] if len(rest) > 1 else kwargs.get("key")
    return state, x, key
