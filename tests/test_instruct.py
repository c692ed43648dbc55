import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import runs
from gptjax.checkpoint import RunExistsError, TrainCheckpoints, TrainingInterrupted
from gptjax.model_io import load_run, load_run_config
from gptjax.config import GPTConfig
from gptjax.lora import LoRAConfig, load_adapters
from gptjax.model import GPT, abstract_params, init_params
from gptjax.layout import to_layout
from gptjax.options import Options
from gptjax.tasks.instruct import InstructTrainConfig, finetune_instruct, format_table, generate_responses, offline_report, response_nll, save_responses
from gptjax.tasks.instruct_data import IGNORE_INDEX, InstructionBatches, bucket_length, collate, encode_examples, extract_response, format_example, format_input, load_instruction_data, split_data
from gptjax.engine import cross_entropy
from gptjax.optim import OptimConfig

EOT = 256


class CharTokenizer:
    """Lossless byte-level tokenizer (257 ids, end-of-text 256): keeps test models tiny and fast."""
    eot_token = EOT

    def encode(self, text, **kw):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", "replace")

    def decode_single_token_bytes(self, t):
        return bytes([t]) if t < 256 else b""


def char_cfg(**kw) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=257, context_length=256, emb_dim=64, n_heads=4, n_layers=1, drop_rate=0.0,
                               tie_embeddings=True), **kw})


RECORDS = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris."},
    {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
    {"instruction": "What color is the sky?", "input": "", "output": "Blue."},
    {"instruction": "Translate to German.", "input": "dog", "output": "Hund"},
]
FAST = dict(eval_freq=1000, eval_iter=1, save_every=1000, sample_tokens=0)


def test_format_input_alpaca_and_phi3():
    e = {"instruction": "Rewrite the sentence.", "input": "The car is fast.", "output": "It is quick."}
    assert format_input(e) == ("Below is an instruction that describes a task. Write a response that appropriately "
                               "completes the request.\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\n"
                               "The car is fast.")
    assert format_input({**e, "input": ""}).endswith("### Instruction:\nRewrite the sentence.")
    assert format_example(e).endswith("The car is fast.\n\n### Response:\nIt is quick.")
    assert format_input(e, "phi3") == "<|user|>\nRewrite the sentence.\nThe car is fast."
    assert format_example({**e, "input": ""}, "phi3") == "<|user|>\nRewrite the sentence.\n<|assistant|>:\nIt is quick."
    with pytest.raises(ValueError, match="unknown prompt style 'chatml'"):
        format_input(e, "chatml")
    prompt = format_input(e)
    assert extract_response(prompt + "\n\n### Response:\nIt is quick.", prompt) == "It is quick."
    assert extract_response("<|user|>\nx\n<|assistant|>:\nok ", "<|user|>\nx", "phi3") == "ok"


def test_split_is_the_books_in_file_order():
    data = [{"instruction": str(i), "output": str(i)} for i in range(1100)]
    s = split_data(data)
    assert (len(s["train"]), len(s["test"]), len(s["val"])) == (935, 110, 55)
    assert s["train"][0]["instruction"] == "0" and s["test"][0]["instruction"] == "935"
    assert s["val"][0]["instruction"] == "1045" and s["val"][-1]["instruction"] == "1099"


def test_load_instruction_data(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    assert load_instruction_data(path) == [{"instruction": "a", "output": "b", "input": ""}]
    path.write_text(json.dumps([{"instruction": "a"}]))
    with pytest.raises(ValueError, match=r"record 0 lacks \['output'\]"):
        load_instruction_data(path)
    path.write_text(json.dumps([{"instruction": "a", "output": 7, "input": ["x"]}]))
    with pytest.raises(ValueError, match=r"record 0 has non-text fields \{'output': 'int', 'input': 'list'\}; every "
                                         r"field the prompts use must be a string"):
        load_instruction_data(path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_instruction_data(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="GPTJAX_OFFLINE is set.*pass a local copy"):
        load_instruction_data(None, cache_dir=tmp_path / "cache")


def test_collate_is_the_books():
    # the book's example batch (section 7.3)
    x, y = collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    np.testing.assert_array_equal(x, [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]])
    np.testing.assert_array_equal(y, [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]])
    assert x.dtype == y.dtype == np.int32
    x, y = collate([[0, 1, 2, 3, 4], [5, 6]], allowed_max_length=3)
    np.testing.assert_array_equal(y, [[1, 2, 3], [6, 50256, -100]])
    # exercise 7.2: the first n tokens are the instruction, targets[:n - 1] ignored
    _, y = collate([[0, 1, 2, 3, 4], [5, 6]], mask_lengths=[3, 1])
    np.testing.assert_array_equal(y, [[-100, -100, 3, 4, 50256], [6, 50256, -100, -100, -100]])
    # a bucket: more padding, all of it ignored
    x, y = collate([[0, 1, 2], [5]], pad_to=6)
    np.testing.assert_array_equal(x, [[0, 1, 2, 50256, 50256, 50256], [5, 50256, 50256, 50256, 50256, 50256]])
    np.testing.assert_array_equal(y, [[1, 2, 50256, -100, -100, -100], [50256, -100, -100, -100, -100, -100]])
    assert bucket_length(65, 64) == 128 and bucket_length(65, 64, cap=100) == 100 and bucket_length(7, 1) == 7


def test_loss_ignores_minus_100_and_buckets_keep_it(tiny_cfg):
    rng = np.random.default_rng(0)
    items = [list(rng.integers(0, 90, n)) for n in (5, 2, 9)]
    params = init_params(tiny_cfg, jax.random.key(0))
    apply = jax.jit(GPT(tiny_cfg).apply)
    x, y = collate(items, pad_token_id=96)
    logits = apply({"params": params}, x)
    valid = y != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, axis=-1)
    manual = -np.mean(np.asarray(jnp.take_along_axis(logp, jnp.where(valid, y, 0)[..., None], -1)[..., 0])[valid])
    loss = cross_entropy(logits, y)
    np.testing.assert_allclose(loss, manual, rtol=1e-6)
    # what the ignored positions predict does not matter
    np.testing.assert_allclose(cross_entropy(jnp.where(valid[..., None], logits, 50.0), y), loss, rtol=1e-6)
    xb, yb = collate(items, pad_token_id=96, pad_to=16)
    assert xb.shape == (3, 16)
    np.testing.assert_allclose(cross_entropy(apply({"params": params}, xb), yb), loss, rtol=1e-5)


def test_encode_examples_with_gpt2_tokens():
    from gptjax.tokenizer import get_gpt2_tokenizer

    tok = get_gpt2_tokenizer()
    ex = encode_examples(RECORDS[:2], tok)
    for e, ids, n_inst, n_resp in zip(RECORDS, ex.ids, ex.instruction_len, ex.response_start):
        assert tok.decode(ids) == format_example(e)
        assert tok.decode(ids[:n_inst]) == format_input(e)
        assert tok.decode(ids[n_resp:]) == e["output"]
    b = InstructionBatches(ex, 2, shuffle=False, drop_last=False, mask="prompt", pad_multiple=64)
    x, y = b.batch_at(0, 0)
    assert x.shape == (2, 64)
    # only the answer and one end-of-text are scored
    assert [tok.decode(row[row != IGNORE_INDEX][:-1]) for row in y] == ["Paris.", "4"]


def test_batches_buckets_and_filler():
    ex = encode_examples([{"instruction": "x" * n, "input": "", "output": "y"} for n in (10, 70, 130, 20, 5)],
                         CharTokenizer())
    b = InstructionBatches(ex, 2, shuffle=True, drop_last=True, pad_multiple=64, allowed_max_length=200,
                           pad_token_id=EOT)
    assert len(b) == 2 and b.shapes(0) <= {(2, 192), (2, 200), (2, 128)}
    v = InstructionBatches(ex, 2, shuffle=False, drop_last=False, pad_multiple=64, allowed_max_length=200,
                           pad_token_id=EOT)
    x, y = v.batch_at(0, 2)  # one real row, one filler row
    assert x.shape[0] == 2 and (y[1] == IGNORE_INDEX).all() and (y[0] != IGNORE_INDEX).any()
    with pytest.raises(ValueError, match="fewer than batch_size=8"):
        InstructionBatches(ex, 8, shuffle=True, drop_last=True)
    with pytest.raises(ValueError, match="unknown prompt mask"):
        InstructionBatches(ex, 2, shuffle=True, drop_last=True, mask="all")


def test_tiny_model_memorises_instructions(tmp_path):
    tok = CharTokenizer()
    cfg = char_cfg()
    params = init_params(cfg, jax.random.key(0))
    splits = {"train": RECORDS, "val": RECORDS[:2], "test": RECORDS}
    tcfg = InstructTrainConfig(epochs=80, batch_size=4, optim=OptimConfig(lr=5e-3, weight_decay=0.0), **FAST)
    r = finetune_instruct(params, cfg, splits, tok, tmp_path / "run", tcfg=tcfg, mask="instruction", pad_multiple=64,
                          max_new_tokens=24, progress=False, pad_token_id=EOT)
    records = json.loads((tmp_path / "run" / "test-responses.json").read_text())
    assert [e["model_response"] for e in records] == [e["output"] for e in RECORDS]
    assert records[0].keys() == {"instruction", "input", "output", "model_response"}
    assert r["eval"]["exact_match"] == 1.0 and r["eval"]["rouge_l"] == 1.0 and r["eval"]["ref_loss"] < 0.05
    assert r["eval"]["unfinished"] == 0  # every answer ended with end-of-text
    assert r["compiled_shapes"]["train"] == [[[4, 192], [4, 192]]]
    cfg_saved, meta = load_run_config(tmp_path / "run")
    assert meta["instruct"]["style"] == "alpaca" and meta["status"] == "finished"
    assert (tmp_path / "run" / "eval.md").read_text().startswith("| model |")
    steps = [json.loads(ln) for ln in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 80 and steps[-1]["loss"] < steps[0]["loss"] / 100
    loaded, _ = load_run(tmp_path / "run")
    np.testing.assert_allclose(loaded["wte"]["embedding"], r["params"]["wte"]["embedding"])


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    tok, cfg = CharTokenizer(), char_cfg()
    splits = {"train": RECORDS * 2, "val": RECORDS[:2], "test": []}
    tcfg = InstructTrainConfig(epochs=2, batch_size=2, eval_freq=2, eval_iter=1, save_every=0, sample_tokens=0,
                               optim=OptimConfig(lr=1e-3))
    kw = dict(tcfg=tcfg, pad_token_id=EOT, progress=False, respond=False)
    full = finetune_instruct(init_params(cfg, jax.random.key(0)), cfg, splits, tok, tmp_path / "a", **kw)
    with pytest.raises(TrainingInterrupted, match="after 3 steps as asked") as info:
        finetune_instruct(init_params(cfg, jax.random.key(0)), cfg, splits, tok, tmp_path / "b", stop_after=3, **kw)
    assert info.value.step == 3
    config_before = (tmp_path / "b" / "config.json").read_text()
    with pytest.raises(RunExistsError, match="already holds a run .checkpoint after 3 steps.*--resume.*--overwrite"):
        finetune_instruct(init_params(cfg, jax.random.key(0)), cfg, splits, tok, tmp_path / "b", **kw)
    assert (tmp_path / "b" / "config.json").read_text() == config_before  # refused before writing anything
    resumed = finetune_instruct(init_params(cfg, jax.random.key(0)), cfg, splits, tok, tmp_path / "b", resume=True,
                                **kw)
    assert resumed["steps"] == full["steps"] == 8
    np.testing.assert_array_equal(resumed["params"]["h_0"]["mlp"]["c_fc"]["kernel"],
                                  full["params"]["h_0"]["mlp"]["c_fc"]["kernel"])
    assert resumed["history"]["val_loss"] == full["history"]["val_loss"]
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "b" / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(8))


def test_a_resume_checks_its_data_and_base_model_and_can_start_from_an_older_step(tmp_path, capsys):
    tok, cfg = CharTokenizer(), char_cfg()
    splits = {"train": RECORDS * 2, "val": RECORDS[:2], "test": []}
    tcfg = InstructTrainConfig(epochs=1, batch_size=2, eval_freq=2, eval_iter=1, save_every=2, keep_checkpoints=2,
                               sample_tokens=0, optim=OptimConfig(lr=1e-3))
    kw = dict(tcfg=tcfg, pad_token_id=EOT, progress=False, respond=False, base_model="random")
    params = init_params(cfg, jax.random.key(0))
    run = tmp_path / "run"
    full = finetune_instruct(params, cfg, splits, tok, run, **kw)
    recorded = load_run_config(run)[1]["instruct"]
    assert recorded["data_sha256"] == runs.data_sha256(splits) and recorded["base_model"] == "random"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    edited = {**splits, "train": [{**RECORDS[0], "output": "Lyon."}] + RECORDS[1:] + RECORDS}
    with pytest.raises(ValueError, match=rf"^cannot resume '{run}': the data differs from what it was trained on "
                                         r"\(sha256 [0-9a-f]{12}\.\.\. vs [0-9a-f]{12}\.\.\.\)\. Resume with the "
                                         r"original data and base model \(--data, --model\), or start a new run"):
        finetune_instruct(params, cfg, edited, tok, run, resume=True, **kw)
    other = init_params(cfg, jax.random.key(1))  # the same name, other weights: checked by content
    with pytest.raises(ValueError, match=r"the base model's weights differ from those it was trained from \('random', "
                                         r"sha256 [0-9a-f]{12}\.\.\. vs [0-9a-f]{12}\.\.\.\)"):
        finetune_instruct(other, cfg, splits, tok, run, resume=True, **kw)
    assert recorded["base_sha256"] == runs.tree_sha256(params)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # refused before touching it
    capsys.readouterr()
    again = finetune_instruct(params, cfg, splits, tok, run, resume=2, **kw)  # an older step of the finished run
    assert f"resuming from {run / 'checkpoints' / '2'} (after 2 steps)" in capsys.readouterr().out
    assert again["steps"] == full["steps"] == 4 and again["history"]["val_loss"] == full["history"]["val_loss"]
    for a, b in zip(jax.tree_util.tree_leaves(again["params"]), jax.tree_util.tree_leaves(full["params"])):
        np.testing.assert_array_equal(a, b)
    assert [json.loads(ln)["step"] for ln in (run / "steps.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_checkpoints_hold_canonical_params_and_resume_exactly_in_another_layout(tmp_path):
    """Trained with (out, in) kernels: the checkpoints and params/ hold (in, out) ones, and a resume
    converts them (and AdamW's moments) back and continues as the uninterrupted run."""
    tok, cfg = CharTokenizer(), char_cfg()
    opts = Options.for_backend(linear_layout="out_in")
    splits = {"train": RECORDS * 2, "val": RECORDS[:2], "test": []}
    tcfg = InstructTrainConfig(epochs=1, batch_size=2, eval_freq=2, eval_iter=1, save_every=0, sample_tokens=2,
                               optim=OptimConfig(lr=1e-3))
    kw = dict(tcfg=tcfg, pad_token_id=EOT, progress=False, respond=False, opts=opts)
    start = lambda: to_layout(init_params(cfg, jax.random.key(0)), cfg, opts)  # noqa: E731
    full = finetune_instruct(start(), cfg, splits, tok, tmp_path / "a", **kw)
    with pytest.raises(TrainingInterrupted):
        finetune_instruct(start(), cfg, splits, tok, tmp_path / "b", stop_after=3, **kw)
    ckpts = TrainCheckpoints(tmp_path / "b" / "checkpoints", read_only=True)
    saved, rest, _ = ckpts.restore({"params": abstract_params(cfg)}, None)
    ckpts.close()
    assert saved["params"]["h_0"]["mlp"]["c_fc"]["kernel"].shape == (cfg.emb_dim, 4 * cfg.emb_dim)
    resumed = finetune_instruct(start(), cfg, splits, tok, tmp_path / "b", resume=True, **kw)
    assert resumed["steps"] == full["steps"] == 4
    assert resumed["history"]["val_loss"] == full["history"]["val_loss"]
    for a, b in zip(jax.tree_util.tree_leaves(resumed["params"]), jax.tree_util.tree_leaves(full["params"])):
        np.testing.assert_array_equal(a, b)
    loaded, _ = load_run(tmp_path / "b")
    np.testing.assert_array_equal(loaded["h_0"]["mlp"]["c_fc"]["kernel"],
                                  full["params"]["h_0"]["mlp"]["c_fc"]["kernel"])
    assert json.loads((tmp_path / "b" / "config.json").read_text())["options"] == opts.to_dict()


def test_lora_trains_adapters_only(tmp_path):
    tok, cfg = CharTokenizer(), char_cfg(drop_rate=0.1)
    params = init_params(cfg, jax.random.key(0))
    tcfg = InstructTrainConfig(epochs=3, batch_size=2, optim=OptimConfig(lr=1e-2), **FAST)
    r = finetune_instruct(params, cfg, {"train": RECORDS, "val": RECORDS[:2], "test": []}, tok, tmp_path / "lora",
                          tcfg=tcfg, lora=LoRAConfig(rank=4, alpha=8), pad_token_id=EOT, progress=False)
    assert r["trainable_params"] == (3 * 4 * (64 + 64) + 4 * (64 + 64) + 4 * (64 + 256) + 4 * (256 + 64))
    lora, _, lcfg, meta = load_adapters(tmp_path / "lora" / "adapters.safetensors")
    assert lcfg.rank == 4 and set(lora["h_0"]) == {"attn", "mlp"}
    assert not np.allclose(r["params"]["h_0"]["attn"]["c_attn"]["kernel"], params["h_0"]["attn"]["c_attn"]["kernel"])
    np.testing.assert_array_equal(r["params"]["wte"]["embedding"], params["wte"]["embedding"])  # not adapted


def test_response_nll_and_offline_table(tmp_path):
    tok, cfg = CharTokenizer(), char_cfg()
    params = init_params(cfg, jax.random.key(0))
    nll = response_nll(params, cfg, RECORDS, tok, pad_token_id=EOT)
    assert nll["tokens"] == sum(len(e["output"]) + 1 for e in RECORDS)  # answer bytes + end-of-text
    assert 4.0 < nll["loss"] < 7.0 and nll["perplexity"] == pytest.approx(math.exp(nll["loss"]))
    row = offline_report(RECORDS, ["Paris.", "five", "Blue", "Hund!"], params=params, cfg=cfg, tokenizer=tok,
                         name="m", pad_token_id=EOT)
    assert row["exact_match"] == 0.25 and row["rouge_l"] == pytest.approx(0.75)
    table = format_table([row, {"model": "book", "n": 4, "rouge_l": 0.5}])
    assert "| m | 4 |" in table and "| book | 4 | - |" in table
    out = save_responses(RECORDS[:1], ["Paris."], tmp_path / "r.json")
    assert json.loads(out.read_text())[0]["model_response"] == "Paris."
    responses = generate_responses(params, cfg, RECORDS, tok, max_new_tokens=3, batch_size=3, eos_id=EOT)
    assert len(responses) == 4 and all(isinstance(s, str) for s in responses)


def test_finetune_rejects_model_without_gpt2_vocab(tmp_path, tiny_cfg):
    from gptjax.tokenizer import get_gpt2_tokenizer

    with pytest.raises(ValueError, match="vocab_size=97 cannot hold the end-of-text token 50256"):
        finetune_instruct(init_params(tiny_cfg, jax.random.key(0)), tiny_cfg, RECORDS * 3, get_gpt2_tokenizer(),
                          tmp_path / "x")


def test_cli_bad_input(tmp_path, capsys):
    from gptjax.cli import main

    assert main(["finetune-instruct", "--data", str(tmp_path / "none.json"), "--out", str(tmp_path / "x")]) == 2
    assert "none.json" in capsys.readouterr().err
    data = tmp_path / "d.json"
    data.write_text(json.dumps(RECORDS * 5))
    assert main(["finetune-instruct", "--data", str(data), "--model", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["dpo", "--model", "random", "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "record 0 lacks ['chosen', 'rejected']" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_finetune_respond_judge_dpo_chat(tmp_path, capsys, monkeypatch):
    from gptjax.cli import main

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{**e, "chosen": e["output"], "rejected": e["output"] + " Obviously."}
                                for e in RECORDS * 5]))  # 20 records: 17 train, 2 test, 1 val
    tiny = ["--model", "random", "--emb-dim", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "128",
            "--tie-embeddings", "--batch-size", "4", "--eval-freq", "2", "--eval-iter", "1", "--quiet",
            "--max-new-tokens", "3", "--data", str(data)]
    run = tmp_path / "sft"
    assert main(["finetune-instruct", *tiny, "--epochs", "1", "--lr", "1e-3", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "train step compiled for 1 batch shape(s)" in out and "| random | 2 |" in out
    assert len(json.loads((run / "test-responses.json").read_text())) == 2
    # --linear-layout auto trains (out, in) kernels on CPU; the run loads as (in, out) (the two layouts'
    # losses are compared in test_classify's CLI run, through the same option)
    assert json.loads((run / "config.json").read_text())["options"]["linear_layout"] == "out_in"
    params, cfg = load_run(run)
    assert params["h_0"]["mlp"]["c_fc"]["kernel"].shape == (cfg.emb_dim, 4 * cfg.emb_dim)  # (in, out)
    # a resume takes the base model, its architecture and the data the run recorded; other data is refused
    other = tmp_path / "other.json"
    other.write_text(json.dumps(json.loads(data.read_text())[::-1]))
    assert main(["finetune-instruct", "--resume", str(run), "--data", str(other), "--quiet"]) == 2
    assert "the data differs from what it was trained on" in capsys.readouterr().err
    assert main(["finetune-instruct", "--resume", str(run), "--step", "4", "--no-respond"]) == 0  # RUN/command.toml
    assert load_run(run)[1] == cfg
    capsys.readouterr()
    assert main(["finetune-instruct", *tiny, "--lora-rank", "2", "--linear-layout", "out_in",
                 "--out", str(tmp_path / "x")]) == 2
    assert "LoRA adapters train on (in, out) kernels; drop --linear-layout out_in" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    assert main(["respond", "--run", str(run), "--data", str(data), "--limit", "3", "--max-new-tokens", "2",
                 "--out", str(tmp_path / "r.json"), "--quiet"]) == 0
    out32 = capsys.readouterr().out
    assert "3 responses (alpaca prompts)" in out32
    # the same from int8 weights (the tied head too): the reference answers' loss barely moves
    assert main(["respond", "--run", str(run), "--data", str(data), "--limit", "3", "--max-new-tokens", "2",
                 "--out", str(tmp_path / "r8.json"), "--quiet", "--weight-dtype", "int8"]) == 0
    out8 = capsys.readouterr().out
    assert "3 responses (alpaca prompts)" in out8
    loss32, loss8 = (float(re.search(r"\| 3 \| ([\d.]+) \|", o).group(1)) for o in (out32, out8))
    assert abs(loss8 - loss32) < 0.01 * loss32
    assert main(["judge", "--data", str(tmp_path / "r.json"), "--offline", "--run", str(run)]) == 0
    assert "ref. perplexity" in capsys.readouterr().out

    assert main(["dpo", "--model", str(run), "--data", str(data), "--batch-size", "4", "--eval-freq", "2",
                 "--eval-iter", "1", "--lora-rank", "2", "--no-respond", "--quiet",
                 "--out", str(tmp_path / "dpo")]) == 0
    assert "val reward margin" in capsys.readouterr().out
    first = json.loads((tmp_path / "dpo" / "steps.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)

    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Name a color.\n/quit\n"))
    assert main(["chat", "--model", str(tmp_path / "dpo"), "--max-new-tokens", "3"]) == 0
    assert "Model: " in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Name a color.\n/quit\n"))
    assert main(["chat", "--model", str(tmp_path / "dpo"), "--max-new-tokens", "3", "--weight-dtype", "int8"]) == 0
    assert "Model: " in capsys.readouterr().out


def test_fresh_run_refuses_an_out_dir_holding_checkpoints(tmp_path):
    from gptjax.tasks.dpo import finetune_dpo

    tok, cfg = CharTokenizer(), char_cfg()
    (tmp_path / "checkpoints" / "7").mkdir(parents=True)
    splits = {"train": RECORDS, "val": RECORDS[:2], "test": []}
    with pytest.raises(RunExistsError, match="finetune-instruct ... --resume"):
        finetune_instruct(init_params(cfg, jax.random.key(0)), cfg, splits, tok, tmp_path, pad_token_id=EOT,
                          progress=False, respond=False)
    with pytest.raises(RunExistsError, match="gptjax dpo ... --resume"):
        finetune_dpo(init_params(cfg, jax.random.key(0)), cfg, splits, tok, tmp_path, pad_token_id=EOT,
                     progress=False, respond=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]  # nothing written, nothing deleted
    assert (tmp_path / "checkpoints" / "7").is_dir()


def test_lora_on_out_in_kernels_is_refused_by_every_fine_tuning_task(tmp_path):
    """The Python API checks what the CLI checks: LoRA's (in, out) adapters never meet (out, in) kernels (a square
    c_proj would take a transposed update silently)."""
    from gptjax.tasks.classify import finetune_classifier
    from gptjax.tasks.classify_data import LabeledTexts
    from gptjax.tasks.dpo import finetune_dpo

    tok, cfg = CharTokenizer(), char_cfg()
    opts, lora = Options(linear_layout="out_in"), LoRAConfig(rank=2)
    params = to_layout(init_params(cfg, jax.random.key(0)), cfg, opts)
    splits = {"train": RECORDS, "val": RECORDS[:2], "test": []}
    texts = LabeledTexts(["spam spam", "ham ok"] * 4, np.array([1, 0] * 4, np.int32), ("ham", "spam"))
    calls = [lambda out: finetune_instruct(params, cfg, splits, tok, out, lora=lora, opts=opts, pad_token_id=EOT,
                                           progress=False, respond=False),
             lambda out: finetune_dpo(params, cfg, splits, tok, out, lora=lora, opts=opts, pad_token_id=EOT,
                                      progress=False, respond=False),
             lambda out: finetune_classifier(params, cfg, {"train": texts, "val": texts}, tok, out, lora=lora,
                                             opts=opts, pad_token_id=EOT, progress=False)]
    for i, call in enumerate(calls):
        with pytest.raises(ValueError, match="LoRA adapters train on .in, out. kernels.*linear_layout='in_out'"):
            call(tmp_path / str(i))
        assert not (tmp_path / str(i) / "config.json").exists()
