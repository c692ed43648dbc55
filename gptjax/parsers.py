"""The parsers of the `gptjax` commands, their flags generated from the config dataclasses (gptjax.flags)."""
from __future__ import annotations

import argparse
import dataclasses

import jax

from gptjax import __version__, flags
from gptjax.bench import BenchConfig
from gptjax.config import GPTConfig
from gptjax.flags import add, add_fields, add_flags, positive_int
from gptjax.optim import OptimConfig
from gptjax.options import Options
from gptjax.tasks.classify import ClassifierTrainConfig
from gptjax.tasks.dpo import DPOTrainConfig
from gptjax.tasks.instruct import InstructTrainConfig
from gptjax.tasks.pretrain import PretrainConfig

# the execution options every training command takes (Options' fields; the gradient barrier follows the backend)
OPTION_FLAGS = ("dtype", "matmul_precision", "attn_impl", "scan_layers", "scan_unroll", "remat", "vocab_multiple",
                "linear_layout", "loss_chunk")
OPTIONS_GROUP = "execution options (gptjax.options: how the model runs, never saved with it)"
PARSERS: dict[str, argparse.ArgumentParser] = {}


def _parser(sub, name: str, help: str, config: bool = True) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, formatter_class=flags.HelpFormatter)
    if config:
        p.add_argument("--config", metavar="FILE.toml", default=None, help=flags.HELP["config"])
    PARSERS[name] = p
    return p


def _model_flags(p, *, context_length: int | None, drop_rate: float, init: str, model: str | None = None,
                 lora: bool = False) -> None:
    """The model: --model (fine-tuning's base) or the architecture flags, the execution options, LoRA."""
    g = p.add_argument_group("model")
    if model is not None:
        add(g, "model", model or None, required=not model, help="base model: a GPT-2 size (gpt2-small|medium|large|"
            "xl, downloaded), a GPT-2 hub id (owner/name), a local HF-format directory, .safetensors file or the "
            "book's .pth, a gptjax run directory, or 'random' (a fresh GPT of the flags below)")
    add(g, "preset", "gpt2-small")
    add_fields(g, GPTConfig, skip=("vocab_size", "n_classes"), context_length=context_length, emb_dim=None,
               n_layers=None, n_heads=None, drop_rate=drop_rate, init=init)
    add_fields(p.add_argument_group(OPTIONS_GROUP), Options, only=OPTION_FLAGS, linear_layout="auto")
    if lora:
        add_flags(p.add_argument_group("LoRA (the book's appendix E)"), lora_rank=int, lora_alpha=float,
                  lora_targets=str)


def _training_flags(p, tcfg_cls, out: str, skip_optim: tuple = ("decay_steps", "min_lr", "clip_after_warmup"),
                    **defaults) -> None:
    add_fields(p.add_argument_group("training"), tcfg_cls, skip=("optim",), **defaults)
    base = dataclasses.asdict(tcfg_cls().optim)  # the task's optimizer defaults (DPO: weight decay 0.01)
    base["lr"] = defaults.get("lr", base["lr"])
    add_fields(p.add_argument_group("optimizer"), OptimConfig, skip=skip_optim, **base)
    g = p.add_argument_group("run directory, checkpoints, devices")
    add(g, "out", out)
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR", help=flags.HELP["resume"])
    add_flags(g, step=positive_int, overwrite=False, quiet=False, sharding="none", fsdp=int)


def _sampling_flags(p, max_new_tokens: int = 256) -> None:
    """Sampling, and the execution options of decoding (auto: the fastest for this backend)."""
    add_flags(p.add_argument_group(OPTIONS_GROUP), attn_impl="auto", linear_layout="auto", matvec="auto")
    add_flags(p.add_argument_group("sampling"), max_new_tokens=max_new_tokens, temperature=0.0, top_k=int, top_p=float,
              seed=123, weight_dtype=str, bpe_dir=str)


def _add_pretrain(sub) -> None:
    p = _parser(sub, "pretrain", "pretrain a GPT on a text corpus (the book's chapter 5)")
    g = p.add_argument_group("data")
    add(g, "data", None, aliases=["--corpus"], help="text file, http(s) URL or 'hf:NAME[:CONFIG][:SPLIT]'; default: "
        "the book's the-verdict, shipped with gptjax")
    add_flags(g, stride=int, train_frac=0.9, bpe_dir=str)
    g.add_argument("--model", "--init-from", dest="init_from", default=None, help="start from these weights instead "
                   "of a fresh init (continued pretraining): a GPT-2 size, hub id, local directory, the book's .pth or "
                   "a run; their architecture, cut to --context-length")
    g = p.add_argument_group("token shards (--data DIR of `gptjax prepare`): a step budget instead of epochs")
    add(g, "max_steps", type=positive_int, help="optimizer updates to run")
    add(g, "tokens", type=positive_int, help="tokens to train on (instead of --max-steps)")
    add(g, "batch_tokens", type=positive_int, help="tokens per optimizer update, reached by gradient accumulation "
        "over --batch-size x --context-length micro-batches (GPT-2 / nanoGPT: 524288)")
    add(g, "sampling", "random", choices=["random", "sequential"], help="random windows (nanoGPT) or sequential "
        "coverage of the shards")
    _training_flags(p, PretrainConfig, "checkpoints/pretrain", skip_optim=("decay_steps",))
    g = p.add_argument_group("schedule (the book's appendix D)")
    add(g, "appendix_d", False, help="the book's appendix-D recipe: peak lr 1e-3 (or --lr), linear warmup over 20%% "
        "of the updates from 1e-5, cosine decay to 1e-5, gradient clipping at 1.0 after the warmup")
    add(g, "warmup_frac", type=float, help="warmup as a fraction of all updates (overrides --warmup-steps; the book: "
        "0.2)")
    add(g, "cosine", False, help="cosine decay from --lr to --min-lr after the warmup")
    g.add_argument("--sync-checkpoints", action="store_false", dest="async_checkpoint", default=False,
                   help="write checkpoints in the foreground (the default)")
    _model_flags(p, context_length=256, drop_rate=0.1, init="book")


def _add_prepare(sub) -> None:
    p = _parser(sub, "prepare", "tokenize text into GPT-2 token shards for `gptjax pretrain --data DIR`")
    p.add_argument("sources", nargs="+", help="text files or globs (a document each), .jsonl / .parquet files (a "
                   "--text-field per record), or 'hf:NAME[:CONFIG][:SPLIT]' (streamed)")
    add(p, "out", required=True, help="directory of the shards (and meta.json)")
    add(p, "shard_tokens", 100_000_000, type=positive_int, help="tokens per shard")
    add(p, "val_fraction", 0.005, help="fraction of the documents that go to the val split")
    add(p, "workers", type=int, help="tokenizing processes (default: the CPUs; 0: this process)")
    add(p, "text_field", "text", help="the text field of JSONL / Parquet records")
    add_flags(p, bpe_dir=str, overwrite=False, quiet=False)


def _add_evaluate(sub) -> None:
    p = _parser(sub, "evaluate", "the loss and perplexity of a model on a corpus, and its HellaSwag accuracy")
    add(p, "model", required=True, help="a gptjax run directory, a GPT-2 size, hub id or local directory")
    add(p, "data", None, help="text file, http(s) URL, 'hf:NAME[:CONFIG][:SPLIT]' or a directory of token shards "
        "(`gptjax prepare`: its --split); default: the book's the-verdict, unless only --hellaswag is given")
    add(p, "hellaswag")
    add(p, "limit", type=positive_int, help="with --hellaswag: score only the first N items")
    add(p, "split", "val", choices=["train", "val"], help="with token shards: the split to evaluate")
    add(p, "context_length", type=int, help="tokens per window (default: the model's)")
    add(p, "batch_size", 8)
    add(p, "max_batches", type=positive_int, help="evaluate only the first N batches")
    add(p, "bpe_dir")
    add(p, "out", help="also write the result to this JSON file")
    add(p, "overwrite", False)


def _add_model_commands(sub) -> None:
    p = _parser(sub, "generate", "generate text from a trained run or GPT-2 weights")
    add(p, "model", required=True, help="a gptjax run directory, a GPT-2 size (gpt2-small|medium|large|xl, "
        "downloaded), a GPT-2 hub id (owner/name), a local GPT-2 safetensors file/directory or the book's .pth")
    add(p, "prompt", required=True, help="the text to continue")
    add(p, "no_eos", False, help="keep generating past <|endoftext|>")
    add(p, "stream", False, help="print tokens as they are decoded")
    add(p, "no_cache", False, help="decode without the KV cache (the book's loop; slower)")
    _sampling_flags(p, max_new_tokens=50)

    p = _parser(sub, "download", "download GPT-2 weights (config.json + safetensors) from the Hugging Face "
                "hub into its cache", config=False)
    p.add_argument("size", help="gpt2-small|gpt2-medium|gpt2-large|gpt2-xl (or 124M|355M|774M|1558M), or the hub "
                   "repo id of any GPT-2-architecture model (e.g. distilbert/distilgpt2)")
    add(p, "cache_dir", help="where to put them (default: the Hugging Face cache, $HF_HUB_CACHE or $HF_HOME/hub)")

    p = _parser(sub, "export", "export a model to a Hugging Face GPT-2 directory or the book's "
                "safetensors", config=False)
    add(p, "model", required=True, help="a run directory, a GPT-2 size, a GPT-2 hub repo id (owner/name), a GPT-2 "
        "safetensors path or the book's model.pth")
    add(p, "out", required=True, help="output directory (hf) or .safetensors file (book)")
    add(p, "format", "hf", choices=["hf", "book"], help="hf: model.safetensors + config.json (+ GPT-2's "
        "tokenizer files) for transformers; book: the book's GPTModel names")
    add(p, "overwrite", False)


def _add_bench(sub) -> None:
    p = _parser(sub, "bench", "time compile, train steps, MFU, memory and decoding, next to PyTorch")
    skip = ("model_overrides", "variants", "qkv_bias", "lr", "weight_decay", "seed", "torch_process", "parts",
            "decode_batches", "weight_dtypes", "linear_layout")
    add_fields(p, BenchConfig, skip=skip)
    add_flags(p, linear_layout="auto", emb_dim=int, n_heads=int)
    add(p, "decode_batches", [1, 8], type=int, nargs="+", aliases=["--decode-batch"],
        help="batch sizes of the decode rows")
    add(p, "weight_dtypes", list(BenchConfig.weight_dtypes), nargs="+", choices=flags.WEIGHT_DTYPES,
        aliases=["--weight-dtype"], help="weight dtypes of the KV-cache decode rows")
    add(p, "parts", list(BenchConfig.parts), nargs="+", choices=list(BenchConfig.parts),
        help="what to measure")
    add(p, "torch_process", "auto", choices=["auto", "same", "apart"], help="PyTorch's train rows alternated with "
        "gptjax's in this process (same), or after them in their own process (apart); auto: apart on CPU")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VAL[,KEY=VAL]",
                   help="another gptjax train config timed alongside, e.g. scan_layers=false (repeatable)")
    add(p, "out", help="write OUT.json/.md/.png (default checkpoints/bench/bench_<platform>)")


def _add_ch6(sub) -> None:
    p = _parser(sub, "finetune-classifier", "fine-tune a GPT into a text classifier (the "
                "book's chapter 6; LoRA: appendix E)")
    g = p.add_argument_group("data")
    add(g, "data", "sms-spam", help="'sms-spam' (the UCI SMS Spam Collection, downloaded once), a CSV/TSV file, or "
        "'hf:NAME[:CONFIG][:SPLIT]'")
    add(g, "labels", help="comma-separated label names in class order (default: ham,spam for sms-spam, "
        "else the sorted label values)")
    add(g, "label_col", help="label column: 0-based index or header name (default 0; 'label' for hf:)")
    add(g, "text_col", help="text column: 0-based index or header name (default 1; 'text' for hf:)")
    add(g, "sep", help="field separator (default: tab if the first line has one, else comma)")
    add(g, "no_balance", False, help="keep all examples instead of undersampling to the smallest class")
    add_flags(g, train_frac=0.7, val_frac=0.1)
    add(g, "max_length", type=int, help="pad/truncate to this many tokens (default: the longest training example, "
        "capped at the context length)")
    add(g, "bpe_dir")
    add(g, "train", help="base parameters to train: last-block (the book: last block, final LayerNorm, "
        "head), last-N, all, head, or none; default last-block, or none with --lora-rank")
    _model_flags(p, context_length=None, drop_rate=0.0, init="gpt2", model="gpt2-small", lora=True)
    _training_flags(p, ClassifierTrainConfig, "checkpoints/classifier", lr=None)

    p = _parser(sub, "classify", "classify texts with a fine-tuned classifier run")
    add(p, "model", required=True, aliases=["--run"], help="run directory of `gptjax finetune-classifier`")
    p.add_argument("text", nargs="*", help="texts to classify (default: one per line on stdin); prints "
                   "label<TAB>probability<TAB>text")
    add(p, "bpe_dir")


def _ch7_training(p, tcfg_cls, *, model: str, out: str) -> None:
    g = p.add_argument_group("batches")
    add(g, "style")
    add(g, "pad_multiple", 64, type=positive_int)
    add(g, "allowed_max_length", 1024, type=positive_int)
    add_flags(g, limit=positive_int, bpe_dir=str, no_respond=False)
    add(g, "max_new_tokens", 256, help="tokens per test-set response")
    _model_flags(p, context_length=None, drop_rate=0.0, init="gpt2", model=model, lora=True)
    _training_flags(p, tcfg_cls, out)


def _add_ch7(sub) -> None:
    p = _parser(sub, "finetune-instruct", "instruction fine-tuning (the book's chapter 7): "
                "train, then answer and score the test set")
    add(p, "data", "default", help="'default' (the book's instruction-data.json, downloaded once), a JSON file or "
        "URL of {instruction, input, output} records, or 'hf:NAME[:CONFIG][:SPLIT]'")
    add(p, "mask", "none", choices=["none", "instruction", "prompt"], help="leave prompt tokens out of the loss: "
        "'instruction' (exercise 7.2) or 'prompt' (the response header too)")
    _ch7_training(p, InstructTrainConfig, model="gpt2-medium", out="checkpoints/instruct")

    p = _parser(sub, "dpo", "preference tuning with DPO (the book's chapter-7 bonus), from an instruction-tuned model")
    add(p, "data", "default", help="'default' (the book's instruction-data-with-preference.json), or a JSON "
        "file/URL of {instruction, input, chosen, rejected} records, or 'hf:NAME'")
    add(p, "no_mask_prompt", False, help="score the prompt tokens too (the book masks them)")
    _ch7_training(p, DPOTrainConfig, model="", out="checkpoints/dpo")

    p = _parser(sub, "respond", "answer instructions with a model, saved as the book's "
                "instruction-data-with-response.json")
    add(p, "model", required=True, aliases=["--run"], help="a finetune-instruct/dpo run directory (or any --model "
        "of generate)")
    add(p, "data", help="JSON of {instruction, input[, output]} records to answer (default: the test "
        "split of the run's data)")
    add(p, "out", help="output JSON (default: MODEL/responses.json)")
    add_flags(p, overwrite=False, style=str)
    add(p, "batch_size", 8, type=positive_int, help="prompts decoded together")
    add_flags(p, limit=positive_int, quiet=False)
    _sampling_flags(p)

    p = _parser(sub, "judge", "score responses 0-100 with an LLM judge (the book's prompt; Ollama or "
                "an OpenAI-compatible server), plus exact match and ROUGE-L")
    add(p, "data", required=True, help="responses JSON (gptjax respond / the book's format)")
    add(p, "key", "model_response", help="field holding the responses")
    add(p, "judge_model", "llama3", help="judge model name on the server")
    add(p, "url", "http://localhost:11434", help="the judge: an Ollama server (the book's; or its /api/chat URL), "
        "or an OpenAI-compatible server's .../v1 URL (vLLM, llama.cpp's server; sends $OPENAI_API_KEY when set)")
    add(p, "offline", False, help="no judge: only exact match and ROUGE-L (and, with --model, the reference loss)")
    add(p, "model", aliases=["--run"], help="also report the loss/perplexity of the reference answers "
        "under this gptjax model")
    add_flags(p, style=str, limit=positive_int)
    add(p, "timeout", 60.0, help="seconds to wait for each judge reply")
    add(p, "out", help="scores JSON (default: DATA-scores.json)")
    add_flags(p, overwrite=False, bpe_dir=str, quiet=False)

    p = _parser(sub, "chat", "talk to an instruction-tuned model; answers stream token by token")
    add(p, "model", required=True, help="a finetune-instruct/dpo run directory, a GPT-2 size or hub id, or local "
        "weights")
    add(p, "style")
    _sampling_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptjax", description="The GPT pipeline of 'Build a Large Language Model "
                                     "(From Scratch)' in JAX.")
    parser.add_argument("--version", action="version", version=f"gptjax {__version__} (jax {jax.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_commands in (_add_prepare, _add_pretrain, _add_evaluate, _add_model_commands, _add_bench, _add_ch6,
                         _add_ch7):
        add_commands(sub)
    return parser
