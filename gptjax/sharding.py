"""Device mesh, data-parallel and FSDP shardings, sharded train steps and checkpoints, multi-host start.

The mesh has two axes, `data` x `fsdp`. The batch is split over both (each device gets B / n_devices
rows). Parameters and optimizer state are either replicated ("dp": every device holds the whole state,
gradients are all-reduced) or sharded over `fsdp` ("fsdp", ZeRO-3: each array split along its largest
dimension divisible by the fsdp axis size; XLA all-gathers weights where they are used and
reduce-scatters gradients). `make_mesh("dp")` is n x 1, `make_mesh("fsdp")` is 1 x n, and
`make_mesh("fsdp", fsdp=8)` on 32 devices is hybrid: FSDP inside groups of 8, data parallel across them.

Nothing here communicates by hand: jit with explicit in/out shardings lets XLA insert the collectives,
and jax.distributed runs the processes. Letters: B batch, T time.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax.config import GPTConfig
from gptjax.options import Options
from gptjax.train import TrainState, create_state, step_functions

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)  # the batch dimension is split over every device of the mesh
STRATEGIES = ("dp", "fsdp")


# ---------------------------------------------------------------------------------------- multi-host

def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, force: bool = False) -> bool:
    """Join a multi-process run through `jax.distributed.initialize`; True when this is one.

    Call it first, before anything touches a device. The settings come from the arguments, else from
    JAX_COORDINATOR_ADDRESS ("host:port" of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID; on SLURM
    (srun, one task per GPU or host) and Open MPI jax finds them itself, and `force` (or GPTJAX_DISTRIBUTED=1)
    asks it to, as on a Cloud TPU pod slice. With none of these it does nothing: one process, all local devices.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    slurm = int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in env
    mpi = int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    force = force or env.get("GPTJAX_DISTRIBUTED", "") not in ("", "0")
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
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


# ------------------------------------------------------------------------------------ mesh, shardings

def make_mesh(strategy: str = "dp", fsdp: int | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: every device of every process).

    `fsdp` is the size of the parameter-sharding axis: 1 for "dp", all devices for "fsdp" unless given
    (a divisor of the device count gives hybrid sharding: FSDP inside a group, replicas across groups).
    """
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


def state_shardings(abstract: TrainState, mesh: Mesh, strategy: str) -> TrainState:
    """Shardings of a TrainState: params and optimizer state by `strategy`, step and PRNG key replicated.

    Adam's moments have the params' shapes, so the shape rule gives them the params' shardings and the
    update is local to each shard.
    """
    replicated = NamedSharding(mesh, P())
    return TrainState(step=replicated, key=replicated, params=tree_shardings(abstract.params, mesh, strategy),
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

    `local=False`: every process passes the same global batch (the book's loaders, seeded, give that) and
    keeps its own rows; `local=True`: each process passes only its rows (B / n_processes of them), as a
    loader that reads just `local_rows` of the data does.
    """
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


# ----------------------------------------------------------------------------------- sharded steps

class ShardedSteps:
    """Jitted train/eval steps with explicit in/out shardings on `mesh`, and the state to feed them.

    `train_step(state, (x_BT, y_BT)) -> (state, metrics)` and `eval_step(params, (x_BT, y_BT)) -> loss`
    take host batches (the global batch, see `shard_batch`) or global arrays; the math is `make_steps`'s.
    """

    def __init__(self, cfg: GPTConfig, tx: optax.GradientTransformation, mesh: Mesh, strategy: str = "dp",
                 schedule: optax.Schedule | None = None, opts: Options | None = None):
        _check_strategy(strategy)
        if strategy == "fsdp" and mesh.shape[FSDP] == 1 and mesh.size > 1:
            raise ValueError("strategy 'fsdp' needs a mesh with an fsdp axis > 1; build it with make_mesh('fsdp')")
        self.cfg, self.tx, self.mesh, self.strategy, self.opts = cfg, tx, mesh, strategy, opts
        self.abstract = jax.eval_shape(lambda: create_state(cfg, tx, 0, opts=opts))  # shapes only, nothing allocated
        self.state_sharding = state_shardings(self.abstract, mesh, strategy)
        self.batch_sharding = batch_sharding(mesh)
        replicated = NamedSharding(mesh, P())
        params_sharding = self.state_sharding.params
        # under FSDP the constraint makes the gradient reduction a reduce-scatter into each device's shard
        train_step, eval_step = step_functions(
            cfg, tx, schedule, constrain_grads=lambda g: jax.lax.with_sharding_constraint(g, params_sharding),
            opts=opts)

        batch_in = (self.batch_sharding, self.batch_sharding)
        self.train_step_jit = jax.jit(train_step, in_shardings=(self.state_sharding, batch_in),
                                      out_shardings=(self.state_sharding, replicated), donate_argnums=0)
        self.eval_step_jit = jax.jit(eval_step, in_shardings=(params_sharding, batch_in), out_shardings=replicated)
        # out_shardings partition the init itself: each device draws only its own shard of every weight
        self.init_jit = jax.jit(lambda seed: create_state(cfg, tx, seed, opts=opts), out_shardings=self.state_sharding)

    def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        return self.train_step_jit(state, shard_batch(tuple(batch), self.mesh))

    def eval_step(self, params: Any, batch) -> jax.Array:
        return self.eval_step_jit(params, shard_batch(tuple(batch), self.mesh))

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs carrying this mesh's shardings: the restore target of a checkpoint."""
        return with_shardings(self.abstract, self.state_sharding)

    def init_state(self, seed: int, params: Any = None) -> TrainState:
        """`create_state(cfg, tx, seed, params)` made directly in shards: no device ever holds the whole model.

        `params` (e.g. loaded GPT-2 weights, host or device arrays) are placed shard by shard.
        """
        if params is None:
            return self.init_jit(seed)
        params = jax.device_put(params, self.state_sharding.params)
        return jax.jit(lambda p: create_state(self.cfg, self.tx, seed, p, opts=self.opts),
                       out_shardings=self.state_sharding,
                       donate_argnums=0)(params)


def make_sharded_steps(cfg: GPTConfig, tx: optax.GradientTransformation, mesh: Mesh, strategy: str = "dp",
                       schedule: optax.Schedule | None = None, opts: Options | None = None) -> ShardedSteps:
    """Sharded `make_steps`: steps, state init and checkpoint targets for `mesh` and "dp" or "fsdp"."""
    return ShardedSteps(cfg, tx, mesh, strategy, schedule, opts)


# ------------------------------------------------------------------------------------- checkpoints

def save_state(path: str | Path, state: Any) -> Path:
    """Write a sharded pytree with Orbax: every process writes its own shards, nothing is gathered.

    All processes must call it (same path, a file system they share).
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, state, force=True)
    ckptr.wait_until_finished()
    return path


def restore_state(path: str | Path, target: Any) -> Any:
    """Read a checkpoint into `target`'s shardings (e.g. `ShardedSteps.abstract_state()` of another mesh).

    Each device reads only its own shard, so a state written on 8 devices restores onto 1 or 4.
    """
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(Path(path).absolute(), target)


# ------------------------------------------------------------------------------------- launch check

def main(argv: list[str] | None = None) -> None:
    """`python -m gptjax.sharding`: check a launch on every process: join, mesh, one all-reduce, a few steps."""
    p = argparse.ArgumentParser(prog="python -m gptjax.sharding", description=main.__doc__.split(": ", 1)[1])
    p.add_argument("--strategy", default="fsdp", choices=STRATEGIES)
    p.add_argument("--fsdp", type=int, help="size of the fsdp axis (default: all devices for fsdp, 1 for dp)")
    p.add_argument("--steps", type=int, default=3, help="training steps of a small GPT")
    p.add_argument("--rows-per-device", type=int, default=2, help="batch rows per device")
    args = p.parse_args(argv)
    joined = initialize_distributed()
    mesh = make_mesh(args.strategy, args.fsdp)
    n = batch_devices(mesh)
    ones = shard_batch(np.ones((n,), np.float32), mesh)
    total = float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(ones).addressable_data(0))
    assert total == n, f"an all-reduce over {n} devices gave {total}: the processes do not see each other's data"

    from gptjax.train import OptimConfig, make_optimizer

    cfg = GPTConfig(vocab_size=256, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)
    steps = make_sharded_steps(cfg, make_optimizer(OptimConfig(lr=1e-3)), mesh, args.strategy)
    ids_BT = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.rows_per_device * n, cfg.context_length + 1))
    state, losses = steps.init_state(0), []
    for _ in range(args.steps):
        state, m = steps.train_step(state, (ids_BT[:, :-1], ids_BT[:, 1:]))
        losses.append(round(float(m["loss"]), 4))
    kb = max(bytes_per_device(state).values()) / 1024
    print(f"process {jax.process_index()} of {jax.process_count()} ({'joined' if joined else 'single process'}): "
          f"{jax.local_device_count()} local of {jax.device_count()} {jax.devices()[0].platform} devices; mesh "
          f"{dict(mesh.shape)}; all-reduce ok ({total:g}); {args.strategy} losses {losses}; state {kb:.0f} KiB on "
          f"its busiest device", flush=True)


if __name__ == "__main__":
    main()
