"""`python -m gptjax.launch`: check a (multi-host) launch before a long run: join, mesh, one all-reduce,
a few sharded training steps of a small GPT on the engine."""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import sharding as sh
from gptjax.config import GPTConfig
from gptjax.optim import OptimConfig
from gptjax.tasks.pretrain import init_state, make_steps


def main(argv: list[str] | None = None) -> None:
    """`python -m gptjax.launch`: check a launch on every process: join, mesh, one all-reduce, a few steps."""
    p = argparse.ArgumentParser(prog="python -m gptjax.launch", description=main.__doc__.split(": ", 1)[1])
    p.add_argument("--strategy", default="fsdp", choices=sh.STRATEGIES)
    p.add_argument("--fsdp", type=int, help="size of the fsdp axis (default: all devices for fsdp, 1 for dp)")
    p.add_argument("--steps", type=int, default=3, help="training steps of a small GPT")
    p.add_argument("--rows-per-device", type=int, default=2, help="batch rows per device")
    args = p.parse_args(argv)
    joined = sh.initialize_distributed()
    mesh = sh.make_mesh(args.strategy, args.fsdp)
    n = sh.batch_devices(mesh)
    ones = sh.shard_batch(np.ones((n,), np.float32), mesh)
    total = float(jax.jit(jnp.sum, out_shardings=sh.replicated(mesh))(ones).addressable_data(0))
    assert total == n, f"an all-reduce over {n} devices gave {total}: the processes do not see each other's data"

    cfg = GPTConfig(vocab_size=256, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)
    steps = make_steps(cfg, OptimConfig(lr=1e-3), mesh, args.strategy)
    ids_BT = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.rows_per_device * n, cfg.context_length + 1))
    state, losses = init_state(steps, cfg, 0), []
    for _ in range(args.steps):
        state, m = steps.train_step(state, (ids_BT[:, :-1], ids_BT[:, 1:]))
        losses.append(round(float(m["loss"]), 4))
    kb = max(sh.bytes_per_device(state).values()) / 1024
    print(f"process {jax.process_index()} of {jax.process_count()} ({'joined' if joined else 'single process'}): "
          f"{jax.local_device_count()} local of {jax.device_count()} {jax.devices()[0].platform} devices; mesh "
          f"{dict(mesh.shape)}; all-reduce ok ({total:g}); {args.strategy} losses {losses}; state {kb:.0f} KiB on "
          f"its busiest device", flush=True)


if __name__ == "__main__":
    main()
