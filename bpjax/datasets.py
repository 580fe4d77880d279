"""Datasets that need no download: MNIST-1D (generated locally), scikit-learn's digits, and the
textbook's synthetic tasks (XOR, a 1-D regression).

Each loader returns a :class:`Dataset` of NumPy arrays with a leading example axis.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Callable, Dict, NamedTuple, Optional

import numpy as np


class Dataset(NamedTuple):
    """Train and test splits. ``y`` holds integer labels (classification) or float targets."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: Optional[int]     # None for regression
    name: str

    @property
    def in_shape(self):
        return tuple(self.x_train.shape[1:])


def _require(module: str, package: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise ImportError(f"this dataset needs the '{package}' package: pip install {package} "
                          f"(or pip install 'bpjax[train]')") from e


def cache_dir() -> pathlib.Path:
    """Where generated data is cached: ``$BPJAX_CACHE`` or ``~/.cache/bpjax``."""
    return pathlib.Path(os.environ.get("BPJAX_CACHE", pathlib.Path.home() / ".cache" / "bpjax"))


def mnist1d(*, channels_last: bool = True, cache: bool = True) -> Dataset:
    """MNIST-1D generated locally with the ``mnist1d`` package's default arguments.

    4000 training and 1000 test examples of length 40, 10 classes. ``x`` is ``(N, 40, 1)``
    (channels last) or ``(N, 40)``. Generation takes ~10 s; the result is cached in
    :func:`cache_dir` under a name that hashes the generation arguments. Nothing is downloaded.
    """
    data_mod = _require("mnist1d.data", "mnist1d")
    args = data_mod.get_dataset_args()
    spec = {k: v for k, v in sorted(vars(args).items()) if k != "url"}
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = cache_dir() / f"mnist1d-{digest}.npz"
    if cache and path.exists():
        d = dict(np.load(path))
    else:
        raw = data_mod.make_dataset(args)           # generated here, no download
        d = {k: np.asarray(raw[k]) for k in ("x", "y", "x_test", "y_test")}
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, **d)
            os.replace(tmp, path)                    # atomic: never a half-written cache file
    x, x_test = d["x"].astype(np.float32), d["x_test"].astype(np.float32)
    if channels_last:
        x, x_test = x[..., None], x_test[..., None]
    return Dataset(x, d["y"].astype(np.int32), x_test, d["y_test"].astype(np.int32), 10, "mnist1d")


def digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8×8 handwritten digits (1797 images, shipped with the package).

    ``x`` is ``(N, 8, 8, 1)`` scaled to [0, 1]; a fixed shuffled split keeps ``test_fraction``
    of the examples for testing.
    """
    sk = _require("sklearn.datasets", "scikit-learn")
    raw = sk.load_digits()
    x = (raw.images / 16.0).astype(np.float32)[..., None]
    y = raw.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return Dataset(x[train], y[train], x[test], y[test], 10, "digits")


def xor(*, copies: int = 64, noise: float = 0.1, seed: int = 0) -> Dataset:
    """XOR of two inputs as 2-class classification: the four corners, ``copies`` noisy copies each."""
    rng = np.random.default_rng(seed)
    corners = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
    labels = np.array([0, 1, 1, 0], np.int32)

    def draw(n):
        idx = rng.integers(0, 4, n)
        return (corners[idx] + noise * rng.standard_normal((n, 2))).astype(np.float32), labels[idx]

    x, y = draw(4 * copies)
    x_test, y_test = draw(4 * copies // 4)
    return Dataset(x, y, x_test, y_test, 2, "xor")


def regression(*, n: int = 256, noise: float = 0.05, seed: int = 0) -> Dataset:
    """y = sin(x) + noise on x ∈ [−π, π]; targets have shape (N, 1); the test set is noise-free."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-np.pi, np.pi, (n, 1)).astype(np.float32)
    y = (np.sin(x) + noise * rng.standard_normal(x.shape)).astype(np.float32)
    x_test = np.linspace(-np.pi, np.pi, 64, dtype=np.float32)[:, None]
    return Dataset(x, y, x_test, np.sin(x_test).astype(np.float32), None, "regression")


DATASETS: Dict[str, Callable[..., Dataset]] = {
    "mnist1d": mnist1d, "digits": digits, "xor": xor, "regression": regression,
}


def load(name: str, **kwargs) -> Dataset:
    """The dataset called ``name`` (one of :data:`DATASETS`)."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(f"datasets.load: expected one of {sorted(DATASETS)}, got {name!r}") from None
    return loader(**kwargs)
