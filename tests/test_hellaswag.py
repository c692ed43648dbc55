"""HellaSwag: the official JSONL read with one clear error per bad line, batched and padded ending losses equal to a
row-by-row recomputation, and the accuracy from `gptjax evaluate` and at pretraining's eval points."""
import json

import jax
import numpy as np
import pytest

from gptjax.cli import main
from gptjax.config import GPTConfig
from gptjax.model import GPT, init_params
from gptjax.options import Options
from gptjax.tasks import hellaswag
from gptjax.tokenizer import get_gpt2_tokenizer

TINY = ["--emb-dim", "32", "--n-layers", "2", "--n-heads", "4", "--context-length", "16", "--batch-size", "2",
        "--eval-freq", "5", "--eval-iter", "1", "--quiet"]
SENTENCE = "It had always been his fate to have women say such things of him. "
ODD = ["the stock market fell sharply on Monday.", "blue whales migrate across the cold oceans.",
       "quantum computers factor very large numbers."]


def write_items(path, items):
    path.write_text("".join(json.dumps({"ind": i, "activity_label": "x", "ctx_a": "", "ctx_b": "", "split": "val",
                                        "split_type": "indomain", "source_id": "s", **it}) + "\n"
                            for i, it in enumerate(items)))
    return path


def memorized_items():
    """Items whose right ending continues the training sentence; the others are unrelated text."""
    cases = [("It had always been his fate to", "have women say such things of him."),
             ("It had always been his fate to have women", "say such things of him."),
             ("his fate to have women say such", "things of him. It had always been")]
    items = []
    for k, (ctx, right) in enumerate(cases):
        label = (0, 2, 3)[k]
        endings = ODD[:label] + [right] + ODD[label:]
        items.append({"ctx": ctx, "endings": endings, "label": label})
    return items


@pytest.mark.parametrize("line, message", [
    ("{not json", "is not JSON"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"]}', "needs the fields ctx, endings and label"),
    ('{"ctx": "a", "endings": ["b", "c", "d"], "label": 0}', "endings a list of 4 strings"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}', "label must be 0, 1, 2 or 3, got 4"),
    ('["a", "b"]', "needs the fields ctx, endings and label (it has list)"),
])
def test_a_bad_line_is_one_error_naming_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps({"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 1}) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match="hs.jsonl:3") as info:
        hellaswag.load_hellaswag(path)
    assert message in str(info.value)
    assert len(hellaswag.load_hellaswag(path, limit=1)) == 1  # the bad line is never read


def test_missing_empty_and_offline_sources_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass the official JSONL"):
        hellaswag.load_hellaswag(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no items"):
        hellaswag.load_hellaswag(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match=r"GPTJAX_OFFLINE is set .* \(CLI: --hellaswag PATH\)"):
        hellaswag.load_hellaswag("val", cache_dir=tmp_path)  # the tests run offline (conftest)


def test_batched_ending_losses_equal_a_row_by_row_recomputation():
    cfg = GPTConfig(vocab_size=50257, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    params = init_params(cfg, jax.random.key(3))
    tok = get_gpt2_tokenizer()
    items = memorized_items() + [  # the last context is longer than the model's: cropped from the left
        {"ctx": "A man sits down.", "endings": ["He waves.", "", "She reads a long book aloud.", "Go"], "label": 2},
        {"ctx": "One two three four five six seven eight nine ten eleven twelve thirteen fourteen",
         "endings": ["fifteen sixteen", "apples", "fifteen", "a b c d e f g h i j k l m n o p q r s"], "label": 0}]
    got = hellaswag.score(params, cfg, hellaswag.encode(items, tok, 16), batch_size=2, opts=Options())
    model, want = GPT(cfg, Options()), np.zeros((len(items), 4))
    forward = jax.jit(lambda x: model.apply({"params": params}, x))
    for n, item in enumerate(items):
        for e, ending in enumerate(item["endings"]):
            ctx, end = tok.encode(item["ctx"]), tok.encode(" " + ending)
            ids = (ctx + end)[-17:]  # 16 inputs and their targets
            padded = np.zeros((1, 16), np.int32)  # causal: the padding after the row changes none of its logits
            padded[0, :len(ids) - 1] = ids[:-1]
            logits = np.asarray(forward(padded), np.float64)[0, :len(ids) - 1]
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            scored = range(max(len(ids) - 1 - len(end), 0), len(ids) - 1)  # input positions that predict the ending
            want[n, e] = -np.mean([logp[t, ids[t + 1]] for t in scored])
    np.testing.assert_allclose(got["losses"], want, rtol=2e-5)
    assert got["predictions"] == want.argmin(1).tolist() and got["n"] == len(items)
    assert got["accuracy"] == np.mean(want.argmin(1) == [it["label"] for it in items])


def test_pretrain_reports_hellaswag_at_each_eval_and_evaluate_scores_it(tmp_path, capsys):
    corpus, items, run = tmp_path / "corpus.txt", write_items(tmp_path / "hs.jsonl", memorized_items()), tmp_path / "r"
    corpus.write_text(SENTENCE * 30)
    assert main(["pretrain", "--data", str(corpus), "--epochs", "3", "--lr", "3e-3", "--out", str(run), "--hellaswag",
                 str(items), "--hellaswag-limit", "2", *TINY]) == 0
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) > 2 and all(r["hellaswag_acc"] in (0.0, 0.5, 1.0) for r in records)
    assert records[-1]["hellaswag_acc"] == 1.0 and "HellaSwag 1.0000" in capsys.readouterr().out
    # evaluate: only HellaSwag when no --data is given; the right ending of every item has the lowest loss
    assert main(["evaluate", "--model", str(run), "--hellaswag", str(items), "--out", str(tmp_path / "e.json")]) == 0
    got = json.loads((tmp_path / "e.json").read_text())
    assert got["hellaswag"] == {"data": str(items), "accuracy": 1.0, "n": 3, "predictions": [0, 2, 3]}
    assert "loss" not in got and "accuracy 1.0000 (3 items" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(run), "--data", str(corpus), "--hellaswag", str(items), "--limit", "1",
                 "--out", str(tmp_path / "both.json")]) == 0
    both = json.loads((tmp_path / "both.json").read_text())
    assert both["hellaswag"]["n"] == 1 and both["data"] == str(corpus) and both["tokens"] > 0
    assert main(["evaluate", "--model", str(run), "--limit", "1"]) == 2
    assert "--limit counts HellaSwag items" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(corpus), "--out", str(tmp_path / "bad"), "--hellaswag",
                 str(tmp_path / "nope.jsonl"), *TINY]) == 2
    assert "nope.jsonl' does not exist" in capsys.readouterr().err and not (tmp_path / "bad").exists()
