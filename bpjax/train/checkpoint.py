"""Checkpoints of a whole run's state (orbax), and the error of a run that cannot go on."""
from __future__ import annotations

import pathlib
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import describe


class TrainingError(RuntimeError):
    """A run that cannot go on: a non-finite loss, or a checkpoint that does not fit."""


class _Checkpointer:
    """Orbax checkpoints of the whole run state, one per epoch; orbax writes each into a
    temporary directory and renames it when complete, so a kill leaves the previous one intact."""

    def __init__(self, directory, keep: int = 2):
        try:
            import orbax.checkpoint as ocp
        except ImportError as e:
            raise ImportError("checkpoints need orbax: pip install orbax-checkpoint "
                              "(or pip install 'bpjax[train]')") from e
        self.ocp = ocp
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False))

    def latest(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, epoch: int, run_state: Dict[str, Any]):
        leaves = jax.tree_util.tree_leaves(run_state)
        self.manager.save(epoch, args=self.ocp.args.StandardSave({f"{i:05d}": _to_save(a)
                                                                 for i, a in enumerate(leaves)}))
        self.manager.wait_until_finished()

    def restore(self, epoch: int, like: Dict[str, Any]) -> Dict[str, Any]:
        leaves, treedef = jax.tree_util.tree_flatten(like)
        target = {f"{i:05d}": jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype)
                  for i, a in enumerate(leaves)}
        where = self.directory / str(epoch)
        try:
            restored = self.manager.restore(epoch, args=self.ocp.args.StandardRestore(target))
        except Exception as e:  # orbax raises several types for a corrupt or foreign checkpoint
            raise TrainingError(
                f"fit: the checkpoint at {where} does not fit this run (a corrupt checkpoint, or one "
                f"written for another model or optimizer).\n  expected: {describe(like['params'])}\n"
                f"  orbax said: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        got = [restored[k] for k in sorted(restored)]
        bad = [k for k, a, b in zip(sorted(target), got, target.values())
               if tuple(np.shape(a)) != b.shape or np.dtype(a.dtype) != b.dtype]
        if len(got) != len(leaves) or bad:
            raise TrainingError(f"fit: the checkpoint at {where} was written for another model: "
                                f"leaves {bad[:5]} differ from {describe(like['params'])}")
        # host scalars (epoch, best_val, ...) stay numpy, in their dtypes (jnp would make int64 int32)
        return jax.tree_util.tree_unflatten(treedef, [np.asarray(a) if isinstance(b, (np.ndarray, np.generic))
                                                      else jnp.asarray(a) for a, b in zip(got, leaves)])


def _to_save(a):
    """A leaf as orbax saves it: on the host, unless it is sharded over several processes (FSDP
    across processes), which orbax saves as each process's shards, coordinating the processes."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
        return a
    return np.asarray(a)
