"""Run folders: what ``bpjax train`` writes, and a trained model loaded back from one.

A run folder (``runs/MODEL-DATASET-sSEED/`` by default, ``runs/resnet1d-mnist1d-s0/`` for the main job) holds::

    run.json        the arguments that define the run, and what rebuilds the model
                    (model name and arguments, dataset, input shape and dtype, loss)
    checkpoints/    Orbax checkpoints of the whole run state, one per epoch (for --resume)
    model/          an Orbax checkpoint of the final (best) params and layer state, each leaf
                    named by its tree path (``params/[0]['w']``), written when the run ends
    metrics.jsonl   one row per epoch (or metrics.csv)
    curves.png      the loss and accuracy curves
    summary.json    the test metrics, the best epoch, ...

:func:`load_run` reads ``run.json`` and ``model/`` back::

    run = bpjax.load_run("runs/resnet1d-mnist1d-s0")
    y = run.predict(x)                 # the model's outputs, train=False, 1000 rows at a time

A folder that is damaged, incomplete or written for another model raises :class:`RunError`
with one sentence naming what is wrong.
"""
from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any, Dict

import jax
import numpy as np

from ..datasets import load
from ..layers import losses as _losses
from ..models import MODELS
from .evaluate import evaluate as _evaluate

__all__ = ["load_run", "Run", "RunError", "RUN_FILE", "MODEL_DIR"]

#: The file describing a run; its ``format`` is :data:`FORMAT`.
RUN_FILE = "run.json"
#: The Orbax checkpoint of the final (best) params and state.
MODEL_DIR = "model"
FORMAT = 1
#: Everything ``bpjax train`` writes in a run folder (``--overwrite`` removes these and nothing else),
#: and the Hugging Face folder ``hf`` that ``scripts/examples/finetune_gpt2.py`` saves there.
WRITTEN = (RUN_FILE, "checkpoints", MODEL_DIR, "metrics.jsonl", "metrics.csv", "curves.png", "summary.json", "hf")


class RunError(ValueError):
    """A run folder that cannot be used: missing, damaged, incomplete or for another model."""


# ----------------------------------------------------------------------------- the folder


def holds_run(directory) -> bool:
    """Whether ``directory`` holds (part of) a run written by ``bpjax train``."""
    d = pathlib.Path(directory)
    return any((d / name).exists() for name in WRITTEN)


def remove_run(directory) -> None:
    """Remove what ``bpjax train`` wrote in ``directory`` (:data:`WRITTEN`, and the temporary
    folder of an interrupted ``model/`` save), and nothing else. A folder that exists, is not
    empty and holds no run is refused: it is not ours to clear."""
    d = pathlib.Path(directory)
    if not d.exists():
        return
    if not d.is_dir():
        raise RunError(f"expected --out to be a folder, got {d}, which is a file")
    if not holds_run(d):
        others = sorted(p.name for p in d.iterdir())
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise RunError(f"--overwrite expected a run folder (one with {RUN_FILE} or checkpoints/), got {d} "
                           f"holding other files ({shown}); remove it yourself or choose another --out")
        return
    for p in [*(d / name for name in WRITTEN), *d.glob(f"{MODEL_DIR}.orbax-checkpoint-tmp*")]:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def write_info(directory, info: Dict[str, Any]) -> None:
    """Write ``run.json`` (``info`` with the :data:`FORMAT` number first)."""
    text = json.dumps({"format": FORMAT, **info}, indent=2) + "\n"
    path = pathlib.Path(directory) / RUN_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)                     # a kill leaves the old file or the new one, never half


def read_info(directory, *, who: str = "load_run") -> Dict[str, Any]:
    """``run.json`` of ``directory`` as a dict; :class:`RunError` if it is missing or damaged."""
    d = pathlib.Path(directory)
    path = d / RUN_FILE
    if not d.is_dir():
        raise RunError(f"{who}: expected a run folder written by bpjax train, got {d}, which "
                       f"{'is not a folder' if d.exists() else 'does not exist'}")
    if not path.is_file():
        raise RunError(f"{who}: expected {path} (written by bpjax train when a run starts), got no such file")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{who}: expected {path} to be JSON, got a damaged file ({e})") from None
    if not isinstance(info, dict):
        raise RunError(f"{who}: expected {path} to hold a JSON object, got {type(info).__name__}")
    if info.get("format") != FORMAT:
        raise RunError(f"{who}: expected {path} of format {FORMAT}, got format {info.get('format')!r} "
                       f"(written by bpjax {info.get('bpjax_version', '?')})")
    missing = [k for k in ("model", "model_args", "dataset", "in_shape", "x_dtype", "loss") if k not in info]
    if missing:
        raise RunError(f"{who}: expected {path} to name {', '.join(missing)}, got an incomplete file")
    return info


# ----------------------------------------------------------------------------- the trained model


def _named(tree) -> Dict[str, Any]:
    """The leaves of ``tree`` by their tree paths: ``{"[0]['w']": array, ...}``."""
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _orbax(who: str):
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError(f"{who} needs orbax: pip install orbax-checkpoint (or pip install 'bpjax[train]')") from e
    return ocp


def save_model(directory, params, state, *, to_save=np.asarray) -> pathlib.Path:
    """Save ``params`` and ``state`` to ``directory/model`` with Orbax, each leaf named by its tree
    path. With several processes every process must call it (orbax coordinates them; process 0
    writes what is replicated). ``to_save`` maps a leaf to what orbax saves (default: a host copy)."""
    ocp = _orbax("save_model")
    path = (pathlib.Path(directory) / MODEL_DIR).absolute()
    tree = {"params": {k: to_save(a) for k, a in _named(params).items()},
            "state": {k: to_save(a) for k, a in _named(state).items()}}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree, force=True)
    checkpointer.wait_until_finished()
    return path


class Run:
    """A trained model loaded from a run folder by :func:`load_run`.

    Attributes:
      directory: the run folder.
      info: its ``run.json`` (model, dataset, seed, dtype, optimizer, ...).
      model: the :class:`bpjax.Layer`, rebuilt from ``info``.
      params, state: the final (best) params and layer state of the run.
      loss: the loss it was trained with (:class:`bpjax.Loss`).
    """

    def __init__(self, directory, info, model, params, state, loss):
        self.directory, self.info, self.model = pathlib.Path(directory), info, model
        self.params, self.state, self.loss = params, state, loss
        self._forward = jax.jit(lambda p, s, x: model.forward(p, s, x, train=False)[0])   # compiled once per shape

    def __repr__(self):
        return f"Run({str(self.directory)!r}: {self.info['model']} on {self.info['dataset']})"

    def predict(self, x, *, batch_size: int = 1000) -> np.ndarray:
        """The model's outputs on ``x`` (N, *in_shape) in inference mode (``train=False``), as a
        host array (N, ...), computed ``batch_size`` rows at a time (the last batch padded, so
        one compile serves every batch)."""
        x = np.asarray(x)
        in_shape, want = tuple(self.info["in_shape"]), np.dtype(self.info["x_dtype"])
        if x.ndim != len(in_shape) + 1 or tuple(x.shape[1:]) != in_shape:
            raise ValueError(f"predict: expected x of shape (N, {', '.join(map(str, in_shape))}) for "
                             f"{self.info['model']} on {self.info['dataset']}, got {x.shape}")
        if np.issubdtype(want, np.integer) and not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"predict: expected integer x ({want}) for {self.info['model']}, got {x.dtype}")
        if batch_size < 1:
            raise ValueError(f"predict: expected batch_size >= 1, got {batch_size}")
        x = x.astype(want, copy=False)
        n = x.shape[0]
        rows = min(batch_size, max(n, 1))
        outs = []
        for i in range(0, n, rows):
            xb = x[i:i + rows]
            if xb.shape[0] < rows:                                   # pad: same shape, same compile
                xb = np.concatenate([xb, np.zeros((rows - xb.shape[0], *in_shape), want)])
            outs.append(np.asarray(self._forward(self.params, self.state, xb))[:min(rows, n - i)])
        if not outs:                                                 # no rows: the outputs' shape, empty
            out = jax.eval_shape(self._forward, self.params, self.state, jax.ShapeDtypeStruct((1, *in_shape), want))
            return np.zeros((0, *out.shape[1:]), out.dtype)
        return np.concatenate(outs)

    def evaluate(self, data=None, *, batch_size: int = 1000) -> Dict[str, float]:
        """Loss (and accuracy) on the test split of the run's dataset (or of ``data``), in
        inference mode: the numbers ``bpjax train`` wrote in ``summary.json``."""

        data = data if data is not None else load(self.info["dataset"])
        return _evaluate(self.model, self.loss, self.params, self.state, data.x_test, data.y_test,
                        batch_size=batch_size, classification=data.num_classes is not None)


def _build(info: Dict[str, Any], where: pathlib.Path):
    if info["model"] not in MODELS:
        raise RunError(f"load_run: expected a model among {', '.join(sorted(MODELS))} in {where}, "
                       f"got {info['model']!r}")
    losses = {"softmax_cross_entropy": _losses.softmax_cross_entropy, "squared_error": _losses.squared_error}
    if info["loss"] not in losses:
        raise RunError(f"load_run: expected a loss among {', '.join(sorted(losses))} in {where}, got {info['loss']!r}")
    try:
        model = MODELS[info["model"]](**info["model_args"])
    except TypeError as e:
        raise RunError(f"load_run: expected arguments of {info['model']} in {where}, got {info['model_args']} ({e})") from None
    return model, losses[info["loss"]]()


def load_run(run_dir) -> Run:
    """Load the trained model of a ``bpjax train`` run folder.

    Rebuilds the model from ``run.json`` and restores its final (best) params and state from
    ``model/`` (written when the run ends). Returns a :class:`Run` with ``.model``, ``.params``,
    ``.state`` and ``.predict(x)``.

    Raises:
      RunError: the folder is missing, damaged or incomplete (a run that has not finished has no
        ``model/``), or ``model/`` was written for another model; the message names what.
    """
    d = pathlib.Path(run_dir)
    info = read_info(d)
    model, loss = _build(info, d / RUN_FILE)
    like_params, like_state, _ = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tuple(info["in_shape"])))
    target = {"params": _named(like_params), "state": _named(like_state)}
    path = (d / MODEL_DIR).absolute()
    if not path.is_dir():
        raise RunError(f"load_run: expected the trained model in {d / MODEL_DIR} (written when a run ends), got no "
                       f"such folder: the run has not finished; continue it with bpjax train --resume --out {d}")
    ocp = _orbax("load_run")
    checkpointer = ocp.StandardCheckpointer()
    described = f"{info['model']}({', '.join(f'{k}={v!r}' for k, v in info['model_args'].items())})"
    try:
        saved = checkpointer.metadata(path).item_metadata
        saved = {part: dict(saved.get(part) or {}) for part in ("params", "state")}
    except Exception as e:  # orbax raises several types for a damaged checkpoint
        raise RunError(f"load_run: expected an Orbax checkpoint in {d / MODEL_DIR}, got a damaged one "
                       f"({type(e).__name__}: {_first_line(e)})") from None
    for part in ("params", "state"):
        want, got = target[part], saved[part]
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        if missing or extra:
            raise RunError(f"load_run: expected {d / MODEL_DIR} to hold the {part} of {described}, got "
                           f"{len(missing)} missing ({', '.join(missing[:3])}) and {len(extra)} unexpected "
                           f"({', '.join(extra[:3])}) leaves")
        for name, like in want.items():
            shape, dtype = tuple(getattr(got[name], "shape", ()) or ()), getattr(got[name], "dtype", None)
            if shape != tuple(like.shape) or (dtype is not None and np.dtype(dtype) != np.dtype(like.dtype)):
                raise RunError(f"load_run: expected {part}{name} of shape {tuple(like.shape)} {np.dtype(like.dtype)} "
                               f"for {described}, got {shape} {dtype} in {d / MODEL_DIR}")
    try:
        restored = checkpointer.restore(path, target)
    except Exception as e:  # orbax raises several types for a damaged checkpoint
        raise RunError(f"load_run: expected a readable Orbax checkpoint in {d / MODEL_DIR}, got a damaged one "
                       f"({type(e).__name__}: {_first_line(e)})") from None
    params = _unnamed(like_params, restored["params"])
    state = _unnamed(like_state, restored["state"])
    return Run(d, info, model, params, state, loss)


def _unnamed(like, named: Dict[str, Any]):
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(named[jax.tree_util.keystr(p)]) for p, _ in paths])


def _first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else ""

