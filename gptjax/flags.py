"""The `gptjax` command's flags, generated from the config dataclasses (GPTConfig, Options, OptimConfig, the
tasks' TrainConfigs, BenchConfig) with one help text per name, and config files.

A flag is a dataclass field with dashes (`batch_size` -> `--batch-size`), defaulting to the field's default in that
command's config; `from_args` builds the dataclass back. `--config FILE.toml` gives flags from a file (keys: flag
names, with dashes or underscores; the command line wins); training runs save theirs to RUN/command.toml.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
from pathlib import Path
from typing import Any, Sequence

from gptjax.config import INITS, PRESETS
from gptjax.options import ATTN_IMPLS, DTYPES, LINEAR_LAYOUTS, MATMUL_PRECISIONS, MATVECS, REMAT_POLICIES, WEIGHT_DTYPES
from gptjax.tracking import TRACKERS

SAVE_FILE = "command.toml"
RECIPES = Path(__file__).parent / "recipes"  # --config NAME: a recipe shipped with gptjax

# one help text per flag name, for every command that has the flag
HELP = {
    # data
    "bpe_dir": "directory with GPT-2's encoder.json + vocab.bpe (offline use)",
    "stride": "window stride in tokens (default: the context length)",
    "train_frac": "fraction of the data that trains (the rest validates, or validates and tests)",
    "val_frac": "fraction of the data that validates",
    "limit": "use only the first N records (of each split when training)",
    # model
    "preset": f"architecture: {'|'.join(PRESETS)}",
    "context_length": "tokens per window (the preset's when not given)",
    "emb_dim": "embedding size (default: the preset's)",
    "n_layers": "number of blocks (default: the preset's)",
    "n_heads": "number of attention heads (default: the preset's)",
    "drop_rate": "dropout rate while training",
    "qkv_bias": "bias in the q/k/v projections (GPT-2 has one)",
    "tie_embeddings": "share wte with the output head (GPT-2 does)",
    "init": "weight init: the book's PyTorch defaults (its chapter-5 numbers need them) or GPT-2's std 0.02",
    # execution options (gptjax.options.Options)
    "dtype": "compute dtype (params stay float32; softmax, logits and loss float32)",
    "matmul_precision": "bfloat16: the weight matmuls round their operands to bfloat16 and accumulate in float32, "
                        "the rest stays in --dtype",
    "attn_impl": "attention: auto (cuDNN flash on NVIDIA GPUs in half precision, XLA elsewhere), xla, cudnn, einsum",
    "scan_layers": "one scan over the blocks (compiles one block instead of all)",
    "scan_unroll": "blocks per scan iteration (with --scan-layers)",
    "remat": "what the backward pass recomputes instead of storing",
    "vocab_multiple": "pad the vocabulary to a multiple of this (64: 50257 -> 50304)",
    "linear_layout": "how kernels are stored while running; auto: out_in on CPU (faster there; in_out with LoRA), "
                     "else in_out. Saved models are in_out either way",
    "loss_chunk": "positions per chunk of the LM head + cross-entropy, each recomputed in the backward pass: the "
                  "(batch, context, vocab) float32 logits never exist at once (0: the whole sequence)",
    "matvec": "kernel: products of at most 8 rows (decoding) run gptjax's C++ matrix-vector kernel on CPU",
    # training loop (gptjax.engine.TrainConfig)
    "epochs": "passes over the training data",
    "batch_size": "examples per step",
    "eval_freq": "evaluate every N steps",
    "eval_iter": "batches per evaluation",
    "seed": "random seed (init, shuffling, dropout, sampling)",
    "save_every": "steps between checkpoints (0: every epoch); default: every --save-minutes. A run also saves at "
                  "its end and when stopped (Ctrl-C, SIGTERM)",
    "save_minutes": "with no --save-every: minutes of training between checkpoints (0: only at the end and when "
                    "stopped)",
    "keep_checkpoints": "keep the last K checkpoints (plus the best by validation loss)",
    "async_checkpoint": "write checkpoints in the background while training goes on (holds a copy of the state in "
                        "memory meanwhile)",
    "sample_tokens": "tokens of the greedy sample after each epoch (0: none)",
    "start_context": "prompt of the per-epoch sample",
    "tracker": "also log the metrics (steps.jsonl, metrics.jsonl) to TensorBoard (RUN/tensorboard) or Weights & "
               "Biases (offline unless logged in or WANDB_MODE=online); needs pip install 'gptjax[tracking]'",
    "hellaswag": "also score HellaSwag from this JSONL (rowanz/hellaswag's format: a path, an http(s) URL, or 'val' "
                 "for the official validation split, downloaded once): accuracy of picking the ending with the lowest "
                 "mean loss per token",
    "hellaswag_limit": "score only the first N HellaSwag items",
    "beta": "DPO beta (the book: 0.1)",
    # optimizer (gptjax.optim.OptimConfig)
    "lr": "AdamW learning rate (the peak, with a schedule)",
    "weight_decay": "AdamW weight decay",
    "b1": "AdamW beta1",
    "b2": "AdamW beta2",
    "eps": "AdamW epsilon",
    "warmup_steps": "linear warmup from --initial-lr to --lr over this many updates",
    "initial_lr": "learning rate at the start of the warmup",
    "min_lr": "learning rate at the end of the cosine decay",
    "clip_norm": "clip gradients to this global norm",
    "clip_after_warmup": "clip only once the warmup is over (the book's appendix D)",
    "grad_accum": "micro-batches per optimizer update",
    # bench (gptjax.bench.BenchConfig)
    "steps": "timed train steps (after --warmup)",
    "warmup": "untimed train steps first",
    "decode_prompt": "prompt tokens per row of the decode rows",
    "decode_tokens": "new tokens with the KV cache",
    "nocache_tokens": "new tokens without the cache at batch 1, divided by the batch beyond (slow path)",
    "decode_rounds": "timed rounds of each decode row",
    "torch": "time PyTorch's rows too",
    "torch_compile": "time torch.compile's rows too (slow to compile on CPU)",
    # runs
    "out": "run directory",
    "resume": "continue an interrupted run from its latest checkpoint: RUN_DIR, or --out when no directory is "
              "given; a damaged newest checkpoint is passed over for the newest intact one",
    "step": "with --resume: continue from the checkpoint of this step instead (the newer ones are deleted)",
    "overwrite": "replace what --out holds (a run, or an output file)",
    "quiet": "no progress bar",
    "sharding": "none: one device; dp: batch split over all devices, params replicated; fsdp: params and optimizer "
                "state split too (multi-host: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or "
                "run under SLURM / on a TPU pod)",
    "fsdp": "size of the fsdp mesh axis (default: all devices)",
    "config": "read flags from this TOML file, or a recipe shipped with gptjax by name (gpt2-124m); keys are flag "
              f"names, flags given here win; a training run saves its own as RUN/{SAVE_FILE}",
    # fine-tuning
    "lora_rank": "train LoRA adapters of this rank instead of every weight (appendix E: 16); base weights stay frozen",
    "lora_alpha": "LoRA alpha (default: the rank); scale = alpha / rank",
    "lora_targets": "comma-separated globs of Dense layers to adapt, e.g. '*/attn/*,cls_head' (default: every "
                    "Dense layer)",
    "style": "prompt template (default: alpaca, or the one the --model run was trained with)",
    "pad_multiple": "pad batches to a multiple of this many tokens, so the step compiles once per bucket (1: the "
                    "book's per-batch longest length)",
    "allowed_max_length": "cut examples to this many tokens (and to the model's context)",
    "no_respond": "skip generating and scoring the test-set responses",
    # sampling
    "max_new_tokens": "tokens to generate per answer",
    "temperature": "0 = greedy (the book)",
    "top_k": "sample among the k most likely tokens",
    "top_p": "sample among the most likely tokens that make up this probability",
    "weight_dtype": "decode from these weights: bfloat16 halves the bytes each token reads, int8 (a scale per row, "
                    "float32 compute) quarters them",
}

CHOICES = {"dtype": DTYPES, "matmul_precision": MATMUL_PRECISIONS, "attn_impl": ATTN_IMPLS, "remat": REMAT_POLICIES,
           "linear_layout": ("auto",) + LINEAR_LAYOUTS, "matvec": ("auto",) + MATVECS, "init": INITS,
           "weight_dtype": WEIGHT_DTYPES, "style": ("alpaca", "phi3"), "sharding": ("none", "dp", "fsdp"),
           "tracker": TRACKERS}
# older names a flag still answers to
ALIASES = {"train_frac": ["--train-ratio"], "async_checkpoint": ["--async-checkpoints"]}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None or off, or its help already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of records, a batch size)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add(g, name: str, default: Any = None, *, type: Any = None, help: str | None = None, aliases: Sequence[str] = (),
        **kw) -> None:
    """`--name` (dashes for underscores) with its help from HELP, its choices from CHOICES, a boolean as an
    on/off switch."""
    opts = ["--" + name.replace("_", "-"), *ALIASES.get(name, ()), *aliases]
    kw.setdefault("choices", CHOICES.get(name))
    if type is bool or isinstance(default, bool):
        kw.pop("choices")
        kw["action"] = "store_true" if not default else argparse.BooleanOptionalAction
    else:
        sample = default[0] if isinstance(default, (list, tuple)) and default else default
        kw["type"] = type or (sample.__class__ if sample is not None else str)
    g.add_argument(*opts, dest=name, default=default, help=help or HELP[name], **kw)


def add_flags(g, **flags) -> None:
    """A flag per keyword, in order: its default, or its type (`int`, `positive_int`, ...) if it defaults to None."""
    for name, value in flags.items():
        if callable(value):
            add(g, name, type=value)
        else:
            add(g, name, value)


def add_fields(g, cls, *, skip: Sequence[str] = (), only: Sequence[str] | None = None, **defaults) -> None:
    """A flag per field of dataclass `cls` (those in `only`, less `skip`), with the field's default or `defaults`."""
    base = cls()
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only) or not f.init:
            continue
        default = defaults.get(f.name, getattr(base, f.name))
        add(g, f.name, default, type=_TYPES.get(str(f.type).split(" |")[0]))


def from_args(cls, args: argparse.Namespace, **extra) -> Any:
    """`cls` from the parsed flags named as its fields (and `extra`)."""
    given = vars(args)
    return cls(**{**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given and f.init}, **extra})


# --- config files -----------------------------------------------------------------------------------

def config_tokens(path: str, parser: argparse.ArgumentParser, command: str) -> list[str]:
    """The flags a TOML file gives, as command-line tokens (so argparse checks them as it checks typed
    ones): `epochs = 3` -> ["--epochs", "3"]."""
    recipe = RECIPES / f"{path}.toml"
    if not Path(path).exists() and recipe.is_file():  # a recipe shipped with gptjax, by name
        path = str(recipe)
    try:
        table = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        shipped = sorted(p.stem for p in RECIPES.glob("*.toml"))
        raise ValueError(f"--config {path!r}: no such file (or shipped recipe: {shipped})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path!r} is not a TOML file: {e}") from None
    actions = {a.dest: a for a in reversed(parser._actions) if a.option_strings}  # a dest's first flag
    tokens: list[str] = []
    for key, value in table.items():
        action = actions.get(key.replace("-", "_"))
        if key == "command":
            if value != command:
                raise ValueError(f"--config {path!r} holds the flags of `gptjax {value}`, not of `gptjax {command}`")
            continue
        if action is None or key == "config":
            raise ValueError(f"--config {path!r}: {key!r} is not a flag of this command; its flags: "
                             f"{sorted(k for k in actions if k not in ('help', 'config'))}")
        flag = action.option_strings[0]
        if isinstance(value, bool) and action.nargs == 0:  # a switch: --flag, --no-flag or nothing
            if value or isinstance(action, argparse.BooleanOptionalAction):
                tokens.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            tokens += [flag, *map(str, value)] if action.nargs in ("+", "*") else \
                [t for v in value for t in (flag, str(v))]
        else:
            tokens += [flag, str(value)]
    return tokens


def _toml_value(v: Any) -> str:
    """A flag's value in TOML: JSON's spelling, but nan and inf bare."""
    return repr(v) if isinstance(v, float) and not math.isfinite(v) else json.dumps(v)


def resolved_toml(args: argparse.Namespace) -> str:
    """Every flag of a parsed command as TOML, less those that steer only this invocation (--config, --resume,
    --step, --overwrite); flags at None are left out: their default applies."""
    lines = [f"# gptjax {args.command} --config this-file: the flags this run was started with",
             f"command = {_toml_value(args.command)}"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in sorted(vars(args).items())
              if k not in ("command", "config", "resume", "step", "overwrite") and v is not None]
    return "\n".join(lines) + "\n"
