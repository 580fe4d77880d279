"""Beyond one device: data-parallel and FSDP-style sharded training on JAX's SPMD engine.

Nothing here is a home-made distributed runtime. A :class:`jax.sharding.Mesh` with one ``"data"``
axis spans the devices; the batch is sharded over it with :class:`~jax.sharding.NamedSharding`;
params and optimizer state are replicated, or sharded over the same axis (``fsdp=True``) to
divide their memory by the device count. The hand-written forward and backward then run under
``jax.jit`` exactly as on one device: the loss and every gradient are means over the *global*
batch, so XLA inserts the all-reduces, and ``batch_norm``'s statistics (and its backward's
reductions) are computed over the global batch too — one device seeing the whole batch gives
the same numbers.

Across processes (hosts, or several processes on one machine), call :func:`initialize` in every
process first, before anything touches a device; ``make_mesh`` then spans every device of every
process, and :func:`is_main_process` tells the one process that should print and write files.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["make_mesh", "batch_sharding", "replicated", "fsdp_sharding", "shard_batch", "place", "initialize",
           "is_main_process"]

AXIS = "data"


def make_mesh(num_devices: Optional[int] = None, *, devices=None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over the first ``num_devices`` devices (default: all)."""
    devices = list(devices if devices is not None else jax.devices())
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            hint = ""
            if jax.devices()[0].platform == "cpu" and num_devices > len(devices):
                hint = (f"; for {num_devices} CPU devices start Python with JAX_NUM_CPU_DEVICES={num_devices} "
                        f"(or XLA_FLAGS=--xla_force_host_platform_device_count={num_devices}) set")
            raise ValueError(f"make_mesh: expected 1 <= num_devices <= {len(devices)} (the devices JAX "
                             f"sees: {jax.devices()[0].platform} x{len(devices)}), got {num_devices}{hint}")
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Examples split over ``"data"``: each device holds ``batch / n`` consecutive rows."""
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_sharding(mesh: Mesh, tree: Any):
    """Per leaf: shard its largest axis that the device count divides over ``"data"``, else
    replicate it (small leaves such as biases). Returns a tree of shardings."""
    n = mesh.shape[AXIS]

    def leaf(a):
        shape = np.shape(a)
        axes = [i for i in np.argsort(shape)[::-1] if shape[i] % n == 0 and shape[i] >= n]
        if n == 1 or not axes:
            return replicated(mesh)
        spec = [None] * len(shape)
        spec[axes[0]] = AXIS
        return NamedSharding(mesh, P(*spec))

    return jax.tree_util.tree_map(leaf, tree)


def check_batch(mesh: Mesh, batch_size: int, what: str = "batch") -> None:
    n = mesh.shape[AXIS]
    if batch_size % n:
        raise ValueError(f"distributed: expected the {what} size to be divisible by the {n} devices of "
                         f"the mesh, got {batch_size} (use a batch size that is a multiple of {n})")


def shard_batch(mesh: Mesh, *arrays):
    """Place arrays with a leading batch axis on the mesh, split over ``"data"``."""
    for a in arrays:
        check_batch(mesh, np.shape(a)[0])
    placed = [jax.device_put(a, batch_sharding(mesh)) for a in arrays]
    return placed[0] if len(placed) == 1 else tuple(placed)


def place(mesh: Mesh, tree: Any, *, fsdp: bool = False):
    """Put params or optimizer state on the mesh: replicated, or FSDP-sharded."""
    shardings = fsdp_sharding(mesh, tree) if fsdp else jax.tree_util.tree_map(lambda _: replicated(mesh), tree)
    return jax.device_put(tree, shardings), shardings


# ----------------------------------------------------------------------------- several processes

_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def _names(cli: bool):
    """How the messages name the arguments: as ``bpjax train`` options, or as Python arguments."""
    if cli:
        return dict(who="bpjax train", coordinator="--coordinator", num_processes="--num-processes",
                    process_id="--process-id", timeout_s="--init-timeout")
    return dict(who="distributed.initialize", coordinator="coordinator", num_processes="num_processes",
                process_id="process_id", timeout_s="timeout_s")


def initialize(coordinator: str, num_processes: int, process_id: int, *, timeout_s: float = 60.0,
               cli: bool = False) -> None:
    """Join a run of ``num_processes`` processes: :func:`jax.distributed.initialize`, bounded.

    Call it in every process before anything else touches a device. Process 0 serves the
    coordinator on ``coordinator`` (``HOST:PORT``: process 0's address and a free port); every
    process connects to it. Afterwards ``jax.devices()`` lists the devices of every process
    (``jax.local_devices()`` this one's) and a mesh over them trains as one: on CPU, the
    cross-process collectives are JAX's gloo (``jax_cpu_collectives_implementation``, JAX's
    default; set here when unset). A loopback ``HOST`` (``127.0.0.1``, ``localhost``) also makes
    the coordinator listen on loopback only; any other listens on every interface, as JAX does.

    If the processes have not all connected, and exchanged their device lists, within
    ``timeout_s`` seconds, this prints one line to stderr and exits the process with status 2:
    JAX itself would abort the process with a C++ stack trace (or wait for minutes).

    Args:
      coordinator: ``"HOST:PORT"`` of process 0.
      num_processes: how many processes take part (>= 1).
      process_id: this process's index, in ``[0, num_processes)``; 0 is the coordinator.
      timeout_s: the most seconds to wait for every process.
      cli: name the arguments in messages as the ``bpjax train`` options (``--coordinator`` ...).

    Raises:
      ValueError: a malformed argument, or a coordinator that cannot listen on its port.
      RuntimeError: (JAX's) called after something touched a device, or called twice.
    """
    n = _names(cli)
    host, _, port = str(coordinator).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{n['who']}: expected {n['coordinator']} as HOST:PORT (e.g. 127.0.0.1:1234), "
                         f"got {coordinator!r}")
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"{n['who']}: expected {n['num_processes']} >= 1, got {num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"{n['who']}: expected 0 <= {n['process_id']} < {num_processes} "
                         f"({n['num_processes']}), got {process_id!r}")
    if not timeout_s > 0:
        raise ValueError(f"{n['who']}: expected {n['timeout_s']} > 0 seconds, got {timeout_s!r}")
    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    if process_id == 0:
        late = (f"expected all {num_processes} processes to connect to this coordinator on {coordinator} "
                f"within {timeout_s:g} s ({n['timeout_s']}), got no answer from the others (start every "
                f"process with the same {n['coordinator']} and {n['num_processes']} {num_processes})")
    else:
        late = (f"expected to reach the coordinator (process 0) at {coordinator} and all {num_processes} "
                f"processes within {timeout_s:g} s ({n['timeout_s']}), got no complete answer (is process 0 "
                f"running there, are all {num_processes} processes started, is the port open?)")
    joined = threading.Event()

    def watchdog():
        if not joined.wait(timeout_s):
            print(f"{n['who']}: {late}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(2)            # the main thread is blocked inside JAX's C++ client: exit from here

    threading.Thread(target=watchdog, name="bpjax-initialize-watchdog", daemon=True).start()
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
            initialization_timeout=int(timeout_s) + 30,           # JAX's own deadline comes after ours
            coordinator_bind_address=coordinator if host in _LOOPBACK else None)
        jax.devices()                                             # the exchange of device lists
    except Exception as e:
        if process_id == 0 and "RPC server" in str(e):
            raise ValueError(f"{n['who']}: expected a free port for the coordinator ({n['coordinator']}), "
                             f"got {coordinator} in use or not bindable (JAX said: {str(e).strip()})") from None
        raise
    finally:
        joined.set()


def is_main_process() -> bool:
    """Whether this is process 0, the one that prints, writes metrics, plots and summaries
    (``True`` in a single-process run)."""
    return jax.process_index() == 0
