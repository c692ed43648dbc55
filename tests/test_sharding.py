"""gptjax.sharding. In process: the FSDP rule, mesh errors, the multi-host environment. In one subprocess with 8
simulated CPU devices (XLA_FLAGS must be set before jax starts): DP and FSDP against one device, the live
shardings, sharded init, the batch-size error, checkpoints across meshes. Slow: two processes on loopback.

Run as a script, this file is the subprocess: `python tests/test_sharding.py mesh|process ...`.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS, SEED, B, T = 20, 7, 8, 16
TINY = dict(vocab_size=97, context_length=T, emb_dim=32, n_heads=4, n_layers=2)


# ------------------------------------------------------------------------------------------ in process

def test_fsdp_spec_splits_the_largest_divisible_dimension():
    from jax.sharding import PartitionSpec as P

    from gptjax.sharding import fsdp_spec

    assert fsdp_spec((32, 96), 8) == P(None, "fsdp")
    assert fsdp_spec((97, 32), 8) == P(None, "fsdp")  # 97 rows do not divide: the next largest dimension
    assert fsdp_spec((128, 128), 8) == P("fsdp")       # ties: the first
    assert fsdp_spec((97,), 8) == P() and fsdp_spec((), 8) == P() and fsdp_spec((2,), 8) == P()
    assert fsdp_spec((32, 96), 1) == P()


def test_mesh_and_strategy_errors():
    from gptjax.sharding import make_mesh

    with pytest.raises(ValueError, match="unknown sharding strategy 'zero'"):
        make_mesh("zero")
    with pytest.raises(ValueError, match="fsdp axis must be 1"):
        make_mesh("dp", fsdp=2)
    with pytest.raises(ValueError, match="divisor of the 1 devices"):
        make_mesh("fsdp", fsdp=2)
    mesh = make_mesh("fsdp")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}


def test_launch_check_on_one_process(capsys):
    from gptjax.launch import main

    main(["--strategy", "dp", "--steps", "2"])
    out = capsys.readouterr().out
    assert "process 0 of 1 (single process)" in out and "all-reduce ok (1)" in out and "dp losses [" in out


def test_initialize_distributed_reads_the_environment(monkeypatch):
    from gptjax.sharding import initialize_distributed

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
                 "OMPI_COMM_WORLD_SIZE", "GPTJAX_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    assert initialize_distributed() is False  # a plain single process: nothing to join
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
        initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer"):
        initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    assert initialize_distributed() is False


# ------------------------------------------------------------------------------------------ subprocesses

def _run(args: list[str], devices: int, timeout: int, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           **(env or {})}
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, timeout: int) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"subprocess timed out after {timeout} s:\n{err[-3000:]}")
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{err[-5000:]}"
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_dp_and_fsdp_on_8_devices_match_one_device_and_checkpoints_change_mesh(tmp_path):
    r = _result(_run(["mesh", str(tmp_path)], devices=8, timeout=600), timeout=600)
    assert r["devices"] == 8
    for strategy in ("dp", "fsdp"):
        s = r[strategy]
        # 20 training steps (dropout on) give one device's losses; so does the eval step
        assert s["losses"] == pytest.approx(r["ref_losses"], rel=1e-4, abs=1e-5), strategy
        assert s["eval"] == pytest.approx(r["ref_eval"], rel=1e-5)
        # dp draws every weight whole, as create_state does: the same bits. fsdp draws each device's shard from the
        # same random bits, but XLA:CPU (jax 0.12) fuses the multiply-adds of erf_inv's polynomial (inside
        # jax.random.normal) into FMAs for whole rows and not for a shard's short ones (wte/wpe: 4 of 32 columns):
        # at most 3 ulp apart after * sqrt(2) and * std (3.2M normals drawn both ways; 2 here). jax 0.10: equal.
        assert s["init_max_ulp"] <= (0 if strategy == "dp" else 3), f"{strategy}: sharded init differs from create_state"
        assert s["batch_shards"] == [[B // 8, T]] * 8  # each device holds one row of the batch
    # dp: whole weights everywhere; fsdp: each device an eighth (the split dimension differs by weight)
    assert r["dp"]["shards"]["h_0/attn/c_attn/kernel"] == {"spec": [], "shape": [32, 96]}
    assert r["fsdp"]["shards"]["h_0/attn/c_attn/kernel"] == {"spec": [None, "fsdp"], "shape": [32, 12]}
    assert r["fsdp"]["shards"]["wte/embedding"] == {"spec": [None, "fsdp"], "shape": [97, 4]}
    assert r["fsdp"]["shards"]["lm_head/kernel"] == {"spec": ["fsdp"], "shape": [4, 97]}
    full = r["dp"]["state_bytes_per_device"]
    assert r["fsdp"]["state_bytes_per_device"] < full / 7  # params + Adam moments; step and key stay whole
    # the sharded init (params and Adam moments) never holds even the whole params on one device
    # (compiled peak per device = outputs + temporaries)
    assert r["fsdp"]["init_peak_bytes"] < r["param_bytes"] < r["dp"]["init_peak_bytes"] / 4
    assert "does not split over the 8 devices" in r["indivisible"] and "multiple of 8" in r["indivisible"]
    # FSDP on 8 -> 1 device, and 1 device -> FSDP on 4: same values, training goes on with the same losses
    assert r["restore_8_to_1"]["equal"] and r["restore_8_to_1"]["devices"] == 1
    assert r["restore_1_to_4"]["equal"] and r["restore_1_to_4"]["devices"] == 4
    assert r["restore_1_to_4"]["shard"] == [32, 24]
    for key in ("restore_8_to_1", "restore_1_to_4"):
        assert r[key]["next_losses"] == pytest.approx(r[key]["expected_losses"], rel=1e-5), key


@pytest.mark.slow
def test_two_processes_on_loopback_train_fsdp_and_save_a_checkpoint(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2"}
    procs = [_run(["process", str(tmp_path)], devices=2, timeout=600, env={**env, "JAX_PROCESS_ID": str(i)})
             for i in range(2)]
    r0, r1 = (_result(p, timeout=600) for p in procs)
    for r in (r0, r1):
        assert (r["process_count"], r["device_count"], r["local_devices"]) == (2, 4, 2)
        assert r["psum"] == 36.0 and r["all_gather"] == list(range(1, 9))
        assert r["losses"] == pytest.approx(r["ref_losses"], rel=1e-4, abs=1e-5)
    assert (r0["rows"], r1["rows"]) == ([0, 4], [4, 8])  # each process fed only its half of the batch
    # this (single-process, one-device) pytest reads the checkpoint the two processes wrote
    from gptjax.config import GPTConfig
    from gptjax.optim import OptimConfig
    from gptjax.sharding import make_mesh, restore_state
    from gptjax.tasks.pretrain import make_steps

    cfg = GPTConfig(**TINY, drop_rate=0.0)
    steps = make_steps(cfg, OptimConfig(lr=1e-3), make_mesh("dp"))
    state = restore_state(tmp_path / "ckpt", steps.restore_target())
    assert int(state.step) == 5
    assert float(steps.eval_step(state.params, _batch(0))["loss"]) == pytest.approx(r0["eval"], rel=1e-5)


# ------------------------------------------------------------------------------------------ workers

def _batch(i: int):
    import numpy as np

    ids_BT = np.random.default_rng(i).integers(0, TINY["vocab_size"], (B, T + 1)).astype(np.int32)
    return ids_BT[:, :-1], ids_BT[:, 1:]


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _equal(a, b) -> bool:
    import jax
    import numpy as np

    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _max_ulp(a, b) -> int:
    """Largest distance between the float32 leaves of two trees, in units in the last place."""
    import jax
    import numpy as np

    def ordered(x):  # float32 bits as integers that count up through the floats
        i = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)

    return max(int(np.abs(ordered(x) - ordered(y)).max(initial=0)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _train(step_fn, state, batches):
    losses = []
    for batch in batches:
        state, m = step_fn(state, batch)
        losses.append(float(m["loss"]))
    return state, losses


def worker_mesh(tmp: Path) -> dict:
    """8 devices: one-device reference, then DP and FSDP, then checkpoints across meshes."""
    import jax
    import numpy as np

    from gptjax import sharding as sh
    from gptjax.config import GPTConfig
    from gptjax.model import count_params, init_params
    from gptjax.optim import OptimConfig, make_optimizer
    from gptjax.tasks.pretrain import create_state, init_state, jitted_steps as make_steps, make_steps as sharded

    cfg = GPTConfig(**TINY, drop_rate=0.1)  # dropout too: its masks must not depend on the sharding
    ocfg = OptimConfig(lr=1e-3)
    tx = make_optimizer(ocfg)
    batches = [_batch(i) for i in range(STEPS)]
    ref_step, ref_eval = make_steps(cfg, tx)
    init = create_state(cfg, tx, SEED)
    ref, ref_losses = _train(ref_step, create_state(cfg, tx, SEED), batches)
    out = {"devices": jax.device_count(), "ref_losses": ref_losses, "ref_eval": float(ref_eval(ref.params, batches[0])),
           "param_bytes": 4 * count_params(init.params)}
    states = {}
    for strategy in ("dp", "fsdp"):
        steps = sharded(cfg, ocfg, sh.make_mesh(strategy), strategy)
        init_key, key = jax.random.split(jax.random.PRNGKey(SEED))
        mem = steps.sharded_init(lambda: init_params(cfg, init_key)).lower(key).compile().memory_analysis()
        state = init_state(steps, cfg, SEED)
        r = {"init_max_ulp": _max_ulp(state.params, init.params),
             "init_peak_bytes": mem.output_size_in_bytes + mem.temp_size_in_bytes,
             "state_bytes_per_device": max(sh.bytes_per_device(state).values()),
             "shards": {_path_str(p): {"spec": list(a.sharding.spec), "shape": list(a.addressable_shards[0].data.shape)}
                        for p, a in jax.tree_util.tree_flatten_with_path(state.params)[0]},
             "batch_shards": [list(s.data.shape) for s in sh.shard_batch(batches[0], steps.mesh)[0].addressable_shards]}
        state, r["losses"] = _train(steps.train_step, state, batches)
        r["eval"] = float(steps.eval_step(state.params, batches[0])["loss"])
        out[strategy], states[strategy] = r, (steps, state)
    steps8, state8 = states["fsdp"]
    try:
        steps8.train_step(state8, (batches[0][0][:6], batches[0][1][:6]))
        out["indivisible"] = "no error"
    except ValueError as e:
        out["indivisible"] = str(e)

    # FSDP on 8 devices -> one device
    sh.save_state(tmp / "fsdp8", state8)
    steps1 = sharded(cfg, ocfg, sh.make_mesh("dp", devices=jax.devices()[:1]))
    state1 = sh.restore_state(tmp / "fsdp8", steps1.restore_target())
    r = {"equal": _equal(state1, state8), "devices": len(state1.params["wte"]["embedding"].sharding.device_set)}
    _, r["next_losses"] = _train(steps1.train_step, state1, batches[:2])
    _, r["expected_losses"] = _train(steps8.train_step, state8, batches[:2])
    out["restore_8_to_1"] = r

    # one device (plain create_state / make_steps) -> FSDP on 4 devices
    sh.save_state(tmp / "single", ref)
    steps4 = sharded(cfg, ocfg, sh.make_mesh("fsdp", devices=jax.devices()[:4]), "fsdp")
    state4 = sh.restore_state(tmp / "single", steps4.restore_target())
    kernel = state4.params["h_0"]["attn"]["c_attn"]["kernel"]
    r = {"equal": _equal(state4, ref), "devices": len(kernel.sharding.device_set),
         "shard": list(kernel.addressable_shards[0].data.shape)}
    _, r["next_losses"] = _train(steps4.train_step, state4, batches[:2])
    _, r["expected_losses"] = _train(ref_step, ref, batches[:2])
    out["restore_1_to_4"] = r
    assert np.isfinite(out["ref_losses"]).all()
    return out


def worker_process(tmp: Path) -> dict:
    """One of two processes (2 CPU devices each): join, collectives, FSDP over 4 devices, a shared checkpoint."""
    from gptjax import sharding as sh

    assert sh.initialize_distributed(), "the JAX_* environment did not start a multi-process run"
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from gptjax.config import GPTConfig
    from gptjax.optim import OptimConfig, make_optimizer
    from gptjax.tasks.pretrain import create_state, init_state, jitted_steps as make_steps, make_steps as sharded

    mesh = sh.make_mesh("fsdp")
    replicated = NamedSharding(mesh, P())
    x = sh.shard_batch(np.arange(1, 9, dtype=np.float32).reshape(8, 1), mesh)
    total = jax.jit(jnp.sum, out_shardings=replicated)(x)
    gathered = jax.jit(lambda a: a, out_shardings=replicated)(x)
    rows = sh.local_rows(B, mesh)
    out = {"process_count": jax.process_count(), "device_count": jax.device_count(),
           "local_devices": jax.local_device_count(), "psum": float(total.addressable_data(0)),
           "all_gather": np.asarray(gathered.addressable_data(0)).ravel().astype(int).tolist(),
           "rows": [rows.start, rows.stop]}

    cfg = GPTConfig(**TINY, drop_rate=0.0)
    ocfg = OptimConfig(lr=1e-3)
    tx = make_optimizer(ocfg)
    batches = [_batch(i) for i in range(5)]
    ref_step, _ = make_steps(cfg, tx)  # the same model on this process's first device alone
    _, out["ref_losses"] = _train(ref_step, jax.device_put(create_state(cfg, tx, SEED), jax.local_devices()[0]),
                                  batches)
    steps = sharded(cfg, ocfg, mesh, "fsdp")
    # each process passes only its own rows, as a loader reading local_rows of the data would
    local = [tuple(a[rows] for a in b) for b in batches]
    state, out["losses"] = _train(lambda s, b: steps.train_jit(s, steps.frozen, sh.shard_batch(b, mesh, local=True)),
                                  init_state(steps, cfg, SEED), local)
    out["eval"] = float(steps.eval_step(state.params, batches[0])["loss"])
    sh.save_state(tmp / "ckpt", state)  # every process writes its own shards
    return out


if __name__ == "__main__":
    mode, tmp = sys.argv[1], Path(sys.argv[2])
    result = {"mesh": worker_mesh, "process": worker_process}[mode](tmp)
    print(json.dumps(result))


@pytest.mark.slow
def test_pretrain_cli_with_fsdp_matches_one_device(tmp_path):
    """`gptjax pretrain --sharding fsdp` on 4 simulated devices gives one device's losses and a loadable run."""
    import numpy as np

    corpus = tmp_path / "c.txt"
    corpus.write_text("It had always been his fate to have women say such things of him. " * 30)
    tiny = ["--emb-dim", "32", "--n-layers", "2", "--n-heads", "4", "--context-length", "16", "--batch-size", "4",
            "--eval-freq", "2", "--eval-iter", "1", "--epochs", "1", "--quiet", "--corpus", str(corpus)]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "GPTJAX_CACHE_DIR": ""}
    losses = {}
    for mode in ("none", "fsdp"):
        out = tmp_path / mode
        r = subprocess.run([sys.executable, "-m", "gptjax.cli", "pretrain", *tiny, "--out", str(out),
                            "--sharding", mode], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        losses[mode] = [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["none"]) >= 3
    np.testing.assert_allclose(losses["fsdp"], losses["none"], rtol=1e-5)
