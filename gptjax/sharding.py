"""Device mesh, data-parallel and FSDP shardings, sharded checkpoints, multi-host start.

The mesh has two axes, `data` x `fsdp`; the batch is split over both (B / n_devices rows per device).
Parameters and optimizer state are replicated ("dp": gradients are all-reduced) or sharded over `fsdp`
("fsdp", ZeRO-3: each array split along its largest dimension divisible by the fsdp axis size; XLA
all-gathers weights where they are used and reduce-scatters gradients). Nothing here communicates by
hand: the engine (gptjax.engine.Steps) jits its steps with these in/out shardings and XLA inserts the
collectives; jax.distributed runs the processes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)  # the batch dimension is split over every device of the mesh
STRATEGIES = ("dp", "fsdp")


def initialize_distributed() -> bool:
    """Join a multi-process run through `jax.distributed.initialize` (call it before anything touches a device);
    True when this is one. JAX_COORDINATOR_ADDRESS ("host:port" of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID give the settings; on SLURM (srun) and Open MPI jax finds them itself, and GPTJAX_DISTRIBUTED=1
    asks it to, as on a Cloud TPU pod slice. With none of these: one process, all local devices."""
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    coordinator_address = env.get("JAX_COORDINATOR_ADDRESS")
    num_processes, process_id = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    slurm = int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in env
    mpi = int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    force = env.get("GPTJAX_DISTRIBUTED", "") not in ("", "0")
    if explicit:
        if None in (coordinator_address, num_processes, process_id):
            raise ValueError(
                f"a multi-process start needs all of coordinator address, process count and process id, got "
                f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
                f"process_id={process_id!r}; set JAX_COORDINATOR_ADDRESS=host:port (process 0's), "
                f"JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process")
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif slurm or mpi or force:
        jax.distributed.initialize()  # SLURM / Open MPI / Cloud TPU: jax reads its own environment
    else:
        return False
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        return None if value is None else int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def make_mesh(strategy: str = "dp", fsdp: int | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: every device of every process). `fsdp` is the size of the
    parameter-sharding axis: 1 for "dp", all devices for "fsdp" unless given (a divisor of the device count
    gives hybrid sharding: FSDP inside a group, replicas across groups)."""
    _check_strategy(strategy)
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    fsdp = (n if strategy == "fsdp" else 1) if fsdp is None else fsdp
    if strategy == "dp" and fsdp != 1:
        raise ValueError(f"strategy 'dp' replicates the parameters, so the fsdp axis must be 1, got fsdp={fsdp}; "
                         f"use strategy 'fsdp' to shard them")
    if not isinstance(fsdp, int) or fsdp < 1 or n % fsdp:
        raise ValueError(f"fsdp={fsdp!r} must be a positive divisor of the {n} devices")
    # Auto axes: XLA propagates shardings (newer jax defaults make_mesh to Explicit, sharding-in-types)
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((n // fsdp, fsdp), (DATA, FSDP), axis_types=auto, devices=devices)


def mesh_for(strategy: str, fsdp: int | None, batch_size: int) -> Mesh | None:
    """The mesh a run over every device uses ("dp" / "fsdp"), checked against its batch; None for "none"."""
    if strategy == "none":
        return None
    mesh = make_mesh(strategy, fsdp=fsdp)
    check_batch(batch_size, mesh)
    return mesh


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sharding strategy {strategy!r}; choose one of {STRATEGIES}")


def fsdp_spec(shape: Sequence[int], n: int) -> P:
    """Split the largest dimension divisible by `n` (the first of equal ones) over `fsdp`; replicate if none."""
    dims = [i for i, d in enumerate(shape) if d >= n and d % n == 0]
    if n == 1 or not dims:
        return P()
    i = max(dims, key=lambda i: shape[i])
    return P(*([None] * i), FSDP)


def tree_shardings(tree: Any, mesh: Mesh, strategy: str) -> Any:
    """NamedSharding per array leaf of `tree` (params, optimizer state: anything shaped like them)."""
    _check_strategy(strategy)
    n = mesh.shape[FSDP] if strategy == "fsdp" else 1
    return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(a.shape, n)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_shardings(abstract: Any, mesh: Mesh, strategy: str) -> Any:
    """Shardings of a TrainState: params and optimizer state by `strategy` (Adam's moments, shaped like the
    params, get their shardings, so the update is local to each shard), step and PRNG key replicated."""
    if strategy == "fsdp" and mesh.shape[FSDP] == 1 and mesh.size > 1:
        raise ValueError("strategy 'fsdp' needs a mesh with an fsdp axis > 1; build it with make_mesh('fsdp')")
    return abstract.replace(step=replicated(mesh), key=replicated(mesh),
                            params=tree_shardings(abstract.params, mesh, strategy),
                            opt_state=tree_shardings(abstract.opt_state, mesh, strategy))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_devices(mesh: Mesh) -> int:
    return mesh.shape[DATA] * mesh.shape[FSDP]


def check_batch(global_batch: int, mesh: Mesh) -> None:
    n = batch_devices(mesh)
    if global_batch % n:
        good = n * max(global_batch // n, 1)
        raise ValueError(
            f"the global batch of {global_batch} rows does not split over the {n} devices of the mesh "
            f"(data={mesh.shape[DATA]} x fsdp={mesh.shape[FSDP]}); use a batch size that is a multiple of {n} "
            f"(e.g. --batch-size {good}) or fewer devices")


def local_rows(global_batch: int, mesh: Mesh) -> slice:
    """Rows of a global batch that this process's devices hold: the slice its data loader must feed."""
    check_batch(global_batch, mesh)
    index = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    starts = sorted({idx[0].start or 0 for idx in index.values()})
    per_device = global_batch // batch_devices(mesh)
    lo, hi = starts[0], starts[-1] + per_device
    if hi - lo != per_device * len(starts):
        raise ValueError(f"this process's devices hold non-contiguous rows {starts} of the batch; build the mesh "
                         f"with make_mesh(), which keeps each process's devices together")
    return slice(lo, hi)


def shard_batch(batch: Any, mesh: Mesh, local: bool = False) -> Any:
    """Global arrays split over the batch axes, from host arrays (B, ...) (a tuple (x, y), any pytree).
    `local=False`: every process passes the same global batch (the book's seeded loaders give that) and keeps
    its own rows; `local=True`: each process passes only its B / n_processes rows (a `local_rows` loader)."""
    sharding = batch_sharding(mesh)

    def put(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return a  # already a global array
        B = a.shape[0] * (jax.process_count() if local else 1)
        check_batch(B, mesh)
        if jax.process_count() == 1:
            return jax.device_put(a, sharding)
        a = np.asarray(a)
        rows = a if local else a[local_rows(B, mesh)]
        return jax.make_array_from_process_local_data(sharding, rows, (B, *a.shape[1:]))

    return jax.tree.map(put, batch)


def bytes_per_device(tree: Any) -> dict[Any, int]:
    """Bytes each local device holds of the arrays in `tree` (what sharding saves, measured on live arrays)."""
    out: dict[Any, int] = {}
    for a in jax.tree_util.tree_leaves(tree):
        for s in a.addressable_shards:
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out


def with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def save_state(path: str | Path, state: Any) -> Path:
    """Write a sharded pytree with Orbax: every process writes its own shards, nothing is gathered.
    All processes must call it (same path, a file system they share)."""
    path = Path(path).absolute()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, state, force=True)
    ckptr.wait_until_finished()
    return path


def restore_state(path: str | Path, target: Any) -> Any:
    """Read a checkpoint into `target`'s shardings (e.g. `engine.Steps.restore_target()` of another mesh);
    each device reads only its own shard, so a state written on 8 devices restores onto 1 or 4."""
    return ocp.StandardCheckpointer().restore(Path(path).absolute(), target)
