"""Orbax checkpoints: trained params of a run directory (and its configs)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from gptjax.config import GPTConfig
from gptjax.model import abstract_params

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_run(run_dir: str | Path, params: Any, cfg: GPTConfig, extra: dict | None = None) -> Path:
    """Write `run_dir/params` (Orbax) and `run_dir/config.json` (model config + `extra`)."""
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(run_dir / PARAMS_DIR, params, force=True)
    ckptr.wait_until_finished()
    (run_dir / CONFIG_FILE).write_text(json.dumps({"model": cfg.to_dict(), **(extra or {})}, indent=1))
    return run_dir


def load_run_config(run_dir: str | Path) -> tuple[GPTConfig, dict]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a gptjax run directory (no {CONFIG_FILE}); "
                                f"pass the --out directory of a finished `gptjax pretrain` run")
    meta = json.loads(path.read_text())
    return GPTConfig.from_dict(meta["model"]), meta


def load_run(run_dir: str | Path, dtype: str | None = None) -> tuple[Any, GPTConfig]:
    """Params for inference from a run directory; `dtype` casts them (e.g. "bfloat16")."""
    cfg, _ = load_run_config(run_dir)
    params_dir = Path(run_dir).absolute() / PARAMS_DIR
    if not params_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} has no {PARAMS_DIR}/ (the run did not finish?)")
    target = abstract_params(cfg)
    params = ocp.StandardCheckpointer().restore(params_dir, target)
    if dtype is not None:
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.dtype(dtype)), params)
    return params, cfg


def load_model(spec: str | Path, dtype: str | None = None) -> tuple[Any, GPTConfig]:
    """Any model a command accepts: a run directory, a GPT-2 size (downloaded), or a GPT-2 safetensors path."""
    path = Path(spec)
    if path.is_dir() and (path / CONFIG_FILE).is_file() and '"model"' in (path / CONFIG_FILE).read_text():
        return load_run(path, dtype=dtype)
    from gptjax.gpt2_weights import load_gpt2

    return load_gpt2(str(spec), dtype=dtype or "float32")
