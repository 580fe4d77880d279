"""A corpus of hand-written VJPs, half correct and half with a planted bug, in JAX and PyTorch.

Each case is written once, as ``fwd(o, *leaves) -> (y, residuals)`` and ``bwd(o, residuals,
*dys) -> dleaves`` over a small array namespace ``o`` (:data:`JAX` or :data:`TORCH`), and built
into a ``jax.custom_vjp`` function (:func:`jax_fn`, arguments named and grouped as the case
says, pytrees included) and its twin ``torch.autograd.Function`` (:func:`torch_fn`, one tensor
per leaf, in JAX's leaf order) — so both carry exactly the same rule, and the same bug.

``CASES[name].wrong`` names the inputs whose gradient is wrong, as :func:`bpjax.check_vjp`
names them (``"dw"``, ``"dp['a']"``); ``wrong_leaves`` are their positions among the leaves
(torch's input numbers). Correct cases have neither. Inputs are fixed arrays (the same point
for every checker); two correct cases sit exactly at a kink on purpose (a ``max`` at a tie, a
relu at the zeros a previous relu made). Four cases are hard for a checker in other ways: a
logit near 0 and 1 (a large step leaves its domain), an rms norm computed in float32 inside
whatever its inputs (as a kernel is), a kernel that refuses float64 (its inputs are float32:
``Case.dtype``), and a determinant whose rule uses ``|g|`` for ``g`` (right for any positive
cotangent).

torch is optional: only :func:`torch_fn` needs it.
"""
from __future__ import annotations

import inspect
import zlib
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def _ALTERNATE(shape):
    return np.fromfunction(lambda i, j: (-1.0) ** (i + j), shape)         # [[1, −1], [−1, 1]]


class _Jax:
    """The few array operations the cases use, in JAX."""

    sum = staticmethod(lambda a, axis=None, keepdims=False: jnp.sum(a, axis=axis, keepdims=keepdims))
    mean = staticmethod(lambda a, axis, keepdims=False: jnp.mean(a, axis=axis, keepdims=keepdims))
    cumsum = staticmethod(lambda a: jnp.cumsum(a, axis=-1))
    flip = staticmethod(lambda a: jnp.flip(a, axis=-1))
    exp, log, tanh = staticmethod(jnp.exp), staticmethod(jnp.log), staticmethod(jnp.tanh)
    sqrt, abs, sign = staticmethod(jnp.sqrt), staticmethod(jnp.abs), staticmethod(jnp.sign)
    where = staticmethod(jnp.where)
    sigmoid = staticmethod(jax.nn.sigmoid)
    softplus = staticmethod(lambda a: jnp.logaddexp(a, 0.0))
    step = staticmethod(lambda a: (a > 0).astype(a.dtype))                       # 1 where a > 0
    max_last = staticmethod(lambda a: jnp.max(a, axis=-1))
    first_argmax = staticmethod(lambda a: jax.nn.one_hot(jnp.argmax(a, axis=-1), a.shape[-1], dtype=a.dtype))
    sin, cos = staticmethod(jnp.sin), staticmethod(jnp.cos)
    rot180 = staticmethod(lambda a: jnp.flip(a, axis=(0, 1)))
    alternate = staticmethod(lambda a: jnp.asarray(_ALTERNATE(a.shape), a.dtype))
    f32 = staticmethod(lambda a: a.astype(jnp.float32))
    like = staticmethod(lambda a, ref: a.astype(ref.dtype))
    is_f64 = staticmethod(lambda a: a.dtype == jnp.float64)


class _Torch:
    """The same operations in PyTorch (imported on first use)."""

    def __getattr__(self, name):
        import torch

        ops = {
            "sum": lambda a, axis=None, keepdims=False: a.sum() if axis is None else a.sum(dim=axis, keepdim=keepdims),
            "mean": lambda a, axis, keepdims=False: a.mean(dim=axis, keepdim=keepdims),
            "cumsum": lambda a: torch.cumsum(a, dim=-1),
            "flip": lambda a: torch.flip(a, dims=(-1,)),
            "exp": torch.exp, "log": torch.log, "tanh": torch.tanh, "sqrt": torch.sqrt, "abs": torch.abs,
            "sign": torch.sign, "where": torch.where, "sigmoid": torch.sigmoid,
            "softplus": lambda a: torch.logaddexp(a, torch.zeros_like(a)),
            "step": lambda a: (a > 0).to(a.dtype),
            "max_last": lambda a: a.max(dim=-1).values,
            "first_argmax": lambda a: torch.nn.functional.one_hot(a.argmax(dim=-1), a.shape[-1]).to(a.dtype),
            "sin": torch.sin, "cos": torch.cos,
            "rot180": lambda a: torch.flip(a, dims=(0, 1)),
            "alternate": lambda a: torch.tensor(_ALTERNATE(a.shape), dtype=a.dtype),
            "f32": lambda a: a.float(), "like": lambda a, ref: a.to(ref.dtype),
            "is_f64": lambda a: a.dtype == torch.float64,
        }
        return ops[name]


JAX, TORCH = _Jax(), _Torch()


class Case(NamedTuple):
    """One hand-written VJP: ``args`` are ``(name, array or {key: array})`` pairs."""

    fwd: Callable
    bwd: Callable
    args: tuple
    what: str
    bug: str = ""                 # the kind of planted bug ("" for a correct case)
    wrong: tuple = ()             # the wrong inputs as bp.check_vjp names them
    dtype: str = "float64"        # the widest dtype its inputs may have (a kernel refusing float64: float32)


def _normal(name, shape, scale=1.0):
    return scale * np.random.default_rng(zlib.crc32(name.encode())).standard_normal(shape)


# ----------------------------------------------------------------------------- forward and backward rules
# Each rule: fwd(o, *leaves) -> (y, res); bwd(o, res, *dys) -> dleaves (in leaf order).

def softplus_fwd(o, x):
    return o.softplus(x), (x,)


def softplus_bwd(o, res, g):
    (x,) = res
    return (g * o.sigmoid(x),)


def logsumexp_fwd(o, x):
    m = o.max_last(x)
    y = m + o.log(o.sum(o.exp(x - m[:, None]), axis=-1))
    return y, (x, y)


def logsumexp_bwd(o, res, g):
    x, y = res
    return (g[:, None] * o.exp(x - y[:, None]),)                 # softmax(x) · g


def relu_fwd(o, x):
    return x * o.step(x), (x,)


def relu_bwd(o, res, g):
    (x,) = res
    return (g * o.step(x),)


def abs_fwd(o, x):
    return o.abs(x), (x,)


def abs_bwd(o, res, g):
    (x,) = res
    return (g * o.sign(x),)


def max_fwd(o, x):
    return o.max_last(x), (x,)


def max_bwd(o, res, g):
    (x,) = res
    return (g[:, None] * o.first_argmax(x),)                     # the first maximum of a tie


def dense_tanh_fwd(o, x, b, w):                                  # leaves of (x, {"b", "w"})
    y = o.tanh(x @ w + b)
    return y, (x, w, y)


def dense_tanh_bwd(o, res, g, bug=""):
    x, w, y = res
    d = g * (1 - y * y)                                          # (N, D_out)
    db = o.mean(d, axis=0) if bug == "mean" else o.sum(d, axis=0)
    return d @ w.T, db, x.T @ d


def layer_norm_fwd(o, x, beta, gamma):                           # leaves of (x, {"beta", "gamma"})
    xc = x - o.mean(x, axis=-1, keepdims=True)
    r = 1 / o.sqrt(o.mean(xc * xc, axis=-1, keepdims=True) + 1e-5)
    xhat = xc * r
    return gamma * xhat + beta, (xc, r, xhat, gamma)


def layer_norm_bwd(o, res, g, bug=""):
    xc, r, xhat, gamma = res
    dxhat = g * gamma                                            # (N, D)
    dx = r * (dxhat - o.mean(dxhat, axis=-1, keepdims=True) - xhat * o.mean(dxhat * xhat, axis=-1, keepdims=True))
    dgamma = o.sum(g * (xc if bug == "x for xhat" else xhat), axis=0)
    return dx, o.sum(g, axis=0), dgamma


def safe_norm_fwd(o, x):
    n = o.sqrt(o.sum(x * x, axis=-1) + 1e-6)
    return n, (x, n)


def safe_norm_bwd(o, res, g):
    x, n = res
    return (g[:, None] * x / n[:, None],)


def softmax_fwd(o, x):
    e = o.exp(x - o.max_last(x)[:, None])
    y = e / o.sum(e, axis=-1, keepdims=True)
    return y, (y,)


def softmax_bwd(o, res, g, bug=""):
    (y,) = res
    inner = o.sum(y, axis=-1, keepdims=True) if bug == "drop dy" else o.sum(g * y, axis=-1, keepdims=True)
    return (y * (g - inner),)


def cumsum_fwd(o, x):
    return o.cumsum(x), ()


def cumsum_bwd(o, res, g, bug=""):
    if bug == "no inner flip":                                   # equal to the right rule when g is constant
        return (o.flip(o.cumsum(g)),)
    return (o.flip(o.cumsum(o.flip(g))),)                        # dx_i = Σ_{j ≥ i} g_j


def two_outputs_fwd(o, x, w):
    return (x @ w, o.sum(x * x)), (x, w)


def two_outputs_bwd(o, res, g0, g1, bug=""):
    x, w = res
    dx = g0 @ w.T
    if bug != "drop y[1]":
        dx = dx + 2 * g1 * x
    return dx, x.T @ g0


def huber_fwd(o, x):
    a = o.abs(x)
    return o.where(a <= 1.0, 0.5 * x * x, a - 0.5), (x,)


def huber_bwd(o, res, g):
    (x,) = res
    return (g * o.where(o.abs(x) <= 1.0, x, o.sign(x)),)


def square_sum_fwd(o, x):
    return o.sum(x * x, axis=-1), (x,)


def square_sum_bwd(o, res, g):
    (x,) = res
    return (g[:, None] * x,)                                     # bug: forgot the 2 of 2x


def matmul_fwd(o, a, b):
    return a @ b, (a, b)


def matmul_bwd(o, res, g):
    a, b = res
    return g @ b, a.T @ g                                        # bug: da = g bᵀ, not g b


def scale_shift_fwd(o, x, a, b):                                 # leaves of (x, {"a", "b"})
    return a * x + b * x * x, (x, a, b)


def scale_shift_bwd(o, res, g):
    x, a, b = res
    dx = g * (a + 2 * b * x)
    da, db = o.sum(g * x, axis=0), o.sum(g * x * x, axis=0)
    return dx, db, da                                            # bug: the two leaves swapped


def sigmoid_fwd(o, x):
    s = o.sigmoid(x)
    return s, (s,)


def sigmoid_bwd(o, res, g):
    (s,) = res
    return (g * s * (s - 1),)                                    # bug: s(s − 1) for s(1 − s)


def exp_fwd(o, x):
    y = o.exp(x)
    return y, (y,)


def exp_bwd(o, res, g):
    (y,) = res
    return (g * o.abs(g) * y,)                                   # bug: g|g| — right for g ∈ {0, 1}


def leaky_relu_fwd(o, x):
    return o.where(x > 0, x, 0.1 * x), (x,)


def leaky_relu_bwd(o, res, g):
    (x,) = res
    return (g * o.where(x > 0, 1.0, 0.01),)                      # bug: slope 0.01 where forward has 0.1


def logit_fwd(o, p):
    return o.log(p) - o.log(1 - p), (p,)


def logit_bwd(o, res, g):
    (p,) = res
    return (g / (p * (1 - p)),)


def rms_norm_f32_fwd(o, x, w):                                   # computes in float32, whatever x is
    x32, w32 = o.f32(x), o.f32(w)
    r = 1 / o.sqrt(o.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return o.like(x32 * r * w32, x), (x, w)


def rms_norm_f32_bwd(o, res, g):
    x, w = res
    x32, w32, g32 = o.f32(x), o.f32(w), o.f32(g)
    r = 1 / o.sqrt(o.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    xhat, dxhat = x32 * r, g32 * w32                             # (N, D)
    dx = r * (dxhat - xhat * o.mean(dxhat * xhat, axis=-1, keepdims=True))
    return o.like(dx, x), o.like(o.sum(g32 * xhat, axis=0), w)


def sin_kernel_fwd(o, x):                                        # refuses float64, as a Pallas kernel with x64 on
    if o.is_f64(x):
        raise TypeError("lax.div requires arguments to have the same dtypes, got int32, int64")
    return o.sin(x), (x,)


def sin_kernel_bwd(o, res, g):
    (x,) = res
    return (1.1 * g * o.cos(x),)                                 # bug: a slope 10% too steep


def det2_fwd(o, x):
    return x[0, 0] * x[1, 1] - x[0, 1] * x[1, 0], (x,)


def det2_bwd(o, res, g):
    (x,) = res
    cofactors = o.rot180(x) * o.alternate(x)                     # d det / dx = [[d, −c], [−b, a]]
    return (o.abs(g) * cofactors,)                               # bug: |g| for g, right whenever g > 0


def _bug(bwd, kind):
    return lambda o, res, *g: bwd(o, res, *g, bug=kind)


# ----------------------------------------------------------------------------- the corpus

_TIES = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, -1.0, 0.5], [0.0, 5.0, 1.0, 5.0]])
_RELU_OUT = np.maximum(_normal("relu-out", (3, 4)), 0.0)          # exact zeros, as a previous relu leaves them
_NEAR_EDGES = np.array([[0.945, 0.02, 0.5], [0.97, 0.005, 0.3]])  # a step of 0.1 × their RMS leaves (0, 1)


def _x(name, shape=(3, 4)):
    return (("x", _normal(name, shape)),)


CASES = {
    # correct
    "softplus": Case(softplus_fwd, softplus_bwd, _x("softplus"), "log(1 + eˣ)"),
    "logsumexp": Case(logsumexp_fwd, logsumexp_bwd, _x("logsumexp", (3, 5)), "stable log Σ eˣ over the last axis"),
    "relu": Case(relu_fwd, relu_bwd, _x("relu"), "max(x, 0) (a kink)"),
    "abs": Case(abs_fwd, abs_bwd, _x("abs"), "|x| (a kink)"),
    "max": Case(max_fwd, max_bwd, _x("max"), "max over the last axis, to the first maximum"),
    "max_at_ties": Case(max_fwd, max_bwd, (("x", _TIES),), "the same, at given inputs with ties (kinks)"),
    "relu_at_zeros": Case(relu_fwd, relu_bwd, (("x", _RELU_OUT),), "relu at the zeros of a previous relu"),
    "dense_tanh": Case(dense_tanh_fwd, dense_tanh_bwd,
                       (("x", _normal("dt-x", (3, 4))),
                        ("p", {"b": _normal("dt-b", (2,)), "w": _normal("dt-w", (4, 2), 0.5)})),
                       "tanh(x W + b), params a dict"),
    "layer_norm": Case(layer_norm_fwd, layer_norm_bwd,
                       (("x", _normal("ln-x", (3, 4))),
                        ("p", {"beta": _normal("ln-b", (4,)), "gamma": 1 + _normal("ln-g", (4,), 0.3)})),
                       "layer norm, params a dict"),
    "safe_norm": Case(safe_norm_fwd, safe_norm_bwd, _x("safe_norm"), "√(Σ x² + ε) over the last axis"),
    "softmax": Case(softmax_fwd, softmax_bwd, _x("softmax", (3, 5)), "softmax over the last axis"),
    "cumsum": Case(cumsum_fwd, cumsum_bwd, _x("cumsum", (2, 6)), "cumulative sum"),
    "two_outputs": Case(two_outputs_fwd, two_outputs_bwd,
                        (("x", _normal("to-x", (3, 4))), ("w", _normal("to-w", (4, 2)))),
                        "(x W, Σ x²): two outputs"),
    "huber": Case(huber_fwd, huber_bwd, _x("huber", (4, 4)), "Huber, kinks at |x| = 1"),
    # planted bugs
    "square_sum_missing_2": Case(square_sum_fwd, square_sum_bwd, _x("sq"), "Σ x²: dx = g x",
                                 "missing factor", ("dx",)),
    "matmul_transposed": Case(matmul_fwd, matmul_bwd,
                              (("a", _normal("mm-a", (3, 3))), ("b", _normal("mm-b", (3, 3)))),
                              "a b: da = g b", "transposed matrix", ("da",)),
    "scale_shift_swapped": Case(scale_shift_fwd, scale_shift_bwd,
                                (("x", _normal("ss-x", (3, 4))),
                                 ("p", {"a": _normal("ss-a", (4,)), "b": _normal("ss-b", (4,))})),
                                "a x + b x²: da and db swapped", "wrong leaf", ("dp['a']", "dp['b']")),
    "sigmoid_sign": Case(sigmoid_fwd, sigmoid_bwd, _x("sig"), "σ(x): dx = g σ(σ − 1)", "sign", ("dx",)),
    "exp_g_abs_g": Case(exp_fwd, exp_bwd, _x("exp"), "eˣ: dx = g|g| eˣ", "only for non-unit cotangents", ("dx",)),
    "dense_bias_mean": Case(dense_tanh_fwd, _bug(dense_tanh_bwd, "mean"),
                            (("x", _normal("db-x", (3, 4))),
                             ("p", {"b": _normal("db-b", (2,)), "w": _normal("db-w", (4, 2), 0.5)})),
                            "tanh(x W + b): db a mean", "one of several inputs", ("dp['b']",)),
    "layer_norm_dgamma": Case(layer_norm_fwd, _bug(layer_norm_bwd, "x for xhat"),
                              (("x", _normal("lg-x", (3, 4))),
                               ("p", {"beta": _normal("lg-b", (4,)), "gamma": 1 + _normal("lg-g", (4,), 0.3)})),
                              "layer norm: dγ from x − μ, not x̂", "one of several inputs", ("dp['gamma']",)),
    "cumsum_no_inner_flip": Case(cumsum_fwd, _bug(cumsum_bwd, "no inner flip"), _x("cs", (2, 6)),
                                 "cumsum: dx = flip(cumsum(g))", "cancels under ones", ("dx",)),
    "softmax_drop_dy": Case(softmax_fwd, _bug(softmax_bwd, "drop dy"), _x("sm", (3, 5)),
                            "softmax: y (g − Σ y)", "cancels under ones", ("dx",)),
    "two_outputs_drop_y1": Case(two_outputs_fwd, _bug(two_outputs_bwd, "drop y[1]"),
                                (("x", _normal("t1-x", (3, 4))), ("w", _normal("t1-w", (4, 2)))),
                                "(x W, Σ x²): dx misses 2 g₁ x", "one output's term", ("dx",)),
    "leaky_relu_slope": Case(leaky_relu_fwd, leaky_relu_bwd, _x("lr"), "leaky relu: slope 0.01 in bwd, 0.1 in fwd",
                             "missing factor at a kink", ("dx",)),
    # hard for a checker in other ways
    "logit_near_edges": Case(logit_fwd, logit_bwd, (("p", _NEAR_EDGES),), "log p − log(1 − p) near 0 and 1"),
    "rms_norm_f32_inside": Case(rms_norm_f32_fwd, rms_norm_f32_bwd,
                                (("x", _normal("rn-x", (3, 8))), ("w", 1 + _normal("rn-w", (8,), 0.3))),
                                "rms norm computed in float32 inside, as a kernel"),
    "sin_kernel_refuses_f64": Case(sin_kernel_fwd, sin_kernel_bwd, _x("sk"), "sin, refusing float64: dx = 1.1 g cos x",
                                   "float64 refused (a slope)", ("dx",), dtype="float32"),
    "det2_abs_g": Case(det2_fwd, det2_bwd, (("x", _normal("det", (2, 2))),), "det of 2×2: dx = |g| cofactors",
                       "only for positive cotangents", ("dx",)),
}


# ----------------------------------------------------------------------------- builders


def arguments(case: Case, module=jnp) -> tuple:
    """The case's arguments as arrays (a tuple, pytrees kept), in ``case.dtype``."""
    return tuple(jax.tree_util.tree_map(lambda a: module.asarray(a, case.dtype), v) for _, v in case.args)


def jax_fn(name: str) -> Callable:
    """The case as a ``jax.custom_vjp`` function, its arguments named as in ``case.args``."""
    case = CASES[name]
    treedef = jax.tree_util.tree_structure(tuple(v for _, v in case.args))

    def fun(*args):
        return case.fwd(JAX, *jax.tree_util.tree_leaves(args))[0]

    fun.__name__ = fun.__qualname__ = name
    fun.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n, _ in case.args])
    f = jax.custom_vjp(fun)

    def f_fwd(*args):
        return case.fwd(JAX, *jax.tree_util.tree_leaves(args))

    def f_bwd(res, g):
        return jax.tree_util.tree_unflatten(treedef, list(case.bwd(JAX, res, *(g if isinstance(g, tuple) else (g,)))))

    f.defvjp(f_fwd, f_bwd)
    return f


def torch_fn(name: str) -> Callable:
    """The case's twin: ``f(*tensors)``, one tensor per leaf, through a ``torch.autograd.Function``."""
    import torch

    case = CASES[name]

    class Twin(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *leaves):
            y, ctx.res = case.fwd(TORCH, *leaves)
            return y

        @staticmethod
        def backward(ctx, *dys):
            return tuple(case.bwd(TORCH, ctx.res, *dys))

    Twin.__name__ = name
    return Twin.apply


def leaves(case: Case) -> list:
    """The case's input leaves in JAX's order (torch's input numbers)."""
    return jax.tree_util.tree_leaves(tuple(v for _, v in case.args))


def wrong_leaves(case: Case) -> set:
    """Positions among :func:`leaves` of the wrong inputs."""
    names = []
    for n, v in case.args:
        paths = jax.tree_util.tree_leaves_with_path(v)
        names += [f"d{n}{jax.tree_util.keystr(p)}" for p, _ in paths]
    return {names.index(w) for w in case.wrong}
