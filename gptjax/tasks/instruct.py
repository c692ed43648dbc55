"""Instruction fine-tuning (the book's chapter 7): SFT (full or LoRA); `fit`, the engine's run with chapter 7's
evaluation (DPO's too); batched KV-cache responses and the offline table. Data and prompts: instruct_data."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from gptjax import engine, lora as lora_lib, runs
from gptjax.model_io import refuse_existing_run
from gptjax.config import GPTConfig
from gptjax.engine import IGNORE_INDEX, Hooks, Steps, TrainConfig, TrainState, mean_metrics, perplexity
from gptjax.optim import OptimConfig
from gptjax.generate import decoding_model, generate_batch
from gptjax.sharding import mesh_for
from gptjax.model import GPT, count_params
from gptjax.layout import to_canonical
from gptjax.options import Options
from gptjax.tasks import pretrain
from gptjax.tasks.finetune import (PAD_TOKEN_ID, begin, check_pad_token, encode, finetune_options, make_steps,
                                   save_finished, split_trainable)
from gptjax.tasks.instruct_data import InstructionBatches, encode_examples, extract_response, format_input, split_data
from gptjax.tasks.judge import text_scores

# --- model, loss and steps -------------------------------------------------------------------------

@lru_cache(maxsize=8)
def make_loss_fn(cfg: GPTConfig, lora_scale: float = 1.0, opts: Options = Options()) -> engine.LossFn:
    """The book's SFT loss: pretraining's on batches `(x_BT, y_BT)` (targets of -100 skipped); `trainable` is
    {"params": every weight} or {"lora": adapters} over the `frozen` weights."""
    lm_loss = pretrain.make_loss_fn(cfg, opts)

    def loss_fn(trainable, frozen, batch, key):
        return lm_loss(lora_lib.full_params(trainable, frozen, lora_scale), None, batch, key)

    return loss_fn


def make_sft_steps(cfg: GPTConfig, optim: OptimConfig, trainable: Any, frozen: Any = None,
                   lora_scale: float = 1.0, mesh: Mesh | None = None, strategy: str = "dp",
                   opts: Options | None = None) -> Steps:
    """The engine's steps for supervised fine-tuning (finetune.make_steps)."""
    return make_steps(partial(make_loss_fn, cfg, lora_scale), cfg, optim, trainable, frozen, mesh, strategy, opts)


# --- the fine-tuning loop (SFT and DPO) ------------------------------------------------------------

@dataclass
class InstructTrainConfig(TrainConfig):
    """The book's chapter-7 run: AdamW lr 5e-5, weight decay 0.1, batch 8, 2 epochs, evaluation every 5 steps."""
    epochs: int = 2
    batch_size: int = 8
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, weight_decay=0.1))
    keep_checkpoints: int = 1
    sample_tokens: int = 35      # greedy sample of the first validation prompt after each epoch (0: none)


def chapter7_batches(make_batches: Callable, encode_split: Callable, data: Sequence[dict] | dict, tokenizer: Any,
                     cfg: GPTConfig, tcfg: TrainConfig, style: str, allowed_max_length: int, pad_multiple: int,
                     pad_token_id: int, **kw) -> tuple[dict, int, Any, Any]:
    """A chapter-7 run's (splits, max length, training batches, validation batches): `data` split as the book,
    each split `encode_split`, training batches shuffled (the last partial one dropped), validation in order."""
    splits = data if isinstance(data, dict) else split_data(data)
    check_pad_token(cfg, pad_token_id)
    max_len = min(allowed_max_length, cfg.context_length)
    enc = {k: encode_split(v, tokenizer, style) for k, v in splits.items() if v}
    kw.update(pad_multiple=pad_multiple, allowed_max_length=max_len, pad_token_id=pad_token_id)
    train_b = make_batches(enc["train"], tcfg.batch_size, shuffle=True, drop_last=True, seed=tcfg.seed,
                           name="training", **kw)
    if "val" not in enc:
        raise ValueError("the validation split is empty; use more data")
    val_b = make_batches(enc["val"], tcfg.batch_size, shuffle=False, drop_last=False, name="validation", **kw)
    return splits, max_len, train_b, val_b


def split_metrics(steps: Steps, params: Any, train_batches, val_batches, num_batches: int) -> dict[str, float]:
    """Every metric of the eval step on the first batches of each split, as train_* and val_*."""
    return {f"{split}_{k}": v for split, batches in (("train", train_batches), ("val", val_batches))
            for k, v in mean_metrics(steps, params, batches, num_batches).items()}


def fit(steps: Steps, state: TrainState, tcfg: TrainConfig, train_b, val_b, out_dir: Path, *,
        count: Callable[[Any], int], sample: Callable[[Any], str] | None, meta: dict, resume: bool | int,
        progress: bool, stop_after: int | None, desc: str) -> dict:
    """The engine's run with chapter 7's evaluation (every eval-step metric on `eval_iter` batches of a fresh
    training shuffle and of the validation set); writes samples.json and loss.png. Its "summary": steps, tokens,
    time, the batch shapes the steps compiled for and the last evaluation ("final")."""
    shapes: dict[str, set] = {"train": set(), "eval": set()}

    def shaped(kind: str, batch):
        shapes[kind].add(tuple(tuple(np.shape(x)) for x in jax.tree_util.tree_leaves(batch)))
        return batch

    def for_eval(batches):
        return (shaped("eval", b) for b in batches)

    def evaluate(params, step: int) -> dict:
        return split_metrics(steps, params, for_eval(train_b.epoch(10**6 + step)), for_eval(val_b.epoch(0)),
                             tcfg.eval_iter)

    def validate(params) -> float:
        return mean_metrics(steps, params, for_eval(val_b.epoch(0)), tcfg.eval_iter)["loss"]

    # the engine counts every training batch: record its shape there
    hooks = Hooks(evaluate=evaluate, validate=validate, count=lambda b: count(shaped("train", b)), sample=sample)
    loop = engine.run(steps, state, tcfg, train_b, out_dir, hooks, meta=meta, resume=resume, progress=progress,
                      stop_after=stop_after, desc=desc)
    runs.write_json_atomic(out_dir / "samples.json", loop["samples"])
    if h := loop["history"]:
        runs.plot_history(h, out_dir / "loss.png")
    summary = {"steps": loop["steps"], "tokens_seen": loop["tokens_seen"], "wall_s": round(loop["wall_s"], 1),
               "compiled_shapes": {k: [list(map(list, s)) for s in sorted(v)] for k, v in shapes.items()},
               "final": {k: v[-1] for k, v in h.items() if k.startswith(("train_", "val_"))} if h else {}}
    return {**loop, "summary": summary}


# --- generation ----------------------------------------------------------------------------------

def generate_responses(params: dict, cfg: GPTConfig, entries: Sequence[dict], tokenizer: Any, *,
                       style: str = "alpaca", max_new_tokens: int = 256, batch_size: int = 8,
                       temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                       seed: int = 123, eos_id: int | None = PAD_TOKEN_ID, progress: bool = False,
                       return_finished: bool = False, opts: Options | None = None
                       ) -> list[str] | tuple[list[str], list[bool]]:
    """The book's test-set loop: generate after format_input(entry) (greedy, 256 tokens, stop at <|endoftext|>),
    keep the text after the prompt without the "### Response:" marker; `batch_size` prompts at a time, each as if
    alone. `return_finished` also returns, per answer, whether it ended with `eos_id` before the limit."""
    params, opts = decoding_model(params, cfg, opts)  # once for all the batches
    prompts = [format_input(e, style) for e in entries]
    ids = [encode(tokenizer, p) for p in prompts]
    out, finished = [], []
    key = jax.random.key(seed)
    for start in tqdm(range(0, len(ids), batch_size), disable=not progress, desc="respond", unit="batch"):
        chunk = ids[start:start + batch_size]
        n = len(chunk)
        if n < batch_size and len(ids) > batch_size:  # same batch size as the others: no new program
            chunk = chunk + [chunk[-1]] * (batch_size - n)
        new = generate_batch(params, cfg, chunk, max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, eos_id=eos_id, key=jax.random.fold_in(key, start), opts=opts)[:n]
        for p, p_ids, n_ids in zip(prompts[start:start + n], chunk, new):
            out.append(extract_response(tokenizer.decode(list(p_ids) + list(n_ids)), p, style))
            finished.append(len(n_ids) < max_new_tokens)  # generate_batch drops the eos it stopped at
    return (out, finished) if return_finished else out


def save_responses(entries: Sequence[dict], responses: Sequence[str], path: str | Path,
                   key: str = "model_response") -> Path:
    """The book's instruction-data-with-response.json: each record plus its `model_response` (indent 4)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs.write_json_atomic(path, [{**e, key: r} for e, r in zip(entries, responses)], indent=4)
    return path


# --- offline evaluation --------------------------------------------------------------------------

def response_nll(params: dict, cfg: GPTConfig, entries: Sequence[dict], tokenizer: Any, *, style: str = "alpaca",
                 response_key: str = "output", batch_size: int = 8, pad_multiple: int = 64,
                 pad_token_id: int = PAD_TOKEN_ID, opts: Options | None = None) -> dict[str, float]:
    """Loss and perplexity of the reference answers given their prompts: mean cross-entropy per token over
    the answer text and its <|endoftext|>, the prompt and the response header excluded."""
    if not entries:
        return {"loss": float("nan"), "perplexity": float("nan"), "tokens": 0}
    ex = encode_examples(entries, tokenizer, style, response_key)
    batches = InstructionBatches(ex, batch_size, shuffle=False, drop_last=False, pad_multiple=pad_multiple,
                                 allowed_max_length=cfg.context_length, mask="prompt", pad_token_id=pad_token_id)
    total, count = 0.0, 0
    for batch in batches:
        nll, n = _nll_batch(params, batch, cfg=cfg, opts=opts or Options())
        total, count = total + float(nll), count + int(n)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": count}


@partial(jax.jit, static_argnames=("cfg", "opts"))
def _nll_batch(params, batch, *, cfg: GPTConfig, opts: Options) -> tuple[jax.Array, jax.Array]:
    """(summed float32 negative log-likelihood, count) of the targets that are not IGNORE_INDEX."""
    x_BT, y_BT = batch
    logits_BTV = GPT(cfg, opts).apply({"params": params}, x_BT, deterministic=True)
    valid_BT = y_BT != IGNORE_INDEX
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32),
                                                             jnp.where(valid_BT, y_BT, 0))
    return jnp.sum(nll_BT * valid_BT), jnp.sum(valid_BT)


def offline_report(entries: Sequence[dict], responses: Sequence[str] | None = None, *, params: dict | None = None,
                   cfg: GPTConfig | None = None, tokenizer: Any = None, style: str = "alpaca",
                   name: str = "model", pad_token_id: int = PAD_TOKEN_ID,
                   opts: Options | None = None) -> dict[str, Any]:
    """One row of the offline table: reference loss/perplexity (with a model) and exact match / ROUGE-L
    of `responses` against the references (with responses)."""
    row: dict[str, Any] = {"model": name, "n": len(entries)}
    if params is not None:
        nll = response_nll(params, cfg, entries, tokenizer, style=style, pad_token_id=pad_token_id, opts=opts)
        row.update(ref_loss=nll["loss"], ref_perplexity=nll["perplexity"], ref_tokens=nll["tokens"])
    if responses is not None:
        row.update(text_scores(responses, [e["output"] for e in entries]))
    return row


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of offline_report rows (missing values shown as -)."""
    cols = [("model", "model", "{}"), ("n", "n", "{}"), ("ref_loss", "ref. loss", "{:.3f}"),
            ("ref_perplexity", "ref. perplexity", "{:.2f}"), ("exact_match", "exact match", "{:.1%}"),
            ("rouge_l", "ROUGE-L F1", "{:.3f}"), ("judge_score", "judge score", "{:.2f}")]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "|".join("---" if c[0] == "model" else "---:"
                                                                        for c in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(c[2].format(r[c[0]]) if r.get(c[0]) is not None else "-" for c in cols) + " |")
    return "\n".join(lines)


# --- the whole run -------------------------------------------------------------------------------

RESPONSES_FILE = "test-responses.json"


@runs.run_task
def finetune_instruct(params: dict, cfg: GPTConfig, data: Sequence[dict] | dict[str, list[dict]], tokenizer: Any,
                      out_dir: str | Path, *, style: str = "alpaca", tcfg: InstructTrainConfig | None = None,
                      lora: lora_lib.LoRAConfig | None = None, mask: str = "none", pad_multiple: int = 64,
                      allowed_max_length: int = 1024, respond: bool = True, max_new_tokens: int = 256,
                      base_model: str | None = None, data_source: str | None = None, resume: bool | int = False,
                      overwrite: bool = False, progress: bool = True, stop_after: int | None = None,
                      pad_token_id: int = PAD_TOKEN_ID, sharding: str = "none", fsdp: int | None = None,
                      opts: Options | None = None) -> dict:
    """Chapter 7 end to end; writes a run directory that `load_run`, `gptjax respond/chat/dpo` read.
    `data`: all records (split as the book) or ready {"train", "val", "test"} splits. Writes config.json, params/
    (LoRA merged in), checkpoints/, metrics.jsonl, steps.jsonl, loss.png and, with `respond`, test-responses.json
    and eval.json / eval.md (the offline table). `pad_token_id`: the end-of-text token, which also pads. `resume`
    continues the run in `out_dir` from its newest intact checkpoint (an int: that step's) on the same data and
    base model. `opts`: how it trains (default Options.for_backend()), the layout of `params`; what it saves
    and returns is canonical."""
    tcfg = tcfg or InstructTrainConfig()
    opts = finetune_options(opts, lora)
    if not resume:
        refuse_existing_run(out_dir, overwrite=overwrite, resume_hint="`gptjax finetune-instruct ... --resume`")
    splits, max_len, train_b, val_b = chapter7_batches(InstructionBatches, encode_examples, data, tokenizer, cfg, tcfg,
                                                       style, allowed_max_length, pad_multiple, pad_token_id, mask=mask)
    key = jax.random.PRNGKey(tcfg.seed)
    trainable, frozen = split_trainable(params, lora, jax.random.fold_in(key, 1))
    scale = lora.scale if lora else 1.0
    steps = make_sft_steps(cfg, tcfg.optim, trainable, frozen, scale,
                           mesh=mesh_for(sharding, fsdp, tcfg.batch_size), strategy=sharding, opts=opts)
    state = steps.init_state(trainable, key)
    longest = max(len(x) for x in train_b.examples.ids)
    settings = run_settings("instruct", style, data_source, base_model, pad_multiple, max_len, lora, pad_token_id,
                            tcfg, splits, trainable, runs.tree_sha256(to_canonical(params, cfg, opts)), mask=mask)
    print(describe(params, settings, lora) + f"; longest training example {longest} tokens"
          + (f" (> {max_len}: cut)" if longest > max_len else "") + f"; batches/epoch {len(train_b)}")
    out_dir, meta = begin(out_dir, cfg, opts, "instruct", settings, resume)
    initial = split_metrics(steps, trainable, train_b.epoch(0), val_b.epoch(0), 5)
    print(f"initial losses: training {initial['train_loss']:.3f}, validation {initial['val_loss']:.3f}")
    loop = fit(steps, state, tcfg, train_b, val_b, out_dir, count=lambda b: int(np.sum(b[1] != IGNORE_INDEX)),
               sample=greedy_sampler(cfg, frozen, scale, tokenizer, splits["val"][0], style, tcfg.sample_tokens,
                                     pad_token_id, opts),
               meta=meta, resume=resume, progress=progress, stop_after=stop_after, desc="finetune-instruct")
    result = {**settings, "initial": initial, **loop["summary"], "samples": loop["samples"]}
    shapes = loop["summary"]["compiled_shapes"]
    print(f"trained {loop['steps']} steps in {loop['wall_s']:.0f} s; train step compiled for "
          f"{len(shapes['train'])} batch shape(s), eval step for {len(shapes['eval'])}")
    merged, canonical = save_finished(out_dir, loop["state"].params, frozen, lora, cfg, opts,
                                      {"instruct": {k: v for k, v in result.items() if k != "samples"}},
                                      base_model=base_model)
    if respond and splits.get("test"):
        result["eval"] = respond_and_evaluate(merged, cfg, splits["test"], tokenizer, out_dir, style=style,
                                              max_new_tokens=max_new_tokens, batch_size=tcfg.batch_size,
                                              name=base_model or "model", progress=progress, eos_id=pad_token_id,
                                              opts=opts)
    return {**result, "history": loop["history"], "out_dir": str(out_dir), "params": canonical, "cfg": cfg}


def run_settings(task: str, style: str, data_source: str | None, base_model: str | None, pad_multiple: int,
                 max_len: int, lora: lora_lib.LoRAConfig | None, pad_token_id: int, tcfg: TrainConfig,
                 splits: dict, trainable: Any, base_sha256: str | None = None, **extra) -> dict:
    """What a chapter-7 run (SFT or DPO) records of its settings in config.json and its result."""
    return {"task": task, "style": style, "data": data_source, "data_sha256": runs.data_sha256(splits),
            "base_model": base_model, "base_sha256": base_sha256, **extra,
            "pad_multiple": pad_multiple, "allowed_max_length": max_len, "lora": lora.to_dict() if lora else None,
            "pad_token_id": pad_token_id, "train": tcfg.to_dict(), "split_sizes": {k: len(v) for k, v in splits.items()},
            "trainable_params": count_params(trainable)}


def describe(params: dict, settings: dict, lora: lora_lib.LoRAConfig | None, who: str = "model") -> str:
    """The first line a chapter-7 run prints: parameters, what trains, the splits."""
    return (f"{who}: {count_params(params):,} parameters, {settings['trainable_params']:,} trainable"
            f"{f' (LoRA r={lora.rank} alpha={lora.alpha:g})' if lora else ''}; splits "
            + ", ".join(f"{k} {n}" for k, n in settings["split_sizes"].items()))


def greedy_sampler(cfg: GPTConfig, frozen: Any, scale: float, tokenizer: Any, entry: dict, style: str,
                   n_tokens: int, eos_id: int, opts: Options) -> Callable[[Any], str]:
    """The engine's sample hook: `n_tokens` greedy tokens after the prompt of `entry`, decoded with its prompt."""
    ids = encode(tokenizer, format_input(entry, style))

    def sample(trainable) -> str:
        new = generate_batch(lora_lib.full_params(trainable, frozen, scale), cfg, [ids], n_tokens, eos_id=eos_id,
                             opts=opts)[0]
        return tokenizer.decode(ids + new)
    return sample


def respond_and_evaluate(params: dict, cfg: GPTConfig, entries: Sequence[dict], tokenizer: Any, out_dir: Path,
                         *, style: str = "alpaca", max_new_tokens: int = 256, batch_size: int = 8,
                         name: str = "model", progress: bool = False, eos_id: int = PAD_TOKEN_ID,
                         opts: Options | None = None) -> dict:
    """Test-set responses (test-responses.json) and the offline table (eval.json, eval.md) into `out_dir`."""
    t0 = time.time()
    responses, finished = generate_responses(params, cfg, entries, tokenizer, style=style,
                                             max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                                             eos_id=eos_id, return_finished=True, opts=opts)
    gen_s = time.time() - t0
    save_responses(entries, responses, out_dir / RESPONSES_FILE)
    row = offline_report(entries, responses, params=params, cfg=cfg, tokenizer=tokenizer, style=style, name=name,
                         pad_token_id=eos_id, opts=opts)
    row["generate_s"] = round(gen_s, 1)
    row["unfinished"] = finished.count(False)  # answers cut at max_new_tokens, never ending with eos
    runs.write_json_atomic(out_dir / "eval.json", row)
    runs.write_text_atomic(out_dir / "eval.md", format_table([row]) + "\n")
    print(f"test responses saved to {out_dir / RESPONSES_FILE} ({gen_s:.0f} s)\n" + format_table([row]))
    return row


def run_style(run_dir: str | Path | None, default: str = "alpaca") -> str:
    """The prompt style a finetune-instruct (or DPO) run was trained with; `default` for other models."""
    if run_dir is None or not (path := Path(run_dir) / "config.json").is_file():
        return default
    meta = json.loads(path.read_text())
    for task in ("dpo", "instruct"):
        if isinstance(meta.get(task), dict) and meta[task].get("style"):
            return meta[task]["style"]
    return default
