"""The `gptjax` command."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import jax

from gptjax import bench, runs
from gptjax.chat import chat
from gptjax.checkpoint import (CheckpointSaveError, load_base_model, load_model, load_run_config, RunExistsError,
                               TrainingInterrupted)
from gptjax.config import get_config, GPTConfig
from gptjax.cpu import fastest_linear_layout
from gptjax.optim import OptimConfig
from gptjax.generate import generate_text, load_for_decoding, stream_text
from gptjax.gpt2_weights import download_gpt2, export_book, export_hf
from gptjax.lora import LoRAConfig
from gptjax.layout import to_layout
from gptjax.options import MATMUL_PRECISIONS, Options, WEIGHT_DTYPES
from gptjax.runtime import setup
from gptjax.sharding import initialize_distributed
from gptjax.tasks.classify import Classifier, ClassifierTrainConfig, finetune_classifier
from gptjax.tasks.classify_data import load_labeled_texts
from gptjax.tasks.dpo import DPOTrainConfig, finetune_dpo, load_preference_data
from gptjax.tasks.instruct import (finetune_instruct, format_table, generate_responses, InstructTrainConfig,
                                   offline_report, run_style, save_responses)
from gptjax.tasks.instruct_data import load_instruction_data, load_json_records, split_data
from gptjax.tasks.judge import generate_model_scores
from gptjax.tasks.pretrain import pretrain_corpus, PretrainConfig, run_settings
from gptjax.tokenizer import get_gpt2_tokenizer


PRESET_KEYS = ("emb_dim", "n_layers", "n_heads", "drop_rate", "context_length")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="gpt2-small", help="gpt2-small|gpt2-medium|gpt2-large|gpt2-xl (default gpt2-small)")
    g.add_argument("--context-length", type=int, default=256, help="tokens per window (book ch05: 256)")
    g.add_argument("--emb-dim", type=int, help="override the preset's embedding size")
    g.add_argument("--n-layers", type=int, help="override the preset's number of blocks")
    g.add_argument("--n-heads", type=int, help="override the preset's number of heads")
    g.add_argument("--drop-rate", type=float, default=0.1, help="dropout rate (default 0.1)")
    g.add_argument("--qkv-bias", action="store_true", help="bias in the q/k/v projections (GPT-2 has one)")
    g.add_argument("--tie-embeddings", action="store_true", help="share wte with the output head (GPT-2 does)")
    g.add_argument("--init", default="book", choices=["book", "gpt2"],
                   help="weight init: the book's PyTorch defaults (needed for its ch05 numbers) or GPT-2's std 0.02")
    _add_precision_args(g)
    g.add_argument("--attn-impl", default="auto", choices=["auto", "xla", "cudnn", "einsum"])
    g.add_argument("--linear-layout", default="auto", choices=["auto", "in_out", "out_in"],
                   help="how kernels are stored while training; auto: out_in on CPU (faster there), else in_out. "
                   "The saved model loads as in_out either way")


def _add_precision_args(g) -> None:
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    g.add_argument("--matmul-precision", default="float32", choices=list(MATMUL_PRECISIONS),
                   help="bfloat16: the weight matmuls round their operands to bfloat16 and accumulate in float32, "
                   "the rest stays in --dtype (on a CPU with AMX: about 1.9x faster gpt2-small train steps)")


def _add_finetune_layout_arg(g) -> None:
    g.add_argument("--linear-layout", default="auto", choices=["auto", "in_out", "out_in"],
                   help="how kernels are stored while training; auto: out_in on CPU (faster there) unless LoRA "
                   "trains, else in_out. The saved model loads as in_out either way")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of records, a batch size)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _linear_layout(choice: str) -> str:
    return fastest_linear_layout() if choice == "auto" else choice


def _model_config(args):
    overrides = {k: getattr(args, k) for k in PRESET_KEYS if getattr(args, k) is not None}
    overrides.update(init=args.init, qkv_bias=args.qkv_bias, tie_embeddings=args.tie_embeddings)
    return get_config(args.preset, **overrides)


def _options(args, linear_layout: str = "in_out"):
    """The Options of the precision flags (--dtype, --matmul-precision, --attn-impl), for this backend."""

    return Options.for_backend(dtype=args.dtype, matmul_precision=args.matmul_precision, attn_impl=args.attn_impl,
                               linear_layout=linear_layout)


def cmd_pretrain(args) -> int:
    if args.step and not args.resume:
        raise ValueError(f"--step {args.step} picks the checkpoint a resume starts from; give it with --resume RUN_DIR")
    if args.sharding != "none":
        initialize_distributed()  # no-op for one process; joins a multi-host run from the environment
    if args.resume:
        out, cfg, tcfg, optim_for, opts = args.resume, None, None, None, None
        run_cfg, run_tcfg, data, run_opts = run_settings(out)
        _check_resume_flags(args, out, {**data, **run_opts.to_dict(), **run_cfg.to_dict(), **run_tcfg.to_dict(),
                                        **run_tcfg.to_dict()["optim"]})
    else:
        out, cfg = args.out, _model_config(args)
        opts = _options(args, _linear_layout(args.linear_layout))
        # settings are checked before the corpus is read; the schedule needs the batch count, so optim comes later
        tcfg = PretrainConfig(epochs=args.epochs, batch_size=args.batch_size, eval_freq=args.eval_freq,
                              eval_iter=args.eval_iter, seed=args.seed, start_context=args.start_context,
                              save_every=args.save_every, save_minutes=args.save_minutes,
                              keep_checkpoints=args.keep_checkpoints, async_checkpoint=args.async_checkpoints)
        _optim_config(args, updates=1)

        def optim_for(steps: int):
            return _optim_config(args, updates=steps // max(args.grad_accum, 1))
    try:
        result = pretrain_corpus(args.corpus, out, cfg, tcfg, optim_for=optim_for, stride=args.stride,
                                 train_ratio=args.train_ratio, bpe_dir=args.bpe_dir,
                                 resume=args.step if args.resume and args.step else bool(args.resume),
                                 progress=not args.quiet, overwrite=args.overwrite, sharding=args.sharding,
                                 fsdp=args.fsdp, opts=opts)
    except TrainingInterrupted as e:
        print(f"gptjax pretrain: {e}", file=sys.stderr)
        return e.exit_code
    except (CheckpointSaveError, RunExistsError) as e:
        print(f"gptjax pretrain: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, CheckpointSaveError) else 2
    h = result["history"]
    print(f"done in {result['wall_s']:.0f} s: final train loss {h['train_loss'][-1]:.3f}, "
          f"val loss {h['val_loss'][-1]:.3f} (best {min(h['val_loss']):.3f}); "
          f"run saved in {out} (loss plot: {Path(out) / 'loss.png'})")
    print(f"sample: {result['samples'][-1]['text']!r}")
    return 0


def _optim_config(args, updates: int):
    """OptimConfig of the pretrain flags; `updates` optimizer updates in the whole run (for warmup/cosine)."""

    common = dict(weight_decay=args.weight_decay, grad_accum=args.grad_accum)
    if args.appendix_d:
        lr = 1e-3 if args.lr == build_parser().parse_args(["pretrain"]).lr else args.lr
        return OptimConfig.appendix_d(max(updates, 1), lr=lr, **common)
    warmup = int(args.warmup_frac * updates) if args.warmup_frac is not None else args.warmup_steps
    return OptimConfig(lr=args.lr, warmup_steps=warmup, initial_lr=args.initial_lr, min_lr=args.min_lr,
                       decay_steps=max(updates - warmup, 1) if args.cosine else 0, clip_norm=args.clip_norm,
                       clip_after_warmup=args.clip_after_warmup, **common)


# flags a --resume may still take: they do not change what is trained
_RESUME_FLAGS = {"sharding", "fsdp", "resume", "step", "quiet", "corpus", "bpe_dir", "func", "command"}


def _check_resume_flags(args, run: str, run_values: dict) -> None:
    defaults = vars(build_parser().parse_args(["pretrain"]))
    given = [(k, v) for k, v in vars(args).items() if k not in _RESUME_FLAGS and v != defaults.get(k)]
    if given:
        flags = ", ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") +
                          (f" (the run has {k}={run_values[k]!r})" if k in run_values else "") for k, v in given)
        raise ValueError(f"--resume continues {run!r} with the settings saved in its config.json; drop {flags} "
                         f"(or start a new run with another --out)")


def cmd_generate(args) -> int:
    params, cfg, opts = load_for_decoding(args.model, args.weight_dtype)
    tok = get_gpt2_tokenizer(args.bpe_dir)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, opts=opts, tokenizer=tok,
                    seed=args.seed, stop_at_eos=not args.no_eos)
    if not tok.encode(args.prompt, allowed_special={"<|endoftext|>"}):
        raise ValueError("the prompt is empty after tokenization; give --prompt some text")
    if not args.stream:
        print(generate_text((params, cfg), args.prompt, args.max_new_tokens, use_cache=not args.no_cache, **sampling))
        return 0
    print(args.prompt, end="", flush=True)
    for piece in stream_text(params, cfg, tok, args.prompt, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, eos_id=None if args.no_eos else tok.eot_token,
                             key=jax.random.key(args.seed), opts=opts):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_download(args) -> int:
    path = download_gpt2(args.size, cache_dir=args.cache_dir)
    print(f"{args.size}: {path}")
    return 0


def cmd_export(args) -> int:
    runs.check_output(args.out, [args.model], directory=args.format == "hf")
    params, cfg = load_model(args.model)
    out = export_book(params, cfg, args.out) if args.format == "book" else export_hf(params, cfg, args.out)
    print(f"wrote {out}")
    return 0


def _parse_variant(text: str) -> dict:
    """"scan_layers=false,remat=dots" -> {"scan_layers": False, "remat": "dots"} (values typed as GPTConfig's
    and Options')."""


    types = {f.name: type(getattr(c(), f.name)) for c in (GPTConfig, Options) for f in dataclasses.fields(c)}
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise ValueError(f"--variant {text!r}: expected KEY=VALUE pairs with GPTConfig keys or Options keys "
                             f"({sorted(types)})")
        try:
            out[key] = value.lower() in ("1", "true", "yes") if types[key] is bool else types[key](value)
        except ValueError:
            raise ValueError(f"--variant {text!r}: {key} takes a {types[key].__name__}, got {value!r}") from None
    return out


def cmd_bench(args) -> int:
    # JAX grabs 75% of a GPU's memory up front; PyTorch, timed in the same process, needs its share
    if not args.no_torch:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    if args.steps < 1 or args.decode_rounds < 1:
        raise ValueError("--steps and --decode-rounds must be >= 1")
    bc = bench.BenchConfig(preset=args.preset, context_length=args.context_length, batch_size=args.batch_size,
                     dtype=args.dtype, matmul_precision=args.matmul_precision, drop_rate=args.drop_rate,
                     tie_embeddings=args.tie_embeddings,
                     attn_impl=args.attn_impl, scan_layers=args.scan_layers, scan_unroll=args.scan_unroll,
                     remat=args.remat, vocab_multiple=args.vocab_multiple, n_layers=args.n_layers, steps=args.steps,
                     linear_layout=_linear_layout(args.linear_layout),
                     model_overrides={k: v for k, v in (("emb_dim", args.emb_dim), ("n_heads", args.n_heads))
                                      if v is not None},
                     warmup=args.warmup, decode_batches=tuple(args.decode_batch), decode_prompt=args.decode_prompt,
                     decode_tokens=args.decode_tokens, nocache_tokens=args.nocache_tokens,
                     decode_rounds=args.decode_rounds, weight_dtypes=tuple(args.weight_dtype),
                     torch=not args.no_torch, torch_compile=not args.no_torch_compile, parts=tuple(args.parts),
                     torch_process=args.torch_process,
                     variants=tuple(_parse_variant(v) for v in args.variant))
    out = args.out
    if out is None:
        out = f"experiments/results/bench_{jax.devices()[0].platform}"
    bench.run(bc, out)
    return 0


def _col(value: str | None):
    """A column option: 0-based index or header name."""
    return None if value is None else int(value) if value.lstrip("-").isdigit() else value


def cmd_finetune_classifier(args) -> int:
    def go() -> int:
        lora = _lora(args)
        lr = args.lr if args.lr is not None else (8e-4 if lora else 5e-5)  # the book's ch06 / appendix E values
        tcfg = ClassifierTrainConfig(epochs=args.epochs, batch_size=args.batch_size, eval_freq=args.eval_freq,
                                     eval_iter=args.eval_iter, seed=args.seed, save_every=args.save_every,
                                     save_minutes=args.save_minutes, optim=OptimConfig(lr=lr, weight_decay=args.weight_decay))
        labels = tuple(x.strip() for x in args.labels.split(",")) if args.labels else None
        data = load_labeled_texts(args.data, label_names=labels, label_col=_col(args.label_col),
                                  text_col=_col(args.text_col), sep=args.sep)
        print(f"data: {len(data):,} examples {data.counts()}")
        tok = get_gpt2_tokenizer(args.bpe_dir)
        params, cfg, opts = _base_model(args, language_model=False)
        r = finetune_classifier(params, cfg, data, tok, args.out, train=args.train, lora=lora, tcfg=tcfg,
                                max_length=args.max_length, balance=not args.no_balance, train_frac=args.train_frac,
                                val_frac=args.val_frac, drop_rate=None, base_model=args.model,
                                progress=not args.quiet, resume=args.resume, overwrite=args.overwrite, opts=opts)
        acc = "  ".join(f"{k} {v['accuracy'] * 100:.2f}%" for k, v in r["results"].items())
        print(f"done in {r['wall_s']:.0f} s: accuracy {acc}; run saved in {args.out} "
              f"(plots: loss.png, accuracy.png); try: gptjax classify --run {args.out} \"some text\"")
        return 0

    return _run_training(args, go)


def cmd_classify(args) -> int:
    clf = Classifier.from_run(args.run, bpe_dir=args.bpe_dir)
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ValueError("no text to classify: pass it as an argument or on stdin, one per line")
    for text, probs in zip(texts, clf.predict_proba(texts)):
        i = int(probs.argmax())
        print(f"{clf.label_names[i]}\t{probs[i]:.4f}\t{text}")
    return 0


# --- instruction fine-tuning, evaluation, DPO and chat (the book's chapter 7) ----------------------

def _base_model(args, language_model: bool = True):
    """(params, cfg, opts) of --model: a GPT-2 size, local weights, a run directory, or 'random' of the size
    flags, with --drop-rate, laid out as `opts` (the precision and layout flags) train it."""
    random_cfg = None
    if args.model == "random":
        overrides = {k: getattr(args, k) for k in ("emb_dim", "n_layers", "n_heads", "context_length")
                     if getattr(args, k) is not None}
        random_cfg = get_config(args.preset, **overrides, qkv_bias=args.qkv_bias, tie_embeddings=args.tie_embeddings,
                                init=args.init)
    params, cfg = load_base_model(args.model, random_cfg=random_cfg, seed=args.seed, language_model=language_model)
    cfg = cfg.replace(drop_rate=args.drop_rate)
    params, opts = _train_layout(params, cfg, _options(args), args.linear_layout, lora=args.lora_rank is not None)
    return params, cfg, opts


def _train_layout(params, cfg, opts, choice: str, lora: bool):
    """Canonical params -> (params, opts) with the kernels stored as fine-tuning trains them: --linear-layout
    (auto: (out, in) on CPU: a chapter-7 step 3-5 % faster, experiments/cpu_finetune_layout.py), (in, out)
    with LoRA (its adapters are (in, out))."""

    if lora:
        if choice == "out_in":
            raise ValueError("LoRA adapters train on (in, out) kernels; drop --linear-layout out_in (or --lora-rank)")
        target = "in_out"
    else:
        target = _linear_layout(choice)
    opts = opts.replace(linear_layout=target)
    return to_layout(params, cfg, opts), opts


def _lora(args):
    if args.lora_rank is None:
        return None
    targets = tuple(t for t in args.lora_targets.split(",") if t) if args.lora_targets else None
    return LoRAConfig(args.lora_rank, args.lora_alpha if args.lora_alpha is not None else args.lora_rank, targets)


def _ch7_splits(records: list, limit: int | None) -> dict:
    splits = split_data(records)
    return {k: v[:limit] for k, v in splits.items()} if limit else splits


def _ch7_style(args) -> str:
    if getattr(args, "style", None):
        return args.style
    spec = getattr(args, "run", None) or getattr(args, "model", None)
    return run_style(spec if spec and Path(spec).is_dir() else None)


def _run_training(args, fn, **kw) -> int:
    """Run a fine-tuning call; a stop request or a missing download ends with a message, not a traceback."""

    try:
        return fn(**kw)
    except TrainingInterrupted as e:
        print(f"gptjax {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except (RuntimeError, ConnectionError, ImportError, CheckpointSaveError) as e:
        print(f"gptjax {args.command}: error: {e}", file=sys.stderr)
        return 2


def cmd_finetune_instruct(args) -> int:
    def go() -> int:
        splits = _ch7_splits(load_instruction_data(args.data), args.limit)
        tok = get_gpt2_tokenizer(args.bpe_dir)
        params, cfg, opts = _base_model(args)
        tcfg = InstructTrainConfig(epochs=args.epochs, batch_size=args.batch_size, eval_freq=args.eval_freq,
                                   eval_iter=args.eval_iter, seed=args.seed, save_every=args.save_every,
                                   save_minutes=args.save_minutes, optim=OptimConfig(lr=args.lr, weight_decay=args.weight_decay))
        r = finetune_instruct(params, cfg, splits, tok, args.out, style=args.style or "alpaca", tcfg=tcfg,
                              lora=_lora(args), mask=args.mask, pad_multiple=args.pad_multiple,
                              allowed_max_length=args.allowed_max_length, respond=not args.no_respond,
                              max_new_tokens=args.max_new_tokens, base_model=args.model, data_source=args.data,
                              resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, opts=opts)
        f = r["final"]
        print(f"done: train loss {f.get('train_loss', float('nan')):.3f}, "
              f"val loss {f.get('val_loss', float('nan')):.3f} after {r['steps']} steps ({r['wall_s']:.0f} s); run saved in {args.out}"
              + (f"; test responses in {Path(args.out) / 'test-responses.json'}" if "eval" in r else ""))
        print(f"try: gptjax chat --model {args.out}")
        return 0

    return _run_training(args, go)


def cmd_respond(args) -> int:
    style = _ch7_style(args)
    out = Path(args.out) if args.out else (Path(args.run) / "responses.json" if Path(args.run).is_dir()
                                           else Path("responses.json"))
    runs.check_output(out, [args.data, args.run])
    if args.data:
        records = load_instruction_data(args.data)
    else:  # the test split of the data the run was trained on (the book's, by default)
        source = None
        if Path(args.run).is_dir() and (Path(args.run) / "config.json").is_file():
            meta = load_run_config(args.run)[1]
            source = next((meta[t].get("data") for t in ("instruct", "dpo") if isinstance(meta.get(t), dict)), None)
        records = _ch7_splits(load_instruction_data(source), None)["test"]
    records = records[:args.limit] if args.limit else records
    params, cfg, opts = load_for_decoding(args.run, args.weight_dtype)
    tok = get_gpt2_tokenizer(args.bpe_dir)
    responses = generate_responses(params, cfg, records, tok, style=style, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.batch_size, temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, seed=args.seed, progress=not args.quiet, opts=opts)
    save_responses(records, responses, out)
    print(f"{len(records)} responses ({style} prompts) saved to {out}")
    if all("output" in r for r in records):
        print(format_table([offline_report(records, responses, params=params, cfg=cfg, tokenizer=tok, style=style,
                                           name=str(args.run), opts=opts)]))
    return 0


def cmd_judge(args) -> int:
    out = Path(args.out) if args.out else Path(args.data).with_name(Path(args.data).stem + "-scores.json")
    runs.check_output(out, [args.data, args.run])
    records = load_json_records(args.data, keys=("instruction", "output", args.key))
    records = records[:args.limit] if args.limit else records
    style = _ch7_style(args)
    row = {}
    if args.run:
        params, cfg = load_model(args.run)
        row = offline_report(records, [r[args.key] for r in records], params=params, cfg=cfg,
                             tokenizer=get_gpt2_tokenizer(args.bpe_dir), style=style, name=str(args.run))
    else:
        row = offline_report(records, [r[args.key] for r in records], name=Path(args.data).name)
    result = {"offline": row}
    if not args.offline:
        try:
            scores = generate_model_scores(records, args.key, args.model, args.url, style=style,
                                           progress=not args.quiet, timeout=args.timeout)
        except ConnectionError as e:
            print(f"gptjax judge: error: {e} (or pass --offline for the scores that need no judge)", file=sys.stderr)
            return 2
        row["judge_score"] = scores["mean"]
        result["judge"] = scores
        print(f"Number of scores: {scores['n_scored']} of {len(records)} ({scores['n_unparsable']} replies were "
              f"not an integer and {scores['n_out_of_range']} outside 0-100; both left out)\n"
              f"Average score: {scores['mean']:.2f}")
    print(format_table([row]))
    runs.write_json_atomic(out, result, indent=1)
    print(f"scores saved to {out}")
    return 0


def cmd_dpo(args) -> int:
    def go() -> int:
        splits = _ch7_splits(load_preference_data(args.data), args.limit)
        tok = get_gpt2_tokenizer(args.bpe_dir)
        params, cfg, opts = _base_model(args)
        tcfg = DPOTrainConfig(epochs=args.epochs, batch_size=args.batch_size, eval_freq=args.eval_freq,
                              eval_iter=args.eval_iter, seed=args.seed, beta=args.beta, save_every=args.save_every,
                              save_minutes=args.save_minutes, optim=OptimConfig(lr=args.lr, weight_decay=args.weight_decay))
        r = finetune_dpo(params, cfg, splits, tok, args.out, style=_ch7_style(args), tcfg=tcfg, lora=_lora(args),
                         mask_prompt_tokens=not args.no_mask_prompt, pad_multiple=args.pad_multiple,
                         allowed_max_length=args.allowed_max_length, base_model=args.model, data_source=args.data,
                         respond=not args.no_respond, max_new_tokens=args.max_new_tokens, resume=args.resume,
                         overwrite=args.overwrite, progress=not args.quiet, opts=opts)
        f = r["final"]
        print(f"done: val loss {f.get('val_loss', float('nan')):.4f}, val reward margin "
              f"{f.get('val_reward_margin', float('nan')):.4f} after {r['steps']} steps ({r['wall_s']:.0f} s); "
              f"run saved in {args.out} (plots: loss.png, dpo.png)")
        return 0

    return _run_training(args, go)


def cmd_chat(args) -> int:
    try:
        params, cfg, opts = load_for_decoding(args.model, args.weight_dtype)
    except ConnectionError as e:
        print(f"gptjax chat: error: {e}", file=sys.stderr)
        return 2
    if cfg.n_classes:
        raise ValueError(f"{args.model!r} is a classifier; chat needs a language model (a finetune-instruct run)")
    chat(params, cfg, get_gpt2_tokenizer(args.bpe_dir), style=_ch7_style(args), max_new_tokens=args.max_new_tokens,
         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, opts=opts)
    return 0


def _add_base_model_args(p: argparse.ArgumentParser, model_default: str | None) -> None:
    """The fine-tuning base model (--model, the size flags of --model random), its precision, layout and LoRA."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=model_default, required=model_default is None,
                   help="base model: a GPT-2 size (gpt2-small|medium|large|xl, downloaded), a local HF-format "
                        "directory or .safetensors file, a gptjax run directory, or 'random' (a fresh GPT of --preset "
                        "and the size options)")
    g.add_argument("--preset", default="gpt2-small", help="architecture for --model random")
    g.add_argument("--emb-dim", type=int, help="--model random: embedding size")
    g.add_argument("--n-layers", type=int, help="--model random: number of blocks")
    g.add_argument("--n-heads", type=int, help="--model random: number of heads")
    g.add_argument("--context-length", type=int, help="--model random: context length (default: the preset's 1024)")
    g.add_argument("--qkv-bias", action="store_true", help="--model random: bias in the q/k/v projections")
    g.add_argument("--tie-embeddings", action="store_true", help="--model random: share wte with the output head")
    g.add_argument("--init", default="gpt2", choices=["book", "gpt2"], help="--model random: weight init")
    g.add_argument("--drop-rate", type=float, default=0.0, help="dropout while fine-tuning (the book: 0.0)")
    _add_precision_args(g)
    g.add_argument("--attn-impl", default="auto", choices=["auto", "xla", "cudnn", "einsum"])
    g.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank instead of every "
                   "weight (appendix E: 16); base weights stay frozen")
    _add_finetune_layout_arg(g)
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank); scale = alpha/rank")
    g.add_argument("--lora-targets", default=None, help="comma-separated globs of Dense layers to adapt, e.g. "
                   "'*/attn/*,cls_head' (default: every Dense layer)")


def _add_run_args(g, *, epochs: int, lr: float | None, weight_decay: float, eval_freq: int, out: str,
                  lr_help: str = "AdamW learning rate") -> None:
    """The training loop's flags, one set for every fine-tuning command."""
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--lr", type=float, default=lr, help=lr_help)
    g.add_argument("--weight-decay", type=float, default=weight_decay)
    g.add_argument("--eval-freq", type=int, default=eval_freq, help="evaluate every N steps")
    g.add_argument("--eval-iter", type=int, default=5, help="batches per evaluation")
    g.add_argument("--seed", type=int, default=123)
    g.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (0: every epoch); "
                   "default: every --save-minutes. A run also saves at its end and when stopped (Ctrl-C, SIGTERM)")
    g.add_argument("--save-minutes", type=float, default=30.0, help="with no --save-every: minutes of training "
                   "between checkpoints (0: only at the end and when stopped)")
    g.add_argument("--out", default=out, help="run directory")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --out from its latest "
                   "checkpoint (give the same flags as the first time)")
    g.add_argument("--overwrite", action="store_true", help="start over in an --out directory that holds a run")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_ch7_train_args(p: argparse.ArgumentParser, *, model_default: str | None, epochs: int, lr: float,
                        weight_decay: float, out: str) -> None:
    _add_base_model_args(p, model_default)
    g = p.add_argument_group("batches")
    g.add_argument("--style", default=None, choices=["alpaca", "phi3"], help="prompt template (default: alpaca, "
                   "or the one the --model run was trained with)")
    g.add_argument("--pad-multiple", type=_positive_int, default=64, help="pad batches to a multiple of this many tokens, so "
                   "the step compiles once per bucket (1: the book's per-batch longest length)")
    g.add_argument("--allowed-max-length", type=_positive_int, default=1024, help="cut examples to this many tokens "
                   "(and to the model's context)")
    g.add_argument("--limit", type=_positive_int, default=None, help="use only the first N records of each split (quick runs)")
    g.add_argument("--bpe-dir", default=None, help="directory with GPT-2's encoder.json + vocab.bpe (offline)")
    g = p.add_argument_group("training")
    _add_run_args(g, epochs=epochs, lr=lr, weight_decay=weight_decay, eval_freq=5, out=out)
    g.add_argument("--no-respond", action="store_true", help="skip generating and scoring the test-set responses")
    g.add_argument("--max-new-tokens", type=int, default=256, help="tokens per test-set response")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the book)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--weight-dtype", default=None, choices=WEIGHT_DTYPES,
                   help="decode from these weights (bfloat16: half the bytes per token, int8: a quarter)")
    p.add_argument("--bpe-dir", default=None, help="directory with GPT-2's encoder.json + vocab.bpe (offline)")


def _add_ch7_commands(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("finetune-instruct", formatter_class=fmt,
                       help="instruction fine-tuning (the book's chapter 7): train, then answer and score the test set")
    p.add_argument("--data", default="default", help="'default' (the book's instruction-data.json, downloaded once), "
                   "a JSON file or URL of {instruction, input, output} records, or 'hf:NAME[:CONFIG][:SPLIT]'")
    p.add_argument("--mask", default="none", choices=["none", "instruction", "prompt"], help="leave prompt tokens out "
                   "of the loss: 'instruction' (exercise 7.2) or 'prompt' (the response header too)")
    _add_ch7_train_args(p, model_default="gpt2-medium", epochs=2, lr=5e-5, weight_decay=0.1, out="checkpoints/instruct")
    p.set_defaults(func=cmd_finetune_instruct)

    p = sub.add_parser("respond", formatter_class=fmt, help="answer instructions with a model, saved as the book's "
                       "instruction-data-with-response.json")
    p.add_argument("--run", required=True, help="a finetune-instruct/dpo run directory (or any --model of generate)")
    p.add_argument("--data", default=None, help="JSON of {instruction, input[, output]} records to answer (default: "
                   "the test split of the run's data)")
    p.add_argument("--out", default=None, help="output JSON (default: RUN/responses.json)")
    p.add_argument("--style", default=None, choices=["alpaca", "phi3"], help="prompt template (default: the run's)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="prompts decoded together")
    p.add_argument("--limit", type=_positive_int, default=None, help="answer only the first N records")
    p.add_argument("--quiet", action="store_true")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_respond)

    p = sub.add_parser("judge", formatter_class=fmt, help="score responses 0-100 with an LLM judge (Ollama /api/chat, "
                       "the book's prompt), plus exact match and ROUGE-L")
    p.add_argument("--data", required=True, help="responses JSON (gptjax respond / the book's format)")
    p.add_argument("--key", default="model_response", help="field holding the responses")
    p.add_argument("--model", default="llama3", help="judge model name on the server")
    p.add_argument("--url", default="http://localhost:11434", help="Ollama-compatible server (or its /api/chat URL)")
    p.add_argument("--offline", action="store_true", help="no judge: only exact match and ROUGE-L (and, with --run, "
                   "the reference loss)")
    p.add_argument("--run", default=None, help="also report the loss/perplexity of the reference answers under "
                   "this model")
    p.add_argument("--style", default=None, choices=["alpaca", "phi3"], help="prompt template for the judge's input")
    p.add_argument("--limit", type=_positive_int, default=None, help="score only the first N records")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each judge reply")
    p.add_argument("--out", default=None, help="scores JSON (default: DATA-scores.json)")
    p.add_argument("--bpe-dir", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser("dpo", formatter_class=fmt, help="preference tuning with DPO (the book's chapter-7 bonus), from "
                       "an instruction-tuned model")
    p.add_argument("--data", default="default", help="'default' (the book's instruction-data-with-preference.json), "
                   "or a JSON file/URL of {instruction, input, chosen, rejected} records, or 'hf:NAME'")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (the book: 0.1)")
    p.add_argument("--no-mask-prompt", action="store_true", help="score the prompt tokens too (the book masks them)")
    _add_ch7_train_args(p, model_default=None, epochs=1, lr=5e-6, weight_decay=0.01, out="checkpoints/dpo")
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser("chat", formatter_class=fmt,
                       help="talk to an instruction-tuned model; answers stream token by token")
    p.add_argument("--model", required=True, help="a finetune-instruct/dpo run directory, a GPT-2 size or local "
                   "weights")
    p.add_argument("--style", default=None, choices=["alpaca", "phi3"], help="prompt template (default: the run's)")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)


def _add_pretrain_command(sub) -> None:
    """The parsers of pretrain (the book's chapter 5 and appendix D)."""
    p = sub.add_parser("pretrain", help="pretrain a GPT on a text corpus (the book's chapter 5)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus", default=None,
                   help="text file, http(s) URL or 'hf:NAME[:CONFIG][:SPLIT]'; default: the book's the-verdict, "
                        "shipped with gptjax")
    p.add_argument("--out", default="checkpoints/pretrain", help="run directory")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--stride", type=int, default=None, help="window stride (default: the context length)")
    p.add_argument("--train-ratio", type=float, default=0.9)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-freq", type=int, default=5, help="evaluate every N steps")
    p.add_argument("--eval-iter", type=int, default=5, help="batches per evaluation")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--start-context", default="Every effort moves you", help="prompt of the per-epoch sample")
    p.add_argument("--bpe-dir", default=None, help="directory with GPT-2's encoder.json + vocab.bpe (offline)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("schedule and optimizer (the book's appendix D)")
    g.add_argument("--appendix-d", action="store_true",
                   help="the book's appendix-D recipe: peak lr 1e-3 (or --lr), linear warmup over 20%% of the updates "
                        "from 1e-5, cosine decay to 1e-5, gradient clipping at 1.0 after the warmup")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup from --initial-lr to --lr")
    g.add_argument("--warmup-frac", type=float, default=None, help="warmup as a fraction of all updates "
                   "(overrides --warmup-steps; the book: 0.2)")
    g.add_argument("--initial-lr", type=float, default=0.0, help="learning rate at the start of the warmup")
    g.add_argument("--cosine", action="store_true", help="cosine decay from --lr to --min-lr after the warmup")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine decay")
    g.add_argument("--clip-norm", type=float, default=None, help="clip gradients to this global norm")
    g.add_argument("--clip-after-warmup", action="store_true", help="clip only once the warmup is over (the book)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer update")
    g = p.add_argument_group("checkpoints and resuming")
    g.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue an interrupted run from its latest checkpoint, with the settings saved in "
                        "RUN_DIR/config.json (only --corpus, --bpe-dir and --quiet may be given with it); a "
                        "damaged newest checkpoint is passed over for the newest intact one")
    g.add_argument("--step", type=_positive_int, default=None, help="with --resume: continue from the checkpoint "
                   "of this step instead (the newer ones are deleted)")
    g.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (0: every epoch); "
                   "default: every --save-minutes. A run also saves at its end and when stopped (Ctrl-C, SIGTERM)")
    g.add_argument("--save-minutes", type=float, default=30.0, help="with no --save-every: minutes of training "
                   "between checkpoints (0: only at the end and when stopped)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="keep the last K checkpoints (plus the best "
                   "by validation loss)")
    g.add_argument("--async-checkpoints", action="store_true", help="write checkpoints in the background while "
                   "training goes on (holds a copy of the state in memory meanwhile)")
    g.add_argument("--sync-checkpoints", action="store_true", help="write checkpoints in the foreground (the default)")
    g.add_argument("--overwrite", action="store_true", help="start over in an --out directory that holds a run")
    g = p.add_argument_group("devices (gptjax.sharding; multi-host: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                             "JAX_PROCESS_ID, or run under SLURM / on a TPU pod)")
    g.add_argument("--sharding", default="none", choices=["none", "dp", "fsdp"],
                   help="none: one device; dp: batch split over all devices, params replicated; fsdp: params and "
                        "optimizer state split too")
    g.add_argument("--fsdp", type=int, default=None, help="size of the fsdp mesh axis (default: all devices)")
    _add_model_args(p)
    p.set_defaults(func=cmd_pretrain)


def _add_model_commands(sub) -> None:
    """The parsers of generate, download, export."""
    p = sub.add_parser("generate", help="generate text from a trained run or GPT-2 weights",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="a run directory of `gptjax pretrain`, a GPT-2 size "
                   "(gpt2-small|medium|large|xl, downloaded) or a local GPT-2 safetensors file/directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--no-eos", action="store_true", help="keep generating past <|endoftext|>")
    p.add_argument("--weight-dtype", default=None, choices=WEIGHT_DTYPES,
                   help="decode from these weights: bfloat16 halves the bytes each token reads, int8 "
                        "(a scale per row, float32 compute) quarters them")
    p.add_argument("--stream", action="store_true", help="print tokens as they are decoded")
    p.add_argument("--no-cache", action="store_true", help="decode without the KV cache (the book's loop; slower)")
    p.add_argument("--bpe-dir", default=None, help="directory with GPT-2's encoder.json + vocab.bpe (offline)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("download", help="download OpenAI's GPT-2 weights (safetensors) from the Hugging Face hub",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("size", help="gpt2-small|gpt2-medium|gpt2-large|gpt2-xl (or 124M|355M|774M|1558M)")
    p.add_argument("--cache-dir", default=None, help="where to put them (default: checkpoints/hf)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("export", help="export a model to a Hugging Face GPT-2 directory or the book's safetensors",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="a run directory, a GPT-2 size or a GPT-2 safetensors path")
    p.add_argument("--out", required=True, help="output directory (hf) or .safetensors file (book)")
    p.add_argument("--format", default="hf", choices=["hf", "book"],
                   help="hf: model.safetensors + config.json for transformers; book: the book's GPTModel names")
    p.set_defaults(func=cmd_export)


def _add_bench_command(sub) -> None:
    """The parsers of bench."""
    p = sub.add_parser("bench", help="time compile, train steps, MFU, memory and decoding, next to PyTorch",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="gpt2-small", help="gpt2-small|gpt2-medium|gpt2-large|gpt2-xl")
    p.add_argument("--n-layers", type=int, default=None, help="override the preset's blocks (quick runs)")
    p.add_argument("--emb-dim", type=int, default=None, help="override the preset's embedding size")
    p.add_argument("--n-heads", type=int, default=None, help="override the preset's heads")
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    _add_precision_args(p)
    p.add_argument("--drop-rate", type=float, default=0.1)
    p.add_argument("--tie-embeddings", action="store_true", help="GPT-2's tied head (default: the book's own head)")
    p.add_argument("--attn-impl", default="auto", choices=["auto", "xla", "cudnn", "einsum"])
    p.add_argument("--scan-layers", action="store_true", help="scan over the blocks (faster compile)")
    p.add_argument("--scan-unroll", type=int, default=1)
    p.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"])
    p.add_argument("--vocab-multiple", type=int, default=1, help="pad the vocab to a multiple (64: 50304)")
    p.add_argument("--linear-layout", default="auto", choices=["auto", "in_out", "out_in"],
                   help="kernel storage of the train rows; auto: out_in on CPU (faster there), else in_out")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VAL[,KEY=VAL]",
                   help="another gptjax train config timed alongside, e.g. scan_layers=false (repeatable)")
    p.add_argument("--steps", type=int, default=20, help="timed train steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--decode-prompt", type=int, default=8, help="prompt tokens per row")
    p.add_argument("--decode-tokens", type=int, default=200, help="new tokens with the KV cache")
    p.add_argument("--nocache-tokens", type=int, default=20,
                   help="new tokens without the cache at batch 1, divided by the batch beyond (slow path)")
    p.add_argument("--decode-rounds", type=int, default=3)
    p.add_argument("--weight-dtype", nargs="+", default=list(WEIGHT_DTYPES), choices=WEIGHT_DTYPES,
                   help="weight dtypes of the KV-cache decode rows")
    p.add_argument("--parts", nargs="+", default=["bandwidth", "train", "compile", "decode"],
                   choices=["bandwidth", "train", "compile", "decode"])
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    p.add_argument("--no-torch-compile", action="store_true", help="skip torch.compile (slow to compile on CPU)")
    p.add_argument("--torch-process", choices=["auto", "same", "apart"], default="auto",
                   help="PyTorch's train rows alternated with gptjax's in this process (same), or after them in "
                        "their own process (apart); auto: apart on CPU, where the two thread pools slow each other")
    p.add_argument("--out", default=None, help="write OUT.json/.md/.png (default experiments/results/bench_<platform>)")
    p.set_defaults(func=cmd_bench)


def _add_ch6_commands(sub) -> None:
    """The parsers of finetune-classifier and classify (the book's chapter 6)."""
    p = sub.add_parser("finetune-classifier", help="fine-tune a GPT into a text classifier (the book's chapter 6; "
                       "LoRA: appendix E)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="sms-spam", help="'sms-spam' (the UCI SMS Spam Collection, downloaded once), "
                   "a CSV/TSV file, or 'hf:NAME[:CONFIG][:SPLIT]'")
    g.add_argument("--labels", default=None, help="comma-separated label names in class order (default: ham,spam "
                   "for sms-spam, else the sorted label values)")
    g.add_argument("--label-col", default=None, help="label column: 0-based index or header name (default 0; 'label' for hf:)")
    g.add_argument("--text-col", default=None, help="text column: 0-based index or header name (default 1; 'text' for hf:)")
    g.add_argument("--sep", default=None, help="field separator (default: tab if the first line has one, else comma)")
    g.add_argument("--no-balance", action="store_true", help="keep all examples instead of undersampling to the "
                   "smallest class")
    g.add_argument("--train-frac", type=float, default=0.7)
    g.add_argument("--val-frac", type=float, default=0.1)
    g.add_argument("--max-length", type=int, default=None, help="pad/truncate to this many tokens (default: the "
                   "longest training example, capped at the context length)")
    g.add_argument("--bpe-dir", default=None, help="directory with GPT-2's encoder.json + vocab.bpe (offline)")
    _add_base_model_args(p, "gpt2-small")
    g = p.add_argument_group("training")
    g.add_argument("--train", default=None, help="base parameters to train: last-block (the book: last block, final "
                   "LayerNorm, head), last-N, all, head, or none; default last-block, or none with --lora-rank")
    _add_run_args(g, epochs=5, lr=None, weight_decay=0.1, eval_freq=50, out="checkpoints/classifier",
                  lr_help="AdamW learning rate (default 5e-5, or 8e-4 with LoRA)")
    p.set_defaults(func=cmd_finetune_classifier)

    p = sub.add_parser("classify", help="classify texts with a fine-tuned classifier run",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="run directory of `gptjax finetune-classifier`")
    p.add_argument("text", nargs="*", help="texts to classify (default: one per line on stdin); prints "
                   "label<TAB>probability<TAB>text")
    p.add_argument("--bpe-dir", default=None, help="directory with GPT-2's encoder.json + vocab.bpe (offline)")
    p.set_defaults(func=cmd_classify)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptjax", description="GPT pipeline of 'Build a LLM (From Scratch)' in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_pretrain_command(sub)
    _add_model_commands(sub)
    _add_bench_command(sub)
    _add_ch6_commands(sub)
    _add_ch7_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup()  # persistent compilation cache (~/.cache/gptjax/jax) and XLA:CPU flags, before any JAX work
    try:
        return args.func(args)
    except (ValueError, OSError, FloatingPointError, KeyError, RuntimeError, ImportError) as e:
        print(f"gptjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptjax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
