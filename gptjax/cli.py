"""The `gptjax` command: parses the flags (gptjax.flags: generated from the config dataclasses), builds
the config objects and calls one library function per command."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from functools import partial
from pathlib import Path

import jax

from gptjax import bench, flags, runs, shards, tracking
from gptjax.chat import chat
from gptjax.checkpoint import CONFIG_FILE, CheckpointSaveError, TrainingInterrupted
from gptjax.model_io import load_base_model, load_model, load_run_config
from gptjax.config import get_config, GPTConfig
from gptjax.cpu import fastest_linear_layout
from gptjax.flags import from_args
from gptjax.generate import generate_text, load_for_decoding, stream_text
from gptjax.hub import DOWNLOAD_HINT, download_gpt2
from gptjax.gpt2_export import export_book, export_hf
from gptjax.layout import to_layout
from gptjax.lora import LoRAConfig
from gptjax.optim import OptimConfig
from gptjax.options import Options
from gptjax.parsers import build_parser, OPTION_FLAGS, PARSERS
from gptjax.runtime import setup
from gptjax.sharding import initialize_distributed
from gptjax.tasks.classify import Classifier, ClassifierTrainConfig, finetune_classifier
from gptjax.tasks.classify_data import load_labeled_texts
from gptjax.tasks.dpo import DPOTrainConfig, finetune_dpo, load_preference_data
from gptjax.tasks.evaluate import judge_file, respond_file
from gptjax.tasks.hellaswag import evaluate_hellaswag
from gptjax.tasks.instruct import finetune_instruct, InstructTrainConfig, run_style
from gptjax.tasks.instruct_data import load_instruction_data, split_data
from gptjax.tasks.pretrain import evaluate_corpus, pretrain_corpus, pretrain_shards, PretrainConfig, run_settings
from gptjax.tokenizer import get_gpt2_tokenizer

SIZE_KEYS = ("emb_dim", "n_layers", "n_heads", "context_length")


def _model_config(args) -> GPTConfig:
    """The architecture of the model flags: --preset with the size flags given."""
    overrides = {k: getattr(args, k) for k in SIZE_KEYS if getattr(args, k) is not None}
    return get_config(args.preset, **overrides, init=args.init, qkv_bias=args.qkv_bias,
                      tie_embeddings=args.tie_embeddings, drop_rate=args.drop_rate)


def _options(args, lora: bool = False) -> Options:
    """The execution options of the flags for this backend (--linear-layout auto: out_in on CPU, in_out with LoRA)."""
    layout = args.linear_layout
    if lora and layout == "out_in":
        raise ValueError("LoRA adapters train on (in, out) kernels; drop --linear-layout out_in (or --lora-rank)")
    if layout == "auto":
        layout = "in_out" if lora else fastest_linear_layout()
    return Options.for_backend(**{**{k: getattr(args, k) for k in OPTION_FLAGS}, "linear_layout": layout})


def _optim(args, tcfg_cls, **kw) -> OptimConfig:
    """The optimizer flags given to `tcfg_cls`' training (its default optimizer for the flags it lacks)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(OptimConfig) if hasattr(args, f.name)}
    return dataclasses.replace(tcfg_cls().optim, **{**given, **kw})


def _train(args, fn) -> int:
    """Run a training command. A stop request or a failed save ends with a message, not a traceback; a new run
    saves its flags as RUN/command.toml (for --config)."""
    if args.step and not args.resume:
        raise ValueError(f"--step {args.step} picks the checkpoint a resume starts from; give it with --resume")
    tracking.require(args.tracker)  # before the run directory is written
    if args.sharding != "none":
        initialize_distributed()  # no-op for one process; joins a multi-host run from the environment
    code = 0
    try:
        fn()
    except TrainingInterrupted as e:
        print(f"gptjax {args.command}: {e}", file=sys.stderr)
        code = e.exit_code
    except CheckpointSaveError as e:  # exit 1; other errors (a run already in --out, ...) reach main's exit 2
        print(f"gptjax {args.command}: error: {e}", file=sys.stderr)
        return 1
    if not args.resume and (Path(args.out) / CONFIG_FILE).is_file():
        runs.write_text_atomic(Path(args.out) / flags.SAVE_FILE, flags.resolved_toml(args))
    return code


def _resume(args):
    """(run directory, resume argument of the library call) of --out/--resume/--step."""
    if not args.resume:
        return args.out, False
    if args.resume is not True:
        args.out = args.resume
    return args.out, args.step or True


# flags a pretrain --resume may still take: they do not change what is trained (the execution options change
# only how it runs: a run resumes under any)
_RESUME_FLAGS = {"sharding", "fsdp", "resume", "step", "quiet", "data", "bpe_dir", "command", "out", "config",
                 "tracker", *OPTION_FLAGS}


def _resume_options(args, run: str, run_values: dict) -> dict:
    """The execution options given to a pretrain --resume; refuses the flags that would change what is trained."""
    parser = PARSERS[args.command]
    given = {k: v for k, v in vars(args).items() if v != parser.get_default(k)}
    if refused := [(k, v) for k, v in given.items() if k not in _RESUME_FLAGS]:
        names = ", ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") +
                          (f" (the run has {k}={run_values[k]!r})" if k in run_values else "") for k, v in refused)
        raise ValueError(f"--resume continues {run!r} with the settings saved in its config.json; drop {names} "
                         f"(or start a new run with another --out)")
    return {k: v for k, v in given.items() if k in OPTION_FLAGS}


def cmd_pretrain(args) -> int:
    out, resume = _resume(args)
    cfg = tcfg = optim_for = opts = None
    data: dict = {}
    if resume:
        run_cfg, run_tcfg, data, run_opts = run_settings(out)
        # execution options given: the run continues under them (the checkpoints hold the canonical layout)
        given = _resume_options(args, out, {**data, **run_opts.to_dict(), **run_cfg.to_dict(), **run_tcfg.to_dict(),
                                            **run_tcfg.to_dict()["optim"]})
        opts = run_opts.replace(**given) if given else None
    else:
        cfg, opts = _model_config(args), _options(args)
        tcfg = from_args(PretrainConfig, args)
        _pretrain_optim(args, updates=1)  # checked before the corpus is read; the schedule needs the batch count

        def optim_for(steps: int):  # pretrain_corpus counts micro-steps
            return _pretrain_optim(args, updates=steps // max(args.grad_accum, 1))

    # a resume keeps the run's tracker unless --tracker names another
    tracker = args.tracker if not resume or args.tracker != "none" else None
    common = dict(bpe_dir=args.bpe_dir, resume=resume, progress=not args.quiet, overwrite=args.overwrite,
                  sharding=args.sharding, fsdp=args.fsdp, opts=opts, init_from=args.init_from, tracker=tracker)
    shard_dir = data.get("shards", args.data)
    on_shards = shard_dir is not None and (Path(shard_dir) / shards.META).is_file()
    if not on_shards and (args.max_steps or args.tokens or args.batch_tokens):
        raise ValueError("--max-steps, --tokens and --batch-tokens budget a run on token shards: give --data the "
                         "directory of `gptjax prepare`")

    def go():
        if on_shards:
            r = pretrain_shards(args.data or shard_dir, out, cfg, tcfg, max_steps=args.max_steps, tokens=args.tokens,
                                batch_tokens=args.batch_tokens, mode=args.sampling,
                                optim_for=None if resume else partial(_pretrain_optim, args), **common)
        else:
            r = pretrain_corpus(args.data, out, cfg, tcfg, stride=args.stride, train_ratio=args.train_frac,
                                optim_for=optim_for, **common)
        h = r["history"]
        print(f"done in {r['wall_s']:.0f} s: final train loss {h['train_loss'][-1]:.3f}, val loss "
              f"{h['val_loss'][-1]:.3f} (best {min(h['val_loss']):.3f}); run saved in {out} (loss plot: "
              f"{Path(out) / 'loss.png'})" + (f"\nsample: {r['samples'][-1]['text']!r}" if r["samples"] else ""))
    return _train(args, go)


def _pretrain_optim(args, updates: int) -> OptimConfig:
    """OptimConfig of the pretrain flags; `updates` optimizer updates in the whole run (for warmup/cosine)."""
    if args.appendix_d:
        lr = 1e-3 if args.lr == PretrainConfig().optim.lr else args.lr
        return OptimConfig.appendix_d(max(updates, 1), lr=lr, weight_decay=args.weight_decay,
                                      grad_accum=args.grad_accum, b1=args.b1, b2=args.b2, eps=args.eps)
    warmup = int(args.warmup_frac * updates) if args.warmup_frac is not None else args.warmup_steps
    return _optim(args, PretrainConfig, warmup_steps=warmup,
                  decay_steps=max(updates - warmup, 1) if args.cosine else 0)


def cmd_prepare(args) -> None:
    meta = shards.prepare(args.sources, args.out, shard_tokens=args.shard_tokens, val_fraction=args.val_fraction,
                          workers=args.workers, text_field=args.text_field, bpe_dir=args.bpe_dir,
                          overwrite=args.overwrite, progress=not args.quiet)
    counts = ", ".join(f"{k} {v['tokens']:,} tokens in {len(v['shards'])} shard(s)" for k, v in meta["splits"].items())
    print(f"{counts}; in {args.out} (train on it: gptjax pretrain --data {args.out} --max-steps N)")


def cmd_evaluate(args) -> None:
    if args.limit and not args.hellaswag:
        raise ValueError("--limit counts HellaSwag items: give --hellaswag FILE too (--max-batches limits the corpus)")
    if args.out:
        runs.check_output(args.out, [args.data, args.model, args.hellaswag], overwrite=args.overwrite)
    model, r = load_model(args.model), {"model": str(args.model)}
    if args.data is not None or args.hellaswag is None:
        r.update(data=args.data or "the-verdict", **evaluate_corpus(
            model, args.data, context_length=args.context_length, batch_size=args.batch_size,
            max_batches=args.max_batches, split=args.split, bpe_dir=args.bpe_dir))
        print(f"{r['model']} on {r['data']}: loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f} "
              f"({r['tokens']:,} tokens, windows of {r['context_length']})")
    if args.hellaswag:
        hs = evaluate_hellaswag(model, args.hellaswag, limit=args.limit, batch_size=args.batch_size,
                                context_length=args.context_length, bpe_dir=args.bpe_dir)
        r["hellaswag"] = {k: hs[k] for k in ("data", "accuracy", "n", "predictions")}
        print(f"{r['model']} on HellaSwag {hs['data']}: accuracy {hs['accuracy']:.4f} ({hs['n']:,} items; the "
              f"ending with the lowest mean loss per token)")
    if args.out:
        runs.write_json_atomic(args.out, r)


def _base_model(args, language_model: bool = True):
    """(params, cfg, opts) of --model: a GPT-2 size, local weights, a run directory, or 'random' of the model
    flags, with --drop-rate, laid out as the execution options train it."""
    random_cfg = _model_config(args) if args.model == "random" else None
    params, cfg = load_base_model(args.model, random_cfg=random_cfg, seed=args.seed, language_model=language_model)
    cfg = cfg.replace(drop_rate=args.drop_rate)
    opts = _options(args, lora=args.lora_rank is not None)
    return to_layout(params, cfg, opts), cfg, opts


def _lora(args) -> LoRAConfig | None:
    if args.lora_rank is None:
        return None
    targets = tuple(t for t in args.lora_targets.split(",") if t) if args.lora_targets else None
    return LoRAConfig(args.lora_rank, args.lora_alpha if args.lora_alpha is not None else args.lora_rank, targets)


def _finetune_common(args, task: str) -> dict:
    """The keyword arguments every fine-tuning call takes from the flags. On --resume, --model and --data left at
    their defaults are what the run recorded (config.json's `task` entry)."""
    out, resume = _resume(args)
    if resume and (Path(out) / CONFIG_FILE).is_file():
        run_cfg, meta = load_run_config(out)
        recorded = meta.get(task) or {}
        for flag, key in (("model", "base_model"), ("data", "data")):
            if getattr(args, flag) == PARSERS[args.command].get_default(flag) and recorded.get(key):
                setattr(args, flag, recorded[key])
        if args.model == "random":  # the architecture the run was started with
            for k in (*SIZE_KEYS, "qkv_bias", "tie_embeddings", "init"):
                setattr(args, k, getattr(run_cfg, k))
    return dict(out_dir=out, lora=_lora(args), base_model=args.model, resume=resume, overwrite=args.overwrite,
                progress=not args.quiet, sharding=args.sharding, fsdp=args.fsdp)


def _col(value: str | None):
    """A column option: 0-based index or header name."""
    return None if value is None else int(value) if value.lstrip("-").isdigit() else value


def cmd_finetune_classifier(args) -> int:
    def go():
        common = _finetune_common(args, "classify")
        # the book's ch06 / appendix E learning rates
        lr = args.lr if args.lr is not None else (8e-4 if common["lora"] else 5e-5)
        tcfg = from_args(ClassifierTrainConfig, args, optim=_optim(args, ClassifierTrainConfig, lr=lr))
        labels = tuple(x.strip() for x in args.labels.split(",")) if args.labels else None
        data = load_labeled_texts(args.data, label_names=labels, label_col=_col(args.label_col),
                                  text_col=_col(args.text_col), sep=args.sep)
        print(f"data: {len(data):,} examples {data.counts()}")
        params, cfg, opts = _base_model(args, language_model=False)
        r = finetune_classifier(params, cfg, data, get_gpt2_tokenizer(args.bpe_dir), train=args.train, tcfg=tcfg,
                                max_length=args.max_length, balance=not args.no_balance, train_frac=args.train_frac,
                                val_frac=args.val_frac, drop_rate=None, data_source=args.data, opts=opts, **common)
        acc = "  ".join(f"{k} {v['accuracy'] * 100:.2f}%" for k, v in r["results"].items())
        print(f"done in {r['wall_s']:.0f} s: accuracy {acc}; run saved in {args.out} "
              f"(plots: loss.png, accuracy.png); try: gptjax classify --model {args.out} \"some text\"")
    return _train(args, go)


def cmd_classify(args) -> None:
    clf = Classifier.from_run(args.model, bpe_dir=args.bpe_dir)
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ValueError("no text to classify: pass it as an argument or on stdin, one per line")
    for text, probs in zip(texts, clf.predict_proba(texts)):
        i = int(probs.argmax())
        print(f"{clf.label_names[i]}\t{probs[i]:.4f}\t{text}")


def _style(args) -> str:
    return args.style or run_style(args.model if args.model and Path(args.model).is_dir() else None)


def _ch7_inputs(args, task: str, load_records, tcfg_cls) -> dict:
    """The keyword arguments finetune_instruct and finetune_dpo take alike from the flags."""
    common = _finetune_common(args, task)
    splits = split_data(load_records(args.data))
    params, cfg, opts = _base_model(args)
    tcfg = from_args(tcfg_cls, args, optim=_optim(args, tcfg_cls))
    return dict(params=params, cfg=cfg, data={k: v[:args.limit] for k, v in splits.items()} if args.limit else splits,
                tokenizer=get_gpt2_tokenizer(args.bpe_dir), tcfg=tcfg, pad_multiple=args.pad_multiple,
                allowed_max_length=args.allowed_max_length, respond=not args.no_respond,
                max_new_tokens=args.max_new_tokens, data_source=args.data, opts=opts, **common)


def cmd_finetune_instruct(args) -> int:
    def go():
        inputs = _ch7_inputs(args, "instruct", load_instruction_data, InstructTrainConfig)
        r = finetune_instruct(style=args.style or "alpaca", mask=args.mask, **inputs)
        f = r["final"]
        print(f"done: train loss {f.get('train_loss', float('nan')):.3f}, val loss "
              f"{f.get('val_loss', float('nan')):.3f} after {r['steps']} steps ({r['wall_s']:.0f} s); run saved in "
              f"{args.out}" + (f"; test responses in {Path(args.out) / 'test-responses.json'}" if "eval" in r else "")
              + f"\ntry: gptjax chat --model {args.out}")
    return _train(args, go)


def cmd_dpo(args) -> int:
    def go():
        inputs = _ch7_inputs(args, "dpo", load_preference_data, DPOTrainConfig)  # first: a resume sets --model
        r = finetune_dpo(style=_style(args), mask_prompt_tokens=not args.no_mask_prompt, **inputs)
        f = r["final"]
        print(f"done: val loss {f.get('val_loss', float('nan')):.4f}, val reward margin "
              f"{f.get('val_reward_margin', float('nan')):.4f} after {r['steps']} steps ({r['wall_s']:.0f} s); "
              f"run saved in {args.out} (plots: loss.png, dpo.png)")
    return _train(args, go)


def _sampling(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _decoding(args) -> dict:
    """load_for_decoding's options of the flags (auto: the fastest for this backend)."""
    return dict(attn_impl=args.attn_impl, linear_layout=None if args.linear_layout == "auto" else args.linear_layout,
                matvec=None if args.matvec == "auto" else args.matvec)


def cmd_generate(args) -> None:
    params, cfg, opts = load_for_decoding(args.model, args.weight_dtype, **_decoding(args))
    tok = get_gpt2_tokenizer(args.bpe_dir)
    if not tok.encode(args.prompt, allowed_special={"<|endoftext|>"}):
        raise ValueError("the prompt is empty after tokenization; give --prompt some text")
    if not args.stream:
        print(generate_text((params, cfg), args.prompt, args.max_new_tokens, use_cache=not args.no_cache, opts=opts,
                            tokenizer=tok, stop_at_eos=not args.no_eos, **_sampling(args)))
        return
    print(args.prompt, end="", flush=True)
    for piece in stream_text(params, cfg, tok, args.prompt, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, eos_id=None if args.no_eos else tok.eot_token,
                             key=jax.random.key(args.seed), opts=opts):
        print(piece, end="", flush=True)
    print()


def cmd_respond(args) -> None:
    respond_file(args.model, args.data, args.out, style=_style(args), limit=args.limit, batch_size=args.batch_size,
                 max_new_tokens=args.max_new_tokens, weight_dtype=args.weight_dtype, bpe_dir=args.bpe_dir,
                 progress=not args.quiet, overwrite=args.overwrite, decoding=_decoding(args), **_sampling(args))


def cmd_judge(args) -> int | None:
    try:
        judge_file(args.data, args.out, key=args.key, model=args.model, judge_model=args.judge_model, url=args.url,
                   offline=args.offline, style=_style(args), limit=args.limit, timeout=args.timeout,
                   bpe_dir=args.bpe_dir, progress=not args.quiet, overwrite=args.overwrite)
    except ConnectionError as e:
        print(f"gptjax judge: error: {e} (or pass --offline for the scores that need no judge)", file=sys.stderr)
        return 2


def cmd_chat(args) -> None:
    params, cfg, opts = load_for_decoding(args.model, args.weight_dtype, **_decoding(args))
    if cfg.n_classes:
        raise ValueError(f"{args.model!r} is a classifier; chat needs a language model (a finetune-instruct run)")
    chat(params, cfg, get_gpt2_tokenizer(args.bpe_dir), style=_style(args), max_new_tokens=args.max_new_tokens,
         opts=opts, **_sampling(args))


def cmd_download(args) -> None:
    print(f"{args.size}: {download_gpt2(args.size, cache_dir=args.cache_dir, local_hint=DOWNLOAD_HINT)}")


def cmd_export(args) -> None:
    runs.check_output(args.out, [args.model], directory=args.format == "hf", overwrite=args.overwrite)
    params, cfg = load_model(args.model)
    out = export_book(params, cfg, args.out) if args.format == "book" else export_hf(params, cfg, args.out)
    print(f"wrote {out}")


def parse_variant(text: str) -> dict:
    """"scan_layers=false,remat=dots" -> {"scan_layers": False, "remat": "dots"}, typed as GPTConfig's / Options'."""
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


def cmd_bench(args) -> None:
    # JAX grabs 75% of a GPU's memory up front; PyTorch, timed in the same process, needs its share
    if args.torch:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.steps < 1 or args.decode_rounds < 1:
        raise ValueError("--steps and --decode-rounds must be >= 1")
    layout = fastest_linear_layout() if args.linear_layout == "auto" else args.linear_layout
    bc = from_args(bench.BenchConfig, args, linear_layout=layout, variants=tuple(map(parse_variant, args.variant)),
                   model_overrides={k: getattr(args, k) for k in ("emb_dim", "n_heads") if getattr(args, k)},
                   **{k: tuple(getattr(args, k)) for k in ("decode_batches", "weight_dtypes", "parts")})
    bench.run(bc, args.out or f"checkpoints/bench/bench_{jax.devices()[0].platform}")


# each returns its exit code, or None for 0
COMMANDS = {"prepare": cmd_prepare, "pretrain": cmd_pretrain, "evaluate": cmd_evaluate, "generate": cmd_generate,
            "download": cmd_download, "export": cmd_export, "bench": cmd_bench,
            "finetune-classifier": cmd_finetune_classifier, "classify": cmd_classify,
            "finetune-instruct": cmd_finetune_instruct, "dpo": cmd_dpo, "respond": cmd_respond, "judge": cmd_judge,
            "chat": cmd_chat}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; `--config FILE.toml` gives flags from the file, the command line's win."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    config = getattr(args, "config", None)
    if not config and args.command in ("finetune-classifier", "finetune-instruct", "dpo") and args.resume:
        # a fine-tune resumes with the flags it was started with (pretrain reads its settings from config.json)
        saved = Path(args.out if args.resume is True else args.resume) / flags.SAVE_FILE
        config = str(saved) if saved.is_file() else None
    if config:
        at = argv.index(args.command) + 1
        args = parser.parse_args(argv[:at] + flags.config_tokens(config, PARSERS[args.command], args.command)
                                 + argv[at:])
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as e:  # a --config file
        print(f"gptjax: error: {e}", file=sys.stderr)
        return 2
    setup()  # persistent compilation cache (~/.cache/gptjax/jax) and XLA:CPU flags, before any JAX work
    try:
        return COMMANDS[args.command](args) or 0
    except (ValueError, OSError, FloatingPointError, KeyError, RuntimeError, ImportError) as e:
        print(f"gptjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptjax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
