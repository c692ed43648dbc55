"""Models in and out of run directories: a run's start (begin_run, refuse_existing_run), its finished params
(save_run / load_run, canonical layout) and config, and `load_model` for anything a command accepts (a run,
a GPT-2 size or hub id, local weights), or a fine-tuning base (`load_base_model`, 'random' too)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gptjax import runs
from gptjax.checkpoint import (CHECKPOINTS_DIR, CONFIG_FILE, PARAMS_DIR, SHAPE_KEYS, CheckpointCorruptError,
                               RunExistsError, TrainCheckpoints, numpy_written_in_place, short_error)
from gptjax.config import GPTConfig
from gptjax.gpt2_weights import load_gpt2
from gptjax.layout import to_canonical
from gptjax.model import abstract_params, init_params
from gptjax.options import LEGACY_KEYS, Options
from gptjax.sharding import restore_state, save_state


def begin_run(out_dir: str | Path, header: dict, *, resume: bool | int) -> Path:
    """A starting run's directory: created and checked writable; unless resuming, its config.json
    (`header` plus "status": "running", which `save_run` turns into "finished"). A resume first checks
    that the data and base model `header` records are those the run started with."""
    if resume:
        runs.check_resume_inputs(out_dir, header)
    out_dir = runs.prepare_out_dir(out_dir)
    if resume:
        runs.set_status(out_dir, "running", resumed=True)
    else:
        runs.write_json_atomic(out_dir / CONFIG_FILE, {**header, "status": "running"})
    return out_dir


def save_run(run_dir: str | Path, params: Any, cfg: GPTConfig, extra: dict | None = None) -> Path:
    """Write `run_dir/params` (Orbax; canonical layout: `layout.to_canonical` converts) and `run_dir/config.json`
    (model config + `extra`, e.g. the Options the run trained with under "options", for information only)."""
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    with numpy_written_in_place():  # numpy views (of a training state) are written as they are: no copy
        save_state(run_dir / PARAMS_DIR, params)
    runs.write_json_atomic(run_dir / CONFIG_FILE, {"model": cfg.to_dict(), **(extra or {})})
    return run_dir


def _saved_layout(meta: dict) -> Options:
    """The layout params were saved in: canonical, except in runs of gptjax versions whose GPTConfig
    held the execution keys (their params kept the training layout, e.g. linear_layout "out_in")."""
    model = meta.get("model") or {}
    return Options(**{k: model[k] for k in LEGACY_KEYS if k in model})


def _canonical(params: Any, cfg: GPTConfig, saved_as: Options, dtype: str | None) -> Any:
    """Params saved in the layout `saved_as`, in the canonical layout and cast to `dtype` (if given)."""
    params = to_canonical(params, cfg, saved_as)
    return params if dtype is None else jax.tree_util.tree_map(lambda a: a.astype(jnp.dtype(dtype)), params)


def load_run_config(run_dir: str | Path) -> tuple[GPTConfig, dict]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a gptjax run directory (no {CONFIG_FILE}); "
                                f"pass the --out directory of a `gptjax pretrain` run")
    meta = runs.read_json_object(path, 'it should hold the run\'s settings, the model\'s under "model"')
    try:
        return GPTConfig.from_dict(meta["model"]), meta
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointCorruptError(f"{path} is damaged ({short_error(e)}); it should hold the run's model settings "
                                     f"under \"model\"") from None


def load_run(run_dir: str | Path, dtype: str | None = None, step: int | str | None = None) -> tuple[Any, GPTConfig]:
    """Canonical params for inference (also from older runs saved in their training layout), cast to `dtype`
    if given: the final `params/`, or a training checkpoint when `step` is given (an int, "latest" or "best")
    or the run has no `params/` (then its latest)."""
    cfg, meta = load_run_config(run_dir)
    run_dir = Path(run_dir).absolute()
    params_dir = run_dir / PARAMS_DIR
    if step is None and params_dir.is_dir():
        saved_as = _saved_layout(meta)
        try:
            params = restore_state(params_dir, abstract_params(cfg, saved_as))
        except Exception as e:
            raise CheckpointCorruptError(f"{params_dir} is damaged or was written for another model "
                                         f"({short_error(e)}); its {CONFIG_FILE} says {cfg}") from None
        return _canonical(params, cfg, saved_as, dtype), cfg
    if (run_dir / CHECKPOINTS_DIR).is_dir():
        return restore_params(run_dir / CHECKPOINTS_DIR, cfg, step=step, dtype=dtype), cfg
    raise FileNotFoundError(f"run directory {str(run_dir)!r} has neither {PARAMS_DIR}/ nor {CHECKPOINTS_DIR}/ "
                            f"(the run stopped before its first checkpoint?)")


def restore_params(checkpoint_dir: str | Path, cfg: GPTConfig, step: int | str | None = None,
                   dtype: str | None = None) -> Any:
    """Canonical params of a training checkpoint for `cfg`; a checkpoint of another model is an error."""
    ckpts = TrainCheckpoints(checkpoint_dir, read_only=True)
    try:
        saved_as = _saved_layout(ckpts.meta(step))
        params, _, _ = ckpts.restore(abstract_params(cfg, saved_as), step=step,
                                     expect={"model": {k: cfg.to_dict()[k] for k in SHAPE_KEYS}})
    finally:
        ckpts.close()
    return _canonical(params, cfg, saved_as, dtype)


class Model(NamedTuple):
    """Canonical params and the architecture they are for; unpacks as `params, cfg = model`."""
    params: Any
    config: GPTConfig


def load_model(spec: str | Path, dtype: str | None = None) -> Model:
    """Any model a command accepts: a run directory, a GPT-2 size (downloaded), or a GPT-2 safetensors path."""
    path = Path(spec)
    if path.is_dir() and (path / CONFIG_FILE).is_file() and "model" in runs.read_json_object(
            path / CONFIG_FILE, "a gptjax run's config.json holds its settings: restore it; in a Hugging Face "
                                "GPT-2 directory it may be deleted (sizes are then read from model.safetensors)"):
        return Model(*load_run(path, dtype=dtype))
    return Model(*load_gpt2(str(spec), dtype=dtype or "float32"))


def load_base_model(spec: str, *, random_cfg: GPTConfig | None = None, seed: int = 123,
                    language_model: bool = False) -> tuple[Any, GPTConfig]:
    """A fine-tuning base: 'random' (a fresh GPT of `random_cfg`) or anything `load_model` accepts;
    `language_model=True` refuses a classifier run (instruction tuning needs the LM head)."""
    if spec == "random":
        if random_cfg is None:
            raise ValueError("--model random needs a model config (--preset and the size options)")
        cfg = random_cfg.replace(n_classes=0)
        return init_params(cfg, jax.random.PRNGKey(seed)), cfg
    params, cfg = load_model(spec)
    if language_model and cfg.n_classes:
        raise ValueError(f"{spec!r} is a {cfg.n_classes}-class classifier; instruction tuning needs a language "
                         f"model (a GPT-2 size, a pretrain or finetune-instruct run)")
    return params, cfg


def refuse_existing_run(out_dir: str | Path, *, overwrite: bool, resume_hint: str) -> None:
    """Before a fresh run writes anything: an `out_dir` holding another run's checkpoints is continued
    (`resume_hint` says how) or replaced (--overwrite), never silently wiped."""
    runs.check_not_running(out_dir)  # a live run's directory is neither continued nor replaced
    ckpt_dir = Path(out_dir) / CHECKPOINTS_DIR
    if overwrite or not ckpt_dir.is_dir():
        return
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if steps:
        raise RunExistsError(f"{str(out_dir)!r} already holds a run (checkpoint after {steps[-1]} steps); continue it "
                             f"with {resume_hint}, start over with --overwrite, or choose another --out")
