import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import runs
from gptjax.model_io import load_run_config
from gptjax.model import init_params
from gptjax.tasks.dpo import (DPOTrainConfig, PreferenceBatches, collate_preferences, dpo_loss, encode_preferences,
                              finetune_dpo, load_preference_data, sequence_logprobs)
from gptjax.optim import OptimConfig
from test_instruct import EOT, CharTokenizer, char_cfg

PREFS = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris.", "chosen": "It is Paris.",
     "rejected": "Paris, obviously."},
    {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4", "chosen": "The sum is 4.",
     "rejected": "4, duh."},
    {"instruction": "What color is the sky?", "input": "", "output": "Blue.", "chosen": "The sky is blue.",
     "rejected": "Blue. Look up."},
    {"instruction": "Translate to German.", "input": "dog", "output": "Hund", "chosen": "Hund.",
     "rejected": "Hund, easy."},
]


def test_collate_is_the_books():
    item = {"prompt": [1, 2], "chosen": [1, 2, 9, 9, 3, 4], "rejected": [1, 2, 9, 9, 5]}
    b = collate_preferences([item], pad_token_id=0)
    np.testing.assert_array_equal(b["chosen"], [[1, 2, 9, 9, 3, 4, 0]])
    np.testing.assert_array_equal(b["rejected"], [[1, 2, 9, 9, 5, 0, 0]])
    # padding masked; the prompt and the 2 tokens after it masked (the book's "+2")
    np.testing.assert_array_equal(b["chosen_mask"], [[0, 0, 0, 0, 1, 1, 0]])
    np.testing.assert_array_equal(b["rejected_mask"], [[0, 0, 0, 0, 1, 0, 0]])
    b = collate_preferences([item], pad_token_id=0, mask_prompt_tokens=False, allowed_max_length=5)
    np.testing.assert_array_equal(b["chosen_mask"], [[1, 1, 1, 1, 1]])
    b = collate_preferences([item], pad_token_id=0, pad_to=10)
    assert b["chosen"].shape == (1, 10) and b["chosen_mask"][0, 6:].sum() == 0


def test_encode_preferences_masks_exactly_the_answer_with_gpt2_tokens():
    from gptjax.tokenizer import get_gpt2_tokenizer

    tok = get_gpt2_tokenizer()
    b = collate_preferences(encode_preferences(PREFS[:2], tok))
    for row, mask, e in zip(b["chosen"], b["chosen_mask"], PREFS):
        # the book's +2 covers the two "\n" tokens before "### Response:", which is scored with the answer
        assert tok.decode(row[mask]) == "### Response:\n" + e["chosen"]


def test_sequence_logprobs_and_dpo_loss():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, (2, 5))
    mask = np.array([[0, 0, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp[:, :-1], labels[:, 1:, None], -1)[..., 0]
    want = (picked * mask[:, 1:]).sum(-1) / mask[:, 1:].sum(-1)
    np.testing.assert_allclose(sequence_logprobs(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask)), want,
                               rtol=1e-5)
    np.testing.assert_allclose(sequence_logprobs(jnp.asarray(logits), jnp.asarray(labels)), picked.mean(-1), rtol=1e-5)
    pc, pr = jnp.array([-1.0, -2.0]), jnp.array([-3.0, -1.0])
    loss, chosen, rejected = dpo_loss(pc, pr, pc, pr)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-7) and float(chosen) == float(rejected) == 0.0
    # logits (pc - pr) - (rc - rr) = 10 with beta 0.1: -log sigmoid(1)
    loss, chosen, rejected = dpo_loss(jnp.array([0.0]), jnp.array([-10.0]), jnp.array([0.0]), jnp.array([0.0]))
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    assert (float(chosen), float(rejected)) == (0.0, -10.0)
    loss, *_ = dpo_loss(jnp.array([0.0, 5.0]), jnp.array([-10.0, 0.0]), jnp.zeros(2), jnp.zeros(2),
                        valid_B=jnp.array([True, False]))
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)


def test_dpo_starts_at_log2_and_raises_the_margin(tmp_path):
    tok, cfg = CharTokenizer(), char_cfg()
    params = init_params(cfg, jax.random.key(0))
    splits = {"train": PREFS * 2, "val": PREFS[:3], "test": PREFS[:2]}
    tcfg = DPOTrainConfig(epochs=3, batch_size=4, eval_freq=2, eval_iter=1, save_every=100, sample_tokens=0,
                          optim=OptimConfig(lr=3e-3, weight_decay=0.01))
    r = finetune_dpo(params, cfg, splits, tok, tmp_path / "dpo", tcfg=tcfg, pad_token_id=EOT, max_new_tokens=4,
                     progress=False)
    steps = [json.loads(ln) for ln in (tmp_path / "dpo" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 6
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    # rewards are ~0 (the differentiated forward may round differently from the reference's)
    assert abs(steps[0]["chosen_reward"]) < 1e-6 and abs(steps[0]["rejected_reward"]) < 1e-6
    assert r["initial"]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[-1]["reward_margin"] > 0 and steps[-1]["loss"] < math.log(2)
    evals = [json.loads(ln) for ln in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert {"train_loss", "val_loss", "train_reward_margin", "val_chosen_reward",
            "val_rejected_reward"} <= set(evals[0])
    assert evals[-1]["train_reward_margin"] > evals[0]["train_reward_margin"]
    assert (tmp_path / "dpo" / "dpo.png").exists() and (tmp_path / "dpo" / "test-responses.json").exists()
    _, meta = load_run_config(tmp_path / "dpo")
    assert meta["dpo"]["beta"] == 0.1 and meta["status"] == "finished"


def test_preference_batches_fill_and_data_errors(tmp_path):
    items = encode_preferences(PREFS[:3], CharTokenizer())
    b = PreferenceBatches(items, 2, shuffle=False, drop_last=False, pad_multiple=64, pad_token_id=EOT).batch_at(0, 1)
    assert b["chosen"].shape[0] == 2 and b["chosen"].shape[1] % 64 == 0
    assert b["valid"].tolist() == [True, False] and not b["chosen_mask"][1].any()
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b", "chosen": "c"}]))
    with pytest.raises(ValueError, match=r"record 0 lacks \['rejected'\]"):
        load_preference_data(str(path))
    with pytest.raises(ValueError, match="beta must be a positive number"):
        DPOTrainConfig(beta=0.0)


def test_a_resume_refuses_other_data_and_can_start_from_an_older_step(tmp_path, capsys):
    tok, cfg = CharTokenizer(), char_cfg()
    params = init_params(cfg, jax.random.key(0))
    splits = {"train": PREFS * 2, "val": PREFS[:2], "test": []}
    tcfg = DPOTrainConfig(epochs=2, batch_size=4, eval_freq=2, eval_iter=1, save_every=1, keep_checkpoints=4,
                          sample_tokens=0, optim=OptimConfig(lr=3e-3, weight_decay=0.01))  # the test above's steps
    kw = dict(tcfg=tcfg, pad_token_id=EOT, progress=False, respond=False, base_model="sft-run")
    run = tmp_path / "dpo"
    full = finetune_dpo(params, cfg, splits, tok, run, **kw)
    assert load_run_config(run)[1]["dpo"]["data_sha256"] == runs.data_sha256(splits)
    swapped = {**splits, "train": [{**e, "chosen": e["rejected"], "rejected": e["chosen"]} for e in PREFS * 2]}
    with pytest.raises(ValueError, match=r"cannot resume .*: the data differs from what it was trained on"):
        finetune_dpo(params, cfg, swapped, tok, run, resume=True, **kw)
    capsys.readouterr()
    again = finetune_dpo(params, cfg, splits, tok, run, resume=1, **kw)
    assert "(after 1 steps)" in capsys.readouterr().out
    assert again["steps"] == full["steps"] == 4 and again["history"] == full["history"]
    for a, b in zip(jax.tree_util.tree_leaves(again["params"]), jax.tree_util.tree_leaves(full["params"])):
        np.testing.assert_array_equal(a, b)
