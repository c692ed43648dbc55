"""Pretraining (the book's chapter 5 and appendix D) as a task over the engine: next-token loss,
sliding-window batches, train/val loss at the eval points and a greedy sample after each epoch."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import time
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import optax

from gptjax import engine, runs, shards, tracking
from gptjax.model_io import begin_run, load_model, load_run_config, refuse_existing_run, save_run
from gptjax.config import GPTConfig
from gptjax.data import create_dataloaders, load_corpus, make_windows
from gptjax.engine import Hooks, Steps, TrainConfig, TrainState, cross_entropy, mean_metrics, new_state
from gptjax.optim import OptimConfig
from gptjax.generate import generate, trim_at_eos
from gptjax.model import GPT, count_params, dropout_rngs, init_params
from gptjax.layout import layout_fns, to_layout
from gptjax.options import LEGACY_KEYS, Options
from gptjax.sharding import mesh_for, shard_batch
from gptjax.tasks import hellaswag
from gptjax.tokenizer import get_gpt2_tokenizer


@dataclass
class PretrainConfig(TrainConfig):
    """The book's chapter-5 run: 10 epochs, batch 2, AdamW lr 4e-4, evaluation every 5 steps on 5 batches."""
    start_context: str = "Every effort moves you"  # prompt of the per-epoch sample
    hellaswag: str | None = None        # HellaSwag JSONL (path, URL or "val") scored at every eval point
    hellaswag_limit: int | None = None  # its first N items only

    def __post_init__(self):
        super().__post_init__()
        if self.hellaswag_limit is not None and (not isinstance(self.hellaswag_limit, int) or self.hellaswag_limit < 1):
            raise ValueError(f"hellaswag_limit must be None or a positive integer, got {self.hellaswag_limit!r}")


@lru_cache(maxsize=8)
def make_loss_fn(cfg: GPTConfig, opts: Options = Options()) -> engine.LossFn:
    """Next-token cross-entropy of batches `(x_BT, y_BT)`; dropout when a key is given."""
    model = GPT(cfg, opts)

    def loss_fn(params, frozen, batch, key):
        x_BT, y_BT = batch
        if opts.loss_chunk:  # the model's chunked head + loss: no (B, T, V) logits
            return model.apply({"params": params}, x_BT, deterministic=key is None, rngs=dropout_rngs(key),
                               targets_BT=y_BT), {}
        logits_BTV = model.apply({"params": params}, x_BT, deterministic=key is None, rngs=dropout_rngs(key))
        return cross_entropy(logits_BTV, y_BT), {}

    return loss_fn


def create_state(cfg: GPTConfig, tx: optax.GradientTransformation, seed: int, params: Any = None,
                 opts: Options = Options()) -> TrainState:
    """A fresh pretraining state: params from `seed` (or `params`) in `opts`' layout, the PRNG key for
    dropout split off it."""
    init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
    return new_state(init_params(cfg, init_key, opts) if params is None else params, tx, train_key)


def jitted_steps(cfg: GPTConfig, tx: optax.GradientTransformation, schedule: optax.Schedule | None = None,
                 opts: Options | None = None):
    """The engine's pretraining steps as plain jitted functions: `train_step(state, (x, y)) -> (state,
    metrics)` (state donated) and `eval_step(params, (x, y)) -> loss`, for notebooks and experiments.
    `opts` default: Options.for_backend()."""
    train_fn, eval_fn = engine.step_functions(make_loss_fn(cfg, opts or Options.for_backend()), tx, schedule)
    return (jax.jit(lambda state, batch: train_fn(state, None, batch), donate_argnums=0),
            jax.jit(lambda params, batch: eval_fn(params, None, batch)["loss"]))


def make_steps(cfg: GPTConfig, optim: OptimConfig, mesh: jax.sharding.Mesh | None = None,
               strategy: str = "dp", opts: Options | None = None, share: bool = True) -> Steps:
    """The engine's pretraining steps for `cfg` under `opts` (default Options.for_backend()): on the default
    device, or over `mesh` ("dp" / "fsdp"). Checkpoints hold the canonical layout."""
    opts = opts or Options.for_backend()
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), opts))
    return Steps(make_loss_fn(cfg, opts), optim, abstract, mesh=mesh, strategy=strategy,
                 layout=layout_fns(cfg, opts), share=share)


def init_state(steps: Steps, cfg: GPTConfig, seed: int, params: Any = None, opts: Options | None = None) -> TrainState:
    """`create_state` for `steps` (built with the same `opts`): on a mesh the init runs sharded (no device
    ever holds the whole model)."""
    opts = opts or Options.for_backend()
    init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
    return steps.init_state(params if params is not None else (lambda: init_params(cfg, init_key, opts)),
                            train_key)


def _pretrain_hooks(cfg: GPTConfig, tcfg: PretrainConfig, steps: Steps, train_batches, val_batches, tokenizer,
                   opts: Options, hs: Any = None) -> Hooks:
    """What pretraining adds to the engine's loop: train/val loss (and HellaSwag accuracy over the encoded
    items `hs`) at the eval points, a greedy sample of `tcfg.start_context` after each epoch."""
    start_ids = (np.asarray([tokenizer.encode(tcfg.start_context, allowed_special={"<|endoftext|>"})], np.int32)
                 if tcfg.sample_tokens else None)  # no sample, no tokenizer needed
    if start_ids is not None and start_ids.size == 0:
        raise ValueError(f"the sample prompt {tcfg.start_context!r} is empty after tokenization; give "
                         f"--start-context some text (or sample_tokens=0 for no samples)")

    def evaluate(params, step: int) -> dict:
        epoch = step // len(train_batches)
        values = {"train_loss": mean_metrics(steps, params, train_batches.epoch(epoch), tcfg.eval_iter)["loss"],
                  "val_loss": validate(params)}
        if hs is not None:
            values["hellaswag_acc"] = hellaswag.score(params, cfg, hs, batch_size=tcfg.batch_size, opts=opts)["accuracy"]
        return values

    def validate(params) -> float:
        return mean_metrics(steps, params, val_batches.epoch(0), tcfg.eval_iter).get("loss", float("nan"))

    def sample(params) -> str:
        ids = generate(params, cfg, start_ids, tcfg.sample_tokens, opts=opts)
        return tokenizer.decode(trim_at_eos(ids[0], None))

    def line(rec: dict) -> str:
        return (f"Ep {rec['epoch']} (Step {rec['step']:06d}): Train loss {rec['train_loss']:.3f}, "
                f"Val loss {rec['val_loss']:.3f}" + (f", HellaSwag {rec['hellaswag_acc']:.4f}" if hs else "")
                + f" (lr {rec['lr']:.2e}, grad norm {rec['grad_norm']:.2f})")

    return Hooks(evaluate=evaluate, validate=validate, count=lambda b: int(np.size(b[0])), sample=sample, line=line)


@runs.run_task
def pretrain(cfg: GPTConfig, tcfg: PretrainConfig, train_batches, val_batches, tokenizer, out_dir: str | Path,
             params: Any = None, progress: bool = True, *, resume: bool | int = False, overwrite: bool = False,
             run_info: dict | None = None, stop_after: int | None = None, sharding: str = "none",
             fsdp: int | None = None, opts: Options | None = None, tracker: str | None = None) -> dict:
    """The book's train loop (appendix D's with a warmup/cosine/clip OptimConfig) on the engine.

    Writes config.json, checkpoints/, metrics.jsonl, steps.jsonl, then params/, samples.json and loss.png at
    the end. `params` starts from given weights (else a fresh init from the seed); `resume` continues the run
    in `out_dir` exactly from its newest intact checkpoint (an int: from that step); `overwrite` drops an
    earlier run's checkpoints there; `run_info` is stored in config.json (the CLI keeps its data settings
    there); `stop_after` stops as if interrupted once that many steps are done. `sharding` "dp" / "fsdp"
    trains over every device (`fsdp` sets that axis's size). Raises TrainingInterrupted after SIGINT/SIGTERM
    (a checkpoint is on disk), FloatingPointError when the loss stops being finite, CheckpointSaveError when
    a save fails. `opts`: how the model runs (default Options.for_backend()); `params` come in its layout;
    checkpoints and params/ hold the canonical one, so a run resumes under any options. `tracker` replaces
    tcfg.tracker (a resume may change it). With tcfg.hellaswag, every eval record holds `hellaswag_acc`.
    """
    opts = opts or Options.for_backend()
    if tracker is not None:
        tcfg = dataclasses.replace(tcfg, tracker=tracker)
    if resume and params is not None:
        raise ValueError("pass either params (weights to start from) or resume=True (continue a run), not both")
    tracking.require(tcfg.tracker)
    hs = (hellaswag.encode(hellaswag.load_hellaswag(tcfg.hellaswag, limit=tcfg.hellaswag_limit), tokenizer,
                           cfg.context_length) if tcfg.hellaswag else None)
    if not resume:
        refuse_existing_run(out_dir, overwrite=overwrite,
                            resume_hint=f"`gptjax pretrain --resume {out_dir}` (pretrain(..., resume=True))")
    settings = {"options": opts.to_dict(), "train": tcfg.to_dict(), **(run_info or {})}  # config.json, beside the model
    out_dir = begin_run(out_dir, {"model": cfg.to_dict(), **settings}, resume=resume)
    mesh = mesh_for(sharding, fsdp, tcfg.batch_size)
    steps = make_steps(cfg, tcfg.optim, mesh, sharding if mesh is not None else "dp", opts)
    state = steps.restore_target() if resume else init_state(steps, cfg, tcfg.seed, params, opts)
    n_batches = len(train_batches)
    print(f"model: {count_params(steps.abstract.params):,} parameters; train {n_batches} batches/epoch, "
          f"val {len(val_batches)} batches; {tcfg.epochs * n_batches} steps")
    hooks = _pretrain_hooks(cfg, tcfg, steps, train_batches, val_batches, tokenizer, opts, hs)
    loop = engine.run(steps, state, tcfg, train_batches, out_dir, hooks, meta={"model": cfg.to_dict()},
                      resume=resume, progress=progress, stop_after=stop_after,
                      resume_hint=f"gptjax pretrain --resume {out_dir} (or pretrain(..., resume=True))")
    save_run(out_dir, steps.saved(loop["state"], host=True)[0], cfg,
             extra={**settings, "status": "finished", "tokens_seen": loop["tokens_seen"], "steps": loop["steps"],
                    "wall_s": round(loop["wall_s"], 1)})
    runs.write_json_atomic(out_dir / "samples.json", loop["samples"])
    if loop["history"].get("step"):
        runs.plot_history(loop["history"], out_dir / "loss.png")
    return {**loop, "steps": step_log(out_dir)}


def step_log(out_dir: str | Path) -> dict[str, list[float]]:
    """Every step's loss, learning rate and gradient norm of a run, from its steps.jsonl."""
    recs = runs.read_jsonl(Path(out_dir) / "steps.jsonl")
    return {k: [r[k] for r in recs] for k in ("loss", "lr", "grad_norm")}


def run_settings(out_dir: str | Path) -> tuple[GPTConfig, PretrainConfig, dict, Options]:
    """(model, train settings, data settings, options) of a pretraining run directory: what `gptjax pretrain
    --resume` continues with. The options are those config.json records (older runs kept them under
    "model"), with this backend's gradient barrier; a resume from Python may pass any others."""
    cfg, meta = load_run_config(out_dir)
    if "data" not in meta or "train" not in meta:
        raise ValueError(f"{str(out_dir)!r} was not started by `gptjax pretrain` (its config.json has no data "
                         f"settings); resume it from Python with pretrain(..., resume=True)")
    saved = meta.get("options") or {k: v for k, v in meta["model"].items() if k in LEGACY_KEYS}
    opts = Options.for_backend(**{k: v for k, v in saved.items() if k != "grad_barrier"})
    return cfg, PretrainConfig.from_dict(meta["train"]), meta["data"], opts


def start_from(spec: str, context_length: int, drop_rate: float) -> tuple[Any, GPTConfig]:
    """Canonical params and config of `spec` (anything load_model takes: a GPT-2 size, hub id, local directory
    or run) to pretrain further: its architecture, the context cut to `context_length` (its first position
    embeddings), `drop_rate` for training."""
    params, cfg = load_model(spec)
    if cfg.n_classes:
        raise ValueError(f"{spec!r} is a classifier; continued pretraining starts from a language model")
    if context_length > cfg.context_length:
        raise ValueError(f"--context-length {context_length} is longer than {spec!r}'s {cfg.context_length} "
                         f"positions; use at most {cfg.context_length}")
    params = {**params, "wpe": {"embedding": params["wpe"]["embedding"][:context_length]}}
    return params, cfg.replace(context_length=context_length, drop_rate=drop_rate)


def _settings(out_dir: str | Path, cfg: GPTConfig | None, tcfg: PretrainConfig | None, resume: bool | int,
              opts: Options | None) -> tuple[GPTConfig, PretrainConfig, dict | None, Options | None]:
    """(cfg, tcfg, data settings, opts) a run starts with: a resume's are the run's own (`opts` given win);
    a new run's are `cfg` and `tcfg` (its data settings are None: the caller makes them)."""
    if resume:
        if cfg is not None or tcfg is not None:
            raise ValueError("a resume continues with the run's own model and train settings: pass neither cfg "
                             "nor tcfg")
        cfg, tcfg, data, saved_opts = run_settings(out_dir)
        return cfg, tcfg, data, opts or saved_opts
    if cfg is None or tcfg is None:
        raise ValueError("a new run needs a model config (cfg) and train settings (tcfg)")
    return cfg, tcfg, None, opts


def pretrain_corpus(corpus: str | None, out_dir: str | Path, cfg: GPTConfig | None = None,
                    tcfg: PretrainConfig | None = None, *, optim_for: Callable[[int], OptimConfig] | None = None,
                    stride: int | None = None, train_ratio: float = 0.9, bpe_dir: str | None = None,
                    resume: bool | int = False, opts: Options | None = None, init_from: str | None = None,
                    **kw) -> dict:
    """`gptjax pretrain` as one call: corpus -> GPT-2 tokens -> the book's windows -> `pretrain`.

    `corpus`: a path, URL, `hf:NAME` or None (the default corpus, see data.load_corpus). `optim_for(n)`
    gives the optimizer settings for a run of n micro-steps (warmup and cosine need the count).
    `init_from` (a GPT-2 size, hub id, local directory or run) starts from those weights and their architecture
    instead of a fresh `cfg` (only its context length and dropout count; continued pretraining).
    config.json records the corpus, its sha256 and the windowing. `resume=True` continues the run in
    `out_dir` with the model, train and data settings saved there (`cfg`/`tcfg` must be None) and
    refuses a corpus whose text changed; it runs under the run's recorded options unless `opts` says
    otherwise. `kw` goes to `pretrain` (progress, overwrite, sharding, ...).
    """
    cfg, tcfg, data, opts = _settings(out_dir, cfg, tcfg, resume, opts)
    if not resume:
        data = {"corpus": str(Path(corpus).absolute()) if corpus and Path(corpus).is_file() else corpus,
                "stride": stride, "train_ratio": train_ratio}
        if init_from:
            start, cfg = start_from(init_from, cfg.context_length, cfg.drop_rate)
            data["init_from"] = init_from
    text = load_corpus(corpus or data["corpus"])
    sha = hashlib.sha256(text.encode()).hexdigest()
    if resume and data.get("corpus_sha256", sha) != sha:
        raise ValueError(f"the corpus differs from the one {str(out_dir)!r} was trained on (sha256 {sha[:12]}... vs "
                         f"{data['corpus_sha256'][:12]}...); pass --corpus with the original text to resume")
    tok = get_gpt2_tokenizer(bpe_dir)
    train_b, val_b = create_dataloaders(text, tok, context_length=cfg.context_length, batch_size=tcfg.batch_size,
                                        stride=data["stride"], train_ratio=data["train_ratio"], seed=tcfg.seed)
    if not resume:
        if optim_for is not None:
            tcfg = dataclasses.replace(tcfg, optim=optim_for(tcfg.epochs * len(train_b)))
        data["corpus_sha256"] = sha
    opts = opts or Options.for_backend()
    if init_from and not resume:
        kw["params"] = to_layout(start, cfg, opts)
    print(f"corpus: {len(text):,} characters; {cfg}; {opts}")
    return pretrain(cfg, tcfg, train_b, val_b, tok, out_dir, resume=resume, run_info={"data": data}, opts=opts,
                    **kw)


def _shards_sha256(data_dir: str | Path) -> str:
    """sha256 of a shard directory's meta.json (which holds every shard's sha256)."""
    shards.load_meta(data_dir)  # a directory without finished shards: its own clear error
    return hashlib.sha256((Path(data_dir) / shards.META).read_bytes()).hexdigest()


class StepBatches:
    """`steps` batches of a shards.ShardDataset as one epoch (the engine's batch protocol), timing how long
    each step waits for its batch (`wait_s`).

    With `prefetch` > 0 a background thread (shards.Prefetch) cuts the next batches and puts them on device
    (`put`, default jax.device_put) while a step runs, that many ahead; the engine asks for steps in order,
    and a call out of order (a resume) restarts it there. `close()` (or the end of a `with`) stops the thread.
    """

    def __init__(self, ds: Any, steps: int, *, prefetch: int = 2, put: Callable | None = None):
        self.ds, self.steps, self.prefetch, self.put, self.wait_s = ds, steps, prefetch, put, []
        self._prefetcher, self._batches, self._next = None, None, None

    def __len__(self) -> int:
        return self.steps

    def batch_at(self, epoch: int, i: int):
        step = epoch * self.steps + i
        t0 = time.perf_counter()
        if not self.prefetch:
            batch = self.ds.batch(step)
        else:
            if step != self._next:
                self.close()
                self._prefetcher = shards.Prefetch(self.ds.batch, step, depth=self.prefetch, put=self.put)
                self._batches = iter(self._prefetcher)
            batch, self._next = next(self._batches), step + 1
        self.wait_s.append(time.perf_counter() - t0)
        return batch

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
        self._prefetcher, self._batches, self._next = None, None, None

    def __enter__(self) -> StepBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def epoch(self, epoch: int, start: int = 0):
        return (self.ds.batch(epoch * self.steps + i) for i in range(start, self.steps))


class FixedBatches(list):
    """A fixed list of batches (the validation windows), every epoch the same."""

    def epoch(self, epoch: int, start: int = 0):
        return iter(self[start:])


def pretrain_shards(data_dir: str | Path, out_dir: str | Path, cfg: GPTConfig | None = None,
                    tcfg: PretrainConfig | None = None, *, max_steps: int | None = None, tokens: int | None = None,
                    batch_tokens: int | None = None, optim_for: Callable[[int], OptimConfig] | None = None,
                    mode: str = "random", bpe_dir: str | None = None, resume: bool | int = False,
                    opts: Options | None = None, init_from: str | None = None, prefetch: int = 2, **kw) -> dict:
    """`gptjax pretrain --data SHARDS`: pretraining on `gptjax prepare`'s token shards with a step budget.

    `max_steps` optimizer updates (or enough for `tokens` tokens), each of `batch_tokens` tokens (gradient
    accumulation over micro-batches of tcfg.batch_size x context; default one micro-batch). Batches are a
    pure function of (seed, step, process), so a resume needs no iterator state; validation is on fixed
    windows of the val split (tcfg.eval_iter batches). `optim_for(updates)` gives the optimizer settings.
    `prefetch`: batches cut and put on device ahead of the step in a background thread (0: none).
    """
    cfg, tcfg, data, opts = _settings(out_dir, cfg, tcfg, resume, opts)
    if resume:
        if _shards_sha256(data_dir) != data["meta_sha256"]:
            raise ValueError(f"the shards in {str(data_dir)!r} differ from those {str(out_dir)!r} was trained on "
                             f"(meta.json sha256); pass --data with the original shards to resume")
    else:
        if init_from:
            kw["params"], cfg = start_from(init_from, cfg.context_length, cfg.drop_rate)
        micro = tcfg.batch_size * cfg.context_length
        if batch_tokens is not None and (batch_tokens < micro or batch_tokens % micro):
            raise ValueError(f"--batch-tokens {batch_tokens} must be a multiple of batch_size x context_length = "
                             f"{micro}; e.g. {max(1, round(batch_tokens / micro)) * micro}")
        accum = batch_tokens // micro if batch_tokens else (optim_for(1) if optim_for else tcfg.optim).grad_accum
        if (max_steps is None) == (tokens is None):
            raise ValueError("give the budget of a run on token shards as max_steps (--max-steps) or tokens (--tokens)")
        updates = max_steps if max_steps is not None else -(-tokens // (accum * micro))
        optim = optim_for(updates) if optim_for is not None else tcfg.optim
        tcfg = dataclasses.replace(tcfg, epochs=1, optim=dataclasses.replace(optim, grad_accum=accum))
        data = {"shards": str(Path(data_dir).absolute()), "meta_sha256": _shards_sha256(data_dir), "mode": mode,
                "steps": updates * accum, "batch_tokens": accum * micro, "init_from": init_from}
    opts = opts or Options.for_backend()
    if kw.get("params") is not None:
        kw["params"] = to_layout(kw["params"], cfg, opts)
    where = dict(seed=tcfg.seed, process_index=jax.process_index(), process_count=jax.process_count())
    mesh = mesh_for(kw.get("sharding", "none"), kw.get("fsdp"), tcfg.batch_size)
    train_b = StepBatches(shards.ShardDataset(data_dir, "train", cfg.context_length, tcfg.batch_size, mode=mode,
                                              **where), data["steps"], prefetch=prefetch,
                          put=None if mesh is None else partial(shard_batch, mesh=mesh))
    val_b = FixedBatches(shards.ShardDataset(data_dir, "val", cfg.context_length, tcfg.batch_size, mode="sequential",
                                             **where).val_batches(tcfg.eval_iter))
    print(f"shards: {train_b.ds.num_tokens:,} train tokens, {data['steps']:,} steps of {tcfg.batch_size} x "
          f"{cfg.context_length} tokens ({data['batch_tokens']:,} per update); {cfg}; {opts}")
    with train_b:
        r = pretrain(cfg, tcfg, train_b, val_b, get_gpt2_tokenizer(bpe_dir), out_dir, resume=resume,
                     run_info={"data": data}, opts=opts, **kw)
    if train_b.wait_s:
        wait = np.asarray(train_b.wait_s) * 1e3
        r["data_wait_ms"] = {"mean": float(wait.mean()), "p99": float(np.percentile(wait, 99)), "max": float(wait.max())}
        print(f"data wait per step: mean {wait.mean():.2f} ms, p99 {np.percentile(wait, 99):.2f} ms")
    return r


def evaluate_corpus(model: Any, corpus: str | None = None, *, context_length: int | None = None,
                    batch_size: int = 8, max_batches: int | None = None, split: str = "val",
                    bpe_dir: str | None = None, opts: Options | None = None) -> dict:
    """The mean next-token loss and perplexity of `model` (what load_model takes, or a Model) on a corpus (what
    load_corpus takes; or a directory of token shards: its `split`), over its non-overlapping windows of
    `context_length` tokens (default: the model's)."""
    params, cfg = load_model(model) if isinstance(model, (str, Path)) else model
    T = context_length or cfg.context_length
    if not 0 < T <= cfg.context_length:
        raise ValueError(f"context_length must be in [1, {cfg.context_length}] for this model, got {T}")
    if corpus is not None and (Path(corpus) / shards.META).is_file():
        ds = shards.ShardDataset(corpus, split, T, batch_size, mode="sequential")
        batches = (ds.batch(i) for i in range(len(ds)))
    else:
        ids = get_gpt2_tokenizer(bpe_dir).encode(load_corpus(corpus), allowed_special={"<|endoftext|>"})
        x, y = make_windows(ids, T, T)
        if len(x) == 0:
            raise ValueError(f"the corpus holds {len(ids)} tokens, fewer than one window of {T} + 1; give a longer "
                             f"corpus or a shorter --context-length")
        batches = ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size))
    opts = opts or Options.for_backend()
    loss = jax.jit(lambda p, x, y: make_loss_fn(cfg.replace(drop_rate=0.0), opts)(p, None, (x, y), None)[0])
    params = to_layout(params, cfg, opts)
    total, n = 0.0, 0
    for x_BT, y_BT in itertools.islice(batches, max_batches):
        total += float(loss(params, x_BT, y_BT)) * y_BT.size
        n += y_BT.size
    return {"loss": total / n, "perplexity": engine.perplexity(total / n), "tokens": n, "context_length": T}
