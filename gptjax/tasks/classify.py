"""Classification fine-tuning (the book's chapter 6), optionally with LoRA (appendix E): the GPT with `cls_head`
for its LM head classifies from the last position; only the chosen parameters (and LoRA adapters) train."""
from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
from jax.sharding import Mesh
import jax.numpy as jnp
import numpy as np

from gptjax import engine, lora as lora_lib, runs
from gptjax.model_io import load_run, load_run_config, refuse_existing_run
from gptjax.config import GPTConfig
from gptjax.tasks.classify_data import (IGNORE_LABEL, SMS_SPAM_LABELS, ClassBatches, LabeledTexts, book_split,
                                        encode_texts, split_batches)
from gptjax.engine import Hooks, Steps, TrainConfig, TrainState, cross_entropy
from gptjax.optim import OptimConfig
from gptjax.sharding import mesh_for
from gptjax.model import GPT, count_params, dropout_rngs
from gptjax.layout import to_canonical, unstack_layers
from gptjax.options import Options
from gptjax.tasks.finetune import PAD_TOKEN_ID, begin, check_pad_token, finetune_options, make_steps, save_finished
from gptjax.tokenizer import get_gpt2_tokenizer

# --- model -----------------------------------------------------------------------------------------

def to_classifier(params: dict, cfg: GPTConfig, n_classes: int, key: jax.Array) -> tuple[dict, GPTConfig]:
    """The book's `model.out_head = nn.Linear(emb_dim, n_classes)`: drop the LM head, add a fresh `cls_head`
    initialised as torch's Linear (weight and bias ~ U(+-1/sqrt(emb_dim)))."""
    bound = 1.0 / math.sqrt(cfg.emb_dim)
    k_w, k_b = jax.random.split(key)
    new = {k: v for k, v in params.items() if k not in ("lm_head", "cls_head")}
    new["cls_head"] = {"kernel": jax.random.uniform(k_w, (cfg.emb_dim, n_classes), jnp.float32, -bound, bound),
                       "bias": jax.random.uniform(k_b, (n_classes,), jnp.float32, -bound, bound)}
    return new, cfg.replace(n_classes=n_classes)


def trainable_mask(params: dict, train: str = "last-block") -> dict:
    """Bool pytree over `params`, True where fine-tuning updates: 'last-block' (the book: the last transformer
    block, the final LayerNorm and the head), 'last-N' (the last N blocks, ln_f, head), 'all', 'head' or 'none'."""
    n_layers = sum(1 for k in params if re.fullmatch(r"h_\d+", k))
    spec = train.strip().lower()
    named = {"all": set(params), "none": set(), "head": {"cls_head"}}
    if spec in named:
        chosen = named[spec]
    elif (m := re.fullmatch(r"last-(block|\d+)", spec)):
        n = 1 if m.group(1) == "block" else int(m.group(1))
        if not 1 <= n <= n_layers:
            raise ValueError(f"--train {train!r}: the model has {n_layers} blocks; choose last-1 .. last-{n_layers}")
        chosen = {f"h_{i}" for i in range(n_layers - n, n_layers)} | {"ln_f", "cls_head"}
    else:
        raise ValueError(f"unknown layers to train {train!r}; choose last-block | last-N (e.g. last-2) | all | head "
                         f"| none")
    return {top: jax.tree_util.tree_map(lambda _: top in chosen, sub) for top, sub in params.items()}


def last_token_logits(params: dict, cfg: GPTConfig, x_BT: jax.Array, *, key: jax.Array | None = None,
                      opts: Options | None = None) -> jax.Array:
    """The book's `model(x)[:, -1, :]`: class logits from the last position (padding included, as the book)."""
    logits_BTC = GPT(cfg, opts or Options()).apply({"params": params}, x_BT, deterministic=key is None,
                                                   rngs=dropout_rngs(key))
    return logits_BTC[:, -1, :]


def _loss_and_correct(logits_BC: jax.Array, y_B: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    valid_B = y_B != IGNORE_LABEL
    loss = cross_entropy(logits_BC[:, None, :], y_B[:, None], ignore_index=IGNORE_LABEL)
    correct = jnp.sum((jnp.argmax(logits_BC, axis=-1) == y_B) & valid_B)
    return loss, correct, jnp.sum(valid_B)


@lru_cache(maxsize=8)
def make_loss_fn(cfg: GPTConfig, lora_scale: float = 1.0, opts: Options = Options()) -> engine.LossFn:
    """The book's classifier loss on batches `(x_BT, y_B)`, with the correct count for the accuracy;
    `trainable` is {"params": what trains, "lora": adapters}."""
    def loss_fn(trainable, frozen, batch, key):
        x_BT, y_B = batch
        logits_BC = last_token_logits(lora_lib.full_params(trainable, frozen, lora_scale), cfg, x_BT, key=key, opts=opts)
        loss, correct, count = _loss_and_correct(logits_BC, y_B)
        return loss, {"correct": correct, "count": count}

    return loss_fn


def make_classifier_steps(cfg: GPTConfig, optim: OptimConfig, trainable: Any, frozen: Any = None,
                          lora_scale: float = 1.0, mesh: Mesh | None = None, strategy: str = "dp",
                          opts: Options | None = None) -> Steps:
    """The engine's steps for the classifier (finetune.make_steps)."""
    return make_steps(partial(make_loss_fn, cfg, lora_scale), cfg, optim, trainable, frozen, mesh, strategy, opts)


def evaluate_split(steps: Steps, trainable: dict, batches: Iterator, num_batches: int | None = None
                   ) -> tuple[float, float]:
    """(loss, accuracy) as the book's calc_loss_loader (mean of batch losses) and calc_accuracy_loader."""
    ms = [steps.eval_step(trainable, batch) for batch in itertools.islice(batches, num_batches)]
    if not ms:
        return float("nan"), float("nan")
    correct, count = sum(m["correct"] for m in ms), sum(m["count"] for m in ms)
    return float(jnp.mean(jnp.stack([m["loss"] for m in ms]))), float(correct) / max(int(count), 1)


# --- the book's training loop -------------------------------------------------------------------

@dataclass
class ClassifierTrainConfig(TrainConfig):
    """The book's chapter-6 run: 5 epochs, batch 8, AdamW lr 5e-5, evaluation every 50 steps on 5 batches."""
    epochs: int = 5
    batch_size: int = 8
    eval_freq: int = 50
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, weight_decay=0.1))
    keep_checkpoints: int = 1
    sample_tokens: int = 0


def train_classifier(steps: Steps, state: TrainState, train_b: ClassBatches, val_b: ClassBatches,
                     tcfg: ClassifierTrainConfig, out_dir: str | Path, *, meta: dict, resume: bool | int = False,
                     progress: bool = True, stop_after: int | None = None) -> dict:
    """The book's train_classifier_simple on the engine: losses every `eval_freq` steps, accuracies after
    each epoch (on `eval_iter` batches of a fresh training shuffle and of the validation set)."""
    def on_train(params, step: int) -> tuple[float, float]:
        n_evals = step // tcfg.eval_freq + 1  # a fresh shuffle, as re-iterating the book's shuffled DataLoader
        return evaluate_split(steps, params, train_b.epoch(10**6 + n_evals), tcfg.eval_iter)

    def on_val(params) -> tuple[float, float]:
        return evaluate_split(steps, params, val_b.epoch(0), tcfg.eval_iter)

    def evaluate(params, step: int) -> dict:
        return {"epoch_frac": (step + 1) / len(train_b), "train_loss": on_train(params, step)[0],
                "val_loss": on_val(params)[0]}

    def on_epoch_end(params, step: int) -> dict:
        train_acc, val_acc = on_train(params, step)[1], on_val(params)[1]
        print(f"Training accuracy: {train_acc * 100:.2f}% | Validation accuracy: {val_acc * 100:.2f}%")
        return {"train_acc": train_acc, "val_acc": val_acc}

    def line(rec: dict) -> str:
        return f"Ep {rec['epoch']} (Step {rec['step']:06d}): Train loss {rec['train_loss']:.3f}, " \
               f"Val loss {rec['val_loss']:.3f}"

    hooks = Hooks(evaluate=evaluate, validate=lambda params: on_val(params)[0], on_epoch_end=on_epoch_end, line=line,
                  count=lambda b: int(np.sum(b[1] != IGNORE_LABEL)), count_name="examples_seen")
    return engine.run(steps, state, tcfg, train_b, out_dir, hooks, meta=meta, resume=resume, progress=progress,
                      stop_after=stop_after, desc="finetune")


# --- the whole fine-tuning run -------------------------------------------------------------------

def classifier_trainable(params: dict, cfg: GPTConfig, n_classes: int, train: str,
                         lora: lora_lib.LoRAConfig | None, key: jax.Array, opts: Options) -> tuple:
    """(params, cfg, opts, trainable, frozen) of a classifier run: a fresh `n_classes` head where the model has none
    of that size, `train`'s weights (and LoRA adapters) trainable; scan_layers params unstacked to single blocks."""
    if opts.scan_layers:
        params, opts = unstack_layers(params), opts.replace(scan_layers=False)
    head_key, lora_key = jax.random.split(key)
    if cfg.n_classes != n_classes or "cls_head" not in params:
        params, cfg = to_classifier(params, cfg, n_classes, head_key)
    trainable_base, frozen = lora_lib.partition(params, trainable_mask(params, train))
    trainable = {"params": trainable_base}
    if lora is not None:
        trainable["lora"] = lora_lib.init_lora(params, lora, lora_key)
    return params, cfg, opts, trainable, frozen


def final_results(steps: Steps, trainable: dict, loaders: dict[str, ClassBatches]) -> dict[str, dict]:
    """Loss and accuracy of full passes over every split, as the book's final calc_accuracy_loader calls."""
    final = {}
    for name, b in loaders.items():
        loss, acc = evaluate_split(steps, trainable, b.epoch(0))
        final[name] = {"loss": loss, "accuracy": acc, "examples": b.num_examples}
    print("  ".join(f"{name} accuracy {m['accuracy'] * 100:.2f}%" for name, m in final.items()))
    return final


def plot_run(h: dict, eh: dict, out_dir: Path) -> None:
    """loss.png (per evaluation) and accuracy.png (per epoch), against epochs and examples seen."""
    if h.get("step"):
        runs.plot_curves(h["epoch_frac"], {"Training loss": h["train_loss"], "Validation loss": h["val_loss"]},
                         out_dir / "loss.png", xlabel="Epochs", twin=(h["examples_seen"], "Examples seen"))
    runs.plot_curves(eh["epoch"], {"Training accuracy": eh["train_acc"], "Validation accuracy": eh["val_acc"]},
                     out_dir / "accuracy.png", xlabel="Epochs", ylabel="Accuracy",
                     twin=(eh["examples_seen"], "Examples seen"))


@runs.run_task
def finetune_classifier(params: dict, cfg: GPTConfig, data: LabeledTexts | dict[str, LabeledTexts], tokenizer: Any,
                        out_dir: str | Path, *, train: str | None = None, lora: lora_lib.LoRAConfig | None = None,
                        tcfg: ClassifierTrainConfig | None = None, max_length: int | None = None,
                        balance: bool = True, train_frac: float = 0.7, val_frac: float = 0.1,
                        drop_rate: float | None = 0.0, base_model: str | None = None, data_source: str | None = None,
                        pad_token_id: int = PAD_TOKEN_ID, progress: bool = True, resume: bool | int = False,
                        overwrite: bool = False, stop_after: int | None = None, sharding: str = "none",
                        fsdp: int | None = None, opts: Options | None = None) -> dict:
    """Chapter 6 (and appendix E with `lora`) end to end; writes a run directory that `Classifier.from_run` loads.
    `params`/`cfg`: the base GPT (an LM or a classifier). `data`: all examples (split as the book) or ready
    {"train", "val", "test"} splits. `train`: which base params train (default 'last-block', or 'none' with LoRA,
    as the book). Writes params/ (merged), config.json, metrics.jsonl, loss.png, accuracy.png and, with LoRA,
    adapters.safetensors. `resume` and `opts` as finetune_instruct's."""
    tcfg = tcfg or ClassifierTrainConfig()
    opts = finetune_options(opts, lora)
    train = train or ("none" if lora is not None else "last-block")
    splits = data if isinstance(data, dict) else book_split(data, balance=balance, train_frac=train_frac,
                                                             val_frac=val_frac, seed=tcfg.seed)
    label_names = splits["train"].label_names
    if drop_rate is not None:
        cfg = cfg.replace(drop_rate=drop_rate)
    check_pad_token(cfg, pad_token_id)
    loaders, max_length = split_batches(splits, tokenizer, tcfg.batch_size, seed=tcfg.seed, max_length=max_length,
                                        context_length=cfg.context_length, pad_token_id=pad_token_id)
    key = jax.random.PRNGKey(tcfg.seed)
    base_sha256 = runs.tree_sha256(to_canonical(params, cfg, opts))
    params, cfg, opts, trainable, frozen = classifier_trainable(params, cfg, len(label_names), train, lora, key, opts)
    if not resume:
        refuse_existing_run(out_dir, overwrite=overwrite, resume_hint="`gptjax finetune-classifier ... --resume`")
    inputs = {"base_model": base_model, "base_sha256": base_sha256, "data": data_source, "data_sha256": runs.data_sha256(
        {k: [v.texts, v.labels_N.tolist(), list(v.label_names)] for k, v in splits.items()})}
    # only once every input checked out: a bad option leaves no directory behind
    out_dir, meta = begin(out_dir, cfg, opts, "classify", inputs, resume)
    with_lora = f", LoRA r={lora.rank} alpha={lora.alpha:g}" if lora else ""
    print(f"model: {count_params(params):,} parameters, {count_params(trainable):,} trainable ({train}{with_lora}); "
          f"max_length {max_length}; batches " + ", ".join(f"{name} {len(b)}" for name, b in loaders.items()))
    steps = make_classifier_steps(cfg, tcfg.optim, trainable, frozen, lora.scale if lora else 1.0,
                                  mesh=mesh_for(sharding, fsdp, tcfg.batch_size), strategy=sharding, opts=opts)
    state = steps.init_state(trainable, key)
    # the book's check before fine-tuning: accuracy on 10 batches of each split (about chance)
    initial = {name: evaluate_split(steps, trainable, b.epoch(0), 10)[1] for name, b in loaders.items()}
    print("before fine-tuning: " + "  ".join(f"{k} accuracy {v * 100:.2f}%" for k, v in initial.items()))
    result = train_classifier(steps, state, loaders["train"], loaders["val"], tcfg, out_dir, meta=meta,
                              resume=resume, progress=progress, stop_after=stop_after)
    trainable = result["state"].params
    task = {"task": "classify", "label_names": list(label_names), "max_length": int(max_length),
            "pad_token_id": pad_token_id, **inputs, "train_layers": train, "lora": lora.to_dict() if lora else None,
            "train": tcfg.to_dict(), "trainable_params": count_params(trainable),
            "split_sizes": {k: len(v) for k, v in splits.items()}, "initial_accuracy": initial,
            "results": final_results(steps, trainable, loaders), "steps": result["steps"],
            "examples_seen": result["tokens_seen"], "wall_s": round(result["wall_s"], 1)}
    # with LoRA the adapters, plus what the base model lacks (the new head) or what trained beside them
    merged = save_finished(out_dir, trainable, frozen, lora, cfg, opts, {"classify": task},
                           lora_lib.combine({"cls_head": params["cls_head"]}, trainable["params"]),
                           base_model=base_model, n_classes=cfg.n_classes)[1]
    h, eh = result["history"], result["epoch_history"]
    plot_run(h, eh, out_dir)
    return {**task, "history": {**h, **eh}, "out_dir": str(out_dir), "params": merged, "cfg": cfg}


# --- inference -----------------------------------------------------------------------------------

class Classifier:
    """A fine-tuned classifier: `classify(text) -> (label, probability)`, as the book's classify_review."""

    def __init__(self, params: dict, cfg: GPTConfig, tokenizer: Any, label_names: Sequence[str],
                 max_length: int | None = None, pad_token_id: int = PAD_TOKEN_ID):
        if not cfg.n_classes:
            raise ValueError("this model has no classifier head (n_classes=0); fine-tune it with "
                             "`gptjax finetune-classifier` first")
        if len(label_names) != cfg.n_classes:
            raise ValueError(f"{len(label_names)} label names for a {cfg.n_classes}-class head")
        self.params, self.cfg, self.tokenizer = params, cfg.replace(drop_rate=0.0), tokenizer
        self.label_names, self.pad_token_id = tuple(label_names), pad_token_id
        self.max_length = min(max_length or cfg.context_length, cfg.context_length)
        self._probs = jax.jit(lambda p, x_BT: jax.nn.softmax(last_token_logits(p, self.cfg, x_BT), axis=-1))

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, tokenizer: Any = None, bpe_dir: str | None = None) -> "Classifier":
        _, meta = load_run_config(run_dir)
        task = meta.get("classify") or {}
        if "label_names" not in task:  # an unfinished run records only its inputs
            raise ValueError(f"{str(run_dir)!r} is not a finished classifier run (no 'classify' results in "
                             f"config.json); pass the --out directory of `gptjax finetune-classifier`")
        params, cfg = load_run(run_dir)
        return cls(params, cfg, tokenizer or get_gpt2_tokenizer(bpe_dir), task["label_names"], task["max_length"],
                   task.get("pad_token_id", PAD_TOKEN_ID))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        # the book pads every input to the training length: the model saw the class at that position
        return encode_texts(texts, self.tokenizer, max_length=self.max_length, pad_token_id=self.pad_token_id)[0]

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Class probabilities (N, C)."""
        ids_NT = self.encode(list(texts))
        out = []
        for i in range(0, len(ids_NT), batch_size):
            x_BT = ids_NT[i:i + batch_size]
            n = len(x_BT)
            if n < batch_size and len(ids_NT) > batch_size:  # one shape per batch size: compile once
                x_BT = np.concatenate([x_BT, np.full((batch_size - n, x_BT.shape[1]), self.pad_token_id, np.int32)])
            out.append(np.asarray(self._probs(self.params, x_BT))[:n])
        return np.concatenate(out) if out else np.zeros((0, self.cfg.n_classes), np.float32)

    def classify(self, text: str) -> tuple[str, float]:
        probs_C = self.predict_proba([text])[0]
        i = int(np.argmax(probs_C))
        return self.label_names[i], float(probs_C[i])


def classify(text: str, params: dict, cfg: GPTConfig, tokenizer: Any, *, label_names: Sequence[str] = SMS_SPAM_LABELS,
             max_length: int | None = None, pad_token_id: int = PAD_TOKEN_ID) -> tuple[str, float]:
    """One text -> (label, probability), as the book's classify_review."""
    return Classifier(params, cfg, tokenizer, label_names, max_length, pad_token_id).classify(text)


def classifier_from_adapters(base_params: dict, base_cfg: GPTConfig,
                             adapters_path: str | os.PathLike) -> tuple[dict, GPTConfig]:
    """Rebuild a LoRA run's classifier from its base model and adapters.safetensors (merged, ready to use)."""
    adapters, extra, lcfg, _ = lora_lib.load_adapters(adapters_path)
    if "cls_head" not in extra:
        raise ValueError(f"{str(adapters_path)!r} holds no cls_head; it is not a classifier's adapter file")
    params = lora_lib.combine({k: v for k, v in base_params.items() if k not in ("lm_head", "cls_head")}, extra)
    return (lora_lib.merge(params, adapters, lcfg.scale),
            base_cfg.replace(n_classes=int(extra["cls_head"]["kernel"].shape[-1])))
