"""Direct preference optimization, as the book's chapter-7 bonus (dpo-from-scratch). A batch holds each record's
chosen and rejected text (prompt + "### Response:" + answer), padded to one length and masked to the answer
tokens; both go through the model as one batch of 2B rows. The loss on the policy's and the frozen reference's
mean answer log-probabilities, -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))), is exactly log 2 while
they are equal; rewards are the book's (policy minus reference, no beta). With LoRA the reference is the base."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax import engine, lora as lora_lib, runs
from gptjax.model_io import refuse_existing_run
from gptjax.config import GPTConfig
from gptjax.optim import OptimConfig
from gptjax.sharding import mesh_for
from gptjax.model import GPT
from gptjax.layout import to_canonical
from gptjax.options import Options
from gptjax.tasks.finetune import (PAD_TOKEN_ID, EpochBatches, begin, encode, finetune_options, make_steps,
                                   save_finished, split_trainable)
from gptjax.tasks.instruct import (InstructTrainConfig, chapter7_batches, describe, fit, greedy_sampler,
                                   respond_and_evaluate, run_settings, split_metrics)
from gptjax.tasks.instruct_data import bucket_length, format_example, format_input, load_json_records

PREFERENCE_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
                       "04_preference-tuning-with-dpo/instruction-data-with-preference.json")
PREFERENCE_DATA_SHA256 = "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"


def load_preference_data(source: str | None = None, *, cache_dir: str | None = None) -> list[dict]:
    """The book's instruction-data-with-preference.json (downloaded once), a JSON file, URL or 'hf:NAME'."""
    return load_json_records(source, url=PREFERENCE_DATA_URL, sha256=PREFERENCE_DATA_SHA256,
                             keys=("instruction", "chosen", "rejected"), cache_dir=cache_dir)


# --- data ----------------------------------------------------------------------------------------

def encode_preferences(entries: Sequence[dict], tokenizer: Any, style: str = "alpaca") -> list[dict[str, list[int]]]:
    """The book's PreferenceDataset: token ids of the prompt, and of prompt + response for chosen and rejected."""
    return [{"prompt": encode(tokenizer, format_input(e, style)),
             "chosen": encode(tokenizer, format_example(e, style, "chosen")),
             "rejected": encode(tokenizer, format_example(e, style, "rejected"))} for e in entries]


def collate_preferences(batch: Sequence[dict], *, pad_token_id: int = PAD_TOKEN_ID,
                        allowed_max_length: int | None = None, mask_prompt_tokens: bool = True,
                        pad_to: int | None = None) -> dict[str, np.ndarray]:
    """The book's DPO custom_collate_fn -> chosen_BT, rejected_BT (int32) and their bool masks. Both are padded
    to the longest of either + 1 (at least `pad_to`, a bucket); the mask is False on padding and, with
    `mask_prompt_tokens`, on the prompt and the 2 tokens after it (the book's "+2": the newlines before
    "### Response")."""
    if not batch:
        raise ValueError("collate needs at least one example")
    n = max(pad_to or 0, *(len(item[k]) + 1 for item in batch for k in ("chosen", "rejected")))
    out: dict[str, list] = {k: [] for k in ("chosen", "rejected", "chosen_mask", "rejected_mask")}
    for item in batch:
        for k in ("chosen", "rejected"):
            out[k].append(np.full(n, pad_token_id, np.int32))
            out[k][-1][:len(item[k])] = item[k]
            mask = np.arange(n) < len(item[k])
            if mask_prompt_tokens:
                mask[:len(item["prompt"]) + 2] = False
            out[f"{k}_mask"].append(mask)
    return {k: np.stack(v)[:, :allowed_max_length or None] for k, v in out.items()}


class PreferenceBatches(EpochBatches):
    """Batches of collate_preferences; a last partial batch gets all-masked filler rows (excluded from means)."""

    def __init__(self, items: list[dict], batch_size: int, *, shuffle: bool, drop_last: bool, seed: int = 123,
                 pad_multiple: int = 1, allowed_max_length: int | None = 1024, mask_prompt_tokens: bool = True,
                 pad_token_id: int = PAD_TOKEN_ID, name: str = "data"):
        super().__init__(len(items), batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
        self.check_size(name, "records")
        self.items, self.pad_multiple, self.allowed_max_length = items, pad_multiple, allowed_max_length
        self.mask_prompt_tokens, self.pad_token_id = mask_prompt_tokens, pad_token_id

    def batch_at(self, epoch: int, i: int) -> dict[str, np.ndarray]:
        rows = self.rows(epoch, i)
        items = [self.items[r] for r in rows]
        longest = max(len(it[k]) + 1 for it in items for k in ("chosen", "rejected"))
        pad_to = bucket_length(longest, self.pad_multiple, self.allowed_max_length)
        b = collate_preferences(items, pad_token_id=self.pad_token_id, allowed_max_length=self.allowed_max_length,
                                mask_prompt_tokens=self.mask_prompt_tokens, pad_to=pad_to)
        b["valid"] = np.arange(self.batch_size) < len(rows)
        for k in ("chosen", "rejected"):  # filler rows: padding, fully masked, left out of the means
            b[k], b[f"{k}_mask"] = self.filled(b[k], self.pad_token_id), self.filled(b[f"{k}_mask"], False)
        return b


# --- loss ----------------------------------------------------------------------------------------

def sequence_logprobs(logits_BTV: jax.Array, labels_BT: jax.Array, mask_BT: jax.Array | None = None) -> jax.Array:
    """The book's compute_logprobs: mean log-probability (B,) of labels[:, 1:] under logits[:, :-1], over
    the positions where mask[:, 1:] is True (all positions without a mask)."""
    lp_BT = -optax.softmax_cross_entropy_with_integer_labels(logits_BTV[:, :-1].astype(jnp.float32), labels_BT[:, 1:])
    if mask_BT is None:
        return jnp.mean(lp_BT, axis=-1)
    m_BT = mask_BT[:, 1:].astype(jnp.float32)
    return jnp.sum(lp_BT * m_BT, axis=-1) / jnp.maximum(jnp.sum(m_BT, axis=-1), 1.0)


def dpo_loss(policy_chosen_B: jax.Array, policy_rejected_B: jax.Array, ref_chosen_B: jax.Array,
             ref_rejected_B: jax.Array, beta: float = 0.1,
             valid_B: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The book's compute_dpo_loss -> (mean loss, mean chosen reward, mean rejected reward) over valid rows."""
    logits_B = (policy_chosen_B - policy_rejected_B) - (ref_chosen_B - ref_rejected_B)
    losses_B = -jax.nn.log_sigmoid(beta * logits_B)
    chosen_B = jax.lax.stop_gradient(policy_chosen_B - ref_chosen_B)
    rejected_B = jax.lax.stop_gradient(policy_rejected_B - ref_rejected_B)
    w_B = jnp.ones_like(losses_B) if valid_B is None else valid_B.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w_B), 1.0)
    return jnp.sum(losses_B * w_B) / n, jnp.sum(chosen_B * w_B) / n, jnp.sum(rejected_B * w_B) / n


def _pair_logprobs(params: dict, cfg: GPTConfig, batch: dict, opts: Options = Options()) -> tuple[jax.Array, jax.Array]:
    """(chosen_B, rejected_B) mean answer log-probabilities, one forward over the 2B rows."""
    x_2BT = jnp.concatenate([batch["chosen"], batch["rejected"]])
    m_2BT = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    lp_2B = sequence_logprobs(GPT(cfg, opts).apply({"params": params}, x_2BT, deterministic=True), x_2BT, m_2BT)
    return jnp.split(lp_2B, 2)


@lru_cache(maxsize=8)
def make_loss_fn(cfg: GPTConfig, beta: float = 0.1, lora_scale: float = 1.0, opts: Options = Options()) -> engine.LossFn:
    """The book's DPO loss over `fixed = (frozen base weights, reference params or None: the base, LoRA)`.
    Dropout is off in both models (the book's drop_rate 0), so step 0's loss is exactly log 2."""
    def loss_fn(trainable, fixed, batch, key):
        frozen, ref = fixed
        pol_c, pol_r = _pair_logprobs(lora_lib.full_params(trainable, frozen, lora_scale), cfg, batch, opts)
        ref_c, ref_r = _pair_logprobs(frozen if ref is None else ref, cfg, batch, opts)
        ref_c, ref_r = jax.lax.stop_gradient(ref_c), jax.lax.stop_gradient(ref_r)
        loss, chosen, rejected = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta, batch.get("valid"))
        return loss, {"chosen_reward": chosen, "rejected_reward": rejected, "reward_margin": chosen - rejected}

    return loss_fn


# --- the run -------------------------------------------------------------------------------------

@dataclass
class DPOTrainConfig(InstructTrainConfig):
    """The book's DPO run: chapter 7's, with beta 0.1, AdamW lr 5e-6 and weight decay 0.01, for 1 epoch."""
    epochs: int = 1
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6, weight_decay=0.01))
    beta: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"beta must be a positive number (the book: 0.1), got {self.beta!r}")


@runs.run_task
def finetune_dpo(params: dict, cfg: GPTConfig, data: Sequence[dict] | dict[str, list[dict]], tokenizer: Any,
                 out_dir: str | Path, *, style: str = "alpaca", tcfg: DPOTrainConfig | None = None,
                 lora: lora_lib.LoRAConfig | None = None, mask_prompt_tokens: bool = True, pad_multiple: int = 64,
                 allowed_max_length: int = 1024, base_model: str | None = None, data_source: str | None = None,
                 respond: bool = True, max_new_tokens: int = 256, resume: bool | int = False,
                 overwrite: bool = False, progress: bool = True,
                 stop_after: int | None = None, pad_token_id: int = PAD_TOKEN_ID, sharding: str = "none",
                 fsdp: int | None = None, opts: Options | None = None) -> dict:
    """The book's DPO bonus end to end: the reference is a frozen copy of `params` (an SFT model). Writes what
    finetune_instruct writes (metrics with chosen/rejected rewards and their margin), dpo.png, and scores the test
    responses against the chosen answers. `resume` and `opts` as finetune_instruct's."""
    tcfg = tcfg or DPOTrainConfig()
    opts = finetune_options(opts, lora)
    if not resume:
        refuse_existing_run(out_dir, overwrite=overwrite, resume_hint="`gptjax dpo ... --resume`")
    cfg = cfg.replace(drop_rate=0.0)
    splits, max_len, train_b, val_b = chapter7_batches(PreferenceBatches, encode_preferences, data, tokenizer, cfg,
                                                       tcfg, style, allowed_max_length, pad_multiple, pad_token_id,
                                                       mask_prompt_tokens=mask_prompt_tokens)
    key = jax.random.PRNGKey(tcfg.seed)
    trainable, frozen = split_trainable(params, lora, jax.random.fold_in(key, 1))
    ref = None if lora else params  # LoRA: the frozen base is the reference
    scale = lora.scale if lora else 1.0
    steps = make_steps(partial(make_loss_fn, cfg, tcfg.beta, scale), cfg, tcfg.optim, trainable, (frozen, ref),
                       mesh_for(sharding, fsdp, tcfg.batch_size), sharding, opts)
    state = steps.init_state(trainable, key)
    settings = run_settings("dpo", style, data_source, base_model, pad_multiple, max_len, lora, pad_token_id, tcfg,
                            splits, trainable, runs.tree_sha256(to_canonical(params, cfg, opts)), beta=tcfg.beta,
                            mask_prompt_tokens=mask_prompt_tokens)
    print(describe(params, settings, lora, who="policy") + f"; reference frozen; batches/epoch {len(train_b)}")
    out_dir, meta = begin(out_dir, cfg, opts, "dpo", settings, resume)
    initial = split_metrics(steps, trainable, train_b.epoch(0), val_b.epoch(0), 5)
    print(f"initial: training loss {initial['train_loss']:.4f}, validation loss {initial['val_loss']:.4f} "
          f"(log 2 = {math.log(2):.4f}), reward margins {initial['train_reward_margin']:.3f} / "
          f"{initial['val_reward_margin']:.3f}")
    loop = fit(steps, state, tcfg, train_b, val_b, out_dir, count=lambda b: int(b["chosen"][b["valid"]].size),
               sample=greedy_sampler(cfg, frozen, scale, tokenizer, splits["val"][0], style, tcfg.sample_tokens,
                                     pad_token_id, opts),
               meta=meta, resume=resume, progress=progress, stop_after=stop_after, desc="dpo")
    result = {**settings, "initial": initial, **loop["summary"]}
    if h := loop["history"]:
        runs.plot_history(h, out_dir / "dpo.png", keys=(("train_reward_margin", "Training reward margin"),
                                                        ("val_reward_margin", "Validation reward margin")),
                          ylabel="Reward margin")
    merged, canonical = save_finished(out_dir, loop["state"].params, frozen, lora, cfg, opts, {"dpo": result},
                                      base_model=base_model)
    if respond and splits.get("test"):
        test = [{**e, "output": e["chosen"]} for e in splits["test"]]  # score against the preferred answers
        result["eval"] = respond_and_evaluate(merged, cfg, test, tokenizer, out_dir, style=style,
                                              max_new_tokens=max_new_tokens, batch_size=tcfg.batch_size,
                                              name="dpo", progress=progress, eos_id=pad_token_id, opts=opts)
    return {**result, "history": h, "out_dir": str(out_dir), "params": canonical, "cfg": cfg}
