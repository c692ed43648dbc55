import json
import os
from types import SimpleNamespace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax.model_io import load_run, save_run
from gptjax.cli import main
from gptjax.config import get_config
from gptjax.lora import LoRAConfig, combine, init_lora, partition
from gptjax.model import count_params, init_params
from gptjax.tasks.classify import IGNORE_LABEL, PAD_TOKEN_ID, ClassBatches, Classifier, ClassifierTrainConfig, _loss_and_correct, book_split, classifier_from_adapters, classify, encode_texts, evaluate_split, make_classifier_steps, to_classifier, train_classifier, trainable_mask
from gptjax.tasks.classify_data import balance_indices, load_labeled_texts, random_split_indices, read_labeled_table
from gptjax.tokenizer import get_gpt2_tokenizer
from gptjax.optim import OptimConfig, make_optimizer

SHARED = Path(os.environ.get("GPTJAX_SHARED_DATA", "/work/shared/data"))
SMS = SHARED / "SMSSpamCollection" if (SHARED / "SMSSpamCollection").is_file() else SHARED


@pytest.fixture(scope="module")
def tok():
    return get_gpt2_tokenizer()


@pytest.mark.skipif(not SMS.is_file(), reason="no local SMSSpamCollection (set GPTJAX_SHARED_DATA)")
def test_sms_spam_exact_book_split():
    data = load_labeled_texts(SMS)
    assert len(data) == 5572 and data.counts() == {"ham": 4825, "spam": 747}  # pandas-style quoting
    splits = book_split(data)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1045, "val": 149, "test": 300}
    assert sum(v.counts()["spam"] for v in splits.values()) == 747
    pd = pytest.importorskip("pandas")
    # the book's create_balanced_dataset + random_split, row for row
    df = pd.read_csv(SMS, sep="\t", header=None, names=["Label", "Text"])
    n_spam = df[df["Label"] == "spam"].shape[0]
    balanced = pd.concat([df[df["Label"] == "ham"].sample(n_spam, random_state=123), df[df["Label"] == "spam"]])
    balanced = balanced.sample(frac=1, random_state=123).reset_index(drop=True)
    assert list(balanced["Text"][:1045]) == splits["train"].texts
    assert list(balanced["Text"][1045 + 149:]) == splits["test"].texts
    assert list(balanced["Label"][1045:1045 + 149].map({"ham": 0, "spam": 1})) == splits["val"].labels_N.tolist()


def test_balance_and_split_follow_numpy_randomstate():
    labels_N = np.array([0] * 10 + [1] * 4 + [0] * 3)
    idx_N = balance_indices(labels_N, seed=123)
    ham_N = np.flatnonzero(labels_N == 0)
    # pandas .sample(n, random_state=123) == RandomState(123).permutation(N)[:n]; the minority stays in order
    np.testing.assert_array_equal(idx_N, np.r_[ham_N[np.random.RandomState(123).permutation(13)[:4]], 10, 11, 12, 13])
    tr, va, te = random_split_indices(1494, 0.7, 0.1, seed=123)
    assert (len(tr), len(va), len(te)) == (1045, 149, 300)
    np.testing.assert_array_equal(np.r_[tr, va, te], np.random.RandomState(123).permutation(1494))
    with pytest.raises(ValueError, match="split fractions"):
        random_split_indices(10, 0.9, 0.2)


def test_read_table_quoting_header_and_labels(tmp_path):
    # a field that opens with a quote swallows lines up to the closing quote, as pandas' read_csv does
    p = tmp_path / "d.tsv"
    p.write_text('ham\thello\nspam\t"win\nham\tlost line"\nham\tbye\n')
    labels, texts = read_labeled_table(p)
    assert labels == ["ham", "spam", "ham"] and texts[1] == "win\nham\tlost line"
    c = tmp_path / "d.csv"
    c.write_text('text,sentiment\n"good, very",pos\nbad,neg\nok,pos\n')
    data = load_labeled_texts(c, label_col="sentiment", text_col="text")
    assert data.texts == ["good, very", "bad", "ok"] and data.label_names == ("neg", "pos")
    assert data.labels_N.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"not among the label names \['pos', 'x'\]"):
        load_labeled_texts(c, label_col="sentiment", text_col="text", label_names=["pos", "x"])
    with pytest.raises(ValueError, match="no column 'nope'"):
        load_labeled_texts(c, label_col="nope", text_col="text")
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        load_labeled_texts(tmp_path / "missing.tsv")


def test_padding_and_truncation(tok):
    texts = ["Hi", "Hello there, how are you today?", ""]
    ids_NT, T = encode_texts(texts, tok)
    n = len(tok.encode(texts[1]))
    assert T == n and ids_NT.shape == (3, n)
    assert ids_NT[0, 1:].tolist() == [PAD_TOKEN_ID] * (n - 1) and (ids_NT[2] == PAD_TOKEN_ID).all()
    assert ids_NT[1].tolist() == tok.encode(texts[1])
    short, T = encode_texts(texts, tok, max_length=3)
    assert T == 3 and short[1].tolist() == tok.encode(texts[1])[:3]
    ctx, T = encode_texts(texts, tok, context_length=4)  # never longer than the model's context
    assert T == 4 and ctx.shape == (3, 4)
    # <|endoftext|> inside a message is plain text, not the pad/control token
    assert PAD_TOKEN_ID not in encode_texts(["a <|endoftext|> b"], tok)[0][0].tolist()


def test_batches_drop_last_and_fill():
    ids_NT, y_N = np.arange(10 * 3).reshape(10, 3), np.arange(10) % 2
    train = ClassBatches(ids_NT, y_N, 4, shuffle=True, drop_last=True, seed=1)
    assert len(train) == 2 and train.num_examples == 8
    assert sorted(np.concatenate([x[:, 0] for x, _ in train.epoch(0)]).tolist()) != list(range(0, 24, 3))  # shuffled
    val = ClassBatches(ids_NT, y_N, 4, shuffle=False, drop_last=False)
    batches = list(val.epoch(0))
    assert len(batches) == 3 and all(x.shape == (4, 3) for x, _ in batches)
    assert batches[-1][1].tolist() == [0, 1, IGNORE_LABEL, IGNORE_LABEL]
    with pytest.raises(ValueError, match="fewer than batch_size"):
        ClassBatches(ids_NT, y_N, 16, shuffle=True, drop_last=True)


def test_accuracy_and_loss_skip_filler_rows():
    logits_BC = jnp.array([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [5.0, -5.0]])
    y_B = jnp.array([0, 0, 0, IGNORE_LABEL])
    loss, correct, count = _loss_and_correct(logits_BC, y_B)
    assert int(correct) == 2 and int(count) == 3
    expected = optax.softmax_cross_entropy_with_integer_labels(logits_BC[:3], y_B[:3]).mean()
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
    # the book's calc_loss_loader: mean of per-batch losses; accuracy over examples
    outs = iter([{"loss": 1.0, "correct": 3, "count": 4}, {"loss": 3.0, "correct": 1, "count": 1}])
    steps = SimpleNamespace(eval_step=lambda *a: next(outs))
    assert evaluate_split(steps, None, [0, 1]) == (2.0, 0.8)


def test_trainable_masks(tiny_cfg):
    params, cfg = to_classifier(init_params(tiny_cfg, jax.random.key(0)), tiny_cfg, 3, jax.random.key(1))
    assert cfg.n_classes == 3 and "lm_head" not in params and params["cls_head"]["kernel"].shape == (32, 3)
    assert float(jnp.abs(params["cls_head"]["bias"]).max()) <= 1 / np.sqrt(32)  # torch Linear init

    def tops(spec):
        train, _ = partition(params, trainable_mask(params, spec))
        return sorted(train)

    assert tops("last-block") == ["cls_head", "h_1", "ln_f"]  # the book's choice
    assert tops("last-2") == ["cls_head", "h_0", "h_1", "ln_f"]
    assert tops("head") == ["cls_head"] and tops("none") == []
    assert tops("all") == sorted(params)
    train, frozen = partition(params, trainable_mask(params, "last-block"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, combine(frozen, train), params)
    for bad, msg in (("last-3", "has 2 blocks"), ("middle", "unknown layers")):
        with pytest.raises(ValueError, match=msg):
            trainable_mask(params, bad)


def _synthetic(n: int, T: int, seed: int = 0):
    """Separable: class 1 sequences contain token 7, class 0 ones token 5, among random filler 10..96."""
    rng = np.random.default_rng(seed)
    ids_NT = rng.integers(10, 97, (n, T)).astype(np.int32)
    y_N = np.arange(n) % 2
    pos_N = rng.integers(0, T, n)
    ids_NT[np.arange(n), pos_N] = np.where(y_N == 1, 7, 5)
    return ids_NT, y_N


def _state_size(opt_state) -> int:
    """Optimizer-state entries, without scalar step counters."""
    return sum(x.size for x in jax.tree_util.tree_leaves(opt_state) if x.ndim)


def test_freezing_and_learning_a_separable_task(tiny_cfg, tmp_path):
    params, cfg = to_classifier(init_params(tiny_cfg, jax.random.key(0)), tiny_cfg, 2, jax.random.key(1))
    trainable, frozen = partition(params, trainable_mask(params, "last-block"))
    ids_NT, y_N = _synthetic(64, 8)
    tcfg = ClassifierTrainConfig(epochs=12, batch_size=16, eval_freq=4, eval_iter=1,
                                 optim=OptimConfig(lr=3e-3, weight_decay=0.0))
    tx = make_optimizer(tcfg.optim)
    # only the trainable leaves have optimizer state (AdamW: mu and nu)
    assert _state_size(tx.init({"params": trainable})) == 2 * count_params(trainable)
    frozen_before = jax.tree_util.tree_map(np.array, frozen)
    train_b = ClassBatches(ids_NT, y_N, 16, shuffle=True, drop_last=True)
    val_b = ClassBatches(*_synthetic(32, 8, seed=1), 16, shuffle=False, drop_last=False)
    steps = make_classifier_steps(cfg, tcfg.optim, {"params": trainable}, frozen)
    state = steps.init_state({"params": trainable}, jax.random.PRNGKey(tcfg.seed))
    out = train_classifier(steps, state, train_b, val_b, tcfg, tmp_path, meta={"task": "classify"}, progress=False)
    h, trained = out["history"], out["state"].params
    assert h["train_loss"][-1] < 0.5 * h["train_loss"][0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, frozen, frozen_before)  # frozen: untouched
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), trained["params"], trainable)
    assert min(jax.tree_util.tree_leaves(moved)) > 0  # every trainable leaf got updates
    _, acc = evaluate_split(steps, trained, train_b.epoch(0))
    assert acc == 1.0


def test_lora_training_updates_only_adapters(tiny_cfg):
    params, cfg = to_classifier(init_params(tiny_cfg, jax.random.key(0)), tiny_cfg, 2, jax.random.key(1))
    lcfg = LoRAConfig(rank=2, alpha=4)
    trainable = {"params": {}, "lora": init_lora(params, lcfg, jax.random.key(2))}
    steps = make_classifier_steps(cfg, OptimConfig(lr=1e-2, weight_decay=0.1), trainable, params, lcfg.scale)
    state = steps.init_state(trainable, jax.random.PRNGKey(0))
    n_lora = count_params(trainable["lora"])
    assert _state_size(state.opt_state) == 2 * n_lora
    ids_NT, y_N = _synthetic(8, 8)
    losses = []
    for _ in range(8):
        state, m = steps.train_step(state, (ids_NT, y_N))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    assert sorted(state.params) == ["lora", "params"] and state.params["params"] == {}
    assert float(jnp.abs(state.params["lora"]["h_0"]["mlp"]["c_fc"]["B"]).max()) > 0


@pytest.fixture(scope="module")
def tiny_tsv(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        rows.append(f"spam\tWIN a FREE prize now!! call {rng.integers(100, 999)} to CLAIM\n")
        rows.append(f"ham\tsee you at lunch {['today', 'tomorrow', 'later'][i % 3]}, ok?\n")
    path = tmp_path_factory.mktemp("data") / "tiny.tsv"
    path.write_text("".join(rows))
    return path


SIZE = ["--emb-dim", "32", "--n-layers", "2", "--n-heads", "4", "--context-length", "32"]
TRAIN = ["--batch-size", "4", "--eval-freq", "5", "--eval-iter", "1", "--quiet"]
TINY = ["--model", "random", *SIZE, *TRAIN]


@pytest.fixture(scope="module")
def tiny_lm():
    """A tiny GPT-2-vocabulary LM, as `gptjax pretrain` or GPT-2's own weights would give."""
    cfg = get_config("gpt2-small", emb_dim=32, n_layers=2, n_heads=4, context_length=32, qkv_bias=True,
                     tie_embeddings=True, drop_rate=0.0)
    return init_params(cfg, jax.random.key(3)), cfg


def test_cli_finetune_then_classify(tmp_path, tiny_tsv, tiny_lm, tok, capsys):
    base = save_run(tmp_path / "pretrained", *tiny_lm)  # --model: a gptjax run directory
    run = tmp_path / "run"
    assert main(["finetune-classifier", "--data", str(tiny_tsv), "--model", str(base), "--train", "all",
                 "--epochs", "2", "--lr", "1e-3", "--out", str(run), *TRAIN]) == 0
    out = capsys.readouterr().out
    assert "done in" in out and "test" in out
    meta = json.loads((run / "config.json").read_text())
    assert meta["options"]["linear_layout"] == "out_in"  # --linear-layout auto on CPU; loads as (in, out)
    task = meta["classify"]
    assert task["label_names"] == ["ham", "spam"] and task["split_sizes"] == {"train": 42, "val": 6, "test": 12}
    train_texts = book_split(load_labeled_texts(tiny_tsv))["train"].texts
    assert task["max_length"] == max(len(tok.encode(t)) for t in train_texts)  # padded to the longest
    assert (run / "loss.png").is_file() and (run / "accuracy.png").is_file() and (run / "metrics.jsonl").is_file()
    assert task["results"]["test"]["accuracy"] == 1.0
    assert main(["classify", "--run", str(run), "WIN a FREE prize now!! call 123", "see you at lunch today, ok?"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    fields = [ln.split("\t") for ln in lines]
    assert [f[0] for f in fields] == ["spam", "ham"] and all(float(f[1]) > 0.5 for f in fields)
    clf = Classifier.from_run(run, tokenizer=tok)
    label, prob = clf.classify("WIN a FREE prize now!! call 555")
    assert label == "spam" and 0.5 < prob <= 1.0
    assert classify("see you later, ok?", clf.params, clf.cfg, tok, max_length=clf.max_length)[0] == "ham"
    assert clf.params["h_0"]["mlp"]["c_fc"]["kernel"].shape == (clf.cfg.emb_dim, 4 * clf.cfg.emb_dim)  # (in, out)
    # the same fine-tuning with (in, out) kernels: the same logged losses
    assert main(["finetune-classifier", "--data", str(tiny_tsv), "--model", str(base), "--train", "all",
                 "--epochs", "2", "--lr", "1e-3", "--out", str(tmp_path / "run_io"), "--linear-layout", "in_out",
                 *TRAIN]) == 0
    capsys.readouterr()
    logged = [[r["train_loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
               if "train_loss" in r] for d in (run, tmp_path / "run_io")]
    assert len(logged[0]) == len(logged[1]) > 1
    np.testing.assert_allclose(logged[0], logged[1], rtol=1e-4)


def test_cli_lora_run_saves_adapters(tmp_path, tiny_tsv, tiny_lm, capsys):
    from gptjax.gpt2_export import export_hf
    from gptjax.gpt2_weights import load_gpt2

    hf_dir = export_hf(*tiny_lm, tmp_path / "hf")  # --model: a local Hugging Face GPT-2 directory
    run = tmp_path / "lora"
    assert main(["finetune-classifier", "--data", str(tiny_tsv), "--model", str(hf_dir), "--lora-rank", "4",
                 "--lora-alpha", "8", "--epochs", "1", "--out", str(run), *TRAIN]) == 0
    task = json.loads((run / "config.json").read_text())["classify"]
    assert task["lora"] == {"rank": 4, "alpha": 8.0, "targets": None} and task["train_layers"] == "none"
    assert task["train"]["optim"]["lr"] == 8e-4  # appendix E's learning rate
    # adapters + the (frozen, random) head, rebuilt over the base model == the saved merged classifier
    merged, cfg = load_run(run)
    rebuilt, rcfg = classifier_from_adapters(*load_gpt2(hf_dir), run / "adapters.safetensors")
    assert rcfg.n_classes == 2
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), rebuilt, merged)


@pytest.mark.parametrize("argv, message", [
    (["--train", "middle"], "unknown layers to train 'middle'"),
    (["--lora-rank", "0"], "LoRA rank must be a positive integer"),
    (["--batch-size", "100"], "fewer than batch_size=100"),
    (["--labels", "ham,eggs"], "not among the label names"),
])
def test_cli_bad_input(tmp_path, tiny_tsv, capsys, argv, message):
    assert main(["finetune-classifier", "--data", str(tiny_tsv), "--out", str(tmp_path / "r"), *TINY, *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_offline_default_data_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GPTJAX_CACHE", str(tmp_path / "cache"))
    assert main(["finetune-classifier", "--out", str(tmp_path / "r"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "sms+spam+collection.zip" in err and "--data PATH" in err
    assert main(["classify", "--run", str(tmp_path / "nope"), "hi"]) == 2


def test_a_resume_refuses_other_data_and_can_start_from_an_older_step(tmp_path, tiny_tsv, tiny_lm, tok, capsys):
    from gptjax.model_io import load_run_config
    from gptjax.tasks.classify import finetune_classifier
    from gptjax.tasks.classify_data import LabeledTexts

    data = load_labeled_texts(tiny_tsv)
    tcfg = ClassifierTrainConfig(epochs=1, batch_size=8, eval_freq=2, eval_iter=1, save_every=2, keep_checkpoints=3,
                                 optim=OptimConfig(lr=1e-3))
    kw = dict(tcfg=tcfg, progress=False, base_model="pretrained")
    run = tmp_path / "run"
    full = finetune_classifier(*tiny_lm, data, tok, run, **kw)
    assert load_run_config(run)[1]["classify"]["base_model"] == "pretrained"
    relabeled = LabeledTexts(data.texts, 1 - data.labels_N, data.label_names)  # the same texts, labels swapped
    with pytest.raises(ValueError, match=r"cannot resume .*: the data differs from what it was trained on"):
        finetune_classifier(*tiny_lm, relabeled, tok, run, resume=True, **kw)
    capsys.readouterr()
    again = finetune_classifier(*tiny_lm, data, tok, run, resume=2, **kw)
    assert "(after 2 steps)" in capsys.readouterr().out
    assert again["steps"] == full["steps"] == 5 and again["results"] == full["results"]
    assert again["history"]["val_loss"] == full["history"]["val_loss"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, again["params"], full["params"])
