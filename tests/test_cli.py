import json
import subprocess
import sys

import pytest

from gptjax.model_io import load_model
from gptjax.cli import build_parser, main

TINY = ["--emb-dim", "32", "--n-layers", "2", "--n-heads", "4", "--context-length", "16", "--batch-size", "2",
        "--eval-freq", "2", "--eval-iter", "1", "--quiet"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("It had always been his fate to have women say such things of him. " * 30)
    return path


def test_pretrain_then_generate(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--corpus", str(corpus), "--epochs", "1", "--out", str(run), *TINY]) == 0
    out = capsys.readouterr().out
    assert "done in" in out and "sample:" in out
    assert (run / "loss.png").exists() and (run / "metrics.jsonl").exists()
    # --linear-layout auto trains with (out, in) kernels on CPU (faster there); the run loads as (in, out)
    assert json.loads((run / "config.json").read_text())["options"]["linear_layout"] == "out_in"
    assert load_model(run)[0]["h_0"]["mlp"]["c_fc"]["kernel"].shape == (32, 128)  # (in, out)
    assert main(["generate", "--model", str(run), "--prompt", "It had", "--max-new-tokens", "5", "--top-k", "5",
                 "--temperature", "1.0", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("It had")
    # the decoding execution options change how it runs, not what it says
    greedy = ["generate", "--model", str(run), "--prompt", "It had", "--max-new-tokens", "6", "--no-eos"]
    assert main(greedy) == 0
    default = capsys.readouterr().out
    assert main([*greedy, "--linear-layout", "in_out", "--matvec", "xla", "--attn-impl", "einsum"]) == 0
    assert capsys.readouterr().out == default
    # bfloat16 weights (on CPU: read by the matvec kernel, float32 compute)
    assert main(["generate", "--model", str(run), "--prompt", "It had", "--max-new-tokens", "8", "--weight-dtype",
                 "bfloat16", "--no-eos"]) == 0
    with_kernel = capsys.readouterr().out
    assert with_kernel.startswith("It had") and len(with_kernel) > len("It had\n")
    # int8 weights with a scale per row (on CPU: read by the matvec kernel), streamed
    assert main(["generate", "--model", str(run), "--prompt", "It had", "--max-new-tokens", "8", "--weight-dtype",
                 "int8", "--no-eos", "--stream"]) == 0
    int8 = capsys.readouterr().out
    assert int8.startswith("It had") and len(int8) > len("It had\n")


@pytest.mark.parametrize("argv, message", [
    (["--preset", "gpt2-tiny"], "unknown preset 'gpt2-tiny'"),
    (["--n-heads", "5"], "emb_dim=32 is not divisible by n_heads=5"),
    (["--context-length", "0"], "context_length must be a positive integer, got 0"),
    (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    (["--epochs", "-1"], "epochs must be a positive integer, got -1"),
    (["--lr", "-0.1"], "learning rate must be a positive number"),
    (["--drop-rate", "1.5"], "drop_rate must be in [0, 1)"),
    (["--context-length", "1024"], "needed"),
])
def test_pretrain_bad_input(tmp_path, corpus, capsys, argv, message):
    args = ["pretrain", "--corpus", str(corpus), "--out", str(tmp_path / "run"), *TINY, *argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "run" / "params").exists()


def test_missing_and_empty_corpus(tmp_path, capsys):
    assert main(["pretrain", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "missing.txt" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["pretrain", "--corpus", str(empty), "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "empty" in capsys.readouterr().err


def test_generate_bad_input(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "nope" in capsys.readouterr().err


def test_help_lists_commands():
    text = build_parser().format_help()
    assert "pretrain" in text and "generate" in text
    out = subprocess.run([sys.executable, "-m", "gptjax.cli", "pretrain", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--corpus" in out.stdout and "--context-length" in out.stdout


def test_download_offline_names_the_local_option(capsys, tmp_path):
    assert main(["download", "gpt2-small", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"openai-community/gpt2 is not in the Hugging Face cache {tmp_path}" in err and "HF_HUB_OFFLINE=1" in err
    assert "copy config.json + model.safetensors into a directory and pass that directory as --model" in err


def test_export_a_run_to_hf_and_book_formats(tmp_path, corpus, capsys):
    from gptjax.gpt2_weights import load_gpt2

    run = tmp_path / "run"
    assert main(["pretrain", "--corpus", str(corpus), "--epochs", "1", "--out", str(run), *TINY]) == 0
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "book.safetensors"), "--format", "book"]) == 0
    from gptjax.model_io import load_run
    import numpy as np

    params, _ = load_run(run)
    for path in (tmp_path / "hf", tmp_path / "book.safetensors"):
        loaded, cfg = load_gpt2(path)
        np.testing.assert_array_equal(np.asarray(loaded["h_1"]["mlp"]["c_fc"]["kernel"]),
                                      np.asarray(params["h_1"]["mlp"]["c_fc"]["kernel"]))


def test_matmul_precision_reaches_the_options():
    from gptjax.cli import _options

    parser = build_parser()
    opts = _options(parser.parse_args(["pretrain", "--matmul-precision", "bfloat16", "--linear-layout", "in_out"]))
    assert (opts.matmul_precision, opts.dtype) == ("bfloat16", "float32")
    assert _options(parser.parse_args(["pretrain"])).matmul_precision == "float32"
    for command in ("finetune-instruct", "dpo", "finetune-classifier", "bench"):
        required = ["--model", "random"] if command == "dpo" else []
        args = parser.parse_args([command, *required, "--matmul-precision", "bfloat16"])
        assert args.matmul_precision == "bfloat16", command
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "--matmul-precision", "tf32"])


def test_an_output_that_is_an_input_is_refused_and_the_input_stays_byte_for_byte(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--corpus", str(corpus), "--epochs", "1", "--out", str(run), *TINY]) == 0
    data = tmp_path / "answers.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi.", "model_response": "Hi."}]))

    def snapshot():
        return {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    before = snapshot()
    capsys.readouterr()
    for argv, named in [(["export", "--model", str(run), "--out", str(run)], run),
                        (["export", "--model", str(run), "--out", str(run / "hf")], run),
                        (["export", "--model", str(run), "--out", str(tmp_path)], run),
                        (["judge", "--data", str(data), "--out", str(data), "--offline"], data),
                        (["respond", "--run", str(run), "--data", str(data), "--out", str(data)], data)]:
        assert main(argv) == 2, argv
        assert f"would overwrite the input {str(named)!r}; choose another --out" in capsys.readouterr().err
    assert snapshot() == before
    assert main(["judge", "--data", str(data), "--offline"]) == 0  # the default output sits beside the input
    assert (tmp_path / "answers-scores.json").is_file() and data.read_bytes() == before[data]


@pytest.mark.parametrize("argv, flag, value", [
    (["judge", "--data", "x.json", "--offline", "--limit", "-3"], "--limit", "-3"),
    (["respond", "--run", "r", "--batch-size", "0"], "--batch-size", "0"),
    (["finetune-instruct", "--model", "random", "--allowed-max-length", "0"], "--allowed-max-length", "0"),
])
def test_counts_that_must_be_positive_are_refused_where_they_enter(argv, flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert f"argument {flag}: must be a positive integer, got {value!r}" in capsys.readouterr().err


def test_every_flag_has_help_and_there_is_a_version(capsys):
    import argparse

    from gptjax import __version__
    from gptjax.parsers import PARSERS

    build_parser()
    for command, parser in PARSERS.items():
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS, (command, action.option_strings)
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"gptjax {__version__} (jax ")


def test_one_vocabulary_across_commands():
    from gptjax import cli
    from gptjax.options import Options

    parser = build_parser()
    # --model picks the model wherever a command reads one; the older names still work
    for command in ("classify", "respond"):
        assert parser.parse_args([command, "--run", "r"]).model == parser.parse_args([command, "--model", "r"]).model
    assert parser.parse_args(["judge", "--data", "d", "--run", "r"]).model == "r"
    old = parser.parse_args(["pretrain", "--corpus", "c.txt", "--train-ratio", "0.8", "--async-checkpoints"])
    new = parser.parse_args(["pretrain", "--data", "c.txt", "--train-frac", "0.8", "--async-checkpoint"])
    assert vars(old) == vars(new)
    # every training command takes the same execution options, optimizer, run and device flags
    common = ["--scan-layers", "--remat", "dots", "--vocab-multiple", "64", "--linear-layout", "in_out",
              "--warmup-steps", "3", "--grad-accum", "2", "--clip-norm", "1.0", "--keep-checkpoints", "3",
              "--resume", "R", "--step", "4", "--sharding", "dp", "--tracker", "tensorboard"]
    for command in ("pretrain", "finetune-classifier", "finetune-instruct", "dpo"):
        args = parser.parse_args([command, "--model", "random"][:1 if command == "pretrain" else 3] + common)
        assert cli._options(args).replace(grad_barrier=False) == Options(scan_layers=True, remat="dots",
                                                                          vocab_multiple=64), command
        assert (args.warmup_steps, args.grad_accum, args.clip_norm, args.keep_checkpoints) == (3, 2, 1.0, 3)
        assert cli._resume(args) == ("R", 4) and (args.sharding, args.tracker) == ("dp", "tensorboard")
    assert cli._resume(parser.parse_args(["dpo", "--model", "m", "--resume", "--out", "o"])) == ("o", True)


def test_config_file_replays_a_run_and_the_command_line_wins(tmp_path, corpus, capsys):
    first = tmp_path / "first"
    assert main(["pretrain", "--data", str(corpus), "--epochs", "1", "--out", str(first), *TINY]) == 0
    saved = (first / "command.toml").read_text()
    assert 'command = "pretrain"' in saved and "emb_dim = 32" in saved and "resume" not in saved
    again = tmp_path / "again"
    assert main(["pretrain", "--config", str(first / "command.toml"), "--out", str(again)]) == 0
    losses = [[r["loss"] for r in map(json.loads, (run / "steps.jsonl").read_text().splitlines())]
              for run in (first, again)]
    assert losses[0] == losses[1] and len(losses[0]) > 2  # bitwise: the same run
    capsys.readouterr()
    bad = tmp_path / "bad.toml"
    for text, message in [("epochz = 3", "'epochz' is not a flag of this command"),
                          ('command = "dpo"', "holds the flags of `gptjax dpo`, not of `gptjax pretrain`"),
                          ("epochs = [", "is not a TOML file")]:
        bad.write_text(text)
        assert main(["pretrain", "--config", str(bad)]) == 2
        assert message in capsys.readouterr().err
    bad.write_text('epochs = "many"')
    with pytest.raises(SystemExit):  # argparse checks a file's values as it checks typed ones
        main(["pretrain", "--config", str(bad)])
    assert "--epochs: invalid int value: 'many'" in capsys.readouterr().err


def test_config_file_switches_take_the_flag_their_dest_is_named_for(tmp_path):
    """`async_checkpoint = true` is --async-checkpoint, not --sync-checkpoints (the same dest)."""
    from gptjax.cli import parse_args

    for value in (True, False):
        path = tmp_path / f"{value}.toml"
        path.write_text(f"async_checkpoint = {str(value).lower()}\n")
        assert parse_args(["pretrain", "--config", str(path)]).async_checkpoint is value


def test_evaluate_matches_transformers_and_pretraining_continues_from_a_model(tmp_path, corpus, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import numpy as np

    from gptjax.data import make_windows
    from gptjax.tokenizer import get_gpt2_tokenizer

    run, hf = tmp_path / "run", tmp_path / "hf"
    assert main(["pretrain", "--data", str(corpus), "--epochs", "2", "--out", str(run), "--qkv-bias",
                 "--tie-embeddings", "--init", "gpt2", "--lr", "3e-3", *TINY]) == 0
    assert main(["export", "--model", str(run), "--out", str(hf)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(hf), "--data", str(corpus), "--batch-size", "3",
                 "--out", str(tmp_path / "e.json")]) == 0
    got = json.loads((tmp_path / "e.json").read_text())
    # the same windows through transformers' GPT2LMHeadModel
    x, y = make_windows(get_gpt2_tokenizer().encode(corpus.read_text()), 16, 16)
    ref = transformers.GPT2LMHeadModel.from_pretrained(hf).eval()
    with torch.no_grad():
        logits = ref(torch.tensor(x, dtype=torch.long)).logits
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(y, dtype=torch.long).reshape(-1))
    assert got["tokens"] == y.size and got["loss"] == pytest.approx(float(want), rel=1e-5)
    assert got["perplexity"] == pytest.approx(float(np.exp(got["loss"])))
    # continued pretraining starts from the model's weights, not a fresh init
    more, fresh = tmp_path / "more", tmp_path / "fresh"
    for out, extra in ((more, ["--model", str(hf)]), (fresh, ["--qkv-bias", "--tie-embeddings", "--init", "gpt2"])):
        assert main(["pretrain", "--data", str(corpus), "--epochs", "1", "--out", str(out), "--drop-rate", "0",
                     *TINY, *extra]) == 0
    first = {o: json.loads((o / "steps.jsonl").read_text().splitlines()[0])["loss"] for o in (more, fresh)}
    assert first[more] < got["loss"] * 1.5 < first[fresh]
    assert json.loads((more / "config.json").read_text())["data"]["init_from"] == str(hf)
    assert main(["pretrain", "--data", str(corpus), "--out", str(tmp_path / "long"), "--init-from", str(hf),
                 "--context-length", "64", "--quiet"]) == 2
    assert "--context-length 64 is longer than" in capsys.readouterr().err


def test_each_training_commands_defaults_are_its_tasks_config():
    from gptjax import cli
    from gptjax.flags import from_args
    from gptjax.tasks.classify import ClassifierTrainConfig
    from gptjax.tasks.dpo import DPOTrainConfig
    from gptjax.tasks.instruct import InstructTrainConfig
    from gptjax.tasks.pretrain import PretrainConfig

    parser = build_parser()
    for command, cls in (("pretrain", PretrainConfig), ("finetune-instruct", InstructTrainConfig),
                         ("dpo", DPOTrainConfig), ("finetune-classifier", ClassifierTrainConfig)):
        args = parser.parse_args([command] + (["--model", "m"] if command == "dpo" else []))
        if command == "finetune-classifier":
            args.lr = cls().optim.lr  # its CLI default is None: 5e-5, or 8e-4 with LoRA
        assert from_args(cls, args, optim=cli._optim(args, cls)) == cls(), command
    assert parser.parse_args(["dpo", "--model", "m"]).weight_decay == 0.01  # the book's DPO setting
