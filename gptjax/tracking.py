"""Experiment trackers beside a run's JSONL logs: TensorBoard (tensorboardX) or Weights & Biases, behind one
interface, `make_writer(kind, out_dir, config) -> Writer` with `log(step, metrics)` and `close()`.

The packages are optional (`pip install 'gptjax[tracking]'`) and imported only when a tracker is chosen.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import netrc
import os
from pathlib import Path
from typing import Any, Protocol

TRACKERS = ("none", "tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb"}
TENSORBOARD_DIR = "tensorboard"  # under the run directory


class Writer(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    # the step is the x-axis, the epoch a count the step already implies
    return {k: float(v) for k, v in metrics.items()
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def require(kind: str) -> None:
    """Check, without importing it, that the tracker `kind` can run: one clear error naming what to install."""
    if kind not in TRACKERS:
        raise ValueError(f"unknown tracker {kind!r}; choose one of {TRACKERS}")
    package = _PACKAGES.get(kind)
    if package and importlib.util.find_spec(package) is None:
        raise ImportError(f"--tracker {kind} needs the {package} package: pip install 'gptjax[tracking]' (or pip "
                          f"install {package})")


class NullWriter:
    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardWriter:
    """Scalars into out_dir/tensorboard (`tensorboard --logdir RUN`). `start_step`: a resumed run's first step;
    TensorBoard drops what the run logged from there on before it was stopped."""

    def __init__(self, out_dir: Path, config: dict, start_step: int = 0):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR), purge_step=start_step or None, flush_secs=10)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", start_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for k, v in _scalars(metrics).items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str:
    """$WANDB_MODE, else online when an API key is set up ($WANDB_API_KEY or `wandb login`'s ~/.netrc), else
    offline (no account needed; `wandb sync` uploads it later)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class WandbWriter:
    """A W&B run (project $WANDB_PROJECT or gptjax, named after the run directory) with the run's settings as
    its config; its files go to out_dir/wandb. A resumed run is a new W&B run from its checkpoint's step."""

    def __init__(self, out_dir: Path, config: dict):
        wandb = importlib.import_module("wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gptjax"), name=out_dir.resolve().name,
                              dir=str(out_dir), config=config, mode=wandb_mode())

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(_scalars(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def make_writer(kind: str, out_dir: str | Path, config: dict, *, start_step: int = 0) -> Writer:
    """The tracker `kind` ("none", "tensorboard", "wandb") for the run in `out_dir`, described by `config`."""
    require(kind)
    if kind == "tensorboard":
        return TensorBoardWriter(Path(out_dir), config, start_step)
    return WandbWriter(Path(out_dir), config) if kind == "wandb" else NullWriter()
